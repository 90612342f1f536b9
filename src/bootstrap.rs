//! `polaris bootstrap`: renders the Envoy bootstrap from `bootstrap-templates/envoy.yaml`, or with
//! `--tls` from `bootstrap-templates/envoy-tls.yaml` (plus the static cluster `sds-grpc` to the
//! sidecar agent's SDS socket).
//!
//! The templates are compiled into the binary (so the command works from any directory);
//! `--template` renders another file with the same placeholders.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

use crate::xds::resources::{NODE_NAMESPACE_KEY, NODE_OUTBOUND_PORT_KEY};

/// The default template.
pub const TEMPLATE: &str = include_str!("../bootstrap-templates/envoy.yaml");

/// The template for sidecars in mTLS (`--tls`).
pub const TLS_TEMPLATE: &str = include_str!("../bootstrap-templates/envoy-tls.yaml");

/// Where the sidecar agent serves SDS by default (PolarisMesh's path).
pub const DEFAULT_SDS_SOCKET: &str = "/var/run/polaris-sidecar/mtls/sds.sock";

/// `polaris bootstrap` arguments.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Node id, e.g. `sidecar~default/pod-1~10.0.0.5`.
    #[arg(long)]
    pub node_id: String,
    /// Control plane ADS address, `HOST:PORT`; replicas of one control plane comma-separated
    /// (Envoy connects to one and moves to another when it goes).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    /// Envoy admin port (on 127.0.0.1).
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Outbound listener port the control plane should give this node.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The namespace whose services the node sees [default: from the node id, else `default`].
    #[arg(long)]
    pub namespace: Option<String>,
    /// Extra node metadata, `key=value` (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Use state-of-the-world ADS instead of delta.
    #[arg(long)]
    pub sotw: bool,
    /// Node cluster name.
    #[arg(long, default_value = "polaris-mesh")]
    pub cluster: String,
    /// Render this template instead of the built-in one.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// mTLS: certificates over SDS from the sidecar agent (`polaris agent`).
    #[arg(long)]
    pub tls: bool,
    /// The sidecar agent's SDS socket (with `--tls`).
    #[arg(long, default_value = DEFAULT_SDS_SOCKET)]
    pub sds_socket: PathBuf,
    /// Where the node runs, `region/zone[/campus]` (nearby routing).
    #[arg(long)]
    pub locality: Option<String>,
    /// With `--tls`: ADS in plaintext (a development control plane on loopback) instead of mTLS.
    #[arg(long, requires = "tls")]
    pub xds_plaintext: bool,
    /// Write the bootstrap to this file instead of standard output (an init container without a
    /// shell writes Envoy's configuration this way).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The ADS cluster's mTLS: the agent's certificate, the control plane checked against the roots
/// and its name (an IP address or a DNS name, as `--xds-addr` gives it).
fn xds_tls(host: &str) -> String {
    let (san_type, sni) = match host.parse::<IpAddr>() {
        Ok(_) => ("IP_ADDRESS", String::new()),
        Err(_) => ("DNS", format!("\n        sni: \"{host}\"")),
    };
    let sds = |name: &str| {
        format!(
            "name: {name}\n              sds_config: {{ resource_api_version: V3, api_config_source: {{ api_type: GRPC, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {{ cluster_name: sds-grpc }} }}] }} }}"
        )
    };
    format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext{sni}
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificate_sds_secret_configs:
            - {cert}
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names:
              - san_type: {san_type}
                matcher: {{ exact: "{host}" }}
            validation_context_sds_secret_config:
              {root}
"#,
        cert = sds("default"),
        root = sds("ROOTCA"),
    )
}

/// Bootstrap errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag is malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Flag.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The template could not be read.
    #[error("reading template: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Renders the bootstrap YAML.
pub fn render(a: &BootstrapArgs) -> Result<String, Error> {
    if a.node_id.is_empty() || a.node_id.contains(['"', '\\', '\n']) {
        return Err(invalid(
            "--node-id",
            "must be non-empty without quotes, backslashes or newlines",
        ));
    }
    let mut addrs: Vec<(&str, u16)> = Vec::new();
    for addr in a.xds_addr.split(',') {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| invalid("--xds-addr", "expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid("--xds-addr", format!("{port:?} is not a port")))?;
        if host.is_empty() || host.contains(['"', '\\', ' ']) {
            return Err(invalid("--xds-addr", "bad host"));
        }
        addrs.push((host, port));
    }
    let (host, port) = addrs[0];
    for (f, p) in [
        ("--admin-port", a.admin_port),
        ("--outbound-port", a.outbound_port),
    ] {
        if p == 0 {
            return Err(invalid(f, "must be 1..=65535"));
        }
    }
    let mut md = BTreeMap::new();
    if let Some(ns) = &a.namespace {
        crate::model::validate_namespace_name(ns, "namespace")
            .map_err(|e| invalid("--namespace", e.reason))?;
        md.insert(NODE_NAMESPACE_KEY.to_string(), ns.clone());
    }
    md.insert(
        NODE_OUTBOUND_PORT_KEY.to_string(),
        a.outbound_port.to_string(),
    );
    for kv in &a.metadata {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| invalid("--metadata", format!("{kv:?} is not KEY=VALUE")))?;
        md.insert(k.to_string(), v.to_string());
    }
    let sds_socket = a.sds_socket.to_str().unwrap_or_default();
    if a.tls && (!sds_socket.starts_with('/') || sds_socket.contains(['"', '\\', '\n'])) {
        return Err(invalid(
            "--sds-socket",
            "must be an absolute path without quotes, backslashes or newlines",
        ));
    }
    let locality = match &a.locality {
        None => String::new(),
        Some(l) => {
            let parts: Vec<&str> = l.split('/').collect();
            let ok = |p: &str| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
                return Err(invalid(
                    "--locality",
                    "region/zone or region/zone/campus, each of letters, digits, - _ .",
                ));
            }
            format!(
                "  locality: {{ region: \"{}\", zone: \"{}\", sub_zone: \"{}\" }}\n",
                parts[0],
                parts[1],
                parts.get(2).copied().unwrap_or_default()
            )
        }
    };
    let template = match (&a.template, a.tls) {
        (Some(p), _) => std::fs::read_to_string(p)?,
        (None, false) => TEMPLATE.to_string(),
        (None, true) => TLS_TEMPLATE.to_string(),
    };
    let cluster_type = if addrs.iter().all(|(h, _)| h.parse::<IpAddr>().is_ok()) {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    // One endpoint per control-plane address: the template's endpoint, repeated.
    const ENDPOINT: &str = "        - endpoint:\n            address:\n              socket_address: { address: \"{{XDS_HOST}}\", port_value: {{XDS_PORT}} }\n";
    let template = if template.contains(ENDPOINT) {
        let endpoints: String = addrs
            .iter()
            .map(|(h, p)| {
                ENDPOINT
                    .replace("{{XDS_HOST}}", h)
                    .replace("{{XDS_PORT}}", &p.to_string())
            })
            .collect();
        template.replace(ENDPOINT, &endpoints)
    } else {
        template
    };
    let metadata = serde_json::to_string(&md).expect("string map serializes");
    Ok(template
        .replace("{{NODE_ID}}", &a.node_id)
        .replace("{{NODE_CLUSTER}}", &a.cluster)
        .replace("{{METADATA}}", &metadata)
        .replace("{{ADMIN_PORT}}", &a.admin_port.to_string())
        .replace("{{API_TYPE}}", if a.sotw { "GRPC" } else { "DELTA_GRPC" })
        .replace("{{XDS_CLUSTER_TYPE}}", cluster_type)
        .replace("{{XDS_HOST}}", host)
        .replace("{{XDS_PORT}}", &port.to_string())
        .replace("{{SDS_SOCKET}}", sds_socket)
        .replace("{{LOCALITY}}\n", &locality)
        .replace(
            "{{XDS_TRANSPORT_SOCKET}}\n",
            &if a.xds_plaintext {
                String::new()
            } else {
                xds_tls(host)
            },
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> BootstrapArgs {
        BootstrapArgs {
            node_id: "sidecar~default/pod-1~10.0.0.5".into(),
            xds_addr: "127.0.0.1:15010".into(),
            admin_port: 15000,
            outbound_port: 15001,
            namespace: Some("default".into()),
            metadata: vec!["app=echo".into()],
            sotw: false,
            cluster: "polaris-mesh".into(),
            template: None,
            tls: false,
            sds_socket: DEFAULT_SDS_SOCKET.into(),
            xds_plaintext: false,
            output: None,
            locality: None,
        }
    }

    #[test]
    fn golden_delta() {
        let got = render(&args()).unwrap();
        let want = include_str!("../tests/golden/bootstrap-delta.yaml");
        assert_eq!(got, want);
    }

    #[test]
    fn golden_sotw_dns() {
        let a = BootstrapArgs {
            sotw: true,
            xds_addr: "polaris.polaris-system:15010".into(),
            namespace: None,
            metadata: vec![],
            ..args()
        };
        let got = render(&a).unwrap();
        let want = include_str!("../tests/golden/bootstrap-sotw.yaml");
        assert_eq!(got, want);
    }

    #[test]
    fn golden_tls() {
        let a = BootstrapArgs {
            tls: true,
            metadata: vec![
                "app=echo".into(),
                "sidecar.polarismesh.cn/serviceName=echo".into(),
                "polarismesh.cn/inboundPort=15006".into(),
            ],
            ..args()
        };
        let got = render(&a).unwrap();
        let want = include_str!("../tests/golden/bootstrap-tls.yaml");
        assert_eq!(got, want);
        assert!(!got.contains("{{"), "a placeholder is left");
        // For a development control plane the ADS connection can stay plaintext.
        let plain = render(&BootstrapArgs {
            xds_plaintext: true,
            ..a
        })
        .unwrap();
        assert!(!plain.contains("UpstreamTlsContext") && plain.contains("sds-grpc"));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let e = |a: BootstrapArgs| match render(&a).unwrap_err() {
            Error::Invalid { field, .. } => field,
            e => panic!("{e}"),
        };
        assert_eq!(
            e(BootstrapArgs {
                xds_addr: "nope".into(),
                ..args()
            }),
            "--xds-addr"
        );
        assert_eq!(
            e(BootstrapArgs {
                xds_addr: "h:0".into(),
                ..args()
            }),
            "--xds-addr"
        );
        assert_eq!(
            e(BootstrapArgs {
                admin_port: 0,
                ..args()
            }),
            "--admin-port"
        );
        assert_eq!(
            e(BootstrapArgs {
                metadata: vec!["novalue".into()],
                ..args()
            }),
            "--metadata"
        );
        assert_eq!(
            e(BootstrapArgs {
                namespace: Some("Bad NS".into()),
                ..args()
            }),
            "--namespace"
        );
        assert_eq!(
            e(BootstrapArgs {
                node_id: String::new(),
                ..args()
            }),
            "--node-id"
        );
        assert_eq!(
            e(BootstrapArgs {
                tls: true,
                sds_socket: "relative/sds.sock".into(),
                ..args()
            }),
            "--sds-socket"
        );
        assert_eq!(
            e(BootstrapArgs {
                locality: Some("r1".into()),
                ..args()
            }),
            "--locality"
        );
        let with = render(&BootstrapArgs {
            locality: Some("r1/z1".into()),
            ..args()
        })
        .unwrap();
        assert!(with.contains("locality: { region: \"r1\", zone: \"z1\", sub_zone: \"\" }"));
    }
}
