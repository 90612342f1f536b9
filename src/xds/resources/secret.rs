//! Secrets (SDS): the workload's certificate and key, and the roots it trusts.

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};

/// The name of the workload's certificate secret (PolarisMesh's and Istio's).
pub const CERT_SECRET: &str = "default";
/// The name of the trust roots secret.
pub const ROOT_SECRET: &str = "ROOTCA";

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

/// The certificate secret: `chain_pem` (leaf first) and its private key.
pub fn certificate_secret(chain_pem: &str, key_pem: &str) -> Secret {
    Secret {
        name: CERT_SECRET.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    }
}

/// The trust roots secret.
pub fn root_secret(root_pem: &str) -> Secret {
    Secret {
        name: ROOT_SECRET.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(root_pem),
                ..Default::default()
            },
        )),
    }
}
