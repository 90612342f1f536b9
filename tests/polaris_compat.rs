//! PolarisMesh REST compatibility, checked the way PolarisMesh's own Go client and integration
//! scenarios (`polaris/test/integrate`) use the API: requests as `jsonpb.Marshal` writes them
//! (each field under its `json_name`: `cmdb_mod1`, `logic_set`, `alias_namespace`, but
//! `healthCheck`), every answer decoded strictly into PolarisMesh's message shapes
//! (`compat/schema.rs`, written from its protos), and the codes and statuses its client checks.

mod common;
#[path = "compat/schema.rs"]
mod schema;

use common::Server;
use serde_json::{json, Value};

/// A client that checks every answer against PolarisMesh's messages.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(s: &Server) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: format!("{}/naming/v1", s.http),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        message: &str,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(&url),
            "PUT" => self.http.put(&url),
            _ => self.http.post(&url),
        }
        .header("Request-Id", "compat")
        .header("X-Polaris-Token", "unused-without-auth");
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        if let Err(e) = schema::check(message, &v) {
            panic!("{method} {path}: the answer does not decode as {message}: {e}\n{v}");
        }
        (status, v)
    }

    async fn write(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.send(method, path, Some(body), "BatchWriteResponse")
            .await
    }

    async fn query(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None, "BatchQueryResponse").await
    }
}

fn uuid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// `resource.CreateNamespaces()`.
fn namespaces() -> Vec<Value> {
    (0..2)
        .map(|i| json!({"name": format!("test-ns-{}-{i}", uuid()), "comment": "test", "owners": "test"}))
        .collect()
}

/// `resource.CreateServices(namespace)`.
fn services(ns: &str) -> Vec<Value> {
    (0..2)
        .map(|i| {
            json!({"name": format!("test-service-{}-{i}", uuid()), "namespace": ns,
                "metadata": {"test": "test"}, "ports": "8,8", "business": "test", "department": "test",
                "cmdb_mod1": "test", "cmdb_mod2": "test", "cmdb_mod3": "test", "comment": "test", "owners": "test"})
        })
        .collect()
}

/// `resource.CreateInstances(service)`.
fn instances(svc: &Value) -> Vec<Value> {
    (0..2)
        .map(|i| {
            json!({"service": svc["name"], "namespace": svc["namespace"], "host": format!("{i}.{i}.{i}.{i}"),
                "port": 8, "protocol": "test", "version": "8.8.8", "priority": 8, "weight": 8,
                "healthCheck": {"type": "HEARTBEAT", "heartbeat": {"ttl": 8}}, "healthy": false,
                "isolate": false, "metadata": {"test": "test"}, "logic_set": "test",
                "service_token": svc["token"]})
        })
        .collect()
}

/// `checkCreate*Response`: batch code, size and each item's code.
fn created(r: &(u16, Value), n: usize) {
    let (st, v) = r;
    assert_eq!((*st, &v["code"]), (200, &json!(200000)), "{v}");
    assert_eq!(v["size"], n, "{v}");
    for item in v["responses"].as_array().unwrap() {
        assert_eq!(item["code"], 200000, "{v}");
    }
}

#[tokio::test]
async fn namespaces_create_query_update_delete_as_polarismesh_does() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = Client::new(&s);
    let mut ns = namespaces();
    let r = c.write("POST", "/namespaces", json!(ns)).await;
    created(&r, 2);
    for (i, item) in r.1["responses"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["namespace"]["name"], ns[i]["name"]);
        let token = item["namespace"]["token"].as_str().unwrap();
        assert!(!token.is_empty(), "a created namespace carries its token");
        ns[i]["token"] = json!(token);
    }
    // `GetNamespaces`: the name parameter repeats.
    let q = format!(
        "/namespaces?name={}&name={}",
        ns[0]["name"].as_str().unwrap(),
        ns[1]["name"].as_str().unwrap()
    );
    let (st, v) = c.query(&q).await;
    assert_eq!(
        (st, &v["code"], &v["amount"], &v["size"]),
        (200, &json!(200000), &json!(2), &json!(2)),
        "{v}"
    );
    assert_eq!(v["namespaces"][0]["comment"], "test");
    // `UpdateNamesapces`: PUT, the whole object sent back with its token.
    for n in &mut ns {
        n["comment"] = json!("update");
        n["owners"] = json!("update");
    }
    let (st, v) = c.write("PUT", "/namespaces", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (_, v) = c.query(&q).await;
    for n in v["namespaces"].as_array().unwrap() {
        assert_eq!(
            (&n["comment"], &n["owners"]),
            (&json!("update"), &json!("update"))
        );
    }
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    // Deleting what is gone already succeeds.
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    // The built-in namespaces exist, under PolarisMesh's names.
    let (_, v) = c
        .query("/namespaces?name=Production&name=Development&name=Polaris&name=default")
        .await;
    assert_eq!(v["amount"], 4, "{v}");
    // An illegal name: the batch info is exactly PolarisMesh's English text (its i18n test).
    let (st, v) = c
        .write(
            "POST",
            "/namespaces?lang=en",
            json!([{"name": "+$#@+", "comment": "test", "owners": "test"}]),
        )
        .await;
    assert_eq!(
        (st, &v["code"], &v["info"]),
        (400, &json!(400110), &json!("invalid namespace name")),
        "{v}"
    );
    // Our addition: which field and why, in the item's info.
    assert!(
        v["responses"][0]["info"]
            .as_str()
            .unwrap()
            .contains("[0].name"),
        "{v}"
    );
}

#[tokio::test]
async fn namespace_counts_and_deletion_while_it_has_services() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = Client::new(&s);
    let ns = namespaces();
    created(&c.write("POST", "/namespaces", json!(ns)).await, 2);
    // `TestCountNamespaceService`.
    let svcs = services(ns[0]["name"].as_str().unwrap());
    let r = c.write("POST", "/services", json!(svcs)).await;
    created(&r, 2);
    let mut svcs_with_tokens = svcs.clone();
    for (i, item) in r.1["responses"].as_array().unwrap().iter().enumerate() {
        assert!(
            !item["service"]["token"].as_str().unwrap().is_empty(),
            "{item}"
        );
        svcs_with_tokens[i]["token"] = item["service"]["token"].clone();
    }
    for svc in &svcs_with_tokens {
        created(
            &c.write("POST", "/instances", json!(instances(svc))).await,
            2,
        );
    }
    let q = format!(
        "/namespaces?name={}&name={}",
        ns[0]["name"].as_str().unwrap(),
        ns[1]["name"].as_str().unwrap()
    );
    let (_, v) = c.query(&q).await;
    for n in v["namespaces"].as_array().unwrap() {
        let (services, insts) = if n["name"] == ns[0]["name"] {
            (2, 4)
        } else {
            (0, 0)
        };
        assert_eq!(
            (&n["total_service_count"], &n["total_instance_count"]),
            (&json!(services), &json!(insts)),
            "{n}"
        );
    }
    // `TestDeleteNamespaceWhenHaveService`: the batch is 400203 (HTTP 400), and the empty
    // namespace of the same batch is deleted.
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (400, &json!(400203)), "{v}");
    assert_eq!(v["responses"][0]["code"], 400203);
    assert_eq!(v["responses"][1]["code"], 200000);
    let (_, v) = c.query(&q).await;
    assert_eq!(v["amount"], 1, "{v}");
    // Instances first, then the services, then the namespace.
    for svc in &svcs_with_tokens {
        let (st, v) = c
            .write("POST", "/instances/delete", json!(instances(svc)))
            .await;
        assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    }
    let (st, v) = c
        .write("POST", "/services/delete", json!(svcs_with_tokens))
        .await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
}

fn compare_service(want: &Value, got: &Value) {
    for f in [
        "name",
        "namespace",
        "metadata",
        "ports",
        "business",
        "department",
        "cmdb_mod1",
        "cmdb_mod2",
        "cmdb_mod3",
        "comment",
    ] {
        assert_eq!(want[f], got[f], "service field {f}: {got}");
    }
}

#[tokio::test]
async fn services_create_query_update_delete_as_polarismesh_does() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = Client::new(&s);
    let ns = namespaces();
    created(&c.write("POST", "/namespaces", json!(ns)).await, 2);
    let nsname = ns[0]["name"].as_str().unwrap();
    let mut svcs = services(nsname);
    let r = c.write("POST", "/services", json!(svcs)).await;
    created(&r, 2);
    for (i, item) in r.1["responses"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (&item["service"]["name"], &item["service"]["namespace"]),
            (&svcs[i]["name"], &svcs[i]["namespace"])
        );
        svcs[i]["token"] = item["service"]["token"].clone();
    }
    let get = |svcs: Vec<Value>| {
        let c = &c;
        async move {
            let (st, v) = c.query(&format!("/services?namespace={nsname}")).await;
            assert_eq!(
                (st, &v["code"], &v["amount"], &v["size"]),
                (200, &json!(200000), &json!(2), &json!(2)),
                "{v}"
            );
            for got in v["services"].as_array().unwrap() {
                let want = svcs
                    .iter()
                    .find(|s| s["name"] == got["name"])
                    .expect("listed");
                compare_service(want, got);
            }
        }
    };
    get(svcs.clone()).await;
    // `resource.UpdateServices`: metadata replaced, every text field changed.
    for svc in &mut svcs {
        svc["metadata"] = json!({"update": "update"});
        for f in [
            "ports",
            "business",
            "department",
            "cmdb_mod1",
            "cmdb_mod2",
            "cmdb_mod3",
            "comment",
            "owners",
        ] {
            svc[f] = json!(if f == "ports" { "4,4" } else { "update" });
        }
    }
    let (st, v) = c.write("PUT", "/services", json!(svcs)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    get(svcs.clone()).await;
    let (st, v) = c.write("POST", "/services/delete", json!(svcs)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    // Codes of rejected service fields.
    let long = "s".repeat(129);
    let (st, v) = c
        .write(
            "POST",
            "/services",
            json!([{"name": long, "namespace": "default"}]),
        )
        .await;
    assert_eq!((st, &v["code"]), (400, &json!(400120)), "{v}");
    let (st, v) = c
        .write(
            "POST",
            "/services",
            json!([{"name": "x", "namespace": "+bad"}]),
        )
        .await;
    assert_eq!((st, &v["code"]), (400, &json!(400110)), "{v}");
}

fn compare_instance(want: &Value, got: &Value) {
    for f in [
        "id",
        "service",
        "namespace",
        "host",
        "port",
        "protocol",
        "version",
        "priority",
        "weight",
        "healthCheck",
        "healthy",
        "isolate",
        "metadata",
        "logic_set",
    ] {
        assert_eq!(want[f], got[f], "instance field {f}: {got}");
    }
}

async fn instance_scenario(c: &Client, create_services: bool) {
    let ns = namespaces();
    created(&c.write("POST", "/namespaces", json!(ns)).await, 2);
    let mut svcs = services(ns[0]["name"].as_str().unwrap());
    if create_services {
        let r = c.write("POST", "/services", json!(svcs)).await;
        created(&r, 2);
        for (i, item) in r.1["responses"].as_array().unwrap().iter().enumerate() {
            svcs[i]["token"] = item["service"]["token"].clone();
        }
    } else {
        // `TestInstanceWithoutService`: the service is created by the registration.
        for svc in &mut svcs {
            svc["name"] = json!(format!("WithoutService_{}", svc["name"].as_str().unwrap()));
        }
    }
    let mut insts = instances(&svcs[0]);
    let r = c.write("POST", "/instances", json!(insts)).await;
    created(&r, 2);
    for (i, item) in r.1["responses"].as_array().unwrap().iter().enumerate() {
        let got = &item["instance"];
        assert!(!got["id"].as_str().unwrap().is_empty());
        for f in ["service", "namespace", "host", "port"] {
            assert_eq!(got[f], insts[i][f], "{f}: {item}");
        }
        // A health check sent turns it on, as PolarisMesh echoes.
        assert_eq!(got["enableHealthCheck"], true, "{item}");
        insts[i]["id"] = got["id"].clone();
    }
    let q = format!(
        "/instances?service={}&namespace={}",
        insts[0]["service"].as_str().unwrap(),
        insts[0]["namespace"].as_str().unwrap()
    );
    let get = |insts: Vec<Value>| {
        let (c, q) = (c, q.clone());
        async move {
            let (st, v) = c.query(&q).await;
            assert_eq!(
                (st, &v["code"], &v["amount"], &v["size"]),
                (200, &json!(200000), &json!(2), &json!(2)),
                "{v}"
            );
            for got in v["instances"].as_array().unwrap() {
                let want = insts.iter().find(|i| i["id"] == got["id"]).expect("listed");
                compare_instance(want, got);
            }
        }
    };
    get(insts.clone()).await;
    // `resource.UpdateInstances`, sent back whole with id and service token.
    for i in &mut insts {
        i["protocol"] = json!("update");
        i["version"] = json!("4.4.4");
        i["priority"] = json!(4);
        i["weight"] = json!(4);
        i["metadata"] = json!({"update": "update"});
        i["logic_set"] = json!("update");
    }
    let (st, v) = c.write("PUT", "/instances", json!(insts)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    get(insts.clone()).await;
    let (st, v) = c.write("POST", "/instances/delete", json!(insts)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (st, v) = c.write("POST", "/services/delete", json!(svcs)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (st, v) = c.write("POST", "/namespaces/delete", json!(ns)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
}

#[tokio::test]
async fn instances_create_query_update_delete_as_polarismesh_does() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = Client::new(&s);
    instance_scenario(&c, true).await;
    instance_scenario(&c, false).await;
    // Codes of rejected instance fields.
    let (st, v) = c
        .write(
            "POST",
            "/instances",
            json!([{"service": "a", "namespace": "default", "host": "h", "port": 0}]),
        )
        .await;
    assert_eq!((st, &v["code"]), (400, &json!(400132)), "{v}");
    let (st, v) = c
        .write(
            "POST",
            "/instances",
            json!([{"service": "a", "namespace": "default", "host": "not a host", "port": 80}]),
        )
        .await;
    assert_eq!((st, &v["code"]), (400, &json!(400131)), "{v}");
}

#[tokio::test]
async fn aliases_as_polarismesh_does() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = Client::new(&s);
    let ns = namespaces();
    created(&c.write("POST", "/namespaces", json!(ns)).await, 2);
    let (src_ns, alias_ns) = (
        ns[0]["name"].as_str().unwrap(),
        ns[1]["name"].as_str().unwrap(),
    );
    let svcs = services(src_ns);
    created(&c.write("POST", "/services", json!(svcs)).await, 2);
    let svc = svcs[0]["name"].as_str().unwrap();
    // One alias, in another namespace: `alias_namespace` as PolarisMesh's client sends it.
    let body = json!({"service": svc, "namespace": src_ns, "alias": "the-alias", "alias_namespace": alias_ns,
                      "owners": "test", "comment": "test"});
    let (st, v) = c
        .send("POST", "/service/alias", Some(body.clone()), "Response")
        .await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let a = &v["alias"];
    assert_eq!(
        (
            &a["alias"],
            &a["alias_namespace"],
            &a["service"],
            &a["namespace"]
        ),
        (
            &json!("the-alias"),
            &json!(alias_ns),
            &json!(svc),
            &json!(src_ns)
        ),
        "{v}"
    );
    // It lives in the alias namespace, is listed as an alias, and not as a service.
    let (_, v) = c
        .query(&format!("/service/aliases?alias_namespace={alias_ns}"))
        .await;
    assert_eq!(v["amount"], 1, "{v}");
    let (_, v) = c.query(&format!("/services?namespace={alias_ns}")).await;
    assert_eq!(v["amount"], 0, "{v}");
    let (_, v) = c.query(&format!("/services?namespace={src_ns}")).await;
    assert_eq!(v["amount"], 2, "{v}");
    // The same again: existed resource.
    let (st, v) = c
        .send("POST", "/service/alias", Some(body), "Response")
        .await;
    assert_eq!((st, &v["code"]), (400, &json!(400201)), "{v}");
    // An alias of the alias: only source services take aliases.
    let (st, v) = c.send("POST", "/service/alias", Some(json!({"service": "the-alias", "namespace": alias_ns, "alias": "second", "alias_namespace": alias_ns})), "Response").await;
    assert_eq!((st, &v["code"]), (400, &json!(400504)), "{v}");
    // No such source service.
    let (st, v) = c.send("POST", "/service/alias", Some(json!({"service": "missing", "namespace": src_ns, "alias": "x", "alias_namespace": alias_ns})), "Response").await;
    assert_eq!((st, &v["code"]), (400, &json!(400301)), "{v}");
    // Alias name and comment too long.
    let (st, v) = c.send("POST", "/service/alias", Some(json!({"service": svc, "namespace": src_ns, "alias": "a".repeat(129), "alias_namespace": alias_ns})), "Response").await;
    assert_eq!((st, &v["code"]), (400, &json!(400133)), "{v}");
    let (st, v) = c.send("POST", "/service/alias", Some(json!({"service": svc, "namespace": src_ns, "alias": "ok", "alias_namespace": alias_ns, "comment": "c".repeat(1025)})), "Response").await;
    assert_eq!((st, &v["code"]), (400, &json!(400129)), "{v}");
    // A service with an alias is not deleted; the alias goes first.
    let (st, v) = c.write("POST", "/services/delete", json!([svcs[0]])).await;
    assert_eq!((st, &v["code"]), (400, &json!(400210)), "{v}");
    let (st, v) = c
        .write(
            "POST",
            "/service/aliases/delete",
            json!([{"alias": "the-alias", "alias_namespace": alias_ns}]),
        )
        .await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
    let (st, v) = c.write("POST", "/services/delete", json!(svcs)).await;
    assert_eq!((st, &v["code"]), (200, &json!(200000)), "{v}");
}

/// The checker fails where a strict protobuf JSON decoder fails.
#[test]
fn the_schema_check_rejects_what_a_strict_decoder_rejects() {
    assert!(schema::check("Service", &json!({"name": "a", "protocol": "grpc"})).is_err());
    assert!(schema::check("BatchWriteResponse", &json!({"code": 400000, "field": "x"})).is_err());
    assert!(schema::check("Service", &json!({"totalInstanceCount": 1})).is_err());
    assert!(schema::check("Instance", &json!({"port": "eighty"})).is_err());
    assert!(schema::check("Instance", &json!({"healthCheck": {"type": "HTTP"}})).is_err());
    assert!(schema::check(
        "BatchQueryResponse",
        &json!({"services": [{"aliasFor": {}}]})
    )
    .is_err());
    // Both names of a field decode.
    assert!(schema::check(
        "Instance",
        &json!({"enable_health_check": true, "enableHealthCheck": true, "logic_set": "x"})
    )
    .is_ok());
    assert!(schema::check("ServiceAlias", &json!({"alias_namespace": "x"})).is_ok());
}
