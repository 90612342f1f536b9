//! Proxyless gRPC: a Python grpcio client with an `xds:///` target, served by our ADS server,
//! reaches gRPC backends registered in the registry and follows endpoint changes.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{post, python_path, Server};
use serde_json::json;
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
    let bootstrap = json!({
        "xds_servers": [{"server_uri": format!("127.0.0.1:{}", s.xds_port), "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
        "node": {"id": "proxyless~default/grpc-client~127.0.0.1", "metadata": {}},
    });
    let mut client = tokio::process::Command::new(python_path())
        .arg(script("client.py"))
        .args([target, "30"])
        .env("GRPC_XDS_BOOTSTRAP_CONFIG", bootstrap.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python client");
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    macro_rules! next {
        () => {
            tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("client silent")
                .unwrap()
                .expect("client ended")
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
