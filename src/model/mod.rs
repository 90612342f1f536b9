//! The registry's domain model and its validation.
//!
//! Everything a client sends passes through the `*Input` types and their `validate` functions here
//! before it reaches the registry; stored types are always valid. No protobuf types live here.

pub mod rules;
mod token;
pub use token::*;
mod hostport;
pub use hostport::{HostPort, HostPortError};

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest service, group and metadata-key name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest namespace name.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 4096;
/// Most metadata entries on one object.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest free-text field (comment, owners, protocol, version, location parts).
pub const MAX_TEXT_LEN: usize = 1024;
/// Default instance weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest instance weight.
pub const MAX_WEIGHT: i64 = 65535;
/// Default heartbeat TTL in seconds.
pub const DEFAULT_TTL_SECS: u32 = 5;
/// Accepted heartbeat TTL range in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<i64> = 1..=60;
/// The namespaces that cannot be deleted.
pub const SYSTEM_NAMESPACES: [&str; 2] = ["default", "Polaris"];
/// The namespaces that exist from the first start (PolarisMesh's built-in ones).
pub const BUILTIN_NAMESPACES: [&str; 4] = ["default", "Polaris", "Production", "Development"];
/// Service metadata key of the service's protocol (`grpc`, `h2`, `http`); PolarisMesh's service
/// has no protocol field, so ours lives in metadata.
pub const PROTOCOL_KEY: &str = "polarismesh.cn/protocol";
/// Metadata key of the TLS mode: on a service, how its sidecars talk to each other
/// ([`TlsMode`]); on an instance, `none` says it has no sidecar that accepts mTLS.
pub const TLS_MODE_KEY: &str = "polarismesh.cn/tls-mode";
/// Service metadata key: the Kubernetes ServiceAccounts (comma-separated) the service's workloads
/// run as. Callers then accept only those SPIFFE identities from its endpoints; without it, any
/// identity of the service's namespace.
pub const SERVICE_ACCOUNT_KEY: &str = "polarismesh.cn/service-account";

/// Service metadata key: what ring hash and maglev hash on (`header:<name>`, `cookie:<name>`,
/// `source-ip`).
pub const LB_HASH_KEY: &str = "polarismesh.cn/lbHashKey";
/// Service metadata key: the load-balancing policy (`ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`,
/// `RING_HASH`, `MAGLEV`).
pub const LB_POLICY_KEY: &str = "polarismesh.cn/lbPolicy";
/// Service metadata keys of the cluster's connection limits (Envoy's circuit-breaker thresholds).
pub const MAX_CONNECTIONS_KEY: &str = "polarismesh.cn/maxConnections";
/// See [`MAX_CONNECTIONS_KEY`].
pub const MAX_PENDING_KEY: &str = "polarismesh.cn/maxPendingRequests";
/// See [`MAX_CONNECTIONS_KEY`].
pub const MAX_REQUESTS_KEY: &str = "polarismesh.cn/maxRequests";
/// See [`MAX_CONNECTIONS_KEY`].
pub const MAX_RETRIES_KEY: &str = "polarismesh.cn/maxRetries";

/// The mesh's own metadata keys with constrained values: the key, and the check of its value.
fn mesh_key_check(k: &str, v: &str) -> Option<Result<(), String>> {
    let uint = |v: &str| {
        v.parse::<u32>()
            .map(|_| ())
            .map_err(|_| format!("{v:?} is not a whole number"))
    };
    Some(match k {
        TLS_MODE_KEY => TlsMode::parse(v)
            .map(|_| ())
            .ok_or_else(|| format!("{v:?} is not one of none, permissive, strict")),
        SERVICE_ACCOUNT_KEY => validate_service_accounts(v),
        LB_POLICY_KEY => match v.to_ascii_uppercase().as_str() {
            "ROUND_ROBIN" | "LEAST_REQUEST" | "RANDOM" | "RING_HASH" | "MAGLEV" => Ok(()),
            _ => Err(format!(
                "{v:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV"
            )),
        },
        LB_HASH_KEY => match v.split_once(':') {
            Some(("header" | "cookie", name)) if !name.is_empty() => Ok(()),
            None if v == "source-ip" => Ok(()),
            _ => Err(format!(
                "{v:?} is not header:<name>, cookie:<name> or source-ip"
            )),
        },
        MAX_CONNECTIONS_KEY | MAX_PENDING_KEY | MAX_REQUESTS_KEY | MAX_RETRIES_KEY => uint(v),
        _ => return None,
    })
}

/// How sidecars of a service talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plaintext.
    #[default]
    None,
    /// Servers accept both mTLS and plaintext; callers use mTLS to endpoints that accept it.
    Permissive,
    /// mTLS only.
    Strict,
}

impl TlsMode {
    /// Parses `none`, `permissive` or `strict`.
    pub fn parse(v: &str) -> Option<TlsMode> {
        match v {
            "none" => Some(TlsMode::None),
            "permissive" => Some(TlsMode::Permissive),
            "strict" => Some(TlsMode::Strict),
            _ => None,
        }
    }

    /// The metadata value.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Permissive => "permissive",
            TlsMode::Strict => "strict",
        }
    }
}

/// A rejected input: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    /// The JSON field name (camelCase, with a `[i].` prefix inside batches).
    pub field: String,
    /// Why the value was rejected.
    pub reason: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error with `prefix` before the field name (`[3].port`).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}{}", self.field);
        self
    }
}

pub(crate) type VResult<T> = Result<T, FieldError>;

/// Key of a service: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// A new key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub comment: String,
    /// Owners, free text.
    #[serde(default)]
    pub owners: String,
    /// SHA-256 of the namespace's token (the token itself is shown once, at creation).
    #[serde(default)]
    pub token_hash: String,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub ctime: String,
    /// Last modification time (RFC 3339).
    #[serde(default)]
    pub mtime: String,
}

/// A service: a named set of instances in a namespace, or an alias of another service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Ports, free text as in PolarisMesh (`"8080,9090"`).
    #[serde(default)]
    pub ports: String,
    /// Owners.
    #[serde(default)]
    pub owners: String,
    /// Free text.
    #[serde(default)]
    pub comment: String,
    /// Business, free text.
    #[serde(default)]
    pub business: String,
    /// Department, free text.
    #[serde(default)]
    pub department: String,
    /// CMDB module fields, free text.
    #[serde(default)]
    pub cmdb_mod1: String,
    /// CMDB module fields, free text.
    #[serde(default)]
    pub cmdb_mod2: String,
    /// CMDB module fields, free text.
    #[serde(default)]
    pub cmdb_mod3: String,
    /// SHA-256 of the service's token (the token itself is shown once, at creation).
    #[serde(default)]
    pub token_hash: String,
    /// Set when this service is an alias: the service it points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_for: Option<AliasTarget>,
    /// Creation time.
    #[serde(default)]
    pub ctime: String,
    /// Last modification time.
    #[serde(default)]
    pub mtime: String,
}

impl Service {
    /// This service's key.
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }

    /// Decodes a stored record. Records of earlier versions kept the protocol in a field of its
    /// own; it moves into metadata ([`PROTOCOL_KEY`]) unless that is set already.
    pub fn from_record(bytes: &[u8]) -> serde_json::Result<Service> {
        let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
        if let Some(o) = v.as_object_mut() {
            if let Some(serde_json::Value::String(p)) = o.remove("protocol") {
                if !p.is_empty() {
                    let md = o.entry("metadata").or_insert_with(|| serde_json::json!({}));
                    if let Some(md) = md.as_object_mut() {
                        md.entry(PROTOCOL_KEY)
                            .or_insert(serde_json::Value::String(p));
                    }
                }
            }
        }
        serde_json::from_value(v)
    }

    /// The service's protocol (metadata [`PROTOCOL_KEY`]), if set.
    pub fn protocol(&self) -> Option<&str> {
        self.metadata.get(PROTOCOL_KEY).map(String::as_str)
    }

    /// The service's TLS mode (metadata [`TLS_MODE_KEY`]; validated on the way in, `none` if
    /// absent).
    pub fn tls_mode(&self) -> TlsMode {
        self.metadata
            .get(TLS_MODE_KEY)
            .and_then(|v| TlsMode::parse(v))
            .unwrap_or_default()
    }

    /// The ServiceAccounts its workloads run as (metadata [`SERVICE_ACCOUNT_KEY`]).
    pub fn service_accounts(&self) -> Vec<&str> {
        self.metadata
            .get(SERVICE_ACCOUNT_KEY)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A plain service with no attributes.
    pub fn bare(namespace: &str, name: &str, now: &str) -> Self {
        Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
            metadata: BTreeMap::new(),
            ports: String::new(),
            owners: String::new(),
            comment: String::new(),
            business: String::new(),
            department: String::new(),
            cmdb_mod1: String::new(),
            cmdb_mod2: String::new(),
            cmdb_mod3: String::new(),
            token_hash: String::new(),
            alias_for: None,
            ctime: now.to_string(),
            mtime: now.to_string(),
        }
    }
}

/// The service an alias points to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AliasTarget {
    /// Namespace of the target.
    pub namespace: String,
    /// Name of the target.
    pub service: String,
}

/// Where an instance runs.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    /// Region.
    #[serde(default)]
    pub region: String,
    /// Zone.
    #[serde(default)]
    pub zone: String,
    /// Campus (Envoy's sub-zone).
    #[serde(default)]
    pub campus: String,
}

/// Health check kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthCheckType {
    /// The instance (or its client) sends heartbeats; missing 3×TTL makes it unhealthy.
    Heartbeat,
}

/// Heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    /// Seconds between heartbeats.
    pub ttl: u32,
}

/// A validated health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthCheck {
    /// Kind.
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    /// Heartbeat settings.
    pub heartbeat: Heartbeat,
}

/// A registered instance (stored form; always valid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Stable id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// VPC, part of the instance id.
    #[serde(default)]
    pub vpc_id: String,
    /// IP or hostname.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: String,
    /// Version.
    #[serde(default)]
    pub version: String,
    /// Priority (lower is preferred).
    #[serde(default)]
    pub priority: u32,
    /// Weight 0..=65535; 0 takes the instance out of load balancing.
    pub weight: u32,
    /// Health; driven by heartbeats when the heartbeat check is enabled.
    pub healthy: bool,
    /// Isolated instances get no traffic.
    pub isolate: bool,
    /// Labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Region/zone/campus.
    #[serde(default)]
    pub location: Location,
    /// Logic set (PolarisMesh's set routing label), free text.
    #[serde(default)]
    pub logic_set: String,
    /// Whether the health check is on.
    #[serde(default)]
    pub enable_health_check: bool,
    /// The health check, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Creation time.
    #[serde(default)]
    pub ctime: String,
    /// Last modification time.
    #[serde(default)]
    pub mtime: String,
}

impl Instance {
    /// The service this instance belongs to.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.service)
    }

    /// The heartbeat TTL if the heartbeat check is on.
    pub fn heartbeat_ttl(&self) -> Option<u32> {
        match (self.enable_health_check, self.health_check) {
            (true, Some(hc)) => Some(hc.heartbeat.ttl),
            _ => None,
        }
    }
}

/// The stable id of an instance, as PolarisMesh computes it: SHA-1 of `ns##svc##vpc##host##port`.
pub fn instance_id(namespace: &str, service: &str, host: &str, port: u16) -> String {
    instance_id_in_vpc(namespace, service, "", host, port)
}

/// [`instance_id`] for an instance in a VPC.
pub fn instance_id_in_vpc(
    namespace: &str,
    service: &str,
    vpc: &str,
    host: &str,
    port: u16,
) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(format!("{namespace}##{service}##{vpc}##{host}##{port}").as_bytes());
    h.digest().to_string()
}

/// A new random token (128 bits, hex) and its SHA-256 (hex), which is what is stored.
pub fn new_token() -> (String, String) {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).expect("the system's random source");
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = token_hash(&token);
    (token, hash)
}

/// SHA-256 of a token, hex.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    // Every authenticated request hashes its token: hex without an allocation per byte.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Health check as clients send it: `type` may be `"HEARTBEAT"` or `1`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthCheckInput {
    /// `"HEARTBEAT"` or `1`.
    #[serde(rename = "type", default)]
    #[schema(value_type = Object)]
    pub kind: Option<serde_json::Value>,
    /// Heartbeat settings.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatInput>,
}

/// Heartbeat settings as sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatInput {
    /// Seconds, 1..=60; default 5.
    #[serde(default)]
    pub ttl: Option<i64>,
}

/// An instance as clients send it (loosely typed so errors can name the field).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInput {
    /// Optional explicit id; derived from namespace+service+host+port otherwise.
    #[serde(default)]
    pub id: Option<String>,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service.
    #[serde(default)]
    pub service: Option<String>,
    /// VPC (part of the derived id).
    #[serde(default)]
    pub vpc_id: Option<String>,
    /// IP or hostname.
    #[serde(default)]
    pub host: Option<String>,
    /// Port 1..=65535.
    #[serde(default)]
    pub port: Option<i64>,
    /// Protocol.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Version.
    #[serde(default)]
    pub version: Option<String>,
    /// Priority.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Weight 0..=65535, default 100.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Initial health, default true.
    #[serde(default)]
    pub healthy: Option<bool>,
    /// Isolation, default false.
    #[serde(default)]
    pub isolate: Option<bool>,
    /// Labels.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Location.
    #[serde(default)]
    pub location: Option<Location>,
    /// Logic set.
    #[serde(default)]
    pub logic_set: Option<String>,
    /// Whether the health check is on.
    #[serde(default)]
    pub enable_health_check: Option<bool>,
    /// Health check.
    #[serde(default)]
    pub health_check: Option<HealthCheckInput>,
}

/// Which instance a request names: by id, or by namespace+service+host+port.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRef {
    /// Id.
    #[serde(default)]
    pub id: Option<String>,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service.
    #[serde(default)]
    pub service: Option<String>,
    /// VPC.
    #[serde(default)]
    pub vpc_id: Option<String>,
    /// Host.
    #[serde(default)]
    pub host: Option<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<i64>,
}

/// A validated reference to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceSelector {
    /// By id.
    Id(String),
    /// By address within a service.
    Address {
        /// The service.
        service: ServiceKey,
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
}

impl InstanceSelector {
    /// How the selector reads in messages.
    pub fn describe(&self) -> String {
        match self {
            InstanceSelector::Id(id) => id.clone(),
            InstanceSelector::Address {
                service,
                host,
                port,
            } => format!("{service} {host}:{port}"),
        }
    }
}

impl InstanceRef {
    /// Validates the reference.
    pub fn validate(&self) -> VResult<InstanceSelector> {
        if let Some(id) = self.id.as_deref().filter(|s| !s.is_empty()) {
            validate_id(id)?;
            return Ok(InstanceSelector::Id(id.to_string()));
        }
        let namespace = required(&self.namespace, "namespace")?;
        validate_namespace_name(namespace, "namespace")?;
        let service = required(&self.service, "service")?;
        validate_name(service, "service")?;
        let host = required(&self.host, "host")?;
        validate_host(host)?;
        let port = validate_port(self.port)?;
        if let Some(vpc) = self.vpc_id.as_deref().filter(|v| !v.is_empty()) {
            return Ok(InstanceSelector::Id(instance_id_in_vpc(
                namespace, service, vpc, host, port,
            )));
        }
        Ok(InstanceSelector::Address {
            service: ServiceKey::new(namespace, service),
            host: host.to_string(),
            port,
        })
    }
}

/// A namespace as sent.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceInput {
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub comment: Option<String>,
    /// Owners.
    #[serde(default)]
    pub owners: Option<String>,
}

impl NamespaceInput {
    /// Validates into a namespace stamped with `now`.
    pub fn validate(&self, now: &str) -> VResult<Namespace> {
        let name = required(&self.name, "name")?;
        validate_namespace_name(name, "name")?;
        Ok(Namespace {
            name: name.to_string(),
            comment: text(&self.comment, "comment")?,
            owners: text(&self.owners, "owners")?,
            token_hash: String::new(),
            ctime: now.to_string(),
            mtime: now.to_string(),
        })
    }

    /// Applies the fields that are set onto `current` (update).
    pub fn apply_to(&self, current: &Namespace, now: &str) -> VResult<Namespace> {
        let mut n = current.clone();
        if self.comment.is_some() {
            n.comment = text(&self.comment, "comment")?;
        }
        if self.owners.is_some() {
            n.owners = text(&self.owners, "owners")?;
        }
        n.mtime = now.to_string();
        Ok(n)
    }
}

/// A service as sent.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInput {
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Metadata.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Ports, free text.
    #[serde(default)]
    pub ports: Option<String>,
    /// Protocol (`grpc`, `h2`, `http`): stored as metadata [`PROTOCOL_KEY`] (an extension of
    /// ours; PolarisMesh's service has no protocol).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Owners.
    #[serde(default)]
    pub owners: Option<String>,
    /// Comment.
    #[serde(default)]
    pub comment: Option<String>,
    /// Business.
    #[serde(default)]
    pub business: Option<String>,
    /// Department.
    #[serde(default)]
    pub department: Option<String>,
    /// CMDB module.
    #[serde(default)]
    pub cmdb_mod1: Option<String>,
    /// CMDB module.
    #[serde(default)]
    pub cmdb_mod2: Option<String>,
    /// CMDB module.
    #[serde(default)]
    pub cmdb_mod3: Option<String>,
}

impl ServiceInput {
    /// Validates the key fields only.
    pub fn validate_key(&self) -> VResult<ServiceKey> {
        let ns = required(&self.namespace, "namespace")?;
        validate_namespace_name(ns, "namespace")?;
        let name = required(&self.name, "name")?;
        validate_name(name, "name")?;
        Ok(ServiceKey::new(ns, name))
    }

    /// Validates into a service stamped with `now`.
    pub fn validate(&self, now: &str) -> VResult<Service> {
        let key = self.validate_key()?;
        self.apply_to(&Service::bare(&key.namespace, &key.name, now), now)
    }

    /// Applies the fields that are set onto `current` (partial update; `metadata` replaces).
    pub fn apply_to(&self, current: &Service, now: &str) -> VResult<Service> {
        let mut s = current.clone();
        if let Some(m) = &self.metadata {
            s.metadata = validate_metadata(m, "metadata")?;
        }
        if let Some(p) = &self.protocol {
            let p = short_text(&Some(p.clone()), "protocol")?;
            if p.is_empty() {
                s.metadata.remove(PROTOCOL_KEY);
            } else {
                s.metadata.insert(PROTOCOL_KEY.to_string(), p);
            }
        }
        if s.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(FieldError::new("metadata", "more than 64 entries"));
        }
        macro_rules! set_text {
            ($($f:ident: $name:literal),*) => {$(
                if self.$f.is_some() { s.$f = text(&self.$f, $name)?; }
            )*};
        }
        set_text!(ports: "ports", owners: "owners", comment: "comment", department: "department",
            cmdb_mod1: "cmdbMod1", cmdb_mod2: "cmdbMod2", cmdb_mod3: "cmdbMod3");
        if self.business.is_some() {
            s.business = short_text(&self.business, "business")?;
        }
        s.mtime = now.to_string();
        Ok(s)
    }
}

/// An alias as sent (`POST /naming/v1/service/alias`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AliasInput {
    /// Target service.
    #[serde(default)]
    pub service: Option<String>,
    /// Target namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Alias name.
    #[serde(default)]
    pub alias: Option<String>,
    /// Alias namespace (default: the target's).
    #[serde(default)]
    pub alias_namespace: Option<String>,
    /// Owners.
    #[serde(default)]
    pub owners: Option<String>,
    /// Comment.
    #[serde(default)]
    pub comment: Option<String>,
}

impl AliasInput {
    /// Validates into the alias service (with `alias_for` set).
    pub fn validate(&self, now: &str) -> VResult<Service> {
        let ns = required(&self.namespace, "namespace")?;
        validate_namespace_name(ns, "namespace")?;
        let svc = required(&self.service, "service")?;
        validate_name(svc, "service")?;
        let alias = required(&self.alias, "alias")?;
        validate_name(alias, "alias")?;
        let alias_ns = match self.alias_namespace.as_deref().filter(|s| !s.is_empty()) {
            Some(a) => {
                validate_namespace_name(a, "aliasNamespace")?;
                a
            }
            None => ns,
        };
        if alias_ns == ns && alias == svc {
            return Err(FieldError::new("alias", "an alias cannot point to itself"));
        }
        let mut s = Service::bare(alias_ns, alias, now);
        s.comment = text(&self.comment, "comment")?;
        s.owners = text(&self.owners, "owners")?;
        s.alias_for = Some(AliasTarget {
            namespace: ns.to_string(),
            service: svc.to_string(),
        });
        Ok(s)
    }
}

impl InstanceInput {
    /// Validates a new instance stamped with `now`.
    pub fn validate(&self, now: &str) -> VResult<Instance> {
        let namespace = required(&self.namespace, "namespace")?;
        validate_namespace_name(namespace, "namespace")?;
        let service = required(&self.service, "service")?;
        validate_name(service, "service")?;
        let host = required(&self.host, "host")?;
        validate_host(host)?;
        let port = validate_port(self.port)?;
        let vpc_id = short_text(&self.vpc_id, "vpc_id")?;
        let id = match self.id.as_deref().filter(|s| !s.is_empty()) {
            Some(id) => {
                validate_id(id)?;
                id.to_string()
            }
            None => instance_id_in_vpc(namespace, service, &vpc_id, host, port),
        };
        let weight = match self.weight {
            None => DEFAULT_WEIGHT,
            Some(w) if (0..=MAX_WEIGHT).contains(&w) => w as u32,
            Some(w) => {
                return Err(FieldError::new(
                    "weight",
                    format!("{w} is outside 0..=65535"),
                ))
            }
        };
        let priority = match self.priority {
            None => 0,
            Some(p) if (0..=9).contains(&p) => p as u32,
            Some(p) => return Err(FieldError::new("priority", format!("{p} is outside 0..=9"))),
        };
        let metadata = match &self.metadata {
            Some(m) => validate_metadata(m, "metadata")?,
            None => BTreeMap::new(),
        };
        let location = match &self.location {
            Some(l) => {
                for (f, v) in [
                    ("location.region", &l.region),
                    ("location.zone", &l.zone),
                    ("location.campus", &l.campus),
                ] {
                    if v.len() > MAX_NAME_LEN {
                        return Err(FieldError::new(f, "longer than 128 characters"));
                    }
                }
                l.clone()
            }
            None => Location::default(),
        };
        let health_check = validate_health_check(self.health_check.as_ref())?;
        // As in PolarisMesh, sending a health check turns it on unless it is turned off explicitly.
        let enable_health_check = self.enable_health_check.unwrap_or(health_check.is_some());
        let health_check = match (enable_health_check, health_check) {
            (true, None) => Some(HealthCheck {
                kind: HealthCheckType::Heartbeat,
                heartbeat: Heartbeat {
                    ttl: DEFAULT_TTL_SECS,
                },
            }),
            (_, hc) => hc,
        };
        Ok(Instance {
            id,
            namespace: namespace.to_string(),
            service: service.to_string(),
            vpc_id,
            host: host.to_string(),
            port,
            protocol: short_text(&self.protocol, "protocol")?,
            version: short_text(&self.version, "version")?,
            priority,
            weight,
            healthy: self.healthy.unwrap_or(true),
            isolate: self.isolate.unwrap_or(false),
            metadata,
            location,
            logic_set: short_text(&self.logic_set, "logic_set")?,
            enable_health_check,
            health_check,
            ctime: now.to_string(),
            mtime: now.to_string(),
        })
    }
}

fn validate_health_check(hc: Option<&HealthCheckInput>) -> VResult<Option<HealthCheck>> {
    let Some(hc) = hc else { return Ok(None) };
    match &hc.kind {
        None => {}
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("HEARTBEAT") => {}
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(1) => {}
        Some(other) => {
            return Err(FieldError::new(
                "healthCheck.type",
                format!("{other} is not a known type (HEARTBEAT or 1)"),
            ))
        }
    }
    let ttl = match hc.heartbeat.as_ref().and_then(|h| h.ttl) {
        None => DEFAULT_TTL_SECS,
        Some(t) if TTL_RANGE.contains(&t) => t as u32,
        Some(t) => {
            return Err(FieldError::new(
                "healthCheck.heartbeat.ttl",
                format!("{t} is outside 1..=60 seconds"),
            ))
        }
    };
    Ok(Some(HealthCheck {
        kind: HealthCheckType::Heartbeat,
        heartbeat: Heartbeat { ttl },
    }))
}

pub(crate) fn required<'a>(v: &'a Option<String>, field: &str) -> VResult<&'a str> {
    match v.as_deref() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(FieldError::new(field, "is required")),
    }
}

pub(crate) fn text(v: &Option<String>, field: &str) -> VResult<String> {
    let s = v.clone().unwrap_or_default();
    if s.chars().count() > MAX_TEXT_LEN {
        return Err(FieldError::new(field, "longer than 1024 characters"));
    }
    Ok(s)
}

fn short_text(v: &Option<String>, field: &str) -> VResult<String> {
    let s = v.clone().unwrap_or_default();
    if s.chars().count() > MAX_NAME_LEN {
        return Err(FieldError::new(field, "longer than 128 characters"));
    }
    Ok(s)
}

/// Whether `c` may appear in a PolarisMesh resource name (`[0-9A-Za-z-./:_]`).
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/' | ':' | '_')
}

fn validate_resource_name(name: &str, field: &str, max: usize) -> VResult<()> {
    if name.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if name.len() > max {
        return Err(FieldError::new(
            field,
            format!("longer than {max} characters"),
        ));
    }
    if let Some(c) = name.chars().find(|c| !name_char(*c)) {
        return Err(FieldError::new(
            field,
            format!("character {c:?} is not allowed (use A-Z a-z 0-9 - . / : _)"),
        ));
    }
    Ok(())
}

/// Service, group and alias names: 1..=128 characters of `[0-9A-Za-z-./:_]` (PolarisMesh's).
pub fn validate_name(name: &str, field: &str) -> VResult<()> {
    validate_resource_name(name, field, MAX_NAME_LEN)
}

/// Namespace names: 1..=64 characters of `[0-9A-Za-z-./:_]` (PolarisMesh's).
pub fn validate_namespace_name(name: &str, field: &str) -> VResult<()> {
    validate_resource_name(name, field, MAX_NAMESPACE_LEN)
}

/// Explicit instance ids: 1..=128 characters of `[0-9A-Za-z-./:_]`.
fn validate_id(id: &str) -> VResult<()> {
    validate_name(id, "id")
}

/// An IP address, or a hostname (RFC 1123 labels, at most 253 characters).
pub fn validate_host(host: &str) -> VResult<()> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = || {
        FieldError::new(
            "host",
            format!("{host:?} is neither an IP address nor a hostname"),
        )
    };
    if host.len() > 253 {
        return Err(bad());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    // An all-numeric dotted name is a malformed IP, not a hostname.
    let all_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if labels_ok && !all_numeric {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Ports 1..=65535.
pub fn validate_port(port: Option<i64>) -> VResult<u16> {
    match port {
        None => Err(FieldError::new("port", "is required")),
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Some(p) => Err(FieldError::new("port", format!("{p} is outside 1..=65535"))),
    }
}

/// Metadata: at most 64 entries, keys 1..=128 characters, values at most 4096 characters; the
/// mesh's own keys ([`TLS_MODE_KEY`], [`SERVICE_ACCOUNT_KEY`]) must hold values it understands.
pub fn validate_metadata(
    m: &BTreeMap<String, String>,
    field: &str,
) -> VResult<BTreeMap<String, String>> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(FieldError::new(field, "more than 64 entries"));
    }
    for (k, v) in m {
        if k.is_empty() {
            return Err(FieldError::new(field, "empty key"));
        }
        if k.chars().count() > MAX_NAME_LEN {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "key longer than 128 characters",
            ));
        }
        if v.chars().count() > MAX_METADATA_VALUE_LEN {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "value longer than 4096 characters",
            ));
        }
        if let Some(Err(r)) = mesh_key_check(k, v) {
            return Err(FieldError::new(format!("{field}.{k}"), r));
        }
    }
    Ok(m.clone())
}

/// A comma-separated list of Kubernetes ServiceAccount names (DNS-1123 subdomains).
fn validate_service_accounts(v: &str) -> Result<(), String> {
    let names: Vec<&str> = v.split(',').map(str::trim).collect();
    if names.iter().all(|n| n.is_empty()) {
        return Err("names no ServiceAccount".into());
    }
    for n in names.into_iter().filter(|n| !n.is_empty()) {
        let ok = n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(format!("{n:?} is not a ServiceAccount name"));
        }
    }
    Ok(())
}

/// How a label value is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MatchType {
    /// Equal.
    #[default]
    Exact,
    /// Full-match regular expression.
    Regex,
    /// Not equal.
    NotEquals,
    /// One of a comma-separated list.
    In,
    /// None of a comma-separated list.
    NotIn,
    /// Numeric range `lo~hi`, inclusive.
    Range,
}

/// One label matcher (PolarisMesh's `MatchString`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MatchString {
    /// How to match.
    #[serde(rename = "type", default)]
    pub kind: MatchType,
    /// The value (a regex, a list, or `lo~hi` depending on the type).
    pub value: String,
    /// PolarisMesh's `value_type` (`TEXT`, `PARAMETER`, `VARIABLE`); only `TEXT` is translated.
    #[serde(rename = "valueType", default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<String>,
    /// The regex of a `REGEX` matcher, compiled once (by `validate`, or at the first match of a
    /// matcher loaded from the store).
    #[serde(skip)]
    #[schema(ignore)]
    compiled: CompiledRegex,
}

/// A lazily compiled, anchored regex; shared by clones, ignored by comparisons.
#[derive(Debug, Clone, Default)]
struct CompiledRegex(std::sync::Arc<std::sync::OnceLock<Option<regex::Regex>>>);

impl PartialEq for CompiledRegex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CompiledRegex {}

fn anchored(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

impl MatchString {
    /// A matcher.
    pub fn new(kind: MatchType, value: impl Into<String>) -> Self {
        MatchString {
            kind,
            value: value.into(),
            value_type: None,
            compiled: CompiledRegex::default(),
        }
    }

    /// Checks that the matcher is well formed (and compiles a regex once).
    pub fn validate(&self, field: &str) -> VResult<()> {
        if self.value.len() > MAX_METADATA_VALUE_LEN {
            return Err(FieldError::new(field, "value longer than 4096 characters"));
        }
        match self.kind {
            MatchType::Regex => {
                let re = anchored(&self.value)
                    .map_err(|e| FieldError::new(field, format!("bad regex: {e}")))?;
                let _ = self.compiled.0.set(Some(re));
            }
            MatchType::Range => {
                parse_range(&self.value).ok_or_else(|| {
                    FieldError::new(field, "RANGE needs `lo~hi` with numbers lo <= hi")
                })?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether `value` (absent when the label is missing) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match self.kind {
            MatchType::Exact => value == Some(self.value.as_str()),
            MatchType::NotEquals => value != Some(self.value.as_str()),
            MatchType::In => value.is_some_and(|v| self.value.split(',').any(|x| x.trim() == v)),
            MatchType::NotIn => {
                !value.is_some_and(|v| self.value.split(',').any(|x| x.trim() == v))
            }
            MatchType::Regex => value.is_some_and(|v| {
                self.compiled
                    .0
                    .get_or_init(|| anchored(&self.value).ok())
                    .as_ref()
                    .is_some_and(|r| r.is_match(v))
            }),
            MatchType::Range => match (
                parse_range(&self.value),
                value.and_then(|v| v.trim().parse::<f64>().ok()),
            ) {
                (Some((lo, hi)), Some(x)) => lo <= x && x <= hi,
                _ => false,
            },
        }
    }
}

fn parse_range(s: &str) -> Option<(f64, f64)> {
    let (lo, hi) = s.split_once('~')?;
    let (lo, hi) = (
        lo.trim().parse::<f64>().ok()?,
        hi.trim().parse::<f64>().ok()?,
    );
    (lo <= hi).then_some((lo, hi))
}

/// A named subset of a service's instances, chosen by label matchers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceGroup {
    /// Namespace of the service.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Group name.
    pub name: String,
    /// Label matchers; all must match.
    pub labels: BTreeMap<String, MatchString>,
    /// Creation time.
    #[serde(default)]
    pub ctime: String,
}

impl InstanceGroup {
    /// Validates a group.
    pub fn validate(&self) -> VResult<()> {
        validate_namespace_name(&self.namespace, "namespace")?;
        validate_name(&self.service, "service")?;
        validate_name(&self.name, "name")?;
        if self.labels.len() > MAX_METADATA_ENTRIES {
            return Err(FieldError::new("labels", "more than 64 entries"));
        }
        for (k, m) in &self.labels {
            if k.is_empty() || k.len() > MAX_NAME_LEN {
                return Err(FieldError::new("labels", "keys must be 1..=128 characters"));
            }
            m.validate(&format!("labels.{k}"))?;
        }
        Ok(())
    }

    /// Whether `instance` belongs to the group.
    pub fn contains(&self, instance: &Instance) -> bool {
        self.labels
            .iter()
            .all(|(k, m)| m.matches(instance.metadata.get(k).map(String::as_str)))
    }
}

/// The current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> InstanceInput {
        InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some("10.0.0.1".into()),
            port: Some(8080),
            ..Default::default()
        }
    }

    fn field_of(r: VResult<Instance>) -> String {
        r.unwrap_err().field
    }

    #[test]
    fn names_both_sides_of_length_limit() {
        assert!(validate_name(&"a".repeat(128), "name").is_ok());
        assert!(validate_name(&"a".repeat(129), "name").is_err());
        assert!(validate_name("", "name").is_err());
        assert!(validate_name("a", "name").is_ok());
        assert!(validate_name("a.b_c:d-e", "name").is_ok());
        assert!(validate_name("a/b", "name").is_ok());
        assert!(validate_name("a b", "name").is_err());
        assert!(validate_name("a$b", "name").is_err());
    }

    #[test]
    fn namespaces_take_polarismesh_names() {
        for ok in [
            "default",
            "Polaris",
            "Production",
            "a-b1",
            "a.b",
            "a/b",
            "a:b",
            "a_b",
            "-ab",
        ] {
            assert!(validate_namespace_name(ok, "n").is_ok(), "{ok}");
        }
        assert!(validate_namespace_name(&"a".repeat(64), "n").is_ok());
        assert!(validate_namespace_name(&"a".repeat(65), "n").is_err());
        for bad in ["", "+$#@+", "a b", "ä"] {
            assert!(validate_namespace_name(bad, "n").is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        assert!(validate_host("10.0.0.1").is_ok());
        assert!(validate_host("::1").is_ok());
        assert!(validate_host("echo.default.svc").is_ok());
        assert!(validate_host("localhost").is_ok());
        assert!(validate_host("300.1.1.1").is_err());
        assert!(validate_host("a..b").is_err());
        assert!(validate_host("-a.b").is_err());
        assert!(validate_host("a_b").is_err());
        assert!(validate_host(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(validate_host(&format!("{}.com", "a".repeat(63))).is_ok());
    }

    #[test]
    fn ports_both_sides() {
        for (p, ok) in [
            (0, false),
            (1, true),
            (65535, true),
            (65536, false),
            (70000, false),
            (-1, false),
        ] {
            let r = InstanceInput {
                port: Some(p),
                ..inst()
            }
            .validate("t");
            assert_eq!(r.is_ok(), ok, "port {p}");
            if !ok {
                assert_eq!(field_of(r), "port");
            }
        }
        assert_eq!(
            field_of(
                InstanceInput {
                    port: None,
                    ..inst()
                }
                .validate("t")
            ),
            "port"
        );
    }

    #[test]
    fn weights_both_sides() {
        for (w, ok) in [(-1, false), (0, true), (65535, true), (65536, false)] {
            let r = InstanceInput {
                weight: Some(w),
                ..inst()
            }
            .validate("t");
            assert_eq!(r.is_ok(), ok, "weight {w}");
            if !ok {
                assert_eq!(field_of(r), "weight");
            }
        }
        assert_eq!(inst().validate("t").unwrap().weight, 100);
    }

    #[test]
    fn ttl_both_sides_and_type_forms() {
        let hc = |ttl: Option<i64>, kind: serde_json::Value| InstanceInput {
            enable_health_check: Some(true),
            health_check: Some(HealthCheckInput {
                kind: Some(kind),
                heartbeat: Some(HeartbeatInput { ttl }),
            }),
            ..inst()
        };
        for (t, ok) in [(0, false), (1, true), (60, true), (61, false), (-5, false)] {
            let r = hc(Some(t), "HEARTBEAT".into()).validate("t");
            assert_eq!(r.is_ok(), ok, "ttl {t}");
            if !ok {
                assert_eq!(field_of(r), "healthCheck.heartbeat.ttl");
            }
        }
        let i = hc(None, serde_json::json!(1)).validate("t").unwrap();
        assert_eq!(i.heartbeat_ttl(), Some(5));
        assert_eq!(
            field_of(hc(Some(5), serde_json::json!(2)).validate("t")),
            "healthCheck.type"
        );
        assert_eq!(
            field_of(hc(Some(5), "HTTP".into()).validate("t")),
            "healthCheck.type"
        );
        // Enabled without details gets the default heartbeat.
        let i = InstanceInput {
            enable_health_check: Some(true),
            ..inst()
        }
        .validate("t")
        .unwrap();
        assert_eq!(i.heartbeat_ttl(), Some(DEFAULT_TTL_SECS));
        assert_eq!(inst().validate("t").unwrap().heartbeat_ttl(), None);
    }

    #[test]
    fn required_fields() {
        assert_eq!(
            field_of(
                InstanceInput {
                    service: Some(String::new()),
                    ..inst()
                }
                .validate("t")
            ),
            "service"
        );
        assert_eq!(
            field_of(
                InstanceInput {
                    namespace: None,
                    ..inst()
                }
                .validate("t")
            ),
            "namespace"
        );
        assert_eq!(
            field_of(
                InstanceInput {
                    host: None,
                    ..inst()
                }
                .validate("t")
            ),
            "host"
        );
        assert_eq!(
            field_of(
                InstanceInput {
                    host: Some("bad host".into()),
                    ..inst()
                }
                .validate("t")
            ),
            "host"
        );
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn metadata_limits() {
        let mut m = BTreeMap::new();
        m.insert("k".repeat(128), "v".repeat(4096));
        assert!(validate_metadata(&m, "metadata").is_ok());
        m.insert("k".repeat(129), "v".into());
        assert!(validate_metadata(&m, "metadata").is_err());
        let mut m = BTreeMap::new();
        m.insert("k".into(), "v".repeat(4097));
        assert!(validate_metadata(&m, "metadata").is_err());
        let m: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_metadata(&m, "metadata").is_err());
        let m: BTreeMap<_, _> = (0..64).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_metadata(&m, "metadata").is_ok());
        let mut m = BTreeMap::new();
        m.insert(String::new(), "v".into());
        assert!(validate_metadata(&m, "metadata").is_err());
    }

    #[test]
    fn mesh_metadata_keys_are_checked() {
        let check = |k: &str, v: &str| {
            let m: BTreeMap<String, String> = [(k.to_string(), v.to_string())].into();
            validate_metadata(&m, "metadata").map_err(|e| e.field)
        };
        for mode in ["none", "permissive", "strict"] {
            assert!(check(TLS_MODE_KEY, mode).is_ok());
        }
        for bad in ["STRICT", "mtls", ""] {
            assert_eq!(
                check(TLS_MODE_KEY, bad).unwrap_err(),
                "metadata.polarismesh.cn/tls-mode"
            );
        }
        assert!(check(SERVICE_ACCOUNT_KEY, "echo, echo-v2").is_ok());
        for bad in ["", " , ", "Echo", "-x", "a/b"] {
            assert!(check(SERVICE_ACCOUNT_KEY, bad).is_err(), "{bad:?}");
        }
        let mut s = Service::bare("default", "echo", "t");
        assert_eq!(s.tls_mode(), TlsMode::None);
        s.metadata.insert(TLS_MODE_KEY.into(), "strict".into());
        s.metadata
            .insert(SERVICE_ACCOUNT_KEY.into(), "a, b,".into());
        assert_eq!(s.tls_mode(), TlsMode::Strict);
        assert_eq!(s.service_accounts(), vec!["a", "b"]);
    }

    #[test]
    fn instance_id_is_stable_and_derived() {
        let a = inst().validate("t").unwrap();
        let b = inst().validate("u").unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.id, instance_id("default", "echo", "10.0.0.1", 8080));
        assert_eq!(a.id.len(), 40);
        let c = InstanceInput {
            port: Some(8081),
            ..inst()
        }
        .validate("t")
        .unwrap();
        assert_ne!(a.id, c.id);
        let d = InstanceInput {
            id: Some("my-id".into()),
            ..inst()
        }
        .validate("t")
        .unwrap();
        assert_eq!(d.id, "my-id");
    }

    #[test]
    fn matchers() {
        let m = |kind, value: &str| MatchString::new(kind, value);
        assert!(m(MatchType::Exact, "v1").matches(Some("v1")));
        assert!(!m(MatchType::Exact, "v1").matches(Some("v2")));
        assert!(!m(MatchType::Exact, "v1").matches(None));
        assert!(m(MatchType::NotEquals, "v1").matches(Some("v2")));
        assert!(m(MatchType::NotEquals, "v1").matches(None));
        assert!(m(MatchType::In, "a, b").matches(Some("b")));
        assert!(!m(MatchType::In, "a,b").matches(Some("c")));
        assert!(m(MatchType::NotIn, "a,b").matches(Some("c")));
        assert!(!m(MatchType::NotIn, "a,b").matches(Some("a")));
        assert!(m(MatchType::Regex, "v[0-9]+").matches(Some("v12")));
        assert!(!m(MatchType::Regex, "v[0-9]+").matches(Some("xv12")));
        assert!(m(MatchType::Range, "1~10").matches(Some("10")));
        assert!(!m(MatchType::Range, "1~10").matches(Some("11")));
        assert!(!m(MatchType::Range, "1~10").matches(Some("x")));
        assert!(m(MatchType::Regex, "(").validate("l").is_err());
        assert!(m(MatchType::Range, "5~1").validate("l").is_err());
        assert!(m(MatchType::Range, "1-5").validate("l").is_err());
        assert!(m(MatchType::Range, "1~5").validate("l").is_ok());
    }

    #[test]
    fn a_validated_regex_is_compiled_once_and_shared_by_clones() {
        let m = MatchString::new(MatchType::Regex, "v[0-9]+");
        assert!(m.compiled.0.get().is_none());
        m.validate("l").unwrap();
        let compiled = m.compiled.0.get().unwrap().as_ref().unwrap() as *const regex::Regex;
        let c = m.clone();
        assert!(c.matches(Some("v1")));
        assert_eq!(
            c.compiled.0.get().unwrap().as_ref().unwrap() as *const regex::Regex,
            compiled
        );
        // A matcher loaded from the store compiles at its first match, once.
        let loaded: MatchString = serde_json::from_str(r#"{"type":"REGEX","value":"a+"}"#).unwrap();
        assert!(loaded.matches(Some("aa")) && !loaded.matches(Some("b")));
        assert!(loaded.compiled.0.get().is_some());
    }

    #[test]
    fn groups_select_by_labels() {
        let mut labels = BTreeMap::new();
        labels.insert("version".into(), MatchString::new(MatchType::In, "v1,v2"));
        let g = InstanceGroup {
            namespace: "default".into(),
            service: "echo".into(),
            name: "stable".into(),
            labels,
            ctime: String::new(),
        };
        assert!(g.validate().is_ok());
        let mut i = inst().validate("t").unwrap();
        assert!(!g.contains(&i));
        i.metadata.insert("version".into(), "v2".into());
        assert!(g.contains(&i));
    }

    #[test]
    fn alias_cannot_point_to_itself() {
        let a = AliasInput {
            service: Some("echo".into()),
            namespace: Some("default".into()),
            alias: Some("echo".into()),
            ..Default::default()
        };
        assert_eq!(a.validate("t").unwrap_err().field, "alias");
        let a = AliasInput {
            alias: Some("echo2".into()),
            ..a
        };
        let s = a.validate("t").unwrap();
        assert_eq!(s.alias_for.unwrap().service, "echo");
    }
}
