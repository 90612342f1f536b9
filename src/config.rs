//! Server configuration: defaults, then the YAML file (`--config`), then flags; flags win.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: serde_yaml::Error,
    },
    /// A value is out of range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether the REST API authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// On when the REST port is bound to a non-loopback address.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Off, even on a non-loopback address (logged as a warning at every start).
    Off,
}

/// Where the registry is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// redb in the data directory: one server.
    #[default]
    Embedded,
    /// etcd v3, shared by every replica (`etcdEndpoints`, `etcdPrefix`).
    Etcd,
}

/// The server's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the registry is stored.
    pub store: StoreKind,
    /// etcd client URLs (`store: etcd`).
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this registry in etcd.
    pub etcd_prefix: String,
    /// etcd user (with `etcdPasswordFile`).
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    pub etcd_password_file: Option<PathBuf>,
    /// CA bundle (PEM) etcd's certificate chains to.
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    pub etcd_cert_file: Option<PathBuf>,
    /// Its key (PEM).
    pub etcd_key_file: Option<PathBuf>,
    /// etcd's `--max-txn-ops`: most keys one commit may write.
    pub etcd_max_txn_ops: usize,
    /// How the other replicas reach this one's REST API (`store: etcd`) [default: from httpAddr,
    /// which must then not be 0.0.0.0].
    pub advertise_url: Option<String>,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// REST API, `/metrics`, `/healthz`.
    pub http_addr: SocketAddr,
    /// ADS gRPC.
    pub xds_addr: SocketAddr,
    /// PolarisMesh's gRPC client API (`v1.PolarisGRPC`: registrations, heartbeats, discovery);
    /// `null` turns it off.
    pub grpc_addr: Option<SocketAddr>,
    /// Log filter (`info`, `polaris_mesh=debug`, ...).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Heartbeat checker scan interval in milliseconds.
    pub health_check_interval_ms: u64,
    /// xDS: how long to gather a burst of registry changes before pushing, in milliseconds. The
    /// first change after a quiet period is pushed at once.
    pub xds_debounce_ms: u64,
    /// Largest xDS request decoded, in bytes; a larger one ends its stream with
    /// `RESOURCE_EXHAUSTED`.
    pub xds_max_request_bytes: usize,
    /// Bytes of xDS requests being received and decoded at once, across all streams; past it new
    /// reads wait (back-pressure).
    pub xds_decode_budget_bytes: usize,
    /// Open connections on the xDS port at most.
    pub xds_max_connections: usize,
    /// Open connections on the REST port at most.
    pub http_max_connections: usize,
    /// Time a new connection (either port) has to send its first request, in milliseconds; an
    /// xDS request must also arrive whole within it once its first bytes are in.
    pub first_request_timeout_ms: u64,
    /// Time each step of a service's TLS mode change has to reach every proxy, in milliseconds
    /// (a change takes up to three steps). Raise it above the push p99 of large meshes.
    pub xds_tls_phase_ms: u64,
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// The CA's HTTPS address; the CA is off unless set.
    pub ca_addr: Option<SocketAddr>,
    /// The CA's signing certificate (PEM); with `caKeyFile`. Without them (and without
    /// `caSecret`), a development root is generated in the data directory.
    pub ca_cert_file: Option<PathBuf>,
    /// The CA's key (PEM).
    pub ca_key_file: Option<PathBuf>,
    /// Intermediates above the signing certificate, up to the root (PEM).
    pub ca_chain_file: Option<PathBuf>,
    /// The root (PEM), when the signing certificate is an intermediate.
    pub ca_root_file: Option<PathBuf>,
    /// The CA's material from the Kubernetes secret `<namespace>/<name>` (keys `ca-cert`,
    /// `ca-key`, `cert-chain`, `root-cert`).
    pub ca_secret: Option<String>,
    /// Certificate lifetime when a request asks for none, in seconds.
    pub ca_default_ttl_secs: u64,
    /// Longest certificate lifetime granted, in seconds.
    pub ca_max_ttl_secs: u64,
    /// Audiences a ServiceAccount token must be for.
    pub ca_audiences: Vec<String>,
    /// Certificates per minute per identity.
    pub ca_signs_per_minute: u32,
    /// How long a positive TokenReview is reused, in seconds (0: never).
    pub ca_review_cache_secs: u64,
    /// More names for the CA's serving certificate.
    pub ca_dns_names: Vec<String>,
    /// Kubeconfig for the Kubernetes API (TokenReview, secrets); default: in-cluster, then
    /// `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// REST authentication (`X-Polaris-Token`): `auto` (on unless the REST port is loopback), `on`,
    /// `off`.
    pub auth: AuthMode,
    /// File holding the bootstrap admin token's secret. Without it (and without
    /// `POLARIS_ADMIN_TOKEN`), a secret is generated at the first start with auth on and written
    /// to `<dataDir>/admin-token` (mode 0600).
    pub admin_token_file: Option<PathBuf>,
    /// The bootstrap admin secret from the environment (`POLARIS_ADMIN_TOKEN`); never from a file
    /// of settings.
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// `/metrics` without a token when auth is on.
    pub public_metrics: bool,
    /// `/debug/*` without a token when auth is on.
    pub public_debug: bool,
    /// Failed authentications per minute per source address before they are answered 403001.
    pub auth_failures_per_minute: u32,
    /// ADS authentication: `auto` (on unless the xDS port is loopback), `on`, `off`. On, the port
    /// speaks TLS and each stream proves a workload identity (client certificate, or a
    /// ServiceAccount token); `off` on a non-loopback address is for development and logged.
    pub xds_auth: AuthMode,
    /// The ADS port's certificate chain (PEM); with `xdsKeyFile`. Without them, the CA (which
    /// must be on) issues one.
    pub xds_cert_file: Option<PathBuf>,
    /// The ADS port's key (PEM).
    pub xds_key_file: Option<PathBuf>,
    /// Roots client certificates must chain to (PEM) [default: the CA's root].
    pub xds_client_ca_file: Option<PathBuf>,
    /// More names for the ADS port's certificate (besides `localhost` and its address).
    pub xds_dns_names: Vec<String>,
    /// Audiences a ServiceAccount token presented on the ADS port must be for.
    pub xds_audiences: Vec<String>,
    /// Namespace of an authenticated identity → the other namespaces its nodes may see (`*`:
    /// all). Unlisted namespaces see only themselves.
    pub xds_visibility: std::collections::BTreeMap<String, Vec<String>>,
    /// Serve the global rate-limit service on this address [default: off; global rate-limit
    /// rules are then refused].
    pub rls_addr: Option<SocketAddr>,
    /// The address sidecars reach the rate-limit service at [default: `rlsAddr`].
    pub rls_advertise_addr: Option<crate::model::HostPort>,
    /// Buckets of distinct request values per rule amount in the rate-limit service.
    pub rls_max_values: usize,
    /// Sync Kubernetes Services and EndpointSlices into the registry (the controller, in this
    /// process; the Kubernetes API from `kubeconfig`).
    pub kubernetes: bool,
    /// This cluster's name in what its controller writes (`clusterName`): several clusters may
    /// sync into one control plane.
    pub cluster_name: String,
    /// Which Services are synced: `all` (but system namespaces and Services annotated
    /// `polarismesh.cn/sync: "false"`) or `demand` (annotated `"true"`, or in namespaces that are).
    pub sync_mode: crate::controller::translate::SyncMode,
    /// Everything is reconciled this often, in seconds.
    pub kube_resync_secs: u64,
    /// Serve the sidecar injector's admission webhook (HTTPS, `/inject`) on this address.
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate chain (PEM); the MutatingWebhookConfiguration's caBundle must
    /// verify it.
    pub webhook_cert_file: Option<PathBuf>,
    /// The webhook's key (PEM).
    pub webhook_key_file: Option<PathBuf>,
    /// Names for the webhook's certificate when the CA issues it (the Service's DNS names).
    pub webhook_dns_names: Vec<String>,
    /// Inject pods whose pod and namespace labels say nothing.
    pub inject_default: bool,
    /// Injected pods get the agent and the mTLS bootstrap unless annotated
    /// `polarismesh.cn/tls-mode: none`.
    pub inject_mtls: bool,
    /// The `polaris` image injected (bootstrap, agent).
    pub polaris_image: String,
    /// The Envoy image injected.
    pub envoy_image: String,
    /// The ADS address injected sidecars reach.
    pub sidecar_xds_addr: String,
    /// The CA address injected agents reach.
    pub sidecar_ca_addr: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            store: StoreKind::Embedded,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: "/polaris".into(),
            etcd_user: None,
            etcd_password_file: None,
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_max_txn_ops: 128,
            advertise_url: None,
            http_addr: "127.0.0.1:8090".parse().expect("literal"),
            xds_addr: "127.0.0.1:15010".parse().expect("literal"),
            grpc_addr: Some("127.0.0.1:8091".parse().expect("literal")),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            health_check_interval_ms: 250,
            xds_debounce_ms: 5,
            xds_max_request_bytes: 4 << 20,
            xds_decode_budget_bytes: 64 << 20,
            xds_max_connections: 20_000,
            http_max_connections: 10_000,
            first_request_timeout_ms: 10_000,
            xds_tls_phase_ms: 400,
            auth: AuthMode::Auto,
            xds_auth: AuthMode::Auto,
            xds_cert_file: None,
            xds_key_file: None,
            xds_client_ca_file: None,
            xds_dns_names: vec![],
            xds_audiences: vec!["polaris-ca".into()],
            xds_visibility: Default::default(),
            rls_addr: None,
            rls_advertise_addr: None,
            rls_max_values: 10_000,
            admin_token_file: None,
            admin_token: None,
            public_metrics: true,
            public_debug: false,
            auth_failures_per_minute: 30,
            trust_domain: "cluster.local".into(),
            ca_addr: None,
            ca_cert_file: None,
            ca_key_file: None,
            ca_chain_file: None,
            ca_root_file: None,
            ca_secret: None,
            ca_default_ttl_secs: 3600,
            ca_max_ttl_secs: 86_400,
            ca_audiences: vec!["polaris-ca".into()],
            ca_signs_per_minute: 10,
            ca_review_cache_secs: 30,
            ca_dns_names: vec![],
            kubeconfig: None,
            webhook_addr: None,
            webhook_cert_file: None,
            webhook_key_file: None,
            webhook_dns_names: vec![],
            inject_default: false,
            inject_mtls: true,
            polaris_image: crate::inject::patch::Config::default().polaris_image,
            envoy_image: crate::inject::patch::Config::default().envoy_image,
            sidecar_xds_addr: crate::inject::patch::Config::default().xds_addr,
            sidecar_ca_addr: crate::inject::patch::Config::default().ca_addr,
            kubernetes: false,
            cluster_name: "default".into(),
            sync_mode: Default::default(),
            kube_resync_secs: 30,
        }
    }
}

impl ServerConfig {
    /// Reads a YAML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), Error> {
        if self.store == StoreKind::Etcd {
            if self.etcd_endpoints.is_empty() {
                return Err(Error::Invalid {
                    field: "etcdEndpoints",
                    reason: "at least one with store: etcd".into(),
                });
            }
            if !self.etcd_prefix.starts_with('/')
                || self.etcd_prefix.trim_end_matches('/').is_empty()
            {
                return Err(Error::Invalid {
                    field: "etcdPrefix",
                    reason: "a key path such as /polaris".into(),
                });
            }
            if self.advertise_url.is_none() && self.http_addr.ip().is_unspecified() {
                return Err(Error::Invalid {
                    field: "advertiseUrl",
                    reason: format!(
                        "replicas forward heartbeats to each other: give the URL they reach this one at (httpAddr {} is not one)",
                        self.http_addr
                    ),
                });
            }
            if self.etcd_max_txn_ops < 2 {
                return Err(Error::Invalid {
                    field: "etcdMaxTxnOps",
                    reason: "at least 2".into(),
                });
            }
        }
        if !(10..=60_000).contains(&self.health_check_interval_ms) {
            return Err(Error::Invalid {
                field: "healthCheckIntervalMs",
                reason: "must be 10..=60000".into(),
            });
        }
        if self.xds_debounce_ms > 10_000 {
            return Err(Error::Invalid {
                field: "xdsDebounceMs",
                reason: "must be at most 10000".into(),
            });
        }
        if !(1024..=(64 << 20)).contains(&self.xds_max_request_bytes) {
            return Err(Error::Invalid {
                field: "xdsMaxRequestBytes",
                reason: "must be 1 KiB..=64 MiB".into(),
            });
        }
        if self.xds_decode_budget_bytes < self.xds_max_request_bytes + 5 {
            return Err(Error::Invalid {
                field: "xdsDecodeBudgetBytes",
                reason: format!(
                    "must hold at least one request of xdsMaxRequestBytes ({} bytes) and its 5-byte frame header",
                    self.xds_max_request_bytes
                ),
            });
        }
        for (field, v) in [
            ("xdsMaxConnections", self.xds_max_connections),
            ("httpMaxConnections", self.http_max_connections),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(Error::Invalid {
                    field,
                    reason: "must be 1..=1000000".into(),
                });
            }
        }
        if self.trust_domain.is_empty()
            || !self
                .trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(Error::Invalid {
                field: "trustDomain",
                reason: "must be a non-empty name of a-z, 0-9, '-', '.', '_' (SPIFFE)".into(),
            });
        }
        for (ns, seen) in &self.xds_visibility {
            let ok = |n: &str| crate::model::validate_namespace_name(n, "xdsVisibility").is_ok();
            if !ok(ns) || seen.iter().any(|n| n != "*" && !ok(n)) {
                return Err(Error::Invalid {
                    field: "xdsVisibility",
                    reason: format!("{ns}: keys and values are namespace names (or *)"),
                });
            }
        }
        if let (Some(a), None) = (self.rls_addr, &self.rls_advertise_addr) {
            if a.ip().is_unspecified() {
                return Err(Error::Invalid {
                    field: "rlsAdvertiseAddr",
                    reason: format!(
                        "rlsAddr {a} is not an address sidecars can reach: give rlsAdvertiseAddr"
                    ),
                });
            }
        }
        if !(1..=10_000_000).contains(&self.rls_max_values) {
            return Err(Error::Invalid {
                field: "rlsMaxValues",
                reason: "must be 1..=10000000".into(),
            });
        }
        if self.xds_cert_file.is_some() != self.xds_key_file.is_some() {
            return Err(Error::Invalid {
                field: "xdsCertFile",
                reason: "give xdsCertFile and xdsKeyFile together".into(),
            });
        }
        if self.xds_tls_phase_ms > 60_000 {
            return Err(Error::Invalid {
                field: "xdsTlsPhaseMs",
                reason: "must be at most 60000".into(),
            });
        }
        self.ca()?;
        if !(100..=600_000).contains(&self.first_request_timeout_ms) {
            return Err(Error::Invalid {
                field: "firstRequestTimeoutMs",
                reason: "must be 100..=600000".into(),
            });
        }
        Ok(())
    }

    /// The CA's settings, if it is on.
    pub fn ca(&self) -> Result<Option<crate::ca::Config>, Error> {
        let Some(addr) = self.ca_addr else {
            return Ok(None);
        };
        use crate::ca::material::Source;
        let source = match (&self.ca_cert_file, &self.ca_key_file, &self.ca_secret) {
            (Some(cert), Some(key), None) => Source::Files {
                cert: cert.clone(),
                key: key.clone(),
                chain: self.ca_chain_file.clone(),
                root: self.ca_root_file.clone(),
            },
            (None, None, Some(secret)) => {
                let (namespace, name) = secret.split_once('/').ok_or(Error::Invalid {
                    field: "caSecret",
                    reason: "must be <namespace>/<name>".into(),
                })?;
                Source::Secret {
                    namespace: namespace.into(),
                    name: name.into(),
                }
            }
            (None, None, None) => Source::Dev(self.data_dir.join("ca")),
            _ => {
                return Err(Error::Invalid {
                    field: "caCertFile",
                    reason: "give caCertFile and caKeyFile together, or caSecret, not both".into(),
                })
            }
        };
        if self.ca_default_ttl_secs == 0 || self.ca_default_ttl_secs > self.ca_max_ttl_secs {
            return Err(Error::Invalid {
                field: "caDefaultTtlSecs",
                reason: "must be 1..=caMaxTtlSecs".into(),
            });
        }
        Ok(Some(crate::ca::Config {
            addr,
            trust_domain: self.trust_domain.clone(),
            default_ttl: Duration::from_secs(self.ca_default_ttl_secs),
            max_ttl: Duration::from_secs(self.ca_max_ttl_secs),
            audiences: self.ca_audiences.clone(),
            signs_per_minute: self.ca_signs_per_minute,
            review_cache: Duration::from_secs(self.ca_review_cache_secs),
            review_timeout: Duration::from_secs(5),
            source,
            dns_names: self.ca_dns_names.clone(),
        }))
    }

    /// Whether the ADS port authenticates.
    pub fn xds_auth_on(&self) -> bool {
        match self.xds_auth {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => !self.xds_addr.ip().is_loopback(),
        }
    }

    /// The REST API's authentication settings.
    pub fn api_auth(&self) -> crate::api::auth::Config {
        crate::api::auth::Config {
            enabled: match self.auth {
                AuthMode::On => true,
                AuthMode::Off => false,
                AuthMode::Auto => !self.http_addr.ip().is_loopback(),
            },
            public_metrics: self.public_metrics,
            public_debug: self.public_debug,
            failures_per_minute: self.auth_failures_per_minute,
        }
    }

    /// Where the bootstrap admin secret comes from (the environment, a file, or generated).
    pub fn admin_secret(&self) -> Result<crate::api::auth::AdminSecret, Error> {
        use crate::api::auth::AdminSecret;
        if let Some(s) = self.admin_token.as_ref().filter(|s| !s.trim().is_empty()) {
            return Ok(AdminSecret::Given(s.clone()));
        }
        if let Some(p) = &self.admin_token_file {
            let s = std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.clone(),
                source,
            })?;
            if s.trim().len() < 16 {
                return Err(Error::Invalid {
                    field: "adminTokenFile",
                    reason: "the token must be at least 16 characters".into(),
                });
            }
            return Ok(AdminSecret::Given(s.trim().to_string()));
        }
        Ok(AdminSecret::Generate(self.data_dir.join("admin-token")))
    }

    /// The injector's settings.
    pub fn inject_config(&self) -> crate::inject::patch::Config {
        crate::inject::patch::Config {
            default_enabled: self.inject_default,
            default_mtls: self.inject_mtls,
            polaris_image: self.polaris_image.clone(),
            envoy_image: self.envoy_image.clone(),
            xds_addr: self.sidecar_xds_addr.clone(),
            ca_addr: self.sidecar_ca_addr.clone(),
            ..Default::default()
        }
    }

    /// The etcd store's settings.
    pub fn etcd_config(&self) -> Result<crate::store::etcd::Config, Error> {
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(p)) => {
                let pw = std::fs::read_to_string(p).map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                })?;
                Some((u.clone(), pw.trim().to_string()))
            }
            (None, None) => None,
            _ => {
                return Err(Error::Invalid {
                    field: "etcdUser",
                    reason: "etcdUser and etcdPasswordFile go together".into(),
                })
            }
        };
        Ok(crate::store::etcd::Config {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.trim_end_matches('/').to_string(),
            user,
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            max_txn_ops: self.etcd_max_txn_ops,
            ..Default::default()
        })
    }

    /// This replica's cluster settings (`store: etcd`); `http` is the bound REST address.
    pub fn cluster_config(
        &self,
        http: std::net::SocketAddr,
    ) -> Result<crate::cluster::Config, Error> {
        let mut id = [0u8; 6];
        getrandom::fill(&mut id).map_err(|e| Error::Invalid {
            field: "replicaId",
            reason: format!("no randomness for the replica id: {e}"),
        })?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let token = match self.admin_secret()? {
            crate::api::auth::AdminSecret::Given(s) => Some(s),
            crate::api::auth::AdminSecret::Generate(_) => None,
        };
        Ok(crate::cluster::Config {
            id,
            url: self
                .advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{http}")),
            lease_ttl: Duration::from_secs(5),
            token,
        })
    }

    /// The controller's settings.
    pub fn controller_config(&self) -> crate::controller::run::Config {
        crate::controller::run::Config {
            translate: crate::controller::translate::Config {
                cluster_name: self.cluster_name.clone(),
                mode: self.sync_mode,
            },
            resync: std::time::Duration::from_secs(self.kube_resync_secs),
            ..Default::default()
        }
    }

    /// The snapshot builder's settings.
    pub fn snapshot_config(&self) -> crate::xds::snapshot::Config {
        crate::xds::snapshot::Config {
            debounce: Duration::from_millis(self.xds_debounce_ms),
            tls_phase: Duration::from_millis(self.xds_tls_phase_ms),
            trust_domain: std::sync::Arc::from(self.trust_domain.as_str()),
            rls: self
                .rls_advertise_addr
                .clone()
                .or(self.rls_addr.map(Into::into)),
        }
    }

    /// Limits of the xDS port.
    pub fn xds_limits(&self) -> crate::net::Limits {
        crate::net::Limits {
            max_connections: self.xds_max_connections,
            first_request_timeout: Duration::from_millis(self.first_request_timeout_ms),
        }
    }

    /// Limits of the REST port.
    pub fn http_limits(&self) -> crate::net::Limits {
        crate::net::Limits {
            max_connections: self.http_max_connections,
            first_request_timeout: Duration::from_millis(self.first_request_timeout_ms),
        }
    }

    /// The heartbeat scan interval.
    pub fn health_check_interval(&self) -> Duration {
        Duration::from_millis(self.health_check_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "dataDir: /tmp/x\nhttpAddr: 127.0.0.1:9000\n").unwrap();
        let c = ServerConfig::from_file(&p).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.xds_addr.port(), 15010);
        std::fs::write(&p, "dataDri: /tmp/x\n").unwrap();
        assert!(ServerConfig::from_file(&p).is_err());
    }
}
