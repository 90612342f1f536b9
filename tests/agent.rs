//! `polaris agent`: certificates from the CA (real kube-apiserver tokens), served over SDS on its
//! Unix socket in both protocols, renewed and pushed without a reconnect.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::kube::TestKube;
use common::raw::{RawConn, SDS_DELTA, SDS_SOTW};
use common::{free_port, Agent, CaServer};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn node() -> Option<Node> {
    Some(Node {
        id: "sidecar~t/pod~127.0.0.1".into(),
        ..Default::default()
    })
}

/// The leaf certificate's serial and SAN in a `default` secret.
fn leaf_of(s: &Secret) -> (String, String) {
    use rustls_pki_types::pem::PemObject;
    let (chain, key) = common::secret_pems(s);
    assert!(!key.is_empty());
    let der = rustls_pki_types::CertificateDer::from_pem_slice(chain.as_bytes()).unwrap();
    common::serial_and_san(&der)
}

async fn setup(ttl: &str) -> (tempfile::TempDir, CaServer, Agent, String) {
    let kube = TestKube::from_env();
    let client = kube.client().await;
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("agent-{}", free_port());
    kube.service_account(&client, &ns, "app").await;
    let token = kube.token(&client, &ns, "app", &["polaris-ca"], 3600).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let ca = CaServer::start(dir.path(), &kube, &["--ca-signs-per-minute", "600"]).await;
    let agent = Agent::start(dir.path(), &ca, &token_file, &["--cert-ttl-secs", ttl]).await;
    (dir, ca, agent, ns)
}

#[tokio::test]
async fn sds_sotw_serves_the_certificate_and_pushes_renewals() {
    let (_dir, _ca, agent, ns) = setup("4").await;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the SDS socket is the owner's only");
    let mut c = RawConn::unix(&agent.socket).await;
    let mut s = c.grpc(SDS_SOTW).await;
    let names = vec!["default".to_string(), "ROOTCA".to_string()];
    s.send_msg(&DiscoveryRequest {
        node: node(),
        type_url: SECRET.into(),
        resource_names: names.clone(),
        ..Default::default()
    });
    let r: DiscoveryResponse = s.next().await.unwrap();
    let secrets: Vec<Secret> = r
        .resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect();
    let default = secrets
        .iter()
        .find(|s| s.name == "default")
        .expect("default");
    let root = secrets.iter().find(|s| s.name == "ROOTCA").expect("ROOTCA");
    assert!(matches!(
        root.r#type,
        Some(secret::Type::ValidationContext(_))
    ));
    let (serial1, san) = leaf_of(default);
    assert_eq!(san, format!("URI(spiffe://cluster.local/ns/{ns}/sa/app)"));
    s.send_msg(&DiscoveryRequest {
        type_url: SECRET.into(),
        resource_names: names.clone(),
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    });
    // A 4 s certificate is renewed after about 2 s and pushed on the same stream.
    let r2: DiscoveryResponse = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no renewal pushed")
        .unwrap();
    assert_ne!(r2.version_info, r.version_info);
    let renewed = r2
        .resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .find(|s| s.name == "default")
        .expect("the renewed certificate");
    assert_ne!(
        leaf_of(&renewed).0,
        serial1,
        "a new certificate, not the same one again"
    );
}

#[tokio::test]
async fn sds_delta_serves_the_certificate_and_pushes_renewals() {
    let (_dir, _ca, agent, _ns) = setup("4").await;
    let mut c = RawConn::unix(&agent.socket).await;
    let mut s = c.grpc(SDS_DELTA).await;
    s.send_msg(&DeltaDiscoveryRequest {
        node: node(),
        type_url: SECRET.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    });
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 2 {
        let r: DeltaDiscoveryResponse = s.next().await.unwrap();
        for res in &r.resources {
            got.insert(res.name.clone(), res.version.clone());
        }
        s.send_msg(&DeltaDiscoveryRequest {
            type_url: SECRET.into(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        });
    }
    let r: DeltaDiscoveryResponse = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no renewal pushed")
        .unwrap();
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, vec!["default"], "only the certificate changed");
    assert_ne!(r.resources[0].version, got["default"]);
}

#[test]
fn an_unusable_configuration_ends_the_agent_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, "not a certificate").unwrap();
    for (args, says) in [
        (
            vec!["--ca-root", "/nonexistent/root.pem"],
            "/nonexistent/root.pem",
        ),
        (
            vec!["--ca-root", root.to_str().unwrap()],
            "not a PEM certificate",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_polaris"))
            .args([
                "agent",
                "--ca-addr",
                "127.0.0.1:1",
                "--token-file",
                "/nonexistent/token",
            ])
            .args(&args)
            .arg("--sds-socket")
            .arg(dir.path().join("s.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    let good_root = rcgen::CertificateParams::default()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    std::fs::write(&root, good_root).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polaris"))
        .args([
            "agent",
            "--ca-addr",
            "http://127.0.0.1:1",
            "--token-file",
            "/nonexistent/token",
        ])
        .arg("--ca-root")
        .arg(&root)
        .arg("--sds-socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not https"));
}
