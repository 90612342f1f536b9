//! Rate-limit rules (PolarisMesh's `ratelimit.proto` `Rule`): local (each sidecar its own token
//! buckets) or global (buckets in the control plane's rate-limit service).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{
    validate_name, validate_namespace_name, FieldError, MatchString, MatchType, ServiceKey, VResult,
};

/// Local or global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum LimitType {
    /// Buckets in the control plane's rate-limit service, shared by every sidecar.
    Global,
    /// Buckets in each sidecar.
    #[default]
    Local,
}

/// What is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum LimitResource {
    /// Requests per period.
    #[default]
    Qps,
    /// Requests in flight.
    Concurrency,
}

/// How a local amount is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AmountMode {
    /// The amount is the total: global buckets; for a local rule, each sidecar's.
    #[default]
    GlobalTotal,
    /// The amount is divided between the service's instances (local rules).
    ShareEqually,
}

/// What a global rule does when the rate-limit service cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LimitFailover {
    /// Fall back to each sidecar limiting by the same amounts on its own.
    #[default]
    FailoverLocal,
    /// Let requests pass.
    FailoverPass,
}

/// What an argument looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LimitArgumentType {
    /// Evaluated by PolarisMesh's SDKs.
    Custom,
    /// The HTTP method.
    Method,
    /// A header.
    Header,
    /// A query parameter.
    Query,
    /// The calling service.
    CallerService,
    /// The caller's address.
    CallerIp,
    /// The caller's metadata.
    CallerMetadata,
}

/// One argument a request must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitArgument {
    /// What it looks at.
    #[serde(rename = "type")]
    pub kind: LimitArgumentType,
    /// Header or query parameter name.
    #[serde(default)]
    pub key: String,
    /// How it matches.
    pub value: MatchString,
}

/// One bucket: `maxAmount` requests per `validDuration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Amount {
    /// Requests per period.
    pub max_amount: u32,
    /// The period: a duration such as `1s`, `500ms`, `1m`.
    pub valid_duration: String,
}

impl Amount {
    /// The period in milliseconds (validated).
    pub fn period_ms(&self) -> u64 {
        parse_duration_ms(&self.valid_duration).unwrap_or(1000)
    }
}

/// A rate-limit rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitRule {
    /// Id (assigned at creation).
    pub id: String,
    /// Name.
    pub name: String,
    /// The limited service's namespace.
    pub namespace: String,
    /// The limited service.
    pub service: String,
    /// Disabled.
    pub disable: bool,
    /// Rules with lower values are listed first.
    pub priority: u32,
    /// What is limited.
    pub resource: LimitResource,
    /// Local or global.
    #[serde(rename = "type")]
    pub kind: LimitType,
    /// The request path it applies to (absent: every path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MatchString>,
    /// Further arguments; all must match.
    pub arguments: Vec<LimitArgument>,
    /// Buckets; every one must have a token.
    pub amounts: Vec<Amount>,
    /// `REJECT` (429).
    pub action: String,
    /// How a local amount is shared.
    pub amount_mode: AmountMode,
    /// Global rules when the rate-limit service is unreachable.
    pub failover: LimitFailover,
    /// Each distinct value of a non-EXACT argument gets its own buckets (PolarisMesh's
    /// `regex_combine: false`); combined, they share one.
    pub regex_combine: bool,
    /// Free text.
    pub description: String,
    /// Creation time.
    pub ctime: String,
    /// Last modification time.
    pub mtime: String,
}

fn unsupported(field: impl Into<String>, why: &str) -> FieldError {
    FieldError::new(field, format!("cannot be expressed in Envoy: {why}"))
}

/// A duration like `1s`, `500ms`, `2m`, `1h`, in milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return None,
    };
    (1.0..=86_400_000.0).contains(&ms).then_some(ms as u64)
}

impl RateLimitRule {
    /// The limited service.
    pub fn target(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.service)
    }

    /// Checks the rule, refusing with the field and why what Envoy cannot express.
    pub fn validate(&self) -> VResult<()> {
        validate_name(&self.name, "name")?;
        validate_namespace_name(&self.namespace, "namespace")?;
        validate_name(&self.service, "service")?;
        if self.resource == LimitResource::Concurrency {
            return Err(unsupported(
                "resource",
                "a per-rule limit of requests in flight (QPS only)",
            ));
        }
        if !(self.action.is_empty() || self.action.eq_ignore_ascii_case("REJECT")) {
            return Err(unsupported(
                "action",
                &format!("{:?}: requests over the limit are rejected (REJECT, 429); they cannot be queued", self.action),
            ));
        }
        if self.amounts.is_empty() || self.amounts.len() > 8 {
            return Err(FieldError::new("amounts", "1 to 8 amounts"));
        }
        for (i, a) in self.amounts.iter().enumerate() {
            if a.max_amount == 0 {
                return Err(FieldError::new(
                    format!("amounts[{i}].maxAmount"),
                    "must be at least 1",
                ));
            }
            if parse_duration_ms(&a.valid_duration).is_none() {
                return Err(FieldError::new(
                    format!("amounts[{i}].validDuration"),
                    "a duration from 1ms to 24h, such as 1s, 500ms, 1m",
                ));
            }
        }
        if self.kind == LimitType::Global && self.amount_mode == AmountMode::ShareEqually {
            return Err(FieldError::new(
                "amountMode",
                "SHARE_EQUALLY divides a local amount between instances; a global amount is already shared",
            ));
        }
        if let Some(m) = &self.method {
            m.validate("method")?;
            if matches!(
                m.kind,
                MatchType::NotEquals | MatchType::NotIn | MatchType::Range
            ) {
                return Err(unsupported(
                    "method.type",
                    "a path match cannot be inverted or a range",
                ));
            }
        }
        for (i, a) in self.arguments.iter().enumerate() {
            let at = format!("arguments[{i}]");
            a.value.validate(&format!("{at}.value"))?;
            match a.kind {
                LimitArgumentType::Custom
                | LimitArgumentType::CallerService
                | LimitArgumentType::CallerIp
                | LimitArgumentType::CallerMetadata => {
                    return Err(unsupported(
                        format!("{at}.type"),
                        "the server's sidecar does not know the caller (match headers, query parameters or the method)",
                    ))
                }
                LimitArgumentType::Header | LimitArgumentType::Query if a.key.is_empty() => {
                    return Err(FieldError::new(format!("{at}.key"), "required"))
                }
                LimitArgumentType::Query
                    if matches!(a.value.kind, MatchType::NotEquals | MatchType::NotIn) =>
                {
                    return Err(unsupported(
                        format!("{at}.value.type"),
                        "query parameter matches cannot be inverted",
                    ))
                }
                _ if a.value.kind == MatchType::Range
                    && (a.kind == LimitArgumentType::Query
                        || super::routing::int_range(&a.value.value).is_none()) =>
                {
                    return Err(unsupported(
                        format!("{at}.value"),
                        "a RANGE matches integer header values only",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the rule applies.
    pub fn enabled(&self) -> bool {
        !self.disable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RateLimitRule {
        RateLimitRule {
            name: "qps".into(),
            namespace: "default".into(),
            service: "echo".into(),
            amounts: vec![Amount {
                max_amount: 10,
                valid_duration: "1s".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1s"), Some(1000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1d"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("0s"), None);
    }

    #[test]
    fn refusals_name_the_field() {
        rule().validate().unwrap();
        let f = |r: RateLimitRule| r.validate().unwrap_err().field;
        assert_eq!(
            f(RateLimitRule {
                resource: LimitResource::Concurrency,
                ..rule()
            }),
            "resource"
        );
        assert_eq!(
            f(RateLimitRule {
                action: "UNIRATE".into(),
                ..rule()
            }),
            "action"
        );
        assert_eq!(
            f(RateLimitRule {
                amounts: vec![Amount {
                    max_amount: 1,
                    valid_duration: "1y".into()
                }],
                ..rule()
            }),
            "amounts[0].validDuration"
        );
        assert_eq!(
            f(RateLimitRule {
                arguments: vec![LimitArgument {
                    kind: LimitArgumentType::CallerIp,
                    key: String::new(),
                    value: MatchString::new(MatchType::Exact, "1.2.3.4")
                }],
                ..rule()
            }),
            "arguments[0].type"
        );
    }
}
