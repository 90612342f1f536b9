//! A node as the control plane sees it: its id, namespace, own service and listener ports, from
//! its id and metadata.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use serde::Serialize;
use tonic::Status;

use super::resources as r;

/// Settings of a node, from its id and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// The namespace whose services it sees.
    pub namespace: String,
    /// Its own service, if it is a sidecar of one.
    pub service: Option<String>,
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Local application ports for the inbound cluster.
    pub bind_ports: Vec<u16>,
    /// Client name (`envoy`, `gRPC Python`, ...).
    pub user_agent: String,
    /// Virtual hosts on demand (VHDS) instead of the full route table.
    pub on_demand: bool,
    /// Other namespaces whose services this node also sees (`*`: all).
    pub extra_namespaces: Vec<String>,
    /// Where the node runs (Envoy's `node.locality`), for nearby routing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<r::Place>,
    /// The SPIFFE id the stream proved (authenticated ADS only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// What the node claimed beyond its identity and policy (it gets the narrowed settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub narrowed: Option<super::auth::Narrowed>,
}

fn meta_str(node: &Node, key: &str) -> Option<String> {
    let fields = &node.metadata.as_ref()?.fields;
    match fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        Kind::NumberValue(n) => Some(format!("{n}")),
        _ => None,
    }
}

impl NodeInfo {
    /// Reads a node: namespace from metadata, else from a `type~ns/pod~ip` id, else `default`.
    pub fn from_node(node: &Node) -> Result<NodeInfo, Status> {
        if node.id.is_empty() {
            return Err(Status::invalid_argument(
                "node.id is required on the first request",
            ));
        }
        let id_ns = node
            .id
            .split('~')
            .find_map(|part| part.split_once('/').map(|(ns, _)| ns.to_string()))
            .filter(|ns| !ns.is_empty());
        let namespace = meta_str(node, r::NODE_NAMESPACE_KEY)
            .or(id_ns)
            .unwrap_or_else(|| "default".into());
        let port = |key: &str, default: u16| -> Result<u16, Status> {
            match meta_str(node, key) {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (1.0..=65535.0).contains(p) && p.fract() == 0.0)
                    .map(|p| p as u16)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "node metadata {key}: {v:?} is not a port"
                        ))
                    }),
            }
        };
        let bind_ports = match meta_str(node, r::NODE_BIND_PORTS_KEY) {
            None => vec![],
            Some(v) => v
                .split(',')
                .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "node metadata {}: {v:?} is not a port list",
                        r::NODE_BIND_PORTS_KEY
                    ))
                })?,
        };
        let extra_namespaces = meta_str(node, r::NODE_VISIBLE_NAMESPACES_KEY)
            .map(|v| {
                v.split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty() && *n != namespace)
                    .collect()
            })
            .unwrap_or_default();
        Ok(NodeInfo {
            id: node.id.clone(),
            namespace,
            service: meta_str(node, r::NODE_SERVICE_KEY),
            outbound_port: port(r::NODE_OUTBOUND_PORT_KEY, 15001)?,
            inbound_port: port(r::NODE_INBOUND_PORT_KEY, 15006)?,
            bind_ports,
            user_agent: node.user_agent_name.clone(),
            on_demand: meta_str(node, r::NODE_ON_DEMAND_KEY).is_some_and(|v| v == "true"),
            extra_namespaces,
            locality: node
                .locality
                .as_ref()
                .filter(|l| !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()))
                .map(|l| r::Place {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    campus: l.sub_zone.clone(),
                }),
            identity: None,
            narrowed: None,
        })
    }
}
