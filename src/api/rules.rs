//! Governance rules on PolarisMesh's paths: routing (`/naming/v2/routings`), rate limits
//! (`/naming/v1/ratelimits`), circuit breakers (`/naming/v1/circuitbreaker/rules`) and fault
//! detectors (`/naming/v1/faultdetectors`). One set of handlers serves every kind: create (ids are
//! assigned), update by id, delete, enable or disable, list. Every item is validated before any is
//! written; what Envoy cannot express is refused naming the field.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{post, put};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Principal};
use super::code::{self, Entity};
use super::error::ApiError;
use super::input::{each, parse_batch, Params};
use super::view::{self, Item as Answer};
use super::AppState;
use crate::model::rules::{
    CircuitBreakerRule, FaultDetectRule, RateLimitRule, RoutingRule, Rule, RuleKind,
};
use crate::model::{now_rfc3339, random_id, FieldError};
use crate::registry::{Command, Item};

type ApiResult = Result<Response, ApiError>;

/// Where each kind lives and how its answers name it.
struct Paths {
    kind: RuleKind,
    base: &'static str,
    /// The object's field in a write answer.
    item: &'static str,
    /// The list's field in a query answer.
    list: &'static str,
}

const KINDS: [Paths; 4] = [
    Paths {
        kind: RuleKind::Routing,
        base: "/naming/v2/routings",
        item: "data",
        list: "data",
    },
    Paths {
        kind: RuleKind::RateLimit,
        base: "/naming/v1/ratelimits",
        item: "rateLimit",
        list: "rateLimits",
    },
    Paths {
        kind: RuleKind::CircuitBreaker,
        base: "/naming/v1/circuitbreaker/rules",
        item: "data",
        list: "data",
    },
    Paths {
        kind: RuleKind::FaultDetect,
        base: "/naming/v1/faultdetectors",
        item: "data",
        list: "data",
    },
];

fn paths(kind: RuleKind) -> &'static Paths {
    KINDS.iter().find(|p| p.kind == kind).expect("every kind")
}

/// The routes of every kind.
pub(super) fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for p in &KINDS {
        let k = p.kind;
        r = r
            .route(
                p.base,
                axum::routing::get(move |st, uri| list(st, uri, k))
                    .post(move |st, who, body| write(st, who, body, k, true))
                    .put(move |st, who, body| write(st, who, body, k, false)),
            )
            .route(
                &format!("{}/delete", p.base),
                post(move |st, who, body| delete(st, who, body, k)),
            );
        if k != RuleKind::FaultDetect {
            r = r.route(
                &format!("{}/enable", p.base),
                put(move |st, who, body| enable(st, who, body, k)),
            );
        }
    }
    r
}

fn parse(body: &[u8], kind: RuleKind) -> Result<Vec<Rule>, ApiError> {
    Ok(match kind {
        RuleKind::Routing => parse_batch::<RoutingRule>(body, Entity::Other)?
            .into_iter()
            .map(Rule::Routing)
            .collect(),
        RuleKind::RateLimit => parse_batch::<RateLimitRule>(body, Entity::Other)?
            .into_iter()
            .map(Rule::RateLimit)
            .collect(),
        RuleKind::CircuitBreaker => parse_batch::<CircuitBreakerRule>(body, Entity::Other)?
            .into_iter()
            .map(Rule::CircuitBreaker)
            .collect(),
        RuleKind::FaultDetect => parse_batch::<FaultDetectRule>(body, Entity::Other)?
            .into_iter()
            .map(Rule::FaultDetect)
            .collect(),
    })
}

fn answers(items: Vec<Item>, field: &'static str, echo: Vec<Value>) -> Vec<Answer> {
    items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| match item {
            Item::Rule(r) => Answer::ok(field, r.to_json()),
            Item::Rejected { reason, detail } => {
                Answer::failed(code::for_rejection(reason), detail, Some((field, echo)))
            }
            _ => Answer::ok(field, echo),
        })
        .collect()
}

async fn write(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
    kind: RuleKind,
    create: bool,
) -> ApiResult {
    let list = parse(&body, kind)?;
    let now = now_rfc3339();
    let global = st.global_limits;
    let rules = each(list, Entity::Other, |r| {
        let mut r = r.clone();
        let id = if create {
            random_id()
        } else if r.id().is_empty() {
            return Err(FieldError::new("id", "required to update a rule"));
        } else {
            r.id().to_string()
        };
        r.stamp(&id, &now);
        r.validate()?;
        if let Rule::RateLimit(l) = &r {
            if l.kind == crate::model::rules::ratelimit::LimitType::Global && !global {
                return Err(FieldError::new(
                    "type",
                    "GLOBAL needs the rate-limit service, which this server does not run (--rls-addr)",
                ));
            }
        }
        Ok(r)
    })?;
    let echo: Vec<Value> = rules.iter().map(Rule::to_json).collect();
    let items = auth::write(
        &st.registry,
        &st.metrics,
        &who,
        Command::PutRules { rules, create },
    )
    .await
    .map_err(|e| e.into_api(Entity::Other).in_batch())?;
    Ok(view::batch_write(&answers(items, paths(kind).item, echo)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    enable: Option<bool>,
    #[serde(default)]
    disable: Option<bool>,
}

fn ids(refs: &[RuleRef]) -> Result<Vec<String>, ApiError> {
    each(refs.iter().collect(), Entity::Other, |r: &&RuleRef| {
        r.id.clone()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| FieldError::new("id", "required"))
    })
}

async fn delete(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
    kind: RuleKind,
) -> ApiResult {
    let refs: Vec<RuleRef> = parse_batch(&body, Entity::Other)?;
    let ids = ids(&refs)?;
    let echo = ids.iter().map(|i| json!({ "id": i })).collect();
    let keys = ids.into_iter().map(|i| (kind, i)).collect();
    let items = auth::write(&st.registry, &st.metrics, &who, Command::DeleteRules(keys))
        .await
        .map_err(|e| e.into_api(Entity::Other).in_batch())?;
    Ok(view::batch_write(&answers(items, paths(kind).item, echo)))
}

async fn enable(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
    kind: RuleKind,
) -> ApiResult {
    let refs: Vec<RuleRef> = parse_batch(&body, Entity::Other)?;
    let ids = ids(&refs)?;
    let list = each(refs.iter().zip(ids).collect(), Entity::Other, |(r, id)| {
        let on = match (r.enable, r.disable) {
            (Some(e), None) => e,
            (None, Some(d)) => !d,
            (Some(e), Some(d)) if e != d => e,
            _ => return Err(FieldError::new("enable", "give enable (or disable)")),
        };
        Ok(((kind, id.clone()), on))
    })?;
    let echo = list.iter().map(|((_, i), _)| json!({ "id": i })).collect();
    let items = auth::write(&st.registry, &st.metrics, &who, Command::EnableRules(list))
        .await
        .map_err(|e| e.into_api(Entity::Other).in_batch())?;
    Ok(view::batch_write(&answers(items, paths(kind).item, echo)))
}

/// `GET`: `id`, `name`, `namespace` (of the rule), `service` and `serviceNamespace` (of the
/// service it acts on), `offset`, `limit`.
async fn list(State(st): State<AppState>, uri: axum::http::Uri, kind: RuleKind) -> ApiResult {
    let p = Params::of(&uri);
    let (offset, limit) = p.page()?;
    let reg = st.registry.read();
    let matching: Vec<Value> = reg
        .rules
        .range((kind, String::new())..)
        .take_while(|((k, _), _)| *k == kind)
        .map(|(_, r)| r)
        .filter(|r| {
            let t = r.target();
            p.get("id").is_none_or(|v| v == r.id())
                && p.get("name").is_none_or(|v| v == r.name())
                && p.get("namespace").is_none_or(|v| v == r.namespace())
                && p.get("service").is_none_or(|v| v == t.name)
                && p.get("serviceNamespace").is_none_or(|v| v == t.namespace)
        })
        .map(|r| r.to_json())
        .collect();
    let total = matching.len();
    let page = matching.into_iter().skip(offset).take(limit).collect();
    Ok(view::batch_query(paths(kind).list, total, page))
}
