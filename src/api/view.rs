//! What the API answers, in the shapes of PolarisMesh's messages (`polarismesh/specification`,
//! `api/v1`): the fields PolarisMesh's clients know, under their protobuf JSON names, and nothing
//! else (a client that decodes strictly fails on an unknown field). Our extensions live where
//! PolarisMesh leaves room: metadata, and the text of `info`.

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::code;
use crate::model::{Instance, Location, Namespace, Service};
use crate::registry::ServiceEntry;

/// `v1.Namespace`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamespaceOut {
    name: String,
    comment: String,
    owners: String,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    ctime: String,
    mtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_service_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_health_instance_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_instance_count: Option<u32>,
}

/// Counts shown with a namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct NamespaceCounts {
    /// Services (aliases excluded).
    pub services: u32,
    /// Healthy, not isolated instances.
    pub healthy: u32,
    /// Instances.
    pub instances: u32,
}

/// A namespace.
pub fn namespace(n: &Namespace, counts: Option<NamespaceCounts>) -> NamespaceOut {
    NamespaceOut {
        name: n.name.clone(),
        comment: n.comment.clone(),
        owners: n.owners.clone(),
        token: None,
        ctime: n.ctime.clone(),
        mtime: n.mtime.clone(),
        total_service_count: counts.map(|c| c.services),
        total_health_instance_count: counts.map(|c| c.healthy),
        total_instance_count: counts.map(|c| c.instances),
    }
}

/// A namespace just created, with its token.
pub fn new_namespace(n: &Namespace, token: String) -> NamespaceOut {
    NamespaceOut {
        token: Some(token),
        ..namespace(n, None)
    }
}

/// `v1.Service`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceOut {
    name: String,
    namespace: String,
    metadata: BTreeMap<String, String>,
    ports: String,
    business: String,
    department: String,
    cmdb_mod1: String,
    cmdb_mod2: String,
    cmdb_mod3: String,
    comment: String,
    owners: String,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    ctime: String,
    mtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_instance_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy_instance_count: Option<u32>,
}

/// A service (without counts).
pub fn service(s: &Service) -> ServiceOut {
    ServiceOut {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        metadata: s.metadata.clone(),
        ports: s.ports.clone(),
        business: s.business.clone(),
        department: s.department.clone(),
        cmdb_mod1: s.cmdb_mod1.clone(),
        cmdb_mod2: s.cmdb_mod2.clone(),
        cmdb_mod3: s.cmdb_mod3.clone(),
        comment: s.comment.clone(),
        owners: s.owners.clone(),
        token: None,
        ctime: s.ctime.clone(),
        mtime: s.mtime.clone(),
        revision: None,
        total_instance_count: None,
        healthy_instance_count: None,
    }
}

/// A service just created, with its token.
pub fn new_service(s: &Service, token: String) -> ServiceOut {
    ServiceOut {
        token: Some(token),
        ..service(s)
    }
}

/// A service as listed: with its revision and instance counts.
pub fn listed_service(e: &ServiceEntry) -> ServiceOut {
    let healthy = e
        .instances
        .values()
        .filter(|i| i.healthy && !i.isolate)
        .count();
    ServiceOut {
        revision: Some(e.revision.to_string()),
        total_instance_count: Some(e.instances.len() as u32),
        healthy_instance_count: Some(healthy as u32),
        ..service(&e.service)
    }
}

/// `v1.ServiceAlias`: `service`/`namespace` name the service it points to.
#[derive(Debug, Serialize, ToSchema)]
pub struct AliasOut {
    service: String,
    namespace: String,
    alias: String,
    alias_namespace: String,
    owners: String,
    comment: String,
    ctime: String,
    mtime: String,
}

/// An alias (a service with `alias_for`).
pub fn alias(s: &Service) -> AliasOut {
    let (tns, tsvc) = s
        .alias_for
        .as_ref()
        .map(|t| (t.namespace.clone(), t.service.clone()))
        .unwrap_or_default();
    AliasOut {
        service: tsvc,
        namespace: tns,
        alias: s.name.clone(),
        alias_namespace: s.namespace.clone(),
        owners: s.owners.clone(),
        comment: s.comment.clone(),
        ctime: s.ctime.clone(),
        mtime: s.mtime.clone(),
    }
}

/// `v1.HealthCheck`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthCheckOut {
    r#type: &'static str,
    heartbeat: HeartbeatOut,
}

/// `v1.HeartbeatHealthCheck`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatOut {
    ttl: u32,
}

/// `v1.Instance`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceOut {
    id: String,
    service: String,
    namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    vpc_id: String,
    host: String,
    port: u16,
    protocol: String,
    version: String,
    priority: u32,
    weight: u32,
    #[serde(rename = "enableHealthCheck")]
    enable_health_check: bool,
    #[serde(rename = "healthCheck", skip_serializing_if = "Option::is_none")]
    health_check: Option<HealthCheckOut>,
    healthy: bool,
    isolate: bool,
    location: Location,
    metadata: BTreeMap<String, String>,
    logic_set: String,
    ctime: String,
    mtime: String,
}

/// An instance.
pub fn instance(i: &Instance) -> InstanceOut {
    InstanceOut {
        id: i.id.clone(),
        service: i.service.clone(),
        namespace: i.namespace.clone(),
        vpc_id: i.vpc_id.clone(),
        host: i.host.clone(),
        port: i.port,
        protocol: i.protocol.clone(),
        version: i.version.clone(),
        priority: i.priority,
        weight: i.weight,
        enable_health_check: i.enable_health_check,
        health_check: i.health_check.map(|hc| HealthCheckOut {
            r#type: "HEARTBEAT",
            heartbeat: HeartbeatOut {
                ttl: hc.heartbeat.ttl,
            },
        }),
        healthy: i.healthy,
        isolate: i.isolate,
        location: i.location.clone(),
        metadata: i.metadata.clone(),
        logic_set: i.logic_set.clone(),
        ctime: i.ctime.clone(),
        mtime: i.mtime.clone(),
    }
}

/// One item's answer in a batch: `v1.Response` with the item's object under `field`.
#[derive(Debug)]
pub struct Item {
    /// Code.
    pub code: u32,
    /// Detail after the code's text, if any.
    pub detail: String,
    /// The object: (`namespace` | `service` | `instance` | `alias` | `group`, value).
    pub object: Option<(&'static str, Value)>,
}

impl Item {
    /// A success carrying `object`.
    pub fn ok(field: &'static str, object: impl Serialize) -> Item {
        Item {
            code: code::OK,
            detail: String::new(),
            object: Some((field, serde_json::to_value(object).unwrap_or_default())),
        }
    }

    /// A failure of the item (`object` echoes what it named).
    pub fn failed(code: u32, detail: String, object: Option<(&'static str, Value)>) -> Item {
        Item {
            code,
            detail,
            object,
        }
    }

    fn to_json(&self) -> Value {
        let info = if self.detail.is_empty() {
            code::info(self.code).to_string()
        } else {
            format!("{}: {}", code::info(self.code), self.detail)
        };
        let mut v = json!({"code": self.code, "info": info});
        if let Some((k, o)) = &self.object {
            v[*k] = o.clone();
        }
        v
    }
}

fn answer(code: u32, body: Value) -> Response {
    (code::http_status(code), Json(body)).into_response()
}

/// `v1.BatchWriteResponse`: the batch's code is the highest code of a failed item (as
/// PolarisMesh's `Collect`), its `info` that code's text; the HTTP status follows the code.
pub fn batch_write(items: &[Item]) -> Response {
    let code = items
        .iter()
        .map(|i| i.code)
        .filter(|c| code::http_status(*c) != axum::http::StatusCode::OK)
        .max()
        .unwrap_or(code::OK);
    answer(
        code,
        json!({
            "code": code,
            "info": code::info(code),
            "size": items.len(),
            "responses": items.iter().map(Item::to_json).collect::<Vec<_>>(),
        }),
    )
}

/// `v1.Response` of a single-object call.
pub fn single(item: &Item) -> Response {
    answer(item.code, item.to_json())
}

/// `v1.BatchQueryResponse` with `total` matches and this page of them under `field`.
pub fn batch_query(field: &'static str, total: usize, page: Vec<Value>) -> Response {
    answer(
        code::OK,
        json!({
            "code": code::OK,
            "info": code::info(code::OK),
            "amount": total,
            "size": page.len(),
            field: page,
        }),
    )
}
