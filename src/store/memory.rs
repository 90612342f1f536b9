//! Records in memory: the same contract as the durable stores, nothing on disk (unit tests,
//! benchmarks of everything but the disk).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Committed, Error, Feed, Mutation, Snapshot, Store, Watch};
use crate::model::rules::{Rule, RuleKey};
use crate::model::{AccessToken, Instance, InstanceGroup, Namespace, Service};

#[derive(Default)]
struct Records {
    revision: u64,
    namespaces: BTreeMap<String, Namespace>,
    services: BTreeMap<(String, String), Service>,
    instances: BTreeMap<String, Instance>,
    groups: BTreeMap<(String, String, String), InstanceGroup>,
    tokens: BTreeMap<String, AccessToken>,
    rules: BTreeMap<RuleKey, Rule>,
}

/// The in-memory store.
pub struct MemStore {
    records: Mutex<Records>,
    feed: Feed,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            records: Mutex::new(Records::default()),
            feed: Feed::new(0),
        }
    }
}

impl Records {
    fn apply(&mut self, m: &Mutation) {
        match m {
            Mutation::PutNamespace(n) => {
                self.namespaces.insert(n.name.clone(), n.clone());
            }
            Mutation::DeleteNamespace(n) => {
                self.namespaces.remove(n);
            }
            Mutation::PutService(s) => {
                self.services
                    .insert((s.namespace.clone(), s.name.clone()), (**s).clone());
            }
            Mutation::DeleteService { namespace, name } => {
                self.services.remove(&(namespace.clone(), name.clone()));
            }
            Mutation::PutInstance(i) => {
                self.instances.insert(i.id.clone(), (**i).clone());
            }
            Mutation::DeleteInstance(id) => {
                self.instances.remove(id);
            }
            Mutation::PutGroup(g) => {
                self.groups.insert(
                    (g.namespace.clone(), g.service.clone(), g.name.clone()),
                    g.clone(),
                );
            }
            Mutation::DeleteGroup {
                namespace,
                service,
                name,
            } => {
                self.groups
                    .remove(&(namespace.clone(), service.clone(), name.clone()));
            }
            Mutation::PutToken(t) => {
                self.tokens.insert(t.id.clone(), t.clone());
            }
            Mutation::DeleteToken(id) => {
                self.tokens.remove(id);
            }
            Mutation::PutRule(r) => {
                self.rules.insert(r.key(), (**r).clone());
            }
            Mutation::DeleteRule(k) => {
                self.rules.remove(k);
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn load(&self) -> Result<Snapshot, Error> {
        let r = self.records.lock();
        Ok(Snapshot {
            revision: r.revision,
            namespaces: r.namespaces.values().cloned().collect(),
            services: r.services.values().cloned().collect(),
            instances: r.instances.values().cloned().collect(),
            groups: r.groups.values().cloned().collect(),
            tokens: r.tokens.values().cloned().collect(),
            rules: r.rules.values().cloned().collect(),
        })
    }

    async fn commit(&self, batch: Vec<Mutation>, expected: u64) -> Result<u64, Error> {
        let mut r = self.records.lock();
        if r.revision != expected {
            return Err(Error::Conflict {
                expected,
                actual: r.revision,
            });
        }
        for m in &batch {
            r.apply(m);
        }
        r.revision += 1;
        let revision = r.revision;
        // Published under the lock: watchers see commits in revision order.
        self.feed.publish(Committed {
            revision,
            batch: Arc::new(batch),
        });
        Ok(revision)
    }

    async fn watch(&self, from: u64) -> Result<Watch, Error> {
        self.feed.watch(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::all(|| async { MemStore::default() }).await;
    }
}
