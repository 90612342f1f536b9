//! Durable storage of the registry.
//!
//! [`Store`] is the seam: the registry hands it one batch of [`Mutation`]s per commit, with the
//! revision it expects the store to be at; the store applies the batch atomically and durably (when
//! `commit` returns) only if no other writer committed since, and answers the revision it assigned.
//! [`Store::watch`] streams committed batches from a revision on, so a replica can follow what
//! others write. The store knows nothing about validation or indexes; it keeps records by key.
//!
//! [`RedbStore`] is the embedded default; [`EtcdStore`] is shared by replicas; [`MemStore`] keeps
//! records in memory (tests, benchmarks).
//! Both are single-process stores: their revisions advance by one per commit, and their watch
//! serves a bounded history of recent commits ([`Feed`]).

pub mod etcd;
mod feed;
mod memory;
mod redb;

pub use etcd::EtcdStore;
pub use feed::Feed;
pub use memory::MemStore;
pub use redb::RedbStore;

use std::sync::Arc;

use futures::stream::BoxStream;

use crate::model::rules::{Rule, RuleKey};
use crate::model::{AccessToken, Instance, InstanceGroup, Namespace, Service};

/// A backend's own error, kept as the source.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend failed.
    #[error("{backend} store: {source}")]
    Backend {
        /// Which (`embedded`, `etcd`).
        backend: &'static str,
        /// Its error.
        source: Source,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record {key:?} in {table}: {source}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// Decoding error.
        source: serde_json::Error,
    },
    /// Creating the data directory failed.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    /// Another writer committed since the revision the commit expected: nothing was written.
    #[error("the store is at revision {actual}, not {expected}: another writer committed first")]
    Conflict {
        /// The revision the commit expected.
        expected: u64,
        /// The store's revision.
        actual: u64,
    },
    /// The history a watch asked for is gone: reload everything.
    #[error("revisions before {oldest} are compacted (asked from {from})")]
    Compacted {
        /// The revision asked for.
        from: u64,
        /// The oldest revision still served.
        oldest: u64,
    },
    /// A blocking store call could not run.
    #[error("store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One change to stored records.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Create or replace a namespace.
    PutNamespace(Namespace),
    /// Delete a namespace by name.
    DeleteNamespace(String),
    /// Create or replace a service.
    PutService(std::sync::Arc<Service>),
    /// Delete a service.
    DeleteService {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Create or replace an instance.
    PutInstance(std::sync::Arc<Instance>),
    /// Delete an instance by id.
    DeleteInstance(String),
    /// Create or replace an instance group.
    PutGroup(InstanceGroup),
    /// Create or replace an access token.
    PutToken(AccessToken),
    /// Delete (revoke) an access token by id.
    DeleteToken(String),
    /// Create or replace a governance rule.
    PutRule(std::sync::Arc<Rule>),
    /// Delete a governance rule.
    DeleteRule(RuleKey),
    /// Delete an instance group.
    DeleteGroup {
        /// Namespace.
        namespace: String,
        /// Service.
        service: String,
        /// Group name.
        name: String,
    },
}

/// Everything stored, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Last committed revision.
    pub revision: u64,
    /// Namespaces.
    pub namespaces: Vec<Namespace>,
    /// Services and aliases.
    pub services: Vec<Service>,
    /// Instances.
    pub instances: Vec<Instance>,
    /// Instance groups.
    pub groups: Vec<InstanceGroup>,
    /// Access tokens.
    pub tokens: Vec<AccessToken>,
    /// Governance rules.
    pub rules: Vec<Rule>,
}

/// A committed batch, as a watch sees it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The revision the store assigned to it.
    pub revision: u64,
    /// What it changed, in order.
    pub batch: Arc<Vec<Mutation>>,
}

/// Committed batches, in revision order.
pub type Watch = BoxStream<'static, Result<Committed, Error>>;

/// Durable storage of registry records.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads everything, with the revision it is at.
    async fn load(&self) -> Result<Snapshot, Error>;

    /// Applies `batch` atomically and durably if the store is at revision `expected`; answers the
    /// revision the store assigned to it. Otherwise [`Error::Conflict`], and nothing is written.
    async fn commit(&self, batch: Vec<Mutation>, expected: u64) -> Result<u64, Error>;

    /// Every batch committed after revision `from`, in order, then each as it commits (by any
    /// writer). [`Error::Compacted`] when the store no longer has that history.
    async fn watch(&self, from: u64) -> Result<Watch, Error>;

    /// The revision of the last commit, by any writer.
    async fn revision(&self) -> Result<u64, Error> {
        Ok(self.load().await?.revision)
    }

    /// Most mutations one commit may hold, if the backend bounds it (etcd's `--max-txn-ops`).
    fn max_batch(&self) -> Option<usize> {
        None
    }
}

#[cfg(test)]
pub(crate) mod conformance;
