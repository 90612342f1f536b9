//! `polaris bench controller`: the Kubernetes controller syncing a cluster into the registry.
//!
//! A loopback API server (`bench::kube_fake`, list + watch with bookmarks) holds `--services`
//! Services with an EndpointSlice of `--endpoints` ready pods each; the controller and the
//! registry (a fresh redb store, durable writes) run in this process. Measured: the time from the
//! controller's start to a registry holding every instance (cold start), the registry items
//! written and their rate, the time for an endpoint's readiness change to reach the registry, and
//! the items written by a restarted controller that finds nothing changed (must be 0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::kube_fake::FakeApi;
use crate::controller::run::{run as run_controller, Config};
use crate::metrics::Metrics;
use crate::model::ServiceKey;
use crate::registry::Registry;

/// `polaris bench controller` arguments.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Services.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Ready endpoints (pods) per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Readiness changes to time.
    #[arg(long, default_value_t = 20)]
    changes: usize,
}

fn slice(svc: usize, endpoints: usize, not_ready: Option<usize>) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            json!({"addresses": [format!("10.{}.{}.{}", svc / 250, svc % 250, e + 1)],
                   "conditions": {"ready": not_ready != Some(e)},
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("svc-{svc}-{e}")},
                   "nodeName": "node-a", "zone": "z1"})
        })
        .collect();
    json!({"metadata": {"name": format!("svc-{svc}-abcde"), "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": format!("svc-{svc}")}},
           "addressType": "IPv4", "endpoints": eps,
           "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]})
}

fn instances(reg: &Registry) -> usize {
    reg.read()
        .services
        .iter()
        .filter(|(k, _)| k.namespace == "bench")
        .map(|(_, e)| e.instances.len())
        .sum()
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: ControllerArgs) -> anyhow::Result<()> {
    if a.services == 0 || a.endpoints == 0 || a.endpoints > 250 {
        bail!("--services must be at least 1 and --endpoints in 1..=250");
    }
    let api = FakeApi::start().await;
    api.put("namespaces", json!({"metadata": {"name": "bench"}}));
    api.put(
        "nodes",
        json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1"}}}),
    );
    for s in 0..a.services {
        api.put(
            "services",
            json!({"metadata": {"name": format!("svc-{s}"), "namespace": "bench", "labels": {"app": format!("svc-{s}")}},
                   "spec": {"selector": {"app": format!("svc-{s}")}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        );
        for e in 0..a.endpoints {
            api.put(
                "pods",
                json!({"metadata": {"name": format!("svc-{s}-{e}"), "namespace": "bench",
                                    "labels": {"app": format!("svc-{s}"), "version": format!("v{}", e % 2)}},
                       "spec": {"containers": [{"name": "app", "image": "app:1"}]}}),
            );
        }
        api.put("endpointslices", slice(s, a.endpoints, None));
    }
    let metrics = Arc::new(Metrics::default());
    let (reg, dir) = super::temp_registry("controller", metrics.clone()).await?;
    let url: http::Uri = api.url.parse().context("fake API url")?;
    // A controller on the registry, as `polaris server --kubernetes` starts it.
    let start = |stop| -> anyhow::Result<_> {
        let client = kube::Client::try_from(kube::Config::new(url.clone()))?;
        Ok(tokio::spawn(run_controller(
            client,
            Arc::new(crate::controller::target::Local {
                registry: reg.clone(),
                metrics: metrics.clone(),
            }),
            Config::default(),
            metrics.clone(),
            Arc::new(Default::default()),
            stop,
        )))
    };
    let total = a.services * a.endpoints;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let ctl = start(stop_rx)?;
    while instances(&reg) < total {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {total} instances after 10 minutes",
                instances(&reg)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cold = t0.elapsed();
    let writes = metrics.controller_writes.get();
    // Readiness changes: one endpoint of a service turns not ready (then ready again).
    let mut lat = Vec::new();
    for k in 0..a.changes {
        let s = (k * 7919) % a.services;
        let e = k % a.endpoints;
        let not_ready = k % 2 == 0;
        let key = ServiceKey::new("bench", format!("svc-{s}"));
        let host = format!("10.{}.{}.{}", s / 250, s % 250, e + 1);
        let t = Instant::now();
        api.put(
            "endpointslices",
            slice(s, a.endpoints, not_ready.then_some(e)),
        );
        loop {
            let done = reg.read().services.get(&key).is_some_and(|en| {
                en.instances
                    .values()
                    .any(|i| i.host == host && i.isolate == not_ready)
            });
            if done {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("a readiness change did not reach the registry in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if !not_ready {
            continue;
        }
        // Back to ready before the next one.
        api.put("endpointslices", slice(s, a.endpoints, None));
        while reg
            .read()
            .services
            .get(&key)
            .is_some_and(|en| en.instances.values().any(|i| i.isolate))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let _ = stop_tx.send(true);
    ctl.await??;
    // A restart that finds nothing changed.
    let before = metrics.controller_writes.get();
    let passes = metrics.controller_passes.get();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t1 = Instant::now();
    let ctl = start(stop_rx)?;
    while metrics.controller_passes.get() == passes {
        if t1.elapsed() > Duration::from_secs(120) {
            bail!("the restarted controller made no pass");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restart = t1.elapsed();
    let restart_writes = metrics.controller_writes.get() - before;
    let _ = stop_tx.send(true);
    ctl.await??;
    println!(
        "controller benchmark: {} Services x {} ready endpoints = {total} instances, loopback list+watch API, durable registry in this process",
        a.services, a.endpoints
    );
    println!("| cold start to every instance s | items written | items/s | readiness change p50 ms | p99 ms | restart: first pass s | restart: items written |");
    println!("|-------------------------------|---------------|---------|-------------------------|--------|-----------------------|------------------------|");
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "| {:>29.2} | {:>13} | {:>7.0} | {:>23.1} | {:>6.1} | {:>21.2} | {:>22} |",
        cold.as_secs_f64(),
        writes,
        writes as f64 / cold.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        restart.as_secs_f64(),
        restart_writes
    );
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
