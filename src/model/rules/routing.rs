//! Routing rules (PolarisMesh's routing v2): by caller and request arguments to weighted groups
//! of the destination's instances, nearby routing by locality, and metadata routing.
//!
//! Validation accepts what Envoy routes can express and refuses the rest with a message saying
//! why (see each `validate`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{
    validate_name, validate_namespace_name, FieldError, MatchString, MatchType, ServiceKey, VResult,
};

/// `routing_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub enum RoutingPolicy {
    /// Sources to weighted destination groups (`RuleRoutingConfig`).
    #[default]
    RulePolicy,
    /// Nearby routing by locality (`NearbyRoutingConfig`).
    NearbyPolicy,
    /// Instances whose metadata matches, with failover (`MetadataRoutingConfig`).
    MetadataPolicy,
}

/// A routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct RoutingRule {
    /// Id (assigned at creation).
    pub id: String,
    /// Name.
    pub name: String,
    /// Namespace the rule belongs to.
    pub namespace: String,
    /// Whether it is applied.
    pub enable: bool,
    /// Which config it carries.
    pub routing_policy: RoutingPolicy,
    /// The config.
    pub routing_config: RoutingConfig,
    /// Rules with lower values come first.
    pub priority: u32,
    /// Free text.
    pub description: String,
    /// Creation time.
    pub ctime: String,
    /// Last modification time.
    pub mtime: String,
}

/// `routing_config`: one of the three configs (its `@type` is kept as sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct RoutingConfig {
    /// `type.googleapis.com/v1.RuleRoutingConfig` and the like.
    #[serde(rename = "@type", skip_serializing_if = "String::is_empty")]
    pub type_url: String,
    /// `RulePolicy`: the sub-rules, tried in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SubRule>,
    /// Nearby and metadata routing: the destination service.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// Nearby and metadata routing: its namespace.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Nearby: the level callers are kept within first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_level: Option<Level>,
    /// Nearby: the widest level traffic may widen to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_match_level: Option<Level>,
    /// Nearby: never widen.
    pub strict_nearby: bool,
    /// Nearby (ours): widen when fewer than this percentage of the nearby instances are healthy
    /// (default 70, Envoy's own threshold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_percent: Option<u32>,
    /// Metadata routing: the labels instances must carry.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Metadata routing: where traffic goes when no instance carries them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
}

/// Nearby match levels, narrowest first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Same campus (sub-zone).
    Campus,
    /// Same zone.
    Zone,
    /// Same region.
    Region,
    /// Anywhere.
    All,
}

/// Metadata routing failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Failover {
    /// To every instance.
    All,
    /// To the instances without the labels.
    Others,
    /// To instances with the other label keys.
    OtherKeys,
}

/// One sub-rule: requests from these sources go to these destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct SubRule {
    /// Name.
    pub name: String,
    /// Any of them matches.
    pub sources: Vec<Source>,
    /// Weighted groups of the destination's instances.
    pub destinations: Vec<Destination>,
}

/// A caller and the request arguments that must all match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Source {
    /// Caller service, or `*`.
    pub service: String,
    /// Caller namespace, or `*`.
    pub namespace: String,
    /// Request arguments.
    pub arguments: Vec<Argument>,
}

/// What a source argument looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ArgumentType {
    /// Extension point of PolarisMesh's SDKs.
    Custom,
    /// The HTTP method.
    Method,
    /// A request header.
    Header,
    /// A query parameter.
    Query,
    /// The caller's IP address.
    CallerIp,
    /// The request path.
    Path,
    /// A cookie.
    Cookie,
    /// The caller instance's metadata.
    CallerMetadata,
}

/// One request argument match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Argument {
    /// What it looks at.
    #[serde(rename = "type")]
    pub kind: ArgumentType,
    /// Header, query or cookie name.
    #[serde(default)]
    pub key: String,
    /// How it matches.
    pub value: MatchString,
}

/// A weighted group of the destination's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    /// Destination service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Instances whose metadata has these values.
    pub labels: BTreeMap<String, MatchString>,
    /// Groups of the lowest priority take the traffic.
    pub priority: u32,
    /// Share of the traffic.
    pub weight: u32,
    /// PolarisMesh: traffic moves to another service (not supported).
    pub transfer: String,
    /// Excluded from traffic.
    pub isolate: bool,
    /// Name.
    pub name: String,
}

impl Destination {
    /// The exact label values that select this group's instances (validated: every matcher is
    /// EXACT).
    pub fn selector(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .map(|(k, m)| (k.clone(), m.value.clone()))
            .collect()
    }
}

fn unsupported(field: impl Into<String>, why: &str) -> FieldError {
    FieldError::new(field, format!("cannot be expressed in Envoy: {why}"))
}

fn validate_match(m: &MatchString, field: &str) -> VResult<()> {
    m.validate(field)?;
    if m.value_type.as_deref().is_some_and(|t| t != "TEXT") {
        return Err(unsupported(
            format!("{field}.valueType"),
            "only TEXT values (parameters and variables are resolved by PolarisMesh's SDKs)",
        ));
    }
    Ok(())
}

impl RoutingRule {
    /// The service whose callers the rule routes (validated: exactly one).
    pub fn target(&self) -> ServiceKey {
        match self.routing_policy {
            RoutingPolicy::RulePolicy => self
                .routing_config
                .rules
                .first()
                .and_then(|r| r.destinations.first())
                .map(|d| ServiceKey::new(&d.namespace, &d.service))
                .unwrap_or_else(|| ServiceKey::new("", "")),
            _ => ServiceKey::new(&self.routing_config.namespace, &self.routing_config.service),
        }
    }

    /// Checks the rule, refusing with the field and why what Envoy cannot express.
    pub fn validate(&self) -> VResult<()> {
        validate_name(&self.name, "name")?;
        validate_namespace_name(&self.namespace, "namespace")?;
        let c = &self.routing_config;
        match self.routing_policy {
            RoutingPolicy::RulePolicy => self.validate_rules(),
            RoutingPolicy::NearbyPolicy => {
                validate_name(&c.service, "routingConfig.service")?;
                validate_namespace_name(&c.namespace, "routingConfig.namespace")?;
                let level = c.match_level.unwrap_or(Level::Zone);
                let max = c.max_match_level.unwrap_or(Level::All);
                if level == Level::All {
                    return Err(FieldError::new(
                        "routingConfig.matchLevel",
                        "must be CAMPUS, ZONE or REGION",
                    ));
                }
                if max < level {
                    return Err(FieldError::new(
                        "routingConfig.maxMatchLevel",
                        "must be at least matchLevel",
                    ));
                }
                if let Some(p) = c.healthy_percent {
                    if !(1..=100).contains(&p) {
                        return Err(FieldError::new(
                            "routingConfig.healthyPercent",
                            "must be 1..=100",
                        ));
                    }
                }
                Ok(())
            }
            RoutingPolicy::MetadataPolicy => {
                validate_name(&c.service, "routingConfig.service")?;
                validate_namespace_name(&c.namespace, "routingConfig.namespace")?;
                if c.labels.is_empty() {
                    return Err(FieldError::new("routingConfig.labels", "required"));
                }
                match c.failover.unwrap_or(Failover::All) {
                    Failover::All => Ok(()),
                    f => Err(unsupported(
                        "routingConfig.failover",
                        &format!("{f:?} selects instances by the absence of labels; only ALL (every instance) is supported"),
                    )),
                }
            }
        }
    }

    fn validate_rules(&self) -> VResult<()> {
        let rules = &self.routing_config.rules;
        if rules.is_empty() {
            return Err(FieldError::new("routingConfig.rules", "required"));
        }
        let mut target: Option<(&str, &str)> = None;
        for (i, r) in rules.iter().enumerate() {
            let at = format!("routingConfig.rules[{i}]");
            if r.sources.is_empty() {
                return Err(FieldError::new(format!("{at}.sources"), "required"));
            }
            if r.destinations.is_empty() {
                return Err(FieldError::new(format!("{at}.destinations"), "required"));
            }
            for (j, s) in r.sources.iter().enumerate() {
                let at = format!("{at}.sources[{j}]");
                for (f, v) in [("service", &s.service), ("namespace", &s.namespace)] {
                    if v != "*" && !v.is_empty() {
                        let ok = if f == "service" {
                            validate_name(v, &format!("{at}.{f}"))
                        } else {
                            validate_namespace_name(v, &format!("{at}.{f}"))
                        };
                        ok?;
                    }
                }
                for (k, a) in s.arguments.iter().enumerate() {
                    validate_argument(a, &format!("{at}.arguments[{k}]"))?;
                }
            }
            let mut priorities = std::collections::BTreeSet::new();
            for (j, d) in r.destinations.iter().enumerate() {
                let at = format!("{at}.destinations[{j}]");
                validate_name(&d.service, &format!("{at}.service"))?;
                validate_namespace_name(&d.namespace, &format!("{at}.namespace"))?;
                match target {
                    None => target = Some((&d.namespace, &d.service)),
                    Some(t) if t != (d.namespace.as_str(), d.service.as_str()) => {
                        return Err(FieldError::new(
                            format!("{at}.service"),
                            format!(
                                "a rule routes to one service ({}/{}); put {}/{} in a rule of its own",
                                t.0, t.1, d.namespace, d.service
                            ),
                        ))
                    }
                    _ => {}
                }
                if !d.transfer.is_empty() {
                    return Err(unsupported(
                        format!("{at}.transfer"),
                        "a destination group cannot send its traffic to another service",
                    ));
                }
                for (k, m) in &d.labels {
                    validate_match(m, &format!("{at}.labels.{k}"))?;
                    if m.kind != MatchType::Exact {
                        return Err(unsupported(
                            format!("{at}.labels.{k}"),
                            "a destination group selects instances by exact label values",
                        ));
                    }
                }
                if !d.isolate && d.weight > 0 {
                    priorities.insert(d.priority);
                }
            }
            if priorities.len() > 1 {
                return Err(unsupported(
                    format!("{at}.destinations"),
                    "failover between destination priorities (groups of the lowest priority take all the traffic); give the groups one priority",
                ));
            }
            if priorities.is_empty() {
                return Err(FieldError::new(
                    format!("{at}.destinations"),
                    "no group takes traffic (every group is isolated or has weight 0)",
                ));
            }
        }
        Ok(())
    }
}

fn validate_argument(a: &Argument, at: &str) -> VResult<()> {
    validate_match(&a.value, &format!("{at}.value"))?;
    let kind = a.value.kind;
    match a.kind {
        ArgumentType::Custom => Err(unsupported(
            format!("{at}.type"),
            "CUSTOM arguments are evaluated by PolarisMesh's SDKs",
        )),
        ArgumentType::CallerIp => Err(unsupported(
            format!("{at}.type"),
            "every request of a sidecar comes from its own workload's address; match the caller service instead",
        )),
        ArgumentType::CallerMetadata => Err(unsupported(
            format!("{at}.type"),
            "routes do not see the caller instance's metadata; match the caller service instead",
        )),
        ArgumentType::Header | ArgumentType::Query | ArgumentType::Cookie if a.key.is_empty() => {
            Err(FieldError::new(format!("{at}.key"), "required"))
        }
        ArgumentType::Query | ArgumentType::Path
            if matches!(kind, MatchType::NotEquals | MatchType::NotIn) =>
        {
            Err(unsupported(
                format!("{at}.value.type"),
                "query parameter and path matches cannot be inverted",
            ))
        }
        ArgumentType::Query | ArgumentType::Path | ArgumentType::Cookie
            if kind == MatchType::Range =>
        {
            Err(unsupported(
                format!("{at}.value.type"),
                "RANGE applies to header values only",
            ))
        }
        _ if kind == MatchType::Range => {
            let (lo, hi) = int_range(&a.value.value).ok_or_else(|| {
                unsupported(
                    format!("{at}.value.value"),
                    "a RANGE matches integers (`lo~hi`, both integers)",
                )
            })?;
            let _ = (lo, hi);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `lo~hi` of integers, inclusive.
pub fn int_range(s: &str) -> Option<(i64, i64)> {
    let (lo, hi) = s.split_once('~')?;
    let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
    (lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(args: Vec<Argument>, dests: Vec<Destination>) -> RoutingRule {
        RoutingRule {
            name: "r".into(),
            namespace: "default".into(),
            enable: true,
            routing_config: RoutingConfig {
                rules: vec![SubRule {
                    name: "s".into(),
                    sources: vec![Source {
                        service: "*".into(),
                        namespace: "*".into(),
                        arguments: args,
                    }],
                    destinations: dests,
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn dest(v: &str, weight: u32, priority: u32) -> Destination {
        Destination {
            service: "echo".into(),
            namespace: "default".into(),
            labels: [("version".to_string(), MatchString::new(MatchType::Exact, v))].into(),
            weight,
            priority,
            ..Default::default()
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
    fn what_envoy_can_express_passes() {
        let ok = rule(
            vec![
                arg(ArgumentType::Header, "x-user", MatchType::In, "vip,gold"),
                arg(ArgumentType::Header, "x-age", MatchType::Range, "18~65"),
                arg(ArgumentType::Query, "q", MatchType::Regex, "a.*"),
                arg(ArgumentType::Method, "", MatchType::NotEquals, "DELETE"),
                arg(ArgumentType::Cookie, "lane", MatchType::NotIn, "x,y"),
            ],
            vec![dest("v1", 80, 0), dest("v2", 20, 0), dest("v3", 0, 5)],
        );
        ok.validate().unwrap();
        assert_eq!(ok.target(), ServiceKey::new("default", "echo"));
    }

    #[test]
    fn what_envoy_cannot_express_is_refused_naming_the_field() {
        let field = |r: RoutingRule| {
            let e = r.validate().unwrap_err();
            (e.field, e.reason)
        };
        let cases: Vec<(RoutingRule, &str)> = vec![
            (
                rule(
                    vec![arg(ArgumentType::CallerIp, "", MatchType::Exact, "1.2.3.4")],
                    vec![dest("v1", 1, 0)],
                ),
                "routingConfig.rules[0].sources[0].arguments[0].type",
            ),
            (
                rule(
                    vec![arg(ArgumentType::Query, "q", MatchType::NotIn, "a")],
                    vec![dest("v1", 1, 0)],
                ),
                "routingConfig.rules[0].sources[0].arguments[0].value.type",
            ),
            (
                rule(
                    vec![arg(ArgumentType::Header, "h", MatchType::Range, "1.5~2")],
                    vec![dest("v1", 1, 0)],
                ),
                "routingConfig.rules[0].sources[0].arguments[0].value.value",
            ),
            (
                rule(vec![], vec![dest("v1", 50, 0), dest("v2", 50, 1)]),
                "routingConfig.rules[0].destinations",
            ),
            (
                rule(
                    vec![],
                    vec![Destination {
                        labels: [("v".to_string(), MatchString::new(MatchType::Regex, "v.*"))]
                            .into(),
                        ..dest("v1", 1, 0)
                    }],
                ),
                "routingConfig.rules[0].destinations[0].labels.v",
            ),
            (
                rule(
                    vec![],
                    vec![
                        dest("v1", 1, 0),
                        Destination {
                            service: "other".into(),
                            ..dest("v2", 1, 0)
                        },
                    ],
                ),
                "routingConfig.rules[0].destinations[1].service",
            ),
        ];
        for (r, want) in cases {
            let (f, why) = field(r);
            assert_eq!(f, want, "{why}");
        }
        let (_, why) = field(rule(
            vec![arg(ArgumentType::CallerIp, "", MatchType::Exact, "1.2.3.4")],
            vec![dest("v1", 1, 0)],
        ));
        assert!(why.starts_with("cannot be expressed in Envoy"), "{why}");
    }
}
