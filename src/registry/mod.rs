//! The registry: an in-memory index over the [`Store`], the single writer, heartbeat health checks
//! and the change feed.
//!
//! Writes go through one writer task: each request is one [`Command`], validated against the
//! current state and applied as a whole or not at all. The writer drains every queued command and
//! commits them in one store transaction (group commit), so a burst of concurrent registrations costs
//! one fsync, not one per request; a command is acknowledged only after its transaction is durable.
//! After the commit the writer bumps the revision and publishes a [`Change`] on the feed.
//!
//! Heartbeats never touch the disk: the last beat time lives in a [`BeatSlot`] per instance. Only
//! health *transitions* are written (as ordinary commands), so they are durable and on the feed.

mod follow;
mod health;
mod state;
mod writer;

use health::{health_checker, new_slot};
pub use health::{BeatSlot, EXPIRE_TTL_COUNT};
pub use state::{Credential, State};
use writer::writer_loop;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{RwLock, RwLockReadGuard};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::model::rules::{Rule, RuleKey};
use crate::model::{
    now_rfc3339, AccessToken, FieldError, Instance, InstanceGroup, InstanceInput, InstanceSelector,
    Namespace, NamespaceInput, Service, ServiceInput, ServiceKey, BUILTIN_NAMESPACES,
};
use crate::store::{self, Store};

/// Registry errors; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (400).
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The named instance does not exist (heartbeats).
    #[error("{0} not found")]
    NotFound(String),
    /// The instance has no heartbeat health check (heartbeats).
    #[error("instance {0} has no heartbeat health check (enableHealthCheck is false)")]
    HealthCheckOff(String),
    /// The store failed (500; 503 for an unreachable etcd). Nothing was written, unless etcd
    /// committed and its answer was lost; the watch then brings the write like any other. Shared:
    /// one failed commit fails every request of its group.
    #[error(transparent)]
    Store(Arc<store::Error>),
    /// The instance's owner could not record its heartbeat (503).
    #[error("heartbeat of {0} not recorded by its owner replica: {1}")]
    Forward(String, String),
    /// Other replicas kept committing first, every retry against fresh state too (409).
    #[error("the write conflicted with other replicas' writes {0} times; retry it")]
    Conflict(usize),
    /// The registry is shutting down (503).
    #[error("registry is shutting down")]
    Closed,
}

/// What a change touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangeKey {
    /// A namespace was created or deleted.
    Namespace(String),
    /// A service record (not its instances) was created, updated or deleted.
    Service(ServiceKey),
    /// The instances (or groups) of a service changed.
    Instances(ServiceKey),
}

/// One committed change: its revision and the keys it touched.
#[derive(Debug, Clone)]
pub struct Change {
    /// The revision after this change.
    pub revision: u64,
    /// What changed.
    pub keys: Vec<ChangeKey>,
}

/// A service with its instances and groups.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// The service record.
    pub service: Arc<Service>,
    /// Instances by id.
    pub instances: BTreeMap<String, Arc<Instance>>,
    /// Groups by name.
    pub groups: BTreeMap<String, InstanceGroup>,
    /// Revision of the last change to this entry.
    pub revision: u64,
}

/// A write, applied atomically.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create namespaces.
    CreateNamespaces(Vec<Namespace>),
    /// Update namespaces (comment, owners).
    UpdateNamespaces(Vec<NamespaceInput>),
    /// Delete namespaces (refused while they hold services).
    DeleteNamespaces(Vec<String>),
    /// Create services.
    CreateServices(Vec<Service>),
    /// Partially update services.
    UpdateServices(Vec<ServiceInput>),
    /// Delete services (refused while they hold instances or aliases).
    DeleteServices(Vec<ServiceKey>),
    /// Create an alias.
    CreateAlias(Box<Service>),
    /// Delete aliases.
    DeleteAliases(Vec<ServiceKey>),
    /// Register (create or replace) instances; unknown services are created.
    RegisterInstances(Vec<Instance>),
    /// Partially update existing instances.
    UpdateInstances(Vec<(InstanceSelector, InstanceInput)>),
    /// Deregister instances; missing ones are reported, not errors.
    DeregisterInstances(Vec<InstanceSelector>),
    /// Create or replace instance groups.
    PutGroups(Vec<InstanceGroup>),
    /// Delete instance groups.
    DeleteGroups(Vec<(ServiceKey, String)>),
    /// A health transition decided by the heartbeat checker.
    SetHealth {
        /// Instance id.
        id: String,
        /// New health.
        healthy: bool,
    },
    /// Create or replace access tokens (by id).
    PutTokens(Vec<AccessToken>),
    /// Revoke access tokens by id; missing ones are reported, not errors.
    RevokeTokens(Vec<String>),
    /// Create rules (`create`: their ids are new) or replace existing ones (others are rejected).
    PutRules {
        /// The rules, validated and stamped.
        rules: Vec<Rule>,
        /// Create, or update.
        create: bool,
    },
    /// Delete rules; missing ones are reported, not errors.
    DeleteRules(Vec<RuleKey>),
    /// Turn rules on or off.
    EnableRules(Vec<(RuleKey, bool)>),
    /// Completes when every earlier command is committed.
    Flush,
}

impl Command {
    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateNamespaces(_) => "create namespaces",
            Command::UpdateNamespaces(_) => "update namespaces",
            Command::DeleteNamespaces(_) => "delete namespaces",
            Command::CreateServices(_) => "create services",
            Command::UpdateServices(_) => "update services",
            Command::DeleteServices(_) => "delete services",
            Command::CreateAlias(_) => "create alias",
            Command::DeleteAliases(_) => "delete aliases",
            Command::RegisterInstances(_) => "register instances",
            Command::UpdateInstances(_) => "update instances",
            Command::DeregisterInstances(_) => "deregister instances",
            Command::PutGroups(_) => "put groups",
            Command::DeleteGroups(_) => "delete groups",
            Command::SetHealth { .. } => "set health",
            Command::PutTokens(_) => "put tokens",
            Command::RevokeTokens(_) => "revoke tokens",
            Command::PutRules { create: true, .. } => "create rules",
            Command::PutRules { create: false, .. } => "update rules",
            Command::DeleteRules(_) => "delete rules",
            Command::EnableRules(_) => "enable rules",
            Command::Flush => "flush",
        }
    }
}

/// Per-item outcome of a command.
#[derive(Debug, Clone)]
pub enum Item {
    /// A namespace written.
    Namespace(Namespace),
    /// A service written or deleted.
    Service(Arc<Service>),
    /// An instance written or deleted.
    Instance(Arc<Instance>),
    /// A group written or deleted.
    Group(InstanceGroup),
    /// An access token written or revoked.
    Token(Arc<AccessToken>),
    /// A rule written or deleted.
    Rule(Arc<Rule>),
    /// The named object did not exist (deletes are idempotent: this is a success).
    Missing(String),
    /// The item was not applied (the other items of the command were).
    Rejected {
        /// Why.
        reason: Rejection,
        /// What, for the message.
        detail: String,
    },
}

impl Item {
    fn rejected(reason: Rejection, detail: String) -> Item {
        Item::Rejected { reason, detail }
    }
}

/// Why one item of a command was not applied. Input that is malformed rejects the whole command
/// ([`Error::Invalid`]) before anything is applied; these are conflicts with what is stored, and
/// like PolarisMesh the other items of the command are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The namespace, service or alias exists already.
    Exists,
    /// The namespace does not exist.
    NamespaceMissing,
    /// The service does not exist.
    ServiceMissing,
    /// The instance does not exist.
    InstanceMissing,
    /// `default` and `Polaris` cannot be deleted.
    SystemNamespace,
    /// The namespace still holds services.
    NamespaceHasServices,
    /// The service still has instances.
    ServiceHasInstances,
    /// The service still has aliases.
    ServiceHasAliases,
    /// An alias cannot point to an alias.
    AliasOfAlias,
    /// Instances register to a service, not to its alias.
    AliasTakesNoInstances,
    /// Aliases are changed through the alias paths.
    AliasUpdate,
    /// An alias operation named a service.
    NotAnAlias,
    /// The instance id is taken by an instance of another service.
    IdOfAnotherService,
    /// The rule does not exist.
    RuleMissing,
}

type Reply = oneshot::Sender<Result<Vec<Item>, Error>>;

struct Job {
    cmd: Command,
    reply: Reply,
}

/// Which replica decides an instance's heartbeat health (cluster mode): one owner per instance,
/// so replicas never split the verdict.
#[async_trait::async_trait]
pub trait Ownership: Send + Sync {
    /// Whether this replica decides `id`'s health.
    fn owns(&self, id: &str) -> bool;
    /// Changes whenever owners may have changed (a replica joined or left).
    fn epoch(&self) -> u64;
    /// Records a heartbeat for `id` at its owner, another replica.
    async fn forward(&self, id: &str) -> Result<(), String>;
}

/// Registry settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the heartbeat checker scans.
    pub check_interval: Duration,
    /// Capacity of the change feed before slow subscribers lag.
    pub feed_capacity: usize,
    /// The store is shared with other replicas' registries (etcd): follow what they commit
    /// through the store's watch, and plan each write on a copy of the state, retried against the
    /// fresh state when another replica committed first.
    pub shared_store: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_millis(250),
            feed_capacity: 4096,
            shared_store: false,
        }
    }
}

struct Inner {
    state: RwLock<State>,
    beats: RwLock<HashMap<String, Arc<BeatSlot>>>,
    feed: broadcast::Sender<Arc<Change>>,
    revision: watch::Sender<u64>,
    epoch: Instant,
    metrics: Arc<Metrics>,
    /// With a shared store: held by the writer from planning to publishing a commit, and by the
    /// follower while it applies another replica's, so each sees the other's work whole.
    gate: tokio::sync::Mutex<()>,
    shared: bool,
    ownership: RwLock<Option<Arc<dyn Ownership>>>,
    /// Whether the store answers: `None` while it does, else the last error.
    store_health: watch::Sender<Option<String>>,
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The registry handle; cheap to clone. The writer stops when the last handle is dropped.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
    writer_done: watch::Receiver<bool>,
}

impl Registry {
    /// Loads the state from `store`, creates the system namespaces, starts the writer task and the
    /// heartbeat checker. Instances with heartbeat checks get a fresh 3×TTL grace period.
    pub async fn open(
        store: Arc<dyn Store>,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Result<Registry, Error> {
        let snap = store.load().await.map_err(|e| Error::Store(Arc::new(e)))?;
        let state = State::from_snapshot(snap);
        let (jobs, rx) = mpsc::channel(65536);
        let (feed, _) = broadcast::channel(config.feed_capacity);
        let (revision, _) = watch::channel(state.revision);
        let inner = Arc::new(Inner {
            state: RwLock::new(state),
            beats: RwLock::new(HashMap::new()),
            feed,
            revision,
            epoch: Instant::now(),
            metrics,
            gate: tokio::sync::Mutex::new(()),
            shared: config.shared_store,
            ownership: RwLock::new(None),
            store_health: watch::channel(None).0,
        });
        {
            let st = inner.state.read();
            let now = inner.now_ms();
            let mut beats = inner.beats.write();
            for e in st.services.values() {
                for i in e.instances.values() {
                    if let Some(slot) = new_slot(i, now) {
                        beats.insert(i.id.clone(), slot);
                    }
                }
            }
        }
        if config.shared_store {
            let from = inner.state.read().revision;
            tokio::spawn(follow::follow(Arc::downgrade(&inner), store.clone(), from));
            tokio::spawn(follow::measure_lag(Arc::downgrade(&inner), store.clone()));
        }
        let writer_inner = inner.clone();
        let (done_tx, writer_done) = watch::channel(false);
        tokio::spawn(async move {
            writer_loop(writer_inner, store, rx).await;
            let _ = done_tx.send(true);
        });
        let reg = Registry {
            inner,
            jobs,
            writer_done,
        };
        let now = now_rfc3339();
        let missing: Vec<Namespace> = BUILTIN_NAMESPACES
            .iter()
            .filter(|n| !reg.read().namespaces.contains_key(**n))
            .map(|n| Namespace {
                name: n.to_string(),
                comment: "built-in namespace".into(),
                owners: "polaris".into(),
                token_hash: String::new(),
                ctime: now.clone(),
                mtime: now.clone(),
            })
            .collect();
        if !missing.is_empty() {
            reg.submit(Command::CreateNamespaces(missing)).await?;
        }
        tokio::spawn(health_checker(
            Arc::downgrade(&reg.inner),
            reg.jobs.downgrade(),
            reg.writer_done.clone(),
            config.check_interval,
        ));
        Ok(reg)
    }

    /// Read access to the state. Keep the guard short; the writer waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read()
    }

    /// The change feed. A subscriber that lags must resynchronise from [`Registry::read`].
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.inner.feed.subscribe()
    }

    /// The latest committed revision, as a watch.
    pub fn revision(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// Metrics shared with the API.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Submits a command and waits until it is durable.
    pub async fn submit(&self, cmd: Command) -> Result<Vec<Item>, Error> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job { cmd, reply: tx })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Records a heartbeat. Returns the instance id, or `NotFound`. An unhealthy instance turns
    /// healthy again (a durable transition); otherwise nothing is written.
    pub async fn heartbeat(&self, sel: &InstanceSelector) -> Result<String, Error> {
        let id = match sel {
            InstanceSelector::Id(id) => id.clone(),
            InstanceSelector::Address { .. } => self
                .read()
                .resolve(sel)
                .ok_or_else(|| Error::NotFound("instance".into()))?,
        };
        let owner = self.inner.ownership.read().clone();
        if let Some(o) = owner {
            if !o.owns(&id) && self.inner.beats.read().contains_key(&id) {
                o.forward(&id)
                    .await
                    .map_err(|e| Error::Forward(id.clone(), e))?;
                self.inner.metrics.heartbeats_forwarded.inc();
                return Ok(id);
            }
        }
        self.heartbeat_local(id).await
    }

    /// Whether the store answers (`None`), else its last error; changes as it comes and goes.
    pub fn store_health(&self) -> watch::Receiver<Option<String>> {
        self.inner.store_health.subscribe()
    }

    /// Ids of the instances with heartbeat checks.
    pub fn heartbeat_ids(&self) -> Vec<String> {
        self.inner.beats.read().keys().cloned().collect()
    }

    /// Sets who decides each instance's heartbeat health (cluster mode); without it, this
    /// registry decides every instance's.
    pub fn set_ownership(&self, o: Arc<dyn Ownership>) {
        *self.inner.ownership.write() = Some(o);
    }

    /// Records a heartbeat here, whoever owns the instance (a forwarded one, from another replica).
    pub async fn heartbeat_local(&self, id: String) -> Result<String, Error> {
        let slot = self.inner.beats.read().get(&id).cloned();
        let Some(slot) = slot else {
            return if self.read().instance(&id).is_some() {
                Err(Error::HealthCheckOff(id))
            } else {
                Err(Error::NotFound("instance".into()))
            };
        };
        slot.last_beat_ms
            .store(self.inner.now_ms(), Ordering::Relaxed);
        self.inner.metrics.heartbeats.inc();
        if !slot.healthy.load(Ordering::Acquire) && !slot.recovering.swap(true, Ordering::AcqRel) {
            let r = self
                .submit(Command::SetHealth {
                    id: id.clone(),
                    healthy: true,
                })
                .await;
            slot.recovering.store(false, Ordering::Release);
            r?;
        }
        Ok(id)
    }

    /// Waits until every command submitted before is committed.
    pub async fn flush(&self) -> Result<(), Error> {
        self.submit(Command::Flush).await.map(|_| ())
    }

    /// Commits what is queued, then waits for the writer to stop and release the store once the
    /// other handles are gone.
    pub async fn close(self) -> Result<(), Error> {
        self.flush().await?;
        let mut done = self.writer_done.clone();
        drop(self);
        let _ = done.wait_for(|d| *d).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    async fn open(dir: &std::path::Path) -> Registry {
        let store = Arc::new(RedbStore::open(dir).unwrap());
        Registry::open(store, Config::default(), Arc::new(Metrics::default()))
            .await
            .unwrap()
    }

    fn inst(port: i64, ttl: Option<i64>) -> Instance {
        InstanceInput {
            namespace: Some("default".into()),
            service: Some("echo".into()),
            host: Some("127.0.0.1".into()),
            port: Some(port),
            enable_health_check: Some(ttl.is_some()),
            health_check: ttl.map(|t| crate::model::HealthCheckInput {
                kind: Some("HEARTBEAT".into()),
                heartbeat: Some(crate::model::HeartbeatInput { ttl: Some(t) }),
            }),
            ..Default::default()
        }
        .validate("t")
        .unwrap()
    }

    /// Everything a reader can see of a state, comparable.
    fn dump(st: &State) -> String {
        let mut out = format!("revision<={}\n", st.revision > 0);
        for (k, n) in &st.namespaces {
            out += &format!("ns {k} {}\n", serde_json::to_string(n).unwrap());
            out += &format!("  cred {:?}\n", st.credential(&n.token_hash));
        }
        for (k, e) in &st.services {
            out += &format!("svc {k} {}\n", serde_json::to_string(&e.service).unwrap());
            out += &format!("  cred {:?}\n", st.credential(&e.service.token_hash));
            for (id, i) in &e.instances {
                out += &format!("  inst {id} {}\n", serde_json::to_string(i).unwrap());
                let sel = crate::model::InstanceSelector::Address {
                    service: ServiceKey::new(&i.namespace, &i.service),
                    host: i.host.clone(),
                    port: i.port,
                };
                out += &format!(
                    "  resolves {:?} {:?}\n",
                    st.resolve(&sel),
                    st.instance(id).map(|i| &i.id)
                );
            }
            for (n, g) in &e.groups {
                out += &format!("  group {n} {}\n", serde_json::to_string(g).unwrap());
            }
        }
        for (k, t) in &st.tokens {
            out += &format!("token {k} {:?}\n", st.credential(&t.hash).is_some());
        }
        out
    }

    /// A store whose first watch reports its history compacted, as etcd does to a replica that
    /// fell too far behind.
    struct CompactedOnce {
        inner: Arc<crate::store::MemStore>,
        done: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl crate::store::Store for CompactedOnce {
        async fn load(&self) -> Result<crate::store::Snapshot, crate::store::Error> {
            self.inner.load().await
        }
        async fn commit(
            &self,
            batch: Vec<crate::store::Mutation>,
            expected: u64,
        ) -> Result<u64, crate::store::Error> {
            self.inner.commit(batch, expected).await
        }
        async fn watch(&self, from: u64) -> Result<crate::store::Watch, crate::store::Error> {
            use futures::StreamExt;
            if self.done.swap(true, Ordering::SeqCst) {
                return self.inner.watch(from).await;
            }
            let e = crate::store::Error::Compacted {
                from,
                oldest: from + 1,
            };
            Ok(futures::stream::iter([Err(e)]).boxed())
        }
    }

    /// A replica whose watch falls behind the store's history reloads the state and goes on
    /// following from there.
    #[tokio::test]
    async fn a_compacted_watch_reloads_the_state_and_follows_on() {
        let mem = Arc::new(crate::store::MemStore::default());
        let store = Arc::new(CompactedOnce {
            inner: mem.clone(),
            done: std::sync::atomic::AtomicBool::new(false),
        });
        let metrics = Arc::new(Metrics::default());
        let reg = Registry::open(
            store,
            Config {
                shared_store: true,
                ..Default::default()
            },
            metrics.clone(),
        )
        .await
        .unwrap();
        let mut feed = reg.subscribe();
        // Another replica writes straight to the store.
        let other = |name: &str| {
            crate::store::Mutation::PutService(Arc::new(Service::bare("default", name, "t")))
        };
        let r = mem.load().await.unwrap().revision;
        let r = mem.commit(vec![other("one")], r).await.unwrap();
        let start = std::time::Instant::now();
        while !reg
            .read()
            .services
            .contains_key(&ServiceKey::new("default", "one"))
        {
            assert!(start.elapsed() < Duration::from_secs(5), "never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.store_reloads.get(), 1);
        // The change feed names the service, whether the reload or the watch brought it.
        let one = ChangeKey::Service(ServiceKey::new("default", "one"));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !feed.recv().await.unwrap().keys.contains(&one) {}
        })
        .await
        .expect("the feed names the other replica's service");
        mem.commit(vec![other("two")], r).await.unwrap();
        let start = std::time::Instant::now();
        while !reg
            .read()
            .services
            .contains_key(&ServiceKey::new("default", "two"))
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "not followed after the reload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            metrics.store_reloads.get(),
            1,
            "followed, not reloaded again"
        );
    }

    /// A replica that applies what another writer committed, as the store's watch reports it,
    /// holds what that writer holds.
    #[tokio::test]
    async fn applying_committed_batches_rebuilds_the_writers_state() {
        use futures::StreamExt;
        let store = Arc::new(crate::store::MemStore::default());
        let mut watch = store.watch(0).await.unwrap();
        let reg = Registry::open(
            store.clone(),
            Config::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        let mut svc = Service::bare("default", "echo", "t");
        svc.token_hash = "svc-hash".into();
        reg.submit(Command::CreateServices(vec![svc]))
            .await
            .unwrap();
        reg.submit(Command::RegisterInstances(vec![
            inst(80, None),
            inst(81, Some(5)),
            inst(82, None),
        ]))
        .await
        .unwrap();
        // The same instance id moved to another port would be another id; an update in place:
        let mut heavier = inst(80, None);
        heavier.weight = 3;
        reg.submit(Command::RegisterInstances(vec![heavier]))
            .await
            .unwrap();
        reg.submit(Command::DeregisterInstances(vec![InstanceSelector::Id(
            inst(82, None).id,
        )]))
        .await
        .unwrap();
        reg.submit(Command::PutGroups(vec![InstanceGroup {
            namespace: "default".into(),
            service: "echo".into(),
            name: "canary".into(),
            labels: Default::default(),
            ctime: "t".into(),
        }]))
        .await
        .unwrap();
        let token = crate::model::TokenInput {
            name: Some("ci".into()),
            role: Some("admin".into()),
            namespaces: None,
        }
        .validate("token-hash".into(), "t")
        .unwrap();
        reg.submit(Command::PutTokens(vec![token])).await.unwrap();
        // A second service comes and goes.
        reg.submit(Command::RegisterInstances(vec![InstanceInput {
            namespace: Some("default".into()),
            service: Some("gone".into()),
            host: Some("10.0.0.9".into()),
            port: Some(9),
            ..Default::default()
        }
        .validate("t")
        .unwrap()]))
            .await
            .unwrap();
        let gone = reg.read().services[&ServiceKey::new("default", "gone")]
            .instances
            .keys()
            .next()
            .unwrap()
            .clone();
        reg.submit(Command::DeregisterInstances(vec![InstanceSelector::Id(
            gone,
        )]))
        .await
        .unwrap();
        reg.submit(Command::DeleteServices(vec![ServiceKey::new(
            "default", "gone",
        )]))
        .await
        .unwrap();
        let want = reg.read().revision;
        let mut follower = State::default();
        let mut touched = Vec::new();
        while follower.revision < want {
            let c = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            touched.extend(follower.apply_committed(&c.batch, c.revision));
        }
        assert_eq!(dump(&follower), dump(&reg.read()));
        assert!(touched.contains(&ChangeKey::Instances(ServiceKey::new("default", "echo"))));
        assert!(touched.contains(&ChangeKey::Service(ServiceKey::new("default", "gone"))));
    }

    fn healthy(reg: &Registry, id: &str) -> bool {
        reg.read().instance(id).unwrap().healthy
    }

    #[tokio::test]
    async fn system_namespaces_exist_and_register_creates_service() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        assert!(reg.read().namespaces.contains_key("default"));
        assert!(reg.read().namespaces.contains_key("Polaris"));
        let mut feed = reg.subscribe();
        reg.submit(Command::RegisterInstances(vec![inst(80, None)]))
            .await
            .unwrap();
        let change = feed.recv().await.unwrap();
        let key = ServiceKey::new("default", "echo");
        assert!(change.keys.contains(&ChangeKey::Service(key.clone())));
        assert!(change.keys.contains(&ChangeKey::Instances(key.clone())));
        assert_eq!(reg.read().services[&key].instances.len(), 1);
    }

    #[tokio::test]
    async fn an_item_in_an_unknown_namespace_is_rejected_and_the_others_applied() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let mut bad = inst(81, None);
        bad.namespace = "nope".into();
        let items = reg
            .submit(Command::RegisterInstances(vec![inst(80, None), bad]))
            .await
            .unwrap();
        assert!(matches!(items[0], Item::Instance(_)));
        assert!(matches!(
            items[1],
            Item::Rejected {
                reason: Rejection::NamespaceMissing,
                ..
            }
        ));
        assert_eq!(reg.read().services.len(), 1);
        assert!(!reg.read().namespaces.contains_key("nope"));
    }

    #[tokio::test]
    async fn a_malformed_item_rejects_the_whole_command_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let rev = *reg.revision().borrow();
        let err = reg
            .submit(Command::RegisterInstances(vec![
                inst(80, None),
                inst(80, None),
            ]))
            .await
            .unwrap_err();
        match err {
            Error::Invalid(f) => assert_eq!(f.field, "[1].id"),
            e => panic!("{e}"),
        }
        assert_eq!(*reg.revision().borrow(), rev);
        assert!(reg.read().services.is_empty());
    }

    #[tokio::test]
    async fn namespace_deletion_is_per_item() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let ns = |n: &str| Namespace {
            name: n.into(),
            comment: String::new(),
            owners: String::new(),
            token_hash: String::new(),
            ctime: String::new(),
            mtime: String::new(),
        };
        reg.submit(Command::CreateNamespaces(vec![ns("a"), ns("b")]))
            .await
            .unwrap();
        let mut i = inst(80, None);
        i.namespace = "a".into();
        reg.submit(Command::RegisterInstances(vec![i]))
            .await
            .unwrap();
        let items = reg
            .submit(Command::DeleteNamespaces(vec![
                "a".into(),
                "b".into(),
                "gone".into(),
            ]))
            .await
            .unwrap();
        assert!(matches!(
            items[0],
            Item::Rejected {
                reason: Rejection::NamespaceHasServices,
                ..
            }
        ));
        assert!(matches!(items[1], Item::Namespace(_)));
        assert!(matches!(items[2], Item::Missing(_)));
        assert!(reg.read().namespaces.contains_key("a"));
        assert!(!reg.read().namespaces.contains_key("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_expiry_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let i = inst(80, Some(1));
        let id = i.id.clone();
        reg.submit(Command::RegisterInstances(vec![i]))
            .await
            .unwrap();
        let sel = InstanceSelector::Id(id.clone());
        // Beats every 900 ms keep it healthy well past 3×TTL.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            reg.heartbeat(&sel).await.unwrap();
        }
        assert!(healthy(&reg, &id));
        // 2.9 s of silence: still healthy (expiry is strictly after 3×TTL).
        tokio::time::sleep(Duration::from_millis(2900)).await;
        assert!(healthy(&reg, &id));
        // Past 3×TTL plus one check interval: unhealthy.
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Let the spawned transition commit through the writer task.
        for _ in 0..100 {
            if !healthy(&reg, &id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!healthy(&reg, &id));
        // The next heartbeat makes it healthy again, durably.
        reg.heartbeat(&sel).await.unwrap();
        assert!(healthy(&reg, &id));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_gives_grace_period_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let i = inst(80, Some(1));
        let id = i.id.clone();
        let reg = open(dir.path()).await;
        reg.submit(Command::RegisterInstances(vec![i]))
            .await
            .unwrap();
        reg.close().await.unwrap();
        // Down for far longer than 3×TTL.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let reg = open(dir.path()).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(healthy(&reg, &id), "instant mass-unhealthy after restart");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        wait_until(|| !healthy(&reg, &id)).await;
    }

    async fn wait_until(f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test]
    async fn service_delete_refused_with_instances() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let i = inst(80, None);
        reg.submit(Command::RegisterInstances(vec![i.clone()]))
            .await
            .unwrap();
        let key = ServiceKey::new("default", "echo");
        assert!(matches!(
            reg.submit(Command::DeleteServices(vec![key.clone()]))
                .await
                .unwrap()[0],
            Item::Rejected {
                reason: Rejection::ServiceHasInstances,
                ..
            }
        ));
        reg.submit(Command::DeregisterInstances(vec![InstanceSelector::Id(
            i.id,
        )]))
        .await
        .unwrap();
        reg.submit(Command::DeleteServices(vec![key.clone()]))
            .await
            .unwrap();
        assert!(!reg.read().services.contains_key(&key));
    }

    /// Secrets authenticate from the commit that creates them to the one that revokes or deletes
    /// them, across restarts.
    #[tokio::test]
    async fn credentials_follow_tokens_namespaces_and_services() {
        use crate::model::{token_hash, TokenInput};
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path()).await;
        let tok = TokenInput {
            name: Some("ci".into()),
            role: Some("read".into()),
            namespaces: None,
        }
        .validate(token_hash("secret-1"), "t")
        .unwrap();
        let ns = Namespace {
            name: "shop".into(),
            comment: String::new(),
            owners: String::new(),
            token_hash: token_hash("ns-secret"),
            ctime: "t".into(),
            mtime: "t".into(),
        };
        let mut svc = Service::bare("shop", "cart", "t");
        svc.token_hash = token_hash("svc-secret");
        reg.submit(Command::PutTokens(vec![tok.clone()]))
            .await
            .unwrap();
        reg.submit(Command::CreateNamespaces(vec![ns]))
            .await
            .unwrap();
        reg.submit(Command::CreateServices(vec![svc]))
            .await
            .unwrap();
        let cred =
            |reg: &Registry, secret: &str| reg.read().credential(&token_hash(secret)).cloned();
        assert!(matches!(cred(&reg, "secret-1"), Some(Credential::Token(t)) if t.id == tok.id));
        assert_eq!(
            cred(&reg, "ns-secret"),
            Some(Credential::Namespace("shop".into()))
        );
        assert_eq!(
            cred(&reg, "svc-secret"),
            Some(Credential::Service(ServiceKey::new("shop", "cart")))
        );
        // A service update keeps its token.
        reg.submit(Command::UpdateServices(vec![ServiceInput {
            namespace: Some("shop".into()),
            name: Some("cart".into()),
            comment: Some("c".into()),
            ..Default::default()
        }]))
        .await
        .unwrap();
        assert!(cred(&reg, "svc-secret").is_some());
        reg.close().await.unwrap();
        let reg = open(dir.path()).await;
        assert!(cred(&reg, "secret-1").is_some(), "tokens are durable");
        assert!(cred(&reg, "svc-secret").is_some());
        let items = reg
            .submit(Command::RevokeTokens(vec![tok.id.clone(), "nope".into()]))
            .await
            .unwrap();
        assert!(matches!(items[1], Item::Missing(_)));
        assert_eq!(cred(&reg, "secret-1"), None, "revoked at once");
        reg.submit(Command::DeleteServices(vec![ServiceKey::new(
            "shop", "cart",
        )]))
        .await
        .unwrap();
        reg.submit(Command::DeleteNamespaces(vec!["shop".into()]))
            .await
            .unwrap();
        assert_eq!(cred(&reg, "svc-secret"), None);
        assert_eq!(cred(&reg, "ns-secret"), None);
        reg.close().await.unwrap();
        let reg = open(dir.path()).await;
        assert_eq!(cred(&reg, "secret-1"), None, "revocation is durable");
    }
}
