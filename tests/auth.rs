//! REST authentication and authorisation against the real binary: `X-Polaris-Token`, scopes,
//! revocation, failure rate limits, the bootstrap admin token, and logs free of secrets.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{get, Server};
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-0123456789abcdef";

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rq = c.request(method, url);
    if let Some(t) = token {
        rq = rq.header("X-Polaris-Token", t);
    }
    if let Some(b) = body {
        rq = rq.json(&b);
    }
    let r = rq.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn post(
    c: &reqwest::Client,
    s: &Server,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    call(c, reqwest::Method::POST, &s.url(path), token, Some(body)).await
}

/// A server with auth on and the bootstrap admin secret from a file.
async fn server(dir: &std::path::Path) -> Server {
    let f = dir.join("admin.token");
    std::fs::write(&f, format!("{ADMIN}\n")).unwrap();
    Server::start(
        &dir.join("d"),
        &["--auth", "on", "--admin-token-file", f.to_str().unwrap()],
    )
    .await
}

/// Creates a token; returns its (id, secret).
async fn token(
    c: &reqwest::Client,
    s: &Server,
    role: &str,
    namespaces: &[&str],
) -> (String, String) {
    let mut body = json!({"name": format!("{role} token"), "role": role});
    if !namespaces.is_empty() {
        body["namespaces"] = json!(namespaces);
    }
    let (st, v) = post(c, s, "/core/v1/tokens", Some(ADMIN), json!([body])).await;
    assert_eq!(st, 200, "{v}");
    let t = &v["responses"][0]["token"];
    (
        t["id"].as_str().unwrap().to_string(),
        t["secret"].as_str().unwrap().to_string(),
    )
}

fn inst(ns: &str, svc: &str, port: u16) -> Value {
    json!({"namespace": ns, "service": svc, "host": "10.0.0.1", "port": port})
}

/// Every write path, with a body valid for namespace `ns`.
fn writes(ns: &str) -> Vec<(reqwest::Method, &'static str, Value)> {
    use reqwest::Method;
    vec![
        (Method::POST, "/naming/v1/namespaces", json!([{"name": ns}])),
        (
            Method::PUT,
            "/naming/v1/namespaces",
            json!([{"name": ns, "comment": "x"}]),
        ),
        (
            Method::POST,
            "/naming/v1/namespaces/delete",
            json!([{"name": ns}]),
        ),
        (
            Method::POST,
            "/naming/v1/services",
            json!([{"namespace": ns, "name": "new"}]),
        ),
        (
            Method::PUT,
            "/naming/v1/services",
            json!([{"namespace": ns, "name": "api", "comment": "x"}]),
        ),
        (
            Method::POST,
            "/naming/v1/services/delete",
            json!([{"namespace": ns, "name": "api"}]),
        ),
        (
            Method::POST,
            "/naming/v1/service/alias",
            json!({"namespace": ns, "service": "api", "alias": "api-alias"}),
        ),
        (
            Method::POST,
            "/naming/v1/service/aliases/delete",
            json!([{"alias": "api-alias", "alias_namespace": ns}]),
        ),
        (
            Method::POST,
            "/naming/v1/instances",
            json!([inst(ns, "api", 81)]),
        ),
        (
            Method::PUT,
            "/naming/v1/instances",
            json!([{"namespace": ns, "service": "api", "host": "10.0.0.1", "port": 80, "weight": 5}]),
        ),
        (
            Method::POST,
            "/naming/v1/instances/delete",
            json!([{"namespace": ns, "service": "api", "host": "10.0.0.1", "port": 80}]),
        ),
        (
            Method::POST,
            "/naming/v1/groups",
            json!([{"namespace": ns, "service": "api", "name": "g", "labels": {}}]),
        ),
        (
            Method::POST,
            "/naming/v1/groups/delete",
            json!([{"namespace": ns, "service": "api", "name": "g"}]),
        ),
        (Method::POST, "/v1/RegisterInstance", inst(ns, "api", 82)),
        (
            Method::POST,
            "/v1/DeregisterInstance",
            json!({"namespace": ns, "service": "api", "host": "10.0.0.1", "port": 80}),
        ),
        (
            Method::POST,
            "/v1/Heartbeat",
            json!({"namespace": ns, "service": "api", "host": "10.0.0.1", "port": 80}),
        ),
        (
            Method::POST,
            "/core/v1/tokens",
            json!([{"name": "x", "role": "admin"}]),
        ),
    ]
}

async fn state(c: &reqwest::Client, s: &Server, ns: &str) -> Value {
    let (_, svcs) = call(
        c,
        reqwest::Method::GET,
        &s.url(&format!("/naming/v1/services?namespace={ns}")),
        Some(ADMIN),
        None,
    )
    .await;
    let (_, insts) = call(
        c,
        reqwest::Method::GET,
        &s.url(&format!("/naming/v1/instances?namespace={ns}&service=api")),
        Some(ADMIN),
        None,
    )
    .await;
    json!({"services": svcs["services"], "instances": insts["instances"]})
}

#[tokio::test]
async fn tokens_scope_every_write_and_revocation_is_immediate() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let c = reqwest::Client::new();
    for ns in ["a", "b"] {
        assert_eq!(
            post(
                &c,
                &s,
                "/naming/v1/namespaces",
                Some(ADMIN),
                json!([{"name": ns}])
            )
            .await
            .0,
            200
        );
        let (st, v) = post(&c, &s, "/naming/v1/instances", Some(ADMIN), json!([{"namespace": ns, "service": "api", "host": "10.0.0.1", "port": 80,
            "enableHealthCheck": true, "healthCheck": {"type": "HEARTBEAT", "heartbeat": {"ttl": 5}}}])).await;
        assert_eq!(st, 200, "{v}");
    }

    // Public paths, and nothing else, without a token.
    assert_eq!(get(&c, &s.url("/healthz")).await.0, 200);
    assert_eq!(get(&c, &s.url("/metrics")).await.0, 200);
    for (method, path, body) in writes("a") {
        let (st, v) = call(&c, method.clone(), &s.url(path), None, Some(body)).await;
        assert_eq!(
            (st, &v["code"]),
            (401, &json!(401000)),
            "{method} {path}: {v}"
        );
        assert!(
            v["info"].as_str().unwrap().contains("X-Polaris-Token"),
            "{v}"
        );
    }
    let (st, v) = call(
        &c,
        reqwest::Method::GET,
        &s.url("/naming/v1/services"),
        None,
        None,
    )
    .await;
    assert_eq!(st, 401, "reads need a token too: {v}");
    let (st, _) = call(
        &c,
        reqwest::Method::GET,
        &s.url("/debug/xds/nodes"),
        None,
        None,
    )
    .await;
    assert_eq!(st, 401, "debug views are not public by default");

    // Read-only: reads, and 403 on every write path.
    let (_, read) = token(&c, &s, "read", &[]).await;
    let (st, _) = call(
        &c,
        reqwest::Method::GET,
        &s.url("/naming/v1/services?namespace=a"),
        Some(&read),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let before = (state(&c, &s, "a").await, state(&c, &s, "b").await);
    for (method, path, body) in writes("a") {
        let (st, v) = call(&c, method.clone(), &s.url(path), Some(&read), Some(body)).await;
        assert_eq!(
            (st, &v["code"]),
            (403, &json!(403000)),
            "{method} {path}: {v}"
        );
    }
    // A writer of namespace a: nothing in b.
    let (_, writer) = token(&c, &s, "write", &["a"]).await;
    for (method, path, body) in writes("b") {
        let (st, v) = call(&c, method.clone(), &s.url(path), Some(&writer), Some(body)).await;
        assert_eq!(
            (st, &v["code"]),
            (403, &json!(403000)),
            "{method} {path}: {v}"
        );
        let info = v["responses"][0]["info"]
            .as_str()
            .or(v["info"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(info.contains("does not allow"), "{info}");
    }
    // A batch with one item outside the scope writes nothing.
    let (st, _) = post(
        &c,
        &s,
        "/naming/v1/instances",
        Some(&writer),
        json!([inst("a", "api", 90), inst("b", "api", 90)]),
    )
    .await;
    assert_eq!(st, 403);
    assert_eq!(
        (state(&c, &s, "a").await, state(&c, &s, "b").await),
        before,
        "nothing changed"
    );
    // In its namespace it writes.
    let (st, v) = post(
        &c,
        &s,
        "/naming/v1/instances",
        Some(&writer),
        json!([inst("a", "api", 91)]),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = post(
        &c,
        &s,
        "/v1/Heartbeat",
        Some(&writer),
        json!({"namespace": "a", "service": "api", "host": "10.0.0.1", "port": 80}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = post(
        &c,
        &s,
        "/core/v1/tokens",
        Some(&writer),
        json!([{"name": "x", "role": "admin"}]),
    )
    .await;
    assert_eq!(st, 403, "only admins make tokens");

    // A service token (answered when the service was created) writes that service's instances.
    let (_, v) = post(
        &c,
        &s,
        "/naming/v1/services",
        Some(ADMIN),
        json!([{"namespace": "b", "name": "cart"}]),
    )
    .await;
    let svc_token = v["responses"][0]["service"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        post(
            &c,
            &s,
            "/v1/RegisterInstance",
            Some(&svc_token),
            inst("b", "cart", 80)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(
            &c,
            &s,
            "/v1/RegisterInstance",
            Some(&svc_token),
            inst("b", "api", 99)
        )
        .await
        .0,
        403
    );

    // The token list shows no secret; a revoked token fails on its very next call.
    let (st, list) = call(
        &c,
        reqwest::Method::GET,
        &s.url("/core/v1/tokens"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let text = list.to_string();
    assert!(
        !text.contains(&writer) && !text.contains("secret") && !text.contains("hash"),
        "{text}"
    );
    let writer_id = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "write")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        post(
            &c,
            &s,
            "/core/v1/tokens/delete",
            Some(ADMIN),
            json!([{"id": writer_id}])
        )
        .await
        .0,
        200
    );
    let (st, v) = post(
        &c,
        &s,
        "/naming/v1/instances",
        Some(&writer),
        json!([inst("a", "api", 92)]),
    )
    .await;
    assert_eq!((st, &v["code"]), (401, &json!(401000)), "{v}");

    // Writes are audited with who made them; no secret appears in the log.
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("polaris::audit"), "{log}");
    assert!(
        log.contains(&format!("token {writer_id}")),
        "the writer's writes name it"
    );
    for secret in [ADMIN, read.as_str(), writer.as_str(), svc_token.as_str()] {
        assert!(!log.contains(secret), "a secret is in the log");
    }
}

#[tokio::test]
async fn wrong_tokens_are_rate_limited_per_address_and_the_right_one_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let c = reqwest::Client::new();
    let (mut unauthorized, mut limited) = (0, 0);
    let url = s.url("/naming/v1/instances");
    for batch in 0..20 {
        let attempts = (0..50).map(|j| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                let r = c
                    .post(&url)
                    .header(
                        "X-Polaris-Token",
                        format!("wrong-{batch:02}-{j:02}-xxxxxxxxxxxxxxxx"),
                    )
                    .json(&json!([inst("default", "api", 80)]))
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                (st, v["code"].clone())
            }
        });
        for (st, code) in futures::future::join_all(attempts).await {
            assert!(st < 500, "a 5xx under failed logins");
            match st {
                401 => unauthorized += 1,
                403 => {
                    assert_eq!(code, json!(403001));
                    limited += 1
                }
                other => panic!("status {other}"),
            }
        }
    }
    assert_eq!(unauthorized + limited, 1000);
    assert!(
        unauthorized <= 40,
        "the budget is 30 failures a minute: {unauthorized} answered 401"
    );
    assert!(limited >= 960);
    // The right token from the same address still works.
    let (st, v) = post(
        &c,
        &s,
        "/naming/v1/instances",
        Some(ADMIN),
        json!([inst("default", "api", 80)]),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let m = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("polaris_auth_failures_total{reason=\"rate_limited\"}"),
        "{m}"
    );
    // Rate-limited failures are not logged one by one.
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.matches("request refused").count() <= 40,
        "the log is flooded"
    );
}

/// Bound to a non-loopback address, auth is on by default; the first start writes the admin token
/// to a file only its owner can read. `--auth off` there works but says so at every start.
#[tokio::test]
async fn a_public_port_needs_tokens_by_default_and_the_first_admin_token_is_generated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let s = Server::start_on(&data, "0.0.0.0", "127.0.0.1", &[]).await;
    let c = reqwest::Client::new();
    let (st, _) = post(
        &c,
        &s,
        "/naming/v1/instances",
        None,
        json!([inst("default", "api", 80)]),
    )
    .await;
    assert_eq!(st, 401, "anonymous writes are refused on a public port");
    let file = data.join("admin-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(
        post(
            &c,
            &s,
            "/naming/v1/instances",
            Some(&admin),
            json!([inst("default", "api", 80)])
        )
        .await
        .0,
        200
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(!log.contains(&admin), "the generated secret is not logged");
    drop(s);
    // Restarted: the same token works and the file is not rewritten.
    let s = Server::start_on(&data, "0.0.0.0", "127.0.0.1", &[]).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), admin);
    assert_eq!(
        post(
            &c,
            &s,
            "/naming/v1/instances",
            Some(&admin),
            json!([inst("default", "api", 81)])
        )
        .await
        .0,
        200
    );
    drop(s);
    let s = Server::start_on(&data, "0.0.0.0", "127.0.0.1", &["--auth", "off"]).await;
    assert_eq!(
        post(
            &c,
            &s,
            "/naming/v1/instances",
            None,
            json!([inst("default", "api", 82)])
        )
        .await
        .0,
        200
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("REST authentication is OFF on a non-loopback address"),
        "{log}"
    );
}
