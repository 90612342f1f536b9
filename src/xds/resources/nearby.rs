//! Nearby routing: a service's load assignment as one caller sees it, its localities in priority
//! order from the caller's own (same campus, zone or region first), so Envoy sends traffic to the
//! nearest healthy instances and widens to the next level when too few of them are healthy.
//!
//! The assignment differs per caller locality, so it is not shared: each stream of a node with a
//! locality derives its own from the service's canonical assignment (see the stream's nearby
//! cache). Envoy widens by priority when the healthy share of a level, times the
//! overprovisioning factor, drops under 100%: the factor is `10000 / healthyPercent`, so a level
//! keeps all the traffic while at least `healthyPercent`% of it is healthy.

use envoy_types::pb::envoy::config::endpoint::v3::{
    cluster_load_assignment::Policy, ClusterLoadAssignment,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::LoadAssignmentSpec;
use crate::model::rules::routing::{Level, RoutingPolicy};
use crate::model::rules::{RoutingRule, Rule};

/// Where a node is: region, zone, campus (sub-zone).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Place {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Campus (sub-zone).
    pub campus: String,
}

/// A service's nearby routing, from its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nearby {
    /// The level callers are kept within first.
    pub level: Level,
    /// The widest level traffic widens to.
    pub max: Level,
    /// Never widen.
    pub strict: bool,
    /// Widen when fewer than this percentage of a level's instances are healthy.
    pub healthy_percent: u32,
}

/// The nearby routing of a service: its first enabled nearby rule.
pub fn nearby_rule(rules: &[std::sync::Arc<Rule>]) -> Option<Nearby> {
    let mut nearby: Vec<&RoutingRule> = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::Routing(r) if r.enable && r.routing_policy == RoutingPolicy::NearbyPolicy => {
                Some(r)
            }
            _ => None,
        })
        .collect();
    nearby.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    let c = &nearby.first()?.routing_config;
    Some(Nearby {
        level: c.match_level.unwrap_or(Level::Zone),
        max: c.max_match_level.unwrap_or(Level::All),
        strict: c.strict_nearby,
        healthy_percent: c.healthy_percent.unwrap_or(70),
    })
}

/// How far `l` is from `caller`: 0 the same at `level`, then one more per wider level.
fn distance(l: &Place, caller: &Place, level: Level) -> Level {
    let same_region = l.region == caller.region;
    let same_zone = same_region && l.zone == caller.zone;
    let same_campus = same_zone && l.campus == caller.campus;
    match () {
        _ if same_campus => Level::Campus,
        _ if same_zone => Level::Zone,
        _ if same_region => Level::Region,
        _ => Level::All,
    }
    .max(level)
}

impl LoadAssignmentSpec {
    /// The assignment as a caller at `caller` sees it under `n`: localities by distance as
    /// priorities (0 the nearest), those past `max` (or past the match level when strict) left out.
    pub fn to_proto_nearby(&self, caller: &Place, n: &Nearby) -> ClusterLoadAssignment {
        let mut cla = self.to_proto();
        let widest = if n.strict { n.level } else { n.max };
        let mut levels: Vec<Level> = Vec::new();
        let mut kept = Vec::new();
        for mut l in cla.endpoints.drain(..) {
            let loc = l.locality.clone().unwrap_or_default();
            let place = Place {
                region: loc.region,
                zone: loc.zone,
                campus: loc.sub_zone,
            };
            let d = distance(&place, caller, n.level);
            if d > widest {
                continue;
            }
            if !levels.contains(&d) {
                levels.push(d);
            }
            l.priority = d as u32;
            kept.push(l);
        }
        // Envoy wants priorities without gaps.
        levels.sort();
        for l in &mut kept {
            let d = [Level::Campus, Level::Zone, Level::Region, Level::All][l.priority as usize];
            l.priority = levels.iter().position(|x| *x == d).unwrap_or(0) as u32;
        }
        kept.sort_by_key(|l| l.priority);
        cla.endpoints = kept;
        cla.policy = Some(Policy {
            overprovisioning_factor: Some(UInt32Value {
                value: 10_000 / n.healthy_percent.clamp(1, 100),
            }),
            ..Default::default()
        });
        cla
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InstanceInput, Location, TlsMode};

    fn inst(host: &str, region: &str, zone: &str) -> crate::model::Instance {
        InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some(host.into()),
            port: Some(80),
            location: Some(Location {
                region: region.into(),
                zone: zone.into(),
                campus: String::new(),
            }),
            ..Default::default()
        }
        .validate("t")
        .unwrap()
    }

    fn priorities(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
        cla.endpoints
            .iter()
            .map(|l| (l.locality.as_ref().unwrap().zone.clone(), l.priority))
            .collect()
    }

    #[test]
    fn the_callers_zone_first_then_its_region_then_the_rest() {
        let is = [
            inst("10.0.0.1", "r1", "z1"),
            inst("10.0.0.2", "r1", "z2"),
            inst("10.0.0.3", "r2", "z3"),
        ];
        let spec = LoadAssignmentSpec::eds("X", is.iter(), TlsMode::None);
        let caller = Place {
            region: "r1".into(),
            zone: "z1".into(),
            campus: String::new(),
        };
        let mut n = Nearby {
            level: Level::Zone,
            max: Level::All,
            strict: false,
            healthy_percent: 50,
        };
        let cla = spec.to_proto_nearby(&caller, &n);
        assert_eq!(
            priorities(&cla),
            vec![("z1".into(), 0), ("z2".into(), 1), ("z3".into(), 2)]
        );
        assert_eq!(
            cla.policy.unwrap().overprovisioning_factor.unwrap().value,
            200
        );
        n.max = Level::Region;
        assert_eq!(priorities(&spec.to_proto_nearby(&caller, &n)).len(), 2);
        n.strict = true;
        assert_eq!(
            priorities(&spec.to_proto_nearby(&caller, &n)),
            vec![("z1".into(), 0)]
        );
        // A caller in a zone without instances starts at its region.
        let elsewhere = Place {
            zone: "z9".into(),
            ..caller
        };
        n.strict = false;
        assert_eq!(
            priorities(&spec.to_proto_nearby(&elsewhere, &n)),
            vec![("z1".into(), 0), ("z2".into(), 0)]
        );
    }
}
