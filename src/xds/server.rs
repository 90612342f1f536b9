//! The ADS server: state-of-the-world and delta streams over one per-stream state machine.
//!
//! Each stream is one state machine that owns its state (subscriptions per type, what the client
//! holds, nonces) and reads only published snapshots; its response body drives it
//! (`transport::ResponseBody`). It wakes on a client request or a new snapshot; a slow client parks
//! only its own state machine, and the snapshots it missed coalesce to the latest (the `watch`
//! channel keeps one value). Responses go out in ADS order: CDS, EDS, LDS, RDS.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use parking_lot::Mutex;
use serde::Serialize;
use tonic::Status;
use xxhash_rust::xxh3::xxh3_64;

use super::names::{NameSets, Names};
use super::resources as r;
use super::snapshot::{Cache, Encoded, NamespaceView, Res, Snapshot};
use super::transport::{AdsService, Driver, Msg, RequestLimits, Requests, Tx};
use super::{PerKind, TypeKind};
use crate::metrics::Metrics;

/// "The client was told this resource does not exist."
const ABSENT: u64 = 0;

/// Settings of a node, from its id and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// The namespace whose services it sees.
    pub namespace: String,
    /// Its own service, if it is a sidecar of one.
    pub service: Option<String>,
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Local application ports for the inbound cluster.
    pub bind_ports: Vec<u16>,
    /// Client name (`envoy`, `gRPC Python`, ...).
    pub user_agent: String,
    /// Virtual hosts on demand (VHDS) instead of the full route table.
    pub on_demand: bool,
    /// Other namespaces whose services this node also sees (`*`: all).
    pub extra_namespaces: Vec<String>,
}

fn meta_str(node: &Node, key: &str) -> Option<String> {
    let fields = &node.metadata.as_ref()?.fields;
    match fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        Kind::NumberValue(n) => Some(format!("{n}")),
        _ => None,
    }
}

impl NodeInfo {
    /// Reads a node: namespace from metadata, else from a `type~ns/pod~ip` id, else `default`.
    pub fn from_node(node: &Node) -> Result<NodeInfo, Status> {
        if node.id.is_empty() {
            return Err(Status::invalid_argument(
                "node.id is required on the first request",
            ));
        }
        let id_ns = node
            .id
            .split('~')
            .find_map(|part| part.split_once('/').map(|(ns, _)| ns.to_string()))
            .filter(|ns| !ns.is_empty());
        let namespace = meta_str(node, r::NODE_NAMESPACE_KEY)
            .or(id_ns)
            .unwrap_or_else(|| "default".into());
        let port = |key: &str, default: u16| -> Result<u16, Status> {
            match meta_str(node, key) {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (1.0..=65535.0).contains(p) && p.fract() == 0.0)
                    .map(|p| p as u16)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "node metadata {key}: {v:?} is not a port"
                        ))
                    }),
            }
        };
        let bind_ports = match meta_str(node, r::NODE_BIND_PORTS_KEY) {
            None => vec![],
            Some(v) => v
                .split(',')
                .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "node metadata {}: {v:?} is not a port list",
                        r::NODE_BIND_PORTS_KEY
                    ))
                })?,
        };
        let extra_namespaces = meta_str(node, r::NODE_VISIBLE_NAMESPACES_KEY)
            .map(|v| {
                v.split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty() && *n != namespace)
                    .collect()
            })
            .unwrap_or_default();
        Ok(NodeInfo {
            id: node.id.clone(),
            namespace,
            service: meta_str(node, r::NODE_SERVICE_KEY),
            outbound_port: port(r::NODE_OUTBOUND_PORT_KEY, 15001)?,
            inbound_port: port(r::NODE_INBOUND_PORT_KEY, 15006)?,
            bind_ports,
            user_agent: node.user_agent_name.clone(),
            on_demand: meta_str(node, r::NODE_ON_DEMAND_KEY).is_some_and(|v| v == "true"),
            extra_namespaces,
        })
    }
}

fn hex_version<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(&format_args!("{v:016x}")),
        None => s.serialize_str(""),
    }
}

/// Nonces and versions we send are hex numbers; anything else never matches one of ours.
fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Whether a SotW request names exactly the subscribed set. Clients repeat their names in the same
/// order in every ACK, usually sorted: that case is one pass without allocating.
fn same_names(req: &[&String], subscribed: &Names) -> bool {
    if req.len() == subscribed.len()
        && req
            .iter()
            .zip(subscribed.iter())
            .all(|(a, b)| a.as_str() == &**b)
    {
        return true;
    }
    if req.len() < subscribed.len() {
        return false;
    }
    let mut sorted: Vec<&str> = req.iter().map(|n| n.as_str()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len() == subscribed.len()
        && sorted
            .iter()
            .zip(subscribed.iter())
            .all(|(a, b)| *a == &**b)
}

/// Per-type status shown by `/debug/xds/nodes`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Version of the last response sent.
    #[serde(serialize_with = "hex_version")]
    pub version_sent: Option<u64>,
    /// Version the client last ACKed.
    #[serde(serialize_with = "hex_version")]
    pub version_acked: Option<u64>,
    /// Resources the client holds (per our bookkeeping).
    pub resources: usize,
    /// Last NACK message, if the last response was rejected.
    pub last_nack: Option<String>,
    /// NACKs received.
    pub nacks: u64,
    /// Responses sent.
    pub responses: u64,
    /// Approximate memory of this type's bookkeeping on the stream.
    pub state_bytes: usize,
}

/// One connected stream, as the debug views see it.
#[derive(Debug)]
pub struct NodeStatus {
    /// Stream id.
    pub stream: u64,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// Node settings (set on the first request).
    pub node: Mutex<Option<NodeInfo>>,
    /// Per type.
    pub types: Mutex<PerKind<TypeStatus>>,
    /// Snapshot generation last applied.
    pub generation: AtomicU64,
}

/// Connected streams.
#[derive(Debug, Default)]
pub struct Nodes {
    streams: Mutex<HashMap<u64, Arc<NodeStatus>>>,
    next: AtomicU64,
}

impl Nodes {
    /// Number of connected streams.
    pub fn len(&self) -> usize {
        self.streams.lock().len()
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All streams.
    pub fn list(&self) -> Vec<Arc<NodeStatus>> {
        let mut v: Vec<_> = self.streams.lock().values().cloned().collect();
        v.sort_by_key(|s| s.stream);
        v
    }

    fn register(&self, protocol: &'static str, peer: Option<SocketAddr>) -> Arc<NodeStatus> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let s = Arc::new(NodeStatus {
            stream: id,
            protocol,
            peer,
            node: Mutex::new(None),
            types: Mutex::new(PerKind::default()),
            generation: AtomicU64::new(0),
        });
        self.streams.lock().insert(id, s.clone());
        s
    }

    fn remove(&self, id: u64) {
        self.streams.lock().remove(&id);
    }
}

/// The ADS service.
#[derive(Clone)]
pub struct Ads {
    cache: Arc<Cache>,
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

    /// The tonic service.
    pub fn into_service(self, limits: Arc<RequestLimits>) -> AdsService {
        AdsService::new(self, limits)
    }

    /// The state machine of one SotW stream, driven by the stream's response body.
    pub fn sotw_stream(
        &self,
        inbound: Requests<DiscoveryRequest>,
        tx: Tx,
        peer: Option<SocketAddr>,
    ) -> Driver {
        // The state lives in its own allocation: the future stays small.
        let st = StreamState::new(self, "sotw", peer);
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
        peer: Option<SocketAddr>,
    ) -> Driver {
        let st = StreamState::new(self, "delta", peer);
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

/// What a client holds of one resource: nothing (`None`), the knowledge that it does not exist
/// (`Some(ABSENT)`, delta only), or a version.
type Held = Option<u64>;

/// What the resources of one response were held as before it, to restore on NACK.
type Undo = Vec<(Arc<str>, Held)>;

/// Subscription and delivery state of one type on one stream.
///
/// What the client holds is not stored name by name: it is what its subscription implies at the
/// stream's snapshot ([`StreamState::implied`]), except for the names in `overlay`. A stream in
/// sync has an empty overlay, so a proxy's bookkeeping does not grow with the world. Whatever
/// changes what the subscription implies (a new snapshot, new local resources, subscribing or
/// unsubscribing) first pins the affected names into the overlay at what the client holds; the
/// responses that follow update them, and [`StreamState::settle`] drops the entries that agree with
/// the implied view again.
#[derive(Debug, Default)]
struct TypeState {
    /// The client has sent at least one request for this type.
    active: bool,
    /// Subscribed to everything.
    wildcard: bool,
    /// Named subscriptions (names of existing resources share the snapshot's allocation).
    names: Names,
    /// The client has named resources at least once (ends legacy wildcard).
    ever_named: bool,
    /// Where the client's holdings differ from the implied view.
    overlay: HashMap<Arc<str>, Held>,
    /// XOR of `h(name, version)` over the resources held: the type's version for this client.
    agg: u64,
    /// Resources held.
    count: usize,
    /// Nonce of the last response of this type (0: none yet).
    nonce: u64,
    /// SotW: names to include in the next response even if unchanged (cluster warming).
    force: HashSet<Arc<str>>,
    /// SotW: answer the next request even if nothing changed (new subscription).
    force_all: bool,
    /// Delta: per in-flight nonce, what its resources were held as before, to restore on NACK.
    pending: Vec<(u64, Undo)>,
    /// Debug builds: the holdings as an explicit map, checked against the implied view.
    #[cfg(debug_assertions)]
    shadow: HashMap<Arc<str>, u64>,
}

fn entry_hash(name: &str, version: u64) -> u64 {
    xxh3_64(name.as_bytes()) ^ version.rotate_left(17)
}

/// Whether `held` counts as holding a resource.
fn holds(held: Held) -> Option<u64> {
    held.filter(|v| *v != ABSENT)
}

impl TypeState {
    fn version_string(&self) -> String {
        format!("{:016x}", self.agg)
    }

    fn state_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(Arc<str>, Held)>() + 1;
        let name = std::mem::size_of::<Arc<str>>() + 1;
        self.overlay.capacity() * entry
            + self.names.own_bytes()
            + self.force.capacity() * name
            + self
                .pending
                .iter()
                .map(|(_, u)| 8 + u.capacity() * std::mem::size_of::<(Arc<str>, Held)>())
                .sum::<usize>()
    }
}

/// Node-local resources (listeners, inbound cluster and route, proxyless API listeners).
#[derive(Debug, Default)]
struct Locals {
    by_kind: PerKind<Vec<Res>>,
    /// API listeners built on request, by name.
    api: HashMap<Arc<str>, Res>,
}

struct StreamState {
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    nodes: Arc<Nodes>,
    sets: Arc<NameSets>,
    status: Arc<NodeStatus>,
    /// Delta protocol (else state of the world).
    delta: bool,
    node: Option<NodeInfo>,
    types: PerKind<TypeState>,
    snap: Arc<Snapshot>,
    /// Generation whose changes this stream has applied.
    generation: u64,
    nonce: u64,
    locals: Locals,
    /// Delta: load assignments to re-send because their cluster was just updated (warming).
    rewarm: HashSet<Arc<str>>,
}

/// A response ready for the wire.
type Reply = Msg;

/// One response to send, independent of the protocol.
struct Out {
    kind: TypeKind,
    resources: Vec<Res>,
    removed: Vec<Arc<str>>,
}

/// A stream leaves the admin view however it ends, including when its connection drops it mid-way.
impl Drop for StreamState {
    fn drop(&mut self) {
        self.nodes.remove(self.status.stream);
    }
}

impl StreamState {
    fn new(ads: &Ads, protocol: &'static str, peer: Option<SocketAddr>) -> Self {
        StreamState {
            shutdown: ads.shutdown.clone(),
            cache: ads.cache.clone(),
            metrics: ads.metrics.clone(),
            nodes: ads.nodes.clone(),
            sets: ads.sets.clone(),
            status: ads.nodes.register(protocol, peer),
            delta: protocol == "delta",
            node: None,
            types: PerKind::default(),
            snap: ads.cache.current(),
            generation: 0,
            nonce: 0,
            locals: Locals::default(),
            rewarm: HashSet::new(),
        }
    }

    fn next_nonce(&mut self) -> u64 {
        self.nonce += 1;
        self.nonce
    }

    /// Checks the node on each request: the first sets it, later ones may omit it but not change it.
    fn check_node(&mut self, node: Option<&Node>) -> Result<(), Status> {
        match (&self.node, node) {
            (None, Some(n)) => {
                let info = NodeInfo::from_node(n)?;
                *self.status.node.lock() = Some(info.clone());
                self.node = Some(info);
                self.rebuild_locals();
                Ok(())
            }
            (None, None) => Err(Status::invalid_argument(
                "the first request must carry node",
            )),
            (Some(cur), Some(n)) if !n.id.is_empty() && n.id != cur.id => {
                Err(Status::invalid_argument(format!(
                    "node changed on the stream: {} → {}",
                    cur.id, n.id
                )))
            }
            _ => Ok(()),
        }
    }

    fn view(&self) -> Option<&Arc<NamespaceView>> {
        let ns = &self.node.as_ref()?.namespace;
        self.snap.namespaces.get(ns.as_str())
    }

    /// Whether the node sees the services of `ns`.
    fn sees(&self, ns: &str) -> bool {
        self.node.as_ref().is_some_and(|n| {
            n.namespace == ns || n.extra_namespaces.iter().any(|e| e == "*" || e == ns)
        })
    }

    /// Whether the node sees more than its own namespace.
    fn widened(&self) -> bool {
        self.node
            .as_ref()
            .is_some_and(|n| !n.extra_namespaces.is_empty())
    }

    /// The other namespaces' views the node sees, sorted by name.
    fn extra_views(&self) -> Vec<(&Arc<str>, &Arc<NamespaceView>)> {
        let own = self
            .node
            .as_ref()
            .map(|n| n.namespace.as_str())
            .unwrap_or_default();
        let mut v: Vec<_> = self
            .snap
            .namespaces
            .iter()
            .filter(|(ns, _)| &***ns != own && self.sees(ns))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    fn rebuild_locals(&mut self) {
        let Some(node) = self.node.clone() else {
            return;
        };
        let mut by_kind: PerKind<Vec<Res>> = PerKind::default();
        if self.widened() && !node.on_demand {
            // Own services answer every name; other namespaces' only their qualified names, so the
            // bare `svc` of two namespaces never collides.
            let mut vhosts: Vec<_> = self
                .view()
                .map(|v| v.vhosts.values().cloned().collect())
                .unwrap_or_default();
            for (_, v) in self.extra_views() {
                for vh in v.vhosts.values() {
                    let mut vh = vh.clone();
                    vh.domains
                        .retain(|d| d.split(':').next().is_some_and(|h| h.contains('.')));
                    vhosts.push(vh);
                }
            }
            let rc = r::route_configuration(r::OUTBOUND_ROUTE, vhosts);
            by_kind
                .get_or_default(TypeKind::Route)
                .push(Encoded::new(Arc::from(rc.name.as_str()), &rc));
        }
        let outbound = if node.on_demand {
            let rc = r::on_demand_route();
            by_kind
                .get_or_default(TypeKind::Route)
                .push(Encoded::new(Arc::from(rc.name.as_str()), &rc));
            r::on_demand_outbound_listener("0.0.0.0", node.outbound_port)
        } else {
            r::outbound_listener("0.0.0.0", node.outbound_port)
        };
        by_kind
            .get_or_default(TypeKind::Listener)
            .push(Encoded::new(Arc::from(outbound.name.as_str()), &outbound));
        let own = node.service.as_ref().and_then(|svc| {
            self.view()
                .and_then(|v| v.services.get(svc.as_str()))
                .filter(|sv| sv.service.alias_for.is_none())
                .map(|sv| (sv.service.clone(), sv.ports.clone()))
        });
        if let Some((svc, ports)) = own {
            let ports = if node.bind_ports.is_empty() {
                ports
            } else {
                node.bind_ports.clone()
            };
            let c = r::inbound_cluster(&svc);
            by_kind
                .get_or_default(TypeKind::Cluster)
                .push(Encoded::new(Arc::from(c.name.as_str()), &c));
            let cla = r::inbound_load_assignment(&svc, &ports);
            by_kind
                .get_or_default(TypeKind::Endpoint)
                .push(Encoded::new(Arc::from(cla.cluster_name.as_str()), &cla));
            let l = r::inbound_listener(&svc.namespace, &svc.name, node.inbound_port);
            by_kind
                .get_or_default(TypeKind::Listener)
                .push(Encoded::new(Arc::from(l.name.as_str()), &l));
            let rc = r::inbound_route(&svc.namespace, &svc.name);
            by_kind
                .get_or_default(TypeKind::Route)
                .push(Encoded::new(Arc::from(rc.name.as_str()), &rc));
        }
        self.locals.by_kind = by_kind;
    }

    /// The resource `name` of `kind` as this node would get it.
    fn lookup(&self, kind: TypeKind, name: &str) -> Option<Res> {
        if let Some(l) = self
            .locals
            .by_kind
            .get(&kind)
            .and_then(|v| v.iter().find(|e| &*e.name == name))
        {
            return Some(l.clone());
        }
        let view = self.view();
        match kind {
            TypeKind::Cluster | TypeKind::Endpoint => self.shared_res(kind, name).cloned(),
            TypeKind::Route => view
                .and_then(|v| v.route.clone())
                .filter(|rt| &*rt.name == name),
            TypeKind::VirtualHost => {
                let (rc, host) = r::parse_vhds_name(name)?;
                if rc != r::ON_DEMAND_ROUTE {
                    return None;
                }
                let vh = view.and_then(|v| {
                    v.hosts
                        .get(&r::host_key(host))
                        .and_then(|svc| v.vhosts.get(svc))
                });
                Some(Encoded::vhds(Arc::from(name), vh))
            }
            TypeKind::Listener => {
                // Proxyless gRPC: `<svc>.<ns>[:port]` of an existing service in the node's view.
                let (svc, ns) = r::parse_target(name)?;
                let exists = self
                    .snap
                    .namespaces
                    .get(ns.as_str())
                    .is_some_and(|v| v.services.contains_key(svc.as_str()));
                if !exists {
                    return None;
                }
                self.locals.api.get(name).cloned()
            }
        }
    }

    /// The shared cluster or load assignment `name` this node gets: from its own namespace's view,
    /// or from that of another namespace it sees (`OUTBOUND|<ns>|<svc>`). One map search when the
    /// name is the node's own (the initial sync of a thousand names per proxy runs through here).
    fn shared_res(&self, kind: TypeKind, name: &str) -> Option<&Res> {
        fn get<'a>(v: &'a NamespaceView, kind: TypeKind, name: &str) -> Option<&'a Res> {
            match kind {
                TypeKind::Cluster => v.clusters.get(name),
                _ => v.endpoints.get(name),
            }
        }
        let own = self.view();
        if let Some(r) = own.and_then(|v| get(v, kind, name)) {
            return Some(r);
        }
        let ns = name.split('|').nth(1)?;
        let own_ns = self.node.as_ref().is_some_and(|n| n.namespace == ns);
        if own_ns || !self.sees(ns) {
            return None;
        }
        get(self.snap.namespaces.get(ns)?, kind, name)
    }

    /// The name as an `Arc`, shared with the resource of that name when there is one.
    fn intern(&self, kind: TypeKind, name: &str) -> Arc<str> {
        match kind {
            TypeKind::Cluster | TypeKind::Endpoint => {
                if let Some(r) = self.lookup(kind, name) {
                    return r.name.clone();
                }
            }
            _ => {}
        }
        Arc::from(name)
    }

    /// Caches the API listener of a proxyless target the client subscribed to.
    fn prepare_api_listener(&mut self, name: &Arc<str>) {
        if r::parse_target(name).is_some() && !self.locals.api.contains_key(name) {
            self.locals.api.insert(
                name.clone(),
                Encoded::new(name.clone(), &r::api_listener(name)),
            );
        }
    }

    /// Every resource of `kind` a wildcard subscriber gets.
    fn wildcard_set(&self, kind: TypeKind) -> Vec<Res> {
        let mut out: Vec<Res> = self.locals.by_kind.get(&kind).cloned().unwrap_or_default();
        if let Some(v) = self.view() {
            match kind {
                TypeKind::Cluster => out.extend(v.clusters.values().cloned()),
                TypeKind::Endpoint => out.extend(v.endpoints.values().cloned()),
                TypeKind::Route => {
                    if !self.local_route() {
                        out.extend(v.route.clone())
                    }
                }
                TypeKind::Listener | TypeKind::VirtualHost => {}
            }
        }
        for (_, v) in self.extra_views() {
            match kind {
                TypeKind::Cluster => out.extend(v.clusters.values().cloned()),
                TypeKind::Endpoint => out.extend(v.endpoints.values().cloned()),
                _ => {}
            }
        }
        out
    }

    /// Whether the node gets a route of its own instead of its namespace's shared one.
    fn local_route(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.on_demand) || self.widened()
    }

    /// Whether a wildcard subscriber of `kind` gets `name` (agrees with [`Self::wildcard_set`]).
    fn in_wildcard(&self, kind: TypeKind, name: &str) -> bool {
        if self
            .locals
            .by_kind
            .get(&kind)
            .is_some_and(|v| v.iter().any(|e| &*e.name == name))
        {
            return true;
        }
        match kind {
            TypeKind::Cluster | TypeKind::Endpoint => self.shared_res(kind, name).is_some(),
            TypeKind::Route => {
                !self.local_route()
                    && self
                        .view()
                        .and_then(|v| v.route.as_ref())
                        .is_some_and(|rt| &*rt.name == name)
            }
            TypeKind::Listener | TypeKind::VirtualHost => false,
        }
    }

    /// The names the client's subscription of `kind` covers that exist or are named.
    fn wanted_names(&self, kind: TypeKind) -> Vec<Arc<str>> {
        let Some(ts) = self.types.get(&kind).filter(|t| t.active) else {
            return vec![];
        };
        let mut v: Vec<Arc<str>> = ts.names.iter().cloned().collect();
        if ts.wildcard {
            v.extend(self.wildcard_set(kind).into_iter().map(|e| e.name.clone()));
        }
        v
    }

    /// What the subscription implies the client holds of `name`: every existing resource it
    /// covers at its current version; for a named one that does not exist, the knowledge of that
    /// (delta); nothing else.
    fn implied(&self, kind: TypeKind, name: &str) -> Held {
        let ts = self.types.get(&kind).filter(|t| t.active)?;
        let explicit = ts.names.contains(name);
        if !(explicit || ts.wildcard && self.in_wildcard(kind, name)) {
            return None;
        }
        match self.lookup(kind, name) {
            Some(r) => Some(r.version),
            None if explicit && self.delta => Some(ABSENT),
            None => None,
        }
    }

    /// What the client holds of `name`.
    fn held(&self, kind: TypeKind, name: &str) -> Held {
        match self.types.get(&kind).and_then(|t| t.overlay.get(name)) {
            Some(h) => *h,
            None => self.implied(kind, name),
        }
    }

    /// Records in the overlay what the client holds of these names, before something changes
    /// what its subscription implies for them.
    fn pin(&mut self, kind: TypeKind, names: impl IntoIterator<Item = Arc<str>>) {
        let Some(ts) = self.types.get(&kind) else {
            return;
        };
        let add: Vec<(Arc<str>, Held)> = names
            .into_iter()
            .filter(|n| !ts.overlay.contains_key(n))
            .map(|n| {
                let h = self.implied(kind, &n);
                (n, h)
            })
            .collect();
        let ts = self.types.get_mut(&kind).expect("checked");
        ts.overlay.extend(add);
    }

    /// Pins every name of every type (before the snapshot or the local resources change wholesale).
    fn pin_all(&mut self) {
        for k in TypeKind::ALL {
            let names = self.wanted_names(k);
            self.pin(k, names);
        }
    }

    /// The client now holds `new` of `name`; returns what it held before.
    fn set_held(&mut self, kind: TypeKind, name: Arc<str>, new: Held) -> Held {
        let old = self.held(kind, &name);
        let ts = self.types.get_mut(&kind).expect("active");
        if let Some(v) = holds(old) {
            ts.agg ^= entry_hash(&name, v);
            ts.count -= 1;
        }
        if let Some(v) = holds(new) {
            ts.agg ^= entry_hash(&name, v);
            ts.count += 1;
        }
        #[cfg(debug_assertions)]
        match new {
            Some(v) => ts.shadow.insert(name.clone(), v),
            None => ts.shadow.remove(&name),
        };
        ts.overlay.insert(name, new);
        old
    }

    /// Drops the overlay entries that agree with the implied view again and gives back their
    /// memory. Runs after every request and push, when no change is half applied.
    fn settle(&mut self) {
        for kind in TypeKind::ALL {
            let Some(ts) = self.types.get(&kind) else {
                continue;
            };
            let agree: Vec<Arc<str>> = ts
                .overlay
                .iter()
                .filter(|(n, h)| **h == self.implied(kind, n))
                .map(|(n, _)| n.clone())
                .collect();
            let ts = self.types.get_mut(&kind).expect("checked");
            for n in agree {
                ts.overlay.remove(&n);
            }
            if ts.overlay.capacity() > 2 * ts.overlay.len() + 4 {
                ts.overlay.shrink_to_fit();
            }
            if ts.force.capacity() > 2 * ts.force.len() + 4 {
                ts.force.shrink_to_fit();
            }
        }
        #[cfg(debug_assertions)]
        self.check_shadow();
    }

    /// Debug builds: the implied view plus overlay equals the explicit map, name by name.
    #[cfg(debug_assertions)]
    fn check_shadow(&self) {
        for kind in TypeKind::ALL {
            let Some(ts) = self.types.get(&kind) else {
                continue;
            };
            let mut names: HashSet<Arc<str>> = ts.shadow.keys().cloned().collect();
            names.extend(ts.overlay.keys().cloned());
            names.extend(self.wanted_names(kind));
            for n in &names {
                let held = self.held(kind, n);
                let expected = ts.shadow.get(n).copied();
                assert_eq!(
                    held,
                    expected,
                    "{} {n}: implied view and overlay disagree with the explicit bookkeeping",
                    kind.short()
                );
            }
            let agg = ts
                .shadow
                .iter()
                .filter(|(_, v)| **v != ABSENT)
                .fold(0, |a, (n, v)| a ^ entry_hash(n, *v));
            assert_eq!(agg, ts.agg, "{} version drifted", kind.short());
        }
    }

    /// Names to evaluate for `kind`: all (`None`) or only these.
    fn diff(&mut self, kind: TypeKind, only: Option<&HashSet<Arc<str>>>) -> Out {
        let mut out = Out {
            kind,
            resources: vec![],
            removed: vec![],
        };
        let Some(ts) = self.types.get(&kind).filter(|t| t.active) else {
            return out;
        };
        let wildcard = ts.wildcard;
        let names: Vec<Arc<str>> = match only {
            Some(set) => set.iter().cloned().collect(),
            None => {
                let mut n: HashSet<Arc<str>> = ts.overlay.keys().cloned().collect();
                n.extend(self.wanted_names(kind));
                n.into_iter().collect()
            }
        };
        for name in names {
            let ts = &self.types[&kind];
            let explicit = ts.names.contains(&name);
            let by_wildcard = wildcard && self.in_wildcard(kind, &name);
            let desired = if explicit || by_wildcard {
                self.lookup(kind, &name)
            } else {
                None
            };
            let held = self.held(kind, &name);
            match desired {
                Some(res) => {
                    if held != Some(res.version) || ts.force.contains(&name) {
                        out.resources.push(res);
                    }
                }
                None => {
                    if explicit {
                        // Subscribed but does not exist: tell a delta client once.
                        if held != Some(ABSENT) {
                            out.removed.push(name);
                        }
                    } else if held.is_some() {
                        out.removed.push(name);
                    }
                }
            }
        }
        out.resources.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Records what a response carries (delta: per nonce, so a NACK can roll it back).
    fn record(&mut self, out: &Out, nonce: u64) {
        let delta = self.delta;
        let mut undo = Vec::new();
        for res in &out.resources {
            let old = self.set_held(out.kind, res.name.clone(), Some(res.version));
            undo.push((res.name.clone(), old));
        }
        for name in &out.removed {
            let explicit = self.types[&out.kind].names.contains(name);
            let old = self.set_held(
                out.kind,
                name.clone(),
                (delta && explicit).then_some(ABSENT),
            );
            undo.push((name.clone(), old));
        }
        let ts = self.types.get_mut(&out.kind).expect("active");
        for res in &out.resources {
            ts.force.remove(&res.name);
        }
        ts.nonce = nonce;
        if delta {
            ts.pending.push((nonce, undo));
            if ts.pending.len() > 16 {
                ts.pending.remove(0);
            }
        }
        {
            let mut st = self.status.types.lock();
            let s = st.get_or_default(out.kind);
            s.version_sent = Some(ts.agg);
            s.resources = ts.count;
            s.responses += 1;
            s.state_bytes = ts.state_bytes();
        }
        self.metrics.xds_pushes.inc();
        // Warming: a changed cluster waits for a fresh load assignment, even an unchanged one.
        if out.kind == TypeKind::Cluster && !out.resources.is_empty() {
            for c in &out.resources {
                if self.held(TypeKind::Endpoint, &c.name).is_none() {
                    continue;
                }
                if delta {
                    self.set_held(TypeKind::Endpoint, c.name.clone(), None);
                    self.rewarm.insert(c.name.clone());
                } else if let Some(eds) = self.types.get_mut(&TypeKind::Endpoint) {
                    eds.force.insert(c.name.clone());
                }
            }
        }
    }

    fn on_nack(&mut self, kind: TypeKind, nonce: &str, message: &str) {
        let nonce_num = parse_hex(nonce);
        let node = self.node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
        tracing::warn!(node = %node, r#type = kind.short(), nonce, error = message, "client rejected config (NACK)");
        self.metrics.xds_nacks.inc();
        {
            let mut st = self.status.types.lock();
            let s = st.get_or_default(kind);
            s.last_nack = Some(message.to_string());
            s.nacks += 1;
        }
        if self.delta {
            let Some(ts) = self.types.get_mut(&kind) else {
                return;
            };
            // Roll back this response and everything sent after it: the client holds none of it.
            if let Some(pos) = ts.pending.iter().position(|(n, _)| Some(*n) == nonce_num) {
                let undone: Vec<_> = ts.pending.drain(pos..).collect();
                for (_, undo) in undone.into_iter().rev() {
                    for (name, old) in undo.into_iter().rev() {
                        self.set_held(kind, name, old);
                    }
                }
                let ts = &self.types[&kind];
                let mut st = self.status.types.lock();
                let s = st.get_or_default(kind);
                s.version_sent = Some(ts.agg);
                s.resources = ts.count;
            }
        }
    }

    fn on_ack(&mut self, kind: TypeKind, nonce: &str, version: u64) {
        let nonce = parse_hex(nonce);
        if let Some(ts) = self.types.get_mut(&kind) {
            if let Some(pos) = ts.pending.iter().position(|(n, _)| Some(*n) == nonce) {
                ts.pending.drain(..=pos);
                if ts.pending.is_empty() {
                    ts.pending = Vec::new();
                }
            }
        }
        let mut st = self.status.types.lock();
        let s = st.get_or_default(kind);
        s.version_acked = Some(version);
        s.last_nack = None;
    }

    /// Moves to the latest snapshot; returns the names that changed per kind, or `None` per kind
    /// when everything must be diffed. What the client held of them is pinned first.
    fn advance(&mut self) -> PerKind<Option<HashSet<Arc<str>>>> {
        let snap = self.cache.current();
        let mut out: PerKind<Option<HashSet<Arc<str>>>> = PerKind::default();
        if snap.generation == self.generation {
            return out;
        }
        let changes = self.cache.changes(self.generation, snap.generation);
        let ns = self
            .node
            .as_ref()
            .map(|n| n.namespace.clone())
            .unwrap_or_default();
        let own = self.node.as_ref().and_then(|n| n.service.clone());
        let mut full = changes.is_none();
        for list in changes.iter().flatten() {
            for c in list.iter() {
                if c.kind == TypeKind::Listener {
                    if own.as_deref() == Some(&*c.name) && *c.namespace == *ns {
                        full = true;
                    }
                    // Proxyless API listeners depend on the service existing.
                    let lds = out.get_or_insert_with(TypeKind::Listener, || Some(HashSet::new()));
                    if let Some(set) = lds {
                        for n in self.locals.api.keys() {
                            set.insert(n.clone());
                        }
                        if let Some(ts) = self.types.get(&TypeKind::Listener) {
                            set.extend(ts.names.iter().cloned());
                        }
                    }
                    continue;
                }
                if *c.namespace != *ns {
                    if !self.sees(&c.namespace) {
                        continue;
                    }
                    // Another namespace this node sees: its clusters and endpoints are ours too;
                    // its virtual hosts feed our node-local route.
                    match c.kind {
                        TypeKind::Cluster | TypeKind::Endpoint => {}
                        TypeKind::Route | TypeKind::VirtualHost => {
                            full = true;
                            continue;
                        }
                        TypeKind::Listener => continue,
                    }
                } else if c.kind == TypeKind::Route && self.widened() {
                    full = true;
                    continue;
                }
                if c.kind == TypeKind::VirtualHost {
                    // Subscriptions name hosts, not services: look at all of them (few).
                    out.set(TypeKind::VirtualHost, None);
                    continue;
                }
                if let Some(set) = out.get_or_insert_with(c.kind, || Some(HashSet::new())) {
                    set.insert(c.name.clone());
                }
            }
        }
        if full {
            self.pin_all();
            for k in TypeKind::ALL {
                out.set(k, None);
            }
        } else {
            for (k, names) in out.iter() {
                match names {
                    Some(set) => self.pin(k, set.iter().cloned()),
                    None => {
                        let names = self.wanted_names(k);
                        self.pin(k, names);
                    }
                }
            }
        }
        self.snap = snap;
        self.generation = self.snap.generation;
        self.status
            .generation
            .store(self.generation, Ordering::Relaxed);
        if full {
            self.rebuild_locals();
        }
        out
    }

    /// The stream loop, shared by both protocols: answer requests, push snapshot changes, end on
    /// client close, error or server shutdown.
    async fn run<Req: prost::Message + Default + Send + 'static>(
        mut self: Box<Self>,
        mut inbound: Requests<Req>,
        tx: Tx,
        on_request: fn(&mut Self, Req) -> Result<Vec<Reply>, Status>,
        on_snapshot: fn(&mut Self) -> Vec<Reply>,
    ) {
        let mut snaps = self.cache.subscribe();
        let mut shutdown = self.shutdown.clone();
        loop {
            let outs = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                req = inbound.message() => match req {
                    Ok(Some(req)) => match on_request(&mut self, req) {
                        Ok(outs) => outs,
                        Err(status) => { let _ = tx.send(Err(Box::new(status))).await; break; }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        // The stream ends here, so this is logged once per stream.
                        let node = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
                        match e.kind {
                            Some(kind) => tracing::warn!(
                                node, peer = ?self.status.peer, kind = kind.label(),
                                error = e.status.message(), "bad xDS request; ending the stream"
                            ),
                            None => tracing::debug!(node, error = %e.status, "stream ended"),
                        }
                        let _ = tx.send(Err(Box::new(e.status))).await;
                        break;
                    }
                },
                ch = snaps.changed() => {
                    if ch.is_err() { break; }
                    if self.node.is_none() { continue; }
                    on_snapshot(&mut self)
                }
            };
            self.settle();
            let mut closed = false;
            for resp in outs {
                self.metrics.xds_bytes.add(resp.len() as u64);
                if tx.send(Ok(Box::new(resp))).await.is_err() {
                    closed = true;
                    break;
                }
            }
            if closed {
                break;
            }
        }
    }

    // ---- State of the world ----

    /// SotW: responses for what changed in the latest snapshot.
    fn sotw_push(&mut self) -> Vec<Reply> {
        let changed = self.advance();
        let mut outs = Vec::new();
        for k in TypeKind::ALL {
            if let Some(only) = changed.get(&k) {
                outs.extend(self.sotw_build(k, false, only.as_ref()));
            }
        }
        outs
    }

    fn sotw_request(&mut self, req: DiscoveryRequest) -> Result<Vec<Reply>, Status> {
        self.check_node(req.node.as_ref())?;
        let Some(kind) = TypeKind::from_url(&req.type_url).filter(|k| *k != TypeKind::VirtualHost)
        else {
            tracing::debug!(type_url = %req.type_url, "ignoring request for an unserved type");
            return Ok(vec![]);
        };
        if self.generation == 0 {
            self.advance();
        }
        let ts = self.types.get_or_default(kind);
        if let Some(err) = &req.error_detail {
            if parse_hex(&req.response_nonce) == Some(ts.nonce) {
                let msg = err.message.clone();
                self.on_nack(kind, &req.response_nonce, &msg);
            }
            return Ok(vec![]);
        }
        if !req.response_nonce.is_empty() && parse_hex(&req.response_nonce) != Some(ts.nonce) {
            // Stale: a newer response is on its way; this request is superseded.
            return Ok(vec![]);
        }
        let first = !ts.active;
        ts.active = true;
        let names: Vec<&String> = req
            .resource_names
            .iter()
            .filter(|n| n.as_str() != "*")
            .collect();
        let star = req.resource_names.iter().any(|n| n == "*");
        let wildcard = star || (names.is_empty() && !ts.ever_named && kind.wildcard_capable());
        if !names.is_empty() {
            ts.ever_named = true;
        }
        // The common case, an ACK repeating the same names: no allocation, no rebuild.
        let same = !first && wildcard == ts.wildcard && same_names(&names, &ts.names);
        if same {
            let forced: Vec<Arc<str>> = ts.force.drain().collect();
            if !req.response_nonce.is_empty() {
                let version = parse_hex(&req.version_info).unwrap_or_default();
                self.on_ack(kind, &req.response_nonce, version);
            }
            if forced.is_empty() {
                return Ok(vec![]);
            }
            return Ok(self.sotw_forced(kind, forced).into_iter().collect());
        }
        let new_names = self
            .sets
            .set(names.iter().map(|n| self.intern(kind, n)).collect());
        let ts = &self.types[&kind];
        let added: Vec<Arc<str>> = new_names
            .iter()
            .filter(|n| !ts.names.contains(n))
            .cloned()
            .collect();
        let removed: Vec<Arc<str>> = ts
            .names
            .iter()
            .filter(|n| !new_names.contains(n))
            .cloned()
            .collect();
        let wildcard_flip = wildcard != ts.wildcard;
        let wildcard_added = wildcard && !ts.wildcard;
        // What the client holds of everything whose coverage changes.
        self.pin(kind, added.iter().chain(&removed).cloned());
        if wildcard_flip {
            let covered = self.wildcard_set(kind).into_iter().map(|e| e.name.clone());
            self.pin(kind, covered.collect::<Vec<_>>());
        }
        if kind == TypeKind::Listener {
            for n in &added {
                self.prepare_api_listener(n);
            }
        }
        let ts = self.types.get_mut(&kind).expect("active");
        ts.wildcard = wildcard;
        ts.names = new_names;
        // SotW EDS/RDS: forget resources no longer requested (there is no removal message).
        if !kind.wildcard_capable() {
            for n in &removed {
                self.set_held(kind, n.clone(), None);
            }
        }
        if kind == TypeKind::Listener {
            for n in &removed {
                if !self.types[&kind]
                    .overlay
                    .get(n)
                    .is_some_and(|h| h.is_some())
                {
                    self.locals.api.remove(n);
                }
            }
        }
        // Newly requested names are answered at once, even if sent before; LDS/CDS (full set)
        // and the first request answer with everything.
        let ts = self.types.get_mut(&kind).expect("active");
        if first || wildcard_added || (kind.wildcard_capable() && !added.is_empty()) {
            ts.force_all = true;
        } else {
            ts.force.extend(added);
        }
        if !req.response_nonce.is_empty() {
            let version = parse_hex(&req.version_info).unwrap_or_default();
            self.on_ack(kind, &req.response_nonce, version);
        }
        Ok(self.sotw_build(kind, true, None).into_iter().collect())
    }

    /// Everything of `kind` the client should hold now (sorted by name).
    fn desired_set(&self, kind: TypeKind) -> Vec<Res> {
        let mut names = self.wanted_names(kind);
        names.sort();
        names.dedup();
        names.iter().filter_map(|n| self.lookup(kind, n)).collect()
    }

    /// Builds a SotW response for `kind` if what the client should hold changed, or a request
    /// forces one (first request, new names, cluster warming).
    fn sotw_build(
        &mut self,
        kind: TypeKind,
        on_request: bool,
        only: Option<&HashSet<Arc<str>>>,
    ) -> Option<Reply> {
        if !self.types.get(&kind).is_some_and(|t| t.active) {
            return None;
        }
        if let (false, false, Some(only)) = (kind.wildcard_capable(), on_request, only) {
            return self.sotw_changed(kind, only);
        }
        let desired = self.desired_set(kind);
        let keep: HashSet<&str> = desired.iter().map(|r| &*r.name).collect();
        let ts = &self.types[&kind];
        // Held but no longer wanted: pinned in the overlay (the implied view holds only wanted).
        let removed: Vec<Arc<str>> = ts
            .overlay
            .iter()
            .filter(|(n, h)| h.is_some() && !keep.contains(&***n))
            .map(|(n, _)| n.clone())
            .collect();
        let full_set = kind.wildcard_capable();
        let force_all = ts.force_all;
        let send: Vec<Res> = if full_set {
            // LDS/CDS carry the complete set whenever any of it changed (an empty set included).
            let unchanged = removed.is_empty()
                && desired
                    .iter()
                    .all(|r| self.held(kind, &r.name) == Some(r.version));
            if unchanged && !force_all && ts.nonce != 0 {
                self.types.get_mut(&kind).expect("active").force_all = false;
                return None;
            }
            desired
        } else {
            desired
                .into_iter()
                .filter(|r| {
                    force_all
                        || self.held(kind, &r.name) != Some(r.version)
                        || (on_request && ts.force.contains(&r.name))
                })
                .collect()
        };
        self.types.get_mut(&kind).expect("active").force_all = false;
        if send.is_empty() && !full_set {
            // EDS/RDS have no removal message: forget silently; nothing requested exists yet.
            for n in removed {
                self.set_held(kind, n, None);
            }
            return None;
        }
        Some(self.sotw_reply(kind, send, removed))
    }

    /// Records and frames a SotW response.
    fn sotw_reply(&mut self, kind: TypeKind, resources: Vec<Res>, removed: Vec<Arc<str>>) -> Reply {
        let nonce = self.next_nonce();
        let out = Out {
            kind,
            resources,
            removed,
        };
        self.record(&out, nonce);
        let env = DiscoveryResponse {
            version_info: self.types[&kind].version_string(),
            type_url: kind.url().to_string(),
            nonce: format!("{nonce:x}"),
            ..Default::default()
        };
        Msg::sotw(&env, &out.resources)
    }

    /// SotW: re-send these names as they are (a warming cluster waits for its load assignment).
    fn sotw_forced(&mut self, kind: TypeKind, names: Vec<Arc<str>>) -> Option<Reply> {
        let mut send: Vec<Res> = names.iter().filter_map(|n| self.lookup(kind, n)).collect();
        if send.is_empty() {
            return None;
        }
        send.sort_by(|a, b| a.name.cmp(&b.name));
        Some(self.sotw_reply(kind, send, vec![]))
    }

    /// SotW EDS/RDS after a snapshot change: look only at the names that changed.
    fn sotw_changed(&mut self, kind: TypeKind, only: &HashSet<Arc<str>>) -> Option<Reply> {
        let mut send = Vec::new();
        let mut gone = Vec::new();
        for name in only {
            let ts = &self.types[&kind];
            let subscribed =
                ts.names.contains(name) || (ts.wildcard && self.in_wildcard(kind, name));
            let held = self.held(kind, name);
            match subscribed.then(|| self.lookup(kind, name)).flatten() {
                Some(r) if held != Some(r.version) => send.push(r),
                Some(_) => {}
                None if held.is_some() => gone.push(name.clone()),
                None => {}
            }
        }
        if send.is_empty() {
            for n in gone {
                self.set_held(kind, n, None);
            }
            return None;
        }
        send.sort_by(|a, b| a.name.cmp(&b.name));
        Some(self.sotw_reply(kind, send, gone))
    }

    // ---- Delta ----

    /// Delta: responses for what changed in the latest snapshot.
    fn delta_push(&mut self) -> Vec<Reply> {
        let changed = self.advance();
        let mut outs: Vec<Reply> = Vec::new();
        for k in TypeKind::ALL {
            // A cluster update forgot its load assignment: send that one again too.
            let rewarm = if k == TypeKind::Endpoint {
                std::mem::take(&mut self.rewarm)
            } else {
                HashSet::new()
            };
            let only = match changed.get(&k) {
                Some(None) => None,
                Some(Some(names)) => Some(names.union(&rewarm).cloned().collect()),
                None if !rewarm.is_empty() => Some(rewarm),
                None => continue,
            };
            outs.extend(self.delta_build(k, only.as_ref()));
        }
        outs
    }

    fn delta_request(&mut self, req: DeltaDiscoveryRequest) -> Result<Vec<Reply>, Status> {
        self.check_node(req.node.as_ref())?;
        let Some(kind) = TypeKind::from_url(&req.type_url) else {
            tracing::debug!(type_url = %req.type_url, "ignoring request for an unserved type");
            return Ok(vec![]);
        };
        if self.generation == 0 {
            self.advance();
        }
        let ts = self.types.get_or_default(kind);
        let first = !ts.active;
        ts.active = true;
        let mut full = false;
        if first {
            for (name, v) in &req.initial_resource_versions {
                let v = u64::from_str_radix(v, 16).unwrap_or(u64::MAX);
                let name = self.intern(kind, name);
                self.set_held(kind, name, Some(if v == ABSENT { u64::MAX } else { v }));
            }
            if req.resource_names_subscribe.is_empty() && kind.wildcard_capable() {
                self.set_wildcard(kind, true);
                full = true;
            }
        }
        let mut evaluate: HashSet<Arc<str>> = HashSet::new();
        if req.resource_names_subscribe.iter().any(|n| n == "*") && !self.types[&kind].wildcard {
            self.set_wildcard(kind, true);
            full = true;
        }
        let subscribe: Vec<Arc<str>> = req
            .resource_names_subscribe
            .iter()
            .filter(|n| *n != "*")
            .map(|n| self.intern(kind, n))
            .collect();
        let unsubscribe: Vec<Arc<str>> = req
            .resource_names_unsubscribe
            .iter()
            .filter(|n| *n != "*")
            .map(|n| {
                self.types[&kind]
                    .names
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| self.intern(kind, n))
            })
            .collect();
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            // What the client holds of every name whose coverage changes, then the new set.
            self.pin(kind, subscribe.iter().chain(&unsubscribe).cloned());
            if kind == TypeKind::Listener {
                for n in &subscribe {
                    self.prepare_api_listener(n);
                }
            }
            let ts = &self.types[&kind];
            let fresh: Vec<bool> = subscribe.iter().map(|n| !ts.names.contains(n)).collect();
            let was_named: Vec<bool> = unsubscribe.iter().map(|n| ts.names.contains(n)).collect();
            let names = self.sets.with(&ts.names, &subscribe, &unsubscribe);
            let ts = self.types.get_mut(&kind).expect("active");
            ts.names = names;
            ts.ever_named |= !subscribe.is_empty();
            for (name, fresh) in subscribe.into_iter().zip(fresh) {
                // A (re)subscribed name must be provided even if we think the client has it; on
                // the first request, initial_resource_versions says what it has.
                let claimed = first && req.initial_resource_versions.contains_key(&*name);
                if !claimed && (fresh || self.held(kind, &name) != Some(ABSENT)) {
                    self.set_held(kind, name.clone(), None);
                }
                evaluate.insert(name);
            }
            let wildcard = self.types[&kind].wildcard;
            for (name, was_named) in unsubscribe.into_iter().zip(was_named) {
                if kind == TypeKind::Listener {
                    self.locals.api.remove(&name);
                }
                if wildcard {
                    // Still covered by `*`: resend it; not covered: it must appear in
                    // removed_resources.
                    if self.in_wildcard(kind, &name) {
                        self.set_held(kind, name.clone(), None);
                    } else {
                        self.set_held(kind, name.clone(), Some(u64::MAX));
                    }
                    evaluate.insert(name);
                } else if was_named {
                    self.set_held(kind, name, None);
                }
            }
        }
        if req.resource_names_unsubscribe.iter().any(|n| n == "*") {
            if self.types[&kind].wildcard {
                self.set_wildcard(kind, false);
            }
            full = true;
        }
        if let Some(err) = &req.error_detail {
            let msg = err.message.clone();
            self.on_nack(kind, &req.response_nonce, &msg);
        } else if !req.response_nonce.is_empty() {
            let version = self.types[&kind].agg;
            self.on_ack(kind, &req.response_nonce, version);
        }
        if first && !full {
            // Initial named subscription: evaluate the named resources and what the client claims.
            evaluate.extend(self.types[&kind].overlay.keys().cloned());
        }
        if full {
            let mut out: Vec<Reply> = self.delta_build(kind, None).into_iter().collect();
            out.extend(self.rewarm_now());
            return Ok(out);
        }
        if evaluate.is_empty() {
            if first && kind == TypeKind::VirtualHost {
                // Envoy's VHDS subscription starts empty and holds the listener's initialization
                // until a first (empty) response arrives.
                let nonce = self.next_nonce();
                self.types.get_mut(&kind).expect("active").nonce = nonce;
                let env = DeltaDiscoveryResponse {
                    system_version_info: self.types[&kind].version_string(),
                    type_url: kind.url().to_string(),
                    // Envoy ignores removals of names it never had, but an update with no change
                    // at all does not reach the subscription (and would not end its init).
                    removed_resources: vec![format!("{}/", r::ON_DEMAND_ROUTE)],
                    nonce: format!("{nonce:x}"),
                    ..Default::default()
                };
                return Ok(vec![Msg::delta(&env, &[])]);
            }
            return Ok(vec![]);
        }
        let mut out: Vec<Reply> = self
            .delta_build(kind, Some(&evaluate))
            .into_iter()
            .collect();
        out.extend(self.rewarm_now());
        Ok(out)
    }

    /// Turns the wildcard subscription of `kind` on or off, pinning what it covers first.
    fn set_wildcard(&mut self, kind: TypeKind, on: bool) {
        let covered: Vec<Arc<str>> = self
            .wildcard_set(kind)
            .into_iter()
            .map(|e| e.name.clone())
            .collect();
        self.pin(kind, covered);
        self.types.get_mut(&kind).expect("active").wildcard = on;
    }

    /// Re-sends load assignments whose cluster a request-triggered response just updated.
    fn rewarm_now(&mut self) -> Option<Reply> {
        if self.rewarm.is_empty() {
            return None;
        }
        let names = std::mem::take(&mut self.rewarm);
        self.delta_build(TypeKind::Endpoint, Some(&names))
    }

    fn delta_build(&mut self, kind: TypeKind, only: Option<&HashSet<Arc<str>>>) -> Option<Reply> {
        let out = self.diff(kind, only);
        if out.resources.is_empty() && out.removed.is_empty() {
            return None;
        }
        let nonce = self.next_nonce();
        self.record(&out, nonce);
        let ts = &self.types[&kind];
        let env = DeltaDiscoveryResponse {
            system_version_info: ts.version_string(),
            type_url: kind.url().to_string(),
            removed_resources: out.removed.iter().map(|n| n.to_string()).collect(),
            nonce: format!("{nonce:x}"),
            ..Default::default()
        };
        Some(Msg::delta(&env, &out.resources))
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
    let mut st = StreamState::new(&ads, "view", None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_names_compares_sets_whatever_the_order() {
        let sets = NameSets::default();
        let sub = sets.set(["a", "b", "c"].map(Arc::from).to_vec());
        let s = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let check = |v: Vec<String>| same_names(&v.iter().collect::<Vec<_>>(), &sub);
        assert!(check(s(&["a", "b", "c"])));
        assert!(check(s(&["c", "a", "b"])));
        assert!(check(s(&["c", "a", "b", "a"])));
        assert!(
            !check(s(&["a", "a", "b"])),
            "a duplicate hides a missing name"
        );
        assert!(!check(s(&["a", "b"])));
        assert!(!check(s(&["a", "b", "c", "d"])));
        assert!(!check(s(&["a", "b", "x"])));
    }
}
