//! The CA's key and certificates: from files, from the Kubernetes secret
//! `polaris-security-secret` (keys `ca-cert`, `ca-key`, `cert-chain`, `root-cert`), or, in
//! development, a self-signed root generated once in the data directory.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::sign::Issuer;

/// Where the CA's key and certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// PEM files: the signing certificate and its key; the chain above it (intermediates up to the
    /// root) and the root, when the signing certificate is not itself the root.
    Files {
        /// Signing certificate.
        cert: PathBuf,
        /// Its key.
        key: PathBuf,
        /// Intermediates above it, up to the root.
        chain: Option<PathBuf>,
        /// The root.
        root: Option<PathBuf>,
    },
    /// A Kubernetes secret `<namespace>/<name>` with keys `ca-cert`, `ca-key`, `cert-chain`,
    /// `root-cert` (PolarisMesh's `polaris-security-secret`).
    Secret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Development: a self-signed root generated once in this directory (mode 0600).
    Dev(PathBuf),
}

/// Why the CA's material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The secret could not be read.
    #[error("secret {0}: {1}")]
    Secret(String, String),
    /// Something is not what it should be.
    #[error("{0}")]
    Invalid(String),
    /// rcgen refused it.
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<String, MaterialError> {
    std::fs::read_to_string(path).map_err(|source| MaterialError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, data: &str) -> Result<(), MaterialError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| MaterialError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

/// The PEM material of a CA.
struct Pems {
    cert: String,
    key: String,
    chain: String,
    root: String,
}

/// Loads the issuer from `source`. Returns it and whether it is the development root.
pub async fn load(
    source: &Source,
    kube: Option<kube::Client>,
) -> Result<(Issuer, bool), MaterialError> {
    let (pems, dev) = match source {
        Source::Files {
            cert,
            key,
            chain,
            root,
        } => (
            Pems {
                cert: read(cert)?,
                key: read(key)?,
                chain: chain.as_deref().map(read).transpose()?.unwrap_or_default(),
                root: root.as_deref().map(read).transpose()?.unwrap_or_default(),
            },
            false,
        ),
        Source::Secret { namespace, name } => {
            let client = kube.ok_or_else(|| {
                MaterialError::Invalid("a Kubernetes client is needed to read the secret".into())
            })?;
            (read_secret(client, namespace, name).await?, false)
        }
        Source::Dev(dir) => (dev_root(dir)?, true),
    };
    Ok((issuer(pems)?, dev))
}

async fn read_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Pems, MaterialError> {
    use k8s_openapi::api::core::v1::Secret;
    let what = format!("{namespace}/{name}");
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let s = api
        .get(name)
        .await
        .map_err(|e| MaterialError::Secret(what.clone(), e.to_string()))?;
    let data = s.data.unwrap_or_default();
    let get = |k: &str| -> Result<String, MaterialError> {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| MaterialError::Secret(what.clone(), format!("no key {k}")))
    };
    Ok(Pems {
        cert: get("ca-cert")?,
        key: get("ca-key")?,
        chain: get("cert-chain").unwrap_or_default(),
        root: get("root-cert").unwrap_or_default(),
    })
}

/// The development root in `dir`: generated once (ECDSA P-256, ten years), then reused.
fn dev_root(dir: &Path) -> Result<Pems, MaterialError> {
    let cert_path = dir.join("root-cert.pem");
    let key_path = dir.join("root-key.pem");
    if !cert_path.exists() {
        std::fs::create_dir_all(dir).map_err(|source| MaterialError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "polaris-mesh development root CA");
        p.distinguished_name
            .push(DnType::OrganizationName, "polaris-mesh");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = std::time::SystemTime::now();
        p.not_before = (now - std::time::Duration::from_secs(3600)).into();
        p.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86400)).into();
        let cert = p.self_signed(&key)?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
    }
    Ok(Pems {
        cert: read(&cert_path)?,
        key: read(&key_path)?,
        chain: String::new(),
        root: String::new(),
    })
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MaterialError::Invalid(format!("bad PEM certificate: {e}")))
}

/// Builds the issuer and checks, at start, that the signing certificate chains to the root
/// through the given chain, and that the key is the certificate's.
/// The CA's key: PKCS#8 (`PRIVATE KEY`), or PKCS#1 RSA (`RSA PRIVATE KEY`, what `openssl genrsa`,
/// cert-manager and Helm's `genCA` write), converted to PKCS#8 for the signer.
fn key_pair(pem: &str) -> Result<KeyPair, MaterialError> {
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .map_err(|e| MaterialError::Invalid(format!("bad PKCS#1 RSA key: {e}")))?;
        let der = key
            .to_pkcs8_der()
            .map_err(|e| MaterialError::Invalid(format!("RSA key to PKCS#8: {e}")))?;
        return Ok(KeyPair::try_from(der.as_bytes())?);
    }
    if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
        return Err(MaterialError::Invalid(
            "an EC key in SEC1 form (EC PRIVATE KEY): convert it to PKCS#8 (openssl pkcs8 -topk8 -nocrypt)".into(),
        ));
    }
    Ok(KeyPair::from_pem(pem)?)
}

fn issuer(p: Pems) -> Result<Issuer, MaterialError> {
    let key = key_pair(&p.key)?;
    let signing = certs(&p.cert)?;
    let leaf = signing
        .first()
        .ok_or_else(|| MaterialError::Invalid("no CA certificate".into()))?
        .clone();
    let chain = certs(&p.chain)?;
    let root_pem = if p.root.trim().is_empty() {
        // No root given: the chain's last certificate, or the signing certificate itself.
        chain.last().map_or_else(
            || p.cert.clone(),
            |c| super::sign::pem("CERTIFICATE", c.as_ref()),
        )
    } else {
        p.root.clone()
    };
    let root = certs(&root_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| MaterialError::Invalid("no root certificate".into()))?;
    // The path: signing certificate, then the chain, ending at the root.
    let mut path: Vec<CertificateDer<'static>> = vec![leaf.clone()];
    path.extend(chain.iter().cloned());
    if path.last().map(|c| c.as_ref()) != Some(root.as_ref()) {
        path.push(root.clone());
    }
    for pair in path.windows(2) {
        let (_, child) = x509_parser::parse_x509_certificate(&pair[0])
            .map_err(|e| MaterialError::Invalid(format!("unreadable certificate: {e}")))?;
        let (_, parent) = x509_parser::parse_x509_certificate(&pair[1])
            .map_err(|e| MaterialError::Invalid(format!("unreadable certificate: {e}")))?;
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| {
                MaterialError::Invalid(format!(
                    "{} is not signed by {}",
                    child.subject(),
                    parent.subject()
                ))
            })?;
    }
    let (_, root_cert) = x509_parser::parse_x509_certificate(&root)
        .map_err(|e| MaterialError::Invalid(format!("unreadable root: {e}")))?;
    root_cert
        .verify_signature(None)
        .map_err(|_| MaterialError::Invalid("the root is not self-signed".into()))?;
    let (_, leaf_cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| MaterialError::Invalid(format!("unreadable CA certificate: {e}")))?;
    if leaf_cert.public_key().raw != key.public_key_der().as_slice() {
        return Err(MaterialError::Invalid(
            "the CA key is not the CA certificate's".into(),
        ));
    }
    let params = CertificateParams::from_ca_cert_pem(&p.cert)?;
    let cert = params.self_signed(&key)?;
    let chain_pem: String = path
        .iter()
        .map(|c| super::sign::pem("CERTIFICATE", c.as_ref()))
        .collect();
    Ok(Issuer {
        cert,
        key,
        chain_pem,
        root_pem: super::sign::pem("CERTIFICATE", root.as_ref()),
    })
}

/// A TLS server certificate signed by the issuer (for the CA's own HTTPS port, and the ADS port),
/// named `common_name`, for `names` (DNS names or IP addresses): its chain and key.
pub fn serving_cert(
    issuer: &Issuer,
    names: &[String],
    common_name: &str,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    MaterialError,
> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    let now = std::time::SystemTime::now();
    p.not_before = (now - super::sign::SKEW).into();
    p.not_after = (now + std::time::Duration::from_secs(365 * 86400)).into();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key)?;
    let mut chain = vec![cert.der().clone()];
    chain.extend(certs(&issuer.chain_pem)?);
    let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| MaterialError::Invalid(e.to_string()))?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(
        name: &str,
        issuer: Option<(&rcgen::Certificate, &KeyPair)>,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = match issuer {
            None => p.self_signed(&key).unwrap(),
            Some((c, k)) => p.signed_by(&key, c, k).unwrap(),
        };
        (cert, key)
    }

    #[test]
    fn a_pkcs1_rsa_key_signs_like_its_pkcs8_form() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePrivateKey;
        let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pkcs1 = rsa_key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let pkcs8 = rsa_key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let from1 = key_pair(&pkcs1).unwrap();
        let from8 = key_pair(&pkcs8).unwrap();
        assert_eq!(from1.public_key_der(), from8.public_key_der());
        assert!(std::ptr::eq(from1.algorithm(), &rcgen::PKCS_RSA_SHA256));
        // A self-signed root from that key is accepted as the CA's material.
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "rsa root");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = p.self_signed(&from1).unwrap();
        issuer(Pems {
            cert: cert.pem(),
            key: pkcs1.to_string(),
            chain: String::new(),
            root: String::new(),
        })
        .unwrap();
        let e = key_pair("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("PKCS#8"), "{e}");
    }

    #[test]
    fn an_intermediate_is_checked_against_the_root_and_its_chain_returned() {
        let (root, root_key) = ca("root", None);
        let (inter, inter_key) = ca("intermediate", Some((&root, &root_key)));
        let i = issuer(Pems {
            cert: inter.pem(),
            key: inter_key.serialize_pem(),
            chain: String::new(),
            root: root.pem(),
        })
        .unwrap();
        assert_eq!(certs(&i.chain_pem).unwrap().len(), 2);
        assert_eq!(certs(&i.root_pem).unwrap()[0].as_ref(), root.der().as_ref());
        // Another root: refused at start.
        let (other, _) = ca("other", None);
        assert!(issuer(Pems {
            cert: inter.pem(),
            key: inter_key.serialize_pem(),
            chain: String::new(),
            root: other.pem(),
        })
        .is_err());
        // A key that is not the certificate's: refused.
        assert!(issuer(Pems {
            cert: inter.pem(),
            key: root_key.serialize_pem(),
            chain: String::new(),
            root: root.pem(),
        })
        .is_err());
    }

    #[test]
    fn the_development_root_is_generated_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = dev_root(dir.path()).unwrap();
        let b = dev_root(dir.path()).unwrap();
        assert_eq!(a.cert, b.cert);
        let mode = std::fs::metadata(dir.path().join("root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        issuer(a).unwrap();
    }
}
