//! A replica's registry following a shared store: what other replicas commit reaches this
//! replica's state and change feed through the store's watch, in revision order.
//!
//! The watch resumes from the last revision applied, so a reconnect leaves no gap. When the store
//! no longer has that history (compaction), the state is reloaded whole and every service is
//! published as touched; translation versions are content hashes, so proxies are sent only what
//! really changed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;

use super::health::{apply_beat_ops, BeatOp};
use super::{Change, ChangeKey, Inner, State};
use crate::store::{self, Store};

/// Wait after a failed watch before watching again.
const RETRY: Duration = Duration::from_millis(500);

/// Measures, every second, how many of the store's commits this replica has not applied yet.
pub(super) async fn measure_lag(inner: Weak<Inner>, store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Ok(head) = store.revision().await {
            let applied = inner.state.read().revision;
            // etcd revisions count every key's writes; commits are the ones that matter here,
            // so the lag is 0 once the last commit is applied.
            let lag = head.saturating_sub(applied);
            inner.metrics.store_watch_lag.set(lag as i64);
        }
    }
}

/// Applies other replicas' commits from revision `from` on, until the registry is dropped.
pub(super) async fn follow(inner: Weak<Inner>, store: Arc<dyn Store>, mut from: u64) {
    loop {
        let mut watch = match store.watch(from).await {
            Ok(w) => w,
            Err(e) => {
                if let Some(inner) = inner.upgrade() {
                    inner.store_health.send_replace(Some(e.to_string()));
                }
                tracing::warn!(error = %e, from, "cannot watch the store; retrying");
                tokio::time::sleep(RETRY).await;
                if inner.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        while let Some(next) = watch.next().await {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if next.is_ok() {
                inner.store_health.send_if_modified(|h| h.take().is_some());
            }
            match next {
                Ok(c) => {
                    let _gate = inner.gate.lock().await;
                    let keys = {
                        let mut st = inner.state.write();
                        // This replica's own commits are applied by its writer.
                        if c.revision <= st.revision {
                            from = from.max(c.revision);
                            continue;
                        }
                        st.apply_committed(&c.batch, c.revision)
                    };
                    // Every replica keeps beat slots, so heartbeat ownership can move to it.
                    let beats: Vec<BeatOp> = c
                        .batch
                        .iter()
                        .filter_map(|m| match m {
                            store::Mutation::PutInstance(i) => Some(BeatOp::Upsert(i.clone())),
                            store::Mutation::DeleteInstance(id) => Some(BeatOp::Remove(id.clone())),
                            _ => None,
                        })
                        .collect();
                    apply_beat_ops(&inner, beats);
                    from = c.revision;
                    publish(&inner, c.revision, keys);
                }
                Err(store::Error::Compacted { oldest, .. }) => {
                    tracing::warn!(
                        from,
                        oldest,
                        "the store's history is compacted past this replica: reloading"
                    );
                    match store.load().await {
                        Ok(snap) => {
                            inner.metrics.store_reloads.inc();
                            let _gate = inner.gate.lock().await;
                            let revision = snap.revision;
                            let fresh = State::from_snapshot(snap);
                            let keys = {
                                let mut st = inner.state.write();
                                let keys = everything(&st, &fresh);
                                *st = fresh;
                                keys
                            };
                            from = revision;
                            publish(&inner, revision, keys);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reload failed; retrying");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                    break;
                }
                Err(e) => {
                    inner.store_health.send_replace(Some(e.to_string()));
                    tracing::warn!(error = %e, from, "the store's watch failed; resuming");
                    tokio::time::sleep(RETRY).await;
                    break;
                }
            }
        }
    }
}

fn publish(inner: &Inner, revision: u64, keys: Vec<ChangeKey>) {
    inner.metrics.followed_commits.inc();
    let _ = inner.feed.send(Arc::new(Change { revision, keys }));
    inner.revision.send_replace(revision);
}

/// Every namespace and service of either state: what a reload may have changed.
fn everything(old: &State, new: &State) -> Vec<ChangeKey> {
    let mut keys: Vec<ChangeKey> = Vec::new();
    for s in [old, new] {
        keys.extend(s.namespaces.keys().cloned().map(ChangeKey::Namespace));
        for k in s.services.keys() {
            keys.push(ChangeKey::Service(k.clone()));
            keys.push(ChangeKey::Instances(k.clone()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    keys
}
