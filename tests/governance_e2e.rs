//! Governance rules through a real Envoy with real backends and real traffic: routing rules,
//! load balancing, circuit breaking, active health checks, local and global rate limits.
//! Distributions are asserted with tolerances, never exact timings.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{free_port, post, put, Backend, Envoy, Server};
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
        Self::start_with(instances, &[]).await
    }

    /// [`Mesh::start`] with extra server flags.
    async fn start_with(instances: &[(&str, usize)], flags: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start(&dir.path().join("d"), flags).await;
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

/// A backend answering `/health` with `health` and everything else with `status` and its name.
struct Faulty {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Faulty {
    async fn start(name: &str, status: u16, health: u16) -> Faulty {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let name = name.to_string();
        let app = axum::Router::new()
            .route(
                "/health",
                axum::routing::get(move || async move {
                    axum::http::StatusCode::from_u16(health).unwrap()
                }),
            )
            .fallback(move || {
                let name = name.clone();
                async move { (axum::http::StatusCode::from_u16(status).unwrap(), name) }
            });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Faulty { port, task }
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(m: &Mesh, svc: &str, port: u16, metadata: Value) {
    let (st, v) = post(
        &m.c,
        &m.s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port, "metadata": metadata}]),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

/// Counts the answers of `n` concurrent-ish requests through the sidecar: body (or status).
async fn tally(
    e: &Envoy,
    c: &reqwest::Client,
    host: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let mut rq = c
            .get(format!("http://127.0.0.1:{}/", e.outbound_port))
            .header("host", host)
            .timeout(Duration::from_secs(5));
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        let key = match rq.send().await {
            Ok(r) if r.status().as_u16() == 200 => r.text().await.unwrap_or_default(),
            Ok(r) => format!("status {}", r.status().as_u16()),
            Err(e) => format!("error {e}"),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn ring_hash_and_maglev_keep_a_user_on_one_instance() {
    let m = Mesh::start(&[]).await;
    let mut backends = vec![];
    for svc in ["ring", "mag"] {
        for k in 0..4 {
            let b = Backend::start(&format!("{svc}-{k}")).await;
            register(&m, svc, b.port, json!({})).await;
            backends.push(b);
        }
    }
    for (svc, policy) in [("ring", "RING_HASH"), ("mag", "MAGLEV")] {
        let (st, v) = put(
            &m.c,
            &m.s.url("/naming/v1/services"),
            json!([{"namespace": "default", "name": svc, "metadata": {"polarismesh.cn/lbPolicy": policy, "polarismesh.cn/lbHashKey": "header:x-user"}}]),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    let web = m.sidecar("web").await;
    for svc in ["ring", "mag"] {
        let host = format!("{svc}.default");
        // Wait for the service (and its policy) to reach the sidecar.
        let start = Instant::now();
        while tally(&web, &m.c, &host, &[], 1)
            .await
            .keys()
            .any(|k| k.starts_with("status") || k.starts_with("error"))
        {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut seen_overall = std::collections::BTreeSet::new();
        for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
            let got = tally(&web, &m.c, &host, &[("x-user", user)], 100 / 6 + 1).await;
            assert_eq!(got.len(), 1, "{svc}: {user} spread over {got:?}");
            seen_overall.extend(got.into_keys());
        }
        assert!(
            seen_overall.len() >= 2,
            "{svc}: every user on one instance: {seen_overall:?}"
        );
        let same = tally(&web, &m.c, &host, &[("x-user", "alice")], 100).await;
        assert_eq!(same.len(), 1, "{svc}: {same:?}");
    }
}

#[tokio::test]
async fn a_failing_instance_is_ejected_and_comes_back_after_the_sleep_window() {
    let m = Mesh::start(&[]).await;
    let good = Faulty::start("good", 200, 200).await;
    let bad = Faulty::start("bad", 503, 200).await;
    register(&m, "cb", good.port, json!({})).await;
    register(&m, "cb", bad.port, json!({})).await;
    m.rules(
        reqwest::Method::POST,
        "/naming/v1/circuitbreaker/rules",
        json!([{"name": "eject", "namespace": "default", "enable": true, "level": "INSTANCE",
                "ruleMatcher": {"source": {"service": "*", "namespace": "*"}, "destination": {"service": "cb", "namespace": "default"}},
                "errorConditions": [{"inputType": "RET_CODE", "condition": {"type": "RANGE", "value": "500~599"}}],
                "triggerCondition": [{"triggerType": "CONSECUTIVE_ERROR", "errorCount": 3, "interval": 1}],
                "recoverCondition": {"sleepWindow": 3, "consecutiveSuccess": 1}}]),
    )
    .await;
    let web = m.sidecar("web").await;
    let host = "cb.default";
    // Until the rule's cluster is in place and the bad instance ejected.
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, host, &[], 20).await;
        if got.get("good") == Some(&20) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never ejected: {got:?}"
        );
    }
    let errors_before = web
        .stat("cluster.OUTBOUND|default|cb.outlier_detection.ejections_enforced_consecutive_5xx")
        .await
        .unwrap_or(0);
    assert!(errors_before >= 1, "ejected by consecutive 5xx");
    // While ejected, everything goes to the good instance.
    let got = tally(&web, &m.c, host, &[], 40).await;
    assert_eq!(got.get("good"), Some(&40), "{got:?}");
    // After the sleep window it is back in rotation (and gets ejected again).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let start = Instant::now();
    let mut back = false;
    while start.elapsed() < Duration::from_secs(6) && !back {
        back = tally(&web, &m.c, host, &[], 10)
            .await
            .contains_key("status 503");
    }
    assert!(back, "the instance never came back");
}

#[tokio::test]
async fn active_health_checks_stop_traffic_to_an_instance_the_registry_calls_healthy() {
    let m = Mesh::start(&[]).await;
    let ok = Faulty::start("ok", 200, 200).await;
    let sick = Faulty::start("sick", 200, 500).await;
    register(&m, "hc", ok.port, json!({})).await;
    register(&m, "hc", sick.port, json!({})).await;
    let web = m.sidecar("web").await;
    let host = "hc.default";
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, host, &[], 20).await;
        if got.contains_key("sick") && got.contains_key("ok") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{got:?}");
    }
    m.rules(
        reqwest::Method::POST,
        "/naming/v1/faultdetectors",
        json!([{"name": "probe", "namespace": "default", "targetService": {"service": "hc", "namespace": "default"},
                "interval": 1, "timeout": 1, "protocol": "HTTP", "httpConfig": {"method": "GET", "url": "/health"}}]),
    )
    .await;
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, host, &[], 20).await;
        if got.get("ok") == Some(&20) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "still {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, insts) = common::get(
        &m.c,
        &m.s.url("/naming/v1/instances?namespace=default&service=hc"),
    )
    .await;
    assert!(
        insts["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["healthy"] == true),
        "the registry still calls both healthy: {insts}"
    );
    assert!(
        web.stat("cluster.OUTBOUND|default|hc.health_check.failure")
            .await
            .unwrap_or(0)
            >= 1
    );
}

/// The `echo` service's own sidecar (its inbound listener in front of `app_port`) and its
/// inbound port.
async fn server_sidecar(m: &Mesh, name: &str, app_port: u16) -> (Envoy, u16) {
    let inbound = free_port();
    let e = Envoy::start_with(
        m._dir.path(),
        &format!("sidecar~default/{name}~127.0.0.1"),
        m.s.xds_port,
        false,
        &[
            "sidecar.polarismesh.cn/serviceName=echo",
            &format!("polarismesh.cn/inboundPort={inbound}"),
            &format!("sidecar.polarismesh.cn/bindPorts={app_port}"),
        ],
    )
    .await;
    (e, inbound)
}

/// Fires `n` requests at once at `port` (path, headers); returns (200s, 429s, others).
async fn burst(
    c: &reqwest::Client,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> (usize, usize, usize) {
    let calls = (0..n).map(|_| {
        let mut rq = c
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(5));
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        rq.send()
    });
    let mut out = (0, 0, 0);
    for r in futures::future::join_all(calls).await {
        match r.map(|r| r.status().as_u16()) {
            Ok(200) => out.0 += 1,
            Ok(429) => out.1 += 1,
            _ => out.2 += 1,
        }
    }
    out
}

/// Waits until the inbound port answers 200 (the sidecar has its listener).
async fn ready(c: &reqwest::Client, port: u16) {
    let start = Instant::now();
    loop {
        if let Ok(r) = c
            .get(format!("http://127.0.0.1:{port}/ready-probe"))
            .send()
            .await
        {
            if r.status().as_u16() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "inbound listener never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn limit(name: &str, kind: &str, max: u32, extra: Value) -> Value {
    let mut r = json!({"name": name, "namespace": "default", "service": "echo", "type": kind, "resource": "QPS",
                       "amounts": [{"maxAmount": max, "validDuration": "1s"}], "action": "REJECT"});
    if let (Some(o), Some(e)) = (r.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    r
}

#[tokio::test]
async fn local_rate_limits_hold_each_rule() {
    let m = Mesh::start(&[]).await;
    let app = Backend::start("app").await;
    let (_e, inbound) = server_sidecar(&m, "echo-0", app.port).await;
    register(&m, "echo", inbound, json!({})).await;
    ready(&m.c, inbound).await;
    m.rules(
        reqwest::Method::POST,
        "/naming/v1/ratelimits",
        json!([
            limit("ten", "LOCAL", 10, json!({"method": {"type": "EXACT", "value": "/a"}})),
            limit("five", "LOCAL", 5, json!({"arguments": [{"type": "HEADER", "key": "x-b", "value": {"type": "EXACT", "value": "1"}}]})),
        ]),
    )
    .await;
    // Until the limits are in place (a burst sees 429s).
    let start = Instant::now();
    while burst(&m.c, inbound, "/a", &[], 30).await.1 == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no limit in force"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = Instant::now();
    let (ok, limited, other) = burst(&m.c, inbound, "/a", &[], 50).await;
    // A bucket of 10 refills 10 a second: a slow burst (a loaded machine) may get a few more.
    let most = 10 + (t.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        (10..=most).contains(&ok) && ok + limited == 50 && other == 0,
        "/a: {ok} ok, {limited} limited, {other} other"
    );
    let t = Instant::now();
    let (ok, limited, _) = burst(&m.c, inbound, "/b", &[("x-b", "1")], 50).await;
    let most = 5 + (t.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (5..=most).contains(&ok) && ok + limited == 50,
        "x-b: {ok} ok, {limited} limited"
    );
    let (ok, limited, _) = burst(&m.c, inbound, "/c", &[], 50).await;
    assert_eq!((ok, limited), (50, 0), "unmatched requests are not limited");
}

#[tokio::test]
async fn a_global_limit_is_shared_by_sidecars_and_its_failover_decides_when_the_service_is_down() {
    for (failover, down_ok) in [("FAILOVER_PASS", 50..=50), ("FAILOVER_LOCAL", 40..=40)] {
        let rls = free_port();
        let mut m = Mesh::start_with(&[], &["--rls-addr", &format!("127.0.0.1:{rls}")]).await;
        let app = Backend::start("app").await;
        let (_a, in_a) = server_sidecar(&m, "echo-a", app.port).await;
        let (_b, in_b) = server_sidecar(&m, "echo-b", app.port).await;
        register(&m, "echo", in_a, json!({})).await;
        register(&m, "echo", in_b, json!({})).await;
        ready(&m.c, in_a).await;
        ready(&m.c, in_b).await;
        m.rules(
            reqwest::Method::POST,
            "/naming/v1/ratelimits",
            json!([limit("shared", "GLOBAL", 20, json!({"failover": failover}))]),
        )
        .await;
        let start = Instant::now();
        while burst(&m.c, in_a, "/", &[], 40).await.1 == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no limit in force"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let both = |c: reqwest::Client| async move {
            let (a, b) = tokio::join!(burst(&c, in_a, "/", &[], 25), burst(&c, in_b, "/", &[], 25));
            (a.0 + b.0, a.1 + b.1, a.2 + b.2)
        };
        let t = Instant::now();
        let (ok, limited, other) = both(m.c.clone()).await;
        let most = 20 + (t.elapsed().as_secs_f64() * 20.0).ceil() as usize;
        assert!(
            (20..=most).contains(&ok) && other == 0,
            "{failover}: {ok} ok, {limited} limited, {other} other"
        );
        let m_rls = reqwest::get(m.s.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m_rls.contains("polaris_rls_decisions_total"), "{m_rls}");
        // The control plane (and its rate-limit service) goes; the sidecars keep their config.
        m.s.kill9();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let t = Instant::now();
        let (ok, limited, other) = both(m.c.clone()).await;
        let slack = (t.elapsed().as_secs_f64() * 40.0).ceil() as usize;
        assert!(
            ok >= *down_ok.start() && ok <= (down_ok.end() + slack).min(50) && other == 0,
            "{failover} with the service down: {ok} ok, {limited} limited, {other} other"
        );
    }
}

#[tokio::test]
async fn nearby_routing_keeps_a_caller_in_its_zone_and_widens_to_the_region() {
    let m = Mesh::start(&[]).await;
    let mut backends = vec![];
    for (name, region, zone) in [
        ("z1-a", "r1", "z1"),
        ("z1-b", "r1", "z1"),
        ("z2-a", "r1", "z2"),
        ("z3-a", "r2", "z3"),
    ] {
        let b = Backend::start(name).await;
        let (st, v) = post(
            &m.c,
            &m.s.url("/naming/v1/instances"),
            json!([{"namespace": "default", "service": "near", "host": "127.0.0.1", "port": b.port,
                    "location": {"region": region, "zone": zone}}]),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        backends.push(b);
    }
    m.rules(
        reqwest::Method::POST,
        "/naming/v2/routings",
        json!([{"name": "near", "namespace": "default", "enable": true, "routing_policy": "NearbyPolicy",
                "routing_config": {"@type": "type.googleapis.com/v1.NearbyRoutingConfig", "service": "near", "namespace": "default",
                                   "match_level": "ZONE", "max_match_level": "REGION", "strict_nearby": false, "healthy_percent": 60}}]),
    )
    .await;
    let web = Envoy::start_bootstrap(
        m._dir.path(),
        "sidecar~default/web-0~127.0.0.1",
        m.s.xds_port,
        false,
        &["sidecar.polarismesh.cn/serviceName=web"],
        &["--locality", "r1/z1"],
    )
    .await;
    let zones = |got: &BTreeMap<String, usize>| -> std::collections::BTreeSet<String> {
        got.keys()
            .map(|k| k.split('-').next().unwrap().to_string())
            .collect()
    };
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, "near.default", &[], 40).await;
        if zones(&got) == ["z1".to_string()].into() && got.len() == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not kept in z1: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Half of z1 unhealthy, under the rule's 60%: part of the traffic widens to z2 (the region),
    // never to r2.
    let (st, v) = put(
        &m.c,
        &m.s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": "near", "host": "127.0.0.1", "port": backends[0].port, "healthy": false}]),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, "near.default", &[], 60).await;
        let z = zones(&got);
        assert!(!z.contains("z3"), "widened past the region: {got:?}");
        if z.contains("z2") && got.contains_key("z1-b") && !got.contains_key("z1-a") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never widened: {got:?}"
        );
    }
}

#[tokio::test]
async fn metadata_routing_goes_to_its_labels_and_fails_over_to_every_instance() {
    let m = Mesh::start(&[]).await;
    let gray = Backend::start("gray").await;
    let plain = Backend::start("plain").await;
    register(&m, "meta", gray.port, json!({"env": "gray"})).await;
    register(&m, "meta", plain.port, json!({})).await;
    m.rules(
        reqwest::Method::POST,
        "/naming/v2/routings",
        json!([{"name": "gray", "namespace": "default", "enable": true, "routing_policy": "MetadataPolicy",
                "routing_config": {"@type": "type.googleapis.com/v1.MetadataRoutingConfig", "service": "meta", "namespace": "default",
                                   "labels": {"env": "gray"}, "failover": "ALL"}}]),
    )
    .await;
    let web = m.sidecar("web").await;
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, "meta.default", &[], 30).await;
        if got == BTreeMap::from([("gray".to_string(), 30)]) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The labelled instance goes unhealthy: every instance takes the traffic.
    let (st, v) = put(
        &m.c,
        &m.s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": "meta", "host": "127.0.0.1", "port": gray.port, "healthy": false}]),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let start = Instant::now();
    loop {
        let got = tally(&web, &m.c, "meta.default", &[], 30).await;
        if got.get("plain") == Some(&30) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no failover: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
