//! Pure translation of registry objects into Envoy resources. No I/O, no shared state: every
//! function takes our domain types (and the node's settings) and returns protobuf messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, Metadata,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, ApiListener, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::config::route::v3::Vhds;
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::OnDemand;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::{value::Kind, Duration, Struct, UInt32Value, Value};
use envoy_types::util::pack_any;

use crate::model::{Instance, Service};

/// The outbound route configuration's name.
pub const OUTBOUND_ROUTE: &str = "polaris-outbound-router";
/// The route configuration of on-demand nodes: no virtual hosts, fetched per host over VHDS.
pub const ON_DEMAND_ROUTE: &str = "polaris-on-demand-router";
/// Node metadata key: comma-separated other namespaces the node also sees (`*`: all).
pub const NODE_VISIBLE_NAMESPACES_KEY: &str = "sidecar.polarismesh.cn/visibleNamespaces";
/// Node metadata key: `"true"` turns on on-demand virtual hosts (VHDS).
pub const NODE_ON_DEMAND_KEY: &str = "sidecar.polarismesh.cn/openOnDemand";
/// Service metadata key choosing the cluster's load-balancing policy.
pub const LB_POLICY_KEY: &str = "polarismesh.cn/lbPolicy";
/// Service metadata key for the connect timeout in milliseconds.
pub const CONNECT_TIMEOUT_KEY: &str = "polarismesh.cn/connectTimeoutMs";
/// Service metadata key honoured only when the server runs with `--test-hooks`: the service's
/// cluster gets a negative connect timeout, which Envoy rejects (to test NACK handling end to end).
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
/// Node metadata key: the mTLS mode.
pub const NODE_TLS_MODE_KEY: &str = "polarismesh.cn/tls-mode";

const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const HTTP_OPTIONS_EXT: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const LB_METADATA: &str = "envoy.lb";

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

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
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
    if is_h2(&svc.protocol) {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert(HTTP_OPTIONS_EXT.to_string(), pack_any(opts));
    }
    c
}

/// The outbound EDS cluster of a service.
pub fn outbound_cluster(svc: &Service) -> Cluster {
    eds_cluster(outbound_name(&svc.namespace, &svc.name), svc)
}

/// [`outbound_cluster`], made invalid on purpose when test hooks are on and the service asks for it.
pub fn outbound_cluster_with_hooks(svc: &Service, test_hooks: bool) -> Cluster {
    let mut c = outbound_cluster(svc);
    if test_hooks
        && svc
            .metadata
            .get(TEST_INVALID_KEY)
            .is_some_and(|v| v == "true")
    {
        c.connect_timeout = Some(Duration {
            seconds: -1,
            nanos: 0,
        });
    }
    c
}

/// The inbound cluster of the node's own service (its endpoints are the local app ports).
pub fn inbound_cluster(svc: &Service) -> Cluster {
    eds_cluster(inbound_name(&svc.namespace, &svc.name), svc)
}

/// Whether an instance takes traffic: not isolated, weight above 0, an IP address (Envoy's EDS and
/// gRPC accept only IP literals).
pub fn routable(i: &Instance) -> bool {
    !i.isolate && i.weight > 0 && i.host.parse::<IpAddr>().is_ok()
}

fn lb_metadata(m: &BTreeMap<String, String>) -> Option<Metadata> {
    if m.is_empty() {
        return None;
    }
    let fields: HashMap<String, Value> = m
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value {
                    kind: Some(Kind::StringValue(v.clone())),
                },
            )
        })
        .collect();
    let mut md = Metadata::default();
    md.filter_metadata
        .insert(LB_METADATA.to_string(), Struct { fields });
    Some(md)
}

/// The `ClusterLoadAssignment` named `cluster_name` for `instances`: one locality per
/// region/zone/campus, each with `load_balancing_weight` (gRPC skips localities without one).
pub fn load_assignment<'a>(
    cluster_name: String,
    instances: impl IntoIterator<Item = &'a Instance>,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(&str, &str, &str), Vec<&Instance>> = BTreeMap::new();
    for i in instances.into_iter().filter(|i| routable(i)) {
        by_locality
            .entry((&i.location.region, &i.location.zone, &i.location.campus))
            .or_default()
            .push(i);
    }
    let endpoints = by_locality
        .into_iter()
        .map(|((region, zone, campus), insts)| {
            let weight: u32 = insts.iter().map(|i| i.weight).sum();
            LocalityLbEndpoints {
                locality: Some(Locality {
                    region: region.to_string(),
                    zone: zone.to_string(),
                    sub_zone: campus.to_string(),
                }),
                load_balancing_weight: Some(UInt32Value {
                    value: weight.max(1),
                }),
                lb_endpoints: insts
                    .into_iter()
                    .map(|i| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(&i.host, i.port)),
                            ..Default::default()
                        })),
                        health_status: if i.healthy {
                            HealthStatus::Healthy
                        } else {
                            HealthStatus::Unhealthy
                        } as i32,
                        metadata: lb_metadata(&i.metadata),
                        load_balancing_weight: Some(UInt32Value { value: i.weight }),
                    })
                    .collect(),
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name,
        endpoints,
        ..Default::default()
    }
}

/// The inbound `ClusterLoadAssignment`: the local application on each port.
pub fn inbound_load_assignment(svc: &Service, ports: &[u16]) -> ClusterLoadAssignment {
    let locals: Vec<Instance> = ports
        .iter()
        .map(|p| Instance {
            id: format!("local-{p}"),
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            host: "127.0.0.1".into(),
            port: *p,
            protocol: String::new(),
            version: String::new(),
            priority: 0,
            weight: 100,
            healthy: true,
            isolate: false,
            metadata: BTreeMap::new(),
            location: Default::default(),
            enable_health_check: false,
            health_check: None,
            ctime: String::new(),
            mtime: String::new(),
        })
        .collect();
    load_assignment(inbound_name(&svc.namespace, &svc.name), &locals)
}

/// Ports a service answers on: its declared `ports` plus the ports of its instances (sorted, at most 16).
pub fn service_ports<'a>(
    svc: &Service,
    instances: impl IntoIterator<Item = &'a Instance>,
) -> Vec<u16> {
    let mut ports: BTreeSet<u16> = svc
        .ports
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| *p > 0)
        .collect();
    ports.extend(instances.into_iter().map(|i| i.port));
    ports.into_iter().take(16).collect()
}

/// The host names a service's virtual host answers, each also with `:<port>`.
pub fn domains(ns: &str, svc: &str, ports: &[u16]) -> Vec<String> {
    let names = [
        svc.to_string(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    let mut out = Vec::with_capacity(names.len() * (1 + ports.len()));
    for n in &names {
        out.push(n.clone());
        for p in ports {
            out.push(format!("{n}:{p}"));
        }
    }
    out
}

/// A virtual host routing everything to one cluster.
pub fn virtual_host(name: String, domains: Vec<String>, cluster: String) -> VirtualHost {
    VirtualHost {
        name,
        domains,
        routes: vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster)),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The outbound virtual host of a service.
pub fn service_virtual_host(svc: &Service, ports: &[u16]) -> VirtualHost {
    let cluster = outbound_name(&svc.namespace, &svc.name);
    virtual_host(
        cluster.clone(),
        domains(&svc.namespace, &svc.name, ports),
        cluster,
    )
}

/// The outbound route configuration from prebuilt virtual hosts.
pub fn route_configuration(name: &str, vhosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vhosts,
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: ROUTER_FILTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

/// An HTTP connection manager fetching `route` over ADS.
pub fn hcm(stat_prefix: &str, route: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route.to_string(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

/// The outbound listener of an on-demand node: the `on_demand` filter pauses a request whose
/// host is unknown until its virtual host arrives over VHDS.
pub fn on_demand_outbound_listener(ip: &str, port: u16) -> Listener {
    let mut h = hcm("OUTBOUND_HTTP", ON_DEMAND_ROUTE);
    h.http_filters.insert(
        0,
        HttpFilter {
            name: "envoy.filters.http.on_demand".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                OnDemand::default(),
            ))),
            ..Default::default()
        },
    );
    Listener {
        name: outbound_listener_name(port),
        address: Some(socket(ip, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(h))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The on-demand route configuration: no virtual hosts, VHDS over ADS.
pub fn on_demand_route() -> RouteConfiguration {
    RouteConfiguration {
        name: ON_DEMAND_ROUTE.to_string(),
        vhds: Some(Vhds {
            config_source: Some(ads()),
        }),
        ..Default::default()
    }
}

/// Splits a VHDS resource name `<route config>/<host>` (from the right: hosts have no slash).
pub fn parse_vhds_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('/')
        .filter(|(rc, host)| !rc.is_empty() && !host.is_empty())
}

fn hcm_listener(name: String, ip: &str, port: u16, stat_prefix: &str, route: &str) -> Listener {
    Listener {
        name,
        address: Some(socket(ip, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm(
                    stat_prefix,
                    route,
                )))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The outbound listener: HTTP on `port`, routing by Host through [`OUTBOUND_ROUTE`].
pub fn outbound_listener(ip: &str, port: u16) -> Listener {
    hcm_listener(
        outbound_listener_name(port),
        ip,
        port,
        "OUTBOUND_HTTP",
        OUTBOUND_ROUTE,
    )
}

/// The inbound route configuration name of a service.
pub fn inbound_route_name(ns: &str, svc: &str) -> String {
    format!("polaris-inbound-cluster|{svc}.{ns}")
}

/// The inbound listener of the node's own service: HTTP on `port` to its inbound cluster.
pub fn inbound_listener(ns: &str, svc: &str, port: u16) -> Listener {
    hcm_listener(
        inbound_listener_name(ns, svc, port),
        "0.0.0.0",
        port,
        "INBOUND_HTTP",
        &inbound_route_name(ns, svc),
    )
}

/// The inbound route configuration: everything to the inbound cluster.
pub fn inbound_route(ns: &str, svc: &str) -> RouteConfiguration {
    let cluster = inbound_name(ns, svc);
    route_configuration(
        &inbound_route_name(ns, svc),
        vec![virtual_host(cluster.clone(), vec!["*".into()], cluster)],
    )
}

/// An API listener for proxyless gRPC, named exactly like the client's target authority.
pub fn api_listener(name: &str) -> Listener {
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm("PROXYLESS", OUTBOUND_ROUTE))),
        }),
        ..Default::default()
    }
}

/// Parses a proxyless target `<svc>.<ns>[:port]` (optionally followed by `.svc[.cluster.local]`).
pub fn parse_target(name: &str) -> Option<(String, String)> {
    let host = match name.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => name,
    };
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let (svc, ns) = host.rsplit_once('.')?;
    (!svc.is_empty() && !ns.is_empty()).then(|| (svc.to_string(), ns.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceInput;

    fn inst(host: &str, port: i64, f: impl FnOnce(&mut InstanceInput)) -> Instance {
        let mut i = InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some(host.into()),
            port: Some(port),
            ..Default::default()
        };
        f(&mut i);
        i.validate("t").unwrap()
    }

    #[test]
    fn cluster_shape() {
        let mut svc = Service::bare("default", "echo", "t");
        let c = outbound_cluster(&svc);
        assert_eq!(c.name, "OUTBOUND|default|echo");
        assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, c.name);
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin as i32);
        assert_eq!(c.connect_timeout.unwrap().seconds, 5);
        assert!(c.typed_extension_protocol_options.is_empty());
        svc.protocol = "gRPC".into();
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

    #[test]
    fn endpoints_health_exclusion_locality() {
        let a = inst("10.0.0.1", 80, |i| {
            i.location = Some(crate::model::Location {
                region: "r1".into(),
                zone: "z1".into(),
                campus: "c1".into(),
            });
            i.metadata = Some([("version".to_string(), "v1".to_string())].into());
        });
        let b = inst("10.0.0.2", 80, |i| i.healthy = Some(false));
        let isolated = inst("10.0.0.3", 80, |i| i.isolate = Some(true));
        let zero = inst("10.0.0.4", 80, |i| i.weight = Some(0));
        let hostname = inst("echo.example", 80, |_| {});
        let heavy = inst("10.0.0.5", 80, |i| i.weight = Some(300));
        let cla = load_assignment("X".into(), [&a, &b, &isolated, &zero, &hostname, &heavy]);
        assert_eq!(cla.cluster_name, "X");
        let all: Vec<_> = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).collect();
        assert_eq!(all.len(), 3, "isolated, weight 0 and hostname excluded");
        for l in &cla.endpoints {
            assert!(l.load_balancing_weight.unwrap().value >= 1);
        }
        let unhealthy = all
            .iter()
            .filter(|e| e.health_status == HealthStatus::Unhealthy as i32)
            .count();
        assert_eq!(unhealthy, 1);
        let loc = cla
            .endpoints
            .iter()
            .find(|l| l.locality.as_ref().unwrap().region == "r1")
            .unwrap();
        assert_eq!(loc.locality.as_ref().unwrap().sub_zone, "c1");
        let md = loc.lb_endpoints[0].metadata.as_ref().unwrap();
        assert!(md.filter_metadata[LB_METADATA]
            .fields
            .contains_key("version"));
        let default_loc = cla
            .endpoints
            .iter()
            .find(|l| l.locality.as_ref().unwrap().region.is_empty())
            .unwrap();
        assert_eq!(default_loc.load_balancing_weight.unwrap().value, 400);
    }

    #[test]
    fn domains_cover_names_and_ports() {
        let d = domains("default", "echo", &[8080]);
        for want in [
            "echo",
            "echo.default",
            "echo.default.svc",
            "echo.default.svc.cluster.local",
            "echo.default:8080",
            "echo.default.svc.cluster.local:8080",
        ] {
            assert!(d.contains(&want.to_string()), "{want}");
        }
        assert_eq!(d.len(), 8);
    }

    #[test]
    fn proxyless_targets() {
        assert_eq!(
            parse_target("echo-grpc.default"),
            Some(("echo-grpc".into(), "default".into()))
        );
        assert_eq!(
            parse_target("echo-grpc.default:50051"),
            Some(("echo-grpc".into(), "default".into()))
        );
        assert_eq!(
            parse_target("echo.default.svc.cluster.local:80"),
            Some(("echo".into(), "default".into()))
        );
        assert_eq!(parse_target("echo"), None);
        let l = api_listener("echo.default:80");
        assert!(l.api_listener.is_some() && l.address.is_none());
    }

    #[test]
    fn listeners() {
        let l = outbound_listener("0.0.0.0", 15001);
        assert_eq!(l.name, "OUTBOUND_15001");
        assert_eq!(l.filter_chains[0].filters[0].name, HCM_FILTER);
        let i = inbound_listener("default", "echo", 15006);
        assert_eq!(i.name, "echo.default_INBOUND_15006");
    }
}
