//! Where the controller's desired state goes: the registry of the same process ([`Local`]), or a
//! control plane reached over REST ([`Remote`], `polaris controller`), whose server plans against
//! its own registry with the same [`Local`] (`POST /controller/v1/sync`). Either way a plan is made
//! against the registry as it is at that moment, so other writers (SDKs, other clusters) are seen,
//! and equal state writes nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::reconcile::{apply, plan};
use super::translate::{self, owned, DesiredService};
use crate::metrics::Metrics;
use crate::model::ServiceKey;
use crate::registry::Registry;

/// One service to bring to its desired state (`None`: to nothing this cluster owns).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncItem {
    /// The registry service.
    pub service: ServiceKey,
    /// What it should be.
    pub desired: Option<DesiredService>,
}

/// What a sync did.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncOutcome {
    /// Registry items written.
    pub writes: usize,
    /// Instances left alone because another writer holds their address (service, instance id).
    pub foreign: Vec<(ServiceKey, String)>,
    /// Services that could not be synced, and why (the next pass retries).
    pub failed: Vec<(ServiceKey, String)>,
}

/// Why a target could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The control plane's REST API failed or refused.
    #[error("control plane at {url}: {source}")]
    Http {
        /// Its URL.
        url: String,
        /// The error.
        source: reqwest::Error,
    },
    /// The control plane answered with an error.
    #[error("control plane at {url} answered {status}: {body}")]
    Refused {
        /// Its URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Its answer.
        body: String,
    },
}

/// A registry the controller syncs into.
#[async_trait::async_trait]
pub trait Target: Send + Sync {
    /// Brings each item's service to its desired state, as cluster `cfg.cluster_name`.
    async fn sync(
        &self,
        cfg: &translate::Config,
        items: Vec<SyncItem>,
    ) -> Result<SyncOutcome, TargetError>;

    /// Services (not aliases) this cluster owns, or owns instances of.
    async fn owned(&self, cfg: &translate::Config) -> Result<Vec<ServiceKey>, TargetError>;
}

/// The registry of this process.
pub struct Local {
    /// The registry.
    pub registry: Registry,
    /// Where writes are counted.
    pub metrics: std::sync::Arc<Metrics>,
}

impl Local {
    /// [`Target::sync`] without the trait object (the REST handler calls it).
    pub async fn sync_items(&self, cfg: &translate::Config, items: Vec<SyncItem>) -> SyncOutcome {
        let mut out = SyncOutcome::default();
        let now = crate::model::now_rfc3339();
        for item in items {
            let key = item.service;
            let p = match plan(
                cfg,
                &key,
                item.desired.as_ref(),
                &self.registry.read(),
                &now,
            ) {
                Ok(p) => p,
                Err(e) => {
                    out.failed.push((key, e.to_string()));
                    continue;
                }
            };
            out.foreign
                .extend(p.foreign.iter().map(|id| (key.clone(), id.clone())));
            let n = p.writes();
            if n == 0 {
                continue;
            }
            match apply(&self.registry, p).await {
                Ok(()) => {
                    self.metrics.controller_writes.add(n as u64);
                    out.writes += n;
                }
                Err(e) => out.failed.push((key, e.to_string())),
            }
        }
        out
    }

    /// [`Target::owned`] without the trait object.
    pub fn owned_keys(&self, cfg: &translate::Config) -> Vec<ServiceKey> {
        self.registry
            .read()
            .services
            .iter()
            .filter(|(_, e)| {
                e.service.alias_for.is_none()
                    && (owned(cfg, &e.service.metadata)
                        || e.instances.values().any(|i| owned(cfg, &i.metadata)))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl Target for Local {
    async fn sync(
        &self,
        cfg: &translate::Config,
        items: Vec<SyncItem>,
    ) -> Result<SyncOutcome, TargetError> {
        Ok(self.sync_items(cfg, items).await)
    }

    async fn owned(&self, cfg: &translate::Config) -> Result<Vec<ServiceKey>, TargetError> {
        Ok(self.owned_keys(cfg))
    }
}

/// The body of `POST /controller/v1/sync`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncRequest {
    /// The writing cluster (what it owns is what it may change).
    pub cluster_name: String,
    /// The services.
    pub items: Vec<SyncItem>,
}

/// The answer of `GET /controller/v1/owned`.
#[derive(Debug, Serialize, Deserialize)]
pub struct OwnedAnswer {
    /// The services.
    pub services: Vec<ServiceKey>,
}

/// A control plane's REST API (`polaris controller --server URL`).
pub struct Remote {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

/// Services per request: a full pass of a large cluster goes in several bodies of bounded size.
const PER_REQUEST: usize = 100;

impl Remote {
    /// The control plane at `url` (`http://host:port`, or `https://` with `roots`: the PEM
    /// certificates its serving certificate chains to), authenticating with `token` when given.
    pub fn new(
        url: &str,
        token: Option<String>,
        roots: Option<&[u8]>,
    ) -> Result<Remote, reqwest::Error> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(pem) = roots {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Remote {
            http: b.build()?,
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn request(&self, rq: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rq.header("X-Polaris-Token", t),
            None => rq,
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        rq: reqwest::RequestBuilder,
    ) -> Result<T, TargetError> {
        let http = |source| TargetError::Http {
            url: self.url.clone(),
            source,
        };
        let r = self.request(rq).send().await.map_err(http)?;
        let status = r.status();
        if !status.is_success() {
            return Err(TargetError::Refused {
                url: self.url.clone(),
                status: status.as_u16(),
                body: r.text().await.unwrap_or_default(),
            });
        }
        r.json().await.map_err(http)
    }
}

#[async_trait::async_trait]
impl Target for Remote {
    async fn sync(
        &self,
        cfg: &translate::Config,
        items: Vec<SyncItem>,
    ) -> Result<SyncOutcome, TargetError> {
        let mut out = SyncOutcome::default();
        let mut items = items;
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(PER_REQUEST));
            let body = SyncRequest {
                cluster_name: cfg.cluster_name.clone(),
                items,
            };
            let o: SyncOutcome = self
                .send(
                    self.http
                        .post(format!("{}/controller/v1/sync", self.url))
                        .json(&body),
                )
                .await?;
            out.writes += o.writes;
            out.foreign.extend(o.foreign);
            out.failed.extend(o.failed);
            items = rest;
        }
        Ok(out)
    }

    async fn owned(&self, cfg: &translate::Config) -> Result<Vec<ServiceKey>, TargetError> {
        let a: OwnedAnswer = self
            .send(
                self.http
                    .get(format!("{}/controller/v1/owned", self.url))
                    .query(&[("clusterName", &cfg.cluster_name)]),
            )
            .await?;
        Ok(a.services)
    }
}
