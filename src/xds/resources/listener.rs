//! Listeners: the outbound and inbound HTTP listeners of sidecars, the on-demand outbound listener,
//! and the API listeners of proxyless gRPC clients.

use envoy_types::pb::envoy::config::listener::v3::{
    filter, ApiListener, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::OnDemand;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::util::pack_any;

use super::{
    ads, inbound_listener_name, inbound_route_name, outbound_listener_name, socket, HCM_FILTER,
    ON_DEMAND_ROUTE, OUTBOUND_ROUTE, ROUTER_FILTER,
};

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
        let i = inbound_listener("default", "echo", 15006);
        assert_eq!(i.name, "echo.default_INBOUND_15006");
    }
}
