//! The Envoy xDS control plane: translation ([`resources`]), the shared cache ([`snapshot`]) and the
//! ADS server ([`server`]). Type URLs live here and nowhere else.

pub mod auth;
pub mod debug;
pub mod names;
pub mod node;
pub mod resources;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod transport;

use std::collections::HashSet;

use serde::Serialize;

/// Cluster type URL.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// ClusterLoadAssignment type URL.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Listener type URL.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RouteConfiguration type URL.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// VirtualHost type URL (VHDS, delta only).
pub const VIRTUAL_HOST_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
/// Secret type URL (SDS, served by the sidecar agent).
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A value per resource type, present or not: a map keyed by [`TypeKind`] without hashing.
#[derive(Debug, Clone, Default)]
pub struct PerKind<T>([Option<T>; 6]);

impl<T> PerKind<T> {
    /// The value of `k`.
    pub fn get(&self, k: &TypeKind) -> Option<&T> {
        self.0[k.index()].as_ref()
    }

    /// The value of `k`, mutably.
    pub fn get_mut(&mut self, k: &TypeKind) -> Option<&mut T> {
        self.0[k.index()].as_mut()
    }

    /// The value of `k`, created if absent.
    pub fn get_or_default(&mut self, k: TypeKind) -> &mut T
    where
        T: Default,
    {
        self.0[k.index()].get_or_insert_with(T::default)
    }

    /// The value of `k`, created by `f` if absent.
    pub fn get_or_insert_with(&mut self, k: TypeKind, f: impl FnOnce() -> T) -> &mut T {
        self.0[k.index()].get_or_insert_with(f)
    }

    /// Sets the value of `k`.
    pub fn set(&mut self, k: TypeKind, v: T) {
        self.0[k.index()] = Some(v);
    }

    /// Present values with their kinds, in push order.
    pub fn iter(&self) -> impl Iterator<Item = (TypeKind, &T)> {
        TypeKind::ALL
            .into_iter()
            .zip(&self.0)
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }

    /// Present values, in push order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flatten()
    }
}

impl<T> std::ops::Index<&TypeKind> for PerKind<T> {
    type Output = T;

    fn index(&self, k: &TypeKind) -> &T {
        self.get(k).expect("type present")
    }
}

/// The resource types we serve, in the order ADS pushes them (CDS before EDS, LDS before RDS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum TypeKind {
    /// CDS.
    Cluster,
    /// EDS.
    Endpoint,
    /// LDS.
    Listener,
    /// RDS.
    Route,
    /// VHDS (on demand, delta only).
    VirtualHost,
    /// SDS (certificates and trust roots, from the sidecar agent).
    Secret,
}

impl TypeKind {
    /// All kinds in push order.
    pub const ALL: [TypeKind; 6] = [
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Listener,
        TypeKind::Route,
        TypeKind::VirtualHost,
        TypeKind::Secret,
    ];

    /// The type URL.
    pub fn url(self) -> &'static str {
        match self {
            TypeKind::Cluster => CLUSTER_TYPE,
            TypeKind::Endpoint => ENDPOINT_TYPE,
            TypeKind::Listener => LISTENER_TYPE,
            TypeKind::Route => ROUTE_TYPE,
            TypeKind::VirtualHost => VIRTUAL_HOST_TYPE,
            TypeKind::Secret => SECRET_TYPE,
        }
    }

    /// The kind of a type URL.
    pub fn from_url(url: &str) -> Option<TypeKind> {
        // The type URLs differ in length: compare that before the shared prefix.
        TypeKind::ALL
            .into_iter()
            .find(|k| k.url().len() == url.len() && k.url() == url)
    }

    /// Position in [`TypeKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether an empty first subscription means "everything" (legacy wildcard).
    pub fn wildcard_capable(self) -> bool {
        matches!(self, TypeKind::Cluster | TypeKind::Listener)
    }

    /// Short name for logs and views.
    pub fn short(self) -> &'static str {
        match self {
            TypeKind::Cluster => "CDS",
            TypeKind::Endpoint => "EDS",
            TypeKind::Listener => "LDS",
            TypeKind::Route => "RDS",
            TypeKind::VirtualHost => "VHDS",
            TypeKind::Secret => "SDS",
        }
    }
}

/// A snapshot inconsistency.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Inconsistency {
    /// An EDS resource has no cluster.
    #[error("load assignment {0} has no cluster")]
    OrphanEndpoints(String),
    /// A cluster has no load assignment.
    #[error("cluster {0} has no load assignment")]
    MissingEndpoints(String),
    /// A route points to a missing cluster.
    #[error("route {route} points to missing cluster {cluster}")]
    DanglingRoute {
        /// Route config.
        route: String,
        /// Cluster.
        cluster: String,
    },
    /// A name appears twice.
    #[error("duplicate {0}")]
    Duplicate(String),
    /// A caller's own virtual host of a service the namespace does not route to.
    #[error("caller {caller} keeps a virtual host of {service}, which has none")]
    OrphanCallerHost {
        /// Caller (`ns/svc`).
        caller: String,
        /// Service.
        service: String,
    },
}

/// Checks a namespace view: every EDS name has its cluster and vice versa, every route's cluster
/// exists, no virtual host or domain appears twice.
pub fn consistent(ns: &str, view: &snapshot::NamespaceView) -> Result<(), Inconsistency> {
    use envoy_types::pb::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier, RouteConfiguration,
    };
    use prost::Message;
    for n in view.endpoints.keys() {
        if !view.clusters.contains_key(n) {
            return Err(Inconsistency::OrphanEndpoints(n.to_string()));
        }
    }
    // Aggregate clusters (metadata routing's failover) have no endpoints of their own.
    for n in view.clusters.keys().filter(|n| !n.ends_with("|failover")) {
        if !view.endpoints.contains_key(n) {
            return Err(Inconsistency::MissingEndpoints(n.to_string()));
        }
    }
    for (caller, hosts) in view.caller_vhosts.iter() {
        if let Some(svc) = hosts.keys().find(|s| !view.vhosts.contains_key(*s)) {
            return Err(Inconsistency::OrphanCallerHost {
                caller: caller.to_string(),
                service: svc.to_string(),
            });
        }
    }
    for route in view.route.iter().chain(view.caller_routes.values()) {
        let rc = RouteConfiguration::decode(route.value.as_ref())
            .map_err(|e| Inconsistency::Duplicate(format!("undecodable route: {e}")))?;
        let mut vhosts = HashSet::new();
        let mut domains = HashSet::new();
        for vh in &rc.virtual_hosts {
            if !vhosts.insert(vh.name.clone()) {
                return Err(Inconsistency::Duplicate(format!(
                    "virtual host {}",
                    vh.name
                )));
            }
            for d in &vh.domains {
                if !domains.insert(d.clone()) {
                    return Err(Inconsistency::Duplicate(format!("domain {d}")));
                }
            }
            for r in &vh.routes {
                let Some(Action::Route(a)) = &r.action else {
                    continue;
                };
                let targets: Vec<&String> = match &a.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => vec![c],
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.iter().map(|c| &c.name).collect()
                    }
                    _ => vec![],
                };
                for c in targets {
                    // Aliases may route to another namespace's cluster; check our own.
                    let same_ns = c.split('|').nth(1) == Some(ns);
                    if same_ns && !view.clusters.contains_key(c.as_str()) {
                        return Err(Inconsistency::DanglingRoute {
                            route: rc.name.clone(),
                            cluster: c.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}
