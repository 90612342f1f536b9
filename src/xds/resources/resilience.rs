//! Circuit breaking and fault detection on a service's clusters: circuit-breaker rules become
//! `outlier_detection` (instances ejected on consecutive errors or an error rate), the service's
//! connection limits `circuit_breakers` thresholds, and fault detectors active `health_checks`.

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    health_check::{self, payload::Payload as P, HealthChecker},
    HeaderValue, HeaderValueOption, HealthCheck, RequestMethod,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::duration_ms;
use crate::model::rules::circuitbreaker::{ErrorClass, ProbeProtocol};
use crate::model::rules::{CircuitBreakerRule, FaultDetectRule, Rule};
use crate::model::Service;

pub use crate::model::{MAX_CONNECTIONS_KEY, MAX_PENDING_KEY, MAX_REQUESTS_KEY, MAX_RETRIES_KEY};

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// Ejection of instances by a circuit-breaker rule. Envoy's defaults are overridden where they
/// would act against the rule: consecutive 5xx ejection (on by default) is off unless the rule
/// asks for it, and the error rate applies to services of any size (Envoy's default needs 5
/// hosts).
pub fn outlier_detection(r: &CircuitBreakerRule) -> OutlierDetection {
    let mut o = OutlierDetection {
        enforcing_consecutive_5xx: u32v(0),
        enforcing_consecutive_gateway_failure: u32v(0),
        enforcing_success_rate: u32v(0),
        // 0 would be Envoy's default (10%): a rule without a limit may eject every instance.
        max_ejection_percent: u32v(if r.max_ejection_percent == 0 {
            100
        } else {
            r.max_ejection_percent
        }),
        ..Default::default()
    };
    if r.recover_condition.sleep_window > 0 {
        o.base_ejection_time = Some(duration_ms(
            u64::from(r.recover_condition.sleep_window) * 1000,
        ));
    }
    let mut interval = 0;
    for t in &r.trigger_condition {
        interval = interval.max(t.interval);
        match t.trigger_type.as_str() {
            "CONSECUTIVE_ERROR" => match r.error_class() {
                ErrorClass::Any5xx => {
                    o.consecutive_5xx = u32v(t.error_count);
                    o.enforcing_consecutive_5xx = u32v(100);
                }
                ErrorClass::Gateway => {
                    o.consecutive_gateway_failure = u32v(t.error_count);
                    o.enforcing_consecutive_gateway_failure = u32v(100);
                }
            },
            "ERROR_RATE" => {
                o.failure_percentage_threshold = u32v(t.error_percent);
                o.enforcing_failure_percentage = u32v(100);
                o.failure_percentage_minimum_hosts = u32v(1);
                o.failure_percentage_request_volume = u32v(t.minimum_request.max(1));
            }
            _ => {}
        }
    }
    if interval > 0 {
        o.interval = Some(duration_ms(u64::from(interval) * 1000));
    }
    o
}

/// The cluster's connection limits from service metadata (validated at the API).
pub fn circuit_breakers(svc: &Service) -> Option<CircuitBreakers> {
    let get = |k: &str| svc.metadata.get(k).and_then(|v| v.parse::<u32>().ok());
    let t = Thresholds {
        max_connections: get(MAX_CONNECTIONS_KEY).map(|v| UInt32Value { value: v }),
        max_pending_requests: get(MAX_PENDING_KEY).map(|v| UInt32Value { value: v }),
        max_requests: get(MAX_REQUESTS_KEY).map(|v| UInt32Value { value: v }),
        max_retries: get(MAX_RETRIES_KEY).map(|v| UInt32Value { value: v }),
        ..Default::default()
    };
    (t.max_connections.is_some()
        || t.max_pending_requests.is_some()
        || t.max_requests.is_some()
        || t.max_retries.is_some())
    .then(|| CircuitBreakers {
        thresholds: vec![t],
        ..Default::default()
    })
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02X}")).collect()
}

/// An active probe from a fault detector. Probes run from the first interval on, with or without
/// traffic; an instance is unhealthy after 3 failed probes and healthy again after 1 success.
pub fn health_check(r: &FaultDetectRule) -> HealthCheck {
    let interval = duration_ms(u64::from(r.interval) * 1000);
    let checker = match r.protocol {
        ProbeProtocol::Tcp => HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck {
            send: (!r.tcp_config.send.is_empty()).then(|| health_check::Payload {
                payload: Some(P::Text(hex(&r.tcp_config.send))),
            }),
            receive: r
                .tcp_config
                .receive
                .iter()
                .map(|x| health_check::Payload {
                    payload: Some(P::Text(hex(x))),
                })
                .collect(),
            ..Default::default()
        }),
        _ => {
            let method = match r.http_config.method.as_str() {
                "HEAD" => RequestMethod::Head,
                "POST" => RequestMethod::Post,
                "PUT" => RequestMethod::Put,
                "OPTIONS" => RequestMethod::Options,
                _ => RequestMethod::Get,
            };
            HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
                path: r.http_config.url.clone(),
                method: method as i32,
                request_headers_to_add: r
                    .http_config
                    .headers
                    .iter()
                    .map(|h| HeaderValueOption {
                        header: Some(HeaderValue {
                            key: h.key.clone(),
                            value: h.value.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
    };
    HealthCheck {
        timeout: Some(duration_ms(u64::from(r.timeout) * 1000)),
        interval: Some(interval),
        no_traffic_interval: Some(interval),
        unhealthy_threshold: u32v(3),
        healthy_threshold: u32v(1),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// Applies a service's resilience rules (enabled ones) to one of its clusters.
pub fn with_resilience(mut c: Cluster, svc: &Service, rules: &[std::sync::Arc<Rule>]) -> Cluster {
    c.circuit_breakers = circuit_breakers(svc);
    let mut cbs: Vec<&CircuitBreakerRule> = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::CircuitBreaker(cb) if cb.enable => Some(cb),
            _ => None,
        })
        .collect();
    // One outlier detection per cluster: the first rule by name wins (the API says so).
    cbs.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    c.outlier_detection = cbs.first().map(|r| outlier_detection(r));
    c.health_checks = rules
        .iter()
        .filter_map(|r| match r.as_ref() {
            Rule::FaultDetect(fd) => Some(health_check(fd)),
            _ => None,
        })
        .collect();
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rules::circuitbreaker::{
        HttpProbe, RecoverCondition, RuleMatcher, ServiceRef, TriggerCondition,
    };

    fn cb(triggers: Vec<(&str, u32)>) -> CircuitBreakerRule {
        CircuitBreakerRule {
            name: "cb".into(),
            enable: true,
            rule_matcher: RuleMatcher {
                destination: ServiceRef {
                    service: "echo".into(),
                    namespace: "default".into(),
                    method: None,
                },
                ..Default::default()
            },
            trigger_condition: triggers
                .into_iter()
                .map(|(t, n)| TriggerCondition {
                    trigger_type: t.into(),
                    error_count: n,
                    error_percent: n,
                    interval: 5,
                    minimum_request: 10,
                })
                .collect(),
            recover_condition: RecoverCondition {
                sleep_window: 7,
                consecutive_success: 1,
            },
            ..Default::default()
        }
    }

    #[test]
    fn consecutive_errors_and_error_rates() {
        let o = outlier_detection(&cb(vec![("CONSECUTIVE_ERROR", 3)]));
        assert_eq!(o.consecutive_5xx, u32v(3));
        assert_eq!(o.enforcing_consecutive_5xx, u32v(100));
        assert_eq!(o.enforcing_failure_percentage, None);
        assert_eq!(o.base_ejection_time, Some(duration_ms(7000)));
        assert_eq!(o.interval, Some(duration_ms(5000)));
        assert_eq!(o.max_ejection_percent, u32v(100));
        let o = outlier_detection(&cb(vec![("ERROR_RATE", 50)]));
        assert_eq!(
            o.enforcing_consecutive_5xx,
            u32v(0),
            "Envoy's default 5xx ejection is off"
        );
        assert_eq!(o.failure_percentage_threshold, u32v(50));
        assert_eq!(o.failure_percentage_minimum_hosts, u32v(1));
        assert_eq!(o.failure_percentage_request_volume, u32v(10));
    }

    #[test]
    fn probes() {
        let fd = FaultDetectRule {
            interval: 2,
            timeout: 1,
            http_config: HttpProbe {
                url: "/health".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let h = health_check(&fd);
        assert_eq!(h.interval, Some(duration_ms(2000)));
        assert_eq!(
            h.no_traffic_interval, h.interval,
            "probes run without traffic too"
        );
        let Some(HealthChecker::HttpHealthCheck(http)) = h.health_checker else {
            panic!()
        };
        assert_eq!(http.path, "/health");
        assert_eq!(hex("PING"), "50494E47");
        let mut svc = Service::bare("default", "echo", "t");
        assert!(circuit_breakers(&svc).is_none());
        svc.metadata.insert(MAX_REQUESTS_KEY.into(), "64".into());
        let t = &circuit_breakers(&svc).unwrap().thresholds[0];
        assert_eq!(t.max_requests, u32v(64));
    }
}
