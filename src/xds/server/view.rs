//! What a node gets: the resources of its namespace, of the namespaces it may see, and its
//! node-local ones (listeners, its own service's inbound resources, proxyless API listeners).

use std::collections::HashMap;
use std::sync::Arc;

use super::super::resources as r;
use super::super::snapshot::{content_version, Encoded, NamespaceView, Res};
use super::super::{PerKind, TypeKind};
use super::state::{Held, StreamState, ABSENT};

/// Node-local resources (listeners, inbound cluster and route, proxyless API listeners).
#[derive(Debug, Default)]
pub(super) struct Locals {
    pub(super) by_kind: PerKind<Vec<Res>>,
    /// API listeners built on request, by name.
    pub(super) api: HashMap<Arc<str>, Res>,
    /// Load assignments of nearby routing as this node sees them, by name, with the input they
    /// came from (its address: a new input is a new allocation). Only for nodes with a locality
    /// in a namespace with nearby rules.
    pub(super) nearby: Option<Box<NearbyCache>>,
}

/// See [`Locals::nearby`].
pub(super) type NearbyCache = HashMap<Arc<str>, (usize, Res)>;

impl StreamState {
    pub(super) fn view(&self) -> Option<&Arc<NamespaceView>> {
        let ns = &self.node.as_ref()?.namespace;
        self.snap.namespaces.get(ns.as_str())
    }

    /// Whether the node sees the services of `ns`.
    pub(super) fn sees(&self, ns: &str) -> bool {
        self.node.as_ref().is_some_and(|n| {
            n.namespace == ns || n.extra_namespaces.iter().any(|e| e == "*" || e == ns)
        })
    }

    /// Whether the node sees more than its own namespace.
    pub(super) fn widened(&self) -> bool {
        self.node
            .as_ref()
            .is_some_and(|n| !n.extra_namespaces.is_empty())
    }

    /// The other namespaces' views the node sees, sorted by name.
    pub(super) fn extra_views(&self) -> Vec<(&Arc<str>, &Arc<NamespaceView>)> {
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

    /// The caller key (`ns/svc`) routing rules may name this node by.
    pub(super) fn caller(&self) -> Option<String> {
        let n = self.node.as_ref()?;
        Some(format!("{}/{}", n.namespace, n.service.as_ref()?))
    }

    /// The own route configuration routing rules give this node's service, if any (its
    /// namespace's; widened and on-demand nodes build theirs locally).
    pub(super) fn caller_route(&self) -> Option<&Res> {
        if self.local_route() {
            return None;
        }
        let caller = self.caller()?;
        self.view()?.caller_routes.get(caller.as_str())
    }

    /// A namespace's virtual hosts as this node sees them (with the ones rules give its caller).
    fn vhosts_of(
        &self,
        v: &NamespaceView,
    ) -> Vec<envoy_types::pb::envoy::config::route::v3::VirtualHost> {
        let caller = self.caller();
        let overrides = caller.as_deref().and_then(|c| v.caller_vhosts.get(c));
        v.vhosts
            .iter()
            .map(|(svc, vh)| overrides.and_then(|o| o.get(svc)).unwrap_or(vh).clone())
            .collect()
    }

    pub(super) fn rebuild_locals(&mut self) {
        let Some(node) = self.node.clone() else {
            return;
        };
        let mut by_kind: PerKind<Vec<Res>> = PerKind::default();
        if self.widened() && !node.on_demand {
            // Own services answer every name; other namespaces' only their qualified names, so the
            // bare `svc` of two namespaces never collides.
            let mut vhosts: Vec<_> = self.view().map(|v| self.vhosts_of(v)).unwrap_or_default();
            for (_, v) in self.extra_views() {
                for vh in self.vhosts_of(v) {
                    let mut vh = vh;
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
            r::on_demand_outbound_listener("0.0.0.0", node.outbound_port, self.delta)
        } else {
            match self.caller_route() {
                Some(rc) => r::outbound_listener_to("0.0.0.0", node.outbound_port, &rc.name),
                None => r::outbound_listener("0.0.0.0", node.outbound_port),
            }
        };
        by_kind
            .get_or_default(TypeKind::Listener)
            .push(Encoded::new(Arc::from(outbound.name.as_str()), &outbound));
        let own = node.service.as_ref().and_then(|svc| {
            self.view()
                .and_then(|v| v.services.get(svc.as_str()))
                .filter(|sv| sv.service.alias_for.is_none())
                .map(|sv| {
                    (
                        sv.service.clone(),
                        sv.ports.clone(),
                        sv.tls.server,
                        sv.limits.clone(),
                        sv.share,
                    )
                })
        });
        if let Some((svc, ports, tls_mode, limits, share)) = own {
            let limits = r::limit_rules(&limits);
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
            let l = r::inbound_listener(
                &svc.namespace,
                &svc.name,
                node.inbound_port,
                tls_mode,
                &self.snap.trust_domain,
                &r::inbound_filters(&svc.namespace, &svc.name, self.snap.rls.is_some()),
            );
            by_kind
                .get_or_default(TypeKind::Listener)
                .push(Encoded::new(Arc::from(l.name.as_str()), &l));
            if let Some(addr) = &self.snap.rls {
                let c = r::rls_cluster(addr);
                by_kind
                    .get_or_default(TypeKind::Cluster)
                    .push(Encoded::new(Arc::from(c.name.as_str()), &c));
            }
            let rc = r::inbound_route_limited(&svc.namespace, &svc.name, &limits, share);
            by_kind
                .get_or_default(TypeKind::Route)
                .push(Encoded::new(Arc::from(rc.name.as_str()), &rc));
        }
        self.locals.by_kind = by_kind;
        self.refresh_nearby();
    }

    /// Derives this node's nearby load assignments from the namespace's (again only for inputs
    /// that changed).
    pub(super) fn refresh_nearby(&mut self) {
        let (Some(place), Some(view)) = (
            self.node.as_ref().and_then(|n| n.locality.clone()),
            self.view().cloned(),
        ) else {
            self.locals.nearby = None;
            return;
        };
        if view.nearby.is_empty() {
            self.locals.nearby = None;
            return;
        }
        let mut map = self.locals.nearby.take().unwrap_or_default();
        map.retain(|k, _| view.nearby.contains_key(k));
        for (name, input) in view.nearby.iter() {
            let ptr = Arc::as_ptr(input) as usize;
            if map.get(name).is_some_and(|(p, _)| *p == ptr) {
                continue;
            }
            let cla = input.spec.to_proto_nearby(&place, &input.nearby);
            let version = content_version(&[
                &input.spec.version().to_le_bytes(),
                format!("{place:?}{:?}", input.nearby).as_bytes(),
            ]);
            map.insert(
                name.clone(),
                (ptr, Encoded::with_version(name.clone(), &cla, version)),
            );
        }
        self.locals.nearby = Some(map);
    }

    /// The resource `name` of `kind` as this node would get it.
    pub(super) fn lookup(&self, kind: TypeKind, name: &str) -> Option<Res> {
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
            TypeKind::Secret => self.snap.secrets.get(name).cloned(),
            TypeKind::Cluster | TypeKind::Endpoint => self.shared_res(kind, name).cloned(),
            TypeKind::Route => view
                .and_then(|v| v.route.clone())
                .filter(|rt| &*rt.name == name)
                .or_else(|| self.caller_route().filter(|rt| &*rt.name == name).cloned()),
            TypeKind::VirtualHost => {
                let (rc, host) = r::parse_vhds_name(name)?;
                if rc != r::ON_DEMAND_ROUTE {
                    return None;
                }
                // The caller's own host when its rules give it one, as in its route configuration.
                let caller = self.caller();
                let vh = view.and_then(|v| {
                    let svc = v.hosts.get(&r::host_key(host))?;
                    caller
                        .as_deref()
                        .and_then(|c| v.caller_vhosts.get(c))
                        .and_then(|m| m.get(svc))
                        .or_else(|| v.vhosts.get(svc))
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
    pub(super) fn shared_res(&self, kind: TypeKind, name: &str) -> Option<&Res> {
        if kind == TypeKind::Endpoint {
            if let Some((_, r)) = self.locals.nearby.as_ref().and_then(|m| m.get(name)) {
                return Some(r);
            }
        }
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
    pub(super) fn intern(&self, kind: TypeKind, name: &str) -> Arc<str> {
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
    pub(super) fn prepare_api_listener(&mut self, name: &Arc<str>) {
        if r::parse_target(name).is_some() && !self.locals.api.contains_key(name) {
            self.locals.api.insert(
                name.clone(),
                Encoded::new(name.clone(), &r::api_listener(name)),
            );
        }
    }

    /// Every resource of `kind` a wildcard subscriber gets.
    /// Whether the node fetches service clusters on demand (ODCDS): an on-demand sidecar on a
    /// delta stream. Its wildcard CDS covers every cluster but the services' own
    /// (`OUTBOUND|ns|svc`), which it subscribes to by name when a request needs one; group
    /// clusters stay (weighted routes name them, and ODCDS resolves only single-cluster routes).
    pub(super) fn on_demand_clusters(&self) -> bool {
        self.delta && self.node.as_ref().is_some_and(|n| n.on_demand)
    }

    /// Whether the wildcard covers cluster `name` (see [`Self::on_demand_clusters`]).
    fn wildcard_cluster(&self, name: &str) -> bool {
        !self.on_demand_clusters() || name.split('|').count() != 3
    }

    pub(super) fn wildcard_set(&self, kind: TypeKind) -> Vec<Res> {
        let mut out: Vec<Res> = self.locals.by_kind.get(&kind).cloned().unwrap_or_default();
        if let Some(v) = self.view() {
            match kind {
                TypeKind::Cluster => out.extend(
                    v.clusters
                        .iter()
                        .filter(|(n, _)| self.wildcard_cluster(n))
                        .map(|(_, r)| r.clone()),
                ),
                TypeKind::Endpoint => out.extend(v.endpoints.iter().map(|(n, r)| {
                    self.locals
                        .nearby
                        .as_ref()
                        .and_then(|m| m.get(n))
                        .map_or(r, |(_, near)| near)
                        .clone()
                })),
                TypeKind::Route => {
                    if !self.local_route() {
                        out.extend(self.caller_route().or(v.route.as_ref()).cloned())
                    }
                }
                TypeKind::Listener | TypeKind::VirtualHost | TypeKind::Secret => {}
            }
        }
        if kind == TypeKind::Secret {
            out.extend(self.snap.secrets.values().cloned());
        }
        for (_, v) in self.extra_views() {
            match kind {
                TypeKind::Cluster => out.extend(
                    v.clusters
                        .iter()
                        .filter(|(n, _)| self.wildcard_cluster(n))
                        .map(|(_, r)| r.clone()),
                ),
                TypeKind::Endpoint => out.extend(v.endpoints.values().cloned()),
                _ => {}
            }
        }
        out
    }

    /// Whether the node gets a route of its own instead of its namespace's shared one.
    pub(super) fn local_route(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.on_demand) || self.widened()
    }

    /// Whether a wildcard subscriber of `kind` gets `name` (agrees with [`Self::wildcard_set`]).
    pub(super) fn in_wildcard(&self, kind: TypeKind, name: &str) -> bool {
        if self
            .locals
            .by_kind
            .get(&kind)
            .is_some_and(|v| v.iter().any(|e| &*e.name == name))
        {
            return true;
        }
        match kind {
            TypeKind::Secret => self.snap.secrets.contains_key(name),
            TypeKind::Cluster => {
                self.wildcard_cluster(name) && self.shared_res(kind, name).is_some()
            }
            TypeKind::Endpoint => self.shared_res(kind, name).is_some(),
            TypeKind::Route => {
                !self.local_route()
                    && self
                        .caller_route()
                        .or_else(|| self.view().and_then(|v| v.route.as_ref()))
                        .is_some_and(|rt| &*rt.name == name)
            }
            TypeKind::Listener | TypeKind::VirtualHost => false,
        }
    }

    /// The names the client's subscription of `kind` covers that exist or are named.
    pub(super) fn wanted_names(&self, kind: TypeKind) -> Vec<Arc<str>> {
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
    pub(super) fn implied(&self, kind: TypeKind, name: &str) -> Held {
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
    pub(super) fn held(&self, kind: TypeKind, name: &str) -> Held {
        match self.types.get(&kind).and_then(|t| t.overlay.get(name)) {
            Some(h) => *h,
            None => self.implied(kind, name),
        }
    }
}
