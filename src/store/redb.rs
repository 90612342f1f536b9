//! The embedded store: one redb file, `registry.redb`, in the data directory. Commits run on a
//! blocking thread with `Durability::Immediate` (fsync'd when `commit` returns).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::{Committed, Error, Feed, Mutation, Snapshot, Store, Watch};
use crate::model::rules::RuleKey;
use crate::model::Service;

const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        backend: "embedded",
        source: Box::new(e),
    }
}

macro_rules! redb_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                backend(e)
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

/// The embedded store: one redb file, `registry.redb`, in the data directory.
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Held from a commit's start to its publication, so watchers see commits in order.
    commit: parking_lot::Mutex<()>,
    feed: Feed,
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
        let revision = read_revision(&db.begin_read()?)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                commit: parking_lot::Mutex::new(()),
                feed: Feed::new(revision),
            }),
        })
    }
}

fn read_revision(txn: &redb::ReadTransaction) -> Result<u64, Error> {
    Ok(txn
        .open_table(META)?
        .get(REVISION_KEY)?
        .map(|v| v.value())
        .unwrap_or(0))
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
    let table = txn.open_table(def)?;
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

impl Inner {
    fn load(&self) -> Result<Snapshot, Error> {
        let txn = self.db.begin_read()?;
        Ok(Snapshot {
            revision: read_revision(&txn)?,
            namespaces: load_table(&txn, NAMESPACES, "namespaces")?,
            services: load_table_with(&txn, SERVICES, "services", Service::from_record)?,
            instances: load_table(&txn, INSTANCES, "instances")?,
            groups: load_table(&txn, GROUPS, "groups")?,
            tokens: load_table(&txn, TOKENS, "tokens")?,
            rules: load_table(&txn, RULES, "rules")?,
        })
    }

    fn commit(&self, batch: Vec<Mutation>, expected: u64) -> Result<u64, Error> {
        let _order = self.commit.lock();
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        let revision;
        {
            let mut meta = txn.open_table(META)?;
            let actual = meta.get(REVISION_KEY)?.map(|v| v.value()).unwrap_or(0);
            if actual != expected {
                return Err(Error::Conflict { expected, actual });
            }
            revision = expected + 1;
            meta.insert(REVISION_KEY, revision)?;
        }
        write(&txn, &batch)?;
        txn.commit()?;
        self.feed.publish(Committed {
            revision,
            batch: Arc::new(batch),
        });
        Ok(revision)
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn load(&self) -> Result<Snapshot, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.load()).await?
    }

    async fn commit(&self, batch: Vec<Mutation>, expected: u64) -> Result<u64, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.commit(batch, expected)).await?
    }

    async fn watch(&self, from: u64) -> Result<Watch, Error> {
        self.inner.feed.watch(from)
    }
}

/// Writes `batch` into the transaction's tables.
fn write(txn: &redb::WriteTransaction, batch: &[Mutation]) -> Result<(), Error> {
    let mut ns = txn.open_table(NAMESPACES)?;
    let mut svc = txn.open_table(SERVICES)?;
    let mut inst = txn.open_table(INSTANCES)?;
    let mut grp = txn.open_table(GROUPS)?;
    let mut tok = txn.open_table(TOKENS)?;
    let mut rules = txn.open_table(RULES)?;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceInput;
    use std::sync::Arc;

    #[tokio::test]
    async fn conformance() {
        let dirs = parking_lot::Mutex::new(Vec::new());
        super::super::conformance::all(|| {
            let d = tempfile::tempdir().unwrap();
            let s = RedbStore::open(d.path()).unwrap();
            dirs.lock().push(d);
            async move { s }
        })
        .await;
    }

    #[tokio::test]
    async fn commits_survive_a_reopen_and_the_revision_goes_on() {
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
        let r = {
            let s = RedbStore::open(dir.path()).unwrap();
            s.commit(
                vec![
                    Mutation::PutService(Arc::new(Service::bare("default", "echo", "t"))),
                    Mutation::PutInstance(Arc::new(inst.clone())),
                ],
                0,
            )
            .await
            .unwrap()
        };
        let s = RedbStore::open(dir.path()).unwrap();
        let snap = s.load().await.unwrap();
        assert_eq!(snap.revision, r);
        assert_eq!(snap.services, vec![Service::bare("default", "echo", "t")]);
        assert_eq!(snap.instances, vec![inst.clone()]);
        // A watch of the reopened store starts at its revision: older history is not kept.
        assert!(matches!(s.watch(0).await, Err(Error::Compacted { .. })));
        let r2 = s
            .commit(vec![Mutation::DeleteInstance(inst.id.clone())], r)
            .await
            .unwrap();
        assert_eq!(r2, r + 1);
        assert!(s.load().await.unwrap().instances.is_empty());
    }

    /// A service stored by an earlier version, with its protocol as a field of its own, loads
    /// with the protocol in its metadata.
    #[tokio::test]
    async fn a_service_record_with_a_protocol_field_loads_it_into_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        {
            let txn = s.inner.db.begin_write().unwrap();
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
        let svc = &s.load().await.unwrap().services[0];
        assert_eq!(svc.protocol(), Some("grpc"));
        assert_eq!(svc.metadata["a"], "b");
    }
}
