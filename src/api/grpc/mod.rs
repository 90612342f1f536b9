//! PolarisMesh's gRPC client API, `v1.PolarisGRPC` (default port 8091): what polaris-go and
//! polaris-java use for their hot calls. `ReportClient`, `RegisterInstance`,
//! `DeregisterInstance` and `Heartbeat` go through the same validation, authorization and registry
//! path as the HTTP client calls ([`super::client`]); `Discover` answers instances, services and
//! namespaces from the registry's state.
//!
//! Errors are PolarisMesh's: a `Response` (or `DiscoverResponse`) whose `code` is the same code the
//! REST API answers and whose `info` names the field, never a failed call; gRPC statuses are left
//! to what PolarisMesh's clients also treat as transport failures (a message that does not
//! decode). The message types are generated from `proto/polaris/v1` (`scripts/gen-proto.sh`).

#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod v1;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Status};
use xxhash_rust::xxh3::Xxh3;

use super::auth::Principal;
use super::client;
use super::code;
use super::error::ApiError;
use super::AppState;
use crate::model::{HealthCheckInput, HeartbeatInput, InstanceInput, InstanceRef, ServiceKey};
use crate::registry::{Item, ServiceEntry};
use v1::discover_request::DiscoverRequestType as Kind;
use v1::discover_response::DiscoverResponseType as AnswerKind;
use v1::polaris_grpc_server::{PolarisGrpc, PolarisGrpcServer};

/// Largest message accepted: a registration or a discovery request is a few hundred bytes.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Serves the API on `listener` until `stop` turns true.
pub async fn serve(
    st: AppState,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    // The builder's `tcp_nodelay` applies only to listeners it binds itself: without it, small
    // answers wait on Nagle's algorithm for the peer's delayed ACK (40 ms stalls).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(
            PolarisGrpcServer::new(Api { st })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

struct Api {
    st: AppState,
}

type Answer = Result<tonic::Response<v1::Response>, Status>;

fn reply(code: u32, info: String, instance: Option<v1::Instance>) -> Answer {
    Ok(tonic::Response::new(v1::Response {
        code: Some(code),
        info: Some(info),
        instance,
        ..Default::default()
    }))
}

fn refused(e: ApiError, instance: Option<v1::Instance>) -> Answer {
    reply(e.code, e.info(), instance)
}

impl Api {
    /// Who makes the call: its `x-polaris-token` metadata, else the token in the message
    /// (PolarisMesh's clients put the service token in `service_token`).
    fn principal<T>(
        &self,
        req: &Request<T>,
        in_message: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let secret = req
            .metadata()
            .get("x-polaris-token")
            .and_then(|v| v.to_str().ok())
            .or(in_message);
        self.st
            .auth
            .check(secret, req.remote_addr().as_ref().map(SocketAddr::ip))
    }
}

#[tonic::async_trait]
impl PolarisGrpc for Api {
    async fn report_client(&self, req: Request<v1::Client>) -> Answer {
        if let Err(e) = self.principal(&req, None) {
            return refused(e, None);
        }
        let peer = req.remote_addr();
        let mut c = req.into_inner();
        // PolarisMesh answers with the client as it saw it: its host, or the peer's address.
        if c.host.as_deref().is_none_or(str::is_empty) {
            c.host = peer.map(|p| p.ip().to_string());
        }
        Ok(tonic::Response::new(v1::Response {
            code: Some(code::OK),
            info: Some(code::info(code::OK).into()),
            client: Some(c),
            ..Default::default()
        }))
    }

    async fn register_instance(&self, req: Request<v1::Instance>) -> Answer {
        let who = match self.principal(&req, req.get_ref().service_token.as_deref()) {
            Ok(w) => w,
            Err(e) => return refused(e, Some(echo(req.get_ref()))),
        };
        let msg = req.into_inner();
        let echoed = echo(&msg);
        let inst = match client::validate_instance(instance_input(msg)) {
            Ok(i) => i,
            Err(e) => return refused(e, Some(echoed)),
        };
        match client::register_instance(&self.st, &who, inst).await {
            Ok(item) => item_answer(item, echoed),
            Err(e) => refused(e, Some(echoed)),
        }
    }

    async fn deregister_instance(&self, req: Request<v1::Instance>) -> Answer {
        let who = match self.principal(&req, req.get_ref().service_token.as_deref()) {
            Ok(w) => w,
            Err(e) => return refused(e, Some(echo(req.get_ref()))),
        };
        let msg = req.into_inner();
        match client::deregister_instance(&self.st, &who, &instance_ref(&msg)).await {
            Ok(item) => item_answer(item, echo(&msg)),
            Err(e) => refused(e, Some(echo(&msg))),
        }
    }

    async fn heartbeat(&self, req: Request<v1::Instance>) -> Answer {
        let who = match self.principal(&req, req.get_ref().service_token.as_deref()) {
            Ok(w) => w,
            Err(e) => return refused(e, Some(echo(req.get_ref()))),
        };
        let msg = req.get_ref();
        match client::heartbeat_instance(&self.st, &who, &instance_ref(msg)).await {
            Ok(id) => {
                let mut e = echo(msg);
                e.id = Some(id);
                reply(code::OK, code::info(code::OK).into(), Some(e))
            }
            Err(e) => refused(e, Some(echo(msg))),
        }
    }

    type DiscoverStream = Pin<Box<dyn Stream<Item = Result<v1::DiscoverResponse, Status>> + Send>>;

    /// One answer per request, in order. A refused token is answered once (401000) and the
    /// stream ends; a request of a kind not served is answered (400004) and the stream goes on.
    async fn discover(
        &self,
        req: Request<tonic::Streaming<v1::DiscoverRequest>>,
    ) -> Result<tonic::Response<Self::DiscoverStream>, Status> {
        if let Err(e) = self.principal(&req, None) {
            let answer = v1::DiscoverResponse {
                code: Some(e.code),
                info: Some(e.info()),
                ..Default::default()
            };
            let once = futures::stream::once(async move { Ok(answer) });
            return Ok(tonic::Response::new(Box::pin(once)));
        }
        let st = self.st.clone();
        let answers = req.into_inner().map(move |r| r.map(|r| discover(&st, &r)));
        Ok(tonic::Response::new(Box::pin(answers)))
    }
}

/// The answer to a registry item: the instance (with its id), or why it was rejected.
fn item_answer(item: Item, echoed: v1::Instance) -> Answer {
    match item {
        Item::Instance(i) => reply(code::OK, code::info(code::OK).into(), Some(instance(&i))),
        Item::Rejected { reason, detail } => {
            let c = code::for_rejection(reason);
            reply(c, format!("{}: {detail}", code::info(c)), Some(echoed))
        }
        _ => reply(code::OK, code::info(code::OK).into(), Some(echoed)),
    }
}

/// What identifies the instance of a request, echoed in its answer.
fn echo(i: &v1::Instance) -> v1::Instance {
    v1::Instance {
        id: i.id.clone(),
        service: i.service.clone(),
        namespace: i.namespace.clone(),
        vpc_id: i.vpc_id.clone(),
        host: i.host.clone(),
        port: i.port,
        ..Default::default()
    }
}

fn instance_ref(i: &v1::Instance) -> InstanceRef {
    InstanceRef {
        id: i.id.clone(),
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        vpc_id: i.vpc_id.clone(),
        host: i.host.clone(),
        port: i.port.map(i64::from),
    }
}

/// The message as the REST API's input, so that both validate alike. Proto3 cannot tell an
/// empty map from an absent one: no metadata is none.
fn instance_input(i: v1::Instance) -> InstanceInput {
    InstanceInput {
        id: i.id,
        namespace: i.namespace,
        service: i.service,
        vpc_id: i.vpc_id,
        host: i.host,
        port: i.port.map(i64::from),
        protocol: i.protocol,
        version: i.version,
        priority: i.priority.map(i64::from),
        weight: i.weight.map(i64::from),
        healthy: i.healthy,
        isolate: i.isolate,
        metadata: (!i.metadata.is_empty()).then(|| i.metadata.into_iter().collect()),
        location: i.location.map(|l| crate::model::Location {
            region: l.region.unwrap_or_default(),
            zone: l.zone.unwrap_or_default(),
            campus: l.campus.unwrap_or_default(),
        }),
        logic_set: i.logic_set,
        enable_health_check: i.enable_health_check,
        health_check: i.health_check.map(|h| HealthCheckInput {
            // UNKNOWN (0) is proto3's "not set".
            kind: (h.r#type != 0).then(|| serde_json::Value::from(h.r#type)),
            heartbeat: h.heartbeat.map(|b| HeartbeatInput {
                ttl: b.ttl.map(i64::from),
            }),
        }),
    }
}

fn some(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn instance(i: &crate::model::Instance) -> v1::Instance {
    v1::Instance {
        id: Some(i.id.clone()),
        service: Some(i.service.clone()),
        namespace: Some(i.namespace.clone()),
        vpc_id: some(&i.vpc_id),
        host: Some(i.host.clone()),
        port: Some(u32::from(i.port)),
        protocol: some(&i.protocol),
        version: some(&i.version),
        priority: Some(i.priority),
        weight: Some(i.weight),
        enable_health_check: Some(i.enable_health_check),
        health_check: i.health_check.map(|hc| v1::HealthCheck {
            r#type: v1::health_check::HealthCheckType::Heartbeat as i32,
            heartbeat: Some(v1::HeartbeatHealthCheck {
                ttl: Some(hc.heartbeat.ttl),
            }),
        }),
        healthy: Some(i.healthy),
        isolate: Some(i.isolate),
        location: Some(v1::Location {
            region: some(&i.location.region),
            zone: some(&i.location.zone),
            campus: some(&i.location.campus),
        }),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        logic_set: some(&i.logic_set),
        ctime: some(&i.ctime),
        mtime: some(&i.mtime),
        revision: None,
        service_token: None,
    }
}

/// A service as discovery answers it (never its token).
fn service(e: &ServiceEntry, revision: String) -> v1::Service {
    let s = &e.service;
    v1::Service {
        name: Some(s.name.clone()),
        namespace: Some(s.namespace.clone()),
        metadata: s
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ports: some(&s.ports),
        business: some(&s.business),
        department: some(&s.department),
        cmdb_mod1: some(&s.cmdb_mod1),
        cmdb_mod2: some(&s.cmdb_mod2),
        cmdb_mod3: some(&s.cmdb_mod3),
        comment: some(&s.comment),
        owners: some(&s.owners),
        ctime: some(&s.ctime),
        mtime: some(&s.mtime),
        revision: Some(revision),
        total_instance_count: Some(e.instances.len() as u32),
        healthy_instance_count: Some(e.instances.values().filter(|i| i.healthy).count() as u32),
        ..Default::default()
    }
}

fn answer(kind: AnswerKind, c: u32, detail: &str) -> v1::DiscoverResponse {
    v1::DiscoverResponse {
        code: Some(c),
        info: Some(if detail.is_empty() {
            code::info(c).to_string()
        } else {
            format!("{}: {detail}", code::info(c))
        }),
        r#type: kind as i32,
        ..Default::default()
    }
}

/// Answers one discovery request from the registry's state.
fn discover(st: &AppState, req: &v1::DiscoverRequest) -> v1::DiscoverResponse {
    let asked = req.service.clone().unwrap_or_default();
    let held = asked.revision.as_deref().unwrap_or("");
    let kind = Kind::try_from(req.r#type).unwrap_or(Kind::Unknown);
    let mut out = match kind {
        Kind::Instance => instances(st, &asked, req.filter.as_ref(), held),
        Kind::Services => services(st, &asked, held),
        Kind::Namespaces => namespaces(st, held),
        Kind::Routing | Kind::RateLimit | Kind::CircuitBreaker | Kind::FaultDetector => answer(
            AnswerKind::Unknown,
            code::INVALID_DISCOVER_RESOURCE,
            &format!(
                "{}: governance rules are served through xDS and the REST API, not over Discover",
                kind.as_str_name()
            ),
        ),
        _ => answer(
            AnswerKind::Unknown,
            code::INVALID_DISCOVER_RESOURCE,
            &format!("type {} is not served", req.r#type),
        ),
    };
    if out.service.is_none() {
        out.service = Some(v1::Service {
            name: asked.name,
            namespace: asked.namespace,
            ..Default::default()
        });
    }
    out
}

fn instances(
    st: &AppState,
    asked: &v1::Service,
    filter: Option<&v1::DiscoverFilter>,
    held: &str,
) -> v1::DiscoverResponse {
    let (ns, name) = (
        asked.namespace.as_deref().unwrap_or(""),
        asked.name.as_deref().unwrap_or(""),
    );
    if name.is_empty() {
        return answer(
            AnswerKind::Instance,
            code::INVALID_SERVICE_NAME,
            "service.name: is required",
        );
    }
    if ns.is_empty() {
        return answer(
            AnswerKind::Instance,
            code::INVALID_NAMESPACE_NAME,
            "service.namespace: is required",
        );
    }
    let reg = st.registry.read();
    let key = ServiceKey::new(ns, name);
    let Some(mut entry) = reg.services.get(&key) else {
        return answer(
            AnswerKind::Instance,
            code::NOT_FOUND,
            &format!("service {ns}/{name}"),
        );
    };
    let mut alias_for = None;
    if let Some(t) = &entry.service.alias_for {
        let target = ServiceKey::new(t.namespace.clone(), t.service.clone());
        let Some(e) = reg.services.get(&target) else {
            return answer(
                AnswerKind::Instance,
                code::NOT_FOUND,
                &format!("service {ns}/{name}"),
            );
        };
        alias_for = Some(v1::Service {
            name: Some(target.name.clone()),
            namespace: Some(target.namespace.clone()),
            ..Default::default()
        });
        entry = e;
    }
    let only_healthy = filter.is_some_and(|f| f.only_healthy_instance);
    let revision = format!("{}{}", entry.revision, if only_healthy { "-h" } else { "" });
    let mut svc = service(entry, revision.clone());
    svc.name = Some(name.to_string());
    svc.namespace = Some(ns.to_string());
    if held == revision {
        let mut out = answer(AnswerKind::Instance, code::DATA_NO_CHANGE, "");
        out.service = Some(svc);
        out.alias_for = alias_for;
        return out;
    }
    let mut out = answer(AnswerKind::Instance, code::OK, "");
    out.instances = entry
        .instances
        .values()
        .filter(|i| !only_healthy || (i.healthy && !i.isolate))
        .map(|i| instance(i))
        .collect();
    out.service = Some(svc);
    out.alias_for = alias_for;
    out
}

/// Every service (not aliases) of the asked namespace, or of all when none is asked; the
/// revision is a hash of their names and revisions.
fn services(st: &AppState, asked: &v1::Service, held: &str) -> v1::DiscoverResponse {
    let ns = asked.namespace.as_deref().unwrap_or("");
    let reg = st.registry.read();
    let listed: Vec<&ServiceEntry> = reg
        .services
        .iter()
        .filter(|(k, e)| (ns.is_empty() || k.namespace == ns) && e.service.alias_for.is_none())
        .map(|(_, e)| e)
        .collect();
    let mut h = Xxh3::new();
    for e in &listed {
        h.update(e.service.namespace.as_bytes());
        h.update(b"/");
        h.update(e.service.name.as_bytes());
        h.update(&e.revision.to_le_bytes());
    }
    let revision = format!("{:016x}", h.digest());
    let held_now = held == revision;
    let mut out = if held_now {
        answer(AnswerKind::Services, code::DATA_NO_CHANGE, "")
    } else {
        answer(AnswerKind::Services, code::OK, "")
    };
    if !held_now {
        out.services = listed
            .iter()
            .map(|e| service(e, e.revision.to_string()))
            .collect();
    }
    out.service = Some(v1::Service {
        namespace: some(ns),
        revision: Some(revision),
        ..Default::default()
    });
    out
}

fn namespaces(st: &AppState, held: &str) -> v1::DiscoverResponse {
    let reg = st.registry.read();
    let mut counts: BTreeMap<&str, (u32, u32, u32)> = BTreeMap::new();
    for (k, e) in &reg.services {
        let c = counts.entry(k.namespace.as_str()).or_default();
        c.0 += 1;
        c.1 += e.instances.len() as u32;
        c.2 += e.instances.values().filter(|i| i.healthy).count() as u32;
    }
    let mut h = Xxh3::new();
    for (name, c) in &counts {
        h.update(name.as_bytes());
        h.update(&c.0.to_le_bytes());
    }
    for name in reg.namespaces.keys() {
        h.update(name.as_bytes());
        h.update(b"\n");
    }
    let revision = format!("{:016x}", h.digest());
    let mut out = if held == revision {
        answer(AnswerKind::Namespaces, code::DATA_NO_CHANGE, "")
    } else {
        let mut out = answer(AnswerKind::Namespaces, code::OK, "");
        out.namespaces = reg
            .namespaces
            .values()
            .map(|n| {
                let c = counts.get(n.name.as_str()).copied().unwrap_or_default();
                v1::Namespace {
                    name: Some(n.name.clone()),
                    comment: some(&n.comment),
                    owners: some(&n.owners),
                    ctime: some(&n.ctime),
                    mtime: some(&n.mtime),
                    total_service_count: Some(c.0),
                    total_instance_count: Some(c.1),
                    total_health_instance_count: Some(c.2),
                    ..Default::default()
                }
            })
            .collect();
        out
    };
    out.service = Some(v1::Service {
        revision: Some(revision),
        ..Default::default()
    });
    out
}
