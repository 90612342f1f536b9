//! A stream's bookkeeping and loop, shared by both protocols.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use tonic::Status;
use xxhash_rust::xxh3::xxh3_64;

use super::super::auth::{Authenticator, Caller};
use super::super::names::{NameSets, Names};
use super::super::node::NodeInfo;
use super::super::resources as r;
use super::super::snapshot::{Cache, Res, Snapshot};
use super::super::status::{NodeStatus, Nodes};
use super::super::transport::{Msg, Requests, Tx};
use super::super::{PerKind, TypeKind};
use super::view::Locals;
use super::{stopped, Ads};
use crate::metrics::Metrics;

/// "The client was told this resource does not exist."
pub(super) const ABSENT: u64 = 0;

/// Nonces and versions we send are hex numbers; anything else never matches one of ours.
pub(super) fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// What a client holds of one resource: nothing (`None`), the knowledge that it does not exist
/// (`Some(ABSENT)`, delta only), or a version.
pub(super) type Held = Option<u64>;

/// What the resources of one response were held as before it, to restore on NACK.
pub(super) type Undo = Vec<(Arc<str>, Held)>;

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
pub(super) struct TypeState {
    /// The client has sent at least one request for this type.
    pub(super) active: bool,
    /// Subscribed to everything.
    pub(super) wildcard: bool,
    /// Named subscriptions (names of existing resources share the snapshot's allocation).
    pub(super) names: Names,
    /// The client has named resources at least once (ends legacy wildcard).
    pub(super) ever_named: bool,
    /// SotW: [`SotwRequest::names_hash`](super::sotw_request::SotwRequest::names_hash) of the
    /// request that set `names` and `wildcard` (0: none yet).
    pub(super) names_hash: u64,
    /// Where the client's holdings differ from the implied view.
    pub(super) overlay: HashMap<Arc<str>, Held>,
    /// XOR of `h(name, version)` over the resources held: the type's version for this client.
    pub(super) agg: u64,
    /// Resources held.
    pub(super) count: usize,
    /// Nonce of the last response of this type (0: none yet).
    pub(super) nonce: u64,
    /// SotW: names to include in the next response even if unchanged (cluster warming).
    pub(super) force: HashSet<Arc<str>>,
    /// SotW: answer the next request even if nothing changed (new subscription).
    pub(super) force_all: bool,
    /// Delta: per in-flight nonce, what its resources were held as before, to restore on NACK.
    pub(super) pending: Vec<(u64, Undo)>,
    /// Debug builds: the holdings as an explicit map, checked against the implied view.
    #[cfg(debug_assertions)]
    pub(super) shadow: HashMap<Arc<str>, u64>,
}

pub(super) fn entry_hash(name: &str, version: u64) -> u64 {
    xxh3_64(name.as_bytes()) ^ version.rotate_left(17)
}

/// Whether `held` counts as holding a resource.
pub(super) fn holds(held: Held) -> Option<u64> {
    held.filter(|v| *v != ABSENT)
}

impl TypeState {
    pub(super) fn version_string(&self) -> String {
        format!("{:016x}", self.agg)
    }

    pub(super) fn state_bytes(&self) -> usize {
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

pub(super) struct StreamState {
    pub(super) shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    pub(super) cache: Arc<Cache>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) nodes: Arc<Nodes>,
    pub(super) sets: Arc<NameSets>,
    pub(super) status: Arc<NodeStatus>,
    /// Delta protocol (else state of the world).
    pub(super) delta: bool,
    pub(super) node: Option<NodeInfo>,
    pub(super) types: PerKind<TypeState>,
    pub(super) snap: Arc<Snapshot>,
    /// Generation whose changes this stream has applied.
    pub(super) generation: u64,
    pub(super) nonce: u64,
    pub(super) locals: Locals,
    /// Delta: load assignments to re-send because their cluster was just updated (warming).
    pub(super) rewarm: HashSet<Arc<str>>,
    /// The proven caller and who scopes its node (authenticated ADS).
    pub(super) caller: Option<Box<(Arc<Authenticator>, Caller)>>,
}

/// A response ready for the wire.
pub(super) type Reply = Msg;

/// One response to send, independent of the protocol.
pub(super) struct Out {
    pub(super) kind: TypeKind,
    pub(super) resources: Vec<Res>,
    pub(super) removed: Vec<Arc<str>>,
}

/// A stream leaves the admin view however it ends, including when its connection drops it mid-way.
impl Drop for StreamState {
    fn drop(&mut self) {
        self.nodes.remove(self.status.stream);
    }
}

impl StreamState {
    pub(super) fn new(
        ads: &Ads,
        protocol: &'static str,
        peer: Option<crate::net::Peer>,
        caller: Option<Caller>,
    ) -> Self {
        StreamState {
            caller: match (&ads.auth, caller) {
                (Some(a), Some(c)) => Some(Box::new((a.clone(), c))),
                _ => None,
            },
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

    pub(super) fn next_nonce(&mut self) -> u64 {
        self.nonce += 1;
        self.nonce
    }

    /// Checks the node on each request: the first sets it, later ones may omit it but not change it.
    pub(super) fn check_node(&mut self, node: Option<&Node>) -> Result<(), Status> {
        match (&self.node, node) {
            (None, Some(n)) => {
                let mut info = NodeInfo::from_node(n)?;
                if let Some(c) = &self.caller {
                    info.narrowed = c.0.scope(&c.1, &mut info);
                    if let Some(claim) = &info.narrowed {
                        tracing::info!(node = %info.id, identity = ?info.identity, claimed_namespace = %claim.namespace, claimed_visible = ?claim.visible_namespaces, namespace = %info.namespace, visible = ?info.extra_namespaces, "node claims narrowed to its identity and policy");
                    }
                }
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

    /// Records in the overlay what the client holds of these names, before something changes
    /// what its subscription implies for them.
    pub(super) fn pin(&mut self, kind: TypeKind, names: impl IntoIterator<Item = Arc<str>>) {
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
    pub(super) fn pin_all(&mut self) {
        for k in TypeKind::ALL {
            let names = self.wanted_names(k);
            self.pin(k, names);
        }
    }

    /// The client now holds `new` of `name`; returns what it held before.
    pub(super) fn set_held(&mut self, kind: TypeKind, name: Arc<str>, new: Held) -> Held {
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
    pub(super) fn settle(&mut self) {
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
    pub(super) fn check_shadow(&self) {
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
    pub(super) fn diff(&mut self, kind: TypeKind, only: Option<&HashSet<Arc<str>>>) -> Out {
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
    pub(super) fn record(&mut self, out: &Out, nonce: u64) {
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

    pub(super) fn on_nack(&mut self, kind: TypeKind, nonce: &str, message: &str) {
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

    pub(super) fn on_ack(&mut self, kind: TypeKind, nonce: &str, version: u64) {
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
    pub(super) fn advance(&mut self) -> PerKind<Option<HashSet<Arc<str>>>> {
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
                if c.kind == TypeKind::Secret {
                    // Secrets belong to no namespace: every node of this cache gets them.
                    if let Some(set) = out.get_or_insert_with(c.kind, || Some(HashSet::new())) {
                        set.insert(c.name.clone());
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
                        TypeKind::Listener | TypeKind::Secret => continue,
                    }
                } else if c.kind == TypeKind::Route && self.widened() {
                    full = true;
                    continue;
                }
                if c.kind == TypeKind::VirtualHost {
                    // Only on-demand sidecars subscribe to virtual hosts: for every other stream
                    // there is nothing to match (and no domains to format, on every change).
                    if self
                        .types
                        .get(&TypeKind::VirtualHost)
                        .is_none_or(|ts| ts.names.is_empty())
                    {
                        continue;
                    }
                    // Subscriptions name hosts, not services: the ones this service's host answers
                    // (its domains depend on its name alone, so they are the same before and
                    // after the change).
                    let keys: Vec<String> = r::domains(&ns, &c.name)
                        .into_iter()
                        .filter(|d| !d.ends_with('*'))
                        .collect();
                    // Every key starts with the service's name: most names fail on that at once
                    // (a thousand subscribed hosts per proxy are checked on each change).
                    let svc = c.name.as_bytes();
                    let hit: Vec<Arc<str>> = self
                        .types
                        .get(&TypeKind::VirtualHost)
                        .map(|ts| {
                            ts.names
                                .iter()
                                .filter(|n| {
                                    let Some(host) = n
                                        .strip_prefix(r::ON_DEMAND_ROUTE)
                                        .and_then(|h| h.strip_prefix('/'))
                                    else {
                                        return false;
                                    };
                                    host.len() >= svc.len()
                                        && host.as_bytes()[..svc.len()].eq_ignore_ascii_case(svc)
                                        && keys.iter().any(|k| r::host_is(host, k))
                                })
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    if let Some(set) =
                        out.get_or_insert_with(TypeKind::VirtualHost, || Some(HashSet::new()))
                    {
                        set.extend(hit);
                    }
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
        } else {
            self.refresh_nearby();
        }
        out
    }

    /// The stream loop, shared by both protocols: answer requests, push snapshot changes, end on
    /// client close, error or server shutdown.
    pub(super) async fn run<Req: super::super::transport::RequestMessage + Send + 'static>(
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
                        Err(status) => {
                            let node = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
                            tracing::warn!(node, peer = ?self.status.peer, error = status.message(), "bad xDS request; ending the stream");
                            let _ = tx.send(Err(Box::new(status))).await;
                            break;
                        }
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
}
