//! Proxyless gRPC: a Python grpcio client with an `xds:///` target, served by our ADS server,
//! reaches gRPC backends registered in the registry and follows endpoint changes.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{post, python_path, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

fn script(name: &str) -> String {
    format!("{}/tests/proxyless/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn backend(port: u16) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(python_path())
        .arg(script("backend.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python backend");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.as_deref(), Some("ready"));
    child
}

/// A running `client.py`: one line per call.
struct Client {
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    _child: tokio::process::Child,
}

impl Client {
    fn start(s: &Server, target: &str, seconds: u32, metadata: &[&str]) -> Client {
        let bootstrap = json!({
            "xds_servers": [{"server_uri": format!("127.0.0.1:{}", s.xds_port), "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
            "node": {"id": "proxyless~default/grpc-client~127.0.0.1", "metadata": {}},
        });
        let mut child = tokio::process::Command::new(python_path())
            .arg(script("client.py"))
            .args([target, &seconds.to_string()])
            .args(metadata)
            .env("GRPC_XDS_BOOTSTRAP_CONFIG", bootstrap.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python client");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Client {
            lines,
            _child: child,
        }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("client silent")
            .unwrap()
            .expect("client ended")
    }

    /// The answering ports of the next `n` successful calls, once calls succeed at all.
    async fn tally(&mut self, n: usize) -> BTreeMap<String, usize> {
        let mut got = BTreeMap::new();
        let start = Instant::now();
        let mut ok = 0;
        while ok < n {
            let l = self.next().await;
            if l.starts_with("error") {
                assert!(ok == 0 && start.elapsed() < Duration::from_secs(10), "{l}");
                continue;
            }
            ok += 1;
            *got.entry(l).or_default() += 1;
        }
        got
    }
}

#[tokio::test]
async fn grpc_xds_client_follows_endpoint_changes() {
    scenario("echo-grpc.default").await;
}

/// The route configuration names no instance port; a target with one (the API listener is named
/// after it, port included) still finds the service's virtual host (`echo-grpc.default:*`).
#[tokio::test]
async fn grpc_xds_client_with_a_port_in_its_target() {
    scenario("echo-grpc.default:50051").await;
}

async fn scenario(target: &str) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let (p1, p2) = (common::free_port(), common::free_port());
    let _b1 = backend(p1).await;
    let _b2 = backend(p2).await;
    let (st, _) = post(
        &c,
        &s.url("/naming/v1/services"),
        json!([{"namespace": "default", "name": "echo-grpc", "protocol": "grpc"}]),
    )
    .await;
    assert_eq!(st, 200);
    for p in [p1, p2] {
        let (st, b) = post(&c, &s.url("/naming/v1/instances"), json!([{"namespace": "default", "service": "echo-grpc", "host": "127.0.0.1", "port": p, "protocol": "grpc"}])).await;
        assert_eq!(st, 200, "{b}");
    }
    let mut client = Client::start(&s, target, 30, &[]);
    macro_rules! next {
        () => {
            client.next().await
        };
    }
    // Round robin over both backends.
    let mut seen = HashSet::new();
    let start = Instant::now();
    while seen.len() < 2 {
        let l = next!();
        assert!(
            !l.starts_with("error") || start.elapsed() < Duration::from_secs(10),
            "{l}"
        );
        if !l.starts_with("error") {
            seen.insert(l);
        }
        assert!(start.elapsed() < Duration::from_secs(15), "only {seen:?}");
    }
    assert_eq!(seen, [p1.to_string(), p2.to_string()].into_iter().collect());
    // Deregister one: the client follows.
    let (st, _) = post(
        &c,
        &s.url("/naming/v1/instances/delete"),
        json!([{"namespace": "default", "service": "echo-grpc", "host": "127.0.0.1", "port": p1}]),
    )
    .await;
    assert_eq!(st, 200);
    let start = Instant::now();
    let mut streak = 0;
    while streak < 20 {
        let l = next!();
        if l == p2.to_string() {
            streak += 1;
        } else {
            assert!(!l.starts_with("error"), "{l}");
            streak = 0;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "client still reaches the removed endpoint"
        );
    }
    eprintln!("proxyless client switched in {:?}", start.elapsed());
    let (_, nodes) = common::get(&c, &s.url("/debug/xds/nodes")).await;
    let n = &nodes["nodes"][0];
    assert_eq!(n["protocol"], "sotw");
    for t in ["LDS", "RDS", "CDS", "EDS"] {
        assert!(n["types"][t]["nacks"] == 0, "{t}: {n}");
    }
}

/// Starts `n` backends per version of `service`, registered with metadata `version`: their
/// ports by version.
async fn versions(
    s: &Server,
    c: &reqwest::Client,
    service: &str,
    versions: &[(&str, usize)],
) -> (BTreeMap<String, String>, Vec<tokio::process::Child>) {
    let (mut by_port, mut children) = (BTreeMap::new(), vec![]);
    for (version, n) in versions {
        for _ in 0..*n {
            let p = common::free_port();
            children.push(backend(p).await);
            let (st, b) = post(c, &s.url("/naming/v1/instances"), json!([{"namespace": "default", "service": service, "host": "127.0.0.1", "port": p, "protocol": "grpc", "metadata": {"version": version}}])).await;
            assert_eq!(st, 200, "{b}");
            by_port.insert(p.to_string(), version.to_string());
        }
    }
    (by_port, children)
}

/// Sums a tally of ports into versions.
fn by_version(
    ports: &BTreeMap<String, String>,
    got: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (port, n) in got {
        *out.entry(ports[port].clone()).or_default() += n;
    }
    out
}

/// The routing rules Envoy sidecars follow reach proxyless gRPC clients through the same
/// translation: a metadata (header) match picks a group, weights split the rest.
#[tokio::test]
async fn grpc_xds_client_follows_routing_rules() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let (st, b) = post(
        &c,
        &s.url("/naming/v1/services"),
        json!([{"namespace": "default", "name": "echo-grpc", "protocol": "grpc"}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let (ports, _children) = versions(&s, &c, "echo-grpc", &[("v1", 2), ("v2", 1)]).await;
    let group = |version: &str, weight: u32| json!({"service": "echo-grpc", "namespace": "default", "weight": weight, "priority": 0, "labels": {"version": {"type": "EXACT", "value": version}}});
    let rule = |name: &str, priority: u32, arguments: Value, destinations: Value| {
        json!({"name": name, "namespace": "default", "enable": true, "priority": priority, "routing_policy": "RulePolicy",
        "routing_config": {"@type": "type.googleapis.com/v1.RuleRoutingConfig", "rules": [{"name": "s", "sources": [{"service": "*", "namespace": "*", "arguments": arguments}], "destinations": destinations}]}})
    };
    let (st, b) = post(
        &c,
        &s.url("/naming/v2/routings"),
        json!([
            rule("vip", 0, json!([{"type": "HEADER", "key": "x-user", "value": {"type": "EXACT", "value": "vip", "value_type": "TEXT"}}]), json!([group("v2", 100)])),
            rule("split", 1, json!([]), json!([group("v1", 80), group("v2", 20)])),
        ]),
    )
    .await;
    assert_eq!(st, 200, "{b}");

    let mut vip = Client::start(&s, "echo-grpc.default", 60, &["x-user=vip"]);
    let got = by_version(&ports, &vip.tally(100).await);
    assert_eq!(got, BTreeMap::from([("v2".to_string(), 100)]));

    let mut plain = Client::start(&s, "echo-grpc.default", 60, &["x-user=someone"]);
    let got = by_version(&ports, &plain.tally(400).await);
    let v2 = got.get("v2").copied().unwrap_or_default() as f64 / 400.0;
    assert!((v2 - 0.2).abs() <= 0.07, "80/20 split observed as {got:?}");
    // Both v1 instances share v1's weight.
    let v1_ports = ports.iter().filter(|(_, v)| *v == "v1").count();
    assert_eq!(v1_ports, 2);

    let (_, nodes) = common::get(&c, &s.url("/debug/xds/nodes")).await;
    for n in nodes["nodes"].as_array().unwrap() {
        for t in ["LDS", "RDS", "CDS", "EDS"] {
            assert!(n["types"][t]["nacks"] == 0, "{t}: {n}");
        }
    }
}

/// A service's ring-hash policy with the hash key from a header reaches proxyless clients: one
/// user's calls land on one instance; many users spread over the instances.
#[tokio::test]
async fn grpc_xds_client_follows_ring_hash() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let (st, b) = post(&c, &s.url("/naming/v1/services"), json!([{"namespace": "default", "name": "ring-grpc", "protocol": "grpc",
        "metadata": {"polarismesh.cn/lbPolicy": "RING_HASH", "polarismesh.cn/lbHashKey": "header:x-user"}}])).await;
    assert_eq!(st, 200, "{b}");
    let (_ports, _children) = versions(&s, &c, "ring-grpc", &[("v1", 3)]).await;

    for user in ["alice", "bob"] {
        let mut one = Client::start(&s, "ring-grpc.default", 60, &[&format!("x-user={user}")]);
        let got = one.tally(100).await;
        assert_eq!(got.len(), 1, "{user} moved between instances: {got:?}");
    }
    let mut many = Client::start(&s, "ring-grpc.default", 60, &["x-user=user-{n}"]);
    let got = many.tally(100).await;
    assert!(got.len() >= 2, "100 users on one instance: {got:?}");

    let (_, nodes) = common::get(&c, &s.url("/debug/xds/nodes")).await;
    for n in nodes["nodes"].as_array().unwrap() {
        for t in ["LDS", "RDS", "CDS", "EDS"] {
            assert!(n["types"][t]["nacks"] == 0, "{t}: {n}");
        }
    }
}
