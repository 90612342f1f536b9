//! Connected streams as the admin views see them (`/debug/xds/nodes`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use super::node::NodeInfo;
use super::PerKind;

fn hex_version<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(&format_args!("{v:016x}")),
        None => s.serialize_str(""),
    }
}

/// Per-type status shown by `/debug/xds/nodes`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Version of the last response sent.
    #[serde(serialize_with = "hex_version")]
    pub version_sent: Option<u64>,
    /// Version the client last ACKed.
    #[serde(serialize_with = "hex_version")]
    pub version_acked: Option<u64>,
    /// Resources the client holds (per our bookkeeping).
    pub resources: usize,
    /// Last NACK message, if the last response was rejected.
    pub last_nack: Option<String>,
    /// NACKs received.
    pub nacks: u64,
    /// Responses sent.
    pub responses: u64,
    /// Approximate memory of this type's bookkeeping on the stream.
    pub state_bytes: usize,
}

/// One connected stream, as the debug views see it.
#[derive(Debug)]
pub struct NodeStatus {
    /// Stream id.
    pub stream: u64,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// The client's address.
    pub peer: Option<crate::net::Peer>,
    /// Node settings (set on the first request).
    pub node: Mutex<Option<NodeInfo>>,
    /// Per type.
    pub types: Mutex<PerKind<TypeStatus>>,
    /// Snapshot generation last applied.
    pub generation: AtomicU64,
}

/// Connected streams.
#[derive(Debug, Default)]
pub struct Nodes {
    streams: Mutex<HashMap<u64, Arc<NodeStatus>>>,
    next: AtomicU64,
}

impl Nodes {
    /// Number of connected streams.
    pub fn len(&self) -> usize {
        self.streams.lock().len()
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All streams.
    pub fn list(&self) -> Vec<Arc<NodeStatus>> {
        let mut v: Vec<_> = self.streams.lock().values().cloned().collect();
        v.sort_by_key(|s| s.stream);
        v
    }

    pub(crate) fn register(
        &self,
        protocol: &'static str,
        peer: Option<crate::net::Peer>,
    ) -> Arc<NodeStatus> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let s = Arc::new(NodeStatus {
            stream: id,
            protocol,
            peer,
            node: Mutex::new(None),
            types: Mutex::new(PerKind::default()),
            generation: AtomicU64::new(0),
        });
        self.streams.lock().insert(id, s.clone());
        s
    }

    pub(crate) fn remove(&self, id: u64) {
        self.streams.lock().remove(&id);
    }
}
