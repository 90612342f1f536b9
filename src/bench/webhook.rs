//! `polaris bench webhook`: pod admissions per second through the injector's webhook and their
//! latency, over HTTPS as the API server calls it.
//!
//! The webhook runs in this process on loopback with a fresh certificate; namespace labels come
//! from the loopback list+watch API (`bench::kube_fake`), as they would from the API server.
//! `--concurrency` clients post AdmissionReviews of a typical pod (two containers, ports, labels)
//! over keep-alive connections; every answer must carry a patch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use serde_json::json;

use super::cpu_ms;
use super::kube_fake::FakeApi;
use crate::inject::webhook::{tls_config, Webhook};
use crate::metrics::Metrics;
use crate::net::{Acceptor, Limits};

/// `polaris bench webhook` arguments.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Admissions to time.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: WebhookArgs) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    if a.requests == 0 || a.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    let api = FakeApi::start().await;
    api.put(
        "namespaces",
        json!({"metadata": {"name": "shop", "labels": {"polarismesh.cn/inject": "enabled"}}}),
    );
    let dir = std::env::temp_dir().join(format!("polaris-bench-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse()?)];
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("tls.crt"), cert.pem())?;
    std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
    let tls = tls_config(&dir.join("tls.crt"), &dir.join("tls.key"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let metrics = Arc::new(Metrics::default());
    let kube = kube::Client::try_from(kube::Config::new(api.url.parse().context("fake API url")?))?;
    let webhook = Arc::new(Webhook {
        config: Default::default(),
        kube,
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = Acceptor::new(
        listener,
        Limits {
            max_connections: 1024,
            first_request_timeout: Duration::from_secs(10),
        },
        metrics.webhook_conns.clone(),
        "webhook",
    )
    .with_tls(tls);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::api::serve(acceptor, webhook.router(), stop_rx));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes())?)
        .tls_built_in_root_certs(false)
        .build()?;
    let url = format!("https://127.0.0.1:{port}/inject");
    let review = |i: usize| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "request": {"uid": format!("u-{i}"), "namespace": "shop", "operation": "CREATE",
                           "object": {"metadata": {"generateName": "web-7d9f-", "labels": {"app": "web", "version": "v1", "pod-template-hash": "7d9f"}},
                                      "spec": {"containers": [
                                          {"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}, {"containerPort": 9090}]},
                                          {"name": "log", "image": "log:1"}]}}}})
        .to_string()
    };
    let admit = move |i: usize| {
        let (client, url, body) = (client.clone(), url.clone(), review(i));
        async move {
            let t = Instant::now();
            let v: serde_json::Value = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let patch = v["response"]["patch"].as_str().context("no patch")?;
            base64::engine::general_purpose::STANDARD.decode(patch)?;
            Ok::<_, anyhow::Error>(t.elapsed())
        }
    };
    // Connections and TLS sessions first.
    for i in 0..a.concurrency {
        admit(i).await?;
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu0 = cpu_ms();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (next, admit) = (next.clone(), admit.clone());
        let n = a.requests;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                lat.push(admit(i).await?.as_secs_f64() * 1e3);
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_ms() - cpu0;
    let _ = stop_tx.send(true);
    let _ = server.await;
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "webhook benchmark: {} pod admissions over HTTPS, {} concurrent clients, namespace labels from a loopback API server; clients in this process",
        a.requests, a.concurrency
    );
    println!("| admissions/s | p50 ms | p99 ms | max ms | CPU µs/admission (webhook + clients) |");
    println!("|--------------|--------|--------|--------|--------------------------------------|");
    println!(
        "| {:>12.0} | {:>6.2} | {:>6.2} | {:>6.2} | {:>36.0} |",
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        cpu * 1e3 / lat.len() as f64
    );
    Ok(())
}
