//! The CA against a real kube-apiserver: it signs only the identity the token proves, and in every
//! refusal no certificate is returned.

mod common;

use common::kube::TestKube;
use common::{free_port, Server};
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{json, Value};

struct Ca {
    _server: Server,
    url: String,
    http: reqwest::Client,
    root: String,
}

async fn start_ca(dir: &std::path::Path, kubeconfig: &std::path::Path, extra: &[&str]) -> Ca {
    let port = free_port();
    let mut args = vec![
        "--ca-addr".to_string(),
        format!("127.0.0.1:{port}"),
        "--kubeconfig".to_string(),
        kubeconfig.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let data = dir.join(format!("data-{port}"));
    let server = Server::start(&data, &args).await;
    let root = std::fs::read_to_string(data.join("ca/root-cert.pem")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    Ca {
        _server: server,
        url: format!("https://127.0.0.1:{port}/security/v1/sign_certificate"),
        http,
        root,
    }
}

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn spiffe(ns: &str, sa: &str) -> SanType {
    SanType::URI(
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .try_into()
            .unwrap(),
    )
}

impl Ca {
    async fn sign(&self, token: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    async fn sign_csr(&self, token: &str, csr: &str) -> (u16, Value) {
        self.sign(Some(token), json!({"csr": csr, "ttl": 600}).to_string())
            .await
    }
}

/// No certificate in a refusal.
fn refused(r: &(u16, Value), status: u16, what: &str) {
    assert_eq!(r.0, status, "{what}: {}", r.1);
    assert!(
        r.1["cert_chain"].as_str().unwrap_or("").is_empty(),
        "{what}: a certificate was returned"
    );
    assert!(
        !r.1["msg"].as_str().unwrap_or("").is_empty(),
        "{what}: no message"
    );
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

#[tokio::test]
async fn the_ca_signs_only_what_a_real_token_proves() {
    let kube = TestKube::from_env();
    let client = kube.client().await;
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("ca-{}", free_port());
    kube.service_account(&client, &ns, "a").await;
    kube.service_account(&client, &ns, "b").await;
    kube.service_account(&client, &ns, "doomed").await;
    let ca = start_ca(dir.path(), &kube.kubeconfig(dir.path()), &[]).await;
    let token_a = kube.token(&client, &ns, "a", &["polaris-ca"], 3600).await;

    // SA a gets a certificate for SA a, chaining to the root it is given.
    let (st, v) = ca.sign_csr(&token_a, &csr(vec![spiffe(&ns, "a")])).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["msg"], "OK");
    let chain = pem_certs(v["cert_chain"].as_str().unwrap());
    let root = pem_certs(v["root_cert"].as_str().unwrap());
    assert_eq!(root, pem_certs(&ca.root));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{}", san.value.general_names[0]),
        format!("URI(spiffe://cluster.local/ns/{ns}/sa/a)")
    );
    assert_eq!(san.value.general_names.len(), 1);
    let (_, r) = x509_parser::parse_x509_certificate(&root[0]).unwrap();
    leaf.verify_signature(Some(r.public_key())).unwrap();

    // A token of SA a asking for SA b.
    refused(
        &ca.sign_csr(&token_a, &csr(vec![spiffe(&ns, "b")])).await,
        403,
        "another identity",
    );
    // A token for another audience.
    let other = kube.token(&client, &ns, "a", &["other"], 3600).await;
    refused(
        &ca.sign_csr(&other, &csr(vec![spiffe(&ns, "a")])).await,
        401,
        "wrong audience",
    );
    // An expired token (the apiserver's own, with its expiry moved to the past and signed again
    // with its key).
    let expired = kube.resign(&token_a, |c| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        c["iat"] = json!(now - 7200);
        c["nbf"] = json!(now - 7200);
        c["exp"] = json!(now - 3600);
    });
    refused(
        &ca.sign_csr(&expired, &csr(vec![spiffe(&ns, "a")])).await,
        401,
        "expired token",
    );
    // The same resigning with the expiry left as it is passes: the forgery method is sound.
    let resigned = kube.resign(&token_a, |_| {});
    assert_eq!(
        ca.sign_csr(&resigned, &csr(vec![spiffe(&ns, "a")])).await.0,
        200
    );
    // A token of a ServiceAccount deleted since.
    let doomed = kube
        .token(&client, &ns, "doomed", &["polaris-ca"], 3600)
        .await;
    kube.delete_service_account(&client, &ns, "doomed").await;
    refused(
        &ca.sign_csr(&doomed, &csr(vec![spiffe(&ns, "doomed")]))
            .await,
        401,
        "deleted ServiceAccount",
    );
    // No token, garbage tokens.
    refused(
        &ca.sign(
            None,
            json!({"csr": csr(vec![spiffe(&ns, "a")])}).to_string(),
        )
        .await,
        401,
        "no token",
    );
    refused(
        &ca.sign_csr("garbage", &csr(vec![spiffe(&ns, "a")])).await,
        401,
        "garbage token",
    );
    // CSRs: an extra DNS name, no SPIFFE id, a signature that does not verify.
    let dns = SanType::DnsName("evil.example".to_string().try_into().unwrap());
    refused(
        &ca.sign_csr(&token_a, &csr(vec![spiffe(&ns, "a"), dns]))
            .await,
        400,
        "extra DNS SAN",
    );
    refused(&ca.sign_csr(&token_a, &csr(vec![])).await, 400, "no SAN");
    let good = csr(vec![spiffe(&ns, "a")]);
    let tampered = tamper(&good);
    refused(
        &ca.sign_csr(&token_a, &tampered).await,
        400,
        "bad signature",
    );
    // Bodies: garbage, oversized.
    refused(
        &ca.sign(Some(&token_a), "{not json").await,
        400,
        "garbage body",
    );
    let huge = json!({"csr": "x".repeat(100 << 10)}).to_string();
    let (st, _) = ca.sign(Some(&token_a), huge).await;
    assert_eq!(st, 413, "oversized body");
    // Every decision was counted.
    let metrics = reqwest::get(ca._server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("polaris_ca_issued_total 2"), "{metrics}");
    assert!(
        metrics.contains("polaris_ca_denied_total{reason=\"forbidden\"} 1"),
        "{metrics}"
    );
    // The token never appears in the log.
    let log = std::fs::read_to_string(&ca._server.log).unwrap();
    assert!(!log.contains(&token_a[..40]), "a token was logged");
    assert!(log.contains("certificate denied") && log.contains("certificate issued"));
}

/// Flips a bit in the CSR's signature.
fn tamper(pem: &str) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut der = der.as_ref().to_vec();
    let n = der.len();
    der[n - 3] ^= 0x04;
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

/// With the Kubernetes API unreachable there is no verdict: 503, never a certificate.
#[tokio::test]
async fn no_certificate_when_the_apiserver_is_down() {
    let kube = TestKube::from_env();
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("https://127.0.0.1:{}", free_port());
    let ca = start_ca(dir.path(), &kube.kubeconfig_for(dir.path(), &dead), &[]).await;
    let r = ca
        .sign_csr("some.token.value", &csr(vec![spiffe("t", "a")]))
        .await;
    refused(&r, 503, "apiserver down");
}
