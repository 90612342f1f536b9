//! The writes of a standalone Kubernetes controller (`polaris controller`, ours): it sends each
//! Service's desired state, and the server plans and applies the difference against its own
//! registry (`controller::target::Local`), changing only what that cluster owns. Admin only: a
//! controller may delete what its cluster owns in any namespace.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::auth::{Access, Principal};
use super::code::Entity;
use super::error::ApiError;
use super::input::parse_json;
use super::AppState;
use crate::controller::target::{Local, OwnedAnswer, SyncRequest};
use crate::controller::translate;
use crate::model::FieldError;

type ApiResult = Result<Response, ApiError>;

fn cluster(name: &str) -> Result<translate::Config, ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::field(
            Entity::Other,
            FieldError::new("clusterName", "required"),
        ));
    }
    Ok(translate::Config {
        cluster_name: name.to_string(),
        mode: translate::SyncMode::All,
    })
}

/// `POST /controller/v1/sync` (admin): `{clusterName, items: [{service, desired}]}`; answers
/// `{writes, foreign, failed}`. Every item is checked before any is applied.
pub(super) async fn sync(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin, &st.metrics)?;
    let req: SyncRequest = parse_json(&body, Entity::Other)?;
    let cfg = cluster(&req.cluster_name)?;
    for (i, item) in req.items.iter().enumerate() {
        let Some(d) = &item.desired else { continue };
        if d.namespace != item.service.namespace || d.name != item.service.name {
            return Err(ApiError::field(
                Entity::Other,
                FieldError::new(
                    format!("items[{i}].desired"),
                    format!(
                        "is {}/{}, not the item's service {}",
                        d.namespace, d.name, item.service
                    ),
                ),
            ));
        }
        let mine = |m: &std::collections::BTreeMap<String, String>| translate::owned(&cfg, m);
        if !mine(&d.metadata) {
            return Err(ApiError::field(
                Entity::Other,
                FieldError::new(
                    format!("items[{i}].desired.metadata"),
                    "lacks this cluster's ownership keys (source=kubernetes, clusterName)",
                ),
            ));
        }
        if let Some(j) = d
            .instances
            .iter()
            .position(|inst| !inst.metadata.as_ref().is_some_and(mine))
        {
            return Err(ApiError::field(
                Entity::Other,
                FieldError::new(
                    format!("items[{i}].desired.instances[{j}].metadata"),
                    "lacks this cluster's ownership keys (source=kubernetes, clusterName)",
                ),
            ));
        }
    }
    let local = Local {
        registry: st.registry.clone(),
        metrics: st.metrics.clone(),
    };
    let out = local.sync_items(&cfg, req.items).await;
    if !out.failed.is_empty() {
        tracing::warn!(cluster = %cfg.cluster_name, failed = out.failed.len(), "controller sync: some services not synced");
    }
    Ok(Json(out).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct OwnedQuery {
    #[serde(default)]
    cluster_name: String,
}

/// `GET /controller/v1/owned?clusterName=` (admin): the services (not aliases) that cluster owns,
/// or owns instances of.
pub(super) async fn owned(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<OwnedQuery>,
) -> ApiResult {
    who.require(Access::Admin, &st.metrics)?;
    let cfg = cluster(&q.cluster_name)?;
    let local = Local {
        registry: st.registry.clone(),
        metrics: st.metrics.clone(),
    };
    Ok(Json(OwnedAnswer {
        services: local.owned_keys(&cfg),
    })
    .into_response())
}
