//! The builder: translates registry changes into new snapshot generations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use tokio::sync::broadcast;

use super::encoded::content_version;
use super::tls::TlsState;
use super::{Cache, Changed, Encoded, NamespaceView, NearbyInput, ServiceView, Snapshot};
use crate::model::rules::{Rule, RuleKind};
use crate::model::{Instance, Service, ServiceKey};
use crate::registry::{ChangeKey, Registry};
use crate::xds::resources as r;
use crate::xds::TypeKind;

/// How the builder translates.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long to gather a burst of registry changes before publishing (the first change after
    /// a quiet period is published at once).
    pub debounce: Duration,
    /// Time each step of a TLS mode change has to reach every proxy before the next step (see
    /// [`super::tls`]). It should exceed the push p99 to the mesh's proxies.
    pub tls_phase: Duration,
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: Arc<str>,
    /// The rate-limit service's address as sidecars reach it (global rate limits).
    pub rls: Option<crate::model::HostPort>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            debounce: Duration::from_millis(5),
            tls_phase: Duration::from_millis(400),
            trust_domain: Arc::from(r::DEFAULT_TRUST_DOMAIN),
            rls: None,
        }
    }
}

/// Builds snapshots from the registry.
pub struct Builder {
    cfg: Config,
    namespaces: HashMap<Arc<str>, Arc<NamespaceView>>,
    generation: u64,
    /// Clusters of deleted services, removed one generation after their routes: (ns, cluster, service).
    retiring: Vec<(Arc<str>, Arc<str>, Arc<str>)>,
    /// Services part way through a TLS mode change, and when their next step is due.
    tls_pending: HashMap<ServiceKey, Instant>,
    /// Services whose next TLS step is being taken now (set by [`Builder::advance_tls`]).
    tls_stepping: HashSet<ServiceKey>,
}

impl Builder {
    /// An empty builder.
    pub fn new(cfg: Config) -> Self {
        Builder {
            cfg,
            namespaces: HashMap::new(),
            generation: 0,
            retiring: Vec::new(),
            tls_pending: HashMap::new(),
            tls_stepping: HashSet::new(),
        }
    }

    /// When the next TLS mode step is due, if a change is rolling out.
    pub fn next_tls_step(&self) -> Option<Instant> {
        self.tls_pending.values().min().copied()
    }

    /// Takes the next step of every TLS mode change that is due, and publishes.
    pub fn advance_tls(&mut self, reg: &Registry, cache: &Cache) {
        let now = Instant::now();
        let due: Vec<ServiceKey> = self
            .tls_pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        self.tls_stepping = due.iter().cloned().collect();
        let keys = due.into_iter().map(ChangeKey::Service).collect();
        self.apply(reg, keys, cache.applied_revision(), cache);
        self.tls_stepping.clear();
    }

    /// Whether clusters of deleted services wait for [`Builder::retire`].
    pub fn has_retiring(&self) -> bool {
        !self.retiring.is_empty()
    }

    /// Removes the clusters (and load assignments) of deleted services whose routes are gone
    /// already, and publishes. A service re-created meanwhile keeps its cluster.
    pub fn retire(&mut self, cache: &Cache) {
        let mut changes = Vec::new();
        for (ns, cname, svc) in std::mem::take(&mut self.retiring) {
            let Some(cur) = self.namespaces.get(&ns) else {
                continue;
            };
            if cur
                .services
                .get(&svc)
                .is_some_and(|sv| sv.clusters.contains(&cname))
            {
                continue;
            }
            let mut view = (**cur).clone();
            for (kind, removed) in [
                (
                    TypeKind::Cluster,
                    Arc::make_mut(&mut view.clusters).remove(&cname).is_some(),
                ),
                (
                    TypeKind::Endpoint,
                    Arc::make_mut(&mut view.endpoints).remove(&cname).is_some(),
                ),
            ] {
                if removed {
                    changes.push(Changed {
                        namespace: ns.clone(),
                        kind,
                        name: cname.clone(),
                    });
                }
            }
            self.namespaces.insert(ns, Arc::new(view));
        }
        cache
            .retiring
            .store(0, std::sync::atomic::Ordering::Release);
        if changes.is_empty() {
            return;
        }
        self.check(&changes);
        self.generation += 1;
        cache.publish(
            Snapshot {
                generation: self.generation,
                revision: cache.applied_revision(),
                namespaces: self.namespaces.clone(),
                secrets: Default::default(),
                trust_domain: self.cfg.trust_domain.clone(),
                rls: self.cfg.rls.clone(),
            },
            changes,
        );
    }

    /// Re-translates everything and publishes.
    pub fn full(&mut self, reg: &Registry, cache: &Cache) {
        let started = std::time::Instant::now();
        let (revision, keys): (u64, Vec<ServiceKey>) = {
            let st = reg.read();
            (st.revision, st.services.keys().cloned().collect())
        };
        let ns: Vec<String> = reg.read().namespaces.keys().cloned().collect();
        let mut touched: Vec<ChangeKey> = ns.into_iter().map(ChangeKey::Namespace).collect();
        touched.extend(keys.into_iter().map(ChangeKey::Service));
        // Services translated before but gone from the registry must be looked at too.
        for (ns, view) in &self.namespaces {
            for svc in view.services.keys() {
                touched.push(ChangeKey::Service(ServiceKey::new(&**ns, &**svc)));
            }
        }
        // Forget namespaces that no longer exist.
        let live: std::collections::HashSet<String> =
            reg.read().namespaces.keys().cloned().collect();
        let mut changes = Vec::new();
        self.namespaces.retain(|n, _| live.contains(&**n));
        self.apply_inner(reg, touched, revision, cache, &mut changes);
        cache.build_stats.write().full = started.elapsed();
    }

    /// Applies the keys of registry changes and publishes a new generation if anything changed.
    pub fn apply(&mut self, reg: &Registry, keys: Vec<ChangeKey>, revision: u64, cache: &Cache) {
        let started = std::time::Instant::now();
        let mut changes = Vec::new();
        self.apply_inner(reg, keys, revision, cache, &mut changes);
        cache.build_stats.write().incremental = started.elapsed();
    }

    /// Debug builds (every test) check each namespace a generation touches before publishing it.
    fn check(&self, changes: &[Changed]) {
        if !cfg!(debug_assertions) {
            return;
        }
        let touched: std::collections::BTreeSet<&str> =
            changes.iter().map(|c| &*c.namespace).collect();
        for ns in touched {
            if let Some(view) = self.namespaces.get(ns) {
                if let Err(e) = crate::xds::consistent(ns, view) {
                    panic!("inconsistent snapshot for namespace {ns}: {e:?}");
                }
            }
        }
    }

    fn apply_inner(
        &mut self,
        reg: &Registry,
        keys: Vec<ChangeKey>,
        revision: u64,
        cache: &Cache,
        changes: &mut Vec<Changed>,
    ) {
        let mut by_ns: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in keys {
            match k {
                ChangeKey::Namespace(n) => {
                    by_ns.entry(n).or_default();
                }
                ChangeKey::Service(k) | ChangeKey::Instances(k) => {
                    by_ns.entry(k.namespace).or_default().push(k.name)
                }
            }
        }
        for (ns, mut svcs) in by_ns {
            svcs.sort();
            svcs.dedup();
            self.apply_namespace(reg, &ns, &svcs, changes);
        }
        cache
            .retiring
            .store(self.retiring.len(), std::sync::atomic::Ordering::Release);
        if changes.is_empty() && self.generation > 0 {
            cache
                .applied
                .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
            return;
        }
        self.check(changes);
        self.generation += 1;
        cache.publish(
            Snapshot {
                generation: self.generation,
                revision,
                namespaces: self.namespaces.clone(),
                secrets: Default::default(),
                trust_domain: self.cfg.trust_domain.clone(),
                rls: self.cfg.rls.clone(),
            },
            std::mem::take(changes),
        );
        cache
            .applied
            .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
    }

    /// The TLS state `svc` is translated in this generation: a new service starts in its mode; a
    /// settled one takes the first step toward a new mode at once; one part way through a change
    /// takes its next step only when [`Builder::advance_tls`] says it is due.
    fn tls_state(
        &mut self,
        ns: &str,
        name: &str,
        svc: &Service,
        prev: Option<TlsState>,
    ) -> TlsState {
        let target = svc.tls_mode();
        let key = ServiceKey::new(ns, name);
        let Some(cur) = prev else {
            self.tls_pending.remove(&key);
            return TlsState::settled(target);
        };
        if cur == TlsState::settled(target) {
            self.tls_pending.remove(&key);
            return cur;
        }
        if !cur.is_settled() && !self.tls_stepping.contains(&key) {
            // Mid-rollout and not yet due: keep the state; the pending step stays scheduled
            // (a rollout interrupted by a lagged full rebuild is rescheduled).
            self.tls_pending
                .entry(key)
                .or_insert_with(|| Instant::now() + self.cfg.tls_phase);
            return cur;
        }
        let next = cur.step(target);
        if next == TlsState::settled(target) {
            self.tls_pending.remove(&key);
        } else {
            self.tls_pending
                .insert(key, Instant::now() + self.cfg.tls_phase);
        }
        tracing::info!(
            namespace = ns,
            service = name,
            client = next.client.as_str(),
            server = next.server.as_str(),
            target = target.as_str(),
            "TLS mode step"
        );
        next
    }

    fn apply_namespace(
        &mut self,
        reg: &Registry,
        ns: &str,
        svcs: &[String],
        changes: &mut Vec<Changed>,
    ) {
        // Copy the inputs (Arcs) and release the registry lock before translating: the writer
        // must not wait on encoding.
        type Input = Option<(Arc<Service>, Vec<Arc<Instance>>, Vec<Arc<Rule>>)>;
        let (exists, inputs): (bool, Vec<Input>) = {
            let st = reg.read();
            (
                st.namespaces.contains_key(ns),
                svcs.iter()
                    .map(|n| {
                        let key = ServiceKey::new(ns, n);
                        st.services.get(&key).map(|e| {
                            (
                                e.service.clone(),
                                e.instances.values().cloned().collect(),
                                st.rules_of(&key),
                            )
                        })
                    })
                    .collect(),
            )
        };
        let ns_arc: Arc<str> = Arc::from(ns);
        if !exists {
            if let Some(old) = self.namespaces.remove(ns) {
                for n in old.clusters.keys() {
                    changes.push(Changed {
                        namespace: ns_arc.clone(),
                        kind: TypeKind::Cluster,
                        name: n.clone(),
                    });
                    changes.push(Changed {
                        namespace: ns_arc.clone(),
                        kind: TypeKind::Endpoint,
                        name: n.clone(),
                    });
                }
            }
            return;
        }
        let mut view = self
            .namespaces
            .get(ns)
            .map(|v| (**v).clone())
            .unwrap_or_default();
        let is_new = !self.namespaces.contains_key(ns);
        let mut route_dirty = is_new;
        // Callers whose own route configuration must be rebuilt.
        let mut dirty_callers: std::collections::BTreeSet<Arc<str>> = Default::default();
        for (name, input) in svcs.iter().zip(inputs) {
            let name_arc: Arc<str> = Arc::from(name.as_str());
            let cname: Arc<str> = Arc::from(r::outbound_name(ns, name).as_str());
            match input {
                None => {
                    self.tls_pending.remove(&ServiceKey::new(ns, name));
                    if view.nearby.contains_key(&cname) {
                        Arc::make_mut(&mut view.nearby).remove(&cname);
                    }
                    if let Some(prev) = view.services.get(name.as_str()).cloned() {
                        // Its callers' own hosts go with it (a service of that name created later
                        // starts from its own rules).
                        for c in prev.callers.iter() {
                            if let Some(m) = Arc::make_mut(&mut view.caller_vhosts).get_mut(c) {
                                m.remove(name.as_str());
                            }
                            dirty_callers.insert(c.clone());
                        }
                        Arc::make_mut(&mut view.services).remove(name.as_str());
                    }
                    if view.vhosts.contains_key(name.as_str()) {
                        Arc::make_mut(&mut view.vhosts).remove(name.as_str());
                        route_dirty = true;
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::VirtualHost,
                            name: name_arc.clone(),
                        });
                    }
                    // Make before break: the route stops naming the cluster in this generation;
                    // the cluster and its endpoints go in a later one (see `retire`).
                    if view.clusters.contains_key(&cname) {
                        self.retiring
                            .push((ns_arc.clone(), cname.clone(), name_arc.clone()));
                    }
                    changes.push(Changed {
                        namespace: ns_arc.clone(),
                        kind: TypeKind::Listener,
                        name: name_arc.clone(),
                    });
                }
                Some((svc, insts, rules)) => {
                    let instances: Vec<&Instance> = insts.iter().map(|i| i.as_ref()).collect();
                    let ports = r::service_ports(&svc, instances.iter().copied());
                    let discovery = match svc.alias_for {
                        Some(_) => r::Discovery::Eds,
                        None => r::discovery(instances.iter().copied()),
                    };
                    let rules: Vec<Arc<Rule>> = rules.into_iter().filter(|r| r.enabled()).collect();
                    let routing = r::routing_rules(&rules);
                    let metadata = r::metadata_labels(&rules).filter(|_| svc.alias_for.is_none());
                    // Depends on the service record and its routing rules (not on instances or
                    // their ports).
                    let vhost = r::service_virtual_host_with(
                        &svc,
                        r::service_routes_with(&svc, &routing, None, metadata.as_ref()),
                    );
                    if view.vhosts.get(name.as_str()) != Some(&vhost) {
                        Arc::make_mut(&mut view.vhosts).insert(name_arc.clone(), vhost);
                        route_dirty = true;
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::VirtualHost,
                            name: name_arc.clone(),
                        });
                    }
                    // Callers some rule names see the service through routes of their own.
                    let callers: Vec<Arc<str>> = r::named_callers(&routing)
                        .into_iter()
                        .map(Arc::from)
                        .collect();
                    let prev_callers = view
                        .services
                        .get(name.as_str())
                        .map(|p| p.callers.clone())
                        .unwrap_or_default();
                    // Whether a caller's host of this service changed.
                    let mut touched = false;
                    for c in prev_callers.iter().filter(|c| !callers.contains(c)) {
                        if let Some(m) = Arc::make_mut(&mut view.caller_vhosts).get_mut(c) {
                            m.remove(name.as_str());
                        }
                        dirty_callers.insert(c.clone());
                        touched = true;
                    }
                    for c in &callers {
                        let vh = r::service_virtual_host_with(
                            &svc,
                            r::service_routes_with(&svc, &routing, Some(c), metadata.as_ref()),
                        );
                        let cur = view.caller_vhosts.get(c).and_then(|m| m.get(name.as_str()));
                        if cur != Some(&vh) {
                            Arc::make_mut(&mut view.caller_vhosts)
                                .entry(c.clone())
                                .or_default()
                                .insert(name_arc.clone(), vh);
                            dirty_callers.insert(c.clone());
                            touched = true;
                        }
                    }
                    if touched {
                        // On-demand nodes of those callers hold the host through VHDS.
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::VirtualHost,
                            name: name_arc.clone(),
                        });
                    }
                    let limits: Vec<Arc<Rule>> = rules
                        .iter()
                        .filter(|r| r.kind() == RuleKind::RateLimit)
                        .cloned()
                        .collect();
                    let groups = if svc.alias_for.is_some() {
                        vec![]
                    } else {
                        r::groups_with(&routing, metadata.as_ref())
                    };
                    let mut cluster_names: Vec<Arc<str>> = vec![cname.clone()];
                    cluster_names.extend(
                        groups
                            .iter()
                            .map(|g| Arc::from(r::group_cluster_name(ns, name, g).as_str())),
                    );
                    let failover = metadata
                        .as_ref()
                        .filter(|m| !m.is_empty())
                        .map(|m| r::failover_cluster(ns, name, m));
                    if let Some(f) = &failover {
                        cluster_names.push(Arc::from(f.name.as_str()));
                    }
                    let prev = view.services.get(name.as_str());
                    let tls = self.tls_state(ns, name, &svc, prev.map(|p| p.tls));
                    let service_changed = prev.is_none_or(|p| p.service != svc);
                    // The service's own sidecars serve its ports (inbound cluster) in its server
                    // TLS mode (inbound listener), within its rate limits.
                    let share = if r::limit_rules(&limits).iter().any(|l| {
                        l.amount_mode == crate::model::rules::ratelimit::AmountMode::ShareEqually
                    }) {
                        instances
                            .iter()
                            .filter(|i| r::takes_traffic(i))
                            .count()
                            .max(1) as u32
                    } else {
                        1
                    };
                    let local_changed = prev.is_some_and(|p| {
                        p.ports != ports
                            || p.tls.server != tls.server
                            || *p.limits != limits
                            || p.share != share
                    });
                    if let Some(f) = &failover {
                        cluster_names.push(Arc::from(f.name.as_str()));
                    }
                    let next = ServiceView {
                        service: svc.clone(),
                        ports,
                        discovery,
                        tls,
                        clusters: Arc::from(cluster_names.clone()),
                        callers: Arc::from(callers),
                        limits: Arc::new(limits),
                        share,
                    };
                    let retired: Vec<Arc<str>> = prev
                        .map(|p| {
                            p.clusters
                                .iter()
                                .filter(|c| !cluster_names.contains(c))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    if prev.is_none_or(|p| !p.same(&next)) {
                        Arc::make_mut(&mut view.services).insert(name_arc.clone(), next);
                    }
                    if service_changed || local_changed {
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::Listener,
                            name: name_arc.clone(),
                        });
                    }
                    // Make before break: clusters of groups no rule routes to any longer go
                    // after the routes that named them.
                    for c in retired {
                        self.retiring.push((ns_arc.clone(), c, name_arc.clone()));
                    }
                    if svc.alias_for.is_some() {
                        continue;
                    }
                    let base = r::with_resilience(
                        r::with_tls(
                            r::outbound_cluster(&svc),
                            &svc,
                            tls.client,
                            &self.cfg.trust_domain,
                        ),
                        &svc,
                        &rules,
                    );
                    put_cluster(
                        &mut view,
                        changes,
                        &ns_arc,
                        base.clone(),
                        &instances,
                        discovery,
                        tls.server,
                    );
                    // Nearby routing: streams derive their callers' assignments from this one.
                    let near = r::nearby_rule(&rules).map(|n| {
                        Arc::new(NearbyInput {
                            spec: r::LoadAssignmentSpec::eds(
                                &cname,
                                instances.iter().copied(),
                                tls.server,
                            ),
                            nearby: n,
                        })
                    });
                    if view.nearby.get(&cname).map(|a| a.as_ref()) != near.as_deref() {
                        match near {
                            Some(n) => Arc::make_mut(&mut view.nearby).insert(cname.clone(), n),
                            None => Arc::make_mut(&mut view.nearby).remove(&cname),
                        };
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::Endpoint,
                            name: cname.clone(),
                        });
                    }
                    if let Some(f) = failover {
                        let enc = Encoded::new(Arc::from(f.name.as_str()), &f);
                        put_changed_cluster(&mut view, changes, &ns_arc, enc);
                    }
                    for (g, gname) in groups.iter().zip(cluster_names.iter().skip(1)) {
                        let members: Vec<&Instance> = instances
                            .iter()
                            .copied()
                            .filter(|i| g.iter().all(|(k, v)| i.metadata.get(k) == Some(v)))
                            .collect();
                        put_cluster(
                            &mut view,
                            changes,
                            &ns_arc,
                            r::renamed(base.clone(), gname),
                            &members,
                            discovery,
                            tls.server,
                        );
                    }
                }
            }
        }
        // Every host encoded once for the shared configuration and every caller's.
        let encoded = (route_dirty || !dirty_callers.is_empty())
            .then(|| r::EncodedVhosts::new(view.vhosts.iter().map(|(s, vh)| (&**s, vh))));
        let mut shared_route = None;
        let mut caller_routes = Vec::new();
        if let Some(e) = &encoded {
            if route_dirty {
                shared_route = Some(Encoded::from_encoded::<RouteConfiguration>(
                    Arc::from(r::OUTBOUND_ROUTE),
                    e.route_configuration(r::OUTBOUND_ROUTE, None),
                ));
                // Every caller's configuration holds the shared virtual hosts too.
                dirty_callers.extend(view.caller_vhosts.keys().cloned());
            }
            for caller in &dirty_callers {
                let name: Arc<str> = Arc::from(r::caller_route_name(caller).as_str());
                let own = view
                    .caller_vhosts
                    .get(caller)
                    .filter(|m| !m.is_empty())
                    .map(|m| {
                        Encoded::from_encoded::<RouteConfiguration>(
                            name.clone(),
                            e.route_configuration(&name, Some(m)),
                        )
                    });
                caller_routes.push((caller.clone(), name, own));
            }
        }
        drop(encoded);
        if route_dirty {
            // VHDS looks hosts up here; like the route configuration, the first virtual host
            // (by service name) with a domain keeps it.
            let hosts = Arc::make_mut(&mut view.hosts);
            hosts.clear();
            for (svc, vh) in view.vhosts.iter() {
                for d in r::exact_domains(vh) {
                    hosts
                        .entry(d.to_ascii_lowercase())
                        .or_insert_with(|| svc.clone());
                }
            }
            let enc = shared_route.expect("encoded when the route is dirty");
            if view.route.as_ref().is_none_or(|o| o.version != enc.version) {
                view.route = Some(enc);
                changes.push(Changed {
                    namespace: ns_arc.clone(),
                    kind: TypeKind::Route,
                    name: Arc::from(r::OUTBOUND_ROUTE),
                });
            }
        }
        for (caller, name, own) in caller_routes {
            let had_own = view.caller_routes.contains_key(&caller);
            match own {
                None => {
                    Arc::make_mut(&mut view.caller_vhosts).remove(&caller);
                    if Arc::make_mut(&mut view.caller_routes)
                        .remove(&caller)
                        .is_some()
                    {
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::Route,
                            name: name.clone(),
                        });
                    }
                }
                Some(enc) => {
                    if view
                        .caller_routes
                        .get(&caller)
                        .is_none_or(|o| o.version != enc.version)
                    {
                        Arc::make_mut(&mut view.caller_routes).insert(caller.clone(), enc);
                        changes.push(Changed {
                            namespace: ns_arc.clone(),
                            kind: TypeKind::Route,
                            name: name.clone(),
                        });
                    }
                }
            }
            // The caller's sidecars switch between the shared and their own configuration in
            // their node-local listener, which only changes when the caller's own configuration
            // comes or goes (a changed one keeps its name).
            if had_own == view.caller_routes.contains_key(&caller) {
                continue;
            }
            if let Some((cns, csvc)) = caller.split_once('/') {
                if cns == ns {
                    changes.push(Changed {
                        namespace: ns_arc.clone(),
                        kind: TypeKind::Listener,
                        name: Arc::from(csvc),
                    });
                }
            }
        }
        self.namespaces.insert(ns_arc, Arc::new(view));
    }
}

/// Puts one cluster of a service (its own, or one of its groups') and its endpoints into the
/// view, recording what changed.
fn put_cluster(
    view: &mut NamespaceView,
    changes: &mut Vec<Changed>,
    ns: &Arc<str>,
    cluster: envoy_types::pb::envoy::config::cluster::v3::Cluster,
    instances: &[&Instance],
    discovery: r::Discovery,
    server_tls: crate::model::TlsMode,
) {
    let cname: Arc<str> = Arc::from(cluster.name.as_str());
    let enc = match discovery {
        r::Discovery::Eds => Encoded::new(cname.clone(), &cluster),
        r::Discovery::StrictDns => {
            // The inline load assignment has maps (metadata) that encode in random order:
            // version the canonical parts.
            let dns = r::LoadAssignmentSpec::dns(&cname, instances.iter().copied(), server_tls);
            let version =
                content_version(&[&cluster.encode_to_vec(), &dns.version().to_le_bytes()]);
            Encoded::with_version(
                cname.clone(),
                &r::with_dns_endpoints(cluster, &dns),
                version,
            )
        }
    };
    put_changed_cluster(view, changes, ns, enc);
    let eds = r::LoadAssignmentSpec::eds(&cname, instances.iter().copied(), server_tls);
    let version = eds.version();
    if view
        .endpoints
        .get(&cname)
        .is_none_or(|c| c.version != version)
    {
        Arc::make_mut(&mut view.endpoints).insert(
            cname.clone(),
            Encoded::with_version(cname.clone(), &eds.to_proto(), version),
        );
        changes.push(Changed {
            namespace: ns.clone(),
            kind: TypeKind::Endpoint,
            name: cname,
        });
    }
}

/// Puts an encoded cluster into the view unless the same version is there, recording the change.
fn put_changed_cluster(
    view: &mut NamespaceView,
    changes: &mut Vec<Changed>,
    ns: &Arc<str>,
    enc: Arc<Encoded>,
) {
    if view
        .clusters
        .get(&enc.name)
        .is_none_or(|c| c.version != enc.version)
    {
        changes.push(Changed {
            namespace: ns.clone(),
            kind: TypeKind::Cluster,
            name: enc.name.clone(),
        });
        Arc::make_mut(&mut view.clusters).insert(enc.name.clone(), enc);
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

/// How long a deleted service's cluster outlives its route: long enough for clients to apply the
/// route update first (make before break).
pub const RETIRE_AFTER: Duration = Duration::from_millis(500);

/// Keeps the cache in step with the registry. The first change after a quiet period is translated
/// at once; changes arriving within the debounce after it are gathered into one more publish.
pub async fn run(reg: Registry, cache: Arc<Cache>, cfg: Config) {
    let debounce = cfg.debounce;
    let mut feed = reg.subscribe();
    let mut builder = Builder::new(cfg);
    builder.full(&reg, &cache);
    let mut retire_at: Option<tokio::time::Instant> = None;
    loop {
        if retire_at.is_none() && builder.has_retiring() {
            retire_at = Some(tokio::time::Instant::now() + RETIRE_AFTER);
        }
        let tls_at = builder.next_tls_step().map(tokio::time::Instant::from_std);
        let received = tokio::select! {
            r = feed.recv() => r,
            _ = async { tokio::time::sleep_until(retire_at.expect("guarded")).await }, if retire_at.is_some() => {
                retire_at = None;
                builder.retire(&cache);
                continue;
            }
            _ = async { tokio::time::sleep_until(tls_at.expect("guarded")).await }, if tls_at.is_some() => {
                builder.advance_tls(&reg, &cache);
                continue;
            }
        };
        let (keys, rev, lagged) = match received {
            Ok(c) => (c.keys.clone(), c.revision, false),
            Err(broadcast::error::RecvError::Lagged(_)) => (vec![], 0, true),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if lagged {
            builder.full(&reg, &cache);
        } else {
            builder.apply(&reg, keys, rev, &cache);
        }
        if debounce.is_zero() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + debounce;
        let mut acc = Vec::new();
        let mut rev = 0;
        let mut lagged = false;
        loop {
            tokio::select! {
                r = feed.recv() => match r {
                    Ok(c) => { acc.extend(c.keys.iter().cloned()); rev = c.revision; }
                    Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if lagged {
            builder.full(&reg, &cache);
        } else if !acc.is_empty() {
            builder.apply(&reg, acc, rev, &cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::InstanceInput;
    use crate::model::InstanceSelector;
    use crate::registry::{self, Command};
    use crate::store::RedbStore;

    fn inst(svc: &str, host: &str) -> Instance {
        InstanceInput {
            namespace: Some("default".into()),
            service: Some(svc.into()),
            host: Some(host.into()),
            port: Some(80),
            ..Default::default()
        }
        .validate("t")
        .unwrap()
    }

    async fn registry(dir: &std::path::Path) -> Registry {
        Registry::open(
            Arc::new(RedbStore::open(dir).unwrap()),
            registry::Config::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap()
    }

    fn cluster_of(
        snap: &Snapshot,
        name: &str,
    ) -> (
        Arc<Encoded>,
        envoy_types::pb::envoy::config::cluster::v3::Cluster,
    ) {
        let res = snap.namespaces["default"].clusters[name].clone();
        let c = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(res.value.as_ref())
            .unwrap();
        (res, c)
    }

    #[tokio::test]
    async fn a_hostname_makes_the_cluster_strict_dns_and_its_removal_makes_it_eds_again() {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::{
            ClusterDiscoveryType, DiscoveryType,
        };
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut named = inst("echo", "localhost");
        named.metadata = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        reg.submit(Command::RegisterInstances(vec![
            inst("echo", "10.0.0.1"),
            named.clone(),
        ]))
        .await
        .unwrap();
        let cache = Cache::default();
        let mut b = Builder::default();
        b.full(&reg, &cache);
        let g1 = cache.current();
        let (res, c) = cluster_of(&g1, "OUTBOUND|default|echo");
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
        );
        assert!(c.eds_cluster_config.is_none());
        let inline = c.load_assignment.unwrap();
        assert_eq!(inline.endpoints[0].lb_endpoints.len(), 2);
        assert_eq!(
            g1.namespaces["default"].services["echo"].discovery,
            r::Discovery::StrictDns
        );
        crate::xds::consistent("default", &g1.namespaces["default"]).unwrap();
        // The version does not depend on how the metadata map happens to encode: another
        // builder, another encoding, the same version.
        for _ in 0..8 {
            let other = Cache::default();
            Builder::default().full(&reg, &other);
            assert_eq!(
                cluster_of(&other.current(), "OUTBOUND|default|echo")
                    .0
                    .version,
                res.version
            );
        }
        // The last hostname goes: EDS again, one cluster change.
        reg.submit(Command::DeregisterInstances(vec![InstanceSelector::Id(
            named.id.clone(),
        )]))
        .await
        .unwrap();
        let rev = *reg.revision().borrow();
        b.apply(
            &reg,
            vec![ChangeKey::Instances(ServiceKey::new("default", "echo"))],
            rev,
            &cache,
        );
        let g2 = cache.current();
        let (_, c) = cluster_of(&g2, "OUTBOUND|default|echo");
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
        assert!(c.load_assignment.is_none());
        let ch = cache.changes(g1.generation, g2.generation).unwrap();
        assert!(ch[0].iter().any(|c| c.kind == TypeKind::Cluster));
        crate::xds::consistent("default", &g2.namespaces["default"]).unwrap();
    }

    /// The route configuration changes when services or aliases do, never when instances do (new
    /// ports included).
    #[tokio::test]
    async fn instance_changes_never_touch_the_route_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let on = |svc: &str, host: &str, port: u16| {
            let mut i = inst(svc, host);
            i.port = port;
            i.id = crate::model::instance_id("default", svc, host, port);
            i
        };
        reg.submit(Command::RegisterInstances(vec![
            on("echo", "10.0.0.1", 80),
            on("other", "10.0.0.9", 80),
        ]))
        .await
        .unwrap();
        let cache = Cache::default();
        let mut b = Builder::default();
        b.full(&reg, &cache);
        let route = cache.current().namespaces["default"].route.clone().unwrap();
        let echo = || vec![ChangeKey::Instances(ServiceKey::new("default", "echo"))];
        let apply = |b: &mut Builder, keys: Vec<ChangeKey>| {
            let rev = *reg.revision().borrow();
            let g = cache.current().generation;
            b.apply(&reg, keys, rev, &cache);
            let now = cache.current();
            let kinds: Vec<TypeKind> = cache
                .changes(g, now.generation)
                .unwrap()
                .iter()
                .flat_map(|c| c.iter().map(|c| c.kind))
                .collect();
            (now.namespaces["default"].route.clone().unwrap(), kinds)
        };
        let steps: Vec<(&str, Command)> = vec![
            (
                "same port",
                Command::RegisterInstances(vec![on("echo", "10.0.0.2", 80)]),
            ),
            (
                "new port",
                Command::RegisterInstances(vec![on("echo", "10.0.0.3", 9999)]),
            ),
            (
                "update",
                Command::UpdateInstances(vec![(
                    InstanceSelector::Id(on("echo", "10.0.0.3", 9999).id),
                    InstanceInput {
                        weight: Some(7),
                        healthy: Some(false),
                        ..Default::default()
                    },
                )]),
            ),
            (
                "last on a port",
                Command::DeregisterInstances(vec![InstanceSelector::Id(
                    on("echo", "10.0.0.3", 9999).id,
                )]),
            ),
            (
                "hostname",
                Command::RegisterInstances(vec![on("echo", "localhost", 7000)]),
            ),
        ];
        for (what, cmd) in steps {
            reg.submit(cmd).await.unwrap();
            let (now, kinds) = apply(&mut b, echo());
            assert!(
                Arc::ptr_eq(&now, &route),
                "{what}: the route configuration changed"
            );
            assert!(
                !kinds.contains(&TypeKind::Route) && !kinds.contains(&TypeKind::VirtualHost),
                "{what}: {kinds:?}"
            );
        }
        // A new alias is a new virtual host.
        let alias = crate::model::AliasInput {
            service: Some("echo".into()),
            namespace: Some("default".into()),
            alias: Some("echo-alias".into()),
            ..Default::default()
        }
        .validate("t")
        .unwrap();
        reg.submit(Command::CreateAlias(Box::new(alias)))
            .await
            .unwrap();
        let (now, kinds) = apply(
            &mut b,
            vec![ChangeKey::Service(ServiceKey::new("default", "echo-alias"))],
        );
        assert!(!Arc::ptr_eq(&now, &route));
        assert!(kinds.contains(&TypeKind::Route));
    }

    #[tokio::test]
    async fn one_instance_change_touches_one_eds_resource() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            Arc::new(RedbStore::open(dir.path()).unwrap()),
            registry::Config::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        let batch: Vec<_> = (0..20)
            .map(|i| inst(&format!("s{i}"), "10.0.0.1"))
            .collect();
        reg.submit(Command::RegisterInstances(batch)).await.unwrap();
        let cache = Cache::default();
        let mut b = Builder::default();
        b.full(&reg, &cache);
        let g1 = cache.current();
        assert_eq!(g1.namespaces["default"].clusters.len(), 20);
        crate::xds::consistent("default", &g1.namespaces["default"]).unwrap();

        reg.submit(Command::RegisterInstances(vec![inst("s3", "10.0.0.2")]))
            .await
            .unwrap();
        let rev = *reg.revision().borrow();
        b.apply(
            &reg,
            vec![ChangeKey::Instances(ServiceKey::new("default", "s3"))],
            rev,
            &cache,
        );
        let g2 = cache.current();
        assert_eq!(g2.generation, g1.generation + 1);
        let ch = cache.changes(g1.generation, g2.generation).unwrap();
        let kinds: Vec<_> = ch[0].iter().map(|c| (c.kind, c.name.to_string())).collect();
        assert_eq!(
            kinds,
            vec![(TypeKind::Endpoint, "OUTBOUND|default|s3".to_string())]
        );
        // Everything else is the very same allocation.
        let (a, b2) = (&g1.namespaces["default"], &g2.namespaces["default"]);
        assert!(Arc::ptr_eq(
            &a.clusters[&*Arc::<str>::from("OUTBOUND|default|s1")],
            &b2.clusters[&*Arc::<str>::from("OUTBOUND|default|s1")]
        ));
        assert!(Arc::ptr_eq(
            a.route.as_ref().unwrap(),
            b2.route.as_ref().unwrap()
        ));

        // Re-applying the same state publishes nothing new.
        b.apply(
            &reg,
            vec![ChangeKey::Instances(ServiceKey::new("default", "s3"))],
            rev,
            &cache,
        );
        assert_eq!(cache.current().generation, g2.generation);
    }

    #[test]
    fn versions_are_content_hashes() {
        let svc = Service::bare("default", "echo", "t");
        let a = Encoded::new(Arc::from("x"), &r::outbound_cluster(&svc));
        let b = Encoded::new(Arc::from("x"), &r::outbound_cluster(&svc));
        assert_eq!(a.version, b.version);
        let mut svc2 = svc.clone();
        svc2.metadata
            .insert(crate::model::PROTOCOL_KEY.into(), "grpc".into());
        assert_ne!(
            a.version,
            Encoded::new(Arc::from("x"), &r::outbound_cluster(&svc2)).version
        );
        let i = inst("echo", "10.0.0.1");
        let mut j = i.clone();
        j.metadata.insert("a".into(), "1".into());
        let v = |i: &Instance| {
            r::LoadAssignmentSpec::eds("c", [i], crate::model::TlsMode::None).version()
        };
        assert_ne!(v(&i), v(&j));
        assert_eq!(v(&j), v(&j.clone()));
    }

    /// A mode change is published in steps (servers widen, callers switch, servers narrow), each
    /// step a generation of its own with only the resources it changes.
    #[tokio::test]
    async fn a_mode_change_rolls_out_in_steps() {
        use crate::model::{ServiceInput, TlsMode, TLS_MODE_KEY};
        use crate::xds::snapshot::tls::TlsState;
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        reg.submit(Command::RegisterInstances(vec![
            inst("echo", "10.0.0.1"),
            inst("other", "10.0.0.2"),
        ]))
        .await
        .unwrap();
        let cache = Cache::default();
        let mut b = Builder::new(Config {
            tls_phase: Duration::ZERO,
            ..Default::default()
        });
        b.full(&reg, &cache);
        let set_mode = |mode: &str| ServiceInput {
            namespace: Some("default".into()),
            name: Some("echo".into()),
            metadata: Some([(TLS_MODE_KEY.to_string(), mode.to_string())].into()),
            ..Default::default()
        };
        let echo = || vec![ChangeKey::Service(ServiceKey::new("default", "echo"))];
        let state = |c: &Cache| c.current().namespaces["default"].services["echo"].tls;
        let step = |b: &mut Builder, c: &Cache| -> Vec<(TypeKind, String)> {
            let g = c.current().generation;
            b.advance_tls(&reg, c);
            let now = c.current().generation;
            assert_eq!(now, g + 1, "one generation per step");
            let mut kinds: Vec<_> = c.changes(g, now).unwrap()[0]
                .iter()
                .map(|c| (c.kind, c.name.to_string()))
                .collect();
            kinds.sort();
            kinds
        };
        let cluster = |c: &Cache| cluster_of(&c.current(), "OUTBOUND|default|echo").1;
        let eds_marked = |c: &Cache| {
            let res = c.current().namespaces["default"].endpoints["OUTBOUND|default|echo"].clone();
            let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                res.value.as_ref(),
            )
            .unwrap();
            cla.endpoints[0].lb_endpoints[0]
                .metadata
                .as_ref()
                .is_some_and(|m| m.filter_metadata.contains_key(r::TRANSPORT_SOCKET_MATCH))
        };
        let other_before =
            cache.current().namespaces["default"].clusters["OUTBOUND|default|other"].clone();

        // none → strict. Step 1 at once: servers widen (listeners, endpoint marks), callers not yet.
        reg.submit(Command::UpdateServices(vec![set_mode("strict")]))
            .await
            .unwrap();
        let rev = *reg.revision().borrow();
        b.apply(&reg, echo(), rev, &cache);
        assert_eq!(
            state(&cache),
            TlsState {
                client: TlsMode::None,
                server: TlsMode::Permissive
            }
        );
        assert!(cluster(&cache).transport_socket_matches.is_empty());
        assert!(eds_marked(&cache));
        // Step 2: callers switch to mTLS (the cluster alone).
        assert_eq!(
            step(&mut b, &cache),
            vec![(TypeKind::Cluster, "OUTBOUND|default|echo".to_string())]
        );
        assert_eq!(
            state(&cache),
            TlsState {
                client: TlsMode::Strict,
                server: TlsMode::Permissive
            }
        );
        assert_eq!(cluster(&cache).transport_socket_matches.len(), 1);
        // Step 3: servers narrow (the service's node-local listeners; endpoint marks go, strict
        // callers do not read them).
        assert_eq!(
            step(&mut b, &cache),
            vec![
                (TypeKind::Endpoint, "OUTBOUND|default|echo".to_string()),
                (TypeKind::Listener, "echo".to_string())
            ]
        );
        assert!(!eds_marked(&cache));
        assert_eq!(state(&cache), TlsState::settled(TlsMode::Strict));
        assert!(b.next_tls_step().is_none(), "settled");
        let g = cache.current().generation;
        b.advance_tls(&reg, &cache);
        assert_eq!(cache.current().generation, g, "nothing left to step");

        // strict → none, changed again half way (to permissive): the rollout turns around from
        // where it is, without skipping the servers' widening.
        reg.submit(Command::UpdateServices(vec![set_mode("none")]))
            .await
            .unwrap();
        let rev = *reg.revision().borrow();
        b.apply(&reg, echo(), rev, &cache);
        assert_eq!(
            state(&cache),
            TlsState {
                client: TlsMode::Strict,
                server: TlsMode::Permissive
            }
        );
        reg.submit(Command::UpdateServices(vec![set_mode("permissive")]))
            .await
            .unwrap();
        let rev = *reg.revision().borrow();
        b.apply(&reg, echo(), rev, &cache);
        assert_eq!(
            state(&cache),
            TlsState {
                client: TlsMode::Strict,
                server: TlsMode::Permissive
            },
            "a step not yet due is not taken early"
        );
        step(&mut b, &cache);
        assert_eq!(state(&cache), TlsState::settled(TlsMode::Permissive));
        assert_eq!(cluster(&cache).transport_socket_matches.len(), 2);
        // Another service's resources were never touched.
        assert!(Arc::ptr_eq(
            &other_before,
            &cache.current().namespaces["default"].clusters["OUTBOUND|default|other"]
        ));
        crate::xds::consistent("default", &cache.current().namespaces["default"]).unwrap();
    }

    /// A caller's own virtual host of a service goes with the service: deleted, then its rules
    /// deleted and the service created again, no caller keeps routing by the old rule.
    #[tokio::test]
    async fn a_callers_own_host_goes_with_its_service() {
        use crate::model::rules::routing::RoutingRule;
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut v2 = inst("echo", "10.0.0.2");
        v2.metadata = [("version".to_string(), "v2".to_string())].into();
        reg.submit(Command::RegisterInstances(vec![
            inst("echo", "10.0.0.1"),
            v2.clone(),
        ]))
        .await
        .unwrap();
        let rule: RoutingRule = serde_json::from_value(serde_json::json!({
            "name": "web-to-v2", "namespace": "default", "enable": true, "routingPolicy": "RulePolicy",
            "routingConfig": {"rules": [{"sources": [{"service": "web", "namespace": "default"}],
                "destinations": [{"service": "echo", "namespace": "default", "weight": 100,
                                  "labels": {"version": {"type": "EXACT", "value": "v2"}}}]}]}
        }))
        .unwrap();
        let mut rule = Rule::Routing(rule);
        rule.stamp("r1", "t");
        rule.validate().unwrap();
        reg.submit(Command::PutRules {
            rules: vec![rule.clone()],
            create: true,
        })
        .await
        .unwrap();
        let cache = Cache::default();
        let mut b = Builder::default();
        b.full(&reg, &cache);
        let view = |cache: &Cache| cache.current().namespaces["default"].clone();
        assert!(view(&cache).caller_routes.contains_key("default/web"));
        let echo = || {
            vec![
                ChangeKey::Service(ServiceKey::new("default", "echo")),
                ChangeKey::Instances(ServiceKey::new("default", "echo")),
            ]
        };
        let apply = |b: &mut Builder, cache: &Cache| {
            let rev = *reg.revision().borrow();
            b.apply(&reg, echo(), rev, cache);
            crate::xds::consistent("default", &view(cache)).unwrap();
        };
        reg.submit(Command::DeregisterInstances(vec![
            InstanceSelector::Id(inst("echo", "10.0.0.1").id),
            InstanceSelector::Id(v2.id.clone()),
        ]))
        .await
        .unwrap();
        reg.submit(Command::DeleteServices(vec![ServiceKey::new(
            "default", "echo",
        )]))
        .await
        .unwrap();
        apply(&mut b, &cache);
        assert!(!view(&cache).caller_routes.contains_key("default/web"));
        reg.submit(Command::DeleteRules(vec![rule.key()]))
            .await
            .unwrap();
        apply(&mut b, &cache);
        reg.submit(Command::RegisterInstances(vec![inst("echo", "10.0.0.1")]))
            .await
            .unwrap();
        apply(&mut b, &cache);
        let v = view(&cache);
        assert!(v.vhosts.contains_key("echo"));
        assert!(
            v.caller_vhosts.values().all(|m| m.is_empty()),
            "{:?}",
            v.caller_vhosts.keys()
        );
        assert!(v.caller_routes.is_empty());
    }

    /// A new service starts in its mode; no rollout for what nobody used yet.
    #[tokio::test]
    async fn a_new_service_starts_in_its_mode() {
        use crate::model::{TlsMode, TLS_MODE_KEY};
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut svc = Service::bare("default", "echo", "t");
        svc.metadata.insert(TLS_MODE_KEY.into(), "strict".into());
        reg.submit(Command::CreateServices(vec![svc]))
            .await
            .unwrap();
        reg.submit(Command::RegisterInstances(vec![inst("echo", "10.0.0.1")]))
            .await
            .unwrap();
        let cache = Cache::default();
        let mut b = Builder::default();
        b.full(&reg, &cache);
        assert_eq!(
            cache.current().namespaces["default"].services["echo"].tls,
            crate::xds::snapshot::tls::TlsState::settled(TlsMode::Strict)
        );
        assert!(b.next_tls_step().is_none());
        assert_eq!(
            cluster_of(&cache.current(), "OUTBOUND|default|echo")
                .1
                .transport_socket_matches
                .len(),
            1
        );
    }
}
