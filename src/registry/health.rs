//! Heartbeat health: beat times in memory, the checker that turns silent instances unhealthy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{Command, Inner, Job, Registry};
use crate::model::Instance;

/// Per-instance heartbeat state, kept in memory only.
#[derive(Debug)]
pub struct BeatSlot {
    pub(super) last_beat_ms: AtomicU64,
    pub(super) ttl_ms: u64,
    /// Mirrors the instance's `healthy`; updated by the writer when it applies a transition.
    pub(super) healthy: AtomicBool,
    /// A heartbeat has submitted the unhealthy → healthy transition.
    pub(super) recovering: AtomicBool,
    /// The checker has submitted the healthy → unhealthy transition.
    pub(super) expiring: AtomicBool,
}

impl BeatSlot {
    pub(super) fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            > EXPIRE_TTL_COUNT * self.ttl_ms
    }
}

pub(super) fn new_slot(i: &Instance, now_ms: u64) -> Option<Arc<BeatSlot>> {
    let ttl = i.heartbeat_ttl()?;
    Some(Arc::new(BeatSlot {
        last_beat_ms: AtomicU64::new(now_ms),
        ttl_ms: u64::from(ttl) * 1000,
        healthy: AtomicBool::new(i.healthy),
        recovering: AtomicBool::new(false),
        expiring: AtomicBool::new(false),
    }))
}

/// Expiry: an instance is unhealthy after this many TTLs without a heartbeat.
pub const EXPIRE_TTL_COUNT: u64 = 3;

pub(super) async fn health_checker(
    inner: std::sync::Weak<Inner>,
    jobs: mpsc::WeakSender<Job>,
    writer_done: watch::Receiver<bool>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut epoch = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.now_ms();
        let owner = inner.ownership.read().clone();
        if let Some(o) = &owner {
            // Owners moved: every instance gets a fresh grace period here, since the beats of
            // what this replica now owns went to another replica until now.
            let e = o.epoch();
            if epoch.is_some_and(|old| old != e) {
                for s in inner.beats.read().values() {
                    s.last_beat_ms.fetch_max(now, Ordering::Relaxed);
                }
                tracing::info!(
                    epoch = e,
                    "replicas changed: heartbeat ownership moved, fresh grace period"
                );
            }
            epoch = Some(e);
        }
        let mine = |id: &str| owner.as_ref().is_none_or(|o| o.owns(id));
        let expired: Vec<String> = inner
            .beats
            .read()
            .iter()
            .filter(|(id, s)| {
                s.healthy.load(Ordering::Acquire)
                    && s.expired(now)
                    && mine(id)
                    && !s.expiring.swap(true, Ordering::AcqRel)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let Some(jobs) = jobs.upgrade() else { return };
        let reg = Registry {
            inner: inner.clone(),
            jobs,
            writer_done: writer_done.clone(),
        };
        drop(inner);
        for id in expired {
            let reg = reg.clone();
            tokio::spawn(async move {
                let r = reg
                    .submit(Command::SetHealth {
                        id: id.clone(),
                        healthy: false,
                    })
                    .await;
                if let Some(slot) = reg.inner.beats.read().get(&id) {
                    slot.expiring.store(false, Ordering::Release);
                }
                match r {
                    Ok(_) => tracing::debug!(instance = %id, "heartbeat expiry checked"),
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "failed to mark instance unhealthy")
                    }
                }
            });
        }
    }
}

pub(super) enum BeatOp {
    Upsert(Arc<Instance>),
    Remove(String),
}

pub(super) fn apply_beat_ops(inner: &Inner, ops: Vec<BeatOp>) {
    if ops.is_empty() {
        return;
    }
    let now = inner.now_ms();
    let mut beats = inner.beats.write();
    for op in ops {
        match op {
            BeatOp::Upsert(i) => match new_slot(&i, now) {
                Some(slot) => {
                    // Re-registration keeps the last beat; a new instance gets a full grace period.
                    if let Some(old) = beats.get(&i.id) {
                        if old.ttl_ms == slot.ttl_ms {
                            old.healthy.store(i.healthy, Ordering::Release);
                            continue;
                        }
                    }
                    beats.insert(i.id.clone(), slot);
                }
                None => {
                    beats.remove(&i.id);
                }
            },
            BeatOp::Remove(id) => {
                beats.remove(&id);
            }
        }
    }
}
