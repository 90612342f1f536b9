//! `polaris server`: wires the store, registry, REST API and xDS together and runs them until a
//! shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::{self, Registry};
use crate::store::RedbStore;

/// Addresses the server actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// REST API.
    pub http: SocketAddr,
}

/// Runs the control plane until `shutdown` completes, then drains: in-flight HTTP requests finish,
/// queued writes commit, and the store is closed.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    cfg.validate()?;
    let store = Arc::new(
        RedbStore::open(&cfg.data_dir)
            .with_context(|| format!("opening store in {}", cfg.data_dir.display()))?,
    );
    let metrics = Arc::new(Metrics::default());
    let registry = Registry::open(
        store,
        registry::Config {
            check_interval: cfg.health_check_interval(),
            ..Default::default()
        },
        metrics.clone(),
    )
    .await?;
    let http = TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding REST API on {}", cfg.http_addr))?;
    let bound = Bound {
        http: http.local_addr()?,
    };
    let state = AppState {
        registry: registry.clone(),
        metrics,
        xds_streams: Arc::new(|| 0),
    };
    let app = api::router(state, axum::Router::new());
    tracing::info!(http = %bound.http, data_dir = %cfg.data_dir.display(), "polaris server started");
    on_bound(bound);
    axum::serve(http, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("REST API server")?;
    tracing::info!("draining: waiting for queued writes to commit");
    registry.close().await?;
    tracing::info!("polaris server stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}
