//! Token buckets per key (an identity, a source address), bounded in number.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Keys tracked at most; past it, keys idle for a minute are forgotten (a full bucket again).
const MAX_KEYS: usize = 100_000;

/// `per_minute` events per key, with a burst of as many.
pub struct Buckets<K> {
    per_minute: u32,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets allowing `per_minute` events a minute per key (0: unlimited).
    pub fn new(per_minute: u32) -> Self {
        Buckets {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one event for `key` if its bucket has one.
    pub fn allow(&self, key: &K) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let cap = f64::from(self.per_minute);
        let rate = cap / 60.0;
        let now = Instant::now();
        let mut b = self.buckets.lock();
        if b.len() > MAX_KEYS {
            b.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(60));
        }
        let (tokens, at) = b.entry(key.clone()).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_gets_its_burst_then_its_rate() {
        let b = Buckets::new(6);
        for _ in 0..6 {
            assert!(b.allow(&"a"));
        }
        assert!(!b.allow(&"a"));
        assert!(b.allow(&"b"), "keys are independent");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow(&"a"), "one event back every 10 s");
        assert!(!b.allow(&"a"));
        assert!(Buckets::new(0).allow(&"x"), "0 is unlimited");
    }
}
