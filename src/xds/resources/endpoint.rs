//! Load assignments: a service's instances grouped by locality.
//!
//! Translation goes through one canonical form, [`LoadAssignmentSpec`]: everything the resource is
//! built from, in a deterministic order. The `ClusterLoadAssignment` is built from the spec alone
//! and its version is a hash of the spec, so no field can change the resource without changing
//! its version (the encoded bytes cannot be hashed instead: protobuf maps, such as endpoint
//! metadata, encode in random order).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, UInt32Value, Value};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use super::{
    accept_mtls_struct, inbound_name, socket, LB_METADATA, TRANSLATOR_SALT, TRANSPORT_SOCKET_MATCH,
};
use crate::model::{Instance, Service, TlsMode, TLS_MODE_KEY};

/// How the endpoints of a service reach Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Discovery {
    /// An EDS cluster: endpoints are IP addresses, pushed as a `ClusterLoadAssignment`.
    Eds,
    /// A `STRICT_DNS` cluster with its load assignment inline: some endpoint is a hostname, which
    /// EDS cannot carry; Envoy resolves the names itself.
    StrictDns,
}

/// Whether an instance takes traffic at all: not isolated and weight above 0.
pub fn takes_traffic(i: &Instance) -> bool {
    !i.isolate && i.weight > 0
}

fn is_ip(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

/// Whether an instance is an EDS endpoint: it takes traffic and its host is an IP address (Envoy's
/// EDS and gRPC accept only IP literals).
pub fn routable(i: &Instance) -> bool {
    takes_traffic(i) && is_ip(&i.host)
}

/// How a service with these instances is translated: through DNS as soon as one instance that
/// takes traffic is registered by hostname.
pub fn discovery<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Discovery {
    if instances
        .into_iter()
        .any(|i| takes_traffic(i) && !is_ip(&i.host))
    {
        Discovery::StrictDns
    } else {
        Discovery::Eds
    }
}

/// What becomes of one instance in a service translated with `discovery` (for the debug views).
pub fn translation_state(i: &Instance, discovery: Discovery) -> &'static str {
    match (i.isolate, i.weight, discovery, is_ip(&i.host)) {
        (true, _, _, _) => "excluded: isolated",
        (_, 0, _, _) => "excluded: weight 0",
        (_, _, Discovery::Eds, _) => "EDS endpoint",
        (_, _, Discovery::StrictDns, true) => "STRICT_DNS endpoint (IP address)",
        (_, _, Discovery::StrictDns, false) => "STRICT_DNS endpoint (hostname resolved by Envoy)",
    }
}

/// One endpoint as the translation reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointSpec {
    host: String,
    port: u16,
    weight: u32,
    healthy: bool,
    metadata: BTreeMap<String, String>,
    /// Marked for `transport_socket_matches` as accepting mTLS.
    accept_mtls: bool,
}

/// One locality with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LocalitySpec {
    region: String,
    zone: String,
    campus: String,
    endpoints: Vec<EndpointSpec>,
}

/// The canonical input of a `ClusterLoadAssignment`. [`LoadAssignmentSpec::to_proto`] reads
/// nothing else, and [`LoadAssignmentSpec::version`] hashes all of it (derived `Hash`), so a field
/// that starts being translated is part of the version by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadAssignmentSpec {
    cluster_name: String,
    /// By region/zone/campus.
    localities: Vec<LocalitySpec>,
}

impl LoadAssignmentSpec {
    /// The endpoints EDS carries: instances that take traffic, with IP addresses. `server` is the
    /// TLS mode the service's sidecars serve in (see [`accepts_mtls`]).
    pub fn eds<'a>(
        cluster_name: &str,
        instances: impl IntoIterator<Item = &'a Instance>,
        server: TlsMode,
    ) -> Self {
        Self::build(
            cluster_name,
            instances.into_iter().filter(|i| routable(i)),
            server,
        )
    }

    /// The endpoints of a `STRICT_DNS` cluster: instances that take traffic, hostnames included.
    pub fn dns<'a>(
        cluster_name: &str,
        instances: impl IntoIterator<Item = &'a Instance>,
        server: TlsMode,
    ) -> Self {
        Self::build(
            cluster_name,
            instances.into_iter().filter(|i| takes_traffic(i)),
            server,
        )
    }

    fn build<'a>(
        cluster_name: &str,
        instances: impl Iterator<Item = &'a Instance>,
        server: TlsMode,
    ) -> Self {
        let mut by_locality: BTreeMap<(&str, &str, &str), Vec<EndpointSpec>> = BTreeMap::new();
        for i in instances {
            by_locality
                .entry((&i.location.region, &i.location.zone, &i.location.campus))
                .or_default()
                .push(EndpointSpec {
                    host: i.host.clone(),
                    port: i.port,
                    weight: i.weight,
                    healthy: i.healthy,
                    metadata: i.metadata.clone(),
                    accept_mtls: accepts_mtls(i, server),
                });
        }
        LoadAssignmentSpec {
            cluster_name: cluster_name.to_string(),
            localities: by_locality
                .into_iter()
                .map(|((region, zone, campus), endpoints)| LocalitySpec {
                    region: region.to_string(),
                    zone: zone.to_string(),
                    campus: campus.to_string(),
                    endpoints,
                })
                .collect(),
        }
    }

    /// The content version: a hash of the spec, stable across restarts of one build.
    pub fn version(&self) -> u64 {
        let mut h = Xxh3::new();
        h.update(TRANSLATOR_SALT);
        self.hash(&mut h);
        h.digest()
    }

    /// The `ClusterLoadAssignment`: one locality per region/zone/campus, each with
    /// `load_balancing_weight` (gRPC skips localities without one).
    pub fn to_proto(&self) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: self.cluster_name.clone(),
            endpoints: self
                .localities
                .iter()
                .map(|l| LocalityLbEndpoints {
                    locality: Some(Locality {
                        region: l.region.clone(),
                        zone: l.zone.clone(),
                        sub_zone: l.campus.clone(),
                    }),
                    load_balancing_weight: Some(UInt32Value {
                        value: l.endpoints.iter().map(|e| e.weight).sum::<u32>().max(1),
                    }),
                    lb_endpoints: l.endpoints.iter().map(EndpointSpec::to_proto).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

impl EndpointSpec {
    fn to_proto(&self) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(&self.host, self.port)),
                ..Default::default()
            })),
            health_status: if self.healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            } as i32,
            metadata: endpoint_metadata(&self.metadata, self.accept_mtls),
            load_balancing_weight: Some(UInt32Value { value: self.weight }),
        }
    }
}

/// Whether an instance is marked as accepting mTLS, for permissive callers: its service's
/// sidecars accept both (`server` is permissive) and the instance does not say it has no such
/// sidecar (`polarismesh.cn/tls-mode: none`, e.g. a VM registered by hand). Only permissive
/// callers read the mark, and callers are permissive only while servers are (see
/// `xds::snapshot::tls`), so strict services carry no marks (about 56 bytes per endpoint).
pub fn accepts_mtls(i: &Instance, server: TlsMode) -> bool {
    server == TlsMode::Permissive
        && i.metadata.get(TLS_MODE_KEY).map(String::as_str) != Some("none")
}

/// The instance's metadata for load balancing (`envoy.lb`), and the mark permissive callers'
/// `transport_socket_matches` look for.
fn endpoint_metadata(m: &BTreeMap<String, String>, accept_mtls: bool) -> Option<Metadata> {
    if m.is_empty() && !accept_mtls {
        return None;
    }
    let mut md = Metadata::default();
    if !m.is_empty() {
        md.filter_metadata
            .insert(LB_METADATA.to_string(), string_struct(m));
    }
    if accept_mtls {
        md.filter_metadata
            .insert(TRANSPORT_SOCKET_MATCH.to_string(), accept_mtls_struct());
    }
    Some(md)
}

fn string_struct(m: &BTreeMap<String, String>) -> Struct {
    let fields: HashMap<String, Value> = m
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value {
                    kind: Some(Kind::StringValue(v.clone())),
                },
            )
        })
        .collect();
    Struct { fields }
}

/// The inbound `ClusterLoadAssignment`: the local application on each port.
pub fn inbound_load_assignment(svc: &Service, ports: &[u16]) -> ClusterLoadAssignment {
    LoadAssignmentSpec {
        cluster_name: inbound_name(&svc.namespace, &svc.name),
        localities: vec![LocalitySpec {
            region: String::new(),
            zone: String::new(),
            campus: String::new(),
            endpoints: ports
                .iter()
                .map(|p| EndpointSpec {
                    host: "127.0.0.1".into(),
                    port: *p,
                    weight: 100,
                    healthy: true,
                    metadata: BTreeMap::new(),
                    accept_mtls: false,
                })
                .collect(),
        }],
    }
    .to_proto()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceInput;

    fn inst(host: &str, port: i64, f: impl FnOnce(&mut InstanceInput)) -> Instance {
        let mut i = InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some(host.into()),
            port: Some(port),
            ..Default::default()
        };
        f(&mut i);
        i.validate("t").unwrap()
    }

    #[test]
    fn endpoints_health_exclusion_locality() {
        let a = inst("10.0.0.1", 80, |i| {
            i.location = Some(crate::model::Location {
                region: "r1".into(),
                zone: "z1".into(),
                campus: "c1".into(),
            });
            i.metadata = Some([("version".to_string(), "v1".to_string())].into());
        });
        let b = inst("10.0.0.2", 80, |i| i.healthy = Some(false));
        let isolated = inst("10.0.0.3", 80, |i| i.isolate = Some(true));
        let zero = inst("10.0.0.4", 80, |i| i.weight = Some(0));
        let hostname = inst("echo.example", 80, |_| {});
        let heavy = inst("10.0.0.5", 80, |i| i.weight = Some(300));
        let cla = LoadAssignmentSpec::eds(
            "X",
            [&a, &b, &isolated, &zero, &hostname, &heavy],
            TlsMode::None,
        )
        .to_proto();
        assert_eq!(cla.cluster_name, "X");
        let all: Vec<_> = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).collect();
        assert_eq!(all.len(), 3, "isolated, weight 0 and hostname excluded");
        for l in &cla.endpoints {
            assert!(l.load_balancing_weight.unwrap().value >= 1);
        }
        let unhealthy = all
            .iter()
            .filter(|e| e.health_status == HealthStatus::Unhealthy as i32)
            .count();
        assert_eq!(unhealthy, 1);
        let loc = cla
            .endpoints
            .iter()
            .find(|l| l.locality.as_ref().unwrap().region == "r1")
            .unwrap();
        assert_eq!(loc.locality.as_ref().unwrap().sub_zone, "c1");
        let md = loc.lb_endpoints[0].metadata.as_ref().unwrap();
        assert!(md.filter_metadata[LB_METADATA]
            .fields
            .contains_key("version"));
        let default_loc = cla
            .endpoints
            .iter()
            .find(|l| l.locality.as_ref().unwrap().region.is_empty())
            .unwrap();
        assert_eq!(default_loc.load_balancing_weight.unwrap().value, 400);
    }

    #[test]
    fn hostnames_switch_the_service_to_dns_and_are_kept_there() {
        let ip = inst("10.0.0.1", 80, |_| {});
        let host = inst("localhost", 8080, |i| i.weight = Some(7));
        let isolated_host = inst("db.example", 80, |i| i.isolate = Some(true));
        assert_eq!(discovery([&ip, &isolated_host]), Discovery::Eds);
        assert_eq!(discovery([&ip, &host]), Discovery::StrictDns);
        let cla =
            LoadAssignmentSpec::dns("X", [&ip, &host, &isolated_host], TlsMode::None).to_proto();
        let hosts: Vec<_> = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => match &ep.address.as_ref().unwrap().address {
                    Some(
                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                            s,
                        ),
                    ) => (s.address.clone(), e.load_balancing_weight.unwrap().value),
                    _ => panic!("not a socket address"),
                },
                _ => panic!("no endpoint"),
            })
            .collect();
        assert_eq!(
            hosts,
            vec![("10.0.0.1".to_string(), 100), ("localhost".to_string(), 7)]
        );
        assert_eq!(
            translation_state(&host, Discovery::StrictDns),
            "STRICT_DNS endpoint (hostname resolved by Envoy)"
        );
        assert_eq!(
            translation_state(&isolated_host, Discovery::StrictDns),
            "excluded: isolated"
        );
        assert_eq!(translation_state(&ip, Discovery::Eds), "EDS endpoint");
    }

    /// Every way an instance can change: translated resource changed ⇔ version changed. A field
    /// read by the translation but missing from the version fails here.
    #[test]
    fn version_changes_exactly_when_the_translated_resource_does() {
        type Mutation = (&'static str, fn(&mut Instance));
        let mutations: &[Mutation] = &[
            ("id", |i| i.id = "other-id".into()),
            ("host", |i| i.host = "10.9.9.9".into()),
            ("host to a name", |i| i.host = "echo.example".into()),
            ("port", |i| i.port += 1),
            ("protocol", |i| i.protocol = "grpc".into()),
            ("version", |i| i.version = "v9".into()),
            ("priority", |i| i.priority = 3),
            ("weight", |i| i.weight = 42),
            ("weight 0", |i| i.weight = 0),
            ("healthy", |i| i.healthy = !i.healthy),
            ("isolate", |i| i.isolate = true),
            ("metadata added", |i| {
                i.metadata.insert("zz".into(), "1".into());
            }),
            ("metadata changed", |i| {
                i.metadata.insert("k1".into(), "other".into());
            }),
            ("region", |i| i.location.region = "r9".into()),
            ("zone", |i| i.location.zone = "z9".into()),
            ("campus", |i| i.location.campus = "c9".into()),
            ("health check", |i| {
                i.enable_health_check = !i.enable_health_check
            }),
            ("ctime", |i| i.ctime = "later".into()),
            ("mtime", |i| i.mtime = "later".into()),
            ("service", |i| i.service = "other".into()),
            ("no mTLS sidecar", |i| {
                i.metadata.insert(TLS_MODE_KEY.into(), "none".into());
            }),
        ];
        let base = inst("10.0.0.1", 80, |i| {
            i.metadata = Some(
                [("k1", "v1"), ("k2", "v2"), ("k3", "v3")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
            );
        });
        let other = inst("10.0.0.2", 81, |_| {});
        for dns in [false, true] {
            let build = |a: &Instance, b: &Instance| match dns {
                false => LoadAssignmentSpec::eds("X", [a, b], TlsMode::Permissive),
                true => LoadAssignmentSpec::dns("X", [a, b], TlsMode::Permissive),
            };
            let before = build(&base, &other);
            // The same content gives the same version, however maps happen to encode.
            assert_eq!(before.version(), build(&base.clone(), &other).version());
            for (what, mutate) in mutations {
                let mut changed = base.clone();
                mutate(&mut changed);
                let after = build(&changed, &other);
                assert_eq!(
                    before.to_proto() != after.to_proto(),
                    before.version() != after.version(),
                    "{what}: the translated resource and its version disagree"
                );
            }
        }
    }

    #[test]
    fn endpoints_that_accept_mtls_are_marked_for_permissive_callers() {
        let sidecar = inst("10.0.0.1", 80, |_| {});
        let vm = inst("10.0.0.2", 80, |i| {
            i.metadata = Some([(TLS_MODE_KEY.to_string(), "none".to_string())].into())
        });
        let marked = |server: TlsMode| -> Vec<bool> {
            let cla = LoadAssignmentSpec::eds("X", [&sidecar, &vm], server).to_proto();
            cla.endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .map(|e| {
                    e.metadata.as_ref().is_some_and(|m| {
                        m.filter_metadata.get(TRANSPORT_SOCKET_MATCH) == Some(&accept_mtls_struct())
                    })
                })
                .collect()
        };
        assert_eq!(marked(TlsMode::None), vec![false, false]);
        assert_eq!(marked(TlsMode::Permissive), vec![true, false]);
        assert_eq!(marked(TlsMode::Strict), vec![false, false]);
        let v = |server| LoadAssignmentSpec::eds("X", [&sidecar], server).version();
        assert_ne!(v(TlsMode::None), v(TlsMode::Permissive));
        assert_eq!(v(TlsMode::None), v(TlsMode::Strict));
        // No metadata at all in plaintext mode: the resource is what it was before modes existed.
        let cla = LoadAssignmentSpec::eds("X", [&sidecar], TlsMode::None).to_proto();
        assert!(cla.endpoints[0].lb_endpoints[0].metadata.is_none());
    }
}
