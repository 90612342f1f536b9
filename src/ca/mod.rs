//! polaris-security: the CA that signs sidecars' certificates.
//!
//! `POST /security/v1/sign_certificate` (HTTPS), body `{csr, ttl}`, header
//! `Authorization: Bearer <ServiceAccount token>`, answer `{cert_chain, root_cert, msg}` as
//! PolarisMesh's. Each request goes through the steps of [`sign`]: the CSR is read and its
//! self-signature verified (proof of possession), the token is reviewed by the Kubernetes API
//! ([`review`]), the CSR's one SPIFFE id must be the reviewed ServiceAccount's (PolarisMesh skips
//! this check; we do not), and only then is it signed. Every decision is logged and counted;
//! tokens are never logged.

pub mod material;
pub mod review;
pub mod sign;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::metrics::{CaDenial, Metrics};
use review::{ReviewError, Reviewer};
use sign::{Identity, Issuer, SignError};

/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;

/// The CA's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTPS address.
    pub addr: SocketAddr,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Certificate lifetime when the request asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime granted.
    pub max_ttl: Duration,
    /// Audiences a token must be for.
    pub audiences: Vec<String>,
    /// Signs per minute per identity (and the burst).
    pub signs_per_minute: u32,
    /// How long a positive TokenReview is reused (0: never).
    pub review_cache: Duration,
    /// How long a TokenReview may take.
    pub review_timeout: Duration,
    /// The key and certificates.
    pub source: material::Source,
    /// Names of the CA's own serving certificate (besides `localhost` and the bound address).
    pub dns_names: Vec<String>,
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its key material.
    #[error("CA key material: {0}")]
    Material(#[from] material::MaterialError),
    /// Its TLS configuration.
    #[error("CA TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The signing service.
pub struct Ca {
    config: Config,
    issuer: Issuer,
    reviewer: Arc<dyn Reviewer>,
    /// Signs per identity.
    limiter: crate::limit::Buckets<Identity>,
    metrics: Arc<Metrics>,
}

/// The request, as PolarisMesh's agent sends it.
#[derive(Debug, Deserialize)]
pub struct SignRequest {
    /// PEM CSR.
    pub csr: String,
    /// Seconds; 0 or absent: the default.
    #[serde(default)]
    pub ttl: i64,
}

/// The answer, as PolarisMesh's CA gives it.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct SignResponse {
    /// Leaf, then the CA's chain up to the root (PEM).
    pub cert_chain: String,
    /// The root (PEM).
    pub root_cert: String,
    /// `OK`, or what went wrong.
    pub msg: String,
}

struct Denied {
    status: StatusCode,
    reason: CaDenial,
    msg: String,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(SignResponse {
                msg: self.msg,
                ..Default::default()
            }),
        )
            .into_response()
    }
}

impl Ca {
    /// A CA signing with `issuer`, reviewing tokens with `reviewer`.
    pub fn new(
        config: Config,
        issuer: Issuer,
        reviewer: Arc<dyn Reviewer>,
        metrics: Arc<Metrics>,
    ) -> Ca {
        Ca {
            limiter: crate::limit::Buckets::new(config.signs_per_minute),
            config,
            issuer,
            reviewer,
            metrics,
        }
    }

    /// The root certificate clients verify the CA (and the certificates it signs) with.
    pub fn root_pem(&self) -> &str {
        &self.issuer.root_pem
    }

    /// A server certificate for another port of the control plane (the ADS port), for `names`.
    pub fn serving_cert(
        &self,
        names: &[String],
        common_name: &str,
    ) -> Result<
        (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        Error,
    > {
        Ok(material::serving_cert(&self.issuer, names, common_name)?)
    }

    /// The TLS configuration of the CA's own port.
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut names = self.config.dns_names.clone();
        names.push("localhost".into());
        names.push(self.config.addr.ip().to_string());
        if !self.config.addr.ip().is_loopback() {
            names.push("127.0.0.1".into());
        }
        let (chain, key) = material::serving_cert(&self.issuer, &names, "polaris-security")?;
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(Arc::new(cfg))
    }

    /// The routes of the CA's port.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/security/v1/sign_certificate", post(sign_certificate))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }

    async fn decide(&self, headers: &HeaderMap, body: &[u8]) -> Result<(Identity, String), Denied> {
        let deny = |status, reason, msg: String| Denied {
            status,
            reason,
            msg,
        };
        let req: SignRequest = serde_json::from_slice(body).map_err(|e| {
            deny(
                StatusCode::BAD_REQUEST,
                CaDenial::BadRequest,
                format!("bad request body: {e}"),
            )
        })?;
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                deny(
                    StatusCode::UNAUTHORIZED,
                    CaDenial::Unauthenticated,
                    "no bearer token (Authorization: Bearer <ServiceAccount token>)".into(),
                )
            })?;
        let ttl = match req.ttl {
            t if t <= 0 => self.config.default_ttl,
            t => Duration::from_secs(t as u64).min(self.config.max_ttl),
        };
        let csr = sign::parse_csr(&req.csr)
            .map_err(|e| deny(StatusCode::BAD_REQUEST, CaDenial::BadRequest, e.to_string()))?;
        let identity = self.reviewer.review(token).await.map_err(|e| match e {
            ReviewError::Unavailable(_) => deny(
                StatusCode::SERVICE_UNAVAILABLE,
                CaDenial::ReviewUnavailable,
                e.to_string(),
            ),
            e => deny(
                StatusCode::UNAUTHORIZED,
                CaDenial::Unauthenticated,
                e.to_string(),
            ),
        })?;
        sign::check_identity(&csr, &identity, &self.config.trust_domain)
            .map_err(|e| deny(StatusCode::FORBIDDEN, CaDenial::Forbidden, e.to_string()))?;
        if !self.limiter.allow(&identity) {
            return Err(deny(
                StatusCode::TOO_MANY_REQUESTS,
                CaDenial::RateLimited,
                format!(
                    "{identity} asked for more than {} certificates a minute",
                    self.config.signs_per_minute
                ),
            ));
        }
        let leaf = sign::sign(csr, &self.issuer, ttl, std::time::SystemTime::now()).map_err(
            |e: SignError| {
                deny(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    CaDenial::Internal,
                    e.to_string(),
                )
            },
        )?;
        Ok((identity, leaf))
    }
}

async fn sign_certificate(State(ca): State<Arc<Ca>>, headers: HeaderMap, body: Bytes) -> Response {
    match ca.decide(&headers, &body).await {
        Ok((identity, leaf)) => {
            ca.metrics.ca_issued.inc();
            tracing::info!(identity = %identity, "certificate issued");
            Json(SignResponse {
                cert_chain: format!("{leaf}{}", ca.issuer.chain_pem),
                root_cert: ca.issuer.root_pem.clone(),
                msg: "OK".into(),
            })
            .into_response()
        }
        Err(d) => {
            ca.metrics.ca_denied(d.reason);
            tracing::warn!(status = d.status.as_u16(), reason = d.reason.label(), msg = %d.msg, "certificate denied");
            d.into_response()
        }
    }
}

/// Builds the CA from `config`: its material (files, secret, or the development root in
/// `data_dir`), and TokenReview through `kube`.
pub async fn start(
    config: Config,
    kube: kube::Client,
    metrics: Arc<Metrics>,
) -> Result<Arc<Ca>, Error> {
    let (issuer, dev) = material::load(&config.source, Some(kube.clone())).await?;
    if dev {
        tracing::warn!(
            source = ?config.source,
            "CA in development mode: a self-signed root generated in the data directory signs every certificate"
        );
    }
    let reviewer: Arc<dyn Reviewer> = Arc::new(review::Cached::new(
        review::KubeReviewer::new(kube, config.audiences.clone(), config.review_timeout),
        config.review_cache,
        10_000,
    ));
    Ok(Arc::new(Ca::new(config, issuer, reviewer, metrics)))
}
