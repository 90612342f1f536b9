//! Authenticated ADS against the real binary and a real kube-apiserver: no credentials, no stream;
//! a client certificate or a ServiceAccount token proves a namespace, and what the node claims is
//! narrowed to that namespace and policy.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::kube::TestKube;
use common::raw::{RawConn, SOTW};
use common::{free_port, get, post, CaServer};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A client certificate for `spiffe://cluster.local/ns/<ns>/sa/app`, signed by the control plane's
/// development root, valid over `valid` (seconds relative to now).
fn client_cert(data: &std::path::Path, ns: &str, valid: (i64, i64)) -> (String, String) {
    let root_pem = std::fs::read_to_string(data.join("ca/root-cert.pem")).unwrap();
    let root_key =
        KeyPair::from_pem(&std::fs::read_to_string(data.join("ca/root-key.pem")).unwrap()).unwrap();
    let root = CertificateParams::from_ca_cert_pem(&root_pem)
        .unwrap()
        .self_signed(&root_key)
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://cluster.local/ns/{ns}/sa/app")
            .try_into()
            .unwrap(),
    )];
    let at = |s: i64| {
        if s >= 0 {
            SystemTime::now() + Duration::from_secs(s as u64)
        } else {
            SystemTime::now() - Duration::from_secs((-s) as u64)
        }
    };
    p.not_before = at(valid.0).into();
    p.not_after = at(valid.1).into();
    let cert = p.signed_by(&key, &root, &root_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TLS client trusting the control plane's root, with an optional client certificate.
fn tls(data: &std::path::Path, client: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(data.join("ca/root-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

fn node(id: &str, claimed_ns: &str, visible: &str) -> Node {
    let s = |v: &str| PbValue {
        kind: Some(Kind::StringValue(v.into())),
    };
    Node {
        id: id.into(),
        metadata: Some(Struct {
            fields: [
                (
                    "sidecar.polarismesh.cn/serviceNamespace".to_string(),
                    s(claimed_ns),
                ),
                (
                    "sidecar.polarismesh.cn/visibleNamespaces".to_string(),
                    s(visible),
                ),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// The cluster names a wildcard CDS subscription gets on `conn` (with `headers` as metadata),
/// or how the stream ended.
async fn clusters(
    conn: &mut RawConn,
    n: Node,
    headers: &[(&str, &str)],
) -> Result<Vec<String>, common::raw::Ended> {
    open_cds(conn, n, headers).await.map(|(names, _)| names)
}

/// [`clusters`], keeping the stream open.
async fn open_cds(
    conn: &mut RawConn,
    n: Node,
    headers: &[(&str, &str)],
) -> Result<(Vec<String>, common::raw::RawStream), common::raw::Ended> {
    let mut s = conn
        .try_stream_with(SOTW, "application/grpc", headers)
        .await
        .expect("a stream");
    s.send_msg(&DiscoveryRequest {
        node: Some(n),
        type_url: CLUSTER.into(),
        ..Default::default()
    });
    let r: DiscoveryResponse = s.next().await?;
    let mut names: Vec<String> = r
        .resources
        .iter()
        .map(|a| {
            use prost::Message;
            envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                .unwrap()
                .name
        })
        .collect();
    names.sort();
    Ok((names, s))
}

struct Setup {
    cp: CaServer,
    data: std::path::PathBuf,
    /// Namespaces a, b and c (unique per run; they are Kubernetes namespaces too).
    ns: [String; 3],
    kube: TestKube,
    _dir: tempfile::TempDir,
}

/// A control plane with ADS authentication on, namespaces a, b, c with a service each, and the
/// policy that a's nodes may also see c.
async fn setup(extra: &[&str]) -> Setup {
    let kube = TestKube::from_env();
    let dir = tempfile::tempdir().unwrap();
    let p = free_port();
    let ns = [format!("xa-{p}"), format!("xb-{p}"), format!("xc-{p}")];
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("xdsVisibility:\n  {}: [{}]\n", ns[0], ns[2]),
    )
    .unwrap();
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend(extra);
    let cp = CaServer::start(dir.path(), &kube, &args).await;
    let data = cp.root.parent().unwrap().parent().unwrap().to_path_buf();
    let c = reqwest::Client::new();
    for n in &ns {
        let (st, v) = post(
            &c,
            &cp.server.url("/naming/v1/namespaces"),
            json!([{"name": n}]),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = post(
            &c,
            &cp.server.url("/naming/v1/instances"),
            json!([{"namespace": n, "service": "svc", "host": "10.0.0.1", "port": 80}]),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    Setup {
        cp,
        data,
        ns,
        kube,
        _dir: dir,
    }
}

fn outbound(ns: &str) -> String {
    format!("OUTBOUND|{ns}|svc")
}

#[tokio::test]
async fn streams_prove_an_identity_and_get_only_what_it_may_see() {
    let s = setup(&["--xds-auth", "on"]).await;
    let port = s.cp.server.xds_port;
    let [a, b, c] = s.ns.clone();

    // Plaintext: the port speaks TLS only.
    let plain = match RawConn::try_connect(port).await {
        Err(e) => Err(e),
        Ok(mut conn) => clusters(&mut conn, node("n0", &a, ""), &[])
            .await
            .map_err(|e| e.message),
    };
    assert!(plain.is_err(), "plaintext ADS answered: {plain:?}");

    // TLS without a certificate or a token: UNAUTHENTICATED, nothing sent.
    let mut conn = RawConn::tls(port, tls(&s.data, None)).await.unwrap();
    let e = clusters(&mut conn, node("n1", &a, "*"), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code, 16, "{e:?}");
    assert!(e.message.contains("no credentials"), "{e:?}");

    // A certificate for a, claiming to be in b and to see everything: a, and c by policy.
    let cert = client_cert(&s.data, &a, (-60, 3600));
    let mut conn = RawConn::tls(port, tls(&s.data, Some(cert))).await.unwrap();
    let (got, _open) = open_cds(&mut conn, node("cert-node", &b, "*"), &[])
        .await
        .unwrap();
    assert_eq!(got, vec![outbound(&a), outbound(&c)]);
    let http = reqwest::Client::new();
    let (_, nodes) = get(&http, &s.cp.server.url("/debug/xds/nodes")).await;
    let n = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"]["id"] == "cert-node")
        .expect("the node is listed")["node"]
        .clone();
    assert_eq!(n["namespace"], a.as_str());
    assert_eq!(
        n["identity"],
        format!("spiffe://cluster.local/ns/{a}/sa/app")
    );
    assert_eq!(
        n["narrowed"],
        json!({"namespace": b, "visibleNamespaces": ["*"]})
    );

    // A ServiceAccount token (TLS without a certificate): b only.
    let client = s.kube.client().await;
    s.kube.service_account(&client, &b, "app").await;
    let token = s.kube.token(&client, &b, "app", &["polaris-ca"], 600).await;
    let bearer = format!("Bearer {token}");
    let mut conn = RawConn::tls(port, tls(&s.data, None)).await.unwrap();
    let got = clusters(
        &mut conn,
        node("jwt-node", &a, "*"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(got, vec![outbound(&b)]);
    // A token for another audience is refused.
    let wrong = s
        .kube
        .token(&client, &b, "app", &["someone-else"], 600)
        .await;
    let wrong = format!("Bearer {wrong}");
    let mut conn = RawConn::tls(port, tls(&s.data, None)).await.unwrap();
    let e = clusters(&mut conn, node("n2", &b, ""), &[("authorization", &wrong)])
        .await
        .unwrap_err();
    assert_eq!(e.code, 16, "{e:?}");

    // An expired certificate fails the handshake (or the first stream).
    let expired = client_cert(&s.data, &a, (-7200, -3600));
    let r = match RawConn::tls(port, tls(&s.data, Some(expired))).await {
        Err(e) => Err(e),
        Ok(mut conn) => clusters(&mut conn, node("n3", &a, ""), &[])
            .await
            .map_err(|e| e.message),
    };
    assert!(r.is_err(), "an expired certificate was accepted: {r:?}");

    // The refusals are counted; no token is in the log.
    let m = reqwest::get(s.cp.server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("polaris_xds_auth_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 2, "{refused}");
    let log = std::fs::read_to_string(&s.cp.server.log).unwrap();
    assert!(!log.contains(&token) && !log.contains(wrong.trim_start_matches("Bearer ")));
}

/// On a non-loopback address ADS authenticates by default.
#[tokio::test]
async fn a_public_ads_port_needs_credentials_by_default() {
    let kube = TestKube::from_env();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let kubeconfig = kube.kubeconfig(dir.path());
    let ca = format!("127.0.0.1:{}", free_port());
    let server = common::Server::start_on(
        &data,
        "127.0.0.1",
        "0.0.0.0",
        &[
            "--ca-addr",
            &ca,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .await;
    let port = server.xds_port;
    let plain = match RawConn::try_connect(port).await {
        Err(e) => Err(e),
        Ok(mut conn) => clusters(&mut conn, node("p0", "default", ""), &[])
            .await
            .map_err(|e| e.message),
    };
    assert!(
        plain.is_err(),
        "plaintext ADS answered on a public port: {plain:?}"
    );
    let mut conn = RawConn::tls(port, tls(&data, None)).await.unwrap();
    let e = clusters(&mut conn, node("p1", "default", ""), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code, 16, "{e:?}");
}
