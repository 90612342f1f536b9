//! Clusters: one outbound EDS cluster per service, and the inbound cluster of a sidecar's own
//! service.

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::util::pack_any;

use super::LoadAssignmentSpec;
use super::{
    ads, duration_ms, inbound_name, outbound_name, CONNECT_TIMEOUT_KEY, HTTP_OPTIONS_EXT,
    LB_POLICY_KEY,
};
use crate::model::{Service, TlsMode};

/// Upstream HTTP/2 (gRPC).
pub fn http2_options() -> HttpProtocolOptions {
    HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
            },
        )),
        ..Default::default()
    }
}

/// Whether a service speaks HTTP/2 upstream (gRPC, h2, h2c).
pub fn is_h2(protocol: &str) -> bool {
    matches!(
        protocol.to_ascii_lowercase().as_str(),
        "grpc" | "h2" | "h2c" | "http2"
    )
}

/// The load-balancing policy named by the service's metadata (default round robin, which honours
/// endpoint weights).
pub fn lb_policy(svc: &Service) -> LbPolicy {
    match svc
        .metadata
        .get(LB_POLICY_KEY)
        .map(|s| s.to_ascii_uppercase())
    {
        Some(p) if p == "LEAST_REQUEST" => LbPolicy::LeastRequest,
        Some(p) if p == "RANDOM" => LbPolicy::Random,
        Some(p) if p == "RING_HASH" => LbPolicy::RingHash,
        Some(p) if p == "MAGLEV" => LbPolicy::Maglev,
        _ => LbPolicy::RoundRobin,
    }
}

fn eds_cluster(name: String, svc: &Service) -> Cluster {
    let timeout_ms = svc
        .metadata
        .get(CONNECT_TIMEOUT_KEY)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| (1..=600_000).contains(v))
        .unwrap_or(5000);
    let mut c = Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.clone(),
        }),
        name,
        connect_timeout: Some(duration_ms(timeout_ms)),
        lb_policy: lb_policy(svc) as i32,
        ..Default::default()
    };
    if svc.protocol().is_some_and(is_h2) {
        c.typed_extension_protocol_options
            .insert(HTTP_OPTIONS_EXT.to_string(), pack_any(http2_options()));
    }
    c
}

/// The outbound EDS cluster of a service.
pub fn outbound_cluster(svc: &Service) -> Cluster {
    #[allow(unused_mut)]
    let mut c = eds_cluster(outbound_name(&svc.namespace, &svc.name), svc);
    #[cfg(feature = "test-hooks")]
    test_hook(&mut c, svc);
    c
}

/// Test builds only (feature `test-hooks`): the outbound cluster of a service that asks for it
/// with [`super::TEST_INVALID_KEY`] gets a negative connect timeout, which Envoy rejects.
#[cfg(feature = "test-hooks")]
fn test_hook(c: &mut Cluster, svc: &Service) {
    if svc
        .metadata
        .get(super::TEST_INVALID_KEY)
        .is_some_and(|v| v == "true")
    {
        c.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: -1,
            nanos: 0,
        });
    }
}

/// `c` as callers of `svc` in TLS `mode` see it (see [`super::transport_socket_matches`]).
pub fn with_tls(mut c: Cluster, svc: &Service, mode: TlsMode, trust_domain: &str) -> Cluster {
    c.transport_socket_matches = super::transport_socket_matches(svc, mode, trust_domain);
    c
}

/// The same cluster under another name (a destination group's), with its own load assignment.
pub fn renamed(mut c: Cluster, name: &str) -> Cluster {
    c.name = name.to_string();
    if let Some(eds) = c.eds_cluster_config.as_mut() {
        eds.service_name = name.to_string();
    }
    c
}

/// Turns an EDS cluster into a `STRICT_DNS` cluster whose load assignment is `endpoints`, inline:
/// Envoy resolves hostnames itself (EDS carries only IP addresses). IPv4 is preferred, with IPv6
/// as the fallback: `localhost` and dual-stack names reach servers that listen on IPv4 only.
pub fn with_dns_endpoints(mut c: Cluster, endpoints: &LoadAssignmentSpec) -> Cluster {
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    c.eds_cluster_config = None;
    c.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
    c.load_assignment = Some(endpoints.to_proto());
    c
}

/// The inbound cluster of the node's own service (its endpoints are the local app ports).
pub fn inbound_cluster(svc: &Service) -> Cluster {
    eds_cluster(inbound_name(&svc.namespace, &svc.name), svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_shape() {
        let mut svc = Service::bare("default", "echo", "t");
        let c = outbound_cluster(&svc);
        assert_eq!(c.name, "OUTBOUND|default|echo");
        assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, c.name);
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin as i32);
        assert_eq!(c.connect_timeout.unwrap().seconds, 5);
        assert!(c.typed_extension_protocol_options.is_empty());
        svc.metadata
            .insert(crate::model::PROTOCOL_KEY.into(), "gRPC".into());
        svc.metadata
            .insert(LB_POLICY_KEY.into(), "least_request".into());
        svc.metadata
            .insert(CONNECT_TIMEOUT_KEY.into(), "250".into());
        let c = outbound_cluster(&svc);
        assert!(c
            .typed_extension_protocol_options
            .contains_key(HTTP_OPTIONS_EXT));
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
        assert_eq!(c.connect_timeout.unwrap().nanos, 250_000_000);
    }
}
