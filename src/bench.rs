//! `polaris bench`: load generators that print their figures.
//!
//! `bench registry` drives the client API, over loopback HTTP/1.1 keep-alive connections (REST) or
//! gRPC (`v1.PolarisGRPC`, one connection per client as each SDK has its own), with concurrent
//! clients: durable registrations, then heartbeats. By default it starts a server in this process
//! on a fresh data directory, so client and server share the machine's cores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod ca;
mod controller;
mod grpc;
pub mod kube_fake;
mod rls;
mod webhook;
mod xds;
mod xds_clients;

use crate::config::ServerConfig;
use crate::model::instance_id;

/// `polaris bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Registrations/s and heartbeats/s over loopback HTTP.
    Registry(RegistryArgs),
    /// xDS push latency, server memory per client, bytes per change, snapshot build time.
    Xds(xds::XdsArgs),
    /// CA signs/s and latency, with TokenReview by a Kubernetes API server and from the cache.
    Ca(ca::CaArgs),
    /// Global rate-limit decisions/s and latency over loopback gRPC.
    Rls(rls::RlsArgs),
    /// The Kubernetes controller: cold sync, readiness changes, a restart that writes nothing.
    Controller(controller::ControllerArgs),
    /// The sidecar injector's webhook: pod admissions/s and latency over HTTPS.
    Webhook(webhook::WebhookArgs),
    /// The client side of `bench xds` (started by it).
    #[command(hide = true)]
    XdsClients(xds_clients::ClientArgs),
}

/// How `bench registry` reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// REST over HTTP/1.1.
    Http,
    /// PolarisMesh's gRPC client API.
    Grpc,
}

#[derive(Debug, Args)]
struct RegistryArgs {
    /// How the clients reach the server.
    #[arg(long, value_enum, default_value = "http")]
    transport: Transport,
    /// With `--target`: the server's gRPC client API (`host:port`).
    #[arg(long)]
    grpc_target: Option<String>,
    /// gRPC connections the clients share [default: one per client, as each SDK has its own].
    #[arg(long)]
    connections: Option<usize>,
    /// Concurrent clients (each its own connection with gRPC unless --connections).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Instances to register (one request each).
    #[arg(long, default_value_t = 20_000)]
    registrations: usize,
    /// Heartbeats to send.
    #[arg(long, default_value_t = 100_000)]
    heartbeats: usize,
    /// Services the instances are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Benchmark an already running server at this base URL instead of starting one.
    #[arg(long)]
    target: Option<String>,
    /// Send this token (`X-Polaris-Token`) to the target.
    #[arg(long)]
    token: Option<String>,
    /// Run twice with the in-process server, authentication off then on (a write token), twice
    /// over, and print every run: what authentication costs.
    #[arg(long, conflicts_with = "target")]
    compare_auth: bool,
}

/// CPU time this process has used (user + system), in milliseconds.
pub(crate) fn cpu_ms() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces): utime is the 12th, stime the 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ticks as f64 * 10.0
}

/// A registry on a fresh store in the temporary directory `polaris-bench-<what>-<pid>`, and that
/// directory (for the caller to remove).
pub(crate) async fn temp_registry(
    what: &str,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<(crate::registry::Registry, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("polaris-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reg = crate::registry::Registry::open(
        Arc::new(crate::store::RedbStore::open(&dir)?),
        crate::registry::Config::default(),
        metrics,
    )
    .await?;
    Ok((reg, dir))
}

/// Runs the chosen benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Registry(a) => registry(a).await,
        What::Xds(a) => xds::run(a).await,
        What::Ca(a) => ca::run(a).await,
        What::Rls(a) => rls::run(a).await,
        What::Controller(a) => controller::run(a).await,
        What::Webhook(a) => webhook::run(a).await,
        What::XdsClients(a) => xds_clients::clients(a).await,
    }
}

/// Latency summary of one phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Phase name.
    pub name: &'static str,
    /// Requests completed.
    pub requests: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Phase {
    /// The phase of `tasks`, each answering its requests' latencies (µs), started at `started`.
    async fn gather(
        name: &'static str,
        started: Instant,
        total: usize,
        tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u32>>>>,
    ) -> anyhow::Result<Phase> {
        let mut all = Vec::with_capacity(total);
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = started.elapsed();
        all.sort_unstable();
        Ok(Phase {
            name,
            requests: all.len(),
            elapsed,
            latencies_us: all,
        })
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn row(&self) -> String {
        format!(
            "| {:<13} | {:>8} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} |",
            self.name,
            self.requests,
            self.rate(),
            self.pct(0.5),
            self.pct(0.99),
            self.pct(1.0)
        )
    }
}

async fn registry(a: RegistryArgs) -> anyhow::Result<()> {
    println!(
        "registry benchmark: {} clients, {} registrations (durable, heartbeat TTL 60 s) over {} services, {} heartbeats, loopback {}{}",
        a.clients,
        a.registrations,
        a.services.max(1),
        a.heartbeats,
        match a.transport {
            Transport::Http => "HTTP/1.1",
            Transport::Grpc => "gRPC (v1.PolarisGRPC)",
        },
        if a.target.is_some() { "" } else { ", server in the same process" }
    );
    println!("| phase         | requests |    req/s  | p50 ms   | p99 ms   | max ms   |");
    println!("|---------------|----------|-----------|----------|----------|----------|");
    let runs: &[bool] = if a.compare_auth {
        &[false, true, false, true]
    } else {
        &[false]
    };
    for &auth in runs {
        let (reg, hb, commits) = registry_once(&a, auth).await?;
        if let Some(c) = commits {
            println!(
                "  {} registrations took {c} store commits (each one durable write, fsync included): {:.0} registrations per commit",
                reg.requests,
                reg.requests as f64 / c.max(1) as f64
            );
        }
        for mut p in [reg, hb] {
            if a.compare_auth {
                p.name = match (p.name, auth) {
                    ("register", true) => "register auth",
                    ("heartbeat", true) => "heartbeat auth",
                    (n, _) => n,
                };
            }
            println!("{}", p.row());
        }
    }
    Ok(())
}

/// One run; `auth`: the in-process server authenticates, and the clients send a write token.
async fn registry_once(
    a: &RegistryArgs,
    auth: bool,
) -> anyhow::Result<(Phase, Phase, Option<u64>)> {
    const ADMIN: &str = "bench-admin-secret-0123456789";
    let (base, grpc, server, dir) = match &a.target {
        Some(t) => (
            t.trim_end_matches('/').to_string(),
            a.grpc_target.clone(),
            None,
            None,
        ),
        None => {
            let dir = tempfile_dir()?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cfg = ServerConfig {
                data_dir: dir.clone(),
                http_addr: "127.0.0.1:0".parse()?,
                log_level: "warn".into(),
                auth: if auth {
                    crate::config::AuthMode::On
                } else {
                    crate::config::AuthMode::Off
                },
                admin_token: auth.then(|| ADMIN.to_string()),
                grpc_addr: Some("127.0.0.1:0".parse()?),
                ..Default::default()
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let h = tokio::spawn(crate::server::run(
                cfg,
                async move {
                    let _ = stop_rx.await;
                },
                move |b| {
                    let _ = tx.send((b.http, b.grpc));
                },
            ));
            let (addr, grpc) = rx.await.context("server did not start")?;
            (
                format!("http://{addr}"),
                grpc.map(|g| g.to_string()),
                Some((h, stop_tx)),
                Some(dir),
            )
        }
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(a.clients)
        .build_http();
    // With auth, the clients use a write token of `default`, as an application would.
    let token = match (&a.token, auth) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => Some(write_token(&client, &base, ADMIN).await?),
        (None, false) => None,
    };
    let n = a.registrations;
    let svc = a.services.max(1);
    let inst = move |i: usize| -> (String, String, u16) {
        let host = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        (format!("bench-{}", i % svc), host, 8080)
    };
    let commits_before = store_commits(&client, &base).await;
    if a.transport == Transport::Grpc {
        let conns = a.connections.unwrap_or(a.clients);
        let target = grpc.context("give --grpc-target with --target and --transport grpc")?;
        let reg = grpc::drive(
            &target,
            grpc::Call::Register,
            a.clients,
            conns,
            n,
            token.clone(),
            inst,
        )
        .await?;
        let commits = store_commits(&client, &base).await;
        let hb = grpc::drive(
            &target,
            grpc::Call::Heartbeat,
            a.clients,
            conns,
            a.heartbeats,
            token,
            move |i| inst(i % n.max(1)),
        )
        .await?;
        stop_server(server, dir).await?;
        return Ok((reg, hb, commits.zip(commits_before).map(|(a, b)| a - b)));
    }
    let reg_url: hyper::Uri = format!("{base}/v1/RegisterInstance").parse()?;
    let reg = drive("register", a.clients, n, client.clone(), reg_url, token.clone(), move |i| {
        let (s, h, p) = inst(i);
        format!(
            r#"{{"namespace":"default","service":"{s}","host":"{h}","port":{p},"enableHealthCheck":true,"healthCheck":{{"type":"HEARTBEAT","heartbeat":{{"ttl":60}}}}}}"#
        )
    })
    .await?;
    let commits = store_commits(&client, &base).await;
    let hb_url: hyper::Uri = format!("{base}/v1/Heartbeat").parse()?;
    let hb = drive(
        "heartbeat",
        a.clients,
        a.heartbeats,
        client.clone(),
        hb_url,
        token,
        move |i| {
            let (s, h, p) = inst(i % n.max(1));
            format!(r#"{{"id":"{}"}}"#, instance_id("default", &s, &h, p))
        },
    )
    .await?;
    stop_server(server, dir).await?;
    Ok((reg, hb, commits.zip(commits_before).map(|(a, b)| a - b)))
}

type InProcess = (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
);

async fn stop_server(
    server: Option<InProcess>,
    dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    if let Some((h, stop)) = server {
        let _ = stop.send(());
        h.await??;
    }
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

/// The server's store commits so far (`polaris_store_commit_seconds_count`), if `/metrics` says.
async fn store_commits(client: &HttpClient, base: &str) -> Option<u64> {
    let resp = client
        .get(format!("{base}/metrics").parse().ok()?)
        .await
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("polaris_store_commit_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
}

/// Creates a write token of namespace `default` with the admin token; returns its secret.
async fn write_token(client: &HttpClient, base: &str, admin: &str) -> anyhow::Result<String> {
    let req = hyper::Request::post(format!("{base}/core/v1/tokens"))
        .header("content-type", "application/json")
        .header("x-polaris-token", admin)
        .body(Full::new(Bytes::from(
            r#"[{"name":"bench","role":"write","namespaces":["default"]}]"#,
        )))?;
    let resp = client.request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    v["responses"][0]["token"]["secret"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no token created: {v}"))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "polaris-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn drive(
    name: &'static str,
    clients: usize,
    total: usize,
    client: HttpClient,
    url: hyper::Uri,
    token: Option<String>,
    body: impl Fn(usize) -> String + Send + Sync + 'static,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, body, client, url, token) = (
            next.clone(),
            body.clone(),
            client.clone(),
            url.clone(),
            token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let mut req =
                    hyper::Request::post(url.clone()).header("content-type", "application/json");
                if let Some(t) = &token {
                    req = req.header("x-polaris-token", t.as_str());
                }
                let req = req.body(Full::new(Bytes::from(body(i))))?;
                let t = Instant::now();
                let resp = client.request(req).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !status.is_success() {
                    bail!(
                        "{name} request {i} failed: {status} {}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
            anyhow::Ok(lat)
        }));
    }
    Phase::gather(name, started, total, tasks).await
}
