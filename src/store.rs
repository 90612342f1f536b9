//! Durable storage of the registry.
//!
//! [`Store`] is the seam: the registry hands it one batch of [`Mutation`]s per commit and expects the
//! batch to be durable (fsync'd) when `commit` returns. [`RedbStore`] is the embedded default.
//! The store knows nothing about validation or indexes; it keeps records by key.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::model::rules::{Rule, RuleKey};
use crate::model::{AccessToken, Instance, InstanceGroup, Namespace, Service};

const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Redb(String),
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
}

macro_rules! redb_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Redb(e.to_string())
            }
        }
    )*};
}
redb_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

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

/// Durable storage of registry records.
pub trait Store: Send + Sync + 'static {
    /// Loads everything.
    fn load(&self) -> Result<Snapshot, Error>;
    /// Applies `batch` atomically and durably, recording `revision` as the last revision.
    fn commit(&self, batch: &[Mutation], revision: u64) -> Result<(), Error>;
}

/// The embedded store: one redb file, `registry.redb`, in the data directory.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("registry.redb"))?;
        let txn = db.begin_write()?;
        {
            txn.open_table(NAMESPACES)?;
            txn.open_table(SERVICES)?;
            txn.open_table(INSTANCES)?;
            txn.open_table(GROUPS)?;
            txn.open_table(TOKENS)?;
            txn.open_table(RULES)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }
}

fn service_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn rule_key((kind, id): &RuleKey) -> String {
    format!("{}/{id}", kind.as_str())
}

fn group_key(ns: &str, svc: &str, name: &str) -> String {
    format!("{ns}/{svc}/{name}")
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("model types always serialize")
}

fn load_table<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, Error> {
    load_table_with(txn, def, name, |b| serde_json::from_slice(b))
}

fn load_table_with<T>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    name: &'static str,
    decode: fn(&[u8]) -> serde_json::Result<T>,
) -> Result<Vec<T>, Error> {
    let table = txn
        .open_table(def)
        .map_err(|e| Error::Redb(e.to_string()))?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let rec = decode(v.value()).map_err(|source| Error::Corrupt {
            table: name,
            key: k.value().to_string(),
            source,
        })?;
        out.push(rec);
    }
    Ok(out)
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, Error> {
        let txn = self.db.begin_read()?;
        let revision = txn
            .open_table(META)
            .map_err(|e| Error::Redb(e.to_string()))?
            .get(REVISION_KEY)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(Snapshot {
            revision,
            namespaces: load_table(&txn, NAMESPACES, "namespaces")?,
            services: load_table_with(&txn, SERVICES, "services", Service::from_record)?,
            instances: load_table(&txn, INSTANCES, "instances")?,
            groups: load_table(&txn, GROUPS, "groups")?,
            tokens: load_table(&txn, TOKENS, "tokens")?,
            rules: load_table(&txn, RULES, "rules")?,
        })
    }

    fn commit(&self, batch: &[Mutation], revision: u64) -> Result<(), Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        {
            let mut ns = txn.open_table(NAMESPACES)?;
            let mut svc = txn.open_table(SERVICES)?;
            let mut inst = txn.open_table(INSTANCES)?;
            let mut grp = txn.open_table(GROUPS)?;
            let mut tok = txn.open_table(TOKENS)?;
            let mut rules = txn.open_table(RULES)?;
            let mut meta = txn.open_table(META)?;
            for m in batch {
                match m {
                    Mutation::PutNamespace(n) => {
                        ns.insert(n.name.as_str(), encode(n).as_slice())?;
                    }
                    Mutation::DeleteNamespace(n) => {
                        ns.remove(n.as_str())?;
                    }
                    Mutation::PutService(s) => {
                        svc.insert(
                            service_key(&s.namespace, &s.name).as_str(),
                            encode(s.as_ref()).as_slice(),
                        )?;
                    }
                    Mutation::DeleteService { namespace, name } => {
                        svc.remove(service_key(namespace, name).as_str())?;
                    }
                    Mutation::PutInstance(i) => {
                        inst.insert(i.id.as_str(), encode(i.as_ref()).as_slice())?;
                    }
                    Mutation::DeleteInstance(id) => {
                        inst.remove(id.as_str())?;
                    }
                    Mutation::PutGroup(g) => {
                        grp.insert(
                            group_key(&g.namespace, &g.service, &g.name).as_str(),
                            encode(g).as_slice(),
                        )?;
                    }
                    Mutation::DeleteGroup {
                        namespace,
                        service,
                        name,
                    } => {
                        grp.remove(group_key(namespace, service, name).as_str())?;
                    }
                    Mutation::PutToken(t) => {
                        tok.insert(t.id.as_str(), encode(t).as_slice())?;
                    }
                    Mutation::DeleteToken(id) => {
                        tok.remove(id.as_str())?;
                    }
                    Mutation::PutRule(r) => {
                        rules.insert(rule_key(&r.key()).as_str(), encode(r.as_ref()).as_slice())?;
                    }
                    Mutation::DeleteRule(k) => {
                        rules.remove(rule_key(k).as_str())?;
                    }
                }
            }
            meta.insert(REVISION_KEY, revision)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceInput;
    use std::sync::Arc;

    #[test]
    fn commit_then_reload() {
        let dir = tempfile::tempdir().unwrap();
        let inst = InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some("127.0.0.1".into()),
            port: Some(80),
            ..Default::default()
        }
        .validate("t")
        .unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.commit(
                &[
                    Mutation::PutService(Arc::new(Service::bare("default", "echo", "t"))),
                    Mutation::PutInstance(Arc::new(inst.clone())),
                ],
                7,
            )
            .unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.revision, 7);
        assert_eq!(snap.services, vec![Service::bare("default", "echo", "t")]);
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.instances, vec![inst.clone()]);
        s.commit(&[Mutation::DeleteInstance(inst.id.clone())], 8)
            .unwrap();
        let snap = s.load().unwrap();
        assert!(snap.instances.is_empty());
        assert_eq!(snap.revision, 8);
    }

    /// A service stored by an earlier version, with its protocol as a field of its own, loads
    /// with the protocol in its metadata.
    #[test]
    fn a_service_record_with_a_protocol_field_loads_it_into_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(SERVICES)
                .unwrap()
                .insert(
                    "default/echo",
                    br#"{"namespace":"default","name":"echo","protocol":"grpc","metadata":{"a":"b"}}"#
                        .as_slice(),
                )
                .unwrap();
            txn.commit().unwrap();
        }
        let svc = &s.load().unwrap().services[0];
        assert_eq!(svc.protocol(), Some("grpc"));
        assert_eq!(svc.metadata["a"], "b");
    }
}
