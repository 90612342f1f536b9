//! NACK handling end to end with a real Envoy: an invalid cluster is rejected, the server shows the
//! rejection, other traffic keeps flowing, and the next valid version is accepted. The invalid
//! cluster comes from a hook compiled into test builds only (feature `test-hooks`; `scripts/test.sh`
//! turns it on), since a release build has no input Envoy should reject.

mod common;

use std::time::Duration;

use common::traffic::{answering, converge, node_of, register, set, wait_node};
use common::{put, Backend, Envoy, Server};
use serde_json::json;

async fn scenario(sotw: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let (b, fresh) = (Backend::start("b").await, Backend::start("fresh").await);
    register(&c, &s, "echo", b.port, json!({})).await;
    register(&c, &s, "fresh", fresh.port, json!({})).await;
    let mode = if sotw { "sotw" } else { "delta" };
    let e = Envoy::start(
        dir.path(),
        &format!("sidecar~default/nack-{mode}~127.0.0.1"),
        s.xds_port,
        sotw,
    )
    .await;
    converge(&e, &c, "echo.default", &["b"], Duration::from_secs(10)).await;

    // An invalid cluster: Envoy NACKs, the server shows it, other traffic keeps flowing.
    register(&c, &s, "broken", fresh.port, json!({})).await;
    converge(&e, &c, "broken.default", &["fresh"], Duration::from_secs(5)).await;
    let (st, body) = put(&c, &s.url("/naming/v1/services"), json!([{"namespace": "default", "name": "broken", "metadata": {"polarismesh.cn/test-invalid-cluster": "true"}}])).await;
    assert_eq!(st, 200, "{body}");
    let nodes = wait_node(&c, &s, mode, "a NACK", |n| {
        n["types"]["CDS"]["lastNack"].is_string()
    })
    .await;
    let msg = node_of(&nodes, mode)["types"]["CDS"]["lastNack"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.to_lowercase().contains("duration"), "{msg}");
    assert!(
        e.stat("cluster_manager.cds.update_rejected")
            .await
            .unwrap_or(0)
            >= 1
    );
    let m = s.metrics().await;
    assert!(!m.contains("polaris_xds_nacks_total 0\n"), "{m}");
    assert_eq!(answering(&e, &c, "echo.default", 10).await, set(&["b"]));
    assert_eq!(answering(&e, &c, "fresh.default", 5).await, set(&["fresh"]));
    // The next valid version is accepted again (a new one: in delta, the client still holds the
    // last good cluster, so restoring exactly that content sends nothing).
    let (st, _) = put(&c, &s.url("/naming/v1/services"), json!([{"namespace": "default", "name": "broken", "metadata": {"polarismesh.cn/connectTimeoutMs": "3000"}}])).await;
    assert_eq!(st, 200);
    wait_node(&c, &s, mode, "the valid version ACKed", |n| {
        n["types"]["CDS"]["lastNack"].is_null()
            && n["types"]["CDS"]["versionAcked"] == n["types"]["CDS"]["versionSent"]
    })
    .await;
    assert_eq!(e.stat("cluster_manager.warming_clusters").await, Some(0));
    for stat in [
        "cluster_manager.cds.init_fetch_timeout",
        "listener_manager.lds.init_fetch_timeout",
        "http.OUTBOUND_HTTP.rds.polaris-outbound-router.init_fetch_timeout",
    ] {
        assert_eq!(e.stat(stat).await, Some(0), "{stat}");
    }
}

#[tokio::test]
async fn envoy_delta_nack_is_shown_and_recovered() {
    scenario(false).await;
}

#[tokio::test]
async fn envoy_sotw_nack_is_shown_and_recovered() {
    scenario(true).await;
}
