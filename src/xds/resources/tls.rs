//! mTLS between sidecars: the transport sockets of outbound clusters and inbound listeners for
//! each TLS mode.
//!
//! Certificates never pass through the control plane: every TLS context names the secrets
//! [`CERT_SECRET`] and [`ROOT_SECRET`], which Envoy fetches over SDS from the sidecar agent on
//! the static cluster [`SDS_CLUSTER`] (see `bootstrap-templates/envoy-tls.yaml`). Identities are
//! SPIFFE ids, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{
    api_config_source::ApiType, config_source::ConfigSourceSpecifier, grpc_service,
    transport_socket, ApiConfigSource, ApiVersion, ConfigSource, GrpcService, TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use envoy_types::util::pack_any;

use super::{CERT_SECRET, ROOT_SECRET};
use crate::model::{Service, TlsMode};

/// The bootstrap's static cluster that reaches the sidecar agent's SDS socket.
pub const SDS_CLUSTER: &str = "sds-grpc";

/// Endpoint metadata filter Envoy matches `transport_socket_matches` against.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Key in [`TRANSPORT_SOCKET_MATCH`] marking an endpoint that accepts mTLS (value `"true"`).
pub const ACCEPT_MTLS_KEY: &str = "acceptMTLS";

/// The trust domain when none is configured (Kubernetes' default cluster domain, as PolarisMesh).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const RAW_SOCKET: &str = "envoy.transport_sockets.raw_buffer";

/// The SPIFFE id of a ServiceAccount.
pub fn spiffe_id(trust_domain: &str, ns: &str, sa: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    set_node_on_first_message_only: true,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

fn san(pattern: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Our certificate (`default`), peers checked against the root (`ROOTCA`) and `sans`, TLS 1.2+.
fn common(sans: Vec<SubjectAltNameMatcher>) -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
            ..Default::default()
        }),
        tls_certificate_sds_secret_configs: vec![sds(CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The identities a caller accepts from the endpoints of `svc`: exactly its ServiceAccounts when
/// the service names them, else any of its namespace.
pub fn upstream_sans(svc: &Service, trust_domain: &str) -> Vec<SubjectAltNameMatcher> {
    let sas = svc.service_accounts();
    if sas.is_empty() {
        return vec![san(MatchPattern::Prefix(format!(
            "spiffe://{trust_domain}/ns/{}/sa/",
            svc.namespace
        )))];
    }
    sas.into_iter()
        .map(|sa| {
            san(MatchPattern::Exact(spiffe_id(
                trust_domain,
                &svc.namespace,
                sa,
            )))
        })
        .collect()
}

/// The SNI a caller sends to `svc`'s endpoints.
pub fn sni(svc: &Service) -> String {
    format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)
}

/// The client side of mTLS to `svc`.
pub fn upstream_tls(svc: &Service, trust_domain: &str) -> TransportSocket {
    TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            UpstreamTlsContext {
                common_tls_context: Some(common(upstream_sans(svc, trust_domain))),
                sni: sni(svc),
                ..Default::default()
            },
        ))),
    }
}

/// The server side of mTLS: a client certificate is required, from the trust domain.
pub fn downstream_tls(trust_domain: &str) -> TransportSocket {
    TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            DownstreamTlsContext {
                common_tls_context: Some(common(vec![san(MatchPattern::Prefix(format!(
                    "spiffe://{trust_domain}/"
                )))])),
                require_client_certificate: Some(BoolValue { value: true }),
                ..Default::default()
            },
        ))),
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: RAW_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            RawBuffer::default(),
        ))),
    }
}

/// How callers reach the endpoints of `svc` in `mode`, as `transport_socket_matches`:
/// - `none`: none (plaintext);
/// - `permissive`: mTLS to endpoints marked [`ACCEPT_MTLS_KEY`], plaintext to the rest;
/// - `strict`: mTLS to every endpoint (one match with no criteria).
///
/// Strict mode is a match rather than the cluster's `transport_socket` so that proxyless gRPC
/// clients, which ignore `transport_socket_matches` but reject SDS certificates in
/// `transport_socket`, keep the cluster and are refused by the server instead of rejecting the
/// configuration.
pub fn transport_socket_matches(
    svc: &Service,
    mode: TlsMode,
    trust_domain: &str,
) -> Vec<TransportSocketMatch> {
    let tls = |criteria: Option<Struct>| TransportSocketMatch {
        name: "tls-mode".to_string(),
        r#match: criteria,
        transport_socket: Some(upstream_tls(svc, trust_domain)),
    };
    match mode {
        TlsMode::None => vec![],
        TlsMode::Strict => vec![tls(None)],
        TlsMode::Permissive => vec![
            tls(Some(accept_mtls_struct())),
            TransportSocketMatch {
                name: "plaintext".to_string(),
                r#match: None,
                transport_socket: Some(raw_buffer()),
            },
        ],
    }
}

/// `{acceptMTLS: "true"}`: the endpoint metadata (under [`TRANSPORT_SOCKET_MATCH`]) and the
/// permissive match criteria.
pub fn accept_mtls_struct() -> Struct {
    Struct {
        fields: [(
            ACCEPT_MTLS_KEY.to_string(),
            Value {
                kind: Some(Kind::StringValue("true".to_string())),
            },
        )]
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use prost::Message;

    fn upstream(ts: &TransportSocket) -> UpstreamTlsContext {
        let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
            panic!("no typed config")
        };
        UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
    }

    fn sans_of(c: &CommonTlsContext) -> Vec<(i32, MatchPattern)> {
        let Some(ValidationContextType::CombinedValidationContext(v)) = &c.validation_context_type
        else {
            panic!("no combined validation context")
        };
        assert_eq!(
            v.validation_context_sds_secret_config
                .as_ref()
                .unwrap()
                .name,
            ROOT_SECRET
        );
        v.default_validation_context
            .as_ref()
            .unwrap()
            .match_typed_subject_alt_names
            .iter()
            .map(|m| {
                (
                    m.san_type,
                    m.matcher.clone().unwrap().match_pattern.unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn modes_become_transport_socket_matches() {
        let svc = Service::bare("shop", "echo", "t");
        assert!(transport_socket_matches(&svc, TlsMode::None, "td").is_empty());
        let strict = transport_socket_matches(&svc, TlsMode::Strict, "td");
        assert_eq!(strict.len(), 1);
        assert!(strict[0].r#match.is_none(), "strict matches every endpoint");
        let p = transport_socket_matches(&svc, TlsMode::Permissive, "td");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].r#match.as_ref().unwrap(), &accept_mtls_struct());
        assert_eq!(p[0].transport_socket.as_ref().unwrap().name, TLS_SOCKET);
        assert!(p[1].r#match.is_none());
        assert_eq!(p[1].transport_socket.as_ref().unwrap().name, RAW_SOCKET);
    }

    #[test]
    fn callers_check_the_destination_identity() {
        let mut svc = Service::bare("shop", "echo", "t");
        let u = upstream(&upstream_tls(&svc, "example.org"));
        assert_eq!(u.sni, "echo.shop.svc.cluster.local");
        let c = u.common_tls_context.unwrap();
        assert_eq!(c.tls_certificate_sds_secret_configs[0].name, CERT_SECRET);
        assert_eq!(
            c.tls_params.as_ref().unwrap().tls_minimum_protocol_version,
            TlsProtocol::TlSv12 as i32
        );
        assert_eq!(
            sans_of(&c),
            vec![(
                SanType::Uri as i32,
                MatchPattern::Prefix("spiffe://example.org/ns/shop/sa/".into())
            )]
        );
        svc.metadata.insert(
            crate::model::SERVICE_ACCOUNT_KEY.into(),
            "echo,echo-canary".into(),
        );
        let c = upstream(&upstream_tls(&svc, "example.org"))
            .common_tls_context
            .unwrap();
        assert_eq!(
            sans_of(&c),
            vec![
                (
                    SanType::Uri as i32,
                    MatchPattern::Exact("spiffe://example.org/ns/shop/sa/echo".into())
                ),
                (
                    SanType::Uri as i32,
                    MatchPattern::Exact("spiffe://example.org/ns/shop/sa/echo-canary".into())
                ),
            ]
        );
    }

    #[test]
    fn servers_require_a_client_certificate_of_the_trust_domain() {
        let ts = downstream_tls("example.org");
        let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
            panic!()
        };
        let d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            d.require_client_certificate,
            Some(BoolValue { value: true })
        );
        let c = d.common_tls_context.unwrap();
        assert_eq!(
            sans_of(&c),
            vec![(
                SanType::Uri as i32,
                MatchPattern::Prefix("spiffe://example.org/".into())
            )]
        );
        let sds = &c.tls_certificate_sds_secret_configs[0];
        let Some(ConfigSourceSpecifier::ApiConfigSource(api)) =
            &sds.sds_config.as_ref().unwrap().config_source_specifier
        else {
            panic!()
        };
        let Some(grpc_service::TargetSpecifier::EnvoyGrpc(g)) =
            &api.grpc_services[0].target_specifier
        else {
            panic!()
        };
        assert_eq!(g.cluster_name, SDS_CLUSTER);
    }
}
