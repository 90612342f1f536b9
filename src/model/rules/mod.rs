//! Governance rules: routing, rate limits, circuit breakers, fault detectors.
//!
//! Every kind is one variant of [`Rule`]; the store, the registry and the API handle rules through
//! it, so a new kind is a new variant here and its translation, nothing else. Each rule acts on one
//! service, its [`Rule::target`]: a change to the rule re-translates that service.

pub mod circuitbreaker;
pub mod ratelimit;
pub mod routing;

use serde::{Deserialize, Serialize};

pub use circuitbreaker::{CircuitBreakerRule, FaultDetectRule};
pub use ratelimit::RateLimitRule;
pub use routing::RoutingRule;

use super::{ServiceKey, VResult};

/// The kinds of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Routing (v2).
    Routing,
    /// Rate limit.
    RateLimit,
    /// Circuit breaker.
    CircuitBreaker,
    /// Fault detector (active probes).
    FaultDetect,
}

impl RuleKind {
    /// Every kind.
    pub const ALL: [RuleKind; 4] = [
        RuleKind::Routing,
        RuleKind::RateLimit,
        RuleKind::CircuitBreaker,
        RuleKind::FaultDetect,
    ];

    /// The kind [`RuleKind::as_str`] names `s`.
    pub fn parse(s: &str) -> Option<RuleKind> {
        RuleKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The store's and the logs' name.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Routing => "routing",
            RuleKind::RateLimit => "ratelimit",
            RuleKind::CircuitBreaker => "circuitbreaker",
            RuleKind::FaultDetect => "faultdetect",
        }
    }
}

/// A rule of any kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Routing.
    Routing(RoutingRule),
    /// Rate limit.
    RateLimit(RateLimitRule),
    /// Circuit breaker.
    CircuitBreaker(CircuitBreakerRule),
    /// Fault detector.
    FaultDetect(FaultDetectRule),
}

/// A rule's key: its kind and id.
pub type RuleKey = (RuleKind, String);

macro_rules! each {
    ($self:expr, $r:ident => $e:expr) => {
        match $self {
            Rule::Routing($r) => $e,
            Rule::RateLimit($r) => $e,
            Rule::CircuitBreaker($r) => $e,
            Rule::FaultDetect($r) => $e,
        }
    };
}

impl Rule {
    /// Its kind.
    pub fn kind(&self) -> RuleKind {
        match self {
            Rule::Routing(_) => RuleKind::Routing,
            Rule::RateLimit(_) => RuleKind::RateLimit,
            Rule::CircuitBreaker(_) => RuleKind::CircuitBreaker,
            Rule::FaultDetect(_) => RuleKind::FaultDetect,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        each!(self, r => &r.id)
    }

    /// Its key.
    pub fn key(&self) -> RuleKey {
        (self.kind(), self.id().to_string())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        each!(self, r => &r.name)
    }

    /// The namespace it belongs to.
    pub fn namespace(&self) -> &str {
        each!(self, r => &r.namespace)
    }

    /// The service it acts on.
    pub fn target(&self) -> ServiceKey {
        each!(self, r => r.target())
    }

    /// Whether it is applied.
    pub fn enabled(&self) -> bool {
        match self {
            Rule::Routing(r) => r.enable,
            Rule::RateLimit(r) => !r.disable,
            Rule::CircuitBreaker(r) => r.enable,
            Rule::FaultDetect(_) => true,
        }
    }

    /// Turns it on or off (a fault detector is always on: `false` is refused by the API).
    pub fn set_enabled(&mut self, on: bool) {
        match self {
            Rule::Routing(r) => r.enable = on,
            Rule::RateLimit(r) => r.disable = !on,
            Rule::CircuitBreaker(r) => r.enable = on,
            Rule::FaultDetect(_) => {}
        }
    }

    /// Checks it.
    pub fn validate(&self) -> VResult<()> {
        each!(self, r => r.validate())
    }

    /// Stamps its id and times (`ctime` kept when set).
    pub fn stamp(&mut self, id: &str, now: &str) {
        each!(self, r => {
            r.id = id.to_string();
            if r.ctime.is_empty() {
                r.ctime = now.to_string();
            }
            r.mtime = now.to_string();
        })
    }

    /// The rule as its API answers it.
    pub fn to_json(&self) -> serde_json::Value {
        each!(self, r => serde_json::to_value(r).unwrap_or_default())
    }
}
