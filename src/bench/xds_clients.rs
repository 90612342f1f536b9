//! The client side of `bench xds` (`polaris bench xds-clients`, started by it): C simulated
//! proxies, each on its own HTTP/2 connection, behaving like Envoy (wildcard CDS and LDS, EDS for
//! every cluster, RDS for the route configurations their listeners name, VHDS when on demand,
//! every response ACKed), reporting when each got the change the server side armed them for.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::xds::{now_ns, raise_fd_limit, Mode};
use crate::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, VIRTUAL_HOST_TYPE};

/// Hidden client-side process arguments.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// ADS address.
    #[arg(long)]
    addr: String,
    /// Clients.
    #[arg(long)]
    clients: usize,
    /// Clusters each client must hold before it counts as synced.
    #[arg(long)]
    clusters: usize,
    /// Protocol.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Connect over mTLS with `client.pem`, `client-key.pem` and the root `ca.pem` in this
    /// directory.
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// Clients are sidecars of `svc-<id % callers>` (0: of no service).
    #[arg(long, default_value_t = 0)]
    callers: usize,
    /// On-demand clients subscribing to the hosts of `svc-0`..`svc-<N-1>` (0: not on demand).
    #[arg(long, default_value_t = 0)]
    on_demand_hosts: usize,
}

/// The clients' TLS, when the server authenticates (set once at the client process's start).
static CLIENT_TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

fn client_tls(dir: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem"))?)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_file(dir.join("client.pem"))?],
        PrivateKeyDer::from_pem_file(dir.join("client-key.pem"))?,
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Events from client tasks: (client, cluster name whose load assignment arrived, or
/// [`RDS_EVENT`] for a route configuration, when).
type Event = (usize, String, u128);

/// The event name of a route configuration's arrival.
pub(super) const RDS_EVENT: &str = "rds";

/// The route configurations the listeners' connection managers name (as Envoy subscribes RDS).
fn rds_names<'a>(listeners: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    use envoy_types::pb::envoy::config::listener::v3::{filter::ConfigType, Listener};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };
    use prost::Message;
    let mut out = Vec::new();
    for bytes in listeners {
        let Ok(l) = Listener::decode(bytes) else {
            continue;
        };
        for f in l.filter_chains.iter().flat_map(|c| c.filters.iter()) {
            let Some(ConfigType::TypedConfig(tc)) = &f.config_type else {
                continue;
            };
            if let Ok(hcm) = HttpConnectionManager::decode(tc.value.as_slice()) {
                if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                    out.push(rds.route_config_name);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The client process: C simulated proxies.
pub async fn clients(a: ClientArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    if let Some(dir) = &a.tls_dir {
        let _ = CLIENT_TLS.set(client_tls(dir)?);
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let synced = Arc::new(AtomicUsize::new(0));
    // Streams that failed (and reconnected, as Envoy would): reported, never hidden.
    let failures = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    for id in 0..a.clients {
        let (addr, ev_tx, synced, failures) = (
            a.addr.clone(),
            ev_tx.clone(),
            synced.clone(),
            failures.clone(),
        );
        let clusters = a.clusters;
        let mode = a.mode;
        let node = bench_node(id, a.callers, a.on_demand_hosts > 0);
        let hosts = a.on_demand_hosts;
        tokio::spawn(async move {
            // Like Envoy: reconnect after a failure (e.g. a reset while 1000 clients connect).
            let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
            for attempt in 0..20u64 {
                let r = match mode {
                    Mode::Delta => {
                        delta_client(
                            id,
                            node.clone(),
                            &addr,
                            Synced { clusters, hosts },
                            ev_tx.clone(),
                            synced.clone(),
                            counted.clone(),
                        )
                        .await
                    }
                    Mode::Sotw => {
                        sotw_client(
                            id,
                            node.clone(),
                            &addr,
                            clusters,
                            ev_tx.clone(),
                            synced.clone(),
                            counted.clone(),
                        )
                        .await
                    }
                };
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        if failures.fetch_add(1, Ordering::Relaxed) < 5 || attempt == 19 {
                            eprintln!("client {id} (attempt {attempt}): {e:#}");
                        }
                        if attempt == 19 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50 + (id as u64 % 50) * 4)).await
                    }
                }
            }
        });
        if id % 50 == 49 {
            tokio::task::yield_now().await;
        }
    }
    while synced.load(Ordering::Relaxed) < a.clients {
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {} clients synced",
                synced.load(Ordering::Relaxed),
                a.clients
            );
        }
        while ev_rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = std::io::stdout();
    writeln!(
        out,
        "READY {:.3} {}",
        start.elapsed().as_secs_f64(),
        failures.load(Ordering::Relaxed)
    )?;
    out.flush()?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        // `ARM <name>`: every client must get `name`; `ARM <name> <k>`: the sidecars of caller
        // `svc-<k>` only.
        let Some(arm) = line.strip_prefix("ARM ") else {
            continue;
        };
        let (cluster, caller) = match arm.split_once(' ') {
            Some((n, k)) => (n, Some(k.parse::<usize>()?)),
            None => (arm, None),
        };
        let affected = |c: usize| caller.is_none_or(|k| a.callers > 0 && c % a.callers == k);
        let want = (0..a.clients).filter(|c| affected(*c)).count();
        while ev_rx.try_recv().is_ok() {}
        writeln!(out, "ARMED")?;
        out.flush()?;
        let mut times: HashMap<usize, u128> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while times.len() < want {
            let ev = tokio::time::timeout_at(deadline.into(), ev_rx.recv()).await;
            match ev {
                Ok(Some((c, name, t))) if name == cluster && affected(c) => {
                    times.entry(c).or_insert(t);
                }
                Ok(Some(_)) => {}
                _ => bail!("only {} of {} clients got the change", times.len(), want),
            }
        }
        let list: Vec<String> = times.values().map(|t| t.to_string()).collect();
        writeln!(
            out,
            "DONE {} {}",
            failures.load(Ordering::Relaxed),
            list.join(" ")
        )?;
        out.flush()?;
    }
    Ok(())
}

fn bench_node(id: usize, callers: usize, on_demand: bool) -> Node {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let text = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let mut fields = std::collections::HashMap::new();
    if callers > 0 {
        fields.insert(
            crate::xds::resources::NODE_SERVICE_KEY.to_string(),
            text(format!("svc-{}", id % callers)),
        );
    }
    if on_demand {
        fields.insert(
            crate::xds::resources::NODE_ON_DEMAND_KEY.to_string(),
            text("true".into()),
        );
    }
    let metadata = (!fields.is_empty()).then_some(Struct { fields });
    Node {
        id: format!("sidecar~default/bench-{id}~127.0.0.1"),
        user_agent_name: "polaris-bench".into(),
        metadata,
        ..Default::default()
    }
}

async fn connect(
    addr: &str,
) -> anyhow::Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    // Envoy's default HTTP/2 windows (256 MiB for a stream and for the connection): a large route
    // configuration arrives without waiting for window updates, as it does at a real proxy.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(256 << 20)
        .initial_connection_window_size(256 << 20);
    let ch = match CLIENT_TLS.get() {
        None => endpoint.connect().await?,
        Some(tls) => {
            let (tls, addr) = (tls.clone(), addr.to_string());
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let (tls, addr) = (tls.clone(), addr.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect(&addr).await?;
                        tcp.set_nodelay(true)?;
                        let name = rustls_pki_types::ServerName::try_from("127.0.0.1")
                            .map_err(std::io::Error::other)?;
                        let s = tokio_rustls::TlsConnector::from(tls)
                            .connect(name, tcp)
                            .await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await?
        }
    };
    Ok(AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(64 << 20))
}

/// What a client must hold to count as synced: this many load assignments and virtual hosts.
#[derive(Clone, Copy)]
struct Synced {
    clusters: usize,
    hosts: usize,
}

async fn delta_client(
    id: usize,
    node: Node,
    addr: &str,
    Synced { clusters, hosts }: Synced,
    ev: mpsc::UnboundedSender<Event>,
    synced: Arc<AtomicUsize>,
    counted: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let (tx, rx) = mpsc::channel(64);
    let sub = |node: Option<Node>, t: &str, names: Vec<String>| DeltaDiscoveryRequest {
        node,
        type_url: t.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    tx.send(sub(Some(node), CLUSTER_TYPE, vec![])).await?;
    if hosts > 0 {
        // An on-demand sidecar gets no service cluster by wildcard: it subscribes (on-demand
        // CDS) to the cluster of each service it calls, here every one of its hosts'.
        let names = (0..hosts)
            .map(|k| crate::xds::resources::outbound_name("default", &format!("svc-{k}")))
            .collect();
        tx.send(sub(None, CLUSTER_TYPE, names)).await?;
    }
    tx.send(sub(None, LISTENER_TYPE, vec![])).await?;
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut known: HashSet<String> = HashSet::new();
    let mut routes: HashSet<String> = HashSet::new();
    let mut asked_hosts = false;
    let mut have_hosts: HashSet<String> = HashSet::new();
    let mut have_eds: HashSet<String> = HashSet::new();
    while let Some(r) = stream.message().await? {
        let t = now_ns();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        match r.type_url.as_str() {
            CLUSTER_TYPE => {
                let fresh: Vec<String> = r
                    .resources
                    .iter()
                    .map(|x| x.name.clone())
                    .filter(|n| known.insert(n.clone()))
                    .collect();
                if !fresh.is_empty() {
                    tx.send(sub(None, ENDPOINT_TYPE, fresh)).await?;
                }
            }
            LISTENER_TYPE => {
                let fresh: Vec<String> = rds_names(
                    r.resources
                        .iter()
                        .filter_map(|x| x.resource.as_ref())
                        .map(|a| a.value.as_slice()),
                )
                .into_iter()
                .filter(|n| routes.insert(n.clone()))
                .collect();
                if !fresh.is_empty() {
                    tx.send(sub(None, ROUTE_TYPE, fresh)).await?;
                }
            }
            ROUTE_TYPE => {
                let _ = ev.send((id, RDS_EVENT.into(), t));
                if hosts > 0 && !asked_hosts {
                    asked_hosts = true;
                    let names = (0..hosts)
                        .map(|k| {
                            format!("{}/svc-{k}.default", crate::xds::resources::ON_DEMAND_ROUTE)
                        })
                        .collect();
                    tx.send(sub(None, VIRTUAL_HOST_TYPE, names)).await?;
                }
            }
            VIRTUAL_HOST_TYPE => {
                for x in &r.resources {
                    have_hosts.insert(x.name.clone());
                }
                let _ = ev.send((id, RDS_EVENT.into(), t));
            }
            ENDPOINT_TYPE => {
                for x in &r.resources {
                    have_eds.insert(x.name.clone());
                    let _ = ev.send((id, x.name.clone(), t));
                }
            }
            _ => {}
        }
        if have_eds.len() >= clusters
            && have_hosts.len() >= hosts
            && !counted.swap(true, Ordering::Relaxed)
        {
            synced.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

async fn sotw_client(
    id: usize,
    node: Node,
    addr: &str,
    clusters: usize,
    ev: mpsc::UnboundedSender<Event>,
    synced: Arc<AtomicUsize>,
    counted: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    let mut client = connect(addr).await?;
    let (tx, rx) = mpsc::channel(64);
    let req =
        |node: Option<Node>, t: &str, names: Vec<String>, v: &str, n: &str| DiscoveryRequest {
            node,
            type_url: t.into(),
            resource_names: names,
            version_info: v.into(),
            response_nonce: n.into(),
            ..Default::default()
        };
    tx.send(req(Some(node), CLUSTER_TYPE, vec![], "", ""))
        .await?;
    tx.send(req(None, LISTENER_TYPE, vec![], "", "")).await?;
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut cluster_names: Vec<String> = Vec::new();
    let mut route_names: Vec<String> = Vec::new();
    let mut route_version = String::new();
    let mut have_eds: HashSet<String> = HashSet::new();
    let mut eds_started = false;
    while let Some(r) = stream.message().await? {
        let t = now_ns();
        match r.type_url.as_str() {
            CLUSTER_TYPE => {
                let mut names: Vec<String> = r
                    .resources
                    .iter()
                    .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                    .map(|c| c.name)
                    .collect();
                names.sort();
                tx.send(req(None, CLUSTER_TYPE, vec![], &r.version_info, &r.nonce))
                    .await?;
                if names != cluster_names || !eds_started {
                    cluster_names = names;
                    eds_started = true;
                    tx.send(req(None, ENDPOINT_TYPE, cluster_names.clone(), "", ""))
                        .await?;
                }
            }
            LISTENER_TYPE => {
                tx.send(req(None, LISTENER_TYPE, vec![], &r.version_info, &r.nonce))
                    .await?;
                let names = rds_names(r.resources.iter().map(|a| a.value.as_slice()));
                if names != route_names {
                    route_names = names;
                    tx.send(req(
                        None,
                        ROUTE_TYPE,
                        route_names.clone(),
                        &route_version,
                        "",
                    ))
                    .await?;
                }
            }
            ENDPOINT_TYPE => {
                for a in &r.resources {
                    if let Ok(cla) = ClusterLoadAssignment::decode(a.value.as_slice()) {
                        have_eds.insert(cla.cluster_name.clone());
                        let _ = ev.send((id, cla.cluster_name, t));
                    }
                }
                tx.send(req(
                    None,
                    ENDPOINT_TYPE,
                    cluster_names.clone(),
                    &r.version_info,
                    &r.nonce,
                ))
                .await?;
            }
            ROUTE_TYPE => {
                route_version = r.version_info.clone();
                let _ = ev.send((id, RDS_EVENT.into(), t));
                tx.send(req(
                    None,
                    ROUTE_TYPE,
                    route_names.clone(),
                    &r.version_info,
                    &r.nonce,
                ))
                .await?;
            }
            _ => {}
        }
        if have_eds.len() >= clusters && !counted.swap(true, Ordering::Relaxed) {
            synced.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}
