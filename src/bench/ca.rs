//! `polaris bench ca`: certificate signs per second and their latency, end to end over HTTPS, with
//! the token reviewed by a real Kubernetes API server on every request and then from the review
//! cache.
//!
//! The CA runs in this process (development root in a temporary directory) on loopback; clients
//! post CSRs prepared beforehand (key generation is the agent's cost, not the CA's) over
//! keep-alive connections. The ServiceAccount's token is minted with TokenRequest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::agent::{csr, generate_key, KeyType};
use crate::ca::sign::Identity;
use crate::ca::{self, material::Source};
use crate::metrics::Metrics;
use crate::net::{Acceptor, Limits};

/// `polaris bench ca` arguments.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Kubeconfig of the API server that reviews tokens (it must allow TokenRequest and
    /// TokenReview) [default: in-cluster, then `$KUBECONFIG` / `~/.kube/config`].
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Namespace of the benchmark's ServiceAccount (created if missing).
    #[arg(long, default_value = "polaris-bench")]
    namespace: String,
    /// The ServiceAccount (created if missing).
    #[arg(long, default_value = "bench")]
    service_account: String,
    /// Signs per run.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Key type of the CSRs.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    key_type: KeyType,
}

const TRUST_DOMAIN: &str = "cluster.local";
const AUDIENCE: &str = "polaris-ca";

/// Runs the benchmark and prints one table row per review mode.
pub async fn run(a: CaArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    let kube = crate::server::kube_client(a.kubeconfig.as_deref()).await?;
    let token = mint_token(&kube, &a.namespace, &a.service_account).await?;
    let identity = Identity {
        namespace: a.namespace.clone(),
        service_account: a.service_account.clone(),
    };
    let csrs: Vec<String> = (0..64)
        .map(|_| {
            let key = generate_key(a.key_type)?;
            csr(&key, &identity, TRUST_DOMAIN)
        })
        .collect::<Result<_, _>>()?;
    let dir = std::env::temp_dir().join(format!("polaris-bench-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "CA: development root (ECDSA P-256), {:?} CSRs, {} requests, {} concurrent clients, HTTPS on loopback",
        a.key_type, a.requests, a.concurrency
    );
    println!("| token review | signs/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (label, cache) in [
        ("apiserver every request", Duration::ZERO),
        ("cached", Duration::from_secs(300)),
    ] {
        let cfg = ca::Config {
            addr: "127.0.0.1:0".parse().expect("literal"),
            trust_domain: TRUST_DOMAIN.into(),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86_400),
            audiences: vec![AUDIENCE.into()],
            signs_per_minute: 0,
            review_cache: cache,
            review_timeout: Duration::from_secs(5),
            source: Source::Dev(dir.clone()),
            dns_names: vec![],
        };
        let r = run_once(cfg, kube.clone(), &token, &csrs, &a).await?;
        println!(
            "| {label} | {:.0} | {:.2} | {:.2} | {:.2} |",
            r.per_sec, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    // The CA's own work per certificate, without HTTP or review: CSR parsed and its signature
    // verified, certificate signed.
    let (issuer, _) = ca::material::load(&Source::Dev(dir.clone()), None).await?;
    let n = 1000;
    let t = Instant::now();
    for i in 0..n {
        let parsed = ca::sign::parse_csr(&csrs[i % csrs.len()])?;
        ca::sign::sign(
            parsed,
            &issuer,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )?;
    }
    println!(
        "CSR check + sign alone (one core): {:.1} µs per certificate",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Figures {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn mint_token(kube: &kube::Client, ns: &str, sa: &str) -> anyhow::Result<String> {
    let nss: Api<Namespace> = Api::all(kube.clone());
    if nss.get_opt(ns).await?.is_none() {
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.into());
        nss.create(&PostParams::default(), &n).await?;
    }
    let sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), ns);
    if sas.get_opt(sa).await?.is_none() {
        let mut s = ServiceAccount::default();
        s.metadata.name = Some(sa.into());
        sas.create(&PostParams::default(), &s).await?;
    }
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![AUDIENCE.into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = sas
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .context("TokenRequest")?;
    Ok(out.status.context("TokenRequest: no status")?.token)
}

async fn run_once(
    cfg: ca::Config,
    kube: kube::Client,
    token: &str,
    csrs: &[String],
    a: &CaArgs,
) -> anyhow::Result<Figures> {
    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let port = listener.local_addr()?.port();
    let metrics = Arc::new(Metrics::default());
    let ca = ca::start(cfg, kube, metrics.clone()).await?;
    let acceptor = Acceptor::new(
        listener,
        Limits {
            max_connections: 1024,
            first_request_timeout: Duration::from_secs(10),
        },
        metrics.ca_conns.clone(),
        "ca",
    )
    .with_tls(ca.tls_config()?);
    let root = reqwest::Certificate::from_pem(ca.root_pem().as_bytes())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::api::serve(acceptor, ca.router(), stop_rx));
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .tls_built_in_root_certs(false)
        .build()?;
    let url = format!("https://127.0.0.1:{port}/security/v1/sign_certificate");
    let bodies: Arc<Vec<String>> = Arc::new(
        csrs.iter()
            .map(|c| serde_json::json!({ "csr": c, "ttl": 3600 }).to_string())
            .collect(),
    );
    // One request per client first: connections and TLS sessions are set up before timing.
    let post = |i: usize| {
        client
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(bodies[i % bodies.len()].clone())
            .send()
    };
    for i in 0..a.concurrency {
        let r = post(i).await?;
        if !r.status().is_success() {
            bail!("the CA refused: {} {}", r.status(), r.text().await?);
        }
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (client, url, next, bodies, token) = (
            client.clone(),
            url.clone(),
            next.clone(),
            bodies.clone(),
            token.to_string(),
        );
        let total = a.requests;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await?;
                let ok = r.status().is_success();
                let body = r.bytes().await?;
                if !ok {
                    bail!("the CA refused: {}", String::from_utf8_lossy(&body));
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }));
    }
    let mut lat = Vec::with_capacity(a.requests);
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    let _ = server.await;
    lat.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    Ok(Figures {
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: *lat.last().unwrap_or(&0.0),
    })
}
