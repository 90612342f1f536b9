//! `polaris bench xds`: push latency, memory per client and bytes per change of the ADS server.
//!
//! The benchmark process runs the server side (registry, snapshot builder, ADS on loopback) and
//! starts a second process (`polaris bench xds-clients`, hidden) that holds C simulated clients,
//! each on its own HTTP/2 connection, behaving like Envoy (wildcard CDS/LDS, EDS for every cluster,
//! RDS, every response ACKed). Keeping the clients in another process makes the server's RSS its own.
//! The two processes talk over the child's stdin/stdout; times are wall-clock (same machine).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::cpu_ms;
use super::xds_clients::RDS_EVENT;
use crate::metrics::Metrics;
use crate::model::rules::ratelimit::RateLimitRule;
use crate::model::rules::routing::RoutingRule;
use crate::model::rules::Rule;
use crate::model::{InstanceInput, Service, TlsMode, TLS_MODE_KEY};
use crate::registry::Command;
use crate::xds::server::{Ads, Nodes};
use crate::xds::snapshot::{self, Builder, Cache};

/// Client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Incremental ADS.
    Delta,
    /// State-of-the-world ADS.
    Sotw,
}

/// `polaris bench xds` arguments.
#[derive(Debug, Args)]
pub struct XdsArgs {
    /// Services.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Simulated clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Protocols to run, one after the other.
    #[arg(long, value_enum, default_values_t = [Mode::Delta, Mode::Sotw])]
    mode: Vec<Mode>,
    /// Single-endpoint changes to measure.
    #[arg(long, default_value_t = 30)]
    changes: usize,
    /// Debounce of the snapshot builder in milliseconds.
    #[arg(long, default_value_t = 5)]
    debounce_ms: u64,
    /// Register each changed endpoint on a port the service already uses (by default each change
    /// brings a new port, as VMs and random ports do).
    #[arg(long)]
    same_port: bool,
    /// Clients reach ADS over mTLS with a client certificate, and streams are authenticated (as
    /// `--xds-auth` does): what authenticated ADS costs the sync and the push.
    #[arg(long)]
    xds_tls: bool,
    /// TLS mode of every service (`polarismesh.cn/tls-mode`): what mTLS costs the push.
    #[arg(long, default_value = "none", value_parser = parse_tls_mode)]
    tls_mode: TlsMode,
    /// Clients are sidecars of this many services (`svc-0`.. in turn), so that they get their
    /// service's inbound listener and routing rules can tell callers apart; 0: clients of no
    /// service.
    #[arg(long, default_value_t = 0)]
    callers: usize,
    /// Every service gets a routing rule (a header match for one caller service to one group, and
    /// a weighted split of every other caller's traffic over two groups) and a local rate-limit
    /// rule; after the endpoint changes, as many routing-rule changes (a weight change) are
    /// measured.
    #[arg(long)]
    rules: bool,
    /// Clients are on-demand sidecars (`openOnDemand`, delta only): their route configuration has
    /// no hosts, and each client subscribes (VHDS) to the host of every service, as a proxy that
    /// has called every service would have.
    #[arg(long)]
    on_demand: bool,
}

fn parse_tls_mode(v: &str) -> Result<TlsMode, String> {
    TlsMode::parse(v).ok_or_else(|| format!("{v:?} is not one of none, permissive, strict"))
}

/// A CA, the server's certificate for 127.0.0.1 and one client certificate for
/// `spiffe://cluster.local/ns/default/sa/bench`, written to `dir` for the client process; returns
/// the server's TLS and authenticator.
fn bench_pki(
    dir: &std::path::Path,
) -> anyhow::Result<(
    Arc<rustls::ServerConfig>,
    Arc<crate::xds::auth::Authenticator>,
)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    let leaf = |sans: Vec<SanType>| -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        Ok((p.signed_by(&key, &ca, &ca_key)?, key))
    };
    let (server, server_key) = leaf(vec![SanType::IpAddress("127.0.0.1".parse()?)])?;
    let (client, client_key) = leaf(vec![SanType::URI(
        "spiffe://cluster.local/ns/default/sa/bench".try_into()?,
    )])?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("client.pem"), client.pem())?;
    std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem())?;
    let tls = crate::xds::auth::tls_config(
        vec![server.der().clone()],
        PrivateKeyDer::try_from(server_key.serialize_der()).map_err(anyhow::Error::msg)?,
        vec![CertificateDer::from(ca.der().to_vec())],
    )?;
    let auth = crate::xds::auth::Authenticator::new(
        crate::xds::auth::Config {
            trust_domain: "cluster.local".into(),
            visibility: Default::default(),
        },
        None,
    );
    Ok((tls, Arc::new(auth)))
}

pub(super) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Live heap bytes (0 when the allocator cannot tell).
fn heap_bytes() -> u64 {
    crate::metrics::heap().map_or(0, |h| h.allocated)
}

pub(super) fn raise_fd_limit() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs each mode in a fresh server process, so that a mode's memory figure does not reuse what
/// the previous mode freed; prints one table.
async fn run_each_mode(a: XdsArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    for (i, mode) in a.mode.iter().enumerate() {
        let out = tokio::process::Command::new(&exe)
            .args(["bench", "xds", "--mode", mode_name(*mode)])
            .args(["--services", &a.services.to_string()])
            .args(["--endpoints", &a.endpoints.to_string()])
            .args(["--clients", &a.clients.to_string()])
            .args(["--changes", &a.changes.to_string()])
            .args(["--debounce-ms", &a.debounce_ms.to_string()])
            .args(a.same_port.then_some("--same-port"))
            .args(a.xds_tls.then_some("--xds-tls"))
            .args(["--tls-mode", a.tls_mode.as_str()])
            .args(["--callers", &a.callers.to_string()])
            .args(a.rules.then_some("--rules"))
            .args(a.on_demand.then_some("--on-demand"))
            .stderr(Stdio::inherit())
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "bench xds --mode {} failed: {}",
                mode_name(*mode),
                out.status
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let row = line.starts_with(&format!("| {}", mode_name(*mode)))
                || line.starts_with(&format!("  {}", mode_name(*mode)));
            if i == 0 || row {
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Delta => "delta",
        Mode::Sotw => "sotw",
    }
}

fn instance(svc: usize, ep: usize) -> InstanceInput {
    InstanceInput {
        namespace: Some("default".into()),
        service: Some(format!("svc-{svc}")),
        host: Some(format!(
            "10.{}.{}.{}",
            (svc >> 8) & 255,
            svc & 255,
            ep % 250 + 1
        )),
        port: Some(8000 + (ep / 250) as i64),
        metadata: Some([("version".to_string(), format!("v{}", ep % 3))].into()),
        ..Default::default()
    }
}

/// The routing rule of service `svc`: requests of caller `svc-<svc % callers>` with header
/// `x-canary: <canary>` go to group v2; everyone else's split `weight`/`100 - weight` over v0 and
/// v1.
fn routing_rule(
    svc: usize,
    callers: usize,
    (weight, canary): (u32, &str),
    now: &str,
) -> anyhow::Result<Rule> {
    let group = |v: &str, w: u32| {
        serde_json::json!({"service": format!("svc-{svc}"), "namespace": "default", "weight": w,
                           "labels": {"version": {"type": "EXACT", "value": v}}})
    };
    let caller = format!("svc-{}", svc % callers.max(1));
    let rule: RoutingRule = serde_json::from_value(serde_json::json!({
        "name": format!("route-{svc}"), "namespace": "default", "enable": true,
        "routingPolicy": "RulePolicy",
        "routingConfig": {"@type": "type.googleapis.com/v1.RuleRoutingConfig", "rules": [
            {"name": "canary", "sources": [{"service": caller, "namespace": "default", "arguments": [
                {"type": "HEADER", "key": "x-canary", "value": {"type": "EXACT", "value": canary}}]}],
             "destinations": [group("v2", 100)]},
            {"name": "split", "sources": [{"service": "*", "namespace": "*"}],
             "destinations": [group("v0", weight), group("v1", 100 - weight)]}]}
    }))?;
    let mut rule = Rule::Routing(rule);
    rule.stamp(&format!("route-{svc}"), now);
    rule.validate()?;
    Ok(rule)
}

/// The local rate-limit rule of service `svc`: 1,000 requests a second on `/api`.
fn limit_rule(svc: usize, now: &str) -> anyhow::Result<Rule> {
    let rule: RateLimitRule = serde_json::from_value(serde_json::json!({
        "name": format!("limit-{svc}"), "namespace": "default", "service": format!("svc-{svc}"),
        "type": "LOCAL", "resource": "QPS", "action": "REJECT",
        "method": {"type": "EXACT", "value": "/api"},
        "amounts": [{"maxAmount": 1000, "validDuration": "1s"}]
    }))?;
    let mut rule = Rule::RateLimit(rule);
    rule.stamp(&format!("limit-{svc}"), now);
    rule.validate()?;
    Ok(rule)
}

/// Sorted latencies' p50, p99 and max.
fn summary(lat: &mut [f64]) -> (f64, f64, f64) {
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    (pct(lat, 0.5), pct(lat, 0.99), pct(lat, 1.0))
}

/// Runs the server side and prints one table row per mode.
pub async fn run(a: XdsArgs) -> anyhow::Result<()> {
    if a.rules && a.callers == 0 {
        bail!("--rules needs --callers (rules name caller services)");
    }
    if a.on_demand && a.mode.iter().any(|m| *m != Mode::Delta) {
        bail!("--on-demand needs --mode delta (VHDS is incremental only)");
    }
    if a.mode.len() > 1 {
        return run_each_mode(a).await;
    }
    raise_fd_limit();
    let metrics = Arc::new(Metrics::default());
    let (reg, dir) = super::temp_registry("xds", metrics.clone()).await?;
    let now = crate::model::now_rfc3339();
    if a.tls_mode != TlsMode::None {
        let services = (0..a.services)
            .map(|s| {
                let mut svc = Service::bare("default", &format!("svc-{s}"), &now);
                svc.metadata
                    .insert(TLS_MODE_KEY.into(), a.tls_mode.as_str().into());
                svc
            })
            .collect();
        reg.submit(Command::CreateServices(services)).await?;
    }
    for s in 0..a.services {
        let batch = (0..a.endpoints)
            .map(|e| instance(s, e).validate(&now))
            .collect::<Result<Vec<_>, _>>()?;
        reg.submit(Command::RegisterInstances(batch)).await?;
    }
    if a.rules {
        let mut rules = Vec::new();
        for s in 0..a.services {
            rules.push(routing_rule(s, a.callers, (90, "1"), &now)?);
            rules.push(limit_rule(s, &now)?);
        }
        for chunk in rules.chunks(200) {
            reg.submit(Command::PutRules {
                rules: chunk.to_vec(),
                create: true,
            })
            .await?;
        }
    }
    // (d) Full translation time, measured on its own builder.
    let mut full = Vec::new();
    for _ in 0..3 {
        let c = Cache::default();
        let mut b = Builder::default();
        let t = Instant::now();
        b.full(&reg, &c);
        full.push(t.elapsed());
    }
    full.sort();
    let cache = Arc::new(Cache::default());
    tokio::spawn(snapshot::run(
        reg.clone(),
        cache.clone(),
        snapshot::Config {
            debounce: Duration::from_millis(a.debounce_ms),
            ..Default::default()
        },
    ));
    while cache.current().generation == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let world_bytes: usize = cache
        .current()
        .namespaces
        .values()
        .map(|v| {
            v.clusters
                .values()
                .chain(v.endpoints.values())
                .chain(v.route.iter())
                .chain(v.caller_routes.values())
                .map(|r| r.value.len())
                .sum::<usize>()
        })
        .sum();
    // What a client must hold to count as synced: every load assignment of its namespace.
    let eds_count: usize = cache
        .current()
        .namespaces
        .values()
        .map(|v| v.endpoints.len())
        .sum();
    let nodes = Arc::new(Nodes::default());
    let listener = crate::net::bind_tcp("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    let tls_dir = dir.join("tls");
    let mut ads = Ads::new(cache.clone(), metrics.clone(), nodes.clone());
    let security = if a.xds_tls {
        Some(bench_pki(&tls_dir)?)
    } else {
        None
    };
    if let Some((_, auth)) = &security {
        ads = ads.with_auth(auth.clone());
    }
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The server's defaults, with room for every simulated client.
    let cfg = crate::config::ServerConfig::default();
    let mut limits = cfg.xds_limits();
    limits.max_connections = limits.max_connections.max(a.clients + 100);
    let mut acceptor =
        crate::net::Acceptor::new(listener, limits, metrics.xds_conns.clone(), "xds");
    if let Some((tls, _)) = &security {
        acceptor = acceptor.with_tls(tls.clone());
    }
    let request_limits = Arc::new(crate::xds::transport::RequestLimits::new(
        cfg.xds_max_request_bytes,
        cfg.xds_decode_budget_bytes,
        limits.first_request_timeout,
        metrics.clone(),
    ));
    tokio::spawn(crate::xds::transport::serve(
        acceptor,
        ads.into_service(request_limits),
        stop_rx,
    ));
    println!(
        "xds benchmark: {} services x {} endpoints = {} instances, {} clients (each its own connection, in a second process), {} single-endpoint changes per mode ({}), debounce {} ms",
        a.services,
        a.endpoints,
        a.services * a.endpoints,
        a.clients,
        a.changes,
        if a.same_port { "each on a port its service already uses" } else { "each on a new port" },
        a.debounce_ms
    );
    println!(
        "full translation (snapshot build): {:.1} ms (median of 3); encoded world: {:.1} MiB",
        full[1].as_secs_f64() * 1e3,
        world_bytes as f64 / (1 << 20) as f64
    );
    println!("Push latency runs from just before the durable registry write to the moment every client holds the change; write ms is the median durable write (fsync included) and build ms the median incremental translation of one change. Memory per client is the server's growth with every client connected, after the initial sync and the changes: live heap, heap at its peak (during the sync), RSS, and RSS 12 s later (jemalloc returns freed pages after about 10 s).");
    println!("| mode  | clients | sync all s | push p50 ms | push p99 ms | push max ms | write ms | build ms | server CPU ms/change | heap KiB/client | peak heap KiB/client | RSS KiB/client | RSS KiB/client 12 s later | bytes/change/client |");
    println!("|-------|---------|------------|-------------|-------------|-------------|----------|----------|----------------------|-----------------|----------------------|----------------|---------------------------|---------------------|");
    let mut next_ep = a.endpoints;
    for mode in &a.mode {
        // Baselines once the allocator has returned what loading the registry freed.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let rss_before = rss_kib();
        let heap_before = heap_bytes();
        let peak = Arc::new(AtomicU64::new(heap_before));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(heap_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(exe)
            .args([
                "bench",
                "xds-clients",
                "--addr",
                &addr.to_string(),
                "--clients",
                &a.clients.to_string(),
            ])
            .args(["--clusters", &eds_count.to_string()])
            .args(["--callers", &a.callers.to_string()])
            .args([
                "--on-demand-hosts",
                &if a.on_demand { a.services } else { 0 }.to_string(),
            ])
            .args(["--mode", mode_name(*mode)])
            .args(a.xds_tls.then_some("--tls-dir"))
            .args(a.xds_tls.then(|| tls_dir.clone()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().context("child stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        let sync_cpu0 = cpu_ms();
        let ready = lines.next_line().await?.context("client process ended")?;
        let sync_cpu_s = (cpu_ms() - sync_cpu0) / 1e3;
        let (sync_s, sync_failures) = ready
            .strip_prefix("READY ")
            .and_then(|r| r.split_once(' '))
            .context("expected READY <s> <failures>")?;
        let (sync_s, sync_failures): (f64, usize) = (sync_s.parse()?, sync_failures.parse()?);
        let mut failures = sync_failures;
        if std::env::var_os("POLARIS_BENCH_RSS_TRACE").is_some() {
            let state: usize = nodes
                .list()
                .iter()
                .map(|n| {
                    n.types
                        .lock()
                        .values()
                        .map(|t| t.state_bytes)
                        .sum::<usize>()
                })
                .sum();
            eprintln!(
                "stream bookkeeping: {} KiB/client",
                state / 1024 / a.clients
            );
        }
        let mut lat: Vec<f64> = Vec::new();
        let mut bytes = 0u64;
        let mut builds: Vec<f64> = Vec::new();
        let mut writes: Vec<f64> = Vec::new();
        let cpu0 = cpu_ms();
        for k in 0..a.changes {
            let svc = (k * 7919) % a.services;
            let cluster = format!("OUTBOUND|default|svc-{svc}");
            stdin
                .write_all(format!("ARM {cluster}\n").as_bytes())
                .await?;
            stdin.flush().await?;
            let armed = lines.next_line().await?.context("client process ended")?;
            if armed != "ARMED" {
                bail!("unexpected {armed}");
            }
            let b0 = metrics.xds_bytes.get();
            let t0 = now_ns();
            let mut inst = instance(svc, next_ep).validate(&now)?;
            if !a.same_port {
                inst.port = 9000 + k as u16;
                inst.id = crate::model::instance_id(
                    &inst.namespace,
                    &inst.service,
                    &inst.host,
                    inst.port,
                );
            }
            next_ep += 1;
            reg.submit(Command::RegisterInstances(vec![inst])).await?;
            writes.push(now_ns().saturating_sub(t0) as f64 / 1e6);
            let done = lines.next_line().await?.context("client process ended")?;
            let (f, times) = parse_done(&done)?;
            failures = f;
            for t in times {
                lat.push(t.saturating_sub(t0) as f64 / 1e6);
            }
            bytes += metrics.xds_bytes.get() - b0;
            builds.push(cache.build_stats().incremental.as_secs_f64() * 1e3);
        }
        let cpu_per_change = (cpu_ms() - cpu0) / a.changes as f64;
        // Routing-rule changes, two kinds: (caller) the caller-specific sub-rule's header value, which
        // only that caller's sidecars see; (shared) one service's split moves by 10 points, which
        // every client's route configuration holds.
        let mut rule_lat: [Vec<f64>; 2] = Default::default();
        let mut rule_builds: [Vec<f64>; 2] = Default::default();
        let mut rule_bytes = [0u64; 2];
        let mut rule_cpu = [0f64; 2];
        let mut affected = [0usize; 2];
        let mut state: HashMap<usize, (u32, &str)> = HashMap::new();
        for k in 0..if a.rules { 2 * a.changes } else { 0 } {
            let kind = k % 2;
            let svc = (k / 2 * 7919 + 13) % a.services;
            let s = state.entry(svc).or_insert((90, "1"));
            let arm = if kind == 0 {
                s.1 = if s.1 == "1" { "2" } else { "1" };
                affected[0] += (0..a.clients)
                    .filter(|c| a.callers > 0 && c % a.callers == svc % a.callers)
                    .count();
                format!("ARM {RDS_EVENT} {}\n", svc % a.callers.max(1))
            } else {
                s.0 = if s.0 == 90 { 80 } else { 90 };
                affected[1] += a.clients;
                format!("ARM {RDS_EVENT}\n")
            };
            let rule = routing_rule(svc, a.callers, *s, &now)?;
            let cpu0 = cpu_ms();
            stdin.write_all(arm.as_bytes()).await?;
            stdin.flush().await?;
            let armed = lines.next_line().await?.context("client process ended")?;
            if armed != "ARMED" {
                bail!("unexpected {armed}");
            }
            let b0 = metrics.xds_bytes.get();
            let t0 = now_ns();
            reg.submit(Command::PutRules {
                rules: vec![rule],
                create: false,
            })
            .await?;
            let done = lines.next_line().await?.context("client process ended")?;
            let (f, times) = parse_done(&done)?;
            failures = f;
            for t in times {
                rule_lat[kind].push(t.saturating_sub(t0) as f64 / 1e6);
            }
            // Other clients' pushes of the same change (none expected) would count here too.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rule_bytes[kind] += metrics.xds_bytes.get() - b0;
            rule_builds[kind].push(cache.build_stats().incremental.as_secs_f64() * 1e3);
            rule_cpu[kind] += cpu_ms() - cpu0;
        }
        // Server memory with every client connected, after the initial sync and the changes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = rss_kib();
        let heap_after = heap_bytes();
        // What stays once the allocator has returned the burst's freed pages.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let rss_idle = rss_kib();
        sampler.abort();
        let per_client = |after: u64, before: u64| {
            after.saturating_sub(before) as f64 / 1024.0 / a.clients as f64
        };
        if std::env::var_os("POLARIS_BENCH_HOLD").is_some() {
            // For heap profilers: stop here, every client connected, until killed.
            eprintln!("HOLD");
            std::future::pending::<()>().await;
        }
        drop(stdin);
        let _ = child.wait().await;
        lat.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
        println!(
            "| {:<5} | {:>7} | {:>10.2} | {:>11.2} | {:>11.2} | {:>11.2} | {:>8.2} | {:>8.2} | {:>20.1} | {:>15.1} | {:>20.1} | {:>14.1} | {:>25.1} | {:>19.0} |",
            mode_name(*mode),
            a.clients,
            sync_s,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
            {
                writes.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
                pct(&writes, 0.5)
            },
            {
                builds.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
                pct(&builds, 0.5)
            },
            cpu_per_change,
            per_client(heap_after, heap_before),
            per_client(peak.load(Ordering::Relaxed), heap_before),
            per_client(rss_after, rss_before) * 1024.0,
            per_client(rss_idle, rss_before) * 1024.0,
            bytes as f64 / (a.changes * a.clients) as f64
        );
        for (kind, what) in ["caller", "shared"].iter().enumerate().filter(|_| a.rules) {
            let (p50, p99, max) = summary(&mut rule_lat[kind]);
            let (build, _, _) = summary(&mut rule_builds[kind]);
            println!(
                "  {} routing-rule change, {} ({} affected clients per change): push p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; build {:.2} ms; server CPU {:.1} ms/change (50 ms of quiet included); {:.0} bytes/affected client",
                mode_name(*mode),
                what,
                affected[kind] / a.changes.max(1),
                p50,
                p99,
                max,
                build,
                rule_cpu[kind] / a.changes.max(1) as f64,
                rule_bytes[kind] as f64 / affected[kind].max(1) as f64
            );
        }
        println!(
            "  {} initial sync of {} clients{}: {:.2} s, {:.2} s of server CPU; streams failed and reconnected: {} during the sync, {} after it (server: {} connections closed as silent, {} refused, {} request errors)",
            mode_name(*mode),
            a.clients,
            if a.xds_tls {
                " over mTLS, authenticated"
            } else {
                ""
            },
            sync_s,
            sync_cpu_s,
            sync_failures,
            failures - sync_failures,
            metrics.xds_conns.silent.get(),
            metrics.xds_conns.refused.get(),
            metrics.xds_request_errors_total()
        );
        // Wait for the streams to close before the next mode.
        let t = Instant::now();
        while !nodes.is_empty() && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `DONE <failures so far> <time>...` from the client process.
fn parse_done(line: &str) -> anyhow::Result<(usize, Vec<u128>)> {
    let mut it = line
        .strip_prefix("DONE ")
        .context("expected DONE")?
        .split_whitespace();
    let failures = it.next().context("DONE without failures")?.parse()?;
    let times = it.map(str::parse).collect::<Result<Vec<u128>, _>>()?;
    Ok((failures, times))
}
