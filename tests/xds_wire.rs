//! Wire-level xDS protocol tests: a scripted tonic client against the real binary. Test names carry
//! the behaviour numbers of the xDS checklist (W).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{post, Server};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const QUIET: Duration = Duration::from_millis(300);

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

fn cname(svc: &str) -> String {
    format!("OUTBOUND|default|{svc}")
}

async fn reg(c: &reqwest::Client, s: &Server, svc: &str, port: u16) {
    let (st, b) = post(
        c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

async fn dereg(c: &reqwest::Client, s: &Server, svc: &str, port: u16) {
    let (st, b) = post(
        c,
        &s.url("/naming/v1/instances/delete"),
        json!([{"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

async fn del_service(c: &reqwest::Client, s: &Server, svc: &str) {
    let (st, b) = post(
        c,
        &s.url("/naming/v1/services/delete"),
        json!([{"namespace": "default", "name": svc}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(s: &Server) -> Sotw {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", s.xds_port))
                .await
                .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Sotw { tx, rx }
    }

    async fn send(
        &self,
        node: Option<Node>,
        type_url: &str,
        names: &[&str],
        version: &str,
        nonce: &str,
    ) {
        self.tx
            .send(DiscoveryRequest {
                node,
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, type_url: &str, version: &str, nonce: &str) {
        self.tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "rejected by test".into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("no response within 5 s")
            .unwrap()
            .expect("stream ended")
    }

    async fn quiet(&mut self) -> Option<DiscoveryResponse> {
        match tokio::time::timeout(QUIET, self.rx.message()).await {
            Err(_) => None,
            Ok(r) => r.ok().flatten(),
        }
    }

    /// Receives and ACKs the next response.
    async fn recv_ack(&mut self, names: &[&str]) -> DiscoveryResponse {
        let r = self.recv().await;
        self.send(None, &r.type_url, names, &r.version_info, &r.nonce)
            .await;
        r
    }
}

fn cluster_names(r: &DiscoveryResponse) -> Vec<String> {
    use prost::Message;
    let mut v: Vec<String> = r
        .resources
        .iter()
        .map(|a| {
            if a.type_url == CDS {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                    .unwrap()
                    .name
            } else if a.type_url == EDS {
                envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                    a.value.as_slice(),
                )
                .unwrap()
                .cluster_name
            } else {
                envoy_types::pb::envoy::config::listener::v3::Listener::decode(a.value.as_slice())
                    .unwrap()
                    .name
            }
        })
        .collect();
    v.sort();
    v
}

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(s: &Server) -> Delta {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", s.xds_port))
                .await
                .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Delta { tx, rx }
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn sub(&self, node: Option<Node>, type_url: &str, sub: &[&str], unsub: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            node,
            type_url: type_url.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("no response within 5 s")
            .unwrap()
            .expect("stream ended")
    }

    async fn recv_ack(&mut self) -> DeltaDiscoveryResponse {
        let r = self.recv().await;
        self.ack(&r).await;
        r
    }

    async fn quiet(&mut self) -> Option<DeltaDiscoveryResponse> {
        match tokio::time::timeout(QUIET, self.rx.message()).await {
            Err(_) => None,
            Ok(r) => r.ok().flatten(),
        }
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
    v.sort();
    v
}

/// Waits until the xDS snapshot reflects every registry write so far.
async fn settle(c: &reqwest::Client, s: &Server) {
    for _ in 0..500 {
        let (_, v) = common::get(c, &s.url("/debug/xds/nodes")).await;
        if v["snapshot"]["revision"] == v["registryRevision"] && v["snapshot"]["retiring"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("snapshot never caught up with the registry");
}

async fn server_with(svcs: &[&str]) -> (tempfile::TempDir, Server, reqwest::Client) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]).await;
    let c = reqwest::Client::new();
    for (i, svc) in svcs.iter().enumerate() {
        reg(&c, &s, svc, 9000 + i as u16).await;
    }
    settle(&c, &s).await;
    (dir, s, c)
}

#[tokio::test]
async fn b01_node_on_first_request_only_and_a_changed_node_is_rejected() {
    let (_d, s, _c) = server_with(&["a"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n1")), CDS, &[], "", "").await;
    let r = x.recv().await;
    // Later requests without node are fine.
    x.send(None, EDS, &[&cname("a")], "", "").await;
    let e = x.recv().await;
    assert_eq!(cluster_names(&e), vec![cname("a")]);
    x.send(None, CDS, &[], &r.version_info, &r.nonce).await;
    assert!(x.quiet().await.is_none());
    // A different node on the same stream is an error.
    x.send(Some(node("n2")), CDS, &[], &r.version_info, &r.nonce)
        .await;
    let err = tokio::time::timeout(Duration::from_secs(5), x.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // And a stream whose first request has no node is refused.
    let mut y = Sotw::open(&s).await;
    y.send(None, CDS, &[], "", "").await;
    let err = tokio::time::timeout(Duration::from_secs(5), y.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn b02_b03_unique_nonces_changing_versions_and_no_response_storm() {
    let (_d, s, c) = server_with(&["a"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), CDS, &[], "", "").await;
    let r1 = x.recv_ack(&[]).await;
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());
    // K identical ACKs: zero responses.
    for _ in 0..5 {
        x.send(None, CDS, &[], &r1.version_info, &r1.nonce).await;
    }
    assert!(
        x.quiet().await.is_none(),
        "response storm on unchanged ACKs"
    );
    reg(&c, &s, "b", 9100).await;
    let r2 = x.recv_ack(&[]).await;
    assert_ne!(r2.nonce, r1.nonce);
    assert_ne!(r2.version_info, r1.version_info);
    assert_eq!(cluster_names(&r2), vec![cname("a"), cname("b")]);
}

#[tokio::test]
async fn b04_nack_is_not_answered_with_the_same_version() {
    let (_d, s, c) = server_with(&["a"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), CDS, &[], "", "").await;
    let r = x.recv().await;
    x.nack(CDS, "", &r.nonce).await;
    assert!(x.quiet().await.is_none(), "rejected version was resent");
    let (_, nodes) = common::get(&c, &s.url("/debug/xds/nodes")).await;
    assert_eq!(
        nodes["nodes"][0]["types"]["CDS"]["lastNack"],
        "rejected by test"
    );
    let m = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("polaris_xds_nacks_total 1"), "{m}");
    // Other types keep being served.
    x.send(None, EDS, &[&cname("a")], "", "").await;
    assert_eq!(cluster_names(&x.recv().await), vec![cname("a")]);
    // A new input produces a new version.
    reg(&c, &s, "b", 9100).await;
    let r2 = x.recv().await;
    assert_eq!(r2.type_url, CDS);
    assert_ne!(r2.version_info, r.version_info);
}

#[tokio::test]
async fn b05_stale_nonce_ignored_in_sotw_applied_in_delta() {
    let (_d, s, c) = server_with(&["a", "b"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), EDS, &[&cname("a")], "", "").await;
    let r1 = x.recv().await;
    x.send(None, EDS, &[&cname("a")], &r1.version_info, &r1.nonce)
        .await;
    reg(&c, &s, "a", 9200).await;
    let r2 = x.recv().await;
    // A request carrying the older nonce is stale: even a new name gets no response.
    x.send(
        None,
        EDS,
        &[&cname("a"), &cname("b")],
        &r1.version_info,
        &r1.nonce,
    )
    .await;
    assert!(x.quiet().await.is_none(), "answered a stale nonce");
    x.send(
        None,
        EDS,
        &[&cname("a"), &cname("b")],
        &r2.version_info,
        &r2.nonce,
    )
    .await;
    assert_eq!(cluster_names(&x.recv().await), vec![cname("b")]);

    // Delta: subscription changes apply even with a stale nonce.
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), EDS, &[&cname("a")], &[]).await;
    let first = d.recv_ack().await;
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        response_nonce: "stale".into(),
        resource_names_subscribe: vec![cname("b")],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(names(&r), vec![cname("b")]);
    assert_ne!(r.nonce, first.nonce);
}

#[tokio::test]
async fn b06_versions_are_per_type() {
    let (_d, s, c) = server_with(&["a"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), CDS, &[], "", "").await;
    let cds = x.recv_ack(&[]).await;
    x.send(None, EDS, &[&cname("a")], "", "").await;
    let eds = x.recv().await;
    assert_eq!(eds.type_url, EDS);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, nodes) = common::get(&c, &s.url("/debug/xds/nodes")).await;
    let t = &nodes["nodes"][0]["types"];
    assert_eq!(t["CDS"]["versionAcked"], cds.version_info.as_str());
    assert_eq!(t["EDS"]["versionAcked"], "", "EDS not ACKed yet: {t}");
}

#[tokio::test]
async fn b07_wildcard_sequence_sotw_and_delta() {
    let (_d, s, _c) = server_with(&["a", "b"]).await;
    let mut x = Sotw::open(&s).await;
    // 1. Legacy wildcard: empty names → everything.
    x.send(Some(node("n")), CDS, &[], "", "").await;
    let r = x.recv_ack(&[]).await;
    assert_eq!(cluster_names(&r), vec![cname("a"), cname("b")]);
    // 2. Naming a resource ends the wildcard.
    let a = cname("a");
    x.send(None, CDS, &[&a], &r.version_info, &r.nonce).await;
    let r = x.recv_ack(&[&a]).await;
    assert_eq!(cluster_names(&r), vec![cname("a")]);
    // 3. Empty after naming means nothing (not wildcard).
    x.send(None, CDS, &[], &r.version_info, &r.nonce).await;
    let r = x.recv().await;
    assert!(r.resources.is_empty());
    // 4. `*` plus a name: everything.
    x.send(None, CDS, &["*", &a], &r.version_info, &r.nonce)
        .await;
    let r = x.recv().await;
    assert_eq!(cluster_names(&r), vec![cname("a"), cname("b")]);

    // Delta: empty first subscribe is wildcard; explicit `*` removal stops it.
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), CDS, &[], &[]).await;
    assert_eq!(names(&d.recv_ack().await), vec![cname("a"), cname("b")]);
    d.sub(None, CDS, &[&a], &["*"]).await;
    let r = d.recv_ack().await;
    assert_eq!(r.removed_resources, vec![cname("b")]);
}

#[tokio::test]
async fn b08_sotw_cds_carries_the_full_set_and_an_empty_set_is_sent() {
    let (_d, s, c) = server_with(&["a", "b"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), CDS, &[], "", "").await;
    x.recv_ack(&[]).await;
    reg(&c, &s, "a", 9300).await; // touches only a's endpoints: no CDS change
    assert!(x.quiet().await.is_none());
    dereg(&c, &s, "b", 9001).await;
    del_service(&c, &s, "b").await;
    let r = x.recv_ack(&[]).await;
    assert_eq!(cluster_names(&r), vec![cname("a")]);
    dereg(&c, &s, "a", 9000).await;
    dereg(&c, &s, "a", 9300).await;
    del_service(&c, &s, "a").await;
    let r = x.recv().await;
    assert_eq!(r.type_url, CDS);
    assert!(r.resources.is_empty(), "all removed: an empty CDS response");
}

#[tokio::test]
async fn b09_b24_sotw_eds_names_and_additions() {
    let (_d, s, _c) = server_with(&["a", "b", "c"]).await;
    let mut x = Sotw::open(&s).await;
    // Several names in one request.
    let (a, b, c3) = (cname("a"), cname("b"), cname("c"));
    x.send(Some(node("n")), EDS, &[&a, &b], "", "").await;
    let r = x.recv_ack(&[&a, &b]).await;
    assert_eq!(cluster_names(&r), vec![a.clone(), b.clone()]);
    // Adding a name answers at once with it, unchanged as it is.
    x.send(None, EDS, &[&a, &b, &c3], &r.version_info, &r.nonce)
        .await;
    let r = x.recv_ack(&[&a, &b, &c3]).await;
    assert!(cluster_names(&r).contains(&c3));
    assert!(x.quiet().await.is_none());
    // Dropping a name then adding it back re-sends it.
    x.send(None, EDS, &[&a], &r.version_info, &r.nonce).await;
    let _ = x.quiet().await;
    let mut x2 = Sotw::open(&s).await;
    x2.send(Some(node("m")), EDS, &[&a], "", "").await;
    let r = x2.recv_ack(&[&a]).await;
    x2.send(None, EDS, &[&a, &b], &r.version_info, &r.nonce)
        .await;
    assert!(cluster_names(&x2.recv().await).contains(&b));
}

#[tokio::test]
async fn b10_missing_names_are_remembered_and_pushed_on_creation() {
    let (_d, s, c) = server_with(&["a"]).await;
    let x_name = cname("later");
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), EDS, &[&x_name], "", "").await;
    assert!(
        x.quiet().await.is_none(),
        "SotW answers nothing for a missing name"
    );
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), EDS, &[&x_name], &[]).await;
    let r = d.recv_ack().await;
    assert_eq!(
        r.removed_resources,
        vec![x_name.clone()],
        "delta says it does not exist"
    );
    reg(&c, &s, "later", 9400).await;
    assert_eq!(cluster_names(&x.recv().await), vec![x_name.clone()]);
    assert_eq!(names(&d.recv().await), vec![x_name]);
}

#[tokio::test]
async fn b11_delta_sends_only_changes_removals_and_accepts_phantom_unsubscribe() {
    let (_d, s, c) = server_with(&["a", "b"]).await;
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), CDS, &[], &[]).await;
    assert_eq!(names(&d.recv_ack().await).len(), 2);
    d.sub(None, EDS, &[&cname("a"), &cname("b")], &[]).await;
    assert_eq!(names(&d.recv_ack().await).len(), 2);
    reg(&c, &s, "a", 9500).await;
    let r = d.recv_ack().await;
    assert_eq!((r.type_url.as_str(), names(&r)), (EDS, vec![cname("a")]));
    // Phantom unsubscribe: accepted silently.
    d.sub(None, EDS, &[], &[&cname("never")]).await;
    assert!(d.quiet().await.is_none());
    // Deleting a service removes its cluster and load assignment.
    dereg(&c, &s, "b", 9001).await;
    del_service(&c, &s, "b").await;
    let mut removed = HashMap::new();
    while removed.len() < 2 {
        let r = d.recv_ack().await;
        if !r.removed_resources.is_empty() {
            removed.insert(r.type_url.clone(), r.removed_resources.clone());
        }
    }
    assert_eq!(removed[CDS], vec![cname("b")]);
    assert_eq!(removed[EDS], vec![cname("b")]);
    // `*` plus a name; dropping the name while `*` covers it re-sends it.
    let mut w = Delta::open(&s).await;
    w.sub(Some(node("w")), CDS, &["*", &cname("a")], &[]).await;
    w.recv_ack().await;
    w.sub(None, CDS, &[], &[&cname("a")]).await;
    assert_eq!(names(&w.recv().await), vec![cname("a")]);
}

const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// B11: an instance that comes up on, or leaves, a new port changes its load assignment only; the
/// route configuration (every virtual host of the namespace) is not sent again.
#[tokio::test]
async fn b11_an_instance_on_a_new_port_sends_eds_and_no_route_configuration() {
    let (_d, s, c) = server_with(&["a", "b"]).await;
    // Delta, subscribed like Envoy: CDS and LDS wildcard, EDS and RDS by name.
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), CDS, &[], &[]).await;
    d.recv_ack().await;
    d.sub(None, EDS, &[&cname("a"), &cname("b")], &[]).await;
    d.recv_ack().await;
    d.sub(None, LDS, &[], &[]).await;
    d.recv_ack().await;
    d.sub(None, RDS, &["polaris-outbound-router"], &[]).await;
    assert_eq!(d.recv_ack().await.type_url, RDS);
    // SotW, likewise.
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("x")), CDS, &[], "", "").await;
    x.recv_ack(&[]).await;
    let eds = [cname("a"), cname("b")];
    let eds: Vec<&str> = eds.iter().map(String::as_str).collect();
    x.send(None, EDS, &eds, "", "").await;
    x.recv_ack(&eds).await;
    x.send(None, RDS, &["polaris-outbound-router"], "", "")
        .await;
    assert_eq!(x.recv_ack(&["polaris-outbound-router"]).await.type_url, RDS);
    assert!(d.quiet().await.is_none() && x.quiet().await.is_none());
    for (change, port) in [("up on a new port", 9700), ("down, the last on it", 9700)] {
        if change.starts_with("up") {
            reg(&c, &s, "a", port).await;
        } else {
            dereg(&c, &s, "a", port).await;
        }
        let r = d.recv_ack().await;
        assert_eq!(
            (r.type_url.as_str(), names(&r)),
            (EDS, vec![cname("a")]),
            "{change}"
        );
        let r = x.recv_ack(&eds).await;
        assert_eq!(
            (r.type_url.as_str(), cluster_names(&r)),
            (EDS, vec![cname("a")]),
            "{change}"
        );
        if let Some(r) = d.quiet().await {
            panic!("{change}: delta got another response: {}", r.type_url);
        }
        if let Some(r) = x.quiet().await {
            panic!("{change}: SotW got another response: {}", r.type_url);
        }
    }
}

#[tokio::test]
async fn b12_delta_reconnect_honours_initial_resource_versions() {
    let (_d, s, c) = server_with(&["a", "b", "c"]).await;
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), CDS, &[], &[]).await;
    let r = d.recv_ack().await;
    let versions: HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    assert_eq!(versions.len(), 3);
    drop(d);
    // While disconnected: c disappears, b changes.
    dereg(&c, &s, "c", 9002).await;
    del_service(&c, &s, "c").await;
    let (st, _) = common::put(
        &c,
        &s.url("/naming/v1/services"),
        json!([{"namespace": "default", "name": "b", "protocol": "grpc"}]),
    )
    .await;
    assert_eq!(st, 200);
    settle(&c, &s).await;
    let mut d = Delta::open(&s).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: CDS.into(),
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(
        names(&r),
        vec![cname("b")],
        "only the changed one is resent"
    );
    assert_eq!(r.removed_resources, vec![cname("c")]);
}

#[tokio::test]
async fn b13_no_response_names_a_resource_twice() {
    let (_d, s, _c) = server_with(&["a", "b", "c", "d"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(
        Some(node("n")),
        CDS,
        &["*", &cname("a"), &cname("a")],
        "",
        "",
    )
    .await;
    let r = x.recv().await;
    let n = cluster_names(&r);
    let uniq: HashSet<_> = n.iter().collect();
    assert_eq!(n.len(), uniq.len());
    assert_eq!(n.len(), 4);
}

#[tokio::test]
async fn b21_reconnect_gets_full_state_and_old_nonces_are_stale() {
    let (_d, s, c) = server_with(&["a", "b"]).await;
    let mut x = Sotw::open(&s).await;
    x.send(Some(node("n")), CDS, &[], "", "").await;
    let r = x.recv_ack(&[]).await;
    drop(x);
    // An old version: the full state.
    reg(&c, &s, "c", 9100).await;
    settle(&c, &s).await;
    let mut y = Sotw::open(&s).await;
    y.send(Some(node("n")), CDS, &[], &r.version_info, "").await;
    let r2 = y.recv().await;
    assert_eq!(cluster_names(&r2), vec![cname("a"), cname("b"), cname("c")]);
    drop(y);
    // The version of exactly what it should hold (versions are content hashes: the same from any
    // server): nothing to send until something changes.
    let mut z = Sotw::open(&s).await;
    z.send(Some(node("n")), CDS, &[], &r2.version_info, "")
        .await;
    assert!(z.quiet().await.is_none(), "resent what the client holds");
    reg(&c, &s, "d", 9101).await;
    let r3 = z.recv().await;
    assert_eq!(
        cluster_names(&r3),
        vec![cname("a"), cname("b"), cname("c"), cname("d")]
    );
    assert_ne!(r3.version_info, r2.version_info);
    drop(z);
    let mut y = Sotw::open(&s).await;
    y.send(Some(node("n")), CDS, &[], "", "").await;
    let r2 = y.recv().await;
    assert_eq!(cluster_names(&r2).len(), 4);
    // Listener wildcard works on the new stream too.
    y.send(None, LDS, &[], "", "").await;
    let l = y.recv().await;
    assert_eq!(cluster_names(&l), vec!["OUTBOUND_15001".to_string()]);
}

#[tokio::test]
async fn b22_a_client_that_does_not_read_does_not_block_others() {
    let (_d, s, c) = server_with(&["a"]).await;
    // The stalled client subscribes and never reads again.
    let stalled = Delta::open(&s).await;
    stalled.sub(Some(node("stalled")), CDS, &[], &[]).await;
    stalled.sub(None, EDS, &[&cname("a")], &[]).await;
    let mut live = Delta::open(&s).await;
    live.sub(Some(node("live")), EDS, &[&cname("a")], &[]).await;
    live.recv_ack().await;
    // Many changes with large metadata fill the stalled stream's window.
    let big = "x".repeat(4000);
    for i in 0..60u16 {
        let md: serde_json::Map<String, serde_json::Value> =
            (0..16).map(|k| (format!("k{k}"), json!(big))).collect();
        let (st, _) = post(&c, &s.url("/naming/v1/instances"), json!([{"namespace": "default", "service": "a", "host": "127.0.0.1", "port": 10000 + i, "metadata": md}])).await;
        assert_eq!(st, 200);
        let r = live.recv_ack().await;
        assert_eq!(names(&r), vec![cname("a")]);
    }
    // The server still answers promptly.
    let (st, _) = common::get(&c, &s.url("/healthz")).await;
    assert_eq!(st, 200);
    // A stream whose state machine is parked behind flow control still leaves the admin view when
    // its client goes away.
    assert_eq!(connected(&c, &s).await, vec!["live", "stalled"]);
    drop(stalled);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while connected(&c, &s).await != vec!["live"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled stream is still listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Node ids of the connected streams, sorted.
async fn connected(c: &reqwest::Client, s: &Server) -> Vec<String> {
    let (_, nodes) = common::get(c, &s.url("/debug/xds/nodes")).await;
    let mut ids: Vec<String> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node"]["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

fn on_demand_node(id: &str) -> Node {
    on_demand_node_of(id, None)
}

/// An on-demand node, a sidecar of `service` when given.
fn on_demand_node_of(id: &str, service: Option<&str>) -> Node {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let mut fields = std::collections::HashMap::new();
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    fields.insert(
        "sidecar.polarismesh.cn/openOnDemand".to_string(),
        text("true"),
    );
    if let Some(svc) = service {
        fields.insert("sidecar.polarismesh.cn/serviceName".to_string(), text(svc));
    }
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

#[tokio::test]
async fn b18_vhds_answers_known_hosts_with_aliases_and_unknown_hosts_without_body() {
    const VHDS: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    let (_d, s, c) = server_with(&["echo"]).await;
    let mut d = Delta::open(&s).await;
    d.sub(
        Some(on_demand_node("od")),
        RDS,
        &["polaris-on-demand-router"],
        &[],
    )
    .await;
    let r = d.recv_ack().await;
    use prost::Message;
    let rc = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
        r.resources[0].resource.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    assert!(rc.virtual_hosts.is_empty() && rc.vhds.is_some(), "{rc:?}");
    let (known, unknown) = (
        "polaris-on-demand-router/echo.default",
        "polaris-on-demand-router/nope.default",
    );
    d.sub(None, VHDS, &[known, unknown], &[]).await;
    let r = d.recv_ack().await;
    assert_eq!(r.type_url, VHDS);
    let k = r
        .resources
        .iter()
        .find(|x| x.name == known)
        .expect("known host answered");
    assert_eq!(k.aliases, vec![known.to_string()]);
    let vh = envoy_types::pb::envoy::config::route::v3::VirtualHost::decode(
        k.resource.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    assert!(vh.domains.contains(&"echo.default".to_string()));
    let u = r
        .resources
        .iter()
        .find(|x| x.name == unknown)
        .expect("unknown host answered");
    assert_eq!(u.aliases, vec![unknown.to_string()]);
    assert!(u.resource.is_none(), "unknown host gets no body");
    // The host appears later: pushed with a body.
    reg(&c, &s, "nope", 9600).await;
    let r = d.recv_ack().await;
    let u = r
        .resources
        .iter()
        .find(|x| x.name == unknown)
        .expect("pushed on creation");
    assert!(u.resource.is_some());
    // A host with a port, or in capitals, is the service's host.
    let with_port = "polaris-on-demand-router/Echo.Default:8080";
    d.sub(None, VHDS, &[with_port], &[]).await;
    let r = d.recv_ack().await;
    let p = r
        .resources
        .iter()
        .find(|x| x.name == with_port)
        .expect("answered");
    assert_eq!(p.aliases, vec![with_port.to_string()]);
    assert!(p.resource.is_some(), "a host with a port is known");
}

/// An on-demand sidecar gets, through VHDS, the host its caller's routing rules give it (as a
/// sidecar with a route configuration does), and the rule's changes.
#[tokio::test]
async fn b18_vhds_answers_a_caller_with_its_own_host() {
    const VHDS: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
    use prost::Message;
    let (_d, s, c) = server_with(&["echo"]).await;
    let (st, b) = post(&c, &s.url("/naming/v1/instances"), json!([{"namespace": "default", "service": "echo", "host": "127.0.0.2", "port": 9000, "metadata": {"version": "v2"}}])).await;
    assert_eq!(st, 200, "{b}");
    let rule = |caller: &str| {
        json!({"name": "web-v2", "namespace": "default", "enable": true, "routing_policy": "RulePolicy",
        "routing_config": {"rules": [{"sources": [{"service": caller, "namespace": "default"}],
            "destinations": [{"service": "echo", "namespace": "default", "weight": 100, "labels": {"version": {"type": "EXACT", "value": "v2"}}}]}]}})
    };
    let (st, created) = post(&c, &s.url("/naming/v2/routings"), json!([rule("web")])).await;
    assert_eq!(st, 200, "{created}");
    let id = created["responses"][0]["data"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    settle(&c, &s).await;
    let clusters = |r: &envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse| {
        let vh = envoy_types::pb::envoy::config::route::v3::VirtualHost::decode(
            r.resources[0].resource.as_ref().unwrap().value.as_slice(),
        )
        .unwrap();
        format!("{:?}", vh.routes)
    };
    let host = "polaris-on-demand-router/echo.default";
    let mut web = Delta::open(&s).await;
    web.sub(
        Some(on_demand_node_of("web-0", Some("web"))),
        VHDS,
        &[host],
        &[],
    )
    .await;
    let r = web.recv_ack().await;
    assert!(
        clusters(&r).contains("OUTBOUND|default|echo|version=v2"),
        "{}",
        clusters(&r)
    );
    let mut other = Delta::open(&s).await;
    other
        .sub(
            Some(on_demand_node_of("api-0", Some("api"))),
            VHDS,
            &[host],
            &[],
        )
        .await;
    let r = other.recv_ack().await;
    assert!(!clusters(&r).contains("version=v2"), "{}", clusters(&r));
    // The rule moves to another caller: web's host is pushed without the group.
    let mut moved = rule("api");
    moved["id"] = json!(id);
    let r = c
        .put(s.url("/naming/v2/routings"))
        .json(&json!([moved]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = web.recv_ack().await;
    assert!(!clusters(&r).contains("version=v2"), "{}", clusters(&r));
    let r = other.recv_ack().await;
    assert!(clusters(&r).contains("version=v2"), "{}", clusters(&r));
}

#[tokio::test]
async fn b17_a_deleted_service_leaves_the_routes_before_its_cluster_goes() {
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    let (_d, s, c) = server_with(&["a", "b"]).await;
    let mut d = Delta::open(&s).await;
    d.sub(Some(node("d")), CDS, &[], &[]).await;
    d.recv_ack().await;
    d.sub(None, RDS, &["polaris-outbound-router"], &[]).await;
    d.recv_ack().await;
    dereg(&c, &s, "b", 9001).await;
    del_service(&c, &s, "b").await;
    // First the route without b's virtual host, then b's cluster removal.
    let mut order = Vec::new();
    while order.len() < 2 {
        let r = d.recv_ack().await;
        let route_without_b = r.type_url == RDS
            && r.resources.iter().any(|x| {
                use prost::Message;
                let rc = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
                    x.resource.as_ref().unwrap().value.as_slice(),
                )
                .unwrap();
                !rc.virtual_hosts.iter().any(|v| v.name == cname("b"))
            });
        if route_without_b || (r.type_url == CDS && r.removed_resources == vec![cname("b")]) {
            order.push(r.type_url.clone());
        }
    }
    assert_eq!(order, vec![RDS.to_string(), CDS.to_string()]);
}

#[tokio::test]
async fn node_metadata_widens_the_visible_namespaces() {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use prost::Message;
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    let (_d, s, c) = server_with(&["api"]).await;
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
    let (st, _) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "prod", "service": "api", "host": "127.0.0.1", "port": 9700}]),
    )
    .await;
    assert_eq!(st, 200);
    settle(&c, &s).await;
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "sidecar.polarismesh.cn/visibleNamespaces".to_string(),
        Value {
            kind: Some(Kind::StringValue("prod".into())),
        },
    );
    let wide = Node {
        id: "wide".into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    };
    let mut d = Delta::open(&s).await;
    d.sub(Some(wide), CDS, &[], &[]).await;
    let r = d.recv_ack().await;
    assert_eq!(
        names(&r),
        vec![cname("api"), "OUTBOUND|prod|api".to_string()]
    );
    d.sub(None, RDS, &["polaris-outbound-router"], &[]).await;
    let r = d.recv_ack().await;
    let rc = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
        r.resources[0].resource.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    let domains = |name: &str| {
        rc.virtual_hosts
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.domains.clone())
            .unwrap_or_default()
    };
    assert!(
        domains("OUTBOUND|default|api").contains(&"api".to_string()),
        "own namespace answers the bare name"
    );
    let prod = domains("OUTBOUND|prod|api");
    assert!(
        prod.contains(&"api.prod".to_string()) && !prod.contains(&"api".to_string()),
        "{prod:?}"
    );
    // A change in the other namespace reaches this node; a plain node in default never sees prod.
    d.sub(None, EDS, &["OUTBOUND|prod|api"], &[]).await;
    assert_eq!(
        names(&d.recv_ack().await),
        vec!["OUTBOUND|prod|api".to_string()]
    );
    let (st, _) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "prod", "service": "api", "host": "127.0.0.2", "port": 9700}]),
    )
    .await;
    assert_eq!(st, 200);
    let r = d.recv_ack().await;
    assert_eq!(
        (r.type_url.as_str(), names(&r)),
        (EDS, vec!["OUTBOUND|prod|api".to_string()])
    );
    let mut plain = Delta::open(&s).await;
    plain.sub(Some(node("plain")), CDS, &[], &[]).await;
    assert_eq!(names(&plain.recv_ack().await), vec![cname("api")]);
}

/// The ports of each load assignment a client holds, by cluster.
type Held = std::collections::BTreeMap<String, std::collections::BTreeSet<u32>>;

fn ports_of(
    any: &envoy_types::pb::google::protobuf::Any,
) -> (String, std::collections::BTreeSet<u32>) {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
    use prost::Message;
    let cla = ClusterLoadAssignment::decode(&any.value[..]).unwrap();
    let ports = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => Some(p),
                _ => None,
            },
            _ => None,
        })
        .collect();
    (cla.cluster_name, ports)
}

/// One client of the crowd: subscribes to `names`' load assignments, ACKs every response, and
/// publishes what it holds after each.
async fn crowd_client(
    mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    i: usize,
    delta: bool,
    names: Vec<String>,
    held: std::sync::Arc<Vec<parking_lot::Mutex<Held>>>,
) -> Result<(), tonic::Status> {
    let node = Some(node(&format!("crowd-{i}")));
    if delta {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node,
            type_url: EDS.into(),
            resource_names_subscribe: names.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(r) = rx.message().await? {
            {
                let mut h = held[i].lock();
                for res in &r.resources {
                    let (name, ports) = ports_of(res.resource.as_ref().unwrap());
                    h.insert(name, ports);
                }
                for gone in &r.removed_resources {
                    h.remove(gone);
                }
            }
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: EDS.into(),
                    response_nonce: r.nonce,
                    ..Default::default()
                })
                .await;
        }
    } else {
        let (tx, rx) = mpsc::channel(4);
        let req = |version: String, nonce: String| DiscoveryRequest {
            type_url: EDS.into(),
            resource_names: names.clone(),
            version_info: version,
            response_nonce: nonce,
            ..Default::default()
        };
        let mut first = req(String::new(), String::new());
        first.node = node;
        tx.send(first).await.unwrap();
        let mut rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(r) = rx.message().await? {
            {
                let mut h = held[i].lock();
                for res in &r.resources {
                    let (name, ports) = ports_of(res);
                    h.insert(name, ports);
                }
            }
            let _ = tx.send(req(r.version_info, r.nonce)).await;
        }
    }
    Ok(())
}

/// W-B25: 2,000 streams (half SotW, half delta, 80 to a connection) converge on the registry's
/// final state after a burst of changes sent without waiting: no stream misses the last update of
/// any cluster, whatever the changes coalesced into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b25_two_thousand_streams_converge_after_a_burst_of_changes() {
    const SERVICES: usize = 10;
    const CONNECTIONS: usize = 25;
    const PER_CONNECTION: usize = 80;
    let svcs: Vec<String> = (0..SERVICES).map(|i| format!("crowd-{i}")).collect();
    let refs: Vec<&str> = svcs.iter().map(String::as_str).collect();
    let (_d, s, c) = server_with(&refs).await;
    let names: Vec<String> = svcs.iter().map(|s| cname(s)).collect();
    let total = CONNECTIONS * PER_CONNECTION;
    let held = std::sync::Arc::new(
        (0..total)
            .map(|_| parking_lot::Mutex::new(Held::new()))
            .collect::<Vec<_>>(),
    );
    let mut tasks = Vec::new();
    for k in 0..CONNECTIONS {
        let client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", s.xds_port))
                .await
                .unwrap();
        for j in 0..PER_CONNECTION {
            let i = k * PER_CONNECTION + j;
            tasks.push(tokio::spawn(crowd_client(
                client.clone(),
                i,
                i % 2 == 1,
                names.clone(),
                held.clone(),
            )));
        }
    }
    let expected = |c: &reqwest::Client, s: &Server| {
        let (c, url) = (
            c.clone(),
            s.url("/naming/v1/instances?namespace=default&limit=1000"),
        );
        async move {
            let (_, v) = common::get(&c, &url).await;
            let mut want = Held::new();
            for i in v["instances"].as_array().unwrap() {
                want.entry(cname(i["service"].as_str().unwrap()))
                    .or_default()
                    .insert(i["port"].as_u64().unwrap() as u32);
            }
            want
        }
    };
    let converge = |want: Held, what: &'static str| {
        let (held, tasks) = (held.clone(), &tasks);
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let behind: Vec<usize> = (0..total).filter(|i| *held[*i].lock() != want).collect();
                if behind.is_empty() {
                    return;
                }
                if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
                    panic!("{what}: a stream ended: {t:?}");
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: {} of {total} streams never converged; stream {} holds {:?}, the registry {want:?}",
                    behind.len(),
                    behind[0],
                    held[behind[0]].lock()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    converge(expected(&c, &s).await, "initial sync").await;

    // The burst: new ports everywhere and, after the first round, the oldest ones go.
    for round in 0..40u16 {
        let svc = &svcs[round as usize % SERVICES];
        reg(&c, &s, svc, 10_000 + round).await;
        if round >= SERVICES as u16 {
            dereg(
                &c,
                &s,
                &svcs[(round as usize - SERVICES) % SERVICES],
                10_000 + round - SERVICES as u16,
            )
            .await;
        }
    }
    let want = expected(&c, &s).await;
    assert_eq!(want.len(), SERVICES);
    assert!(want.values().all(|p| p.len() == 2), "{want:?}");
    converge(want, "after the burst").await;
    assert!(tasks.iter().all(|t| !t.is_finished()), "no stream ended");
    for t in &tasks {
        t.abort();
    }
}
