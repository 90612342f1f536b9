//! Load assignments: a service's routable instances grouped by locality.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, UInt32Value, Value};

use super::{inbound_name, socket, LB_METADATA};
use crate::model::{Instance, Service};

/// Whether an instance takes traffic: not isolated, weight above 0, an IP address (Envoy's EDS and
/// gRPC accept only IP literals).
pub fn routable(i: &Instance) -> bool {
    !i.isolate && i.weight > 0 && i.host.parse::<IpAddr>().is_ok()
}

fn lb_metadata(m: &BTreeMap<String, String>) -> Option<Metadata> {
    if m.is_empty() {
        return None;
    }
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
    let mut md = Metadata::default();
    md.filter_metadata
        .insert(LB_METADATA.to_string(), Struct { fields });
    Some(md)
}

/// The `ClusterLoadAssignment` named `cluster_name` for `instances`: one locality per
/// region/zone/campus, each with `load_balancing_weight` (gRPC skips localities without one).
pub fn load_assignment<'a>(
    cluster_name: String,
    instances: impl IntoIterator<Item = &'a Instance>,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(&str, &str, &str), Vec<&Instance>> = BTreeMap::new();
    for i in instances.into_iter().filter(|i| routable(i)) {
        by_locality
            .entry((&i.location.region, &i.location.zone, &i.location.campus))
            .or_default()
            .push(i);
    }
    let endpoints = by_locality
        .into_iter()
        .map(|((region, zone, campus), insts)| {
            let weight: u32 = insts.iter().map(|i| i.weight).sum();
            LocalityLbEndpoints {
                locality: Some(Locality {
                    region: region.to_string(),
                    zone: zone.to_string(),
                    sub_zone: campus.to_string(),
                }),
                load_balancing_weight: Some(UInt32Value {
                    value: weight.max(1),
                }),
                lb_endpoints: insts
                    .into_iter()
                    .map(|i| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(&i.host, i.port)),
                            ..Default::default()
                        })),
                        health_status: if i.healthy {
                            HealthStatus::Healthy
                        } else {
                            HealthStatus::Unhealthy
                        } as i32,
                        metadata: lb_metadata(&i.metadata),
                        load_balancing_weight: Some(UInt32Value { value: i.weight }),
                    })
                    .collect(),
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name,
        endpoints,
        ..Default::default()
    }
}

/// The inbound `ClusterLoadAssignment`: the local application on each port.
pub fn inbound_load_assignment(svc: &Service, ports: &[u16]) -> ClusterLoadAssignment {
    let locals: Vec<Instance> = ports
        .iter()
        .map(|p| Instance {
            id: format!("local-{p}"),
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            host: "127.0.0.1".into(),
            port: *p,
            protocol: String::new(),
            version: String::new(),
            priority: 0,
            weight: 100,
            healthy: true,
            isolate: false,
            metadata: BTreeMap::new(),
            location: Default::default(),
            enable_health_check: false,
            health_check: None,
            ctime: String::new(),
            mtime: String::new(),
        })
        .collect();
    load_assignment(inbound_name(&svc.namespace, &svc.name), &locals)
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
        let cla = load_assignment("X".into(), [&a, &b, &isolated, &zero, &hostname, &heavy]);
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
}
