//! The Kubernetes controller in `polaris server --kubernetes`, against a loopback API server
//! speaking list + watch (EndpointSlice v1 included): Services and their endpoints reach the
//! registry, changes follow, ownership holds, and watch failures (410 Gone, dropped connections,
//! history lost) neither lose nor duplicate instances; a restart with nothing changed writes
//! nothing.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{get, post, Server};
use polaris_mesh::bench::kube_fake::FakeApi;
use serde_json::{json, Value};

fn recorded(name: &str) -> Value {
    let path = format!("{}/tests/kube/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The recorded objects: namespace `shop`, Service `echo`, its slice, pods and node.
fn seed(api: &FakeApi) {
    api.put("namespaces", recorded("namespace.json"));
    api.put("nodes", recorded("node.json"));
    for p in recorded("pods.json")["items"].as_array().unwrap() {
        api.put("pods", p.clone());
    }
    api.put("services", recorded("service.json"));
    api.put("endpointslices", recorded("endpointslice.json"));
}

/// `host:port isolate` of every instance of shop/echo.
async fn instances(c: &reqwest::Client, s: &Server) -> BTreeSet<String> {
    let (_, v) = get(
        c,
        &s.url("/naming/v1/instances?namespace=shop&service=echo"),
    )
    .await;
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{}:{} {}",
                        i["host"].as_str().unwrap(),
                        i["port"],
                        if i["isolate"].as_bool().unwrap_or(false) {
                            "isolated"
                        } else {
                            "ready"
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn until(c: &reqwest::Client, s: &Server, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|w| w.to_string()).collect();
    let start = Instant::now();
    loop {
        let got = instances(c, s).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: {got:?}, want {want:?}\n{}",
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ALL_FOUR: [&str; 4] = [
    "10.244.0.11:8080 ready",
    "10.244.0.11:9090 ready",
    "10.244.0.12:8080 isolated",
    "10.244.0.12:9090 isolated",
];

/// The server's flags for a controller of cluster `c1` on `api`.
fn flags(api: &FakeApi, dir: &tempfile::TempDir) -> Vec<String> {
    let kc = dir.path().join("kubeconfig");
    api.kubeconfig(&kc);
    [
        "--kubernetes",
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--cluster-name",
        "c1",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test]
async fn services_and_endpoint_slices_sync_and_follow_changes_through_watch_failures() {
    let api = FakeApi::start().await;
    seed(&api);
    let dir = tempfile::tempdir().unwrap();
    let flags = flags(&api, &dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut s = Server::start(&dir.path().join("d"), &flags).await;
    let c = reqwest::Client::new();
    until(&c, &s, &ALL_FOUR, "first sync").await;
    let (st, v) = get(&c, &s.url("/readyz")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["components"]["kubernetes-controller"], "ready");
    let (_, v) = get(&c, &s.url("/naming/v1/services?namespace=shop&name=echo")).await;
    assert_eq!(
        v["services"][0]["metadata"]["polarismesh.cn/tls-mode"], "strict",
        "Service labels are the service's metadata: {v}"
    );

    // An SDK registers next to the synced instances; it is never touched.
    let (st, b) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "shop", "service": "echo", "host": "10.9.9.9", "port": 7000}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let mut with_sdk: Vec<&str> = ALL_FOUR.to_vec();
    with_sdk.push("10.9.9.9:7000 ready");
    until(&c, &s, &with_sdk, "sdk instance").await;

    // The not-ready pod becomes ready.
    let mut slice = recorded("endpointslice.json");
    slice["endpoints"][1]["conditions"]["ready"] = json!(true);
    api.put("endpointslices", slice.clone());
    let ready = [
        "10.244.0.11:8080 ready",
        "10.244.0.11:9090 ready",
        "10.244.0.12:8080 ready",
        "10.244.0.12:9090 ready",
        "10.9.9.9:7000 ready",
    ];
    until(&c, &s, &ready, "endpoint ready").await;

    // Watches dropped while a pod goes away: resumed from their version, nothing lost.
    api.drop_watches();
    let mut fewer = slice.clone();
    fewer["endpoints"].as_array_mut().unwrap().remove(1);
    api.put("endpointslices", fewer.clone());
    let one = [
        "10.244.0.11:8080 ready",
        "10.244.0.11:9090 ready",
        "10.9.9.9:7000 ready",
    ];
    until(&c, &s, &one, "after a dropped watch").await;

    // History lost (410 Gone on resume) while the pod comes back: relisted, converged.
    let lists = api.requests().0;
    api.expire();
    let start = Instant::now();
    while api.requests().0 < lists + 5 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "410 made no watch relist"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.put("endpointslices", slice.clone());
    until(&c, &s, &ready, "after 410 Gone").await;

    // The Service is deleted: what the controller wrote goes, the SDK's instance stays.
    api.delete("services", "shop", "echo");
    until(&c, &s, &["10.9.9.9:7000 ready"], "service deleted").await;
    api.put("services", recorded("service.json"));
    until(&c, &s, &ready, "service back").await;

    // A restart with nothing changed: a full pass, no write.
    assert_eq!(s.terminate().code(), Some(0));
    let s2 = Server::start(&dir.path().join("d"), &flags).await;
    let start = Instant::now();
    while s2.metric("polaris_controller_passes_total").await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no pass after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s2.metric("polaris_controller_writes_total").await, 0);
    until(&c, &s2, &ready, "after restart").await;
}

/// A Service deleted while the controller is down is cleaned up when it starts: what this cluster
/// owns and no Service stands for goes; another cluster's instances stay.
#[tokio::test]
async fn what_no_service_stands_for_is_swept_at_start() {
    let api = FakeApi::start().await;
    seed(&api);
    let dir = tempfile::tempdir().unwrap();
    let flags = flags(&api, &dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut s = Server::start(&dir.path().join("d"), &flags).await;
    let c = reqwest::Client::new();
    until(&c, &s, &ALL_FOUR, "first sync").await;
    let (st, b) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "shop", "service": "echo", "host": "10.8.8.8", "port": 7000,
        "metadata": {"source": "kubernetes", "clusterName": "c2"}}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(s.terminate().code(), Some(0));
    api.delete("services", "shop", "echo");
    let _s2 = Server::start(&dir.path().join("d"), &flags).await;
    until(&c, &_s2, &["10.8.8.8:7000 ready"], "swept at start").await;
}

/// `polaris controller` in its own process, writing through the REST API of a server with
/// authentication on: the same sync, ownership and sweep, its writes counted by the server; a
/// restart writes nothing; a wrong token fails at once; the server refuses a malformed sync.
#[tokio::test]
async fn the_standalone_controller_syncs_through_rest() {
    let api = FakeApi::start().await;
    seed(&api);
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.kubeconfig(&kc);
    let admin = "controller-admin-0123456789abcdef";
    let token = dir.path().join("admin.token");
    std::fs::write(&token, admin).unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--auth",
            "on",
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await;
    let controller = |token_file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_polaris"))
            .args(["controller", "--server", &s.http, "--cluster-name", "c1"])
            .arg("--kubeconfig")
            .arg(&kc)
            .arg("--token-file")
            .arg(token_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("controller.log")).unwrap())
            .spawn()
            .unwrap()
    };
    // Authentication on: reads need the token too.
    let c = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::HeaderName::from_static("x-polaris-token"),
                reqwest::header::HeaderValue::from_static(admin),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();

    // A wrong token: the controller says so and exits, before watching anything.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-a-token").unwrap();
    let out = controller(&wrong).wait_with_output().unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(log.contains("reaching the control plane"), "{log}");

    let mut ctl = controller(&token);
    until(&c, &s, &ALL_FOUR, "first sync through REST").await;
    let (_, v) = get(&c, &s.url("/naming/v1/services?namespace=shop&name=echo")).await;
    assert_eq!(v["services"][0]["metadata"]["clusterName"], "c1", "{v}");
    let written = s.metric("polaris_controller_writes_total").await;
    assert!(
        written >= 6,
        "the server counts the controller's writes: {written}"
    );
    // A readiness change follows.
    let mut slice = recorded("endpointslice.json");
    slice["endpoints"][1]["conditions"]["ready"] = json!(true);
    api.put("endpointslices", slice);
    let ready = [
        "10.244.0.11:8080 ready",
        "10.244.0.11:9090 ready",
        "10.244.0.12:8080 ready",
        "10.244.0.12:9090 ready",
    ];
    until(&c, &s, &ready, "endpoint ready through REST").await;
    ctl.kill().unwrap();
    ctl.wait().unwrap();
    // A restart with nothing changed writes nothing; a Service deleted while it was down is swept.
    let before = s.metric("polaris_controller_writes_total").await;
    let passes = s.metric("polaris_controller_passes_total").await;
    let mut ctl = controller(&token);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.metric("polaris_controller_writes_total").await,
        before,
        "restart wrote something"
    );
    assert_eq!(passes, 0, "the server ran no controller of its own");
    api.delete("services", "shop", "echo");
    until(&c, &s, &[], "the deleted Service's instances are gone").await;
    ctl.kill().unwrap();
    ctl.wait().unwrap();

    // The server checks what it is sent: items naming another service, or instances without this
    // cluster's ownership keys, are refused whole, naming the field.
    let bad = json!({"clusterName": "c1", "items": [{"service": {"namespace": "shop", "name": "echo"},
        "desired": {"namespace": "shop", "name": "other", "metadata": {"source": "kubernetes", "clusterName": "c1"},
                    "alias": null, "instances": []}}]});
    let (st, v) = post(&c, &s.url("/controller/v1/sync"), bad).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["info"].as_str().unwrap().contains("items[0].desired"),
        "{v}"
    );
    let unowned = json!({"clusterName": "c1", "items": [{"service": {"namespace": "shop", "name": "echo"},
        "desired": {"namespace": "shop", "name": "echo", "metadata": {"source": "kubernetes", "clusterName": "c1"},
                    "alias": null, "instances": [{"namespace": "shop", "service": "echo", "host": "10.1.1.1", "port": 80}]}}]});
    let (st, v) = post(&c, &s.url("/controller/v1/sync"), unowned).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["info"]
            .as_str()
            .unwrap()
            .contains("items[0].desired.instances[0].metadata"),
        "{v}"
    );
    let (st, _) = post(
        &reqwest::Client::new(),
        &s.url("/controller/v1/sync"),
        json!({"clusterName": "c1", "items": []}),
    )
    .await;
    assert_eq!(st, 401, "no token, no sync");
}

/// Against the real kube-apiserver (1.20: no EndpointSlice v1, so Services sync without
/// instances): Namespaces and Services created for real reach the registry, and labelling a
/// Service `polarismesh.cn/tls-mode=strict` makes the service strict, as xDS then serves it.
#[tokio::test]
async fn a_service_label_on_a_real_apiserver_sets_the_tls_mode() {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let k = common::kube::TestKube::from_env();
    let client = k.client().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = k.kubeconfig(dir.path());
    let ns_name = format!("ctl-{}", std::process::id());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns_name);
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "pay", "labels": {"app": "pay"}},
        "spec": {"selector": {"app": "pay"}, "ports": [{"name": "http", "port": 80}]}}),
    )
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--kubernetes",
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--cluster-name",
            "real",
        ],
    )
    .await;
    let c = reqwest::Client::new();
    let meta = |c: reqwest::Client, url: String| async move {
        let (_, v) = get(&c, &url).await;
        v["services"][0]["metadata"].clone()
    };
    let url = s.url(&format!("/naming/v1/services?namespace={ns_name}&name=pay"));
    let start = Instant::now();
    while meta(c.clone(), url.clone()).await["app"] != "pay" {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "service not synced\n{}",
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svcs.patch(
        "pay",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"polarismesh.cn/tls-mode": "strict"}}})),
    )
    .await
    .unwrap();
    let start = Instant::now();
    while meta(c.clone(), url.clone()).await["polarismesh.cn/tls-mode"] != "strict" {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "label not synced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A sidecar of the namespace sees the service rolled out strict on both sides.
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let node = format!("sidecar~{ns_name}/web-0~127.0.0.1");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.clone(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut ads =
        AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", s.xds_port))
            .await
            .unwrap();
    let _stream = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let url = s.url(&format!("/debug/xds/config?node={node}&service=pay"));
    let start = Instant::now();
    loop {
        let (_, cfg) = get(&c, &url).await;
        let tls = &cfg["translation"][0]["tls"];
        if tls == &json!({"mode": "strict", "client": "strict", "server": "strict"}) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never strict: {cfg}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Api::<Namespace>::all(client)
        .delete(&ns_name, &Default::default())
        .await
        .unwrap();
}

/// Until its watches have listed, the controller keeps the server unready (`/readyz` 503 naming
/// it) while the server is alive (`/healthz`).
#[tokio::test]
async fn an_unreachable_api_server_keeps_the_server_unready_not_dead() {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    let nowhere = common::free_port();
    polaris_mesh::bench::kube_fake::write_kubeconfig(&kc, &format!("http://127.0.0.1:{nowhere}"));
    let s = Server::start(
        &dir.path().join("d"),
        &["--kubernetes", "--kubeconfig", kc.to_str().unwrap()],
    )
    .await;
    let c = reqwest::Client::new();
    let (st, _) = get(&c, &s.url("/healthz")).await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, v) = get(&c, &s.url("/readyz")).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["ready"], false);
    assert!(
        v["components"]["kubernetes-controller"]
            .as_str()
            .unwrap()
            .contains("listed"),
        "{v}"
    );
}
