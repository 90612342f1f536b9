//! Traffic through a real Envoy, and the server's view of its nodes, for the Envoy end-to-end tests.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{get, post, Envoy, Server};

pub async fn register(
    c: &reqwest::Client,
    s: &Server,
    svc: &str,
    port: u16,
    extra: serde_json::Value,
) {
    let mut i = json!({"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port});
    if let (Some(o), Some(e)) = (i.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let (st, body) = post(c, &s.url("/naming/v1/instances"), json!([i])).await;
    assert_eq!(st, 200, "{body}");
}

/// Names of the backends answering `n` requests for `host`.
pub async fn answering(e: &Envoy, c: &reqwest::Client, host: &str, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (st, body) = e.get(c, host).await;
        if st == 200 {
            seen.insert(body);
        } else {
            seen.insert(format!("status {st}"));
        }
    }
    seen
}

pub fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Waits until `n` consecutive requests are answered by exactly `want`; returns how long it took.
pub async fn converge(
    e: &Envoy,
    c: &reqwest::Client,
    host: &str,
    want: &[&str],
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = answering(e, c, host, 12).await;
        if got == set(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "after {limit:?}, {host} answered by {got:?}, want {want:?}; log:\n{}",
            std::fs::read_to_string(&e.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/debug/xds/nodes` entry of the node whose id contains `mode`.
pub fn node_of<'a>(nodes: &'a serde_json::Value, mode: &str) -> &'a serde_json::Value {
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"]["id"].as_str().is_some_and(|id| id.contains(mode)))
        .expect("node connected")
}

/// Polls `/debug/xds/nodes` until the node's entry satisfies `ok` (5 s at most); returns the view.
pub async fn wait_node(
    c: &reqwest::Client,
    s: &Server,
    mode: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (_, nodes) = get(c, &s.url("/debug/xds/nodes")).await;
        if ok(node_of(&nodes, mode)) {
            return nodes;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "waited for {what}: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deregisters `default/<svc>`'s instance at `host:port` through `s`.
pub async fn deregister(c: &reqwest::Client, s: &Server, svc: &str, host: &str, port: u16) {
    let (st, body) = post(
        c,
        &s.url("/naming/v1/instances/delete"),
        json!([{"namespace": "default", "service": svc, "host": host, "port": port}]),
    )
    .await;
    assert_eq!(st, 200, "{body}");
}
