//! Admin views of the xDS layer on the REST port: `/debug/xds/nodes` and `/debug/xds/config`.

use std::sync::Arc;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use super::resources as r;
use super::server::{resources_for, Nodes};
use super::snapshot::{Cache, Res};
use super::TypeKind;
use crate::model::ServiceKey;
use crate::registry::Registry;

/// Routes of the debug views; they need no state of the router they are merged into.
pub fn routes<S: Clone + Send + Sync + 'static>(
    cache: Arc<Cache>,
    nodes: Arc<Nodes>,
    registry: Registry,
) -> Router<S> {
    let n2 = nodes.clone();
    let c2 = cache.clone();
    let r2 = registry.clone();
    Router::new()
        .route(
            "/debug/xds/nodes",
            get(move || {
                let revision = *registry.revision().borrow();
                nodes_view(nodes.clone(), c2.clone(), revision)
            }),
        )
        .route(
            "/debug/xds/config",
            get(move |q: Query<ConfigQuery>| {
                config_view(cache.clone(), n2.clone(), r2.clone(), q.0)
            }),
        )
}

async fn nodes_view(nodes: Arc<Nodes>, cache: Arc<Cache>, registry_revision: u64) -> Json<Value> {
    let list: Vec<Value> = nodes
        .list()
        .into_iter()
        .map(|s| {
            let types: serde_json::Map<String, Value> = s
                .types
                .lock()
                .iter()
                .map(|(k, v)| {
                    (
                        k.short().to_string(),
                        serde_json::to_value(v).unwrap_or_default(),
                    )
                })
                .collect();
            json!({
                "stream": s.stream,
                "protocol": s.protocol,
                "peer": s.peer.map(|p| p.to_string()),
                "node": *s.node.lock(),
                "generation": s.generation.load(std::sync::atomic::Ordering::Relaxed),
                "types": types,
            })
        })
        .collect();
    let snap = cache.current();
    Json(json!({
        "registryRevision": registry_revision,
        "snapshot": {"generation": snap.generation, "revision": cache.applied_revision(), "retiring": cache.retiring()},
        "count": list.len(),
        "nodes": list,
    }))
}

#[derive(Debug, Deserialize)]
struct ConfigQuery {
    node: Option<String>,
    /// Only this service in the translation view.
    service: Option<String>,
}

fn decoded(kind: TypeKind, r: &Res) -> String {
    let b = r.value.as_ref();
    match kind {
        TypeKind::Cluster => Cluster::decode(b).map(|m| format!("{m:?}")),
        TypeKind::Endpoint => ClusterLoadAssignment::decode(b).map(|m| format!("{m:?}")),
        TypeKind::Listener => Listener::decode(b).map(|m| format!("{m:?}")),
        TypeKind::Route => RouteConfiguration::decode(b).map(|m| format!("{m:?}")),
        TypeKind::VirtualHost => VirtualHost::decode(b).map(|m| format!("{m:?}")),
        // Key material is never shown.
        TypeKind::Secret => Ok("secret (not shown)".to_string()),
    }
    .unwrap_or_else(|e| format!("undecodable: {e}"))
}

/// How each service of the node's namespace is translated, instance by instance: which discovery
/// its cluster uses and what became of each instance (an endpoint, or why it was left out).
fn translation_view(
    cache: &Cache,
    registry: &Registry,
    namespace: &str,
    only: Option<&str>,
) -> Vec<Value> {
    let snap = cache.current();
    let Some(view) = snap.namespaces.get(namespace) else {
        return vec![];
    };
    let reg = registry.read();
    view.services
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == &***name))
        .map(|(name, sv)| {
            let instances: Vec<Value> = reg
                .services
                .get(&ServiceKey::new(namespace, &**name))
                .map(|e| {
                    e.instances
                        .values()
                        .map(|i| {
                            json!({
                                "id": i.id,
                                "host": i.host,
                                "port": i.port,
                                "state": r::translation_state(i, sv.discovery),
                                "markedAcceptMtls": r::accepts_mtls(i, sv.tls.server),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "service": &**name,
                "aliasFor": sv.service.alias_for,
                "discovery": sv.discovery,
                // What callers send and what its sidecars accept; they differ while a mode
                // change rolls out.
                "tls": {
                    "mode": sv.service.tls_mode(),
                    "client": sv.tls.client,
                    "server": sv.tls.server,
                },
                "instances": instances,
            })
        })
        .collect()
}

async fn config_view(
    cache: Arc<Cache>,
    nodes: Arc<Nodes>,
    registry: Registry,
    q: ConfigQuery,
) -> Response {
    let Some(id) = q.node.filter(|n| !n.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 400103, "info": "invalid parameter: query parameter node is required"})),
        )
            .into_response();
    };
    let info = nodes
        .list()
        .into_iter()
        .find_map(|s| s.node.lock().clone().filter(|n| n.id == id));
    let Some(info) = info else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"code": 400202, "info": format!("node {id} is not connected")})),
        )
            .into_response();
    };
    let mut by_type = serde_json::Map::new();
    for (kind, r) in resources_for(&cache, &info) {
        let entry = by_type
            .entry(kind.short().to_string())
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(a) = entry {
            a.push(json!({
                "name": &*r.name,
                "version": r.version_string(),
                "bytes": r.value.len(),
                "resource": decoded(kind, &r),
            }));
        }
    }
    let translation = translation_view(&cache, &registry, &info.namespace, q.service.as_deref());
    Json(json!({
        "node": info,
        "generation": cache.current().generation,
        "resources": by_type,
        "translation": translation,
    }))
    .into_response()
}
