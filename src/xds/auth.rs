//! Who is on the other end of an ADS stream, and what it may see.
//!
//! With authentication on, the ADS port speaks TLS and every stream must prove a workload
//! identity: a client certificate issued by our CA (its SPIFFE id; the sidecar agent's certificate,
//! which Envoy presents on its xDS cluster), or else a Kubernetes ServiceAccount token in the gRPC
//! `authorization` metadata, reviewed with TokenReview (cached, bounded, never past the token's
//! expiry). A stream without either ends with `UNAUTHENTICATED` before it reads a request.
//!
//! What the node claims in its metadata then only narrows what it gets: its namespace is its
//! identity's, and the other namespaces it asks to see are cut to what policy allows the
//! identity's namespace (`xdsVisibility`). The narrowing shows in `/debug/xds/nodes`.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tonic::Status;

use super::node::NodeInfo;
use crate::ca::review::{ReviewError, Reviewer};
use crate::ca::sign::Identity;

/// How the ADS port authenticates.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// SPIFFE trust domain of client certificates.
    pub trust_domain: String,
    /// Namespace of an identity → the other namespaces its nodes may see (`*`: all). A namespace
    /// not listed sees only itself.
    pub visibility: BTreeMap<String, Vec<String>>,
}

/// Authenticates streams and scopes their nodes.
pub struct Authenticator {
    cfg: Config,
    /// Reviews ServiceAccount tokens; `None`: only certificates authenticate.
    reviewer: Option<Arc<dyn Reviewer>>,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proof {
    /// A client certificate from our CA.
    Certificate,
    /// A ServiceAccount token, reviewed.
    Token,
}

/// A proven caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its workload identity.
    pub identity: Identity,
    /// How it proved it.
    pub proof: Proof,
}

/// What a node claimed that its identity and policy did not allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Narrowed {
    /// The namespace it claimed.
    pub namespace: String,
    /// The other namespaces it claimed.
    pub visible_namespaces: Vec<String>,
}

impl Authenticator {
    /// An authenticator with `cfg`; `reviewer` reviews ServiceAccount tokens.
    pub fn new(cfg: Config, reviewer: Option<Arc<dyn Reviewer>>) -> Self {
        Authenticator { cfg, reviewer }
    }

    /// Whether ServiceAccount tokens authenticate (a Kubernetes API reviews them).
    pub fn accepts_tokens(&self) -> bool {
        self.reviewer.is_some()
    }

    /// The identity in a verified client certificate chain: its leaf's one SPIFFE id of our
    /// trust domain.
    pub fn certificate_identity(&self, chain: &[CertificateDer<'_>]) -> Option<Identity> {
        let leaf = chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => {
                parse_spiffe(uri, &self.cfg.trust_domain)
            }
            _ => None,
        })
    }

    /// Authenticates a stream from its connection's client certificate (verified by the TLS
    /// handshake) or its bearer token.
    pub async fn authenticate(
        &self,
        certificate: Option<Identity>,
        bearer: Option<&str>,
    ) -> Result<Caller, Status> {
        if let Some(identity) = certificate {
            return Ok(Caller {
                identity,
                proof: Proof::Certificate,
            });
        }
        let Some(token) = bearer else {
            return Err(Status::unauthenticated(
                "no credentials: present a client certificate from the mesh CA, or a ServiceAccount token as `authorization: Bearer <token>`",
            ));
        };
        let Some(reviewer) = &self.reviewer else {
            return Err(Status::unauthenticated(
                "ServiceAccount tokens are not accepted here (no Kubernetes API configured): present a client certificate",
            ));
        };
        match reviewer.review(token).await {
            Ok(identity) => Ok(Caller {
                identity,
                proof: Proof::Token,
            }),
            Err(e @ ReviewError::Unavailable(_)) => Err(Status::unavailable(format!(
                "cannot review the token now: {e}"
            ))),
            Err(e) => Err(Status::unauthenticated(format!("token refused: {e}"))),
        }
    }

    /// Scopes a node to its caller: the identity's namespace, and only the other namespaces
    /// policy allows it. Returns what was claimed beyond that, if anything.
    pub fn scope(&self, caller: &Caller, info: &mut NodeInfo) -> Option<Narrowed> {
        let ns = &caller.identity.namespace;
        let allowed = self.cfg.visibility.get(ns);
        let all = allowed.is_some_and(|a| a.iter().any(|n| n == "*"));
        let claimed = Narrowed {
            namespace: info.namespace.clone(),
            visible_namespaces: info.extra_namespaces.clone(),
        };
        let mut extra: Vec<String> = Vec::new();
        for want in &info.extra_namespaces {
            let ok = |n: &String| n != ns;
            if want == "*" {
                if all {
                    extra.push("*".into());
                } else {
                    extra.extend(allowed.into_iter().flatten().filter(|n| ok(n)).cloned());
                }
            } else if all || allowed.is_some_and(|a| a.contains(want)) {
                extra.push(want.clone());
            }
        }
        extra.sort();
        extra.dedup();
        info.namespace = ns.clone();
        info.extra_namespaces = extra;
        info.identity = Some(caller.identity.spiffe(&self.cfg.trust_domain));
        (claimed.namespace != info.namespace || claimed.visible_namespaces != info.extra_namespaces)
            .then_some(claimed)
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` of trust domain `td`.
fn parse_spiffe(uri: &str, td: &str) -> Option<Identity> {
    let rest = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(td)?
        .strip_prefix("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then(|| Identity {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
    })
}

/// The ADS port's TLS: our serving certificate; client certificates verified against `roots`
/// when presented (a token may authenticate instead), HTTP/2 by ALPN.
pub fn tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(visibility: &[(&str, &[&str])]) -> Authenticator {
        Authenticator::new(
            Config {
                trust_domain: "cluster.local".into(),
                visibility: visibility
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                    .collect(),
            },
            None,
        )
    }

    fn caller(ns: &str) -> Caller {
        Caller {
            identity: Identity {
                namespace: ns.into(),
                service_account: "app".into(),
            },
            proof: Proof::Certificate,
        }
    }

    fn node(ns: &str, extra: &[&str]) -> NodeInfo {
        NodeInfo {
            id: "n".into(),
            namespace: ns.into(),
            service: None,
            outbound_port: 15001,
            inbound_port: 15006,
            bind_ports: vec![],
            user_agent: String::new(),
            on_demand: false,
            extra_namespaces: extra.iter().map(|s| s.to_string()).collect(),
            locality: None,
            identity: None,
            narrowed: None,
        }
    }

    #[test]
    fn claims_are_narrowed_to_identity_and_policy() {
        let a = auth(&[("shop", &["shared", "logs"]), ("ops", &["*"])]);
        // Its own namespace whatever it claims, and only the allowed extras.
        let mut n = node("payments", &["*"]);
        let narrowed = a.scope(&caller("shop"), &mut n).unwrap();
        assert_eq!(n.namespace, "shop");
        assert_eq!(n.extra_namespaces, vec!["logs", "shared"]);
        assert_eq!(narrowed.namespace, "payments");
        assert_eq!(narrowed.visible_namespaces, vec!["*"]);
        assert_eq!(
            n.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/app")
        );
        // A namespace with no policy sees only itself.
        let mut n = node("dev", &["shop", "*"]);
        a.scope(&caller("dev"), &mut n).unwrap();
        assert!(n.extra_namespaces.is_empty());
        // Within policy nothing is narrowed.
        let mut n = node("shop", &["shared"]);
        assert_eq!(a.scope(&caller("shop"), &mut n), None);
        let mut n = node("ops", &["*"]);
        assert_eq!(a.scope(&caller("ops"), &mut n), None);
        assert_eq!(n.extra_namespaces, vec!["*"]);
    }

    #[test]
    fn spiffe_ids_of_another_trust_domain_do_not_authenticate() {
        assert_eq!(
            parse_spiffe("spiffe://cluster.local/ns/a/sa/b", "cluster.local"),
            Some(Identity {
                namespace: "a".into(),
                service_account: "b".into()
            })
        );
        for bad in [
            "spiffe://evil.local/ns/a/sa/b",
            "spiffe://cluster.local.evil/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "https://cluster.local/ns/a/sa/b",
        ] {
            assert_eq!(parse_spiffe(bad, "cluster.local"), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn no_credentials_no_stream() {
        let a = auth(&[]);
        let e = a.authenticate(None, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = a.authenticate(None, Some("jwt")).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::Unauthenticated,
            "no reviewer, no tokens"
        );
        let id = caller("x").identity;
        assert_eq!(
            a.authenticate(Some(id.clone()), None)
                .await
                .unwrap()
                .identity,
            id
        );
    }
}
