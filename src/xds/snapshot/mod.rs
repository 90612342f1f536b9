//! The xDS cache: registry state translated into encoded, versioned, shared resources.
//!
//! Every resource is encoded to `Any` once per content and shared (`Arc`) by every stream that
//! needs it. Its version is a content hash (xxh3), so the same content has the same version across
//! restarts. A registry change re-translates only the services it names: an instance change
//! re-encodes one `ClusterLoadAssignment`, plus the namespace's route configuration only when the
//! service's ports (its domains) changed. Each published [`Snapshot`] carries the list of resources
//! that changed since the previous generation, so streams look at those, not at the world.

mod builder;
mod encoded;
pub mod tls;

pub use builder::{run, Builder, Config, RETIRE_AFTER};
pub(crate) use encoded::content_version;
pub use encoded::{Encoded, Res};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use parking_lot::RwLock;
use tokio::sync::watch;

use super::resources as r;
use super::TypeKind;
use crate::model::Service;

/// One service as the snapshot sees it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// The service.
    pub service: Arc<Service>,
    /// Ports its virtual host answers on.
    pub ports: Vec<u16>,
    /// How its endpoints reach Envoy (EDS, or DNS when some are hostnames).
    pub discovery: r::Discovery,
    /// The TLS modes its callers and its sidecars are translated in.
    pub tls: tls::TlsState,
    /// Its clusters: its own, then one per destination group of its routing rules.
    pub clusters: Arc<[Arc<str>]>,
    /// Callers (`ns/svc`) its routing rules name: they get routes of their own.
    pub callers: Arc<[Arc<str>]>,
    /// Its rate-limit rules (enabled), applied by its own sidecars.
    pub limits: Arc<Vec<Arc<crate::model::rules::Rule>>>,
    /// Instances that divide amounts shared equally (1 when no rule shares: instance changes
    /// then leave its sidecars' configuration alone).
    pub share: u32,
}

impl ServiceView {
    /// Whether `other` translates the same (cheap: `Arc`s compared by content).
    pub fn same(&self, other: &ServiceView) -> bool {
        self.service == other.service
            && self.ports == other.ports
            && self.discovery == other.discovery
            && self.tls == other.tls
            && self.clusters == other.clusters
            && self.callers == other.callers
            && self.limits == other.limits
            && self.share == other.share
    }
}

/// Virtual hosts by service name.
pub type VirtualHosts = BTreeMap<Arc<str>, VirtualHost>;

/// Resources of one namespace, shared by every node in it.
///
/// Each map is shared between generations and copied only when a change touches it: an endpoint
/// change copies the load assignment map (pointers), not the services, routes or hosts.
#[derive(Debug, Clone, Default)]
pub struct NamespaceView {
    /// Services (and aliases) by name.
    pub services: Arc<BTreeMap<Arc<str>, ServiceView>>,
    /// Outbound clusters by name.
    pub clusters: Arc<BTreeMap<Arc<str>, Res>>,
    /// Load assignments by cluster name.
    pub endpoints: Arc<BTreeMap<Arc<str>, Res>>,
    /// Virtual hosts by service name (kept decoded to rebuild the route cheaply, and for VHDS).
    pub vhosts: Arc<BTreeMap<Arc<str>, VirtualHost>>,
    /// Caller (`ns/svc`) → the virtual hosts that differ for it (routing rules naming it), by
    /// service.
    pub caller_vhosts: Arc<BTreeMap<Arc<str>, VirtualHosts>>,
    /// Caller → its own outbound route configuration (the shared one with its virtual hosts).
    pub caller_routes: Arc<BTreeMap<Arc<str>, Res>>,
    /// Load assignments with nearby routing, by cluster: each node derives its own from these.
    pub nearby: Arc<BTreeMap<Arc<str>, Arc<NearbyInput>>>,
    /// Exact host (lowercase domain without port) → service name, for VHDS lookups.
    pub hosts: Arc<HashMap<String, Arc<str>>>,
    /// The outbound route configuration.
    pub route: Option<Res>,
}

/// A service's load assignment and its nearby routing.
#[derive(Debug, PartialEq, Eq)]
pub struct NearbyInput {
    /// The canonical assignment.
    pub spec: r::LoadAssignmentSpec,
    /// The rule.
    pub nearby: r::Nearby,
}

/// A resource that changed between two generations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Changed {
    /// Namespace.
    pub namespace: Arc<str>,
    /// Type.
    pub kind: TypeKind,
    /// Resource name (for [`TypeKind::Listener`], the service whose node-local resources changed).
    pub name: Arc<str>,
}

/// An immutable, published view of every namespace.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per publish.
    pub generation: u64,
    /// Registry revision this snapshot reflects.
    pub revision: u64,
    /// Namespaces.
    pub namespaces: HashMap<Arc<str>, Arc<NamespaceView>>,
    /// Secrets (SDS): of no namespace; published by the sidecar agent's certificate store.
    pub secrets: Arc<BTreeMap<Arc<str>, Res>>,
    /// SPIFFE trust domain of workload identities (inbound listeners check callers against it).
    pub trust_domain: Arc<str>,
    /// The control plane's rate-limit service, as sidecars reach it (global rate limits).
    pub rls: Option<crate::model::HostPort>,
}

/// The cache streams read: the latest snapshot and recent change lists.
pub struct Cache {
    tx: watch::Sender<Arc<Snapshot>>,
    pub(super) log: RwLock<VecDeque<(u64, Arc<Vec<Changed>>)>>,
    /// Publishes the build time of each generation (for the benchmark and metrics).
    pub(super) build_stats: RwLock<BuildStats>,
    /// Registry revision the builder has applied (published or found to change nothing).
    pub(super) applied: std::sync::atomic::AtomicU64,
    /// Clusters of deleted services still waiting to be removed.
    pub(super) retiring: std::sync::atomic::AtomicUsize,
}

/// Timing of the last builds.
#[derive(Debug, Clone, Default)]
pub struct BuildStats {
    /// Last full translation.
    pub full: Duration,
    /// Last incremental translation.
    pub incremental: Duration,
}

/// Change lists kept for streams that fall behind by a few generations.
const LOG_LEN: usize = 256;

impl Default for Cache {
    fn default() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Cache {
            tx,
            log: RwLock::new(VecDeque::new()),
            build_stats: RwLock::new(BuildStats::default()),
            applied: std::sync::atomic::AtomicU64::new(0),
            retiring: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Cache {
    /// A receiver of published snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The latest snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// What changed from generation `from` (exclusive) to `to` (inclusive), or `None` if the log
    /// no longer covers that range (the caller must diff everything).
    pub fn changes(&self, from: u64, to: u64) -> Option<Vec<Arc<Vec<Changed>>>> {
        if from >= to {
            return Some(vec![]);
        }
        let log = self.log.read();
        let first = log.front()?.0;
        if from + 1 < first {
            return None;
        }
        let out: Vec<_> = log
            .iter()
            .filter(|(g, _)| *g > from && *g <= to)
            .map(|(_, c)| c.clone())
            .collect();
        (out.len() as u64 == to - from).then_some(out)
    }

    /// The registry revision the cache reflects (every change up to it has been translated).
    pub fn applied_revision(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Clusters of deleted services waiting to be removed (after their routes).
    pub fn retiring(&self) -> usize {
        self.retiring.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Timing of recent builds.
    pub fn build_stats(&self) -> BuildStats {
        self.build_stats.read().clone()
    }

    /// Publishes `secrets` as the snapshot's secrets (a cache with one producer: the sidecar
    /// agent's certificate store); streams are told which names changed.
    pub fn publish_secrets(&self, secrets: Vec<Res>) {
        let cur = self.current();
        let next: BTreeMap<Arc<str>, Res> =
            secrets.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut changes = Vec::new();
        for (name, res) in &next {
            if cur
                .secrets
                .get(name)
                .is_none_or(|o| o.version != res.version)
            {
                changes.push(Changed {
                    namespace: Arc::from(""),
                    kind: TypeKind::Secret,
                    name: name.clone(),
                });
            }
        }
        for name in cur.secrets.keys() {
            if !next.contains_key(name) {
                changes.push(Changed {
                    namespace: Arc::from(""),
                    kind: TypeKind::Secret,
                    name: name.clone(),
                });
            }
        }
        if changes.is_empty() {
            return;
        }
        self.publish(
            Snapshot {
                generation: cur.generation + 1,
                revision: cur.revision,
                namespaces: cur.namespaces.clone(),
                secrets: Arc::new(next),
                trust_domain: cur.trust_domain.clone(),
                rls: cur.rls.clone(),
            },
            changes,
        );
    }

    pub(super) fn publish(&self, snap: Snapshot, changes: Vec<Changed>) {
        let g = snap.generation;
        {
            let mut log = self.log.write();
            log.push_back((g, Arc::new(changes)));
            while log.len() > LOG_LEN {
                log.pop_front();
            }
        }
        self.tx.send_replace(Arc::new(snap));
    }
}
