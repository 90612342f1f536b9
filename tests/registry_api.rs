//! The registry through the real binary's REST API.

mod common;

use std::time::{Duration, Instant};

use common::{get, post, put, Server};
use serde_json::{json, Value};

fn inst(svc: &str, port: u16) -> Value {
    json!({"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port})
}

async fn instances(c: &reqwest::Client, s: &Server, svc: &str) -> Vec<Value> {
    let (st, body) = get(
        c,
        &s.url(&format!(
            "/naming/v1/instances?namespace=default&service={svc}&limit=10000"
        )),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    body["instances"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn register_list_update_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();

    let (st, body) = post(&c, &s.url("/naming/v1/instances"), json!([
        {"namespace": "default", "service": "echo", "host": "10.0.0.1", "port": 8080, "metadata": {"version": "v1"}},
        {"namespace": "default", "service": "echo", "host": "10.0.0.2", "port": 8080, "metadata": {"version": "v2"}, "weight": 50},
    ])).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["code"], 200000);
    assert_eq!(body["responses"].as_array().unwrap().len(), 2);

    // The service was created on the fly.
    let (_, svcs) = get(&c, &s.url("/naming/v1/services?namespace=default")).await;
    assert_eq!(svcs["amount"], 1);
    assert_eq!(svcs["services"][0]["name"], "echo");
    assert_eq!(svcs["services"][0]["total_instance_count"], 2);

    // Filters and paging.
    let (_, v2) = get(
        &c,
        &s.url("/naming/v1/instances?namespace=default&service=echo&keys=version&values=v2"),
    )
    .await;
    assert_eq!(v2["amount"], 1);
    assert_eq!(v2["instances"][0]["weight"], 50);
    let (_, page) = get(
        &c,
        &s.url("/naming/v1/instances?namespace=default&service=echo&offset=1&limit=1"),
    )
    .await;
    assert_eq!(page["amount"], 2);
    assert_eq!(page["size"], 1);

    // Update by address: isolate one.
    let (st, body) = put(&c, &s.url("/naming/v1/instances"), json!([
        {"namespace": "default", "service": "echo", "host": "10.0.0.1", "port": 8080, "isolate": true}
    ])).await;
    assert_eq!(st, 200, "{body}");
    let (_, iso) = get(
        &c,
        &s.url("/naming/v1/instances?namespace=default&service=echo&isolate=true"),
    )
    .await;
    assert_eq!(iso["amount"], 1);
    assert_eq!(iso["instances"][0]["host"], "10.0.0.1");
    // Update keeps what was not sent.
    assert_eq!(iso["instances"][0]["metadata"]["version"], "v1");

    // Update of a missing instance: PolarisMesh's "not found instances" for that item.
    let (st, body) = put(
        &c,
        &s.url("/naming/v1/instances"),
        json!([inst("echo", 9999)]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400303)), "{body}");

    // Service delete is refused while instances exist.
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/services/delete"),
        json!([{"namespace": "default", "name": "echo"}]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400204)), "{body}");

    // Delete by id and by address.
    let id = iso["instances"][0]["id"].as_str().unwrap().to_string();
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/instances/delete"),
        json!([
            {"id": id},
            {"namespace": "default", "service": "echo", "host": "10.0.0.2", "port": 8080},
        ]),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(instances(&c, &s, "echo").await.is_empty());
    let (st, _) = post(
        &c,
        &s.url("/naming/v1/services/delete"),
        json!([{"namespace": "default", "name": "echo"}]),
    )
    .await;
    assert_eq!(st, 200);
    let (_, svcs) = get(&c, &s.url("/naming/v1/services?namespace=default")).await;
    assert_eq!(svcs["amount"], 0);
}

#[tokio::test]
async fn namespaces_services_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let (_, ns) = get(&c, &s.url("/naming/v1/namespaces")).await;
    let names: Vec<_> = ns["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"default".to_string()) && names.contains(&"Polaris".to_string()));

    assert_eq!(
        post(
            &c,
            &s.url("/naming/v1/namespaces"),
            json!([{"name": "prod"}])
        )
        .await
        .0,
        200
    );
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/namespaces"),
        json!([{"name": "prod"}]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400201)), "{body}");
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/namespaces"),
        json!([{"name": "+bad"}]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400110)), "{body}");
    let (st, _) = post(&c, &s.url("/naming/v1/services"), json!([{"namespace": "prod", "name": "api", "protocol": "grpc", "metadata": {"team": "a"}}])).await;
    assert_eq!(st, 200);
    let (st, _) = put(
        &c,
        &s.url("/naming/v1/services"),
        json!([{"namespace": "prod", "name": "api", "comment": "edge"}]),
    )
    .await;
    assert_eq!(st, 200);
    let (_, svcs) = get(&c, &s.url("/naming/v1/services?namespace=prod&name=api")).await;
    assert_eq!(svcs["services"][0]["comment"], "edge");
    assert_eq!(
        svcs["services"][0]["metadata"]["polarismesh.cn/protocol"],
        "grpc"
    );
    assert_eq!(svcs["services"][0]["metadata"]["team"], "a");

    // Alias: lists the target's instances.
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/service/alias"),
        json!({"namespace": "prod", "service": "api", "alias": "api-v2"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "prod", "service": "api", "host": "10.1.1.1", "port": 9000}]),
    )
    .await;
    let (_, via_alias) = get(
        &c,
        &s.url("/naming/v1/instances?namespace=prod&service=api-v2"),
    )
    .await;
    assert_eq!(via_alias["amount"], 1);

    // A namespace with services cannot be deleted; nor can `default`.
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/namespaces/delete"),
        json!([{"name": "prod"}]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400203)), "{body}");
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/namespaces/delete"),
        json!([{"name": "default"}]),
    )
    .await;
    assert_eq!((st, &body["code"]), (400, &json!(400000)), "{body}");
}

#[tokio::test]
async fn bad_inputs_get_400_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    // One good instance stored before.
    assert_eq!(
        post(
            &c,
            &s.url("/naming/v1/instances"),
            json!([inst("echo", 80)])
        )
        .await
        .0,
        200
    );
    let before = instances(&c, &s, "echo").await;

    let ttl0 = json!({"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": 81,
                      "enableHealthCheck": true, "healthCheck": {"type": "HEARTBEAT", "heartbeat": {"ttl": 0}}});
    let cases: Vec<(Value, &str, u32)> = vec![
        (
            json!([inst("echo", 81), inst("echo", 0)]),
            "[1].port",
            400132,
        ),
        (
            json!([inst("echo", 81), {"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": 70000}]),
            "[1].port",
            400132,
        ),
        (json!([inst("", 81)]), "[0].service", 400120),
        (
            json!([{"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": 81, "weight": -1}]),
            "[0].weight",
            400103,
        ),
        (json!([ttl0]), "[0].healthCheck.heartbeat.ttl", 400103),
        (
            json!([{"namespace": "default", "service": "echo", "host": "not a host", "port": 81}]),
            "[0].host",
            400131,
        ),
        (
            json!([{"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": "eighty"}]),
            "[0].port",
            400132,
        ),
    ];
    for (body, field, code) in cases {
        let (st, resp) = post(&c, &s.url("/naming/v1/instances"), body.clone()).await;
        assert_eq!((st, &resp["code"]), (400, &json!(code)), "{body} -> {resp}");
        let info = resp["responses"][0]["info"].as_str().unwrap_or_default();
        assert!(info.contains(field), "{body} -> {resp}");
    }
    // An instance in a namespace that does not exist: rejected for that item.
    let (st, resp) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "nope", "service": "echo", "host": "127.0.0.1", "port": 81}]),
    )
    .await;
    assert_eq!((st, &resp["code"]), (400, &json!(400305)), "{resp}");
    assert!(resp["responses"][0]["info"]
        .as_str()
        .unwrap()
        .contains("nope"));
    // Malformed JSON.
    let r = c
        .post(s.url("/naming/v1/instances"))
        .header("content-type", "application/json")
        .body("[{\"namespace\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 400001);
    // Client API: single objects name the field without an index.
    let (st, resp) = post(
        &c,
        &s.url("/v1/RegisterInstance"),
        json!({"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": 0}),
    )
    .await;
    assert_eq!((st, &resp["code"]), (400, &json!(400132)), "{resp}");
    assert!(resp["info"].as_str().unwrap().contains(": port:"), "{resp}");
    let (st, resp) = post(
        &c,
        &s.url("/v1/RegisterInstance"),
        json!({"namespace": "nope", "service": "echo", "host": "127.0.0.1", "port": 80}),
    )
    .await;
    assert_eq!((st, &resp["code"]), (400, &json!(400305)), "{resp}");

    // Nothing changed: the good batch items before the bad ones were not written.
    assert_eq!(instances(&c, &s, "echo").await, before);
    let (_, svcs) = get(&c, &s.url("/naming/v1/services")).await;
    assert_eq!(svcs["amount"], 1);
}

/// The mesh's own metadata keys are checked where they are set; a bad value changes nothing.
#[tokio::test]
async fn tls_mode_and_service_account_metadata_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let strict = json!([{"namespace": "default", "name": "echo",
                         "metadata": {"polarismesh.cn/tls-mode": "strict", "polarismesh.cn/service-account": "echo"}}]);
    assert_eq!(post(&c, &s.url("/naming/v1/services"), strict).await.0, 200);
    let bad: Vec<(Value, &str)> = vec![
        (
            json!([{"namespace": "default", "name": "echo", "metadata": {"polarismesh.cn/tls-mode": "STRICT"}}]),
            "metadata.polarismesh.cn/tls-mode",
        ),
        (
            json!([{"namespace": "default", "name": "echo", "metadata": {"polarismesh.cn/service-account": "Echo/x"}}]),
            "metadata.polarismesh.cn/service-account",
        ),
    ];
    for (body, field) in bad {
        let (st, resp) = put(&c, &s.url("/naming/v1/services"), body.clone()).await;
        assert_eq!(
            (st, &resp["code"]),
            (400, &json!(400123)),
            "{body} -> {resp}"
        );
        let info = resp["responses"][0]["info"].as_str().unwrap_or_default();
        assert!(info.contains(field), "{resp}");
    }
    let (_, svcs) = get(
        &c,
        &s.url("/naming/v1/services?namespace=default&name=echo"),
    )
    .await;
    assert_eq!(
        svcs["services"][0]["metadata"]["polarismesh.cn/tls-mode"], "strict",
        "{svcs}"
    );
    // On an instance only `none` (no sidecar accepting mTLS) and the modes are meaningful.
    let (st, resp) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": "echo", "host": "10.0.0.1", "port": 80,
                "metadata": {"polarismesh.cn/tls-mode": "mtls"}}]),
    )
    .await;
    assert_eq!((st, &resp["code"]), (400, &json!(400150)), "{resp}");
    assert!(instances(&c, &s, "echo").await.is_empty());
}

#[tokio::test]
async fn kill_9_after_burst_keeps_every_acknowledged_registration() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &[]).await;
    let c = reqwest::Client::new();
    let url = s.url("/v1/RegisterInstance");
    let mut tasks = Vec::new();
    for w in 0..50u16 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..20u16 {
                let port = 1000 + w * 20 + k;
                let (st, body) = post(&c, &url, json!({"namespace": "default", "service": "burst", "host": "10.9.9.9", "port": port})).await;
                assert_eq!(st, 200, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every 200 above was acknowledged; kill at once.
    s.kill9();
    let s = Server::start(&data, &[]).await;
    assert_eq!(instances(&c, &s, "burst").await.len(), 1000);
}

#[tokio::test]
async fn heartbeat_ttl_drives_health() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let (st, body) = post(
        &c,
        &s.url("/v1/RegisterInstance"),
        json!({
        "namespace": "default", "service": "hb", "host": "127.0.0.1", "port": 7000,
        "enableHealthCheck": true, "healthCheck": {"type": 1, "heartbeat": {"ttl": 1}}}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let id = body["instance"]["id"].as_str().unwrap().to_string();
    let healthy = |c: reqwest::Client, url: String| async move {
        let (_, v) = get(&c, &url).await;
        v["instances"][0]["healthy"].as_bool().unwrap()
    };
    let list = s.url("/naming/v1/instances?namespace=default&service=hb");
    // Beat for 2.5 s: stays healthy.
    for _ in 0..5 {
        assert_eq!(
            post(&c, &s.url("/v1/Heartbeat"), json!({"id": id})).await.0,
            200
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(healthy(c.clone(), list.clone()).await);
    // Stop beating: unhealthy after ~3 s.
    let stopped = Instant::now();
    while healthy(c.clone(), list.clone()).await {
        assert!(
            stopped.elapsed() < Duration::from_secs(8),
            "never turned unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "unhealthy too early: {took:?}"
    );
    // One beat (by address this time) brings it back.
    let (st, _) = post(
        &c,
        &s.url("/v1/Heartbeat"),
        json!({"namespace": "default", "service": "hb", "host": "127.0.0.1", "port": 7000}),
    )
    .await;
    assert_eq!(st, 200);
    assert!(healthy(c.clone(), list.clone()).await);
    // Unknown instance: PolarisMesh's "not found resource".
    let (st, body) = post(&c, &s.url("/v1/Heartbeat"), json!({"id": "nope"})).await;
    assert_eq!((st, &body["code"]), (400, &json!(400202)), "{body}");
    let (_, m) = (
        0,
        c.get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(m.contains("polaris_heartbeats_total 6"), "{m}");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_openapi_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &["--log-format", "json"]).await;
    let c = reqwest::Client::new();
    let (st, doc) = get(&c, &s.url("/openapi.json")).await;
    assert_eq!(st, 200);
    assert!(doc["paths"]["/naming/v1/instances"]["post"].is_object());
    assert!(doc["paths"]["/v1/Heartbeat"]["post"].is_object());
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with('{') && l.contains("polaris server stopped")),
        "{log}"
    );
}

/// Errors the framework produces (body too large, unknown path, wrong method) have the same JSON
/// shape as every other error.
#[tokio::test]
async fn framework_errors_use_the_json_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    let huge = vec![b' '; 3 << 20];
    let r = c
        .post(s.url("/naming/v1/instances"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 400000, "{v}");
    assert!(v["info"].as_str().unwrap().contains("limit"), "{v}");
    // The server closes a connection whose body it did not read: a new client from here.
    let c = reqwest::Client::new();
    let r = c.get(s.url("/naming/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["info"].as_str().unwrap().contains("/naming/v1/nope"),
        "{v}"
    );
    assert!(v["code"].is_number(), "{v}");
    let r = c
        .delete(s.url("/naming/v1/instances"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 400000, "{v}");
    assert!(v["info"].as_str().unwrap().contains("DELETE"), "{v}");
}
