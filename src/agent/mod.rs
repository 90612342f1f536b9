//! `polaris agent`: the sidecar's certificate agent.
//!
//! It proves its workload's identity to the CA with the pod's ServiceAccount token (re-read at every
//! renewal: projected tokens rotate), with a fresh key each time (ECDSA P-256, or RSA 2048), and
//! serves the certificate to Envoy over SDS on a Unix socket: the secrets `default` (certificate
//! and key) and `ROOTCA` (the roots to trust). SDS runs on the same engine as the control plane's
//! ADS ([`crate::xds::server`]); the agent publishes its secrets into a [`Cache`] of its own, and
//! every connected Envoy is pushed the new certificate without a restart. It renews at half the
//! certificate's lifetime, retries failures with jittered backoff from 1 s, and keeps serving the
//! old certificate until a new one arrives.

pub mod renew;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use serde::Deserialize;

use crate::ca::sign::Identity;
use crate::metrics::Metrics;
use crate::net::{Acceptor, Limits};
use crate::xds::resources as r;
use crate::xds::server::{Ads, Nodes};
use crate::xds::snapshot::{Cache, Encoded};
use crate::xds::transport::RequestLimits;

/// Key algorithms for workload keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum KeyType {
    /// ECDSA on P-256 (fast to generate and to sign with).
    #[default]
    EcdsaP256,
    /// RSA, 2048 bits (as PolarisMesh's agent).
    Rsa2048,
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CA's sign URL (`https://host:port`; without a scheme, https is meant).
    pub ca_addr: String,
    /// The root the CA's serving certificate must chain to (PEM file).
    pub ca_root: PathBuf,
    /// The ServiceAccount token file (a projected token for the CA's audience).
    pub token_file: PathBuf,
    /// Namespace; else from the token's claims.
    pub namespace: Option<String>,
    /// ServiceAccount; else from the token's claims.
    pub service_account: Option<String>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Workload key algorithm.
    pub key_type: KeyType,
    /// Certificate lifetime to ask for.
    pub cert_ttl: Duration,
    /// The SDS socket (mode 0600).
    pub sds_socket: PathBuf,
}

/// Why the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file it needs.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A setting it cannot use.
    #[error("{0}")]
    Config(String),
    /// A signing round failed (it is retried).
    #[error("{0}")]
    Sign(String),
}

fn read(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The identity in a ServiceAccount token's claims (not verified here: the CA reviews the token).
pub fn identity_from_token(token: &str) -> Option<Identity> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if let Some(k) = claims.get("kubernetes.io") {
        let ns = k.get("namespace")?.as_str()?;
        let sa = k.get("serviceaccount")?.get("name")?.as_str()?;
        return Some(Identity {
            namespace: ns.into(),
            service_account: sa.into(),
        });
    }
    Identity::from_username(claims.get("sub")?.as_str()?)
}

/// A new key of `kind` (PEM, PKCS#8).
pub fn generate_key(kind: KeyType) -> Result<KeyPair, Error> {
    match kind {
        KeyType::EcdsaP256 => KeyPair::generate().map_err(|e| Error::Sign(e.to_string())),
        KeyType::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| Error::Sign(e.to_string()))?;
            let pem = key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .map_err(|e| Error::Sign(e.to_string()))?;
            KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| Error::Sign(e.to_string()))
        }
    }
}

/// A CSR for `identity` in `trust_domain`: its only name is the SPIFFE id.
pub fn csr(key: &KeyPair, identity: &Identity, trust_domain: &str) -> Result<String, Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    let uri = identity
        .spiffe(trust_domain)
        .try_into()
        .map_err(|_| Error::Config("the SPIFFE id is not ASCII".into()))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.serialize_request(key)
        .and_then(|c| c.pem())
        .map_err(|e| Error::Sign(e.to_string()))
}

#[derive(Debug, Deserialize)]
struct SignResponse {
    #[serde(default)]
    cert_chain: String,
    #[serde(default)]
    root_cert: String,
    #[serde(default)]
    msg: String,
}

/// A certificate the agent holds.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first (PEM).
    pub chain: String,
    /// Its key (PEM).
    pub key: String,
    /// The roots (PEM).
    pub root: String,
    /// Validity.
    pub not_before: SystemTime,
    /// Validity.
    pub not_after: SystemTime,
    /// The leaf's serial (hex), for logs.
    pub serial: String,
}

/// The agent: a CA client and an SDS server.
pub struct Agent {
    config: Config,
    http: reqwest::Client,
    url: String,
    cache: Arc<Cache>,
}

impl Agent {
    /// Checks the configuration (every problem is reported before anything runs).
    pub fn new(config: Config) -> Result<Agent, Error> {
        let root = read(&config.ca_root)?;
        let not_pem = || {
            Error::Config(format!(
                "{}: not a PEM certificate",
                config.ca_root.display()
            ))
        };
        {
            use rustls_pki_types::pem::PemObject;
            let first = rustls_pki_types::CertificateDer::pem_slice_iter(root.as_bytes()).next();
            if !matches!(first, Some(Ok(_))) {
                return Err(not_pem());
            }
        }
        let cert = reqwest::Certificate::from_pem(root.as_bytes()).map_err(|_| not_pem())?;
        let http = reqwest::Client::builder()
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let base = if config.ca_addr.contains("://") {
            config.ca_addr.clone()
        } else {
            format!("https://{}", config.ca_addr)
        };
        if !base.starts_with("https://") {
            return Err(Error::Config(format!(
                "the CA address {base} is not https: the agent sends a credential there"
            )));
        }
        let url = format!(
            "{}/security/v1/sign_certificate",
            base.trim_end_matches('/')
        );
        read(&config.token_file)?;
        Ok(Agent {
            config,
            http,
            url,
            cache: Arc::new(Cache::default()),
        })
    }

    /// The SDS cache (what Envoys connected to the socket are served).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    fn identity(&self, token: &str) -> Result<Identity, Error> {
        let claimed = identity_from_token(token);
        let ns = self
            .config
            .namespace
            .clone()
            .or_else(|| claimed.as_ref().map(|c| c.namespace.clone()));
        let sa = self
            .config
            .service_account
            .clone()
            .or_else(|| claimed.as_ref().map(|c| c.service_account.clone()));
        match (ns, sa) {
            (Some(namespace), Some(service_account)) => Ok(Identity {
                namespace,
                service_account,
            }),
            _ => Err(Error::Config(
                "no namespace and ServiceAccount: give --namespace and --service-account, or a token with kubernetes.io claims".into(),
            )),
        }
    }

    /// One signing round: token, fresh key, CSR, CA.
    pub async fn sign(&self) -> Result<Issued, Error> {
        let token = read(&self.config.token_file)?;
        let token = token.trim();
        let identity = self.identity(token)?;
        let key = generate_key(self.config.key_type)?;
        let csr = csr(&key, &identity, &self.config.trust_domain)?;
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(token)
            .json(&serde_json::json!({"csr": csr, "ttl": self.config.cert_ttl.as_secs()}))
            .send()
            .await
            .map_err(|e| Error::Sign(format!("the CA at {}: {e}", self.url)))?;
        let status = resp.status();
        let body: SignResponse = resp.json().await.map_err(|e| {
            Error::Sign(format!(
                "the CA answered {status} with an unreadable body: {e}"
            ))
        })?;
        if !status.is_success() || body.cert_chain.is_empty() {
            return Err(Error::Sign(format!(
                "the CA refused ({status}): {}",
                body.msg
            )));
        }
        let (not_before, not_after, serial) = validity(&body.cert_chain)?;
        Ok(Issued {
            chain: body.cert_chain,
            key: key.serialize_pem(),
            root: body.root_cert,
            not_before,
            not_after,
            serial,
        })
    }

    /// Serves `issued` to the connected Envoys.
    pub fn publish(&self, issued: &Issued) {
        let cert = r::certificate_secret(&issued.chain, &issued.key);
        let root = r::root_secret(&issued.root);
        self.cache.publish_secrets(vec![
            Encoded::new(Arc::from(r::CERT_SECRET), &cert),
            Encoded::new(Arc::from(r::ROOT_SECRET), &root),
        ]);
    }

    /// Signs, publishes and renews until the process ends.
    pub async fn renew_forever(&self) {
        let mut backoff = renew::Backoff::default();
        loop {
            match self.sign().await {
                Ok(issued) => {
                    self.publish(&issued);
                    backoff = renew::Backoff::default();
                    let wait =
                        renew::renew_after(issued.not_before, issued.not_after, SystemTime::now());
                    tracing::info!(serial = %issued.serial, not_after = %humantime::format_rfc3339_seconds(issued.not_after), renew_in = ?wait, "certificate issued");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, retry_in = ?wait, "certificate not renewed; serving the previous one");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Validity and serial of the first certificate of `chain`.
fn validity(chain: &str) -> Result<(SystemTime, SystemTime, String), Error> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(chain.as_bytes())
        .map_err(|e| Error::Sign(format!("the CA's chain: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::Sign(format!("the CA's certificate: {e}")))?;
    let t = |ts: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    let v = cert.validity();
    Ok((
        t(v.not_before.timestamp()),
        t(v.not_after.timestamp()),
        cert.tbs_certificate.raw_serial_as_string(),
    ))
}

/// Runs the agent: the SDS socket, and the renewal loop.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let agent = Arc::new(Agent::new(config)?);
    let listener = crate::net::bind_unix(&agent.config.sds_socket).map_err(|source| Error::Io {
        path: agent.config.sds_socket.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    let acceptor = Acceptor::new(
        listener,
        Limits {
            max_connections: 64,
            first_request_timeout: Duration::from_secs(10),
        },
        metrics.xds_conns.clone(),
        "sds",
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ads = Ads::new(
        agent.cache.clone(),
        metrics.clone(),
        Arc::new(Nodes::default()),
    )
    .with_shutdown(stop_rx.clone());
    let limits = Arc::new(RequestLimits::new(
        1 << 20,
        8 << 20,
        Duration::from_secs(10),
        metrics,
    ));
    tracing::info!(socket = %agent.config.sds_socket.display(), ca = %agent.url, "polaris agent started");
    let renewing = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.renew_forever().await })
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let served = crate::xds::transport::serve(acceptor, ads.into_service(limits), stop_rx).await;
    renewing.abort();
    let _ = std::fs::remove_file(&agent.config.sds_socket);
    served.map_err(|source| Error::Io {
        path: agent.config.sds_socket.clone(),
        source,
    })
}
