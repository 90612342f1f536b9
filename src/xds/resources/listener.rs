//! Listeners: the outbound and inbound HTTP listeners of sidecars, the on-demand outbound listener,
//! and the API listeners of proxyless gRPC clients.

use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, ApiListener, Filter, FilterChain, FilterChainMatch, Listener,
    ListenerFilter,
};
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::{OnDemand, OnDemandCds};

/// How long a request waits for its cluster over on-demand CDS before it fails (503).
pub const ODCDS_TIMEOUT_MS: u64 = 5_000;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails,
    },
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::util::pack_any;

use super::{
    ads, downstream_tls, inbound_listener_name, inbound_route_name, outbound_listener_name, socket,
    HCM_FILTER, ON_DEMAND_ROUTE, OUTBOUND_ROUTE, ROUTER_FILTER,
};
use crate::model::TlsMode;

const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

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
    hcm_with(stat_prefix, route, &[])
}

/// [`hcm`] with `filters` before the router.
pub fn hcm_with(stat_prefix: &str, route: &str, filters: &[HttpFilter]) -> HttpConnectionManager {
    let mut http_filters = filters.to_vec();
    http_filters.push(router_filter());
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route.to_string(),
        })),
        http_filters,
        ..Default::default()
    }
}

/// The outbound listener of an on-demand node: the `on_demand` filter pauses a request whose
/// host is unknown until its virtual host arrives over VHDS and, with `odcds` (delta ADS nodes,
/// which are sent no service cluster until they ask), whose cluster is unknown until it arrives
/// over on-demand CDS.
pub fn on_demand_outbound_listener(ip: &str, port: u16, odcds: bool) -> Listener {
    let mut h = hcm("OUTBOUND_HTTP", ON_DEMAND_ROUTE);
    h.http_filters.insert(
        0,
        HttpFilter {
            name: "envoy.filters.http.on_demand".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(OnDemand {
                odcds: odcds.then(|| OnDemandCds {
                    source: Some(super::ads()),
                    resources_locator: String::new(),
                    timeout: Some(super::duration_ms(ODCDS_TIMEOUT_MS)),
                }),
            }))),
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
    outbound_listener_to(ip, port, OUTBOUND_ROUTE)
}

/// [`outbound_listener`] through the route configuration `route` (a caller's own).
pub fn outbound_listener_to(ip: &str, port: u16, route: &str) -> Listener {
    hcm_listener(
        outbound_listener_name(port),
        ip,
        port,
        "OUTBOUND_HTTP",
        route,
    )
}

/// The inbound HTTP stat prefix: one for every filter chain, so a listener's HTTP statistics
/// count mTLS and plaintext requests alike.
pub const INBOUND_STAT_PREFIX: &str = "INBOUND_HTTP";

/// The inbound listener of the node's own service: HTTP on `port` to its inbound cluster, as the
/// service's TLS `mode` says:
/// - `none`: plaintext;
/// - `strict`: mTLS only (a client certificate of `trust_domain` required, TLS 1.2+); a
///   plaintext connection matches no filter chain and is closed;
/// - `permissive`: `tls_inspector` picks one of two filter chains, mTLS or plaintext, and both
///   go through the same HTTP connection manager and routes (PolarisMesh passes plaintext to a
///   TCP proxy instead, skipping HTTP routing and rate limits).
///
/// Over mTLS the caller's SPIFFE id reaches the application in `x-forwarded-client-cert`; any
/// such header a client sends itself is removed first.
pub fn inbound_listener(
    ns: &str,
    svc: &str,
    port: u16,
    mode: TlsMode,
    trust_domain: &str,
    filters: &[HttpFilter],
) -> Listener {
    let route = inbound_route_name(ns, svc);
    let mut h = hcm_with(INBOUND_STAT_PREFIX, &route, filters);
    let mut l = Listener {
        name: inbound_listener_name(ns, svc, port),
        address: Some(socket("0.0.0.0", port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(h.clone()))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    if mode == TlsMode::None {
        return l;
    }
    h.forward_client_cert_details = ForwardClientCertDetails::SanitizeSet as i32;
    h.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
        uri: true,
        ..Default::default()
    });
    let chain = |name: &str, protocol: &str, socket: Option<TransportSocket>| FilterChain {
        name: name.to_string(),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: protocol.to_string(),
            ..Default::default()
        }),
        filters: vec![Filter {
            name: HCM_FILTER.to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(h.clone()))),
        }],
        transport_socket: socket,
        ..Default::default()
    };
    l.listener_filters = vec![ListenerFilter {
        name: TLS_INSPECTOR.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            TlsInspector::default(),
        ))),
        ..Default::default()
    }];
    l.filter_chains = vec![chain("mtls", "tls", Some(downstream_tls(trust_domain)))];
    if mode == TlsMode::Permissive {
        l.filter_chains.push(chain("plaintext", "raw_buffer", None));
    }
    l
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
        let i = inbound_listener("default", "echo", 15006, TlsMode::None, "td", &[]);
        assert_eq!(i.name, "echo.default_INBOUND_15006");
        assert!(i.listener_filters.is_empty());
        assert!(i.filter_chains[0].transport_socket.is_none());
    }

    fn hcm_of(c: &FilterChain) -> HttpConnectionManager {
        use prost::Message;
        let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
            panic!()
        };
        HttpConnectionManager::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn strict_inbound_takes_only_mtls() {
        let l = inbound_listener("default", "echo", 15006, TlsMode::Strict, "td", &[]);
        assert_eq!(l.listener_filters[0].name, TLS_INSPECTOR);
        assert_eq!(l.filter_chains.len(), 1, "no plaintext chain");
        let c = &l.filter_chains[0];
        assert_eq!(
            c.filter_chain_match.as_ref().unwrap().transport_protocol,
            "tls"
        );
        assert_eq!(
            c.transport_socket.as_ref().unwrap().name,
            "envoy.transport_sockets.tls"
        );
        assert!(l.default_filter_chain.is_none());
        let h = hcm_of(c);
        assert_eq!(
            h.forward_client_cert_details,
            ForwardClientCertDetails::SanitizeSet as i32
        );
        assert!(h.set_current_client_cert_details.unwrap().uri);
    }

    #[test]
    fn permissive_inbound_routes_both_chains_through_http() {
        let l = inbound_listener("default", "echo", 15006, TlsMode::Permissive, "td", &[]);
        let protocols: Vec<_> = l
            .filter_chains
            .iter()
            .map(|c| {
                c.filter_chain_match
                    .as_ref()
                    .unwrap()
                    .transport_protocol
                    .as_str()
            })
            .collect();
        assert_eq!(protocols, ["tls", "raw_buffer"]);
        assert!(l.filter_chains[1].transport_socket.is_none());
        for c in &l.filter_chains {
            assert_eq!(
                c.filters[0].name, HCM_FILTER,
                "plaintext is not a TCP passthrough"
            );
            let h = hcm_of(c);
            assert_eq!(h.stat_prefix, INBOUND_STAT_PREFIX);
            assert_eq!(
                h.forward_client_cert_details,
                ForwardClientCertDetails::SanitizeSet as i32,
                "a plaintext client cannot forge the caller's identity"
            );
        }
    }
}
