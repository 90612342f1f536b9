//! The injector's admission webhook: `POST /inject` with an `admission.k8s.io/v1` AdmissionReview
//! of a pod being created, answered with the patch of [`super::patch`] (or none), over HTTPS.
//!
//! The namespace's labels are read from the API server (AdmissionReview does not carry them). A
//! review that is not a pod, or a pod that is not to be injected, is allowed unchanged; a body
//! that is not an AdmissionReview is 400. Whether a failure of the webhook itself blocks pod
//! creation is the MutatingWebhookConfiguration's `failurePolicy` (the chart's value).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use serde::Deserialize;
use serde_json::{json, Value};

use super::patch::{patch, Config};
use crate::metrics::Metrics;

/// Largest review accepted (a pod with large inline configuration still fits).
const MAX_BODY: usize = 4 << 20;

/// What the webhook needs.
pub struct Webhook {
    /// What to inject.
    pub config: Config,
    /// The API server, for namespace labels.
    pub kube: kube::Client,
    /// Admissions counted.
    pub metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct Review {
    #[serde(rename = "apiVersion")]
    api_version: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    uid: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

impl Webhook {
    /// The routes of the webhook's port.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/inject", post(inject))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }

    async fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        match Api::<Namespace>::all(self.kube.clone()).get_opt(ns).await {
            Ok(Some(n)) => n.metadata.labels.unwrap_or_default().into_iter().collect(),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                // The pod's own label still decides; the namespace's is unknown this time.
                tracing::warn!(namespace = ns, error = %e, "reading namespace labels for injection");
                BTreeMap::new()
            }
        }
    }
}

async fn inject(
    State(w): State<Arc<Webhook>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, (StatusCode, String)> {
    let review: Review = serde_json::from_slice(&body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("not an AdmissionReview: {e}"),
        )
    })?;
    if review.api_version != "admission.k8s.io/v1" {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "apiVersion {}: only admission.k8s.io/v1",
                review.api_version
            ),
        ));
    }
    let req = review
        .request
        .ok_or_else(|| (StatusCode::BAD_REQUEST, "request: missing".to_string()))?;
    let mut response = json!({"uid": req.uid, "allowed": true});
    let pod: Option<Pod> = req.object.and_then(|o| serde_json::from_value(o).ok());
    if let Some(pod) = pod {
        let ns = req
            .namespace
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let labels = w.namespace_labels(&ns).await;
        if let Some(ops) = patch(&w.config, &pod, &ns, &labels) {
            let bytes = serde_json::to_vec(&ops).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            w.metrics.injections.inc();
            tracing::info!(namespace = %ns, pod = ?pod.metadata.name.or(pod.metadata.generate_name), "sidecar injected");
        }
    }
    Ok(Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })))
}

/// The webhook's TLS from a certificate chain and key (the CA's, when the control plane runs one).
pub fn tls_from(
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, std::io::Error> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("TLS", &e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| bad("webhook certificate", &e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The webhook's TLS from a PEM certificate chain and key.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, std::io::Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(&cert.display().to_string(), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&cert.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&key.display().to_string(), &e))?;
    tls_from(chain, key)
}
