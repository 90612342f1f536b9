//! Route configurations and virtual hosts: the outbound routes by Host, the inbound route, and the
//! on-demand (VHDS) route.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, Vhds, VirtualHost,
};

use super::{ads, inbound_name, outbound_name, ON_DEMAND_ROUTE};
use crate::model::{Instance, Service};

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

/// The inbound route configuration name of a service.
pub fn inbound_route_name(ns: &str, svc: &str) -> String {
    format!("polaris-inbound-cluster|{svc}.{ns}")
}

/// The inbound route configuration: everything to the inbound cluster.
pub fn inbound_route(ns: &str, svc: &str) -> RouteConfiguration {
    let cluster = inbound_name(ns, svc);
    route_configuration(
        &inbound_route_name(ns, svc),
        vec![virtual_host(cluster.clone(), vec!["*".into()], cluster)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
