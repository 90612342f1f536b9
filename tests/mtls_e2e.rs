//! mTLS between real Envoys: two sidecars (a caller and the `echo` service's), each with its own
//! `polaris agent` holding a certificate the CA signed after reviewing the ServiceAccount token
//! with the real kube-apiserver, each bootstrapped by `polaris bootstrap --tls`. The service's
//! `polarismesh.cn/tls-mode` decides what flows between them.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kube::TestKube;
use common::raw::{RawConn, SDS_SOTW};
use common::{free_port, get, post, put, Agent, CaServer, Envoy};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use serde_json::{json, Value};

/// Requests a second in the traffic tests (four times the 50: a request in flight at a
/// moment when a proxy refuses is more likely to be caught).
const RPS: u64 = 200;

/// An application that answers every request with its request headers, as JSON.
struct HeaderApp {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl HeaderApp {
    async fn start() -> HeaderApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
            let m: serde_json::Map<String, Value> = headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        Value::String(v.to_str().unwrap_or_default().to_string()),
                    )
                })
                .collect();
            axum::Json(Value::Object(m))
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HeaderApp { port, task }
    }
}

impl Drop for HeaderApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `echo` service's sidecar in `ns`: mTLS bootstrap with `agent`'s SDS socket, its inbound
/// listener on `inbound` forwarding to the app on `app_port`.
async fn echo_sidecar(
    dir: &Path,
    cp: &CaServer,
    ns: &str,
    inbound: u16,
    app_port: u16,
    agent: &Agent,
) -> Envoy {
    Envoy::start_tls(
        dir,
        &format!("sidecar~{ns}/echo-0~127.0.0.1"),
        cp.server.xds_port,
        &[
            "sidecar.polarismesh.cn/serviceName=echo",
            &format!("polarismesh.cn/inboundPort={inbound}"),
            &format!("sidecar.polarismesh.cn/bindPorts={app_port}"),
        ],
        &agent.socket,
    )
    .await
}

/// A control plane with its CA, and the two sidecars.
struct Mesh {
    ns: String,
    cp: CaServer,
    caller_agent: Agent,
    _echo_agent: Agent,
    _app: HeaderApp,
    /// The `echo` service's sidecar.
    server: Envoy,
    caller: Envoy,
    caller_node: String,
    /// The server sidecar's inbound listener port (the registered instance's port).
    inbound: u16,
    c: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Everything up, `echo` in `mode`, its sidecar's certificates living `echo_ttl` seconds.
    async fn start(mode: &str, echo_ttl: u64) -> Mesh {
        let kube = TestKube::from_env();
        let client = kube.client().await;
        let dir = tempfile::tempdir().unwrap();
        let ns = format!("mtls-{}", free_port());
        let mut token_files: Vec<PathBuf> = vec![];
        for sa in ["caller", "echo"] {
            kube.service_account(&client, &ns, sa).await;
            let token = kube.token(&client, &ns, sa, &["polaris-ca"], 3600).await;
            let f = dir.path().join(format!("{sa}.token"));
            std::fs::write(&f, token).unwrap();
            token_files.push(f);
        }
        // The control plane as deployed: ADS over mTLS, streams scoped by the identity they prove.
        let cp = CaServer::start(
            dir.path(),
            &kube,
            &["--ca-signs-per-minute", "600", "--xds-auth", "on"],
        )
        .await;
        let caller_agent = Agent::start(
            dir.path(),
            &cp,
            &token_files[0],
            &["--cert-ttl-secs", "3600"],
        )
        .await;
        let echo_agent = Agent::start(
            dir.path(),
            &cp,
            &token_files[1],
            &["--cert-ttl-secs", &echo_ttl.to_string()],
        )
        .await;
        let c = reqwest::Client::new();
        let (st, body) = post(
            &c,
            &cp.server.url("/naming/v1/namespaces"),
            json!([{ "name": ns }]),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let (st, body) = post(
            &c,
            &cp.server.url("/naming/v1/services"),
            json!([{ "namespace": ns, "name": "echo", "metadata": { "polarismesh.cn/tls-mode": mode } }]),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let app = HeaderApp::start().await;
        let inbound = free_port();
        let server = echo_sidecar(dir.path(), &cp, &ns, inbound, app.port, &echo_agent).await;
        let (st, body) = post(
            &c,
            &cp.server.url("/naming/v1/instances"),
            json!([{ "namespace": ns, "service": "echo", "host": "127.0.0.1", "port": inbound }]),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let caller_node = format!("sidecar~{ns}/caller-0~127.0.0.1");
        let caller = Envoy::start_tls(
            dir.path(),
            &caller_node,
            cp.server.xds_port,
            &["sidecar.polarismesh.cn/serviceName=caller"],
            &caller_agent.socket,
        )
        .await;
        let m = Mesh {
            ns,
            cp,
            caller_agent,
            _echo_agent: echo_agent,
            _app: app,
            server,
            caller,
            caller_node,
            inbound,
            c,
            _dir: dir,
        };
        m.wait_settled(mode).await;
        let _ = m
            .eventually("a call through the caller's sidecar succeeds", |r| {
                r.0.as_ref().is_ok_and(|(st, _)| *st == 200)
            })
            .await;
        m
    }

    fn host(&self) -> String {
        format!("echo.{}", self.ns)
    }

    /// A call through the caller's sidecar: (status, the headers the application saw).
    async fn call(&self) -> Result<(u16, Value), String> {
        send(
            self.c
                .get(format!("http://127.0.0.1:{}/", self.caller.outbound_port))
                .header("host", self.host()),
        )
        .await
    }

    /// A plaintext request straight to the server sidecar's inbound port.
    async fn direct(&self, headers: &[(&str, &str)]) -> Result<(u16, Value), String> {
        // A fresh connection each time: a pooled one may predate a listener change.
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut rq = c.get(format!("http://127.0.0.1:{}/", self.inbound));
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        send(rq).await
    }

    async fn set_mode(&self, mode: &str) {
        let (st, body) = put(
            &self.c,
            &self.cp.server.url("/naming/v1/services"),
            json!([{ "namespace": self.ns, "name": "echo", "metadata": { "polarismesh.cn/tls-mode": mode } }]),
        )
        .await;
        assert_eq!(st, 200, "{body}");
    }

    /// Waits until the control plane has rolled `echo` out to `mode` on both sides.
    async fn wait_settled(&self, mode: &str) {
        let url = self.cp.server.url(&format!(
            "/debug/xds/config?node={}&service=echo",
            self.caller_node
        ));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, cfg) = get(&self.c, &url).await;
            let tls = &cfg["translation"][0]["tls"];
            if tls == &json!({"mode": mode, "client": mode, "server": mode}) {
                return;
            }
            assert!(Instant::now() < deadline, "never settled in {mode}: {cfg}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a call and a direct request until `ok` holds of them (the proxies apply pushes
    /// asynchronously), or fails after 15 s.
    async fn eventually(
        &self,
        what: &str,
        ok: impl Fn(&(Result<(u16, Value), String>, Result<(u16, Value), String>)) -> bool,
    ) -> (Result<(u16, Value), String>, Result<(u16, Value), String>) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = (self.call().await, self.direct(&[]).await);
            if ok(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "never: {what}; last: {r:?}; caller log:\n{}",
                std::fs::read_to_string(&self.caller.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn caller_spiffe(&self) -> String {
        format!("URI=spiffe://cluster.local/ns/{}/sa/caller", self.ns)
    }

    async fn server_handshakes(&self) -> u64 {
        self.server
            .stat(&format!("listener.0.0.0.0_{}.ssl.handshake", self.inbound))
            .await
            .unwrap_or(0)
    }

    async fn caller_handshakes(&self) -> u64 {
        self.caller
            .stat(&format!("cluster.OUTBOUND|{}|echo.ssl.handshake", self.ns))
            .await
            .unwrap_or(0)
    }

    async fn inbound_requests(&self) -> u64 {
        self.server
            .stat("http.INBOUND_HTTP.downstream_rq_total")
            .await
            .unwrap_or(0)
    }

    /// Steady traffic through the caller's sidecar, `rps` requests a second, one at a time.
    fn traffic(&self, rps: u64) -> Traffic {
        let t = Traffic {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(parking_lot::Mutex::new(vec![])),
            task: None,
        };
        let (stop, ok, failed) = (t.stop.clone(), t.ok.clone(), t.failed.clone());
        let (c, url, host) = (
            self.c.clone(),
            format!("http://127.0.0.1:{}/", self.caller.outbound_port),
            self.host(),
        );
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / rps));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                match send(c.get(&url).header("host", &host)).await {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed
                        .lock()
                        .push(format!("at {:?}: {other:?}", started.elapsed())),
                }
            }
        });
        Traffic {
            task: Some(task),
            ..t
        }
    }
}

struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<parking_lot::Mutex<Vec<String>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Stops the traffic: (requests that succeeded, the failures).
    async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.take().unwrap().await.unwrap();
        (self.ok.load(Ordering::Relaxed), self.failed.lock().clone())
    }
}

async fn send(rq: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
    match rq.timeout(Duration::from_secs(5)).send().await {
        Ok(r) => {
            let st = r.status().as_u16();
            let text = r.text().await.map_err(|e| e.to_string())?;
            Ok((
                st,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

fn xfcc(headers: &Value) -> Option<&str> {
    headers["x-forwarded-client-cert"].as_str()
}

#[tokio::test]
async fn strict_is_mtls_only_and_refuses_plaintext() {
    let m = Mesh::start("strict", 3600).await;
    for _ in 0..5 {
        let (st, h) = m.call().await.unwrap();
        assert_eq!(st, 200);
        let x = xfcc(&h).unwrap_or_else(|| panic!("no client certificate details: {h}"));
        assert!(
            x.contains(&m.caller_spiffe()),
            "the app sees the caller's SPIFFE id: {x}"
        );
        assert_eq!(h["x-polaris-inbound"], format!("echo.{}", m.ns));
    }
    assert!(
        m.server_handshakes().await >= 1,
        "the server sidecar did TLS"
    );
    assert!(
        m.caller_handshakes().await >= 1,
        "the caller sidecar did TLS"
    );
    // Both sidecars reached ADS over mTLS with their agents' certificates.
    let (_, nodes) = get(&m.c, &m.cp.server.url("/debug/xds/nodes")).await;
    let echo_node = format!("sidecar~{}/echo-0~127.0.0.1", m.ns);
    for (id, sa) in [(&m.caller_node, "caller"), (&echo_node, "echo")] {
        let n = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| &n["node"]["id"] == id)
            .unwrap_or_else(|| panic!("{id} not connected: {nodes}"));
        assert_eq!(
            n["node"]["identity"],
            format!("spiffe://cluster.local/ns/{}/sa/{sa}", m.ns)
        );
    }
    // Plaintext straight to the inbound port: no filter chain takes it, no HTTP answer at all.
    let r = m.direct(&[]).await;
    assert!(r.is_err(), "plaintext answered in strict mode: {r:?}");
}

#[tokio::test]
async fn permissive_takes_mtls_and_plaintext_both_through_http() {
    let m = Mesh::start("permissive", 3600).await;
    let before = m.inbound_requests().await;
    let (st, h) = m.call().await.unwrap();
    assert_eq!(st, 200);
    assert!(
        xfcc(&h).is_some_and(|x| x.contains(&m.caller_spiffe())),
        "the caller used mTLS: {h}"
    );
    assert_eq!(h["x-polaris-inbound"], format!("echo.{}", m.ns));
    let (st, h) = m.direct(&[]).await.unwrap();
    assert_eq!(st, 200, "plaintext is accepted in permissive mode");
    assert_eq!(
        h["x-polaris-inbound"],
        format!("echo.{}", m.ns),
        "plaintext went through the inbound route too: {h}"
    );
    assert!(xfcc(&h).is_none(), "{h}");
    // A plaintext client cannot pass itself off as another workload.
    let forged =
        "By=spiffe://cluster.local/ns/x/sa/y;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    let (st, h) = m
        .direct(&[("x-forwarded-client-cert", forged)])
        .await
        .unwrap();
    assert_eq!(st, 200);
    assert!(xfcc(&h).is_none(), "a forged identity reached the app: {h}");
    assert!(
        m.inbound_requests().await >= before + 3,
        "the inbound HTTP connection manager counted both kinds"
    );
    assert!(m.server_handshakes().await >= 1);
}

#[tokio::test]
async fn none_is_plaintext() {
    let m = Mesh::start("none", 3600).await;
    let (st, h) = m.call().await.unwrap();
    assert_eq!(st, 200);
    assert!(xfcc(&h).is_none(), "{h}");
    assert_eq!(m.caller_handshakes().await, 0);
    assert_eq!(m.server_handshakes().await, 0);
    let (st, _) = m.direct(&[]).await.unwrap();
    assert_eq!(st, 200);
}

/// `none → strict → permissive → none` with 200 requests a second flowing: not one fails, and
/// each mode is in force once its rollout is done.
#[tokio::test]
async fn live_mode_switches_fail_no_request() {
    let m = Mesh::start("none", 3600).await;
    let traffic = m.traffic(RPS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spiffe = m.caller_spiffe();
    for mode in ["strict", "permissive", "none"] {
        let started = Instant::now();
        m.set_mode(mode).await;
        m.wait_settled(mode).await;
        let rollout = started.elapsed();
        let (call, direct) = m
            .eventually(&format!("{mode} in force"), |(call, direct)| {
                let mtls = call.as_ref().is_ok_and(|(st, h)| {
                    *st == 200 && xfcc(h).is_some_and(|x| x.contains(&spiffe))
                });
                let plain = call
                    .as_ref()
                    .is_ok_and(|(st, h)| *st == 200 && xfcc(h).is_none());
                let direct_ok = direct.as_ref().is_ok_and(|(st, _)| *st == 200);
                match mode {
                    "strict" => mtls && direct.is_err(),
                    "permissive" => mtls && direct_ok,
                    _ => plain && direct_ok,
                }
            })
            .await;
        eprintln!(
            "{mode}: rolled out in {rollout:?}; call {:?}, direct {:?}",
            call.map(|r| r.0),
            direct.map(|r| r.0)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, failed) = traffic.stop().await;
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:#?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(ok >= 100, "only {ok} requests were sent");
}

/// The leaf certificate the server sidecar presents on a new mTLS connection: (serial, SAN).
async fn presented_certificate(
    port: u16,
    client_chain: &str,
    client_key: &str,
) -> (String, String) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(client_chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(client_key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("echo").unwrap(), tcp)
        .await
        .expect("mTLS handshake with the server sidecar");
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    common::serial_and_san(&der)
}

/// Accepts any server certificate: the test only records which one was presented.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate and key an agent serves (SDS `default`), as PEM.
async fn agent_certificate(socket: &Path) -> (String, String) {
    let mut c = RawConn::unix(socket).await;
    let mut s = c.grpc(SDS_SOTW).await;
    s.send_msg(&DiscoveryRequest {
        node: Some(Node {
            id: "test~x/y~127.0.0.1".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    });
    let r: DiscoveryResponse = s.next().await.unwrap();
    common::secret_pems(&Secret::decode(r.resources[0].value.as_slice()).unwrap())
}

/// Certificates living 12 s are renewed every ~6 s; across three renewals the server sidecar
/// presents a new certificate each time, without a restart and without a failed request.
#[tokio::test]
async fn rotation_changes_the_presented_certificate_without_a_failed_request() {
    let mut m = Mesh::start("strict", 12).await;
    let (chain, key) = agent_certificate(&m.caller_agent.socket).await;
    let traffic = m.traffic(RPS);
    let want_san = format!("URI(spiffe://cluster.local/ns/{}/sa/echo)", m.ns);
    let mut serials: Vec<String> = vec![];
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while serials.len() < 4 {
        let (serial, san) = presented_certificate(m.inbound, &chain, &key).await;
        assert_eq!(san, want_san);
        if serials.last() != Some(&serial) {
            assert!(!serials.contains(&serial), "an old certificate came back");
            eprintln!("presented serial {serial} after {:?}", started.elapsed());
            serials.push(serial);
        }
        assert!(
            Instant::now() < deadline,
            "only {} certificates presented in 60 s: {serials:?}",
            serials.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, failed) = traffic.stop().await;
    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());
    assert!(ok >= 100, "only {ok} requests");
    assert!(
        m.server.child.try_wait().unwrap().is_none(),
        "the server sidecar restarted"
    );
}

/// The operator's switch: `kubectl label service echo polarismesh.cn/tls-mode=strict` on the real
/// kube-apiserver reaches the control plane through its controller, and the service's real Envoy
/// sidecar turns its inbound listener to mTLS only; removing the label turns it back.
#[tokio::test]
async fn a_kubernetes_service_label_switches_the_sidecars_inbound_listener_to_mtls() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let kube = TestKube::from_env();
    let client = kube.client().await;
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("k8s-tls-{}", free_port());
    kube.service_account(&client, &ns, "echo").await;
    let token = kube
        .token(&client, &ns, "echo", &["polaris-ca"], 3600)
        .await;
    let token_file = dir.path().join("echo.token");
    std::fs::write(&token_file, token).unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80}]}}))
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let cp = CaServer::start(
        dir.path(),
        &kube,
        &["--xds-auth", "on", "--kubernetes", "--cluster-name", "kt"],
    )
    .await;
    let agent = Agent::start(dir.path(), &cp, &token_file, &[]).await;
    let c = reqwest::Client::new();
    let synced = cp
        .server
        .url(&format!("/naming/v1/services?namespace={ns}&name=echo"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&c, &synced).await.1["amount"] != 1 {
        assert!(Instant::now() < deadline, "the Service was never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = HeaderApp::start().await;
    let inbound = free_port();
    let server = echo_sidecar(dir.path(), &cp, &ns, inbound, app.port, &agent).await;
    let direct = || async {
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        send(c.get(format!("http://127.0.0.1:{inbound}/"))).await
    };
    // The inbound listener's TLS, as Envoy holds it.
    let requires_client_cert = || async {
        let dump = reqwest::get(format!(
            "{}/config_dump?resource=dynamic_listeners",
            server.admin
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        dump.contains("\"require_client_certificate\": true")
    };
    let eventually = |what: &'static str, want_plaintext: bool| {
        let (direct, requires) = (&direct, &requires_client_cert);
        let log = server.log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let r = direct().await;
                let plaintext = r.as_ref().is_ok_and(|(st, _)| *st == 200);
                if plaintext == want_plaintext && requires().await != want_plaintext {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "never {what}: last {r:?}; sidecar log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eventually("plaintext without a label (none)", true).await;
    let label = |mode: Option<&str>| {
        let svcs = svcs.clone();
        let mode = mode.map(str::to_string);
        async move {
            svcs.patch(
                "echo",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"polarismesh.cn/tls-mode": mode}}})),
            )
            .await
            .unwrap();
        }
    };
    label(Some("strict")).await;
    eventually("mTLS only after the strict label", false).await;
    label(None).await;
    eventually("plaintext again once the label is gone", true).await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete(&ns, &Default::default())
        .await
        .unwrap();
}
