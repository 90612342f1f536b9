//! Circuit-breaker rules (PolarisMesh's `CircuitBreakerRule`) and fault detectors (active probes,
//! `FaultDetectRule`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ratelimit::parse_duration_ms;
use crate::model::{
    validate_name, validate_namespace_name, FieldError, MatchString, MatchType, ServiceKey, VResult,
};

/// What is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum BreakLevel {
    /// The whole service.
    Service,
    /// One method (API).
    Method,
    /// A group of instances.
    Group,
    /// Each instance on its own.
    #[default]
    Instance,
}

/// A service reference in a rule matcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceRef {
    /// Service (`*`: any).
    pub service: String,
    /// Namespace (`*`: any).
    pub namespace: String,
    /// Method (destinations only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MatchString>,
}

/// Which calls the rule watches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct RuleMatcher {
    /// Callers.
    pub source: ServiceRef,
    /// The service broken.
    pub destination: ServiceRef,
}

/// What counts as an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorCondition {
    /// `RET_CODE` or `DELAY`.
    pub input_type: String,
    /// The codes (or delay) that count.
    pub condition: MatchString,
}

/// When the circuit opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct TriggerCondition {
    /// `CONSECUTIVE_ERROR` or `ERROR_RATE`.
    pub trigger_type: String,
    /// Consecutive errors.
    pub error_count: u32,
    /// Error percentage.
    pub error_percent: u32,
    /// Statistics interval, seconds.
    pub interval: u32,
    /// Requests in the interval before the rate counts.
    pub minimum_request: u32,
}

/// When it closes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct RecoverCondition {
    /// Seconds an ejected instance stays out.
    pub sleep_window: u32,
    /// Successes needed to close (PolarisMesh's half-open probe count).
    pub consecutive_success: u32,
}

/// A toggle (`faultDetectConfig`, `fallbackConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Toggle {
    /// On.
    pub enable: bool,
}

/// A circuit-breaker rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct CircuitBreakerRule {
    /// Id (assigned at creation).
    pub id: String,
    /// Name.
    pub name: String,
    /// Namespace the rule belongs to.
    pub namespace: String,
    /// Applied.
    pub enable: bool,
    /// What is broken.
    pub level: BreakLevel,
    /// Which calls.
    pub rule_matcher: RuleMatcher,
    /// What counts as an error (default: 5xx).
    pub error_conditions: Vec<ErrorCondition>,
    /// When the circuit opens.
    pub trigger_condition: Vec<TriggerCondition>,
    /// Most instances ejected at once, percent (default 100... Envoy's default 10 is too low for
    /// small services).
    pub max_ejection_percent: u32,
    /// When it closes.
    pub recover_condition: RecoverCondition,
    /// Whether fault detectors of the service probe its instances.
    pub fault_detect_config: Toggle,
    /// A canned response while open.
    pub fallback_config: Toggle,
    /// Free text.
    pub description: String,
    /// Creation time.
    pub ctime: String,
    /// Last modification time.
    pub mtime: String,
}

/// Which errors eject an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Any 5xx (and connection failures).
    Any5xx,
    /// 502, 503, 504 (and connection failures).
    Gateway,
}

fn unsupported(field: impl Into<String>, why: &str) -> FieldError {
    FieldError::new(field, format!("cannot be expressed in Envoy: {why}"))
}

impl CircuitBreakerRule {
    /// The service broken.
    pub fn target(&self) -> ServiceKey {
        ServiceKey::new(
            &self.rule_matcher.destination.namespace,
            &self.rule_matcher.destination.service,
        )
    }

    /// Which errors count (validated).
    pub fn error_class(&self) -> ErrorClass {
        match self.error_conditions.first() {
            Some(c) if gateway_codes(&c.condition) => ErrorClass::Gateway,
            _ => ErrorClass::Any5xx,
        }
    }

    /// Checks the rule, refusing with the field and why what Envoy cannot express.
    pub fn validate(&self) -> VResult<()> {
        validate_name(&self.name, "name")?;
        validate_namespace_name(&self.namespace, "namespace")?;
        let d = &self.rule_matcher.destination;
        validate_name(&d.service, "ruleMatcher.destination.service")?;
        validate_namespace_name(&d.namespace, "ruleMatcher.destination.namespace")?;
        let s = &self.rule_matcher.source;
        if !(s.service.is_empty() || s.service == "*") {
            return Err(unsupported(
                "ruleMatcher.source.service",
                "ejection is per destination instance, for every caller (use *)",
            ));
        }
        if self.level != BreakLevel::Instance {
            return Err(unsupported(
                "level",
                "Envoy ejects instances (INSTANCE); it cannot open a whole service, group or method",
            ));
        }
        if d.method.is_some() {
            return Err(unsupported(
                "ruleMatcher.destination.method",
                "ejection counts every call of the instance, not one method's",
            ));
        }
        if self.error_conditions.len() > 1 {
            return Err(unsupported(
                "errorConditions",
                "one set of error codes per rule",
            ));
        }
        for (i, c) in self.error_conditions.iter().enumerate() {
            let at = format!("errorConditions[{i}]");
            c.condition.validate(&format!("{at}.condition"))?;
            match c.input_type.as_str() {
                "RET_CODE" => {
                    if !(gateway_codes(&c.condition) || any_5xx(&c.condition)) {
                        return Err(unsupported(
                            format!("{at}.condition"),
                            "error codes are either every 5xx (RANGE 500~599) or the gateway errors 502, 503, 504 (IN 502,503,504)",
                        ));
                    }
                }
                "DELAY" => {
                    return Err(unsupported(
                        format!("{at}.inputType"),
                        "slow calls do not eject instances (outlier detection counts errors)",
                    ))
                }
                other => {
                    return Err(FieldError::new(
                        format!("{at}.inputType"),
                        format!("{other:?} is not RET_CODE or DELAY"),
                    ))
                }
            }
        }
        if self.trigger_condition.is_empty() {
            return Err(FieldError::new("triggerCondition", "required"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.trigger_condition.iter().enumerate() {
            let at = format!("triggerCondition[{i}]");
            if !seen.insert(t.trigger_type.clone()) {
                return Err(unsupported(
                    format!("{at}.triggerType"),
                    "one condition of each type",
                ));
            }
            match t.trigger_type.as_str() {
                "CONSECUTIVE_ERROR" if t.error_count == 0 => {
                    return Err(FieldError::new(
                        format!("{at}.errorCount"),
                        "must be at least 1",
                    ))
                }
                "ERROR_RATE" if !(1..=100).contains(&t.error_percent) => {
                    return Err(FieldError::new(
                        format!("{at}.errorPercent"),
                        "must be 1..=100",
                    ))
                }
                "CONSECUTIVE_ERROR" | "ERROR_RATE" => {}
                other => {
                    return Err(FieldError::new(
                        format!("{at}.triggerType"),
                        format!("{other:?} is not CONSECUTIVE_ERROR or ERROR_RATE"),
                    ))
                }
            }
            if t.interval > 3600 {
                return Err(FieldError::new(format!("{at}.interval"), "at most 3600 s"));
            }
        }
        if self.max_ejection_percent > 100 {
            return Err(FieldError::new("maxEjectionPercent", "must be 0..=100"));
        }
        if self.recover_condition.consecutive_success > 1 {
            return Err(unsupported(
                "recoverCondition.consecutiveSuccess",
                "an ejected instance returns after the sleep window, not after probe successes",
            ));
        }
        if self.fallback_config.enable {
            return Err(unsupported(
                "fallbackConfig",
                "a canned response while the circuit is open",
            ));
        }
        Ok(())
    }
}

fn gateway_codes(m: &MatchString) -> bool {
    let mut v: Vec<&str> = m.value.split(',').map(str::trim).collect();
    v.sort();
    m.kind == MatchType::In && v == ["502", "503", "504"]
}

fn any_5xx(m: &MatchString) -> bool {
    m.kind == MatchType::Range && m.value.replace(' ', "") == "500~599"
}

/// Probe protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeProtocol {
    /// HTTP request, 2xx expected.
    #[default]
    Http,
    /// TCP connect, optionally send and expect bytes.
    Tcp,
    /// UDP.
    Udp,
}

/// A header of an HTTP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ProbeHeader {
    /// Name.
    pub key: String,
    /// Value.
    pub value: String,
}

/// An HTTP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpProbe {
    /// Method (GET).
    pub method: String,
    /// Path.
    pub url: String,
    /// Extra headers.
    pub headers: Vec<ProbeHeader>,
}

/// A TCP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpProbe {
    /// Bytes sent (text).
    pub send: String,
    /// Bytes expected back (text), any of them.
    pub receive: Vec<String>,
}

/// Active probing of a service's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultDetectRule {
    /// Id (assigned at creation).
    pub id: String,
    /// Name.
    pub name: String,
    /// Namespace the rule belongs to.
    pub namespace: String,
    /// The probed service.
    pub target_service: ServiceRef,
    /// Seconds between probes.
    pub interval: u32,
    /// Seconds a probe may take.
    pub timeout: u32,
    /// Probe another port than the instance's (0: its own).
    pub port: u32,
    /// HTTP, TCP or UDP.
    pub protocol: ProbeProtocol,
    /// HTTP probe.
    pub http_config: HttpProbe,
    /// TCP probe.
    pub tcp_config: TcpProbe,
    /// Free text.
    pub description: String,
    /// Creation time.
    pub ctime: String,
    /// Last modification time.
    pub mtime: String,
}

impl FaultDetectRule {
    /// The probed service.
    pub fn target(&self) -> ServiceKey {
        ServiceKey::new(&self.target_service.namespace, &self.target_service.service)
    }

    /// Checks the rule, refusing with the field and why what Envoy cannot express.
    pub fn validate(&self) -> VResult<()> {
        validate_name(&self.name, "name")?;
        validate_namespace_name(&self.namespace, "namespace")?;
        validate_name(&self.target_service.service, "targetService.service")?;
        validate_namespace_name(&self.target_service.namespace, "targetService.namespace")?;
        if self.target_service.method.is_some() {
            return Err(unsupported(
                "targetService.method",
                "a probe checks the instance, not one method",
            ));
        }
        if !(1..=3600).contains(&self.interval) {
            return Err(FieldError::new("interval", "1..=3600 seconds"));
        }
        if !(1..=600).contains(&self.timeout) {
            return Err(FieldError::new("timeout", "1..=600 seconds"));
        }
        if self.port != 0 {
            return Err(unsupported("port", "probes go to the instance's own port"));
        }
        match self.protocol {
            ProbeProtocol::Http => {
                if !self.http_config.url.starts_with('/') {
                    return Err(FieldError::new("httpConfig.url", "a path starting with /"));
                }
                if !matches!(
                    self.http_config.method.as_str(),
                    "" | "GET" | "HEAD" | "POST" | "PUT" | "OPTIONS"
                ) {
                    return Err(FieldError::new(
                        "httpConfig.method",
                        "GET, HEAD, POST, PUT or OPTIONS",
                    ));
                }
                for (i, h) in self.http_config.headers.iter().enumerate() {
                    if h.key.is_empty() || h.key.starts_with(':') {
                        return Err(FieldError::new(
                            format!("httpConfig.headers[{i}].key"),
                            "a header name",
                        ));
                    }
                }
            }
            ProbeProtocol::Tcp => {}
            ProbeProtocol::Udp => {
                return Err(unsupported("protocol", "Envoy probes over HTTP or TCP"))
            }
        }
        let _ = parse_duration_ms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb() -> CircuitBreakerRule {
        CircuitBreakerRule {
            name: "cb".into(),
            namespace: "default".into(),
            enable: true,
            rule_matcher: RuleMatcher {
                source: ServiceRef {
                    service: "*".into(),
                    namespace: "*".into(),
                    method: None,
                },
                destination: ServiceRef {
                    service: "echo".into(),
                    namespace: "default".into(),
                    method: None,
                },
            },
            trigger_condition: vec![TriggerCondition {
                trigger_type: "CONSECUTIVE_ERROR".into(),
                error_count: 3,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn circuit_breakers_are_checked() {
        cb().validate().unwrap();
        let f = |r: CircuitBreakerRule| r.validate().unwrap_err().field;
        assert_eq!(
            f(CircuitBreakerRule {
                level: BreakLevel::Service,
                ..cb()
            }),
            "level"
        );
        assert_eq!(
            f(CircuitBreakerRule {
                error_conditions: vec![ErrorCondition {
                    input_type: "DELAY".into(),
                    condition: MatchString::new(MatchType::Exact, "500")
                }],
                ..cb()
            }),
            "errorConditions[0].inputType"
        );
        let gw = CircuitBreakerRule {
            error_conditions: vec![ErrorCondition {
                input_type: "RET_CODE".into(),
                condition: MatchString::new(MatchType::In, "503, 502,504"),
            }],
            ..cb()
        };
        gw.validate().unwrap();
        assert_eq!(gw.error_class(), ErrorClass::Gateway);
        assert_eq!(cb().error_class(), ErrorClass::Any5xx);
        assert_eq!(
            f(CircuitBreakerRule {
                fallback_config: Toggle { enable: true },
                ..cb()
            }),
            "fallbackConfig"
        );
    }

    #[test]
    fn fault_detectors_are_checked() {
        let fd = FaultDetectRule {
            name: "fd".into(),
            namespace: "default".into(),
            target_service: ServiceRef {
                service: "echo".into(),
                namespace: "default".into(),
                method: None,
            },
            interval: 1,
            timeout: 1,
            http_config: HttpProbe {
                url: "/health".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        fd.validate().unwrap();
        let f = |r: FaultDetectRule| r.validate().unwrap_err().field;
        assert_eq!(
            f(FaultDetectRule {
                protocol: ProbeProtocol::Udp,
                ..fd.clone()
            }),
            "protocol"
        );
        assert_eq!(
            f(FaultDetectRule {
                port: 8081,
                ..fd.clone()
            }),
            "port"
        );
        assert_eq!(
            f(FaultDetectRule {
                http_config: HttpProbe::default(),
                ..fd
            }),
            "httpConfig.url"
        );
    }
}
