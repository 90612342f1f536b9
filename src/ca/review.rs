//! Who a ServiceAccount token belongs to: Kubernetes TokenReview, with a bounded cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::sign::Identity;

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token is invalid, expired, for another audience, or of a deleted ServiceAccount.
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but not a ServiceAccount's.
    #[error("token not of a ServiceAccount: {0}")]
    NotServiceAccount(String),
    /// The Kubernetes API did not answer (or not in time): no verdict.
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
}

/// Reviews tokens.
#[async_trait::async_trait]
pub trait Reviewer: Send + Sync + 'static {
    /// The identity `token` proves for `audiences`.
    async fn review(&self, token: &str) -> Result<Identity, ReviewError>;
}

/// TokenReview against a Kubernetes API.
pub struct KubeReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    timeout: Duration,
}

impl KubeReviewer {
    /// Reviews through `client`, for `audiences`, waiting at most `timeout`.
    pub fn new(client: kube::Client, audiences: Vec<String>, timeout: Duration) -> Self {
        KubeReviewer {
            client,
            audiences,
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl Reviewer for KubeReviewer {
    async fn review(&self, token: &str) -> Result<Identity, ReviewError> {
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let res = tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &tr))
            .await
            .map_err(|_| ReviewError::Unavailable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = res.status.unwrap_or_default();
        if let Some(err) = status.error.filter(|e| !e.is_empty()) {
            return Err(ReviewError::Unauthenticated(err));
        }
        if status.authenticated != Some(true) {
            return Err(ReviewError::Unauthenticated("not authenticated".into()));
        }
        if !self.audiences.is_empty() {
            let granted = status.audiences.unwrap_or_default();
            if !self.audiences.iter().any(|a| granted.contains(a)) {
                return Err(ReviewError::Unauthenticated(format!(
                    "the token is not for audience {:?}",
                    self.audiences
                )));
            }
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        Identity::from_username(&username).ok_or(ReviewError::NotServiceAccount(username))
    }
}

/// A [`Reviewer`] that remembers positive verdicts for a while: keyed by the SHA-256 of the token
/// (the token itself is not kept), for at most `ttl` and never past the token's own expiry,
/// holding at most `capacity` entries.
pub struct Cached<R> {
    inner: R,
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
}

impl<R: Reviewer> Cached<R> {
    /// Caches `inner`'s verdicts.
    pub fn new(inner: R, ttl: Duration, capacity: usize) -> Self {
        Cached {
            inner,
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }
}

fn token_key(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Seconds until the JWT's `exp`, if it has one (the token was verified by the review).
fn jwt_remaining(token: &str, now_unix: u64) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(Duration::from_secs(exp.saturating_sub(now_unix)))
}

#[async_trait::async_trait]
impl<R: Reviewer> Reviewer for Cached<R> {
    async fn review(&self, token: &str) -> Result<Identity, ReviewError> {
        if self.ttl.is_zero() {
            return self.inner.review(token).await;
        }
        let key = token_key(token);
        let now = Instant::now();
        if let Some((id, until)) = self.entries.lock().get(&key) {
            if *until > now {
                return Ok(id.clone());
            }
        }
        let id = self.inner.review(token).await?;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let keep = jwt_remaining(token, unix).map_or(self.ttl, |r| r.min(self.ttl));
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (id.clone(), now + keep));
        Ok(id)
    }
}

#[async_trait::async_trait]
impl<R: Reviewer + ?Sized> Reviewer for Arc<R> {
    async fn review(&self, token: &str) -> Result<Identity, ReviewError> {
        (**self).review(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl Reviewer for Counting {
        async fn review(&self, token: &str) -> Result<Identity, ReviewError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            if token.starts_with("bad") {
                return Err(ReviewError::Unauthenticated("bad".into()));
            }
            Ok(Identity {
                namespace: "ns".into(),
                service_account: token.to_string(),
            })
        }
    }

    fn jwt(exp: u64) -> String {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{exp}}}").as_bytes());
        format!("h.{p}.s")
    }

    #[tokio::test(start_paused = true)]
    async fn verdicts_are_cached_for_the_ttl_never_past_expiry_and_bounded() {
        let c = Cached::new(Counting(AtomicUsize::new(0)), Duration::from_secs(30), 3);
        c.review("a").await.unwrap();
        c.review("a").await.unwrap();
        assert_eq!(c.inner.0.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        c.review("a").await.unwrap();
        assert_eq!(c.inner.0.load(Ordering::Relaxed), 2);
        // Failures are not cached.
        assert!(c.review("bad").await.is_err());
        assert!(c.review("bad").await.is_err());
        assert_eq!(c.inner.0.load(Ordering::Relaxed), 4);
        // A token that expires in 5 s is kept 5 s, not 30.
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = jwt(unix + 5);
        c.review(&t).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        c.review(&t).await.unwrap();
        assert_eq!(c.inner.0.load(Ordering::Relaxed), 6);
        // Bounded.
        for i in 0..10 {
            c.review(&format!("t{i}")).await.unwrap();
        }
        assert!(c.entries.lock().len() <= 3);
    }
}
