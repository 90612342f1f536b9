//! The watch of a single-process store: recent commits kept in order, and a broadcast of new ones.

use std::collections::VecDeque;

use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{Committed, Error, Watch};

/// Commits kept for watches that start behind, and the broadcast lag tolerated.
const HISTORY: usize = 4096;

/// Recent commits and the subscribers of new ones.
pub struct Feed {
    inner: Mutex<Inner>,
}

struct Inner {
    history: VecDeque<Committed>,
    /// The revision the store was at before the oldest kept commit.
    base: u64,
    tx: broadcast::Sender<Committed>,
}

impl Feed {
    /// A feed of a store at `revision`.
    pub fn new(revision: u64) -> Feed {
        Feed {
            inner: Mutex::new(Inner {
                history: VecDeque::new(),
                base: revision,
                tx: broadcast::channel(HISTORY).0,
            }),
        }
    }

    /// Records a commit. Callers publish in revision order.
    pub fn publish(&self, c: Committed) {
        let mut inner = self.inner.lock();
        debug_assert!(
            inner.history.back().map_or(inner.base, |l| l.revision) < c.revision,
            "commits published out of order"
        );
        if inner.history.len() == HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.base = old.revision;
            }
        }
        inner.history.push_back(c.clone());
        let _ = inner.tx.send(c);
    }

    /// Every commit after `from`, then each new one.
    pub fn watch(&self, from: u64) -> Result<Watch, Error> {
        let inner = self.inner.lock();
        if from < inner.base {
            return Err(Error::Compacted {
                from,
                oldest: inner.base + 1,
            });
        }
        let past: Vec<Committed> = inner
            .history
            .iter()
            .filter(|c| c.revision > from)
            .cloned()
            .collect();
        let last = past.last().map_or(from, |c| c.revision);
        let rx = inner.tx.subscribe();
        drop(inner);
        let live = futures::stream::unfold((rx, last), |(mut rx, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.revision <= last => continue,
                    Ok(c) => {
                        let r = c.revision;
                        return Some((Ok(c), (rx, r)));
                    }
                    // A watcher this far behind must reload: the next commits are gone.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some((
                            Err(Error::Compacted {
                                from: last,
                                oldest: last + 1,
                            }),
                            (rx, u64::MAX),
                        ))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(futures::stream::iter(past.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(revision: u64) -> Committed {
        Committed {
            revision,
            batch: std::sync::Arc::new(vec![]),
        }
    }

    #[tokio::test]
    async fn history_past_its_bound_is_compacted() {
        let f = Feed::new(10);
        for r in 11..=(10 + HISTORY as u64 + 5) {
            f.publish(commit(r));
        }
        assert!(matches!(
            f.watch(10),
            Err(Error::Compacted {
                from: 10,
                oldest: 16
            })
        ));
        let mut w = f.watch(15).unwrap();
        assert_eq!(w.next().await.unwrap().unwrap().revision, 16);
    }
}
