//! `polaris server`: wires the store, registry, REST API and xDS together and runs them until a
//! shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use tokio::net::TcpListener;

pub mod components;
use components::Components;

use crate::api::{self, AppState};
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::net::Acceptor;
use crate::registry::{self, Registry};
use crate::store::RedbStore;
use crate::xds::auth::Authenticator;
use crate::xds::debug;
use crate::xds::server::{Ads, Nodes};
use crate::xds::snapshot::{self, Cache};
use crate::xds::transport::RequestLimits;

/// Addresses the server actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// REST API.
    pub http: SocketAddr,
    /// ADS gRPC.
    pub xds: SocketAddr,
    /// The CA (HTTPS), when it is on.
    pub ca: Option<SocketAddr>,
    /// PolarisMesh's gRPC client API, when it is on.
    pub grpc: Option<SocketAddr>,
}

/// A Kubernetes client: from `kubeconfig`, else in-cluster, else `$KUBECONFIG` / `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// How long components have to drain after the stop signal (Kubernetes gives 30 s by default
/// between SIGTERM and SIGKILL).
const DRAIN: Duration = Duration::from_secs(25);

/// Runs the control plane until `shutdown` completes, then drains: in-flight HTTP requests finish,
/// queued writes commit, and the store is closed. Every listener is bound before `on_bound` is
/// called; a component that fails stops the server with its error (see [`components`]).
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    cfg.validate()?;
    let (store, etcd): (Arc<dyn crate::store::Store>, _) = match cfg.store {
        crate::config::StoreKind::Embedded => (
            Arc::new(
                RedbStore::open(&cfg.data_dir)
                    .with_context(|| format!("opening store in {}", cfg.data_dir.display()))?,
            ),
            None,
        ),
        crate::config::StoreKind::Etcd => {
            let ec = cfg.etcd_config()?;
            tracing::info!(endpoints = ?ec.endpoints, prefix = %ec.prefix, "registry on etcd");
            let etcd = Arc::new(
                crate::store::EtcdStore::connect(ec)
                    .await
                    .context("connecting to etcd")?,
            );
            (etcd.clone() as Arc<dyn crate::store::Store>, Some(etcd))
        }
    };
    let metrics = Arc::new(Metrics::default());
    let registry = Registry::open(
        store,
        registry::Config {
            check_interval: cfg.health_check_interval(),
            shared_store: cfg.store == crate::config::StoreKind::Etcd,
            ..Default::default()
        },
        metrics.clone(),
    )
    .await?;
    let ready = Arc::new(crate::ready::Readiness::default());
    let mut components = Components::new(ready.clone());
    let started = start(&cfg, &registry, etcd, &metrics, &ready, &mut components).await;
    let result = match started {
        Ok(bound) => {
            tracing::info!(http = %bound.http, xds = %bound.xds, ca = ?bound.ca, grpc = ?bound.grpc, data_dir = %cfg.data_dir.display(), "polaris server started");
            on_bound(bound);
            components
                .run_until(shutdown, DRAIN)
                .await
                .map_err(Into::into)
        }
        Err(e) => {
            // Whatever did start stops before the store closes.
            let _ = components.run_until(async {}, DRAIN).await;
            Err(e)
        }
    };
    tracing::info!("draining: waiting for queued writes to commit");
    registry.close().await?;
    result?;
    tracing::info!("polaris server stopped");
    Ok(())
}

/// Binds every listener and starts every component the configuration turns on.
async fn start(
    cfg: &ServerConfig,
    registry: &Registry,
    etcd: Option<Arc<crate::store::EtcdStore>>,
    metrics: &Arc<Metrics>,
    ready: &Arc<crate::ready::Readiness>,
    components: &mut Components,
) -> anyhow::Result<Bound> {
    tracing::debug!("binding listeners");
    let http = crate::net::bind_tcp(cfg.http_addr)
        .with_context(|| format!("binding REST API on {}", cfg.http_addr))?;
    let xds = crate::net::bind_tcp(cfg.xds_addr)
        .with_context(|| format!("binding xDS on {}", cfg.xds_addr))?;
    let ca = match cfg.ca()? {
        Some(ca_cfg) => {
            let kube = kube_client(cfg.kubeconfig.as_deref()).await?;
            let listener = crate::net::bind_tcp(ca_cfg.addr)
                .with_context(|| format!("binding the CA on {}", ca_cfg.addr))?;
            let ca = crate::ca::start(ca_cfg, kube, metrics.clone()).await?;
            let acceptor =
                Acceptor::new(listener, cfg.http_limits(), metrics.ca_conns.clone(), "ca")
                    .with_tls(ca.tls_config()?);
            Some((ca, acceptor))
        }
        None => None,
    };
    let grpc = match cfg.grpc_addr {
        Some(a) => Some(
            crate::net::bind_tcp(a)
                .with_context(|| format!("binding the gRPC client API on {a}"))?,
        ),
        None => None,
    };
    let rls = match cfg.rls_addr {
        Some(a) => Some(
            crate::net::bind_tcp(a)
                .with_context(|| format!("binding the rate-limit service on {a}"))?,
        ),
        None => None,
    };
    let webhook = match cfg.webhook_addr {
        Some(addr) => Some(webhook(cfg, addr, ca.as_ref().map(|(c, _)| c), metrics).await?),
        None => None,
    };
    let kube_controller = match cfg.kubernetes {
        true => Some(kube_client(cfg.kubeconfig.as_deref()).await?),
        false => None,
    };
    raise_fd_limit(cfg);
    let http = Acceptor::new(http, cfg.http_limits(), metrics.http_conns.clone(), "http");
    let xds_bound = xds.local_addr()?;
    let xds_security = xds_security(cfg, ca.as_ref().map(|(c, _)| c), xds_bound).await?;
    let mut xds = Acceptor::new(xds, cfg.xds_limits(), metrics.xds_conns.clone(), "xds");
    if let Some((tls, _)) = &xds_security {
        xds = xds.with_tls(tls.clone());
    }
    let bound = Bound {
        http: http.local_addr()?.expect("a TCP listener"),
        xds: xds.local_addr()?.expect("a TCP listener"),
        ca: match &ca {
            Some((_, a)) => a.local_addr()?,
            None => None,
        },
        grpc: grpc.as_ref().map(TcpListener::local_addr).transpose()?,
    };
    let stop = components.stop_signal();

    // Cluster mode: this replica joins, and heartbeat health goes to one owner per instance.
    let mut cluster_routes = None;
    let mut replicas: Option<Arc<dyn Fn() -> usize + Send + Sync>> = None;
    if let Some(etcd) = etcd {
        let cc = cfg.cluster_config(bound.http)?;
        let id = cc.id.clone();
        let cluster =
            crate::cluster::Cluster::start(etcd.client(), etcd.prefix(), cc, stop.clone())
                .await
                .context("joining the cluster in etcd")?;
        tracing::info!(replica = %id, members = cluster.members().len(), "joined the cluster");
        registry.set_ownership(Arc::new(cluster.clone()));
        let members = cluster.clone();
        replicas = Some(Arc::new(move || members.members().len()));
        cluster_routes = Some(crate::cluster::routes(cluster, registry.clone()));
        // Not ready while the store does not answer: writes would fail (reads and xDS go on).
        let (ready, mut health) = (ready.clone(), registry.store_health());
        components.spawn_background("store health", async move {
            loop {
                match health.borrow_and_update().clone() {
                    None => ready.ready("store"),
                    Some(why) => ready.not_ready("store", format!("etcd: {why}")),
                }
                if health.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
    }

    // xDS: the snapshot builder feeds the cache the ADS streams read.
    let request_limits = Arc::new(RequestLimits::new(
        cfg.xds_max_request_bytes,
        cfg.xds_decode_budget_bytes,
        Duration::from_millis(cfg.first_request_timeout_ms),
        metrics.clone(),
    ));
    let cache = Arc::new(Cache::default());
    let nodes = Arc::new(Nodes::default());
    components.spawn_background(
        "snapshot builder",
        snapshot::run(registry.clone(), cache.clone(), cfg.snapshot_config()),
    );
    let mut ads =
        Ads::new(cache.clone(), metrics.clone(), nodes.clone()).with_shutdown(stop.clone());
    if let Some((_, auth)) = xds_security {
        ads = ads.with_auth(auth);
    }
    components.spawn(
        "xds",
        crate::xds::transport::serve(xds, ads.into_service(request_limits), stop.clone()),
    );

    // REST.
    let auth_cfg = cfg.api_auth();
    if auth_cfg.enabled {
        if let Some(path) = api::auth::ensure_admin(registry, cfg.admin_secret()?).await? {
            tracing::warn!(path = %path.display(), "REST authentication on: generated the admin token, readable only by this user, in this file");
        }
        tracing::info!(
            public_metrics = auth_cfg.public_metrics,
            public_debug = auth_cfg.public_debug,
            "REST authentication on (X-Polaris-Token)"
        );
    } else if !cfg.http_addr.ip().is_loopback() {
        tracing::warn!(http = %cfg.http_addr, "REST authentication is OFF on a non-loopback address (--auth off): anyone who reaches the port can change the registry");
    }
    let streams = nodes.clone();
    let state = AppState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        xds_streams: Arc::new(move || streams.len() as u64),
        auth: Arc::new(api::auth::Auth::new(
            auth_cfg,
            registry.clone(),
            metrics.clone(),
        )),
        global_limits: cfg.rls_addr.is_some(),
        ready: ready.clone(),
    };
    let mut extra = debug::routes(cache, nodes, registry.clone());
    if let Some(r) = cluster_routes {
        extra = extra.merge(r);
    }
    if let Some(l) = grpc {
        if !cfg.api_auth().enabled && !bound.grpc.is_some_and(|a| a.ip().is_loopback()) {
            tracing::warn!(grpc = ?bound.grpc, "authentication is OFF (--auth off, or the REST port is loopback) while the gRPC client API listens on a non-loopback address: anyone who reaches it can register instances");
        }
        components.spawn(
            "grpc client api",
            api::grpc::serve(state.clone(), l, stop.clone()),
        );
    }
    let app = api::router(state, extra);
    components.spawn("rest", api::serve(http, app, stop.clone()));

    if let Some((ca, acceptor)) = ca {
        components.spawn("ca", api::serve(acceptor, ca.router(), stop.clone()));
    }
    if let Some((acceptor, router)) = webhook {
        components.spawn("webhook", api::serve(acceptor, router, stop.clone()));
    }
    if let Some(l) = rls {
        let rls = crate::rls::Rls::new(registry.clone(), metrics.clone(), cfg.rls_max_values);
        if let Some(r) = replicas {
            rls.set_replicas(r);
        }
        components.spawn(
            "rate-limit service",
            crate::rls::serve(rls, l, stop.clone()),
        );
    }
    if let Some(kube) = kube_controller {
        components.spawn(
            "kubernetes controller",
            crate::controller::run::run(
                kube,
                Arc::new(crate::controller::target::Local {
                    registry: registry.clone(),
                    metrics: metrics.clone(),
                }),
                cfg.controller_config(),
                metrics.clone(),
                ready.clone(),
                stop,
            ),
        );
    }
    Ok(bound)
}

/// The injector's webhook: its listener with TLS (certificate from files, or issued by the CA
/// whose root is then the caBundle) and its router.
async fn webhook(
    cfg: &ServerConfig,
    addr: SocketAddr,
    ca: Option<&Arc<crate::ca::Ca>>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Acceptor, axum::Router)> {
    let tls = match (&cfg.webhook_cert_file, &cfg.webhook_key_file, ca) {
        (Some(cert), Some(key), _) => crate::inject::webhook::tls_config(cert, key)?,
        (None, None, Some(ca)) => {
            let mut names = cfg.webhook_dns_names.clone();
            names.extend(["localhost".to_string(), addr.ip().to_string()]);
            if !addr.ip().is_loopback() {
                names.push("127.0.0.1".into());
            }
            let (chain, key) = ca.serving_cert(&names, "polaris-webhook")?;
            crate::inject::webhook::tls_from(chain, key)?
        }
        _ => anyhow::bail!(
            "--webhook-addr needs --webhook-cert-file and --webhook-key-file, or the CA (--ca-addr) to issue its certificate"
        ),
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the webhook on {addr}"))?;
    let mut config = cfg.inject_config();
    // Beside the CA, pods get its root in an annotation (no ConfigMap per namespace to publish).
    config.root_pem = ca.map(|ca| ca.root_pem().to_string());
    let w = Arc::new(crate::inject::webhook::Webhook {
        config,
        kube: kube_client(cfg.kubeconfig.as_deref()).await?,
        metrics: metrics.clone(),
    });
    let acceptor = Acceptor::new(
        listener,
        cfg.http_limits(),
        metrics.webhook_conns.clone(),
        "webhook",
    )
    .with_tls(tls);
    Ok((acceptor, w.router()))
}

/// The ADS port's TLS and authenticator, when it authenticates: its certificate from files or
/// the CA, client roots from a file or the CA, ServiceAccount tokens reviewed when a Kubernetes
/// API is configured.
async fn xds_security(
    cfg: &ServerConfig,
    ca: Option<&Arc<crate::ca::Ca>>,
    bound: std::net::SocketAddr,
) -> anyhow::Result<Option<(Arc<rustls::ServerConfig>, Arc<Authenticator>)>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if !cfg.xds_auth_on() {
        if !cfg.xds_addr.ip().is_loopback() {
            tracing::warn!(xds = %cfg.xds_addr, "ADS authentication is OFF on a non-loopback address (--xds-auth off): any client can read every namespace's configuration");
        }
        return Ok(None);
    }
    let read_certs = |p: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        CertificateDer::pem_file_iter(p)
            .with_context(|| format!("reading {}", p.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("certificates in {}", p.display()))
    };
    let (chain, key) = match (&cfg.xds_cert_file, &cfg.xds_key_file, ca) {
        (Some(c), Some(k), _) => (
            read_certs(c)?,
            PrivateKeyDer::from_pem_file(k).with_context(|| format!("key in {}", k.display()))?,
        ),
        (None, None, Some(ca)) => {
            let mut names = vec!["localhost".to_string(), bound.ip().to_string()];
            if !bound.ip().is_loopback() {
                names.push("127.0.0.1".into());
            }
            names.extend(cfg.xds_dns_names.iter().cloned());
            ca.serving_cert(&names, "polaris-xds")?
        }
        _ => anyhow::bail!(
            "ADS authentication is on (--xds-auth, or a non-loopback xdsAddr) but the ADS port has no certificate: give xdsCertFile and xdsKeyFile, or turn the CA on (--ca-addr)"
        ),
    };
    let roots = match (&cfg.xds_client_ca_file, ca) {
        (Some(f), _) => read_certs(f)?,
        (None, Some(ca)) => CertificateDer::pem_slice_iter(ca.root_pem().as_bytes())
            .collect::<Result<_, _>>()
            .context("the CA's root")?,
        (None, None) => anyhow::bail!(
            "ADS authentication needs the roots client certificates chain to: xdsClientCaFile, or the CA (--ca-addr)"
        ),
    };
    let tls = crate::xds::auth::tls_config(chain, key, roots)?;
    let reviewer: Option<Arc<dyn crate::ca::review::Reviewer>> = match kube_client(
        cfg.kubeconfig.as_deref(),
    )
    .await
    {
        Ok(kube) => Some(Arc::new(crate::ca::review::Cached::new(
            crate::ca::review::KubeReviewer::new(
                kube,
                cfg.xds_audiences.clone(),
                Duration::from_secs(5),
            ),
            Duration::from_secs(cfg.ca_review_cache_secs),
            10_000,
        ))),
        Err(e) => {
            tracing::info!(error = %e, "ADS: no Kubernetes API, so only client certificates authenticate (no ServiceAccount tokens)");
            None
        }
    };
    let auth = Authenticator::new(
        crate::xds::auth::Config {
            trust_domain: cfg.trust_domain.clone(),
            visibility: cfg.xds_visibility.clone(),
        },
        reviewer,
    );
    tracing::info!(tokens = auth.accepts_tokens(), "ADS authentication on: TLS, client certificates of the trust domain or ServiceAccount tokens");
    Ok(Some((tls, Arc::new(auth))))
}

/// Raises the soft limit on open files to the hard limit: every connection is a descriptor, and the
/// ports may hold as many as their maximums allow.
fn raise_fd_limit(cfg: &ServerConfig) {
    let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() else {
        return;
    };
    if soft < hard {
        if let Err(e) = rlimit::Resource::NOFILE.set(hard, hard) {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
        }
    }
    let limit = rlimit::Resource::NOFILE.get().map_or(soft, |(s, _)| s);
    let wanted = (cfg.xds_max_connections + cfg.http_max_connections) as u64 + 256;
    if limit < wanted {
        tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below xdsMaxConnections + httpMaxConnections: accepts will fail before the connection limits apply"
        );
    }
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
