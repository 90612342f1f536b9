//! When the agent renews: at half its certificate's lifetime, and after a failure, with jittered
//! exponential backoff from 1 s.

use std::time::{Duration, SystemTime};

/// How long to wait, at `now`, before renewing a certificate valid from `not_before` to
/// `not_after`: until half of its lifetime has passed (30 minutes into a one-hour certificate),
/// and at once if that is past. The CA back-dates `not_before` by a minute for clock skew; the
/// lifetime counted is from issuance (`now` at receipt), so half a one-hour certificate is 30 min.
pub fn renew_after(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let start = now.max(not_before);
    let lifetime = not_after.duration_since(start).unwrap_or_default();
    lifetime / 2
}

/// Exponential backoff with jitter: 1 s, 2 s, 4 s ... up to 60 s, each ±20%.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_secs(1),
        }
    }
}

/// Most time between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Backoff {
    /// The wait before the next retry.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).expect("the system's random source");
        let jitter = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..=1
        base.mul_f64(0.8 + 0.4 * jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        // Issued now, back-dated a minute: half of the hour from now.
        let wait = renew_after(t0 - Duration::from_secs(60), t0 + hour, t0);
        assert_eq!(wait, Duration::from_secs(1800));
        // Half-way already: at once.
        assert_eq!(
            renew_after(t0 - hour, t0, t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
        // A 20 s certificate renews every 10 s.
        assert_eq!(
            renew_after(t0, t0 + Duration::from_secs(20), t0),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn backoff_grows_from_a_second_to_a_minute_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(800) && waits[0] <= Duration::from_millis(1200));
        assert!(waits[1] >= Duration::from_millis(1600) && waits[1] <= Duration::from_millis(2400));
        for w in &waits {
            assert!(*w <= MAX_BACKOFF.mul_f64(1.2));
        }
        assert!(waits[9] >= MAX_BACKOFF.mul_f64(0.8));
    }

    /// The renewal loop's timing with paused time: a 20 s certificate is renewed every 10 s, and a
    /// failure is retried after about a second.
    #[tokio::test(start_paused = true)]
    async fn renewal_loop_timing_with_paused_time() {
        let start = tokio::time::Instant::now();
        let mut renewals = Vec::new();
        let mut b = Backoff::default();
        // Three issued certificates, then a failure, then a fourth.
        for round in 0..5 {
            let now = SystemTime::UNIX_EPOCH + start.elapsed() + Duration::from_secs(1_000_000);
            let wait = if round == 3 {
                b.next_wait()
            } else {
                renew_after(
                    now - Duration::from_secs(60),
                    now + Duration::from_secs(20),
                    now,
                )
            };
            tokio::time::sleep(wait).await;
            renewals.push(start.elapsed());
        }
        assert_eq!(renewals[0], Duration::from_secs(10));
        assert_eq!(renewals[1], Duration::from_secs(20));
        assert_eq!(renewals[2], Duration::from_secs(30));
        let retry = renewals[3] - renewals[2];
        assert!(retry >= Duration::from_millis(800) && retry <= Duration::from_millis(1200));
        assert_eq!(renewals[4] - renewals[3], Duration::from_secs(10));
    }
}
