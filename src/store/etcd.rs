//! The store on etcd v3, for several `polaris server` replicas sharing one registry.
//!
//! Key layout under the prefix (default `/polaris`), values the same JSON records as in redb:
//!
//! | key | record |
//! |---|---|
//! | `<prefix>/namespaces/<name>` | namespace |
//! | `<prefix>/services/<namespace>/<name>` | service or alias |
//! | `<prefix>/instances/<id>` | instance |
//! | `<prefix>/groups/<namespace>/<service>/<name>` | instance group |
//! | `<prefix>/tokens/<id>` | access token |
//! | `<prefix>/rules/<kind>/<id>` | governance rule |
//! | `<prefix>/revision` | written by every commit (empty value) |
//!
//! The store's revision is etcd's revision of the last commit under the prefix: the
//! `mod_revision` of `<prefix>/revision`. A commit is one etcd transaction comparing that
//! `mod_revision` with the revision the writer expects, so of two writers working from the same
//! state one commits and the other gets [`Error::Conflict`]; a batch is collapsed to its last
//! write per key first (etcd refuses a key twice in one transaction). A watch is etcd's watch of the
//! prefix from the next revision, one [`Committed`] per etcd revision; a start before etcd's
//! compaction is [`Error::Compacted`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::{Committed, Error, Mutation, Snapshot, Store, Watch};
use crate::model::rules::{Rule, RuleKind};
use crate::model::Service;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client URLs (`http://host:2379`, `https://…` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix of this registry, without a trailing `/`.
    pub prefix: String,
    /// User and password, when etcd's authentication is on.
    pub user: Option<(String, String)>,
    /// CA bundle (PEM) the server certificate must chain to.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for etcd's client-certificate authentication.
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's key.
    pub key_file: Option<std::path::PathBuf>,
    /// Time a request may take.
    pub timeout: Duration,
    /// Most operations in one transaction (etcd's `--max-txn-ops`, 128 by default): a larger
    /// batch is refused whole rather than split.
    pub max_txn_ops: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/polaris".into(),
            user: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: Duration::from_secs(5),
            max_txn_ops: 128,
        }
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        backend: "etcd",
        source: Box::new(e),
    }
}

fn invalid(msg: String) -> Error {
    Error::Backend {
        backend: "etcd",
        source: msg.into(),
    }
}

/// The etcd store.
pub struct EtcdStore {
    client: Client,
    cfg: Config,
}

impl EtcdStore {
    /// Connects to etcd.
    pub async fn connect(cfg: Config) -> Result<EtcdStore, Error> {
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(10), cfg.timeout);
        if let Some((u, p)) = &cfg.user {
            opts = opts.with_user(u, p);
        }
        if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(Error::Io);
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&cfg.cert_file, &cfg.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => {
                    return Err(invalid(
                        "a client certificate needs both its file and its key file".into(),
                    ))
                }
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(backend)?;
        Ok(EtcdStore { client, cfg })
    }

    /// The etcd client (cluster membership shares it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The registry's key prefix.
    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.cfg.prefix)
    }

    fn revision_key(&self) -> String {
        self.key("revision")
    }

    /// The key and value (None: delete) a mutation writes.
    fn op(&self, m: &Mutation) -> (String, Option<Vec<u8>>) {
        let enc = |v: &dyn erased::Json| Some(v.json());
        match m {
            Mutation::PutNamespace(n) => (self.key(&format!("namespaces/{}", n.name)), enc(n)),
            Mutation::DeleteNamespace(n) => (self.key(&format!("namespaces/{n}")), None),
            Mutation::PutService(s) => (
                self.key(&format!("services/{}/{}", s.namespace, s.name)),
                enc(s.as_ref()),
            ),
            Mutation::DeleteService { namespace, name } => {
                (self.key(&format!("services/{namespace}/{name}")), None)
            }
            Mutation::PutInstance(i) => (self.key(&format!("instances/{}", i.id)), enc(i.as_ref())),
            Mutation::DeleteInstance(id) => (self.key(&format!("instances/{id}")), None),
            Mutation::PutGroup(g) => (
                self.key(&format!("groups/{}/{}/{}", g.namespace, g.service, g.name)),
                enc(g),
            ),
            Mutation::DeleteGroup {
                namespace,
                service,
                name,
            } => (
                self.key(&format!("groups/{namespace}/{service}/{name}")),
                None,
            ),
            Mutation::PutToken(t) => (self.key(&format!("tokens/{}", t.id)), enc(t)),
            Mutation::DeleteToken(id) => (self.key(&format!("tokens/{id}")), None),
            Mutation::PutRule(r) => {
                let (kind, id) = r.key();
                (
                    self.key(&format!("rules/{}/{id}", kind.as_str())),
                    enc(r.as_ref()),
                )
            }
            Mutation::DeleteRule((kind, id)) => {
                (self.key(&format!("rules/{}/{id}", kind.as_str())), None)
            }
        }
    }

    /// The mutation an etcd key and value (None: deleted) stand for; None for keys outside the
    /// layout (the revision key, or what a later version adds).
    fn mutation(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Mutation>, Error> {
        let key = String::from_utf8_lossy(key);
        let Some(rest) = key
            .strip_prefix(&self.cfg.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(None);
        };
        let (table, name) = rest.split_once('/').unwrap_or((rest, ""));
        let corrupt = |table: &'static str| {
            let key = key.to_string();
            move |source| Error::Corrupt { table, key, source }
        };
        let parts: Vec<&str> = name.split('/').collect();
        Ok(Some(match (table, value, parts.as_slice()) {
            ("namespaces", Some(v), _) => {
                Mutation::PutNamespace(serde_json::from_slice(v).map_err(corrupt("namespaces"))?)
            }
            ("namespaces", None, [n]) => Mutation::DeleteNamespace(n.to_string()),
            ("services", Some(v), _) => Mutation::PutService(Arc::new(
                Service::from_record(v).map_err(corrupt("services"))?,
            )),
            ("services", None, [ns, n]) => Mutation::DeleteService {
                namespace: ns.to_string(),
                name: n.to_string(),
            },
            ("instances", Some(v), _) => Mutation::PutInstance(Arc::new(
                serde_json::from_slice(v).map_err(corrupt("instances"))?,
            )),
            ("instances", None, [id]) => Mutation::DeleteInstance(id.to_string()),
            ("groups", Some(v), _) => {
                Mutation::PutGroup(serde_json::from_slice(v).map_err(corrupt("groups"))?)
            }
            ("groups", None, [ns, svc, n]) => Mutation::DeleteGroup {
                namespace: ns.to_string(),
                service: svc.to_string(),
                name: n.to_string(),
            },
            ("tokens", Some(v), _) => {
                Mutation::PutToken(serde_json::from_slice(v).map_err(corrupt("tokens"))?)
            }
            ("tokens", None, [id]) => Mutation::DeleteToken(id.to_string()),
            ("rules", Some(v), _) => Mutation::PutRule(Arc::new(
                serde_json::from_slice::<Rule>(v).map_err(corrupt("rules"))?,
            )),
            ("rules", None, [kind, id]) => match RuleKind::parse(kind) {
                Some(k) => Mutation::DeleteRule((k, id.to_string())),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }))
    }

    /// The revision of the last commit, read in its own request.
    async fn current(&self) -> Result<u64, Error> {
        let r = self
            .client
            .kv_client()
            .get(self.revision_key(), None)
            .await
            .map_err(backend)?;
        Ok(r.kvs().first().map_or(0, |kv| kv.mod_revision() as u64))
    }
}

/// JSON encoding behind one object-safe call (the records are of several types).
mod erased {
    pub trait Json {
        fn json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("model types always serialize")
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<Snapshot, Error> {
        let r = self
            .client
            .kv_client()
            .get(
                format!("{}/", self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(backend)?;
        let mut snap = Snapshot::default();
        for kv in r.kvs() {
            if kv.key() == self.revision_key().as_bytes() {
                snap.revision = kv.mod_revision() as u64;
                continue;
            }
            match self.mutation(kv.key(), Some(kv.value()))? {
                Some(Mutation::PutNamespace(n)) => snap.namespaces.push(n),
                Some(Mutation::PutService(s)) => snap.services.push((*s).clone()),
                Some(Mutation::PutInstance(i)) => snap.instances.push((*i).clone()),
                Some(Mutation::PutGroup(g)) => snap.groups.push(g),
                Some(Mutation::PutToken(t)) => snap.tokens.push(t),
                Some(Mutation::PutRule(r)) => snap.rules.push((*r).clone()),
                _ => {}
            }
        }
        Ok(snap)
    }

    async fn commit(&self, batch: Vec<Mutation>, expected: u64) -> Result<u64, Error> {
        // The last write to each key wins within a batch, as it would applied in order.
        let mut last: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for m in &batch {
            let (k, v) = self.op(m);
            last.insert(k, v);
        }
        if last.len() + 1 > self.cfg.max_txn_ops {
            return Err(invalid(format!(
                "a commit of {} keys is more than the {} operations one etcd transaction may hold (etcd's --max-txn-ops)",
                last.len(),
                self.cfg.max_txn_ops
            )));
        }
        let rk = self.revision_key();
        let mut ops: Vec<TxnOp> = last
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        ops.push(TxnOp::put(rk.clone(), Vec::new(), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(rk, CompareOp::Equal, expected as i64)])
            .and_then(ops);
        let r = self.client.kv_client().txn(txn).await.map_err(backend)?;
        if !r.succeeded() {
            return Err(Error::Conflict {
                expected,
                actual: self.current().await?,
            });
        }
        Ok(r.header().map_or(0, |h| h.revision() as u64))
    }

    async fn revision(&self) -> Result<u64, Error> {
        self.current().await
    }

    fn max_batch(&self) -> Option<usize> {
        // One operation of each transaction is the revision key.
        Some(self.cfg.max_txn_ops.saturating_sub(1))
    }

    async fn watch(&self, from: u64) -> Result<Watch, Error> {
        let stream = self
            .client
            .watch_client()
            .watch(
                format!("{}/", self.cfg.prefix),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from as i64 + 1),
                ),
            )
            .await
            .map_err(backend)?;
        let me = EtcdStore {
            client: self.client.clone(),
            cfg: self.cfg.clone(),
        };
        let rk = self.revision_key().into_bytes();
        let s = futures::stream::unfold(
            (stream, me, rk, from, false),
            |(mut stream, me, rk, from, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => return None,
                        Err(e) => {
                            return Some((vec![Err(backend(e))], (stream, me, rk, from, true)))
                        }
                    };
                    if resp.compact_revision() > 0 {
                        let e = Error::Compacted {
                            from,
                            oldest: resp.compact_revision() as u64,
                        };
                        return Some((vec![Err(e)], (stream, me, rk, from, true)));
                    }
                    if resp.canceled() {
                        let e = invalid(format!("watch canceled: {}", resp.cancel_reason()));
                        return Some((vec![Err(e)], (stream, me, rk, from, true)));
                    }
                    // One committed batch per etcd revision, in order. Only revisions that wrote
                    // the revision key are commits; other keys under the prefix (the replicas'
                    // membership) are not the registry's.
                    let mut out: Vec<Result<Committed, Error>> = Vec::new();
                    let mut cur: Option<(u64, bool, Vec<Mutation>)> = None;
                    let close =
                        |cur: Option<(u64, bool, Vec<Mutation>)>,
                         out: &mut Vec<Result<Committed, Error>>| {
                            if let Some((r, true, b)) = cur {
                                out.push(Ok(Committed {
                                    revision: r,
                                    batch: Arc::new(b),
                                }));
                            }
                        };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let rev = kv.mod_revision() as u64;
                        if cur.as_ref().is_some_and(|(r, _, _)| *r != rev) {
                            close(cur.take(), &mut out);
                        }
                        let entry = cur.get_or_insert_with(|| (rev, false, Vec::new()));
                        if kv.key() == rk.as_slice() {
                            entry.1 = true;
                            continue;
                        }
                        let value = match ev.event_type() {
                            EventType::Put => Some(kv.value()),
                            EventType::Delete => None,
                        };
                        match me.mutation(kv.key(), value) {
                            Ok(Some(m)) => entry.2.push(m),
                            Ok(None) => {}
                            Err(e) => out.push(Err(e)),
                        }
                    }
                    close(cur, &mut out);
                    if !out.is_empty() {
                        let last = out
                            .iter()
                            .rev()
                            .find_map(|c| c.as_ref().ok().map(|c| c.revision))
                            .unwrap_or(from);
                        return Some((out, (stream, me, rk, last, false)));
                    }
                }
            },
        )
        .flat_map(futures::stream::iter);
        Ok(s.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The etcd of the test run (`e2e/etcd.sh start`, from `scripts/test.sh`); missing, the test
    /// fails.
    fn endpoint() -> String {
        std::env::var("POLARIS_TEST_ETCD").expect(
            "POLARIS_TEST_ETCD is not set: these tests need the real etcd that ./scripts/test.sh starts (e2e/etcd.sh)",
        )
    }

    fn unique_prefix() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "/polaris-test/{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn fresh() -> EtcdStore {
        EtcdStore::connect(Config {
            endpoints: vec![endpoint()],
            prefix: unique_prefix(),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::all(fresh).await;
    }

    #[tokio::test]
    async fn two_writers_from_the_same_revision_one_commits_the_other_conflicts() {
        let a = fresh().await;
        let b = EtcdStore::connect(a.cfg.clone()).await.unwrap();
        let ns = |n: &str| {
            Mutation::PutNamespace(
                crate::model::NamespaceInput {
                    name: Some(n.into()),
                    ..Default::default()
                }
                .validate("t")
                .unwrap(),
            )
        };
        let r = a.commit(vec![ns("base")], 0).await.unwrap();
        let (ra, rb) = tokio::join!(a.commit(vec![ns("a")], r), b.commit(vec![ns("b")], r));
        let (won, lost) = match (ra, rb) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("exactly one of two commits from one revision lands: {other:?}"),
        };
        assert!(
            matches!(lost, Error::Conflict { actual, .. } if actual == won),
            "{lost}"
        );
        assert_eq!(b.load().await.unwrap().namespaces.len(), 2);
    }

    /// Keys under the prefix that are not records (the replicas' membership) are neither
    /// commits to watchers nor a change of the store's revision.
    #[tokio::test]
    async fn other_keys_under_the_prefix_are_not_commits() {
        use futures::StreamExt;
        let s = fresh().await;
        let mut w = s.watch(0).await.unwrap();
        s.client
            .kv_client()
            .put(s.key("replicas/r1"), "{}", None)
            .await
            .unwrap();
        assert_eq!(s.load().await.unwrap().revision, 0);
        let r = s
            .commit(vec![Mutation::DeleteNamespace("x".into())], 0)
            .await
            .unwrap();
        let c = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(c.revision, r, "the first commit seen is the registry's");
    }

    #[tokio::test]
    async fn a_batch_writing_a_key_twice_keeps_the_last_write() {
        let s = fresh().await;
        let inst = crate::model::InstanceInput {
            namespace: Some("shop".into()),
            service: Some("echo".into()),
            host: Some("10.0.0.1".into()),
            port: Some(80),
            ..Default::default()
        }
        .validate("t")
        .unwrap();
        let mut heavier = inst.clone();
        heavier.weight = 9;
        s.commit(
            vec![
                Mutation::PutInstance(Arc::new(inst.clone())),
                Mutation::DeleteInstance(inst.id.clone()),
                Mutation::PutInstance(Arc::new(heavier.clone())),
            ],
            0,
        )
        .await
        .unwrap();
        assert_eq!(s.load().await.unwrap().instances, vec![heavier]);
        // More keys than one transaction may hold: refused whole, nothing written.
        let many: Vec<Mutation> = (0..200)
            .map(|i| {
                Mutation::PutNamespace(
                    crate::model::NamespaceInput {
                        name: Some(format!("n{i}")),
                        ..Default::default()
                    }
                    .validate("t")
                    .unwrap(),
                )
            })
            .collect();
        let r = s.load().await.unwrap().revision;
        let e = s.commit(many, r).await.unwrap_err();
        assert!(e.to_string().contains("max-txn-ops"), "{e}");
        assert!(s.load().await.unwrap().namespaces.is_empty());
    }
}
