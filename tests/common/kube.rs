//! The real kube-apiserver of the test run (`e2e/apiserver.sh start`, from `scripts/test.sh`).
//! A missing apiserver fails the test: run `./scripts/test.sh`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::Api;

/// The apiserver: its URL, an admin token, and its serving certificate.
pub struct TestKube {
    pub url: String,
    pub token: String,
    pub ca: PathBuf,
    /// The ServiceAccount signing key (to forge an expired token in tests).
    pub sa_key: PathBuf,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test needs the real kube-apiserver that ./scripts/test.sh starts (e2e/apiserver.sh)")
    })
}

impl TestKube {
    pub fn from_env() -> TestKube {
        TestKube {
            url: var("POLARIS_TEST_KUBE_URL"),
            token: var("POLARIS_TEST_KUBE_TOKEN"),
            ca: PathBuf::from(var("POLARIS_TEST_KUBE_CA")),
            sa_key: PathBuf::from(var("POLARIS_TEST_KUBE_SA_KEY")),
        }
    }

    /// Writes a kubeconfig for the admin into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubeconfig_for(dir, &self.url)
    }

    /// A kubeconfig like [`TestKube::kubeconfig`] but pointing at `url`.
    pub fn kubeconfig_for(&self, dir: &Path, url: &str) -> PathBuf {
        let path = dir.join(format!(
            "kubeconfig-{}",
            url.rsplit(':').next().unwrap_or("x")
        ));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                self.ca.display(),
                self.token
            ),
        )
        .unwrap();
        path
    }

    pub async fn client(&self) -> kube::Client {
        let dir = tempfile::tempdir().unwrap();
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig(dir.path())).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// Creates namespace `ns` (if needed) and ServiceAccount `sa` in it.
    pub async fn service_account(&self, client: &kube::Client, ns: &str, sa: &str) {
        let nss: Api<Namespace> = Api::all(client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.into());
        let _ = nss.create(&PostParams::default(), &n).await;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let mut s = ServiceAccount::default();
        s.metadata.name = Some(sa.into());
        sas.create(&PostParams::default(), &s).await.unwrap();
    }

    pub async fn delete_service_account(&self, client: &kube::Client, ns: &str, sa: &str) {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        sas.delete(sa, &DeleteParams::default()).await.unwrap();
    }

    /// A bound ServiceAccount token (TokenRequest) for `audiences`, valid `secs`.
    pub async fn token(
        &self,
        client: &kube::Client,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        secs: i64,
    ) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expiration_seconds: Some(secs),
                ..Default::default()
            },
            ..Default::default()
        };
        sas.create_token_request(sa, &PostParams::default(), &tr)
            .await
            .unwrap()
            .status
            .unwrap()
            .token
    }

    /// `token` with its claims changed by `f` and signed again with the apiserver's ServiceAccount
    /// key: a token the apiserver would have issued (an expired one, say).
    pub fn resign(&self, token: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let header = parts.next().unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts.next().unwrap()).unwrap()).unwrap();
        f(&mut claims);
        let signing_input = format!("{header}.{}", b64.encode(claims.to_string()));
        let pem = std::fs::read_to_string(&self.sa_key).unwrap();
        let der = pem_der(&pem);
        let key = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{signing_input}.{}", b64.encode(sig))
    }
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}
