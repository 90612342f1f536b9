//! The ADS server: state-of-the-world and delta streams over one per-stream state machine.
//!
//! Each stream is one state machine that owns its state (subscriptions per type, what the client
//! holds, nonces) and reads only published snapshots; its response body drives it
//! (`transport::ResponseBody`). It wakes on a client request or a new snapshot; a slow client parks
//! only its own state machine, and the snapshots it missed coalesce to the latest (the `watch`
//! channel keeps one value). Responses go out in ADS order: CDS, EDS, LDS, RDS.

//!
//! The engine is split by job: `state` holds a stream's bookkeeping (what the client holds, ACKs,
//! NACKs, snapshot changes) and its loop, `view` decides what a node gets (its namespace, the
//! namespaces it may see, its node-local resources), `sotw` and `delta` are the two protocols. The
//! engine serves whatever [`Cache`] it is given: the control plane's snapshot builder publishes
//! into one, and the sidecar agent's certificate store into another (SDS).

mod delta;
mod sotw;
mod sotw_request;
mod state;
mod view;

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

pub use super::node::NodeInfo;
pub use super::status::{NodeStatus, Nodes, TypeStatus};

use super::auth::{Authenticator, Caller};
use super::names::NameSets;
use super::snapshot::{Cache, Res};
use super::transport::{AdsService, Driver, RequestLimits, Requests, Tx};
use super::TypeKind;
use crate::metrics::Metrics;
pub use sotw_request::SotwRequest;
use state::StreamState;

/// The ADS service.
#[derive(Clone)]
pub struct Ads {
    pub(super) cache: Arc<Cache>,
    /// Authenticates streams (`None`: every stream is served as its node claims).
    pub(super) auth: Option<Arc<Authenticator>>,
    metrics: Arc<Metrics>,
    nodes: Arc<Nodes>,
    sets: Arc<NameSets>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Ads {
    /// A new service over `cache`.
    pub fn new(cache: Arc<Cache>, metrics: Arc<Metrics>, nodes: Arc<Nodes>) -> Self {
        Ads {
            cache,
            auth: None,
            metrics,
            nodes,
            sets: Arc::default(),
            shutdown: None,
        }
    }

    /// Ends every stream when `shutdown` turns true (so a graceful stop does not wait on
    /// long-lived streams; clients reconnect elsewhere).
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// Streams must prove an identity, which scopes what their nodes get.
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Counts and logs a stream refused for its credentials (never the credentials).
    pub(crate) fn auth_refused(&self, peer: Option<crate::net::Peer>, status: &tonic::Status) {
        self.metrics.xds_auth_refused.inc();
        tracing::warn!(peer = ?peer, code = ?status.code(), "xDS stream refused: {}", status.message());
    }

    /// The tonic service.
    pub fn into_service(self, limits: Arc<RequestLimits>) -> AdsService {
        AdsService::new(self, limits)
    }

    /// The state machine of one SotW stream, driven by the stream's response body.
    pub fn sotw_stream(
        &self,
        inbound: Requests<SotwRequest>,
        tx: Tx,
        peer: Option<crate::net::Peer>,
        caller: Option<Caller>,
    ) -> Driver {
        // The state lives in its own allocation: the future stays small.
        let st = StreamState::new(self, "sotw", peer, caller);
        Box::pin(Box::new(st).run(
            inbound,
            tx,
            StreamState::sotw_request,
            StreamState::sotw_push,
        ))
    }

    /// The state machine of one delta stream, driven by the stream's response body.
    pub fn delta_stream(
        &self,
        inbound: Requests<DeltaDiscoveryRequest>,
        tx: Tx,
        peer: Option<crate::net::Peer>,
        caller: Option<Caller>,
    ) -> Driver {
        let st = StreamState::new(self, "delta", peer, caller);
        Box::pin(Box::new(st).run(
            inbound,
            tx,
            StreamState::delta_request,
            StreamState::delta_push,
        ))
    }
}

async fn stopped(rx: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match rx {
        Some(r) => {
            if r.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending().await,
    }
}

/// The resources a node with these settings would get from `cache` as a wildcard subscriber
/// (what `/debug/xds/config` shows).
pub fn resources_for(cache: &Arc<Cache>, node: &NodeInfo) -> Vec<(TypeKind, Res)> {
    let ads = Ads::new(
        cache.clone(),
        Arc::new(Metrics::default()),
        Arc::new(Nodes::default()),
    );
    let mut st = StreamState::new(&ads, "view", None, None);
    st.node = Some(node.clone());
    st.rebuild_locals();
    let mut out = Vec::new();
    for k in TypeKind::ALL {
        for r in st.wildcard_set(k) {
            out.push((k, r));
        }
    }
    out
}
