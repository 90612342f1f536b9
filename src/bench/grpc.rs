//! The gRPC side of `bench registry`: PolarisMesh's client API driven as SDKs drive it, each
//! client on its own HTTP/2 connection with one call in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use super::Phase;
use crate::api::code;
use crate::api::grpc::v1;
use v1::polaris_grpc_client::PolarisGrpcClient;

/// Which call each request makes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Call {
    /// `RegisterInstance` with a 60 s heartbeat check (durable).
    Register,
    /// `Heartbeat` by id (in memory).
    Heartbeat,
}

/// `total` calls by `clients` concurrent callers over `connections` HTTP/2 connections (callers
/// share them in turn); `inst(i)` is request i's (service, host, port).
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive(
    target: &str,
    call: Call,
    clients: usize,
    connections: usize,
    total: usize,
    token: Option<String>,
    inst: impl Fn(usize) -> (String, String, u16) + Send + Sync + 'static,
) -> anyhow::Result<Phase> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{target}"))?.tcp_nodelay(true);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections.clamp(1, clients.max(1)) {
        conns.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to {target}"))?,
        );
    }
    let (next, inst) = (Arc::new(AtomicUsize::new(0)), Arc::new(inst));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let ch = conns[k % conns.len()].clone();
        let (next, inst, token) = (next.clone(), inst.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = PolarisGrpcClient::new(ch);
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (service, host, port) = inst(i);
                let msg = match call {
                    Call::Register => v1::Instance {
                        namespace: Some("default".into()),
                        service: Some(service),
                        host: Some(host),
                        port: Some(u32::from(port)),
                        enable_health_check: Some(true),
                        health_check: Some(v1::HealthCheck {
                            r#type: v1::health_check::HealthCheckType::Heartbeat as i32,
                            heartbeat: Some(v1::HeartbeatHealthCheck { ttl: Some(60) }),
                        }),
                        ..Default::default()
                    },
                    Call::Heartbeat => v1::Instance {
                        id: Some(crate::model::instance_id("default", &service, &host, port)),
                        ..Default::default()
                    },
                };
                let mut req = tonic::Request::new(msg);
                if let Some(t) = &token {
                    req.metadata_mut().insert("x-polaris-token", t.parse()?);
                }
                let t = Instant::now();
                let resp = match call {
                    Call::Register => c.register_instance(req).await,
                    Call::Heartbeat => c.heartbeat(req).await,
                }?
                .into_inner();
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if resp.code != Some(code::OK) {
                    bail!(
                        "{call:?} request {i} failed: {:?} {:?}",
                        resp.code,
                        resp.info
                    );
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let name = match call {
        Call::Register => "register",
        Call::Heartbeat => "heartbeat",
    };
    Phase::gather(name, started, total, tasks).await
}
