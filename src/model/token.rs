//! Access tokens for the REST API: who may read and change the registry.
//!
//! A token is a random secret shown once, at creation; only its SHA-256 is stored. Besides these,
//! the tokens PolarisMesh hands out with each namespace and service also authenticate: a namespace
//! token may write in its namespace, a service token may write the service's instances.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{required, text, validate_namespace_name, FieldError, VResult};

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum TokenScope {
    /// Everything, tokens included.
    Admin,
    /// Read everything; write in these namespaces (their services, instances, groups, and the
    /// namespaces themselves).
    Write {
        /// Namespaces it may write in.
        namespaces: Vec<String>,
    },
    /// Read everything, write nothing.
    Read,
}

/// A stored access token (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessToken {
    /// Id (random, not secret): names the token in lists, revocations and audit logs.
    pub id: String,
    /// Free text naming its holder.
    pub name: String,
    /// What it may do.
    #[serde(flatten)]
    pub scope: TokenScope,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// Creation time.
    pub ctime: String,
}

/// A token as requested (`POST /core/v1/tokens`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInput {
    /// Free text naming its holder.
    #[serde(default)]
    pub name: Option<String>,
    /// `admin`, `write` or `read`.
    #[serde(default)]
    pub role: Option<String>,
    /// With `write`: the namespaces it may write in.
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
}

/// Most namespaces one write token names.
pub const MAX_TOKEN_NAMESPACES: usize = 256;

impl TokenInput {
    /// Validates into a token with a fresh id and the given secret's hash, stamped `now`.
    pub fn validate(&self, hash: String, now: &str) -> VResult<AccessToken> {
        let name = required(&self.name, "name")?;
        let name = text(&Some(name.to_string()), "name")?;
        let role = required(&self.role, "role")?;
        let namespaces = self.namespaces.clone().unwrap_or_default();
        let scope = match role {
            "admin" | "read" if !namespaces.is_empty() => {
                return Err(FieldError::new(
                    "namespaces",
                    format!("only a write token names namespaces, not a {role} token"),
                ))
            }
            "admin" => TokenScope::Admin,
            "read" => TokenScope::Read,
            "write" => {
                if namespaces.is_empty() || namespaces.len() > MAX_TOKEN_NAMESPACES {
                    return Err(FieldError::new(
                        "namespaces",
                        "a write token names 1 to 256 namespaces",
                    ));
                }
                for (i, n) in namespaces.iter().enumerate() {
                    validate_namespace_name(n, &format!("namespaces[{i}]"))?;
                }
                TokenScope::Write { namespaces }
            }
            other => {
                return Err(FieldError::new(
                    "role",
                    format!("{other:?} is not one of admin, write, read"),
                ))
            }
        };
        Ok(AccessToken {
            id: random_id(),
            name,
            scope,
            hash,
            ctime: now.to_string(),
        })
    }
}

/// A random 64-bit id, hex.
pub fn random_id() -> String {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).expect("the system's random source");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(role: &str, ns: &[&str]) -> TokenInput {
        TokenInput {
            name: Some("ci".into()),
            role: Some(role.into()),
            namespaces: (!ns.is_empty()).then(|| ns.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn scopes_are_validated_naming_the_field() {
        let ok = input("write", &["a", "b"])
            .validate("h".into(), "t")
            .unwrap();
        assert_eq!(
            ok.scope,
            TokenScope::Write {
                namespaces: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(ok.id.len(), 16);
        let field = |i: TokenInput| i.validate("h".into(), "t").unwrap_err().field;
        assert_eq!(field(input("write", &[])), "namespaces");
        assert_eq!(field(input("read", &["a"])), "namespaces");
        assert_eq!(field(input("owner", &[])), "role");
        assert_eq!(field(input("write", &["bad name"])), "namespaces[0]");
        assert_eq!(
            field(TokenInput {
                name: None,
                ..input("admin", &[])
            }),
            "name"
        );
        // Stored form: the role beside the other fields.
        let v = serde_json::to_value(&ok).unwrap();
        assert_eq!(v["role"], "write");
        assert_eq!(v["namespaces"][1], "b");
        let back: AccessToken = serde_json::from_value(v).unwrap();
        assert_eq!(back, ok);
    }
}
