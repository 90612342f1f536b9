//! Governance rules through a real Envoy with real backends and real traffic: routing rules,
//! load balancing, circuit breaking, active health checks, local and global rate limits.
//! Distributions are asserted with tolerances, never exact timings.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{post, put, Backend, Envoy, Server};
use serde_json::{json, Value};

struct Mesh {
    s: Server,
    c: reqwest::Client,
    _backends: Vec<Backend>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// A server and `echo` instances named `<version>-<n>` with metadata `version`.
    async fn start(instances: &[(&str, usize)]) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start(&dir.path().join("d"), &[]).await;
        let c = reqwest::Client::new();
        let mut backends = vec![];
        for (version, n) in instances {
            for k in 0..*n {
                let b = Backend::start(&format!("{version}-{k}")).await;
                let (st, v) = post(
                    &c,
                    &s.url("/naming/v1/instances"),
                    json!([{"namespace": "default", "service": "echo", "host": "127.0.0.1", "port": b.port,
                            "metadata": {"version": version}}]),
                )
                .await;
                assert_eq!(st, 200, "{v}");
                backends.push(b);
            }
        }
        Mesh {
            s,
            c,
            _backends: backends,
            _dir: dir,
        }
    }

    async fn sidecar(&self, service: &str) -> Envoy {
        Envoy::start_with(
            self._dir.path(),
            &format!("sidecar~default/{service}-0~127.0.0.1"),
            self.s.xds_port,
            false,
            &[&format!("sidecar.polarismesh.cn/serviceName={service}")],
        )
        .await
    }

    async fn rules(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .c
            .request(method, self.s.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(st, 200, "{v}");
        v
    }
}

/// GET through the sidecar's outbound listener: (status, body).
async fn call(
    e: &Envoy,
    c: &reqwest::Client,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut rq = c
        .get(format!("http://127.0.0.1:{}{path}", e.outbound_port))
        .header("host", "echo.default")
        .timeout(Duration::from_secs(5));
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    match rq.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// How many of `n` requests each backend version answered (`status N` for failures).
async fn versions(
    e: &Envoy,
    c: &reqwest::Client,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (st, body) = call(e, c, path, headers).await;
        let key = if st == 200 {
            body.split('-').next().unwrap_or_default().to_string()
        } else {
            format!("status {st}")
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Polls until `n` requests all go to `version` (the sidecar applies pushes asynchronously).
async fn only(
    e: &Envoy,
    c: &reqwest::Client,
    path: &str,
    headers: &[(&str, &str)],
    version: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = versions(e, c, path, headers, 20).await;
        if got.len() == 1 && got.contains_key(version) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{path} {headers:?}: {got:?}, want only {version}; log:\n{}",
            std::fs::read_to_string(&e.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn group(version: &str, weight: u32) -> Value {
    json!({"service": "echo", "namespace": "default", "weight": weight, "priority": 0,
           "labels": {"version": {"type": "EXACT", "value": version}}})
}

fn rule(name: &str, priority: u32, sources: Value, destinations: Value) -> Value {
    json!({"name": name, "namespace": "default", "enable": true, "priority": priority,
           "routing_policy": "RulePolicy",
           "routing_config": {"@type": "type.googleapis.com/v1.RuleRoutingConfig",
                              "rules": [{"name": "s", "sources": sources, "destinations": destinations}]}})
}

fn any_caller(arguments: Value) -> Value {
    json!([{"service": "*", "namespace": "*", "arguments": arguments}])
}

#[tokio::test]
async fn routing_rules_route_by_arguments_weights_and_caller() {
    let m = Mesh::start(&[("v1", 2), ("v2", 1)]).await;
    let arg = |t: &str, k: &str, mt: &str, v: &str| json!({"type": t, "key": k, "value": {"type": mt, "value": v, "value_type": "TEXT"}});
    let created = m
        .rules(
            reqwest::Method::POST,
            "/naming/v2/routings",
            json!([
                rule(
                    "vip",
                    0,
                    any_caller(json!([arg("HEADER", "x-user", "EXACT", "vip")])),
                    json!([group("v2", 100)])
                ),
                rule(
                    "age",
                    1,
                    any_caller(json!([arg("HEADER", "x-age", "RANGE", "18~30")])),
                    json!([group("v2", 100)])
                ),
                rule(
                    "tier",
                    2,
                    any_caller(json!([arg("HEADER", "x-tier", "IN", "gold,silver")])),
                    json!([group("v2", 100)])
                ),
                rule(
                    "lang",
                    3,
                    any_caller(json!([
                        arg("QUERY", "lang", "EXACT", "fr"),
                        arg("HEADER", "x-lane", "NOT_IN", "blue,green")
                    ])),
                    json!([group("v2", 100)])
                ),
                rule(
                    "web2",
                    4,
                    json!([{"service": "web2", "namespace": "default", "arguments": []}]),
                    json!([group("v2", 100)])
                ),
                rule(
                    "split",
                    9,
                    any_caller(json!([])),
                    json!([group("v1", 80), group("v2", 20)])
                ),
            ]),
        )
        .await;
    let split_id = created["responses"][5]["data"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let web = m.sidecar("web").await;
    only(&web, &m.c, "/", &[("x-user", "vip")], "v2").await;
    for (path, headers) in [
        ("/", vec![("x-age", "18")]),
        ("/", vec![("x-age", "30")]),
        ("/", vec![("x-tier", "silver")]),
        ("/?lang=fr", vec![("x-lane", "red")]),
        ("/?lang=fr", vec![]),
    ] {
        let got = versions(&web, &m.c, path, &headers, 30).await;
        assert_eq!(
            got,
            BTreeMap::from([("v2".to_string(), 30)]),
            "{path} {headers:?}"
        );
    }
    // Outside the matches: the 80/20 split (±7%).
    for (path, headers) in [
        ("/", vec![("x-age", "31")]),
        ("/", vec![("x-tier", "bronze")]),
        ("/?lang=fr", vec![("x-lane", "blue")]),
        ("/?lang=en", vec![]),
    ] {
        let got = versions(&web, &m.c, path, &headers, 20).await;
        assert!(got.contains_key("v1"), "{path} {headers:?}: {got:?}");
    }
    let n = 400;
    let got = versions(&web, &m.c, "/", &[], n).await;
    let v1 = *got.get("v1").unwrap_or(&0) as f64 / n as f64;
    assert!((v1 - 0.8).abs() <= 0.07, "80/20 split observed as {got:?}");
    assert_eq!(got.values().sum::<usize>(), n, "{got:?}");
    // The caller-service rule applies to web2's sidecar only.
    let web2 = m.sidecar("web2").await;
    only(&web2, &m.c, "/", &[], "v2").await;
    let got = versions(&web, &m.c, "/", &[], 40).await;
    assert!(got.contains_key("v1"), "web is not web2: {got:?}");

    // An update (all to v2) takes effect, and no request fails meanwhile.
    let mut updated = rule(
        "split",
        9,
        any_caller(json!([])),
        json!([group("v1", 0), group("v2", 100)]),
    );
    updated["id"] = json!(split_id);
    let started = Instant::now();
    m.rules(
        reqwest::Method::PUT,
        "/naming/v2/routings",
        json!([updated]),
    )
    .await;
    let took = only(&web, &m.c, "/", &[], "v2").await;
    eprintln!(
        "rule update in force after {:?}",
        started.elapsed().max(took)
    );
    let got = versions(&web, &m.c, "/", &[], 100).await;
    assert_eq!(got, BTreeMap::from([("v2".to_string(), 100)]));
    // Disabled: back to every instance.
    m.rules(
        reqwest::Method::PUT,
        "/naming/v2/routings/enable",
        json!([{"id": split_id, "enable": false}]),
    )
    .await;
    let start = Instant::now();
    loop {
        let got = versions(&web, &m.c, "/", &[], 30).await;
        if got.contains_key("v1") {
            assert!(!got.keys().any(|k| k.starts_with("status")), "{got:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still {got:?}");
    }
}

#[tokio::test]
async fn rules_envoy_cannot_express_are_refused_naming_the_field() {
    let m = Mesh::start(&[]).await;
    let r =
        m.c.post(m.s.url("/naming/v2/routings"))
            .json(&json!([rule(
                "bad",
                0,
                any_caller(
                    json!([{"type": "CALLER_IP", "value": {"type": "EXACT", "value": "10.0.0.1"}}])
                ),
                json!([group("v1", 100)])
            )]))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    let info = v["responses"][0]["info"].as_str().unwrap();
    assert!(
        info.contains("routingConfig.rules[0].sources[0].arguments[0].type")
            && info.contains("cannot be expressed in Envoy"),
        "{v}"
    );
    let (_, list) = common::get(&m.c, &m.s.url("/naming/v2/routings")).await;
    assert_eq!(list["amount"], 0, "nothing stored");
    let r = m
        .c
        .post(m.s.url("/naming/v1/ratelimits"))
        .json(&json!([{"name": "q", "namespace": "default", "service": "echo", "resource": "CONCURRENCY", "type": "LOCAL",
                       "amounts": [{"maxAmount": 1, "validDuration": "1s"}]}]))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(
        v["responses"][0]["info"]
            .as_str()
            .unwrap()
            .contains("resource"),
        "{v}"
    );
    let _ = put;
}
