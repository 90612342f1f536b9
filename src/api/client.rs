//! PolarisMesh's client calls: one instance per request, answered with a `Response`. The calls
//! themselves (validation, authorization, the registry write) are shared by the HTTP paths here and
//! the gRPC API ([`super::grpc`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::json;

use super::auth::{self, Principal};
use super::code::Entity;
use super::error::ApiError;
use super::input::parse_json;
use super::view::{self, Item as Answer};
use super::AppState;
use crate::model::{now_rfc3339, Instance, InstanceInput, InstanceRef};
use crate::registry::{Command, Item};

type ApiResult = Result<Response, ApiError>;

fn one(item: Item, echo: serde_json::Value) -> Answer {
    match item {
        Item::Instance(i) => Answer::ok("instance", view::instance(&i)),
        Item::Rejected { reason, detail } => Answer::failed(
            super::code::for_rejection(reason),
            detail,
            Some(("instance", echo)),
        ),
        _ => Answer::ok("instance", echo),
    }
}

/// Validates an instance to register, naming the field it got wrong.
pub(super) fn validate_instance(input: InstanceInput) -> Result<Instance, ApiError> {
    input
        .validate(&now_rfc3339())
        .map_err(|e| ApiError::field(Entity::Instance, e))
}

/// Registers one instance: the registry's item for it (the instance, or why it was rejected).
pub(super) async fn register_instance(
    st: &AppState,
    who: &Principal,
    inst: Instance,
) -> Result<Item, ApiError> {
    let items = auth::write(
        &st.registry,
        &st.metrics,
        who,
        Command::RegisterInstances(vec![inst]),
    )
    .await
    .map_err(|e| match e {
        auth::Refused::Registry(e) => ApiError::registry(Entity::Instance, strip_index(e)),
        e => e.into_api(Entity::Instance),
    })?;
    st.metrics.registrations.inc();
    Ok(items.into_iter().next().expect("one item"))
}

/// Deregisters one instance (also when it did not exist).
pub(super) async fn deregister_instance(
    st: &AppState,
    who: &Principal,
    r: &InstanceRef,
) -> Result<Item, ApiError> {
    let sel = r
        .validate()
        .map_err(|e| ApiError::field(Entity::Instance, e))?;
    let items = auth::write(
        &st.registry,
        &st.metrics,
        who,
        Command::DeregisterInstances(vec![sel]),
    )
    .await
    .map_err(|e| e.into_api(Entity::Instance))?;
    let item = items.into_iter().next().expect("one item");
    if matches!(item, Item::Instance(_)) {
        st.metrics.deregistrations.inc();
    }
    Ok(item)
}

/// Records a heartbeat of one instance (in memory); answers the instance's id.
pub(super) async fn heartbeat_instance(
    st: &AppState,
    who: &Principal,
    r: &InstanceRef,
) -> Result<String, ApiError> {
    let sel = r
        .validate()
        .map_err(|e| ApiError::field(Entity::Instance, e))?;
    // Heartbeats are liveness, not configuration: checked, not audited.
    if *who != Principal::Anyone {
        let key = auth::selector_service(&sel, &st.registry.read());
        if let Some(key) = key {
            who.require(auth::Access::Instances(&key), &st.metrics)?;
        }
    }
    st.registry
        .heartbeat(&sel)
        .await
        .map_err(|e| ApiError::registry(Entity::Instance, e))
}

/// `POST /v1/RegisterInstance`.
#[utoipa::path(post, path = "/v1/RegisterInstance", request_body = InstanceInput,
    responses((status = 200, description = "Response with the `instance` and its id"), (status = 400, description = "Bad input")))]
pub(super) async fn register(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let input: InstanceInput = parse_json(&body, Entity::Instance)?;
    let inst = validate_instance(input)?;
    let echo = json!({"namespace": inst.namespace, "service": inst.service, "host": inst.host, "port": inst.port});
    let item = register_instance(&st, &who, inst).await?;
    Ok(view::single(&one(item, echo)))
}

/// `POST /v1/DeregisterInstance`.
#[utoipa::path(post, path = "/v1/DeregisterInstance", request_body = InstanceRef,
    responses((status = 200, description = "Deregistered (also when it did not exist)")))]
pub(super) async fn deregister(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let r: InstanceRef = parse_json(&body, Entity::Instance)?;
    let echo = json!({"id": r.id, "namespace": r.namespace, "service": r.service, "host": r.host, "port": r.port});
    let item = deregister_instance(&st, &who, &r).await?;
    Ok(view::single(&one(item, echo)))
}

/// `POST /v1/Heartbeat`: only the beat time is recorded, in memory.
#[utoipa::path(post, path = "/v1/Heartbeat", request_body = InstanceRef,
    responses((status = 200, description = "Accepted"), (status = 400, description = "No such instance (400202), or it has no heartbeat check (400141)")))]
pub(super) async fn heartbeat(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let r: InstanceRef = parse_json(&body, Entity::Instance)?;
    let id = heartbeat_instance(&st, &who, &r).await?;
    Ok(view::single(&Answer::ok("instance", json!({"id": id}))))
}

/// `POST /internal/v1/heartbeats` (cluster mode; admin when authentication is on): heartbeats
/// another replica forwards to this one, the owner of their instances. Recorded here, never
/// forwarded again.
pub(super) async fn forwarded_heartbeats(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(auth::Access::Admin, &st.metrics)?;
    let beats: crate::cluster::Beats = parse_json(&body, Entity::Instance)?;
    let mut results = Vec::with_capacity(beats.ids.len());
    for id in beats.ids {
        results.push(
            st.registry
                .heartbeat_local(id)
                .await
                .err()
                .map(|e| e.to_string()),
        );
    }
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        crate::cluster::BeatResults { results },
    )))
}

/// Single-instance calls report `port`, not `[0].port`.
fn strip_index(e: crate::registry::Error) -> crate::registry::Error {
    match e {
        crate::registry::Error::Invalid(mut f) => {
            if let Some(rest) = f.field.strip_prefix("[0].") {
                f.field = rest.to_string();
            }
            crate::registry::Error::Invalid(f)
        }
        e => e,
    }
}
