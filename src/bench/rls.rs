//! `polaris bench rls`: decisions per second of the global rate-limit service and their latency,
//! over loopback gRPC as sidecars ask it.
//!
//! The service runs in this process on a fresh registry holding `--rules` global rules; the
//! clients, in this process too (they share the machine's cores with the service, as on one
//! host), keep `--streams` calls in flight over `--connections` HTTP/2 connections (Envoy opens
//! one per worker thread). Each call carries one descriptor, `rule = <id>#0` and a request value
//! (`header:x-user`), spread over `--values` values per rule, so the service keeps a bucket per
//! rule and value as it does for a rule that limits each user.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

use super::cpu_ms;
use crate::metrics::Metrics;
use crate::model::rules::ratelimit::RateLimitRule;
use crate::model::rules::Rule;
use crate::registry::Command;

/// `polaris bench rls` arguments.
#[derive(Debug, Args)]
pub struct RlsArgs {
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds measured (after one second of warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Global rules, one service each.
    #[arg(long, default_value_t = 100)]
    rules: usize,
    /// Distinct request values per rule (each a bucket of its own, up to the service's cap).
    #[arg(long, default_value_t = 1000)]
    values: usize,
    /// Requests a second each rule allows per value.
    #[arg(long, default_value_t = 50)]
    amount: u32,
}

fn rule(k: usize, amount: u32, now: &str) -> anyhow::Result<Rule> {
    let r: RateLimitRule = serde_json::from_value(serde_json::json!({
        "name": format!("global-{k}"), "namespace": "default", "service": format!("svc-{k}"),
        "type": "GLOBAL", "resource": "QPS", "action": "REJECT",
        "amounts": [{"maxAmount": amount, "validDuration": "1s"}]
    }))?;
    let mut r = Rule::RateLimit(r);
    r.stamp(&format!("global-{k}"), now);
    r.validate()?;
    Ok(r)
}

fn request(rule: usize, value: usize) -> RateLimitRequest {
    RateLimitRequest {
        domain: format!("svc-{rule}.default"),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "rule".into(),
                    value: format!("global-{rule}#0"),
                },
                Entry {
                    key: "header:x-user".into(),
                    value: format!("user-{value}"),
                },
            ],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

/// One stream's tally: latencies (µs) of measured calls, and how many were over the limit.
#[derive(Default)]
struct Tally {
    lat_us: Vec<u32>,
    over: usize,
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: RlsArgs) -> anyhow::Result<()> {
    if a.streams == 0 || a.connections == 0 || a.rules == 0 || a.values == 0 {
        bail!("--streams, --connections, --rules and --values must be at least 1");
    }
    let metrics = Arc::new(Metrics::default());
    let (reg, dir) = super::temp_registry("rls", metrics.clone()).await?;
    let now = crate::model::now_rfc3339();
    let rules = (0..a.rules)
        .map(|k| rule(k, a.amount, &now))
        .collect::<anyhow::Result<Vec<_>>>()?;
    reg.submit(Command::PutRules {
        rules,
        create: true,
    })
    .await?;
    let max_values = crate::config::ServerConfig::default().rls_max_values;
    let rls = crate::rls::Rls::new(reg.clone(), metrics, max_values);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::rls::serve(rls.clone(), listener, stop_rx));

    let mut channels = Vec::new();
    for _ in 0..a.connections {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(ch);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..a.streams {
        let mut client = RateLimitServiceClient::new(channels[s % channels.len()].clone());
        let (measuring, done) = (measuring.clone(), done.clone());
        let (rules, values) = (a.rules, a.values);
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            // Each stream walks its own sequence of (rule, value) pairs.
            let mut n = s.wrapping_mul(7919);
            while !done.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                let req = request(n % rules, (n / rules) % values);
                let t0 = Instant::now();
                let resp = client.should_rate_limit(req).await?.into_inner();
                if measuring.load(Ordering::Relaxed) {
                    t.lat_us.push(t0.elapsed().as_micros() as u32);
                    if resp.overall_code == Code::OverLimit as i32 {
                        t.over += 1;
                    }
                }
            }
            Ok::<_, tonic::Status>(t)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_ms();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_ms() - cpu0;
    done.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    let mut over = 0;
    for t in tasks {
        let t = t.await??;
        lat.extend(t.lat_us);
        over += t.over;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(f64::NAN, |v| f64::from(*v) / 1e3)
    };
    println!(
        "rls benchmark: {} global rules x {} request values, {} calls in flight over {} HTTP/2 connections, {} s measured; service and clients in one process on loopback",
        a.rules, a.values, a.streams, a.connections, a.seconds
    );
    println!("| decisions/s | p50 ms | p99 ms | max ms | over limit | buckets | CPU µs/decision (service + clients) |");
    println!("|-------------|--------|--------|--------|------------|---------|-------------------------------------|");
    println!(
        "| {:>11.0} | {:>6.2} | {:>6.2} | {:>6.2} | {:>9.1}% | {:>7} | {:>35.1} |",
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        100.0 * over as f64 / lat.len().max(1) as f64,
        rls.buckets(),
        cpu * 1e3 / lat.len().max(1) as f64
    );
    Ok(())
}
