//! Routing rules and load balancing as routes: each rule's sources become route matches, its
//! destination groups weighted clusters, one cluster per group of instances (see
//! [`group_cluster_name`]); the service's hash key (ring hash, maglev) becomes the routes' hash
//! policy.
//!
//! Groups are clusters of their own rather than subsets of the service's cluster
//! (`lb_subset_config` with `metadata_match`): proxyless gRPC clients implement weighted clusters
//! but not subsets, so only separate clusters route them by the same rules, and each group's
//! endpoints are then a load assignment of their own.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    route::Action, route_action::hash_policy, route_action::ClusterSpecifier,
    route_action::HashPolicy, route_match::PathSpecifier, weighted_cluster::ClusterWeight,
    HeaderMatcher, QueryParameterMatcher, Route, RouteAction, RouteMatch, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::matchers::{alternatives, header, pattern, regex, string_match};
use super::outbound_name;
use crate::model::rules::routing::{Argument, ArgumentType, Source};
use crate::model::rules::{RoutingRule, Rule};
use crate::model::{MatchString, MatchType, Service};

pub use crate::model::LB_HASH_KEY;

/// The cluster of a destination group: `OUTBOUND|<ns>|<svc>|<k>=<v>,...` (labels sorted), shared
/// by every rule that selects the same labels.
pub fn group_cluster_name(ns: &str, svc: &str, selector: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}|{}", outbound_name(ns, svc), labels.join(","))
}

/// The enabled routing rules (rule policy) of a service, in priority order.
pub fn routing_rules(rules: &[std::sync::Arc<Rule>]) -> Vec<&RoutingRule> {
    let mut out: Vec<&RoutingRule> = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::Routing(r)
                if r.enable
                    && r.routing_policy
                        == crate::model::rules::routing::RoutingPolicy::RulePolicy =>
            {
                Some(r)
            }
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    out
}

/// Metadata routing: the labels every caller's requests go to (the first enabled rule's), with
/// every instance as the failover.
pub fn metadata_labels(rules: &[std::sync::Arc<Rule>]) -> Option<BTreeMap<String, String>> {
    let mut m: Vec<&RoutingRule> = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::Routing(r)
                if r.enable
                    && r.routing_policy
                        == crate::model::rules::routing::RoutingPolicy::MetadataPolicy =>
            {
                Some(r)
            }
            _ => None,
        })
        .collect();
    m.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    m.first().map(|r| r.routing_config.labels.clone())
}

/// The cluster of metadata routing: the group of `labels` first, every instance when the group
/// has no healthy instance (an aggregate cluster; proxyless gRPC implements these too).
pub fn failover_cluster_name(ns: &str, svc: &str, labels: &BTreeMap<String, String>) -> String {
    format!("{}|failover", group_cluster_name(ns, svc, labels))
}

/// The aggregate cluster of [`failover_cluster_name`].
pub fn failover_cluster(
    ns: &str,
    svc: &str,
    labels: &BTreeMap<String, String>,
) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    use envoy_types::pb::envoy::config::cluster::v3::{cluster, cluster::LbPolicy, Cluster};
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    Cluster {
        name: failover_cluster_name(ns, svc, labels),
        connect_timeout: Some(super::duration_ms(5000)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
            cluster::CustomClusterType {
                name: "envoy.clusters.aggregate".into(),
                typed_config: Some(envoy_types::util::pack_any(ClusterConfig {
                    clusters: vec![group_cluster_name(ns, svc, labels), outbound_name(ns, svc)],
                })),
            },
        )),
        ..Default::default()
    }
}

/// The instance groups the rules route to (distinct label selectors, sorted), metadata routing's
/// included.
pub fn groups(rules: &[&RoutingRule]) -> Vec<BTreeMap<String, String>> {
    groups_with(rules, None)
}

/// [`groups`] with metadata routing's labels.
pub fn groups_with(
    rules: &[&RoutingRule],
    metadata: Option<&BTreeMap<String, String>>,
) -> Vec<BTreeMap<String, String>> {
    let mut out: Vec<BTreeMap<String, String>> = rules
        .iter()
        .flat_map(|r| r.routing_config.rules.iter())
        .flat_map(|s| s.destinations.iter())
        .filter(|d| !d.isolate && d.weight > 0)
        .map(|d| d.selector())
        .chain(metadata.cloned())
        .filter(|s| !s.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The callers some rule names (`ns/svc`), for whom the service's routes differ.
pub fn named_callers(rules: &[&RoutingRule]) -> Vec<String> {
    let mut out: Vec<String> = rules
        .iter()
        .flat_map(|r| r.routing_config.rules.iter())
        .flat_map(|s| s.sources.iter())
        .filter(|s| !is_any(&s.service))
        .map(|s| format!("{}/{}", s.namespace, s.service))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn is_any(v: &str) -> bool {
    v.is_empty() || v == "*"
}

/// Whether a source applies to `caller` (`ns/svc`; `None`: a caller no rule names).
fn applies(s: &Source, caller: Option<&str>) -> bool {
    if is_any(&s.service) {
        return true;
    }
    let Some((ns, svc)) = caller.and_then(|c| c.split_once('/')) else {
        return false;
    };
    s.service == svc && (is_any(&s.namespace) || s.namespace == ns)
}

/// A cookie's value, matched in the `cookie` header.
fn cookie(name: &str, m: &MatchString) -> HeaderMatcher {
    let re = format!(
        "(?:.*;\\s*)?{}=(?:{})(?:;.*)?",
        regex::escape(name),
        pattern(m)
    );
    let invert = matches!(m.kind, MatchType::NotEquals | MatchType::NotIn);
    HeaderMatcher {
        name: "cookie".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(regex(re))),
        invert_match: invert,
        treat_missing_header_as_empty: invert,
    }
}

/// The route match of a source's arguments (all must match).
pub fn route_match(args: &[Argument]) -> RouteMatch {
    let mut m = RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    for a in args {
        match a.kind {
            ArgumentType::Path => {
                m.path_specifier = Some(match a.value.kind {
                    MatchType::Exact => PathSpecifier::Path(a.value.value.clone()),
                    MatchType::In => PathSpecifier::SafeRegex(RegexMatcher {
                        regex: alternatives(&a.value.value),
                        ..Default::default()
                    }),
                    _ => PathSpecifier::SafeRegex(RegexMatcher {
                        regex: a.value.value.clone(),
                        ..Default::default()
                    }),
                })
            }
            ArgumentType::Method => m.headers.push(header(":method", &a.value)),
            ArgumentType::Header => m
                .headers
                .push(header(&a.key.to_ascii_lowercase(), &a.value)),
            ArgumentType::Cookie => m.headers.push(cookie(&a.key, &a.value)),
            ArgumentType::Query => m.query_parameters.push(QueryParameterMatcher {
                name: a.key.clone(),
                query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::StringMatch(
                    string_match(&a.value).0,
                )),
            }),
            // Refused by validation.
            ArgumentType::Custom | ArgumentType::CallerIp | ArgumentType::CallerMetadata => {}
        }
    }
    m
}

/// The hash policy of a service's routes (ring hash, maglev), from [`LB_HASH_KEY`].
pub fn hash_policy(svc: &Service) -> Vec<HashPolicy> {
    let Some(key) = svc.metadata.get(LB_HASH_KEY) else {
        return vec![];
    };
    let spec =
        match key.split_once(':') {
            Some(("header", h)) => hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: h.to_ascii_lowercase(),
                ..Default::default()
            }),
            Some(("cookie", c)) => hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
                name: c.to_string(),
                ..Default::default()
            }),
            _ if key == "source-ip" => hash_policy::PolicySpecifier::ConnectionProperties(
                hash_policy::ConnectionProperties { source_ip: true },
            ),
            _ => return vec![],
        };
    vec![HashPolicy {
        policy_specifier: Some(spec),
        ..Default::default()
    }]
}

/// The routes of `svc`'s virtual host as `caller` sees them: each applicable source of each rule
/// (in priority order) to its weighted groups, then everything else to the whole service.
pub fn service_routes(svc: &Service, rules: &[&RoutingRule], caller: Option<&str>) -> Vec<Route> {
    service_routes_with(svc, rules, caller, None)
}

/// [`service_routes`] whose last route (everything the rules did not match) goes to metadata
/// routing's failover cluster when the service has it.
pub fn service_routes_with(
    svc: &Service,
    rules: &[&RoutingRule],
    caller: Option<&str>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Vec<Route> {
    let (ns, name) = (&svc.namespace, &svc.name);
    let hash = hash_policy(svc);
    let to = |spec: ClusterSpecifier| RouteAction {
        cluster_specifier: Some(spec),
        hash_policy: hash.clone(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for rule in rules {
        for sub in &rule.routing_config.rules {
            let dests: Vec<(String, u32)> = sub
                .destinations
                .iter()
                .filter(|d| !d.isolate && d.weight > 0)
                .map(|d| {
                    let sel = d.selector();
                    let cluster = if sel.is_empty() {
                        outbound_name(ns, name)
                    } else {
                        group_cluster_name(ns, name, &sel)
                    };
                    (cluster, d.weight)
                })
                .collect();
            let spec = match dests.as_slice() {
                [(c, _)] => ClusterSpecifier::Cluster(c.clone()),
                _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: dests
                        .iter()
                        .map(|(c, w)| ClusterWeight {
                            name: c.clone(),
                            weight: Some(UInt32Value { value: *w }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
            };
            for src in sub.sources.iter().filter(|s| applies(s, caller)) {
                out.push(Route {
                    name: format!("{}/{}", rule.name, sub.name),
                    r#match: Some(route_match(&src.arguments)),
                    action: Some(Action::Route(to(spec.clone()))),
                    ..Default::default()
                });
            }
        }
    }
    out.push(Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::Route(to(ClusterSpecifier::Cluster(
            match metadata {
                Some(labels) if !labels.is_empty() => failover_cluster_name(ns, name, labels),
                _ => outbound_name(ns, name),
            },
        )))),
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rules::routing::{Destination, RoutingConfig, SubRule};
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    use envoy_types::pb::envoy::r#type::v3::Int64Range;

    fn rule(sources: Vec<Source>, dests: Vec<(&str, u32)>) -> RoutingRule {
        RoutingRule {
            id: "1".into(),
            name: "r".into(),
            namespace: "default".into(),
            enable: true,
            routing_config: RoutingConfig {
                rules: vec![SubRule {
                    name: "s".into(),
                    sources,
                    destinations: dests
                        .into_iter()
                        .map(|(v, w)| Destination {
                            service: "echo".into(),
                            namespace: "default".into(),
                            labels: [(
                                "version".to_string(),
                                MatchString::new(MatchType::Exact, v),
                            )]
                            .into(),
                            weight: w,
                            ..Default::default()
                        })
                        .collect(),
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn any(args: Vec<Argument>) -> Source {
        Source {
            service: "*".into(),
            namespace: "*".into(),
            arguments: args,
        }
    }

    fn arg(kind: ArgumentType, key: &str, m: MatchType, v: &str) -> Argument {
        Argument {
            kind,
            key: key.into(),
            value: MatchString::new(m, v),
        }
    }

    #[test]
    fn weighted_groups_become_weighted_clusters_of_their_own() {
        let svc = Service::bare("default", "echo", "t");
        let r = rule(vec![any(vec![])], vec![("v1", 80), ("v2", 20)]);
        let routes = service_routes(&svc, &[&r], None);
        assert_eq!(routes.len(), 2, "the rule, then the default");
        let Some(Action::Route(a)) = &routes[0].action else {
            panic!()
        };
        let Some(ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
            panic!()
        };
        let got: Vec<(&str, u32)> = w
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.unwrap().value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("OUTBOUND|default|echo|version=v1", 80),
                ("OUTBOUND|default|echo|version=v2", 20)
            ]
        );
        assert_eq!(groups(&[&r]).len(), 2);
        let Some(Action::Route(d)) = &routes[1].action else {
            panic!()
        };
        assert_eq!(
            d.cluster_specifier,
            Some(ClusterSpecifier::Cluster("OUTBOUND|default|echo".into()))
        );
    }

    #[test]
    fn arguments_become_matchers() {
        let m = route_match(&[
            arg(ArgumentType::Header, "X-User", MatchType::Exact, "vip"),
            arg(ArgumentType::Header, "x-age", MatchType::Range, "18~65"),
            arg(
                ArgumentType::Header,
                "x-tier",
                MatchType::NotIn,
                "free,trial",
            ),
            arg(ArgumentType::Query, "lang", MatchType::In, "en,fr"),
            arg(ArgumentType::Method, "", MatchType::Exact, "GET"),
            arg(ArgumentType::Path, "", MatchType::Regex, "/api/.*"),
            arg(ArgumentType::Cookie, "lane", MatchType::Exact, "blue"),
        ]);
        assert_eq!(
            m.path_specifier,
            Some(PathSpecifier::SafeRegex(RegexMatcher {
                regex: "/api/.*".into(),
                ..Default::default()
            }))
        );
        let h = |name: &str| m.headers.iter().find(|h| h.name == name).unwrap().clone();
        assert!(!h("x-user").invert_match);
        assert_eq!(
            h("x-age").header_match_specifier,
            Some(HeaderMatchSpecifier::RangeMatch(Int64Range {
                start: 18,
                end: 66
            }))
        );
        let tier = h("x-tier");
        assert!(tier.invert_match && tier.treat_missing_header_as_empty);
        assert_eq!(
            tier.header_match_specifier,
            Some(HeaderMatchSpecifier::StringMatch(regex(
                "free|trial".into()
            )))
        );
        assert!(!h(":method").invert_match);
        let Some(HeaderMatchSpecifier::StringMatch(c)) = h("cookie").header_match_specifier else {
            panic!()
        };
        let Some(MatchPattern::SafeRegex(re)) = c.match_pattern else {
            panic!()
        };
        let re = ::regex::Regex::new(&format!("^(?:{})$", re.regex)).unwrap();
        assert!(re.is_match("a=1; lane=blue; b=2"));
        assert!(re.is_match("lane=blue"));
        assert!(!re.is_match("lane=bluegreen"));
        assert_eq!(m.query_parameters[0].name, "lang");
    }

    #[test]
    fn caller_sources_apply_to_their_caller_only() {
        let svc = Service::bare("default", "echo", "t");
        let mine = Source {
            service: "web".into(),
            namespace: "default".into(),
            arguments: vec![],
        };
        let r = rule(vec![mine], vec![("v2", 100)]);
        assert_eq!(named_callers(&[&r]), vec!["default/web"]);
        assert_eq!(service_routes(&svc, &[&r], None).len(), 1, "default only");
        assert_eq!(service_routes(&svc, &[&r], Some("default/web")).len(), 2);
        assert_eq!(service_routes(&svc, &[&r], Some("default/other")).len(), 1);
    }

    #[test]
    fn hash_keys() {
        let mut svc = Service::bare("default", "echo", "t");
        assert!(hash_policy(&svc).is_empty());
        for (key, ok) in [
            ("header:X-User", true),
            ("cookie:sid", true),
            ("source-ip", true),
            ("nonsense", false),
        ] {
            svc.metadata.insert(LB_HASH_KEY.into(), key.into());
            assert_eq!(hash_policy(&svc).len(), usize::from(ok), "{key}");
        }
    }
}
