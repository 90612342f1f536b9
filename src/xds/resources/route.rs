//! Route configurations and virtual hosts: the outbound routes by Host, the inbound route, and the
//! on-demand (VHDS) route.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, Vhds, VirtualHost,
};

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
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

/// The names a service's virtual host answers: `svc`, `svc.ns`, `svc.ns.svc` and
/// `svc.ns.svc.cluster.local`, each also followed by any port (`svc.ns:*`, a prefix wildcard that
/// Envoy and gRPC both match). No instance port appears, so the route configuration does not change
/// when instances come and go on new ports; callers that send `Host: svc.ns:8080` and proxyless
/// targets `xds:///svc.ns:8080` still match.
pub fn domains(ns: &str, svc: &str) -> Vec<String> {
    let names = [
        svc.to_string(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    let mut out = Vec::with_capacity(2 * names.len());
    for n in names {
        out.push(format!("{n}:*"));
        out.push(n);
    }
    out
}

/// The exact (non-wildcard) domains of a virtual host, as VHDS looks hosts up.
pub fn exact_domains(vh: &VirtualHost) -> impl Iterator<Item = &str> {
    vh.domains
        .iter()
        .map(String::as_str)
        .filter(|d| !d.ends_with('*'))
}

/// The key a host is looked up by: lowercase (Envoy matches domains case-insensitively), without a
/// port (`svc.ns:8080` is answered by `svc.ns:*`).
pub fn host_key(host: &str) -> String {
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    bare.to_ascii_lowercase()
}

/// Whether `host` (as a request names it) has the key `key` (see [`host_key`]), without
/// allocating.
pub fn host_is(host: &str, key: &str) -> bool {
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    bare.eq_ignore_ascii_case(key)
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

/// The outbound virtual host of a service, or of an alias (its own names, its target's cluster).
pub fn service_virtual_host(svc: &Service) -> VirtualHost {
    let cluster = match &svc.alias_for {
        Some(t) => outbound_name(&t.namespace, &t.service),
        None => outbound_name(&svc.namespace, &svc.name),
    };
    virtual_host(
        outbound_name(&svc.namespace, &svc.name),
        domains(&svc.namespace, &svc.name),
        cluster,
    )
}

/// The virtual host of a service (or alias) with `routes` (from its routing rules).
pub fn service_virtual_host_with(svc: &Service, routes: Vec<Route>) -> VirtualHost {
    if svc.alias_for.is_some() {
        return service_virtual_host(svc);
    }
    VirtualHost {
        name: outbound_name(&svc.namespace, &svc.name),
        domains: domains(&svc.namespace, &svc.name),
        routes,
        ..Default::default()
    }
}

/// The outbound route configuration of callers (`ns/svc`) that routing rules name.
pub fn caller_route_name(caller: &str) -> String {
    format!("{}|{caller}", super::OUTBOUND_ROUTE)
}

/// A route configuration from prebuilt virtual hosts. Envoy rejects the whole configuration when
/// two virtual hosts share a domain (compared case-insensitively), which names with dots can cause
/// (service `echo.default` in `default` and service `echo`): a domain goes to the first virtual
/// host in order that has it, and the later ones lose it.
pub fn route_configuration(name: &str, vhosts: Vec<VirtualHost>) -> RouteConfiguration {
    let mut seen = std::collections::HashSet::new();
    let mut vhosts = vhosts;
    for vh in &mut vhosts {
        vh.domains.retain(|d| seen.insert(d.to_ascii_lowercase()));
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vhosts,
        ..Default::default()
    }
}

/// A namespace's virtual hosts encoded once, with the domains earlier hosts took removed as
/// [`route_configuration`] removes them: the shared route configuration and every caller's (the
/// same hosts, a few replaced by the caller's own) are then assembled from these bytes instead of
/// cloning and encoding every host once per configuration.
///
/// Invariant: [`EncodedVhosts::route_configuration`] yields exactly the bytes prost gives
/// [`route_configuration`] over the same hosts, provided a replacement answers the same domains as
/// the host it replaces (a service's hosts always do: [`domains`] depends on its name alone).
pub struct EncodedVhosts<'a> {
    /// (service, host, its encoded form with taken domains removed, the domains removed).
    hosts: Vec<(&'a str, Bytes, Vec<String>)>,
}

impl<'a> EncodedVhosts<'a> {
    /// Encodes `vhosts` (in route order).
    pub fn new(vhosts: impl IntoIterator<Item = (&'a str, &'a VirtualHost)>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let hosts = vhosts
            .into_iter()
            .map(|(svc, vh)| {
                let lost: Vec<String> = vh
                    .domains
                    .iter()
                    .filter(|d| !seen.insert(d.to_ascii_lowercase()))
                    .cloned()
                    .collect();
                let bytes = Self::encode(vh, &lost);
                (svc, bytes, lost)
            })
            .collect();
        EncodedVhosts { hosts }
    }

    fn encode(vh: &VirtualHost, lost: &[String]) -> Bytes {
        if lost.is_empty() {
            return vh.encode_to_vec().into();
        }
        let mut vh = vh.clone();
        vh.domains.retain(|d| !lost.contains(d));
        vh.encode_to_vec().into()
    }

    /// The encoded route configuration `name`: every host, the ones in `replace` (by service)
    /// replaced.
    pub fn route_configuration(
        &self,
        name: &str,
        replace: Option<&BTreeMap<Arc<str>, VirtualHost>>,
    ) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let replaced: Vec<Option<Bytes>> = self
            .hosts
            .iter()
            .map(|(svc, _, lost)| {
                replace
                    .and_then(|m| m.get(*svc))
                    .map(|vh| Self::encode(vh, lost))
            })
            .collect();
        let body = |i: usize| replaced[i].as_ref().unwrap_or(&self.hosts[i].1);
        let mut len = 0;
        if !name.is_empty() {
            len += 1 + encoded_len_varint(name.len() as u64) + name.len();
        }
        for i in 0..self.hosts.len() {
            let n = body(i).len();
            len += 1 + encoded_len_varint(n as u64) + n;
        }
        let mut out = Vec::with_capacity(len);
        if !name.is_empty() {
            encode_key(1, WireType::LengthDelimited, &mut out);
            encode_varint(name.len() as u64, &mut out);
            out.extend_from_slice(name.as_bytes());
        }
        for i in 0..self.hosts.len() {
            let b = body(i);
            encode_key(2, WireType::LengthDelimited, &mut out);
            encode_varint(b.len() as u64, &mut out);
            out.extend_from_slice(b);
        }
        out
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

/// Request header the inbound route adds: the application sees that a request came through its
/// sidecar's inbound routing (over mTLS or plaintext alike), and for which service.
pub const INBOUND_HEADER: &str = "x-polaris-inbound";

/// The inbound route configuration: everything to the inbound cluster, marked with
/// [`INBOUND_HEADER`] = `<svc>.<ns>`.
pub fn inbound_route(ns: &str, svc: &str) -> RouteConfiguration {
    inbound_route_limited(ns, svc, &[], 1)
}

/// [`inbound_route`] within the service's rate-limit rules (`instances` share equally divided
/// amounts).
pub fn inbound_route_limited(
    ns: &str,
    svc: &str,
    limits: &[&crate::model::rules::RateLimitRule],
    instances: u32,
) -> RouteConfiguration {
    let cluster = inbound_name(ns, svc);
    let mut vh = virtual_host(cluster.clone(), vec!["*".into()], cluster);
    if !limits.is_empty() {
        vh.routes = vh
            .routes
            .into_iter()
            .map(|r| super::with_limits(r, limits, instances))
            .collect();
    }
    vh.request_headers_to_add = vec![HeaderValueOption {
        header: Some(HeaderValue {
            key: INBOUND_HEADER.to_string(),
            value: format!("{svc}.{ns}"),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }];
    route_configuration(&inbound_route_name(ns, svc), vec![vh])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembled from encoded hosts, a configuration is byte for byte what prost encodes, taken
    /// domains and replaced hosts included (so versions do not depend on the path taken).
    #[test]
    fn encoded_hosts_assemble_the_same_bytes_as_prost() {
        let host = |svc: &str, route: &str| VirtualHost {
            name: outbound_name("default", svc),
            domains: domains("default", svc),
            routes: vec![Route {
                name: route.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        // `echo.default` the service and `echo` in `default` share names: the later loses them.
        let hosts: BTreeMap<Arc<str>, VirtualHost> = ["a", "echo", "echo.default", "z"]
            .iter()
            .map(|s| (Arc::from(*s), host(s, "base")))
            .collect();
        let replace: BTreeMap<Arc<str>, VirtualHost> =
            [(Arc::from("echo.default"), host("echo.default", "caller"))].into();
        let enc = EncodedVhosts::new(hosts.iter().map(|(s, vh)| (&**s, vh)));
        let prost = route_configuration("shared", hosts.values().cloned().collect());
        assert!(
            prost.virtual_hosts[2].domains.len() < 8,
            "no domain was taken"
        );
        assert_eq!(
            enc.route_configuration("shared", None),
            prost.encode_to_vec()
        );
        let mine = hosts
            .iter()
            .map(|(s, vh)| replace.get(s).unwrap_or(vh).clone())
            .collect();
        assert_eq!(
            enc.route_configuration("caller", Some(&replace)),
            route_configuration("caller", mine).encode_to_vec()
        );
        assert_eq!(
            EncodedVhosts::new(std::iter::empty()).route_configuration("x", None),
            route_configuration("x", vec![]).encode_to_vec()
        );
    }

    #[test]
    fn host_is_agrees_with_host_key() {
        for (host, key) in [
            ("Echo.Default:8080", "echo.default"),
            ("echo", "echo"),
            ("echo:", "echo"),
            ("echo:http", "echo:http"),
            ("[::1]:80", "[::1]"),
        ] {
            assert_eq!(host_key(host), key);
            assert!(host_is(host, key), "{host}");
            assert!(!host_is(host, "other"));
        }
    }

    #[test]
    fn domains_cover_names_with_any_port_and_no_instance_port() {
        let d = domains("default", "echo");
        for want in [
            "echo",
            "echo:*",
            "echo.default",
            "echo.default:*",
            "echo.default.svc",
            "echo.default.svc:*",
            "echo.default.svc.cluster.local",
            "echo.default.svc.cluster.local:*",
        ] {
            assert!(d.contains(&want.to_string()), "{want}");
        }
        assert_eq!(d.len(), 8);
        let vh = virtual_host("x".into(), d, "c".into());
        assert_eq!(exact_domains(&vh).count(), 4);
        assert_eq!(host_key("Echo.Default:8080"), "echo.default");
        assert_eq!(host_key("echo.default"), "echo.default");
        assert_eq!(host_key("echo:abc"), "echo:abc");
    }

    #[test]
    fn a_domain_shared_by_two_virtual_hosts_goes_to_the_first() {
        let a = virtual_host("a".into(), domains("default", "echo"), "A".into());
        let b = virtual_host("b".into(), domains("default", "echo.default"), "B".into());
        let rc = route_configuration("r", vec![a, b]);
        let b = &rc.virtual_hosts[1];
        assert!(!b.domains.contains(&"echo.default".to_string()));
        assert!(b.domains.contains(&"echo.default.default".to_string()));
        let mut all: Vec<_> = rc
            .virtual_hosts
            .iter()
            .flat_map(|v| v.domains.iter().map(|d| d.to_ascii_lowercase()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
