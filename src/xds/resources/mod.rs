//! Pure translation of registry objects into Envoy resources, one module per resource kind. No
//! I/O, no shared state: every function takes our domain types (and the node's settings) and
//! returns protobuf messages.

mod cluster;
mod endpoint;
mod listener;
mod matchers;
mod nearby;
mod ratelimit;
mod resilience;
mod route;
mod routing;
mod secret;
mod tls;

pub use cluster::*;
pub use endpoint::*;
pub use listener::*;
pub use nearby::*;
pub use ratelimit::*;
pub use resilience::*;
pub use route::*;
pub use routing::*;
pub use secret::*;
pub use tls::*;

use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress,
};
use envoy_types::pb::google::protobuf::Duration;

/// The outbound route configuration's name.
pub const OUTBOUND_ROUTE: &str = "polaris-outbound-router";

/// The route configuration of on-demand nodes: no virtual hosts, fetched per host over VHDS.
pub const ON_DEMAND_ROUTE: &str = "polaris-on-demand-router";

/// Node metadata key: comma-separated other namespaces the node also sees (`*`: all).
pub const NODE_VISIBLE_NAMESPACES_KEY: &str = "sidecar.polarismesh.cn/visibleNamespaces";

/// Node metadata key: `"true"` turns on on-demand virtual hosts (VHDS).
pub const NODE_ON_DEMAND_KEY: &str = "sidecar.polarismesh.cn/openOnDemand";

pub use crate::model::LB_POLICY_KEY;

/// Service metadata key for the connect timeout in milliseconds.
pub const CONNECT_TIMEOUT_KEY: &str = "polarismesh.cn/connectTimeoutMs";

/// Service metadata key honoured only by test builds (feature `test-hooks`): the service's
/// cluster gets a negative connect timeout, which Envoy rejects (to test NACK handling end to end).
#[cfg(feature = "test-hooks")]
pub const TEST_INVALID_KEY: &str = "polarismesh.cn/test-invalid-cluster";

/// Node metadata key: the sidecar's own service.
pub const NODE_SERVICE_KEY: &str = "sidecar.polarismesh.cn/serviceName";

/// Node metadata key: the sidecar's own namespace.
pub const NODE_NAMESPACE_KEY: &str = "sidecar.polarismesh.cn/serviceNamespace";

/// Node metadata key: the outbound listener port.
pub const NODE_OUTBOUND_PORT_KEY: &str = "polarismesh.cn/outboundPort";

/// Node metadata key: the inbound listener port.
pub const NODE_INBOUND_PORT_KEY: &str = "polarismesh.cn/inboundPort";

/// Node metadata key: comma-separated local application ports.
pub const NODE_BIND_PORTS_KEY: &str = "sidecar.polarismesh.cn/bindPorts";

/// Part of every content version: bumped when the translation changes, so versions from an older
/// build are not trusted.
pub const TRANSLATOR_SALT: &[u8] = b"polaris-mesh/xds/3";

pub(crate) const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub(crate) const ROUTER_FILTER: &str = "envoy.filters.http.router";
pub(crate) const HTTP_OPTIONS_EXT: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
pub(crate) const LB_METADATA: &str = "envoy.lb";

/// Name of the outbound cluster (and its EDS resource) of a service.
pub fn outbound_name(ns: &str, svc: &str) -> String {
    format!("OUTBOUND|{ns}|{svc}")
}

/// Name of the inbound cluster of a service.
pub fn inbound_name(ns: &str, svc: &str) -> String {
    format!("INBOUND|{ns}|{svc}")
}

/// Name of the outbound listener on `port`.
pub fn outbound_listener_name(port: u16) -> String {
    format!("OUTBOUND_{port}")
}

/// Name of the inbound listener of a service.
pub fn inbound_listener_name(ns: &str, svc: &str, port: u16) -> String {
    format!("{svc}.{ns}_INBOUND_{port}")
}

pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

pub(crate) fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(crate) fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}
