//! Who may call the REST API, and what they may change.
//!
//! A request authenticates with PolarisMesh's header `X-Polaris-Token` (or `Authorization: Bearer`).
//! The secret's SHA-256 is looked up in the registry's credential index, in memory: an access
//! token (admin, write in some namespaces, read), a namespace's token (write in it) or a service's
//! token (write its instances). Nothing is read from the store per request, and a revoked token
//! stops working in the commit that revokes it. Handlers then check each item they are about to
//! write against the principal ([`Principal::require`]); an item out of scope refuses the whole
//! request (403) before anything is written.
//!
//! Failed attempts are counted per source address; past `failures_per_minute` an address's
//! failures are answered 403001 (PolarisMesh's IP rate limit) instead of 401, while valid tokens
//! from it keep working.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::code;
use super::error::ApiError;
use crate::limit::Buckets;
use crate::metrics::{AuthFailure, Metrics};
use crate::model::{token_hash, AccessToken, InstanceSelector, ServiceKey, TokenScope};
use crate::registry::{self, Command, Credential, Registry};

/// The REST API's authentication settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Authentication on: every request but the public paths needs a valid token.
    pub enabled: bool,
    /// `/metrics` without a token.
    pub public_metrics: bool,
    /// `/debug/*` without a token.
    pub public_debug: bool,
    /// Failed attempts per minute per source address before they are answered 403001.
    pub failures_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: false,
            public_metrics: true,
            public_debug: false,
            failures_per_minute: 30,
        }
    }
}

/// The authenticator shared by every request.
pub struct Auth {
    cfg: Config,
    registry: Registry,
    metrics: Arc<Metrics>,
    failures: Buckets<IpAddr>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off: anyone may do anything.
    Anyone,
    /// An access token.
    Token(Arc<AccessToken>),
    /// A namespace's token.
    Namespace(String),
    /// A service's token.
    Service(ServiceKey),
}

/// What a write needs.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// Managing tokens.
    Admin,
    /// Changing a namespace, or a service, alias or group in it.
    Namespace(&'a str),
    /// Changing a service's record (its own token may).
    Service(&'a ServiceKey),
    /// Changing a service's instances (its own token may).
    Instances(&'a ServiceKey),
}

impl std::fmt::Display for Principal {
    /// How audit logs name the principal: never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anyone => f.write_str("anonymous (auth off)"),
            Principal::Token(t) => write!(f, "token {} ({})", t.id, t.name),
            Principal::Namespace(ns) => write!(f, "namespace token of {ns}"),
            Principal::Service(k) => write!(f, "service token of {}/{}", k.namespace, k.name),
        }
    }
}

impl Principal {
    fn may(&self, access: Access<'_>) -> bool {
        let in_ns = |ns: &str| match self {
            Principal::Anyone => true,
            Principal::Token(t) => match &t.scope {
                TokenScope::Admin => true,
                TokenScope::Write { namespaces } => namespaces.iter().any(|n| n == ns),
                TokenScope::Read => false,
            },
            Principal::Namespace(n) => n == ns,
            Principal::Service(_) => false,
        };
        match access {
            Access::Admin => {
                matches!(self, Principal::Anyone)
                    || matches!(self, Principal::Token(t) if t.scope == TokenScope::Admin)
            }
            Access::Namespace(ns) => in_ns(ns),
            Access::Service(k) | Access::Instances(k) => {
                in_ns(&k.namespace) || matches!(self, Principal::Service(s) if s == k)
            }
        }
    }

    /// Refuses (403, naming what) unless the principal may do `access`.
    pub fn require(&self, access: Access<'_>, metrics: &Metrics) -> Result<(), ApiError> {
        if self.may(access) {
            return Ok(());
        }
        metrics.auth_failed(AuthFailure::Forbidden);
        let what = match access {
            Access::Admin => "managing tokens".to_string(),
            Access::Namespace(ns) => format!("writing in namespace {ns}"),
            Access::Service(k) => format!("changing service {}/{}", k.namespace, k.name),
            Access::Instances(k) => {
                format!("changing instances of service {}/{}", k.namespace, k.name)
            }
        };
        Err(ApiError::new(
            code::FORBIDDEN,
            format!("{self} does not allow {what}"),
        ))
    }
}

/// What a command needs, item by item (deduplicated). Instances named by id are looked up in
/// `st`; an id that names nothing needs nothing (its item will say it is missing).
pub fn accesses(cmd: &Command, st: &registry::State) -> Vec<Needed> {
    let ns = |n: &str| Needed::Namespace(n.to_string());
    let mut out: Vec<Needed> = match cmd {
        Command::CreateNamespaces(l) => l.iter().map(|n| ns(&n.name)).collect(),
        Command::UpdateNamespaces(l) => l
            .iter()
            .map(|n| ns(n.name.as_deref().unwrap_or_default()))
            .collect(),
        Command::DeleteNamespaces(l) => l.iter().map(|n| ns(n)).collect(),
        Command::CreateServices(l) => l.iter().map(|s| ns(&s.namespace)).collect(),
        Command::UpdateServices(l) => l
            .iter()
            .filter_map(|s| s.validate_key().ok())
            .map(Needed::Service)
            .collect(),
        Command::DeleteServices(l) | Command::DeleteAliases(l) => {
            l.iter().map(|k| ns(&k.namespace)).collect()
        }
        Command::CreateAlias(a) => vec![ns(&a.namespace)],
        Command::RegisterInstances(l) => l
            .iter()
            .map(|i| Needed::Instances(i.service_key()))
            .collect(),
        Command::UpdateInstances(l) => l
            .iter()
            .filter_map(|(sel, _)| selector_service(sel, st))
            .map(Needed::Instances)
            .collect(),
        Command::DeregisterInstances(l) => l
            .iter()
            .filter_map(|sel| selector_service(sel, st))
            .map(Needed::Instances)
            .collect(),
        Command::PutGroups(l) => l
            .iter()
            .map(|g| Needed::Service(ServiceKey::new(&g.namespace, &g.service)))
            .collect(),
        Command::DeleteGroups(l) => l.iter().map(|(k, _)| Needed::Service(k.clone())).collect(),
        Command::SetHealth { .. } | Command::PutTokens(_) | Command::RevokeTokens(_) => {
            vec![Needed::Admin]
        }
        Command::PutRules { rules, .. } => rules
            .iter()
            .flat_map(|r| [ns(r.namespace()), ns(&r.target().namespace)])
            .collect(),
        Command::DeleteRules(keys) => keys
            .iter()
            .filter_map(|k| st.rules.get(k))
            .flat_map(|r| [ns(r.namespace()), ns(&r.target().namespace)])
            .collect(),
        Command::EnableRules(list) => list
            .iter()
            .filter_map(|(k, _)| st.rules.get(k))
            .flat_map(|r| [ns(r.namespace()), ns(&r.target().namespace)])
            .collect(),
        Command::Flush => vec![],
    };
    out.sort();
    out.dedup();
    out
}

/// The service an instance selector names.
pub fn selector_service(sel: &InstanceSelector, st: &registry::State) -> Option<ServiceKey> {
    match sel {
        InstanceSelector::Address { service, .. } => Some(service.clone()),
        InstanceSelector::Id(id) => st.instance(id).map(|i| i.service_key()),
    }
}

/// What one item needs (an owned [`Access`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needed {
    /// See [`Access::Admin`].
    Admin,
    /// See [`Access::Namespace`].
    Namespace(String),
    /// See [`Access::Service`].
    Service(ServiceKey),
    /// See [`Access::Instances`].
    Instances(ServiceKey),
}

impl Needed {
    fn access(&self) -> Access<'_> {
        match self {
            Needed::Admin => Access::Admin,
            Needed::Namespace(n) => Access::Namespace(n),
            Needed::Service(k) => Access::Service(k),
            Needed::Instances(k) => Access::Instances(k),
        }
    }
}

/// Why a write was not done.
#[derive(Debug)]
pub enum Refused {
    /// The principal may not (403).
    Forbidden(ApiError),
    /// The registry refused it.
    Registry(registry::Error),
}

impl Refused {
    /// As an API error of an `entity` request.
    pub fn into_api(self, entity: code::Entity) -> ApiError {
        match self {
            Refused::Forbidden(e) => e,
            Refused::Registry(e) => ApiError::registry(entity, e),
        }
    }
}

/// Submits `cmd` if `who` may do every item of it, and logs the write with who made it (audit;
/// never a secret).
pub async fn write(
    reg: &Registry,
    metrics: &Metrics,
    who: &Principal,
    cmd: Command,
) -> Result<Vec<registry::Item>, Refused> {
    let needed = accesses(&cmd, &reg.read());
    for n in &needed {
        who.require(n.access(), metrics).map_err(|e| {
            tracing::warn!(target: "polaris::audit", who = %who, op = cmd.name(), "write refused: {}", e.detail);
            Refused::Forbidden(e)
        })?;
    }
    let op = cmd.name();
    let targets: Vec<String> = needed
        .iter()
        .take(20)
        .map(|n| match n {
            Needed::Admin => "tokens".to_string(),
            Needed::Namespace(n) => n.clone(),
            Needed::Service(k) | Needed::Instances(k) => format!("{}/{}", k.namespace, k.name),
        })
        .collect();
    let r = reg.submit(cmd).await;
    match &r {
        Ok(items) => {
            tracing::info!(target: "polaris::audit", who = %who, op, targets = ?targets, items = items.len(), "write")
        }
        Err(e) => {
            tracing::info!(target: "polaris::audit", who = %who, op, targets = ?targets, error = %e, "write failed")
        }
    }
    r.map_err(Refused::Registry)
}

/// Paths any caller may use.
fn public(cfg: &Config, path: &str) -> bool {
    path == "/healthz"
        || path == "/readyz"
        || path == "/openapi.json"
        || (cfg.public_metrics && path == "/metrics")
        || (cfg.public_debug && path.starts_with("/debug/"))
}

/// The secret a request carries.
fn secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-polaris-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

impl Auth {
    /// An authenticator over the registry's credentials.
    pub fn new(cfg: Config, registry: Registry, metrics: Arc<Metrics>) -> Self {
        Auth {
            failures: Buckets::new(cfg.failures_per_minute),
            cfg,
            registry,
            metrics,
        }
    }

    /// The principal of a secret, if it authenticates.
    pub fn principal(&self, secret: &str) -> Option<Principal> {
        let hash = token_hash(secret);
        let st = self.registry.read();
        Some(match st.credential(&hash)? {
            Credential::Token(t) => Principal::Token(t.clone()),
            Credential::Namespace(n) => Principal::Namespace(n.clone()),
            Credential::Service(k) => Principal::Service(k.clone()),
        })
    }

    /// The principal of a call that carries `secret` (gRPC metadata, or a token in the message):
    /// anyone when authentication is off; otherwise the token's principal, or the error to
    /// answer (counted, logged and rate-limited per address as the REST API does).
    pub fn check(&self, secret: Option<&str>, peer: Option<IpAddr>) -> Result<Principal, ApiError> {
        if !self.cfg.enabled {
            return Ok(Principal::Anyone);
        }
        let Some(secret) = secret.map(str::trim).filter(|s| !s.is_empty()) else {
            return Err(self.refusal(
                AuthFailure::Missing,
                peer,
                "no token: send it in the x-polaris-token metadata".into(),
            ));
        };
        self.principal(secret).ok_or_else(|| {
            self.refusal(
                AuthFailure::Unknown,
                peer,
                "the token is unknown or revoked".into(),
            )
        })
    }

    fn refuse(&self, reason: AuthFailure, peer: Option<IpAddr>, detail: String) -> Response {
        self.refusal(reason, peer, detail).into_response()
    }

    fn refusal(&self, reason: AuthFailure, peer: Option<IpAddr>, detail: String) -> ApiError {
        let limited = peer.is_some_and(|ip| !self.failures.allow(&ip));
        let (reason, code, detail) = if limited {
            (
                AuthFailure::RateLimited,
                code::IP_RATE_LIMIT,
                format!(
                    "too many failed authentications from {}",
                    peer.map(|p| p.to_string()).unwrap_or_default()
                ),
            )
        } else {
            (reason, code::UNAUTHORIZED, detail)
        };
        self.metrics.auth_failed(reason);
        // Logged without the secret; a rate-limited address is not logged again.
        if !limited {
            tracing::warn!(peer = ?peer, reason = reason.label(), "request refused: {detail}");
        }
        ApiError::new(code, detail)
    }
}

/// Middleware: authenticates the request and attaches its [`Principal`].
pub async fn authenticate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    if !auth.cfg.enabled {
        req.extensions_mut().insert(Principal::Anyone);
        return next.run(req).await;
    }
    if public(&auth.cfg, req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let Some(secret) = secret(req.headers()) else {
        return auth.refuse(
            AuthFailure::Missing,
            peer,
            "no token: send it in the X-Polaris-Token header".into(),
        );
    };
    let Some(p) = auth.principal(secret) else {
        return auth.refuse(
            AuthFailure::Unknown,
            peer,
            "the token is unknown or revoked".into(),
        );
    };
    req.extensions_mut().insert(p);
    next.run(req).await
}

/// Where the first admin token comes from.
#[derive(Debug, Clone)]
pub enum AdminSecret {
    /// This secret (from a file or the environment).
    Given(String),
    /// Generated if no admin token exists, written once to this file (mode 0600).
    Generate(PathBuf),
}

/// Id of the admin token whose secret the operator gives at start.
pub const BOOTSTRAP_ADMIN_ID: &str = "bootstrap-admin";

/// Makes sure an admin can log in: a given secret becomes (or replaces) the bootstrap admin
/// token; otherwise, if no admin token exists, one is generated and its secret written to a file
/// only the owner can read. Returns that file when it was written.
pub async fn ensure_admin(
    reg: &Registry,
    secret: AdminSecret,
) -> Result<Option<PathBuf>, EnsureAdminError> {
    let admin = |hash: String| AccessToken {
        id: BOOTSTRAP_ADMIN_ID.into(),
        name: "bootstrap admin".into(),
        scope: TokenScope::Admin,
        hash,
        ctime: crate::model::now_rfc3339(),
    };
    match secret {
        AdminSecret::Given(s) => {
            let hash = token_hash(s.trim());
            let current = reg.read().tokens.get(BOOTSTRAP_ADMIN_ID).cloned();
            if current.is_none_or(|t| t.hash != hash || t.scope != TokenScope::Admin) {
                reg.submit(Command::PutTokens(vec![admin(hash)])).await?;
            }
            Ok(None)
        }
        AdminSecret::Generate(path) => {
            let exists = reg
                .read()
                .tokens
                .values()
                .any(|t| t.scope == TokenScope::Admin);
            if exists {
                return Ok(None);
            }
            let (secret, hash) = crate::model::new_token();
            write_secret(&path, &secret).map_err(|source| EnsureAdminError::Write {
                path: path.clone(),
                source,
            })?;
            reg.submit(Command::PutTokens(vec![admin(hash)])).await?;
            Ok(Some(path))
        }
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Replaced only if a previous start wrote it and its token is gone (the store was reset).
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{secret}")?;
    f.sync_all()
}

/// Why the admin token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EnsureAdminError {
    /// Writing the generated secret.
    #[error("writing the admin token to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Storing the token.
    #[error("storing the admin token: {0}")]
    Registry(#[from] registry::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scope: TokenScope) -> Principal {
        Principal::Token(Arc::new(AccessToken {
            id: "i".into(),
            name: "n".into(),
            scope,
            hash: "h".into(),
            ctime: "t".into(),
        }))
    }

    #[test]
    fn scopes_decide_what_may_be_written() {
        let shop = ServiceKey::new("shop", "cart");
        let other = ServiceKey::new("other", "x");
        let writer = token(TokenScope::Write {
            namespaces: vec!["shop".into()],
        });
        let cases: Vec<(&str, Principal, Access, bool)> = vec![
            (
                "admin tokens",
                token(TokenScope::Admin),
                Access::Admin,
                true,
            ),
            ("writer tokens", writer.clone(), Access::Admin, false),
            (
                "writer own ns",
                writer.clone(),
                Access::Namespace("shop"),
                true,
            ),
            (
                "writer other ns",
                writer.clone(),
                Access::Namespace("other"),
                false,
            ),
            (
                "writer instances",
                writer.clone(),
                Access::Instances(&shop),
                true,
            ),
            (
                "writer other instances",
                writer,
                Access::Instances(&other),
                false,
            ),
            (
                "read",
                token(TokenScope::Read),
                Access::Instances(&shop),
                false,
            ),
            (
                "ns token",
                Principal::Namespace("shop".into()),
                Access::Service(&shop),
                true,
            ),
            (
                "ns token other",
                Principal::Namespace("shop".into()),
                Access::Namespace("other"),
                false,
            ),
            (
                "svc token own",
                Principal::Service(shop.clone()),
                Access::Instances(&shop),
                true,
            ),
            (
                "svc token other",
                Principal::Service(shop.clone()),
                Access::Instances(&other),
                false,
            ),
            (
                "svc token ns",
                Principal::Service(shop.clone()),
                Access::Namespace("shop"),
                false,
            ),
            ("off", Principal::Anyone, Access::Admin, true),
        ];
        for (what, p, a, want) in cases {
            assert_eq!(p.may(a), want, "{what}");
        }
        let m = Metrics::default();
        let e = Principal::Service(shop.clone())
            .require(Access::Namespace("shop"), &m)
            .unwrap_err();
        assert_eq!(e.code, code::FORBIDDEN);
        assert!(
            e.detail.contains("writing in namespace shop"),
            "{}",
            e.detail
        );
        assert_eq!(m.auth_failures(AuthFailure::Forbidden), 1);
    }

    #[test]
    fn the_secret_comes_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(secret(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(secret(&h), Some("abc"));
        h.insert("x-polaris-token", " def ".parse().unwrap());
        assert_eq!(secret(&h), Some("def"));
    }
}
