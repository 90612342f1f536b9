//! The REST API: PolarisMesh-compatible paths and camelCase JSON, `/healthz`, `/metrics` and
//! `/openapi.json`.
//!
//! Handlers only parse, validate and translate to registry [`Command`]s; all state lives in the
//! registry. Every response carries PolarisMesh's `code`/`info` plus the matching HTTP status; a
//! rejected input names its field (`[2].port`) and nothing of the request is written.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::metrics::{InstanceGauges, Metrics};
use crate::model::{
    now_rfc3339, validate_name, validate_namespace_name, AliasInput, FieldError, InstanceGroup,
    InstanceInput, InstanceRef, NamespaceInput, ServiceInput, ServiceKey,
};
use crate::net::{Acceptor, FirstRequest};
use crate::registry::{self, Command, Item, Registry};

/// PolarisMesh's success code.
pub const CODE_OK: u32 = 200000;
/// Generic bad request (the body names the field).
pub const CODE_BAD_REQUEST: u32 = 400000;
/// Unparseable JSON.
pub const CODE_PARSE: u32 = 400001;
/// The resource exists / conflicts.
pub const CODE_EXISTED: u32 = 400201;
/// The resource does not exist.
pub const CODE_NOT_FOUND: u32 = 400202;
/// Server-side failure.
pub const CODE_INTERNAL: u32 = 500000;

/// Extra routes mounted by other layers (xDS debug views).
pub type Extension = Router<AppState>;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The registry.
    pub registry: Registry,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Extra gauges supplied by other layers (connected xDS streams).
    pub xds_streams: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: u32,
    info: String,
    field: Option<String>,
}

impl ApiError {
    /// 400 naming a field.
    pub fn field(e: FieldError) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: CODE_BAD_REQUEST,
            info: e.to_string(),
            field: Some(e.field),
        }
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: CODE_NOT_FOUND,
            info: format!("{} not found", what.into()),
            field: None,
        }
    }
}

impl From<registry::Error> for ApiError {
    fn from(e: registry::Error) -> Self {
        match e {
            registry::Error::Invalid(f) => ApiError::field(f),
            registry::Error::NotFound(what) => ApiError::not_found(what),
            registry::Error::Conflict(msg) => {
                let field = msg.split_once(':').map(|(f, _)| f.to_string());
                ApiError {
                    status: StatusCode::CONFLICT,
                    code: CODE_EXISTED,
                    info: msg,
                    field,
                }
            }
            e @ registry::Error::Store(_) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: CODE_INTERNAL,
                info: e.to_string(),
                field: None,
            },
            e @ registry::Error::Closed => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: CODE_INTERNAL,
                info: e.to_string(),
                field: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "info": self.info});
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// Parses a JSON body; errors name the offending field path.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Syntax before shape: `{bad` is unparseable JSON, not a map where an array was expected.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: CODE_PARSE,
            info: format!("invalid request body: {e}"),
            field: Some("body".to_string()),
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = inner.is_syntax() || inner.is_eof();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: if syntax { CODE_PARSE } else { CODE_BAD_REQUEST },
            info: format!("invalid request body: {inner}"),
            field: Some(if syntax || path == "." {
                "body".to_string()
            } else {
                path
            }),
        }
    })
}

fn ok(extra: Value) -> Response {
    let mut body = json!({"code": CODE_OK, "info": "execute success"});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    (StatusCode::OK, Json(body)).into_response()
}

fn item_json(item: &Item) -> Value {
    match item {
        Item::Namespace(n) => json!({"code": CODE_OK, "info": "execute success", "namespace": n}),
        Item::Service(s) => json!({"code": CODE_OK, "info": "execute success", "service": s}),
        Item::Instance(i) => json!({"code": CODE_OK, "info": "execute success", "instance": {
            "id": i.id, "namespace": i.namespace, "service": i.service, "host": i.host, "port": i.port,
            "healthy": i.healthy, "isolate": i.isolate, "weight": i.weight}}),
        Item::Group(g) => json!({"code": CODE_OK, "info": "execute success", "group": g}),
        Item::Missing(what) => {
            json!({"code": CODE_NOT_FOUND, "info": format!("{what} not found (nothing to delete)")})
        }
    }
}

fn batch(items: &[Item]) -> Response {
    ok(json!({"size": items.len(), "responses": items.iter().map(item_json).collect::<Vec<_>>()}))
}

fn each<T, U>(list: Vec<T>, f: impl Fn(&T) -> Result<U, FieldError>) -> Result<Vec<U>, ApiError> {
    if list.is_empty() {
        return Err(ApiError::field(FieldError::new(
            "body",
            "the request array is empty",
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| f(t).map_err(|e| ApiError::field(e.prefixed(&format!("[{i}].")))))
        .collect()
}

/// Builds the router with every REST route; `extra` adds routes from other layers.
pub fn router(state: AppState, extra: Extension) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route(
            "/naming/v1/namespaces",
            get(list_namespaces).post(create_namespaces),
        )
        .route("/naming/v1/namespaces/delete", post(delete_namespaces))
        .route(
            "/naming/v1/services",
            get(list_services)
                .post(create_services)
                .put(update_services),
        )
        .route("/naming/v1/services/delete", post(delete_services))
        .route("/naming/v1/service/alias", post(create_alias))
        .route(
            "/naming/v1/instances",
            get(list_instances)
                .post(create_instances)
                .put(update_instances),
        )
        .route("/naming/v1/instances/delete", post(delete_instances))
        .route("/naming/v1/groups", get(list_groups).post(put_groups))
        .route("/naming/v1/groups/delete", post(delete_groups))
        .route("/v1/RegisterInstance", post(client_register))
        .route("/v1/DeregisterInstance", post(client_deregister))
        .route("/v1/Heartbeat", post(client_heartbeat))
        .merge(extra)
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

async fn unknown_path(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: CODE_NOT_FOUND,
        info: format!("no such path: {method} {}", uri.path()),
        field: None,
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: CODE_BAD_REQUEST,
        info: format!("method {method} is not allowed on {}", uri.path()),
        field: None,
    }
}

/// Errors produced by the framework rather than our handlers (a body over the size limit, a
/// rejected extractor) come as plain text: give them the JSON shape of every other error, keeping
/// their status and text.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let info = match (status, text.trim()) {
        (StatusCode::PAYLOAD_TOO_LARGE, _) => {
            format!("request body larger than the limit of {} bytes", BODY_LIMIT)
        }
        (_, "") => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
        (_, t) => t.to_string(),
    };
    let code = if status.is_server_error() {
        CODE_INTERNAL
    } else {
        CODE_BAD_REQUEST
    };
    (status, Json(json!({"code": code, "info": info}))).into_response()
}

/// Largest request body (axum's default limit, which every body extractor applies).
pub const BODY_LIMIT: usize = 2 << 20;

/// Serves `app` (HTTP/1.1 and HTTP/2) on `acceptor` until `stop` turns true; then stops accepting,
/// lets in-flight requests finish and closes idle connections.
pub async fn serve(
    acceptor: Acceptor,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer, slot) = tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = acceptor.accept() => accepted,
        };
        let first = FirstRequest::default();
        let (app, seen) = (app.clone(), first.clone());
        let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            seen.seen();
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(tcp), svc)
                .into_owned(),
        );
        // A combinator, not an `async` block, which would hold the connection twice.
        let conn = futures::FutureExt::map(conn, move |r| {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "REST connection ended");
            }
        });
        tokio::spawn(acceptor.run_connection(conn, first, slot, peer));
    }
    graceful.shutdown().await;
    Ok(())
}

async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    st.metrics.observe_request(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The server is up")))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text")))]
async fn metrics(State(st): State<AppState>) -> Response {
    let mut g = InstanceGauges::default();
    {
        let reg = st.registry.read();
        g.services = reg.services.len() as u64;
        for e in reg.services.values() {
            for i in e.instances.values() {
                if i.isolate {
                    g.isolated += 1;
                } else if i.healthy {
                    g.healthy += 1;
                } else {
                    g.unhealthy += 1;
                }
            }
        }
    }
    g.xds_streams = (st.xds_streams)();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(g),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "polaris-mesh",
        description = "Service registry and xDS control plane (PolarisMesh-compatible REST API)"
    ),
    paths(
        healthz,
        metrics,
        list_namespaces,
        create_namespaces,
        delete_namespaces,
        list_services,
        create_services,
        update_services,
        delete_services,
        create_alias,
        list_instances,
        create_instances,
        update_instances,
        delete_instances,
        list_groups,
        put_groups,
        delete_groups,
        client_register,
        client_deregister,
        client_heartbeat
    ),
    components(schemas(crate::model::Instance, crate::model::Service, crate::model::Namespace))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_doc())
}

/// Paging parameters.
#[derive(Debug, Deserialize, IntoParams)]
struct Paging {
    /// First item (default 0).
    offset: Option<usize>,
    /// Page size (default 100, at most 10000).
    limit: Option<usize>,
}

impl Paging {
    fn page<T>(&self, items: impl Iterator<Item = T>) -> Result<Vec<T>, ApiError> {
        let limit = self.limit.unwrap_or(100);
        if limit > 10_000 {
            return Err(ApiError::field(FieldError::new("limit", "at most 10000")));
        }
        Ok(items.skip(self.offset.unwrap_or(0)).take(limit).collect())
    }
}

fn query<T: serde::de::DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            code: CODE_BAD_REQUEST,
            info: format!("invalid query: {}", e.body_text()),
            field: Some("query".into()),
        })
}

#[derive(Debug, Deserialize, IntoParams)]
struct NamespaceQuery {
    /// Exact name filter.
    name: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/naming/v1/namespaces", params(NamespaceQuery),
    responses((status = 200, description = "`namespaces`, `amount` (total) and `size` (this page)")))]
async fn list_namespaces(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let q: NamespaceQuery = query(&uri)?;
    let paging = Paging {
        offset: q.offset,
        limit: q.limit,
    };
    let reg = st.registry.read();
    let all: Vec<_> = reg
        .namespaces
        .values()
        .filter(|n| q.name.as_ref().is_none_or(|f| &n.name == f))
        .collect();
    let page = paging.page(all.iter())?;
    Ok(ok(
        json!({"amount": all.len(), "size": page.len(), "namespaces": page}),
    ))
}

#[utoipa::path(post, path = "/naming/v1/namespaces", request_body = Vec<NamespaceInput>,
    responses((status = 200, description = "Per-item results"), (status = 400, description = "Bad input; names the field"), (status = 409, description = "Exists")))]
async fn create_namespaces(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<NamespaceInput> = parse_json(&body)?;
    let now = now_rfc3339();
    let list = each(list, |n| n.validate(&now))?;
    let items = st.registry.submit(Command::CreateNamespaces(list)).await?;
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, ToSchema)]
struct NameRef {
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/naming/v1/namespaces/delete", request_body = Vec<NameRef>,
    responses((status = 200, description = "Per-item results"), (status = 409, description = "Namespace still has services")))]
async fn delete_namespaces(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<NameRef> = parse_json(&body)?;
    let names = each(list, |n| {
        let name = n.name.clone().unwrap_or_default();
        validate_namespace_name(&name, "name")?;
        Ok(name)
    })?;
    let items = st.registry.submit(Command::DeleteNamespaces(names)).await?;
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
struct ServiceQuery {
    /// Namespace filter.
    namespace: Option<String>,
    /// Exact name filter.
    name: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/naming/v1/services", params(ServiceQuery),
    responses((status = 200, description = "`services` with instance counts")))]
async fn list_services(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let q: ServiceQuery = query(&uri)?;
    let paging = Paging {
        offset: q.offset,
        limit: q.limit,
    };
    let reg = st.registry.read();
    let all: Vec<_> = reg
        .services
        .iter()
        .filter(|(k, _)| q.namespace.as_ref().is_none_or(|n| &k.namespace == n))
        .filter(|(k, _)| q.name.as_ref().is_none_or(|n| &k.name == n))
        .collect();
    let page: Vec<Value> = paging
        .page(all.iter())?
        .into_iter()
        .map(|(_, e)| {
            let mut v = serde_json::to_value(&*e.service).unwrap_or_default();
            v["totalInstanceCount"] = e.instances.len().into();
            v["healthyInstanceCount"] = e
                .instances
                .values()
                .filter(|i| i.healthy && !i.isolate)
                .count()
                .into();
            v["revision"] = e.revision.to_string().into();
            v
        })
        .collect();
    Ok(ok(
        json!({"amount": all.len(), "size": page.len(), "services": page}),
    ))
}

#[utoipa::path(post, path = "/naming/v1/services", request_body = Vec<ServiceInput>,
    responses((status = 200, description = "Per-item results"), (status = 400, description = "Bad input"), (status = 409, description = "Exists")))]
async fn create_services(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<ServiceInput> = parse_json(&body)?;
    let now = now_rfc3339();
    let list = each(list, |s| s.validate(&now))?;
    let items = st.registry.submit(Command::CreateServices(list)).await?;
    Ok(batch(&items))
}

#[utoipa::path(put, path = "/naming/v1/services", request_body = Vec<ServiceInput>,
    responses((status = 200, description = "Per-item results"), (status = 404, description = "No such service")))]
async fn update_services(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<ServiceInput> = parse_json(&body)?;
    let now = now_rfc3339();
    // Validate every field up front so a bad item rejects the whole request.
    each(list.clone(), |s| s.validate(&now))?;
    let items = st.registry.submit(Command::UpdateServices(list)).await?;
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, ToSchema)]
struct ServiceRef {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/naming/v1/services/delete", request_body = Vec<ServiceRef>,
    responses((status = 200, description = "Per-item results"), (status = 409, description = "Service still has instances or aliases")))]
async fn delete_services(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<ServiceRef> = parse_json(&body)?;
    let keys = each(list, |s| service_key(&s.namespace, &s.name, "name"))?;
    let items = st.registry.submit(Command::DeleteServices(keys)).await?;
    Ok(batch(&items))
}

fn service_key(
    ns: &Option<String>,
    name: &Option<String>,
    name_field: &str,
) -> Result<ServiceKey, FieldError> {
    let ns = ns.clone().unwrap_or_default();
    validate_namespace_name(&ns, "namespace")?;
    let name = name.clone().unwrap_or_default();
    validate_name(&name, name_field)?;
    Ok(ServiceKey::new(ns, name))
}

#[utoipa::path(post, path = "/naming/v1/service/alias", request_body = AliasInput,
    responses((status = 200, description = "The alias"), (status = 404, description = "No such target")))]
async fn create_alias(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let input: AliasInput = parse_json(&body)?;
    let alias = input.validate(&now_rfc3339()).map_err(ApiError::field)?;
    let items = st
        .registry
        .submit(Command::CreateAlias(Box::new(alias)))
        .await?;
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, IntoParams)]
struct InstanceQuery {
    /// Namespace (required with `service`).
    namespace: Option<String>,
    /// Service.
    service: Option<String>,
    /// Filter by health.
    healthy: Option<bool>,
    /// Filter by isolation.
    isolate: Option<bool>,
    /// Filter by host.
    host: Option<String>,
    /// Filter by port.
    port: Option<u16>,
    /// Metadata filter keys, comma separated (pairs with `values`).
    keys: Option<String>,
    /// Metadata filter values, comma separated.
    values: Option<String>,
    /// Only instances of this group (needs `service`).
    group: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/naming/v1/instances", params(InstanceQuery),
    responses((status = 200, description = "`instances`, `amount` (total) and `size` (this page)")))]
async fn list_instances(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let q: InstanceQuery = query(&uri)?;
    let paging = Paging {
        offset: q.offset,
        limit: q.limit,
    };
    let meta: Vec<(String, String)> = match (&q.keys, &q.values) {
        (None, None) => vec![],
        (Some(k), Some(v)) => {
            let ks: Vec<_> = k.split(',').collect();
            let vs: Vec<_> = v.split(',').collect();
            if ks.len() != vs.len() {
                return Err(ApiError::field(FieldError::new(
                    "values",
                    "needs as many values as keys",
                )));
            }
            ks.into_iter()
                .zip(vs)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        }
        _ => {
            return Err(ApiError::field(FieldError::new(
                "keys",
                "keys and values go together",
            )))
        }
    };
    let reg = st.registry.read();
    let mut key = None;
    if let Some(svc) = &q.service {
        let ns = q.namespace.clone().ok_or_else(|| {
            ApiError::field(FieldError::new("namespace", "is required with service"))
        })?;
        let mut k = ServiceKey::new(ns, svc);
        // An alias lists its target's instances.
        if let Some(t) = reg
            .services
            .get(&k)
            .and_then(|e| e.service.alias_for.clone())
        {
            k = ServiceKey::new(t.namespace, t.service);
        }
        key = Some(k);
    }
    let group = match (&q.group, &key) {
        (None, _) => None,
        (Some(g), Some(k)) => Some(
            reg.services
                .get(k)
                .and_then(|e| e.groups.get(g))
                .ok_or_else(|| ApiError::not_found(format!("group {g}")))?,
        ),
        (Some(_), None) => {
            return Err(ApiError::field(FieldError::new(
                "group",
                "needs namespace and service",
            )))
        }
    };
    let entries: Box<dyn Iterator<Item = &registry::ServiceEntry>> = match &key {
        Some(k) => Box::new(reg.services.get(k).into_iter()),
        None => Box::new(
            reg.services
                .iter()
                .filter(|(k, _)| q.namespace.as_ref().is_none_or(|n| &k.namespace == n))
                .map(|(_, e)| e),
        ),
    };
    let all: Vec<_> = entries
        .flat_map(|e| e.instances.values())
        .filter(|i| q.healthy.is_none_or(|h| i.healthy == h))
        .filter(|i| q.isolate.is_none_or(|h| i.isolate == h))
        .filter(|i| q.host.as_ref().is_none_or(|h| &i.host == h))
        .filter(|i| q.port.is_none_or(|p| i.port == p))
        .filter(|i| meta.iter().all(|(k, v)| i.metadata.get(k) == Some(v)))
        .filter(|i| group.is_none_or(|g| g.contains(i)))
        .collect();
    let page = paging.page(all.iter())?;
    Ok(ok(
        json!({"amount": all.len(), "size": page.len(), "instances": page}),
    ))
}

#[utoipa::path(post, path = "/naming/v1/instances", request_body = Vec<InstanceInput>,
    responses((status = 200, description = "Per-item results"), (status = 400, description = "Bad input; names the field, nothing written")))]
async fn create_instances(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<InstanceInput> = parse_json(&body)?;
    let now = now_rfc3339();
    let list = each(list, |i| i.validate(&now))?;
    let n = list.len() as u64;
    let items = st.registry.submit(Command::RegisterInstances(list)).await?;
    st.metrics.registrations.add(n);
    Ok(batch(&items))
}

#[utoipa::path(put, path = "/naming/v1/instances", request_body = Vec<InstanceInput>,
    responses((status = 200, description = "Per-item results"), (status = 404, description = "No such instance")))]
async fn update_instances(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<Value> = parse_json(&body)?;
    let list = each(list, |v| {
        let r: InstanceRef = serde_json::from_value(v.clone())
            .map_err(|e| FieldError::new("body", e.to_string()))?;
        let input: InstanceInput = serde_json::from_value(v.clone())
            .map_err(|e| FieldError::new("body", e.to_string()))?;
        Ok((r.validate()?, input))
    })?;
    let items = st.registry.submit(Command::UpdateInstances(list)).await?;
    Ok(batch(&items))
}

#[utoipa::path(post, path = "/naming/v1/instances/delete", request_body = Vec<InstanceRef>,
    responses((status = 200, description = "Per-item results (missing instances are reported, not errors)")))]
async fn delete_instances(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<InstanceRef> = parse_json(&body)?;
    let sels = each(list, |r| r.validate())?;
    let items = st
        .registry
        .submit(Command::DeregisterInstances(sels))
        .await?;
    st.metrics.deregistrations.add(
        items
            .iter()
            .filter(|i| matches!(i, Item::Instance(_)))
            .count() as u64,
    );
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, IntoParams)]
struct GroupQuery {
    /// Namespace.
    namespace: Option<String>,
    /// Service.
    service: Option<String>,
}

#[utoipa::path(get, path = "/naming/v1/groups", params(GroupQuery),
    responses((status = 200, description = "`groups` of the service")))]
async fn list_groups(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let q: GroupQuery = query(&uri)?;
    let key = service_key(&q.namespace, &q.service, "service").map_err(ApiError::field)?;
    let reg = st.registry.read();
    let e = reg
        .services
        .get(&key)
        .ok_or_else(|| ApiError::not_found(format!("service {key}")))?;
    let groups: Vec<_> = e.groups.values().collect();
    Ok(ok(
        json!({"amount": groups.len(), "size": groups.len(), "groups": groups}),
    ))
}

#[utoipa::path(post, path = "/naming/v1/groups", request_body = Vec<InstanceGroup>,
    responses((status = 200, description = "Per-item results"), (status = 400, description = "Bad matcher")))]
async fn put_groups(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<InstanceGroup> = parse_json(&body)?;
    let list = each(list, |g| g.validate().map(|_| g.clone()))?;
    let items = st.registry.submit(Command::PutGroups(list)).await?;
    Ok(batch(&items))
}

#[derive(Debug, Deserialize, ToSchema)]
struct GroupRef {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/naming/v1/groups/delete", request_body = Vec<GroupRef>,
    responses((status = 200, description = "Per-item results")))]
async fn delete_groups(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let list: Vec<GroupRef> = parse_json(&body)?;
    let refs = each(list, |g| {
        let key = service_key(&g.namespace, &g.service, "service")?;
        let name = g.name.clone().unwrap_or_default();
        validate_name(&name, "name")?;
        Ok((key, name))
    })?;
    let items = st.registry.submit(Command::DeleteGroups(refs)).await?;
    Ok(batch(&items))
}

#[utoipa::path(post, path = "/v1/RegisterInstance", request_body = InstanceInput,
    responses((status = 200, description = "`instance` with its id"), (status = 400, description = "Bad input")))]
async fn client_register(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let input: InstanceInput = parse_json(&body)?;
    let inst = input.validate(&now_rfc3339()).map_err(ApiError::field)?;
    let items = st
        .registry
        .submit(Command::RegisterInstances(vec![inst]))
        .await
        .map_err(strip_index)?;
    st.metrics.registrations.inc();
    Ok(single(&items))
}

#[utoipa::path(post, path = "/v1/DeregisterInstance", request_body = InstanceRef,
    responses((status = 200, description = "Deregistered"), (status = 404, description = "No such instance")))]
async fn client_deregister(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let r: InstanceRef = parse_json(&body)?;
    let sel = r.validate().map_err(ApiError::field)?;
    let items = st
        .registry
        .submit(Command::DeregisterInstances(vec![sel]))
        .await?;
    if let Some(Item::Missing(what)) = items.first() {
        return Err(ApiError::not_found(format!("instance {what}")));
    }
    st.metrics.deregistrations.inc();
    Ok(single(&items))
}

#[utoipa::path(post, path = "/v1/Heartbeat", request_body = InstanceRef,
    responses((status = 200, description = "Accepted"), (status = 404, description = "No such instance")))]
async fn client_heartbeat(State(st): State<AppState>, body: Bytes) -> ApiResult {
    let r: InstanceRef = parse_json(&body)?;
    let sel = r.validate().map_err(ApiError::field)?;
    let id = st.registry.heartbeat(&sel).await?;
    Ok(ok(json!({"instance": {"id": id}})))
}

fn single(items: &[Item]) -> Response {
    let mut v = items.first().map(item_json).unwrap_or_else(|| json!({}));
    if let Value::Object(m) = &mut v {
        m.remove("code");
        m.remove("info");
    }
    ok(v)
}

/// Single-instance client calls report `port`, not `[0].port`.
fn strip_index(e: registry::Error) -> registry::Error {
    match e {
        registry::Error::Invalid(mut f) => {
            if let Some(rest) = f.field.strip_prefix("[0].") {
                f.field = rest.to_string();
            }
            registry::Error::Invalid(f)
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_are_parse_errors_whatever_shape_is_expected() {
        let e = parse_json::<Vec<NamespaceInput>>(b"{bad").unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), (CODE_PARSE, Some("body")));
        let e = parse_json::<Vec<NamespaceInput>>(b"[{\"name\": 1}").unwrap_err();
        assert_eq!(e.code, CODE_PARSE);
        // Well-formed JSON of the wrong shape is a bad request naming where.
        let e = parse_json::<Vec<NamespaceInput>>(b"{}").unwrap_err();
        assert_eq!(e.code, CODE_BAD_REQUEST);
        let e = parse_json::<Vec<NamespaceInput>>(b"[{\"name\": 1}]").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (CODE_BAD_REQUEST, Some("[0].name"))
        );
    }
}
