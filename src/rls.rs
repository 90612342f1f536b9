//! The global rate-limit service (`envoy.service.ratelimit.v3.RateLimitService`), served by
//! `polaris server --rls-addr`.
//!
//! Sidecars ask it for every request their global rate-limit rules match (see
//! `xds::resources::ratelimit`): each descriptor names a rule and one of its amounts
//! (`rule = <id>#<k>`), plus the request's values of arguments that get buckets of their own. The
//! rule is read from the registry at each decision, so a change applies at once and a deleted or
//! disabled rule stops limiting. Buckets are token buckets (capacity and refill of the amount per
//! its period) keyed by rule, amount and values.
//!
//! Memory is bounded: a rule's amount keeps at most `max_values` buckets of distinct values
//! (values come from requests, a header's value say); past that, new values share one overflow
//! bucket of that amount until idle buckets are swept (every minute, those untouched for a
//! minute). Buckets of rules that no longer exist go with the sweep.
//!
//! In cluster mode every replica serves the service and each keeps its own buckets, holding an
//! equal share of every amount: `ceil(amount / replicas)` ([`Rls::set_replicas`]). Admitted in all
//! is then at most `amount + replicas - 1` per period; with traffic spread unevenly over the
//! replicas (sidecars pinned to one replica's connection) fewer are admitted, down to one share
//! when all of it reaches one replica. A change in the replica count starts fresh buckets.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::model::rules::{Rule, RuleKind};
use crate::registry::Registry;

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve on.
    pub addr: SocketAddr,
    /// Buckets of distinct values per rule amount, at most.
    pub max_values: usize,
}

/// Shards of the bucket map (decisions for different keys do not contend).
const SHARDS: usize = 32;

/// A value key past the cap.
const OVERFLOW: &str = "\u{0}overflow";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    rule: Arc<str>,
    amount: usize,
    values: Box<str>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// The amount it was filled for: a changed rule starts a fresh bucket.
    max: u32,
    period_ms: u64,
}

/// The rate-limit service.
pub struct Rls {
    registry: Registry,
    metrics: Arc<Metrics>,
    max_values: usize,
    shards: Vec<Mutex<HashMap<Key, Bucket>>>,
    /// Distinct-value buckets per (rule, amount).
    counts: Mutex<HashMap<(Arc<str>, usize), usize>>,
    /// How many replicas share each amount (cluster mode), else one.
    replicas: parking_lot::RwLock<Option<Arc<dyn Fn() -> usize + Send + Sync>>>,
}

impl Rls {
    /// A service reading rules from `registry`.
    pub fn new(registry: Registry, metrics: Arc<Metrics>, max_values: usize) -> Arc<Rls> {
        Arc::new(Rls {
            registry,
            metrics,
            max_values,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            counts: Mutex::new(HashMap::new()),
            replicas: parking_lot::RwLock::new(None),
        })
    }

    /// Shares every amount among the replicas `count` says are live.
    pub fn set_replicas(&self, count: Arc<dyn Fn() -> usize + Send + Sync>) {
        *self.replicas.write() = Some(count);
    }

    fn shard(&self, k: &Key) -> &Mutex<HashMap<Key, Bucket>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// One descriptor's decision: `None` when it names no rule in force.
    fn decide(&self, entries: &[(String, String)], hits: u32, now: Instant) -> Option<bool> {
        let rule_ref = entries.iter().find(|(k, _)| k == "rule")?.1.as_str();
        let (id, k) = rule_ref.rsplit_once('#')?;
        let k: usize = k.parse().ok()?;
        let (max, period_ms) = {
            let st = self.registry.read();
            let rule = st.rules.get(&(RuleKind::RateLimit, id.to_string()))?;
            match rule.as_ref() {
                Rule::RateLimit(r) if r.enabled() => {
                    let a = r.amounts.get(k)?;
                    let n = self.replicas.read().as_ref().map_or(1, |f| f().max(1)) as u32;
                    (a.max_amount.div_ceil(n).max(1), a.period_ms())
                }
                _ => return None,
            }
        };
        let values: Vec<String> = entries
            .iter()
            .filter(|(key, _)| key != "rule" && key != "rule_query")
            .map(|(key, v)| format!("{key}={v}"))
            .collect();
        let rule: Arc<str> = Arc::from(id);
        let mut key = Key {
            rule: rule.clone(),
            amount: k,
            values: values.join("\u{1}").into_boxed_str(),
        };
        let exists = self.shard(&key).lock().contains_key(&key);
        if !exists && !key.values.is_empty() {
            let mut counts = self.counts.lock();
            let n = counts.entry((rule.clone(), k)).or_default();
            if *n >= self.max_values {
                key.values = OVERFLOW.into();
            } else {
                *n += 1;
            }
        }
        let mut shard = self.shard(&key).lock();
        let b = shard.entry(key).or_insert(Bucket {
            tokens: f64::from(max),
            at: now,
            max,
            period_ms,
        });
        if b.max != max || b.period_ms != period_ms {
            *b = Bucket {
                tokens: f64::from(max),
                at: now,
                max,
                period_ms,
            };
        }
        let rate = f64::from(max) / period_ms as f64;
        let elapsed = now.duration_since(b.at).as_secs_f64() * 1e3;
        b.tokens = (b.tokens + elapsed * rate).min(f64::from(max));
        b.at = now;
        let need = f64::from(hits.max(1));
        let ok = b.tokens >= need;
        if ok {
            b.tokens -= need;
        }
        drop(shard);
        self.metrics.rls_decision(&rule, ok);
        Some(ok)
    }

    /// Drops buckets untouched for `idle` (and with them the values they held).
    pub fn sweep(&self, idle: Duration) {
        let now = Instant::now();
        let mut dropped: HashMap<(Arc<str>, usize), usize> = HashMap::new();
        for s in &self.shards {
            s.lock().retain(|k, b| {
                let keep = now.duration_since(b.at) < idle;
                if !keep && !k.values.is_empty() && &*k.values != OVERFLOW {
                    *dropped.entry((k.rule.clone(), k.amount)).or_default() += 1;
                }
                keep
            });
        }
        let mut counts = self.counts.lock();
        for (k, n) in dropped {
            if let Some(c) = counts.get_mut(&k) {
                *c = c.saturating_sub(n);
                if *c == 0 {
                    counts.remove(&k);
                }
            }
        }
    }

    /// Buckets held (for tests and the benchmark).
    pub fn buckets(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Answers one request (also the benchmark's in-process path).
    pub fn answer(&self, req: &RateLimitRequest) -> RateLimitResponse {
        let now = Instant::now();
        let mut overall = Code::Ok;
        let statuses = req
            .descriptors
            .iter()
            .map(|d| {
                let entries: Vec<(String, String)> = d
                    .entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect();
                let hits = d
                    .hits_addend
                    .map(|h| h.value as u32)
                    .unwrap_or(req.hits_addend);
                let code = match self.decide(&entries, hits, now) {
                    Some(false) => {
                        overall = Code::OverLimit;
                        Code::OverLimit
                    }
                    _ => Code::Ok,
                };
                DescriptorStatus {
                    code: code as i32,
                    ..Default::default()
                }
            })
            .collect();
        RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        }
    }
}

/// The gRPC face of an [`Rls`].
#[derive(Clone)]
pub struct Service(pub Arc<Rls>);

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.answer(request.get_ref())))
    }
}

/// Serves `rls` on `listener` until `stop` turns true; sweeps idle buckets every minute.
pub async fn serve(
    rls: Arc<Rls>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let sweeper = {
        let rls = rls.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                rls.sweep(Duration::from_secs(60));
            }
        })
    };
    // The builder's `tcp_nodelay` applies only to listeners it binds itself: without it, small
    // answers wait on Nagle's algorithm for the peer's delayed ACK (40 ms stalls).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let r = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Service(rls)))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    sweeper.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rules::ratelimit::{Amount, LimitType, RateLimitRule};
    use crate::registry::{self, Command};
    use crate::store::RedbStore;

    async fn with_rule(dir: &std::path::Path, max: u32) -> (Registry, Arc<Rls>) {
        let reg = Registry::open(
            Arc::new(RedbStore::open(dir).unwrap()),
            registry::Config::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        let r = RateLimitRule {
            id: "g".into(),
            name: "g".into(),
            namespace: "default".into(),
            service: "echo".into(),
            kind: LimitType::Global,
            amounts: vec![Amount {
                max_amount: max,
                valid_duration: "1s".into(),
            }],
            ..Default::default()
        };
        reg.submit(Command::PutRules {
            rules: vec![Rule::RateLimit(r)],
            create: true,
        })
        .await
        .unwrap();
        let rls = Rls::new(reg.clone(), Arc::new(Metrics::default()), 3);
        (reg, rls)
    }

    fn e(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_refill_and_are_capped_per_value() {
        let dir = tempfile::tempdir().unwrap();
        let (_reg, rls) = with_rule(dir.path(), 5).await;
        let now = Instant::now();
        let rule = e(&[("rule", "g#0")]);
        let allowed = (0..10)
            .filter(|_| rls.decide(&rule, 1, now) == Some(true))
            .count();
        assert_eq!(allowed, 5);
        // Half a second refills half the amount.
        tokio::time::advance(Duration::from_millis(500)).await;
        let allowed = (0..10)
            .filter(|_| rls.decide(&rule, 1, Instant::now()) == Some(true))
            .count();
        assert!((2..=3).contains(&allowed), "{allowed}");
        // Unknown rules do not limit.
        assert_eq!(rls.decide(&e(&[("rule", "nope#0")]), 1, now), None);
        // Values get buckets of their own, at most 3; the rest share one.
        for user in ["a", "b", "c", "d", "e"] {
            let d = e(&[("rule", "g#0"), ("header:x-user", user)]);
            assert_eq!(rls.decide(&d, 1, now), Some(true));
        }
        assert_eq!(
            rls.buckets(),
            1 + 3 + 1,
            "the shared one, three values, one overflow"
        );
        tokio::time::advance(Duration::from_secs(120)).await;
        rls.sweep(Duration::from_secs(60));
        assert_eq!(rls.buckets(), 0);
        let d = e(&[("rule", "g#0"), ("header:x-user", "f")]);
        rls.decide(&d, 1, Instant::now());
        assert_eq!(rls.buckets(), 1, "room again after the sweep");
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_share_each_amount() {
        let dir = tempfile::tempdir().unwrap();
        let (_reg, rls) = with_rule(dir.path(), 10).await;
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(3));
        let count = n.clone();
        rls.set_replicas(Arc::new(move || {
            count.load(std::sync::atomic::Ordering::Relaxed)
        }));
        let rule = e(&[("rule", "g#0")]);
        let now = Instant::now();
        let allowed = (0..10)
            .filter(|_| rls.decide(&rule, 1, now) == Some(true))
            .count();
        assert_eq!(allowed, 4, "ceil(10 / 3) on each of three replicas");
        // One replica left: the whole amount, in a fresh bucket.
        n.store(1, std::sync::atomic::Ordering::Relaxed);
        let allowed = (0..20)
            .filter(|_| rls.decide(&rule, 1, now) == Some(true))
            .count();
        assert_eq!(allowed, 10);
    }

    #[tokio::test]
    async fn a_burst_takes_the_amount_in_real_time() {
        let dir = tempfile::tempdir().unwrap();
        let (_reg, rls) = with_rule(dir.path(), 20).await;
        let req = RateLimitRequest {
            domain: "echo.default".into(),
            descriptors: vec![envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
                entries: vec![envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry {
                    key: "rule".into(),
                    value: "g#0".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let ok = (0..40)
            .filter(|_| rls.answer(&req).overall_code == Code::Ok as i32)
            .count();
        assert_eq!(ok, 20);
    }
}
