//! The REST API: PolarisMesh's naming paths and JSON, `/healthz`, `/metrics` and `/openapi.json`.
//!
//! Handlers only parse, validate and translate to registry [`Command`](crate::registry::Command)s;
//! all state lives in the registry. Answers have the shapes of PolarisMesh's messages
//! ([`view`]) with its codes ([`code`]): `info` carries the code's text and, after it, which field
//! was rejected and why. Inputs accept protobuf field names as well as camelCase ones
//! ([`crate::protojson`]).

pub mod auth;
mod client;
pub mod code;
mod controller;
mod error;
pub mod grpc;
mod input;
mod naming;
mod rules;
mod tokens;
pub mod view;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use utoipa::OpenApi;

pub use error::ApiError;
pub use input::parse_json;

use crate::metrics::{InstanceGauges, Metrics};
use crate::net::{Acceptor, Peer};
use crate::registry::Registry;

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
    /// Authentication.
    pub auth: Arc<auth::Auth>,
    /// Whether the rate-limit service runs (global rate-limit rules are refused otherwise).
    pub global_limits: bool,
    /// Components' readiness (`/readyz`).
    pub ready: Arc<crate::ready::Readiness>,
}

/// Builds the router with every REST route; `extra` adds routes from other layers.
pub fn router(state: AppState, extra: Extension) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route(
            "/naming/v1/namespaces",
            get(naming::list_namespaces)
                .post(naming::create_namespaces)
                .put(naming::update_namespaces),
        )
        .route(
            "/naming/v1/namespaces/delete",
            post(naming::delete_namespaces),
        )
        .route(
            "/naming/v1/services",
            get(naming::list_services)
                .post(naming::create_services)
                .put(naming::update_services),
        )
        .route("/naming/v1/services/delete", post(naming::delete_services))
        .route("/naming/v1/service/alias", post(naming::create_alias))
        .route("/naming/v1/service/aliases", get(naming::list_aliases))
        .route(
            "/naming/v1/service/aliases/delete",
            post(naming::delete_aliases),
        )
        .route(
            "/naming/v1/instances",
            get(naming::list_instances)
                .post(naming::create_instances)
                .put(naming::update_instances),
        )
        .route(
            "/naming/v1/instances/delete",
            post(naming::delete_instances),
        )
        .route(
            "/naming/v1/groups",
            get(naming::list_groups).post(naming::put_groups),
        )
        .route("/naming/v1/groups/delete", post(naming::delete_groups))
        .route("/core/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/controller/v1/sync", post(controller::sync))
        .route(
            "/internal/v1/heartbeats",
            post(client::forwarded_heartbeats),
        )
        .route("/controller/v1/owned", get(controller::owned))
        .route("/core/v1/tokens/delete", post(tokens::revoke))
        .route("/v1/RegisterInstance", post(client::register))
        .route("/v1/DeregisterInstance", post(client::deregister))
        .route("/v1/Heartbeat", post(client::heartbeat))
        .merge(rules::routes())
        .merge(extra)
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

async fn unknown_path(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: Some(StatusCode::NOT_FOUND),
        ..ApiError::new(
            code::NOT_FOUND,
            format!("no such path: {method} {}", uri.path()),
        )
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: Some(StatusCode::METHOD_NOT_ALLOWED),
        ..ApiError::new(
            code::BAD_REQUEST,
            format!("method {method} is not allowed on {}", uri.path()),
        )
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
        code::EXECUTE_EXCEPTION
    } else {
        code::BAD_REQUEST
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
        let (stream, peer, slot) = tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = acceptor.accept() => accepted,
        };
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        acceptor.spawn(stream, peer, slot, move |io, first| {
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                first.seen();
                if let Peer::Tcp(addr) = peer {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(addr));
                }
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            // A combinator, not an `async` block, which would hold the connection twice.
            futures::FutureExt::map(
                watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned()),
                move |r| {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "REST connection ended");
                    }
                },
            )
        });
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

#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Every component is ready"),
    (status = 503, description = "A component is not ready yet: `components` says which and why")))]
async fn readyz(State(st): State<AppState>) -> Response {
    let (ok, components) = st.ready.report();
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let components: serde_json::Map<String, serde_json::Value> = components
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                None => serde_json::json!("ready"),
                Some(why) => serde_json::json!(why),
            };
            (k.to_string(), v)
        })
        .collect();
    (
        status,
        axum::Json(serde_json::json!({"ready": ok, "components": components})),
    )
        .into_response()
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
        readyz,
        metrics,
        naming::list_namespaces,
        naming::create_namespaces,
        naming::update_namespaces,
        naming::delete_namespaces,
        naming::list_services,
        naming::create_services,
        naming::update_services,
        naming::delete_services,
        naming::create_alias,
        naming::list_aliases,
        naming::delete_aliases,
        naming::list_instances,
        naming::create_instances,
        naming::update_instances,
        naming::delete_instances,
        naming::list_groups,
        naming::put_groups,
        naming::delete_groups,
        client::register,
        client::deregister,
        client::heartbeat,
        tokens::create,
        tokens::list,
        tokens::revoke
    ),
    components(schemas(
        view::NamespaceOut,
        view::ServiceOut,
        view::AliasOut,
        view::InstanceOut
    ))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_doc())
}
