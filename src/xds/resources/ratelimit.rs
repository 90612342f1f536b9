//! Rate-limit rules on a service's own sidecars (inbound): every rule of the service is kept, each
//! of its amounts a bucket of its own.
//!
//! A rule's match (path, method, headers, query parameters) becomes one rate-limit action per
//! amount on the inbound route, producing the descriptor `rule = <rule id>#<amount index>` (plus
//! `rule_query` when the rule matches query parameters) only when every condition holds.
//! - Local rules: the `local_ratelimit` filter (stage 0) holds a token bucket per descriptor;
//!   over the limit, 429.
//! - Global rules: the `ratelimit` filter (stage 1) asks the control plane's rate-limit service
//!   (cluster [`RLS_CLUSTER`], domain `<svc>.<ns>`), which keeps the buckets for every sidecar.
//!   Arguments matched other than exactly (`regex_combine: false`) add the request's value to the
//!   descriptor, so each value gets its own buckets there. When the service cannot be reached the
//!   request passes (`failure_mode_deny: false`); a rule whose failover is `FAILOVER_LOCAL` also
//!   has local buckets of the same amounts, which then still hold.

use crate::model::HostPort;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    grpc_service, ApiVersion, GrpcService, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier,
    rate_limit::{action, Action},
    HeaderMatcher, QueryParameterMatcher, RateLimit, Route,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, LocalRateLimitDescriptor,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::RateLimit as RateLimitFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::r#type::v3::{
    fractional_percent::DenominatorType, FractionalPercent, TokenBucket,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use super::matchers::{header, pattern, regex};
use super::{duration_ms, socket};
use crate::model::rules::ratelimit::{AmountMode, LimitArgumentType, LimitFailover, LimitType};
use crate::model::rules::{RateLimitRule, Rule};
use crate::model::MatchType;

/// The cluster of the control plane's rate-limit service.
pub const RLS_CLUSTER: &str = "polaris-ratelimit";

const LOCAL_FILTER: &str = "envoy.filters.http.local_ratelimit";
const GLOBAL_FILTER: &str = "envoy.filters.http.ratelimit";

/// The rate-limit rules (enabled) among a service's rules, in priority order.
pub fn limit_rules(rules: &[std::sync::Arc<Rule>]) -> Vec<&RateLimitRule> {
    let mut out: Vec<&RateLimitRule> = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::RateLimit(r) if r.enabled() => Some(r),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    out
}

fn local_buckets(r: &RateLimitRule) -> bool {
    r.kind == LimitType::Local || r.failover == LimitFailover::FailoverLocal
}

/// The global domain of a service.
pub fn rls_domain(ns: &str, svc: &str) -> String {
    format!("{svc}.{ns}")
}

/// The descriptor value of a rule's amount.
pub fn descriptor_value(rule_id: &str, amount: usize) -> String {
    format!("{rule_id}#{amount}")
}

fn percent_100() -> Option<RuntimeFractionalPercent> {
    Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        ..Default::default()
    })
}

/// A bucket that never runs out (the filter's default when no rule matches).
fn unlimited() -> TokenBucket {
    TokenBucket {
        max_tokens: u32::MAX,
        tokens_per_fill: Some(UInt32Value { value: u32::MAX }),
        fill_interval: Some(duration_ms(1000)),
    }
}

/// The rate-limit HTTP filters of a service's inbound connection manager (before the router):
/// `local_ratelimit`, and `ratelimit` when the control plane runs the rate-limit service. They
/// are there whether or not the service has rules, and do nothing without them: rules are
/// per-route configuration, so a rule change updates the route, which applies to open
/// connections at once, where a changed filter list would replace the listener and leave open
/// connections (a caller's pooled ones) without the new limits until they close.
pub fn inbound_filters(ns: &str, svc: &str, rls: bool) -> Vec<HttpFilter> {
    let mut out = vec![HttpFilter {
        name: LOCAL_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            LocalRateLimit {
                stat_prefix: "inbound_local_rate_limit".into(),
                ..Default::default()
            },
        ))),
        ..Default::default()
    }];
    if rls {
        out.push(HttpFilter {
            name: GLOBAL_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                RateLimitFilter {
                    domain: rls_domain(ns, svc),
                    stage: 1,
                    timeout: Some(duration_ms(200)),
                    failure_mode_deny: false,
                    rate_limit_service: Some(RateLimitServiceConfig {
                        grpc_service: Some(GrpcService {
                            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                                grpc_service::EnvoyGrpc {
                                    cluster_name: RLS_CLUSTER.into(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }),
                        transport_api_version: ApiVersion::V3 as i32,
                    }),
                    ..Default::default()
                },
            ))),
            ..Default::default()
        });
    }
    out
}

/// The actions producing a rule's descriptor for `amount`: all must match.
fn actions(r: &RateLimitRule, amount: usize, global: bool) -> (Vec<Action>, Vec<Entry>) {
    let value = descriptor_value(&r.id, amount);
    let mut headers = Vec::new();
    if let Some(m) = &r.method {
        // `:path` carries the query string too.
        headers.push(HeaderMatcher {
            name: ":path".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(regex(format!(
                "{}(?:\\?.*)?",
                pattern(m)
            )))),
            ..Default::default()
        });
    }
    let mut queries = Vec::new();
    let mut per_value = Vec::new();
    for a in &r.arguments {
        match a.kind {
            LimitArgumentType::Method => headers.push(header(":method", &a.value)),
            LimitArgumentType::Header => {
                headers.push(header(&a.key.to_ascii_lowercase(), &a.value))
            }
            LimitArgumentType::Query => queries.push(QueryParameterMatcher {
                name: a.key.clone(),
                query_parameter_match_specifier: Some(
                    envoy_types::pb::envoy::config::route::v3::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        regex(pattern(&a.value)),
                    ),
                ),
            }),
            _ => {}
        }
        if global && !r.regex_combine && a.value.kind != MatchType::Exact {
            per_value.push(a);
        }
    }
    // A header match needs a header to match; a rule matching every request is a fixed key.
    let first = if headers.is_empty() {
        action::ActionSpecifier::GenericKey(action::GenericKey {
            descriptor_key: "rule".into(),
            descriptor_value: value.clone(),
            ..Default::default()
        })
    } else {
        action::ActionSpecifier::HeaderValueMatch(action::HeaderValueMatch {
            descriptor_key: "rule".into(),
            descriptor_value: value.clone(),
            expect_match: Some(BoolValue { value: true }),
            headers,
            ..Default::default()
        })
    };
    let mut acts = vec![Action {
        action_specifier: Some(first),
    }];
    let mut entries = vec![Entry {
        key: "rule".into(),
        value: value.clone(),
    }];
    if !queries.is_empty() {
        acts.push(Action {
            action_specifier: Some(action::ActionSpecifier::QueryParameterValueMatch(
                action::QueryParameterValueMatch {
                    descriptor_key: "rule_query".into(),
                    descriptor_value: value.clone(),
                    expect_match: Some(BoolValue { value: true }),
                    query_parameters: queries,
                    ..Default::default()
                },
            )),
        });
        entries.push(Entry {
            key: "rule_query".into(),
            value,
        });
    }
    for a in per_value {
        acts.push(Action {
            action_specifier: Some(match a.kind {
                LimitArgumentType::Query => {
                    action::ActionSpecifier::QueryParameters(action::QueryParameters {
                        query_parameter_name: a.key.clone(),
                        descriptor_key: format!("query:{}", a.key),
                        ..Default::default()
                    })
                }
                LimitArgumentType::Method => {
                    action::ActionSpecifier::RequestHeaders(action::RequestHeaders {
                        header_name: ":method".into(),
                        descriptor_key: "method".into(),
                        ..Default::default()
                    })
                }
                _ => action::ActionSpecifier::RequestHeaders(action::RequestHeaders {
                    header_name: a.key.to_ascii_lowercase(),
                    descriptor_key: format!("header:{}", a.key.to_ascii_lowercase()),
                    ..Default::default()
                }),
            }),
        });
    }
    (acts, entries)
}

/// Puts the rules on the inbound route: rate-limit actions, and the local buckets (per-route
/// `local_ratelimit` config). `instances` divides amounts shared equally.
pub fn with_limits(mut route: Route, rules: &[&RateLimitRule], instances: u32) -> Route {
    let mut descriptors = Vec::new();
    let mut limits = Vec::new();
    for r in rules {
        for (k, a) in r.amounts.iter().enumerate() {
            if local_buckets(r) {
                let (acts, entries) = actions(r, k, false);
                limits.push(RateLimit {
                    stage: Some(UInt32Value { value: 0 }),
                    actions: acts,
                    ..Default::default()
                });
                let max = match r.amount_mode {
                    AmountMode::ShareEqually => a.max_amount.div_ceil(instances.max(1)),
                    AmountMode::GlobalTotal => a.max_amount,
                };
                descriptors.push(LocalRateLimitDescriptor {
                    entries,
                    token_bucket: Some(TokenBucket {
                        max_tokens: max,
                        tokens_per_fill: Some(UInt32Value { value: max }),
                        fill_interval: Some(duration_ms(a.period_ms())),
                    }),
                    ..Default::default()
                });
            }
            if r.kind == LimitType::Global {
                let (acts, _) = actions(r, k, true);
                limits.push(RateLimit {
                    stage: Some(UInt32Value { value: 1 }),
                    actions: acts,
                    ..Default::default()
                });
            }
        }
    }
    if let Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(a)) =
        route.action.as_mut()
    {
        a.rate_limits.extend(limits);
    }
    if !descriptors.is_empty() {
        route.typed_per_filter_config.insert(
            LOCAL_FILTER.into(),
            pack_any(LocalRateLimit {
                stat_prefix: "inbound_local_rate_limit".into(),
                token_bucket: Some(unlimited()),
                filter_enabled: percent_100(),
                filter_enforced: percent_100(),
                descriptors,
                stage: 0,
                ..Default::default()
            }),
        );
    }
    route
}

/// The rate-limit service's cluster (HTTP/2 to `addr`; resolved by DNS when it is a name, as a
/// Kubernetes Service's is).
pub fn rls_cluster(addr: &HostPort) -> Cluster {
    let kind = match addr.ip() {
        Some(_) => cluster::DiscoveryType::Static,
        None => cluster::DiscoveryType::StrictDns,
    };
    let mut c = Cluster {
        name: RLS_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: Some(duration_ms(1000)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: RLS_CLUSTER.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(&addr.host, addr.port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        super::HTTP_OPTIONS_EXT.to_string(),
        pack_any(super::http2_options()),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rules::ratelimit::{Amount, LimitArgument};
    use crate::model::MatchString;
    use envoy_types::pb::envoy::config::route::v3::route::Action as RouteAction;
    use prost::Message;

    #[test]
    fn the_rls_cluster_resolves_a_name_by_dns_and_takes_an_ip_as_is() {
        let kind = |c: &Cluster| c.cluster_discovery_type.clone();
        let ip = rls_cluster(&"10.0.0.7:8081".parse().unwrap());
        assert_eq!(
            kind(&ip),
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32
            ))
        );
        let name = rls_cluster(&"polaris.polaris-system.svc:8081".parse().unwrap());
        assert_eq!(
            kind(&name),
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32
            ))
        );
        let ep = &name.load_assignment.unwrap().endpoints[0].lb_endpoints[0];
        let Some(HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
            panic!("no endpoint")
        };
        assert_eq!(e.address, Some(socket("polaris.polaris-system.svc", 8081)));
    }

    fn rule(id: &str, kind: LimitType, amounts: &[(u32, &str)]) -> RateLimitRule {
        RateLimitRule {
            id: id.into(),
            name: id.into(),
            namespace: "default".into(),
            service: "echo".into(),
            kind,
            amounts: amounts
                .iter()
                .map(|(m, d)| Amount {
                    max_amount: *m,
                    valid_duration: d.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn limits_of(r: &Route) -> Vec<RateLimit> {
        match &r.action {
            Some(RouteAction::Route(a)) => a.rate_limits.clone(),
            _ => vec![],
        }
    }

    fn route() -> Route {
        Route {
            action: Some(RouteAction::Route(Default::default())),
            ..Default::default()
        }
    }

    #[test]
    fn every_rule_and_every_amount_keeps_its_bucket() {
        let a = rule("a", LimitType::Local, &[(10, "1s"), (100, "1m")]);
        let b = RateLimitRule {
            method: Some(MatchString::new(MatchType::Exact, "/slow")),
            ..rule("b", LimitType::Local, &[(2, "1s")])
        };
        let r = with_limits(route(), &[&a, &b], 1);
        assert_eq!(limits_of(&r).len(), 3);
        let cfg = LocalRateLimit::decode(r.typed_per_filter_config[LOCAL_FILTER].value.as_slice())
            .unwrap();
        let buckets: Vec<(String, u32, i64)> = cfg
            .descriptors
            .iter()
            .map(|d| {
                let t = d.token_bucket.as_ref().unwrap();
                (
                    d.entries[0].value.clone(),
                    t.max_tokens,
                    t.fill_interval.as_ref().unwrap().seconds,
                )
            })
            .collect();
        assert_eq!(
            buckets,
            vec![
                ("a#0".to_string(), 10, 1),
                ("a#1".to_string(), 100, 60),
                ("b#0".to_string(), 2, 1)
            ]
        );
        assert_eq!(inbound_filters("default", "echo", false).len(), 1);
        assert_eq!(inbound_filters("default", "echo", true).len(), 2);
    }

    #[test]
    fn global_rules_ask_the_service_and_fall_back_locally_when_told() {
        let g = RateLimitRule {
            arguments: vec![LimitArgument {
                kind: LimitArgumentType::Header,
                key: "X-User".into(),
                value: MatchString::new(MatchType::Regex, ".*"),
            }],
            ..rule("g", LimitType::Global, &[(20, "1s")])
        };
        let r = with_limits(route(), &[&g], 1);
        let stages: Vec<u32> = limits_of(&r)
            .iter()
            .map(|l| l.stage.unwrap().value)
            .collect();
        assert_eq!(stages, [0, 1]);
        // Each user gets its own buckets in the service.
        assert!(matches!(
            limits_of(&r)[1].actions[1].action_specifier,
            Some(action::ActionSpecifier::RequestHeaders(ref h)) if h.header_name == "x-user"
        ));
        let pass = RateLimitRule {
            failover: LimitFailover::FailoverPass,
            ..g
        };
        assert_eq!(limits_of(&with_limits(route(), &[&pass], 1)).len(), 1);
    }

    #[test]
    fn shared_amounts_are_divided_between_instances() {
        let s = RateLimitRule {
            amount_mode: AmountMode::ShareEqually,
            ..rule("s", LimitType::Local, &[(10, "1s")])
        };
        let r = with_limits(route(), &[&s], 3);
        let cfg = LocalRateLimit::decode(r.typed_per_filter_config[LOCAL_FILTER].value.as_slice())
            .unwrap();
        assert_eq!(
            cfg.descriptors[0].token_bucket.as_ref().unwrap().max_tokens,
            4
        );
    }
}
