//! The CA's pure steps: read and verify a CSR, check that it asks for exactly the identity the
//! token proved, and sign it. No I/O; each step is tested on its own.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};

/// A workload identity: a Kubernetes ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount.
    pub service_account: String,
}

impl Identity {
    /// The identity of a TokenReview's `user.username` (`system:serviceaccount:<ns>:<sa>`).
    pub fn from_username(username: &str) -> Option<Identity> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (ns, sa) = rest.split_once(':')?;
        (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| Identity {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }

    /// The SPIFFE id of this identity in `trust_domain`.
    pub fn spiffe(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Why a request cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR is not a PEM CSR whose self-signature verifies.
    #[error("bad CSR: {0}")]
    BadCsr(String),
    /// The CSR asks for names other than one SPIFFE URI.
    #[error("bad CSR: {0}")]
    BadSans(String),
    /// The CSR's SPIFFE id is not the one the token proved.
    #[error("the CSR asks for {asked}, the token proves {proved}")]
    IdentityMismatch {
        /// What the CSR asks for.
        asked: String,
        /// What the token proves.
        proved: String,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A CSR whose self-signature verified (proof of possession of its key) and whose only name is
/// one SPIFFE URI.
pub struct VerifiedCsr {
    params: CertificateSigningRequestParams,
    /// The SPIFFE id it asks for.
    pub spiffe: String,
}

/// Reads a PEM CSR, verifies its signature, and requires that its only subject alternative name
/// is one `spiffe://` URI (no DNS, IP or e-mail names, no second URI).
pub fn parse_csr(pem: &str) -> Result<VerifiedCsr, SignError> {
    let params = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        SignError::BadCsr(match e {
            rcgen::Error::RingUnspecified => "its signature does not verify".to_string(),
            e => e.to_string(),
        })
    })?;
    let sans = &params.params.subject_alt_names;
    let spiffe = match sans.as_slice() {
        [SanType::URI(uri)] if uri.as_str().starts_with("spiffe://") => uri.as_str().to_string(),
        [] => {
            return Err(SignError::BadSans(
                "it names no SPIFFE id (one URI SAN spiffe://<trust domain>/ns/<ns>/sa/<sa>)"
                    .into(),
            ))
        }
        [one] => {
            return Err(SignError::BadSans(format!(
                "its only name must be a spiffe:// URI, not {one:?}"
            )))
        }
        many => {
            return Err(SignError::BadSans(format!(
                "it has {} names; only one spiffe:// URI is allowed",
                many.len()
            )))
        }
    };
    Ok(VerifiedCsr { params, spiffe })
}

/// Requires that `csr` asks for exactly `identity` in `trust_domain`.
pub fn check_identity(
    csr: &VerifiedCsr,
    identity: &Identity,
    trust_domain: &str,
) -> Result<(), SignError> {
    let proved = identity.spiffe(trust_domain);
    if csr.spiffe == proved {
        Ok(())
    } else {
        Err(SignError::IdentityMismatch {
            asked: csr.spiffe.clone(),
            proved,
        })
    }
}

/// The key and certificate that sign.
pub struct Issuer {
    /// The signing certificate (its parameters: name, key identifier).
    pub cert: rcgen::Certificate,
    /// Its key.
    pub key: rcgen::KeyPair,
    /// PEM of the signing certificate and the chain above it, up to and including the root.
    pub chain_pem: String,
    /// PEM of the root.
    pub root_pem: String,
}

/// DER as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Clock skew tolerated: certificates are valid from a minute before they are issued.
pub const SKEW: Duration = Duration::from_secs(60);

/// Signs `csr` for `ttl`: a leaf for client and server authentication, not a CA, with a random
/// 128-bit serial and only the verified SPIFFE id as name. Nothing else the CSR asks for (key
/// usages, other extensions, its subject) is copied.
pub fn sign(
    csr: VerifiedCsr,
    issuer: &Issuer,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, SignError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(td) = csr
        .spiffe
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
    {
        dn.push(DnType::OrganizationName, td);
    }
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![SanType::URI(csr.spiffe.clone().try_into().map_err(
            |_| SignError::BadSans("the SPIFFE id is not ASCII".into()),
        )?)];
    params.not_before = (now - SKEW).into();
    params.not_after = (now + ttl).into();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).expect("the system's random source");
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let request = CertificateSigningRequestParams {
        params,
        public_key: csr.params.public_key,
    };
    let leaf = request.signed_by(&issuer.cert, &issuer.key)?;
    Ok(leaf.pem())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed root for tests.
    pub(crate) fn test_issuer() -> Issuer {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "test root");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        let pem = cert.pem();
        Issuer {
            cert,
            key,
            chain_pem: pem.clone(),
            root_pem: pem,
        }
    }

    pub(crate) fn csr_with(sans: Vec<SanType>) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    fn sa(ns: &str, sa: &str) -> Identity {
        Identity {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn usernames_of_service_accounts() {
        assert_eq!(
            Identity::from_username("system:serviceaccount:t1:sa1"),
            Some(sa("t1", "sa1"))
        );
        assert_eq!(Identity::from_username("admin"), None);
        assert_eq!(Identity::from_username("system:serviceaccount:t1"), None);
        assert_eq!(Identity::from_username("system:serviceaccount::x"), None);
        assert_eq!(
            sa("t1", "a").spiffe("cluster.local"),
            "spiffe://cluster.local/ns/t1/sa/a"
        );
    }

    #[test]
    fn a_csr_naming_exactly_its_spiffe_id_is_signed_for_it_only() {
        let issuer = test_issuer();
        let id = sa("t1", "a");
        let csr = parse_csr(&csr_with(vec![uri(&id.spiffe("cluster.local"))])).unwrap();
        check_identity(&csr, &id, "cluster.local").unwrap();
        let now = SystemTime::now();
        let pem = sign(csr, &issuer, Duration::from_secs(3600), now).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateDer| d)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(sans, vec!["URI(spiffe://cluster.local/ns/t1/sa/a)"]);
        assert!(!cert.is_ca());
        let v = cert.validity();
        let nb = v.not_before.timestamp();
        let na = v.not_after.timestamp();
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now_s - 61..=now_s - 59).contains(&nb),
            "not before a minute back"
        );
        assert!((now_s + 3599..=now_s + 3601).contains(&na));
        assert!(cert.tbs_certificate.raw_serial().len() >= 15);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        // It chains to the issuer.
        let (_, root) = x509_parser::parse_x509_certificate(issuer.cert.der()).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn another_identity_is_forbidden() {
        let csr = parse_csr(&csr_with(vec![uri("spiffe://cluster.local/ns/t1/sa/b")])).unwrap();
        assert!(matches!(
            check_identity(&csr, &sa("t1", "a"), "cluster.local"),
            Err(SignError::IdentityMismatch { .. })
        ));
        // The same path in another trust domain is another identity.
        let csr = parse_csr(&csr_with(vec![uri("spiffe://evil.example/ns/t1/sa/a")])).unwrap();
        assert!(check_identity(&csr, &sa("t1", "a"), "cluster.local").is_err());
    }

    #[test]
    fn csrs_with_other_names_or_bad_signatures_are_bad() {
        let spiffe = uri("spiffe://cluster.local/ns/t1/sa/a");
        let dns = SanType::DnsName("evil.example".to_string().try_into().unwrap());
        for sans in [
            vec![spiffe.clone(), dns.clone()],
            vec![dns],
            vec![],
            vec![spiffe.clone(), uri("spiffe://cluster.local/ns/t1/sa/b")],
            vec![SanType::IpAddress("10.0.0.1".parse().unwrap())],
            vec![uri("https://example.com")],
        ] {
            assert!(
                matches!(
                    parse_csr(&csr_with(sans.clone())),
                    Err(SignError::BadSans(_))
                ),
                "{sans:?}"
            );
        }
        assert!(matches!(parse_csr("garbage"), Err(SignError::BadCsr(_))));
        // Flip one bit of the signature: proof of possession fails.
        let good = csr_with(vec![spiffe]);
        let der: Vec<u8> = rustls_pki_types::pem::PemObject::from_pem_slice(good.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
            .unwrap();
        let mut bad = der.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x01;
        let bad_pem = pem("CERTIFICATE REQUEST", &bad);
        assert!(matches!(parse_csr(&bad_pem), Err(SignError::BadCsr(_))));
    }
}
