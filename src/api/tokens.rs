//! Access tokens (ours; PolarisMesh has users, groups and strategies instead): admins create them
//! (the secret is answered once), list them (never a secret or hash) and revoke them.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::auth::{self, Access, Principal};
use super::code::Entity;
use super::error::ApiError;
use super::input::{each, parse_batch};
use super::view::{self, Item as Answer};
use super::AppState;
use crate::model::{new_token, now_rfc3339, AccessToken, FieldError, TokenInput, TokenScope};
use crate::registry::{Command, Item};

type ApiResult = Result<Response, ApiError>;

/// A token as listed (and, with `secret`, as created).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenOut {
    /// Id.
    pub id: String,
    /// Holder.
    pub name: String,
    /// `admin`, `write` or `read`.
    pub role: &'static str,
    /// With `write`: where it may write.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Creation time.
    pub ctime: String,
    /// The secret: only in the answer that creates the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn out(t: &AccessToken, secret: Option<String>) -> TokenOut {
    let (role, namespaces) = match &t.scope {
        TokenScope::Admin => ("admin", vec![]),
        TokenScope::Write { namespaces } => ("write", namespaces.clone()),
        TokenScope::Read => ("read", vec![]),
    };
    TokenOut {
        id: t.id.clone(),
        name: t.name.clone(),
        role,
        namespaces,
        ctime: t.ctime.clone(),
        secret,
    }
}

/// `POST /core/v1/tokens` (admin).
#[utoipa::path(post, path = "/core/v1/tokens", request_body = Vec<TokenInput>,
    responses((status = 200, description = "BatchWriteResponse; each `token` carries its `secret`, shown only here"),
              (status = 403, description = "Not an admin token")))]
pub(super) async fn create(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin, &st.metrics)
        .map_err(ApiError::in_batch)?;
    let list: Vec<TokenInput> = parse_batch(&body, Entity::Other)?;
    let now = now_rfc3339();
    let made = each(list, Entity::Other, |t| {
        let (secret, hash) = new_token();
        Ok((t.validate(hash, &now)?, secret))
    })?;
    let (tokens, secrets): (Vec<_>, Vec<_>) = made.into_iter().unzip();
    let items = auth::write(&st.registry, &st.metrics, &who, Command::PutTokens(tokens))
        .await
        .map_err(|e| e.into_api(Entity::Other).in_batch())?;
    let answers: Vec<Answer> = items
        .into_iter()
        .zip(secrets)
        .map(|(item, secret)| match item {
            Item::Token(t) => Answer::ok("token", out(&t, Some(secret))),
            _ => Answer::ok("token", json!({})),
        })
        .collect();
    Ok(view::batch_write(&answers))
}

/// `GET /core/v1/tokens` (admin): every token, without secrets.
#[utoipa::path(get, path = "/core/v1/tokens",
    responses((status = 200, description = "BatchQueryResponse with `tokens`"), (status = 403, description = "Not an admin token")))]
pub(super) async fn list(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
) -> ApiResult {
    who.require(Access::Admin, &st.metrics)?;
    let tokens: Vec<serde_json::Value> = st
        .registry
        .read()
        .tokens
        .values()
        .map(|t| serde_json::to_value(out(t, None)).unwrap_or_default())
        .collect();
    Ok(view::batch_query("tokens", tokens.len(), tokens))
}

#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct TokenRef {
    #[serde(default)]
    id: Option<String>,
}

/// `POST /core/v1/tokens/delete` (admin): revokes at once.
#[utoipa::path(post, path = "/core/v1/tokens/delete", request_body = Vec<TokenRef>,
    responses((status = 200, description = "BatchWriteResponse (a missing token is a success)")))]
pub(super) async fn revoke(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin, &st.metrics)
        .map_err(ApiError::in_batch)?;
    let list: Vec<TokenRef> = parse_batch(&body, Entity::Other)?;
    let ids = each(list, Entity::Other, |r| {
        r.id.clone()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| FieldError::new("id", "required"))
    })?;
    let items = auth::write(
        &st.registry,
        &st.metrics,
        &who,
        Command::RevokeTokens(ids.clone()),
    )
    .await
    .map_err(|e| e.into_api(Entity::Other).in_batch())?;
    let answers: Vec<Answer> = items
        .into_iter()
        .zip(ids)
        .map(|(item, id)| match item {
            Item::Token(t) => Answer::ok("token", out(&t, None)),
            _ => Answer::ok("token", json!({ "id": id })),
        })
        .collect();
    Ok(view::batch_write(&answers))
}
