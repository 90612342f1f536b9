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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{RwLock, RwLockReadGuard};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::model::{
    now_rfc3339, FieldError, Instance, InstanceGroup, InstanceInput, InstanceSelector, Namespace,
    NamespaceInput, Service, ServiceInput, ServiceKey, BUILTIN_NAMESPACES, SYSTEM_NAMESPACES,
};
use crate::store::{self, Mutation, Store};

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
    /// The store failed; nothing was written (500).
    #[error(transparent)]
    Store(#[from] store::Error),
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

/// The in-memory state, read through [`Registry::read`].
#[derive(Debug, Default)]
pub struct State {
    /// Revision of the last committed change.
    pub revision: u64,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Services by key.
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    instance_index: HashMap<String, ServiceKey>,
    addr_index: HashMap<(ServiceKey, String, u16), String>,
}

impl State {
    /// An instance by id.
    pub fn instance(&self, id: &str) -> Option<&Arc<Instance>> {
        let key = self.instance_index.get(id)?;
        self.services.get(key)?.instances.get(id)
    }

    /// Resolves a selector to an instance id.
    pub fn resolve(&self, sel: &InstanceSelector) -> Option<String> {
        match sel {
            InstanceSelector::Id(id) => self.instance_index.contains_key(id).then(|| id.clone()),
            InstanceSelector::Address {
                service,
                host,
                port,
            } => self
                .addr_index
                .get(&(service.clone(), host.clone(), *port))
                .cloned(),
        }
    }

    fn insert_instance(&mut self, inst: Arc<Instance>) {
        let key = inst.service_key();
        self.instance_index.insert(inst.id.clone(), key.clone());
        self.addr_index
            .insert((key.clone(), inst.host.clone(), inst.port), inst.id.clone());
        if let Some(e) = self.services.get_mut(&key) {
            e.instances.insert(inst.id.clone(), inst);
        }
    }

    fn remove_instance(&mut self, id: &str) -> Option<Arc<Instance>> {
        let key = self.instance_index.remove(id)?;
        let inst = self.services.get_mut(&key)?.instances.remove(id)?;
        self.addr_index.remove(&(key, inst.host.clone(), inst.port));
        Some(inst)
    }

    fn from_snapshot(snap: store::Snapshot) -> Self {
        let mut s = State {
            revision: snap.revision,
            ..Default::default()
        };
        for ns in snap.namespaces {
            s.namespaces.insert(ns.name.clone(), ns);
        }
        for svc in snap.services {
            s.services.insert(
                svc.key(),
                ServiceEntry {
                    service: Arc::new(svc),
                    instances: BTreeMap::new(),
                    groups: BTreeMap::new(),
                    revision: snap.revision,
                },
            );
        }
        for i in snap.instances {
            s.insert_instance(Arc::new(i));
        }
        for g in snap.groups {
            let key = ServiceKey::new(&g.namespace, &g.service);
            if let Some(e) = s.services.get_mut(&key) {
                e.groups.insert(g.name.clone(), g);
            }
        }
        s
    }
}

/// Per-instance heartbeat state, kept in memory only.
#[derive(Debug)]
pub struct BeatSlot {
    last_beat_ms: AtomicU64,
    ttl_ms: u64,
    /// Mirrors the instance's `healthy`; updated by the writer when it applies a transition.
    healthy: AtomicBool,
    /// A heartbeat has submitted the unhealthy → healthy transition.
    recovering: AtomicBool,
    /// The checker has submitted the healthy → unhealthy transition.
    expiring: AtomicBool,
}

impl BeatSlot {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            > EXPIRE_TTL_COUNT * self.ttl_ms
    }
}

/// A write, applied atomically.
#[derive(Debug)]
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
    /// Completes when every earlier command is committed.
    Flush,
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
}

type Reply = oneshot::Sender<Result<Vec<Item>, Error>>;

struct Job {
    cmd: Command,
    reply: Reply,
}

/// Registry settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the heartbeat checker scans.
    pub check_interval: Duration,
    /// Capacity of the change feed before slow subscribers lag.
    pub feed_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_millis(250),
            feed_capacity: 4096,
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
        let snap = store.load()?;
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

fn new_slot(i: &Instance, now_ms: u64) -> Option<Arc<BeatSlot>> {
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

async fn health_checker(
    inner: std::sync::Weak<Inner>,
    jobs: mpsc::WeakSender<Job>,
    writer_done: watch::Receiver<bool>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.now_ms();
        let expired: Vec<String> = inner
            .beats
            .read()
            .iter()
            .filter(|(_, s)| {
                s.healthy.load(Ordering::Acquire)
                    && s.expired(now)
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

/// Most commands folded into one store transaction.
const MAX_GROUP: usize = 1024;

/// The single writer. State changes are applied in memory under the lock (fast), then the group
/// is committed on a blocking thread while the next group queues up.
async fn writer_loop(inner: Arc<Inner>, store: Arc<dyn Store>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut batch: Vec<Mutation> = Vec::new();
        let mut keys: Vec<ChangeKey> = Vec::new();
        let mut beat_ops: Vec<BeatOp> = Vec::new();
        let mut outcomes: Vec<(Reply, Result<Vec<Item>, Error>)> = Vec::with_capacity(jobs.len());
        let revision;
        {
            let mut st = inner.state.write();
            revision = st.revision + 1;
            let now = now_rfc3339();
            for job in jobs {
                let mut tx = Tx {
                    inner: &inner,
                    st: &mut st,
                    muts: Vec::new(),
                    keys: Vec::new(),
                    beats: Vec::new(),
                    revision,
                    now: &now,
                };
                let r = tx.run(job.cmd);
                if r.is_ok() {
                    batch.append(&mut tx.muts);
                    keys.append(&mut tx.keys);
                    beat_ops.append(&mut tx.beats);
                }
                outcomes.push((job.reply, r));
            }
            if !batch.is_empty() {
                st.revision = revision;
            }
        }
        if batch.is_empty() {
            for (reply, r) in outcomes {
                let _ = reply.send(r);
            }
            continue;
        }
        let started = std::time::Instant::now();
        let st = store.clone();
        let committed = tokio::task::spawn_blocking(move || st.commit(&batch, revision))
            .await
            .unwrap_or_else(|e| Err(store::Error::Redb(format!("commit task failed: {e}"))));
        match committed {
            Ok(()) => {
                inner
                    .metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                apply_beat_ops(&inner, beat_ops);
                let mut seen = HashSet::new();
                keys.retain(|k| seen.insert(k.clone()));
                let _ = inner.feed.send(Arc::new(Change { revision, keys }));
                inner.revision.send_replace(revision);
                for (reply, r) in outcomes {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; reloading committed state");
                let msg = e.to_string();
                match store.load() {
                    Ok(snap) => *inner.state.write() = State::from_snapshot(snap),
                    Err(e2) => tracing::error!(error = %e2, "reload after failed commit failed"),
                }
                for (reply, r) in outcomes {
                    let r = r.and(Err(Error::Store(store::Error::Redb(msg.clone()))));
                    let _ = reply.send(r);
                }
            }
        }
    }
}

enum BeatOp {
    Upsert(Arc<Instance>),
    Remove(String),
}

fn apply_beat_ops(inner: &Inner, ops: Vec<BeatOp>) {
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

/// One command's application to the state: checks first, then mutates.
struct Tx<'a> {
    inner: &'a Inner,
    st: &'a mut State,
    muts: Vec<Mutation>,
    keys: Vec<ChangeKey>,
    beats: Vec<BeatOp>,
    revision: u64,
    now: &'a str,
}

fn at(i: usize, e: FieldError) -> Error {
    Error::Invalid(e.prefixed(&format!("[{i}].")))
}

impl Tx<'_> {
    fn run(&mut self, cmd: Command) -> Result<Vec<Item>, Error> {
        match cmd {
            Command::Flush => Ok(vec![]),
            Command::CreateNamespaces(list) => self.create_namespaces(list),
            Command::UpdateNamespaces(list) => self.update_namespaces(list),
            Command::DeleteNamespaces(list) => self.delete_namespaces(list),
            Command::CreateServices(list) => self.create_services(list),
            Command::UpdateServices(list) => self.update_services(list),
            Command::DeleteServices(list) => self.delete_services(list),
            Command::CreateAlias(alias) => self.create_alias(*alias),
            Command::DeleteAliases(list) => self.delete_aliases(list),
            Command::RegisterInstances(list) => self.register(list),
            Command::UpdateInstances(list) => self.update_instances(list),
            Command::DeregisterInstances(list) => self.deregister(list),
            Command::PutGroups(list) => self.put_groups(list),
            Command::DeleteGroups(list) => self.delete_groups(list),
            Command::SetHealth { id, healthy } => self.set_health(&id, healthy),
        }
    }

    fn touch(&mut self, key: &ServiceKey) {
        if let Some(e) = self.st.services.get_mut(key) {
            e.revision = self.revision;
        }
    }

    fn put_service(&mut self, svc: Service) -> Arc<Service> {
        let key = svc.key();
        let svc = Arc::new(svc);
        match self.st.services.get_mut(&key) {
            Some(e) => e.service = svc.clone(),
            None => {
                self.st.services.insert(
                    key.clone(),
                    ServiceEntry {
                        service: svc.clone(),
                        instances: BTreeMap::new(),
                        groups: BTreeMap::new(),
                        revision: self.revision,
                    },
                );
            }
        }
        self.touch(&key);
        self.muts.push(Mutation::PutService(svc.clone()));
        self.keys.push(ChangeKey::Service(key));
        svc
    }

    fn put_instance(&mut self, inst: Instance) -> Arc<Instance> {
        let inst = Arc::new(inst);
        let key = inst.service_key();
        if let Some(old_id) = self.st.resolve(&InstanceSelector::Address {
            service: key.clone(),
            host: inst.host.clone(),
            port: inst.port,
        }) {
            if old_id != inst.id {
                self.st.remove_instance(&old_id);
                self.muts.push(Mutation::DeleteInstance(old_id.clone()));
                self.beats.push(BeatOp::Remove(old_id));
            }
        }
        self.st.remove_instance(&inst.id);
        self.st.insert_instance(inst.clone());
        self.touch(&key);
        self.muts.push(Mutation::PutInstance(inst.clone()));
        self.keys.push(ChangeKey::Instances(key));
        self.beats.push(BeatOp::Upsert(inst.clone()));
        inst
    }

    fn create_namespaces(&mut self, list: Vec<Namespace>) -> Result<Vec<Item>, Error> {
        Ok(list
            .into_iter()
            .map(|ns| {
                if self.st.namespaces.contains_key(&ns.name) {
                    return Item::rejected(Rejection::Exists, format!("namespace {}", ns.name));
                }
                self.st.namespaces.insert(ns.name.clone(), ns.clone());
                self.muts.push(Mutation::PutNamespace(ns.clone()));
                self.keys.push(ChangeKey::Namespace(ns.name.clone()));
                Item::Namespace(ns)
            })
            .collect())
    }

    fn update_namespaces(&mut self, list: Vec<NamespaceInput>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::with_capacity(list.len());
        for (i, input) in list.iter().enumerate() {
            let name = input.name.clone().unwrap_or_default();
            let Some(cur) = self.st.namespaces.get(&name) else {
                out.push(Item::rejected(
                    Rejection::NamespaceMissing,
                    format!("namespace {name}"),
                ));
                continue;
            };
            let next = input.apply_to(cur, self.now).map_err(|e| at(i, e))?;
            self.st.namespaces.insert(name.clone(), next.clone());
            self.muts.push(Mutation::PutNamespace(next.clone()));
            self.keys.push(ChangeKey::Namespace(name));
            out.push(Item::Namespace(next));
        }
        Ok(out)
    }

    fn delete_namespaces(&mut self, list: Vec<String>) -> Result<Vec<Item>, Error> {
        Ok(list
            .into_iter()
            .map(|name| {
                if SYSTEM_NAMESPACES.contains(&name.as_str()) {
                    return Item::rejected(
                        Rejection::SystemNamespace,
                        format!("{name} is a system namespace"),
                    );
                }
                let services = self
                    .st
                    .services
                    .range(ServiceKey::new(&name, "")..)
                    .take_while(|(k, _)| k.namespace == name)
                    .count();
                if services > 0 {
                    return Item::rejected(
                        Rejection::NamespaceHasServices,
                        format!("namespace {name} still has {services} service(s)"),
                    );
                }
                match self.st.namespaces.remove(&name) {
                    Some(ns) => {
                        self.muts.push(Mutation::DeleteNamespace(name.clone()));
                        self.keys.push(ChangeKey::Namespace(name));
                        Item::Namespace(ns)
                    }
                    None => Item::Missing(name),
                }
            })
            .collect())
    }

    fn create_services(&mut self, list: Vec<Service>) -> Result<Vec<Item>, Error> {
        Ok(list
            .into_iter()
            .map(|s| {
                if !self.st.namespaces.contains_key(&s.namespace) {
                    return Item::rejected(
                        Rejection::NamespaceMissing,
                        format!("namespace {}", s.namespace),
                    );
                }
                if self.st.services.contains_key(&s.key()) {
                    return Item::rejected(Rejection::Exists, format!("service {}", s.key()));
                }
                Item::Service(self.put_service(s))
            })
            .collect())
    }

    fn update_services(&mut self, list: Vec<ServiceInput>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::with_capacity(list.len());
        for (i, input) in list.iter().enumerate() {
            let key = input.validate_key().map_err(|e| at(i, e))?;
            let Some(cur) = self.st.services.get(&key) else {
                out.push(Item::rejected(
                    Rejection::ServiceMissing,
                    format!("service {key}"),
                ));
                continue;
            };
            if cur.service.alias_for.is_some() {
                out.push(Item::rejected(
                    Rejection::AliasUpdate,
                    format!("{key} is an alias"),
                ));
                continue;
            }
            let next = input
                .apply_to(&cur.service, self.now)
                .map_err(|e| at(i, e))?;
            out.push(Item::Service(self.put_service(next)));
        }
        Ok(out)
    }

    /// Aliases of `key`, other than those in `except`.
    fn aliases_of(&self, key: &ServiceKey, except: &[ServiceKey]) -> Option<ServiceKey> {
        self.st
            .services
            .iter()
            .find(|(k, e)| {
                e.service
                    .alias_for
                    .as_ref()
                    .is_some_and(|t| t.namespace == key.namespace && t.service == key.name)
                    && !except.contains(k)
            })
            .map(|(k, _)| k.clone())
    }

    fn delete_services(&mut self, list: Vec<ServiceKey>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::with_capacity(list.len());
        for key in &list {
            let Some(e) = self.st.services.get(key) else {
                out.push(Item::Missing(key.to_string()));
                continue;
            };
            if !e.instances.is_empty() {
                out.push(Item::rejected(
                    Rejection::ServiceHasInstances,
                    format!("service {key} still has {} instance(s)", e.instances.len()),
                ));
                continue;
            }
            if let Some(alias) = self.aliases_of(key, &list) {
                out.push(Item::rejected(
                    Rejection::ServiceHasAliases,
                    format!("service {key} still has alias {alias}"),
                ));
                continue;
            }
            out.push(self.remove_service(key));
        }
        Ok(out)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Item {
        let e = self.st.services.remove(key).expect("checked");
        for g in e.groups.values() {
            self.muts.push(Mutation::DeleteGroup {
                namespace: g.namespace.clone(),
                service: g.service.clone(),
                name: g.name.clone(),
            });
        }
        self.muts.push(Mutation::DeleteService {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        });
        self.keys.push(ChangeKey::Service(key.clone()));
        Item::Service(e.service)
    }

    fn create_alias(&mut self, alias: Service) -> Result<Vec<Item>, Error> {
        let target = alias.alias_for.clone().expect("validated alias");
        let tkey = ServiceKey::new(&target.namespace, &target.service);
        let item = if !self.st.namespaces.contains_key(&alias.namespace) {
            Item::rejected(
                Rejection::NamespaceMissing,
                format!("namespace {}", alias.namespace),
            )
        } else {
            match self.st.services.get(&tkey) {
                None => Item::rejected(Rejection::ServiceMissing, format!("service {tkey}")),
                Some(e) if e.service.alias_for.is_some() => Item::rejected(
                    Rejection::AliasOfAlias,
                    format!("{tkey} is itself an alias"),
                ),
                _ if self.st.services.contains_key(&alias.key()) => {
                    Item::rejected(Rejection::Exists, format!("service {}", alias.key()))
                }
                _ => Item::Service(self.put_service(alias)),
            }
        };
        Ok(vec![item])
    }

    fn delete_aliases(&mut self, list: Vec<ServiceKey>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::with_capacity(list.len());
        for key in list {
            match self.st.services.get(&key) {
                None => out.push(Item::Missing(key.to_string())),
                Some(e) if e.service.alias_for.is_none() => out.push(Item::rejected(
                    Rejection::NotAnAlias,
                    format!("{key} is a service, not an alias"),
                )),
                Some(_) => out.push(self.remove_service(&key)),
            }
        }
        Ok(out)
    }

    fn register(&mut self, list: Vec<Instance>) -> Result<Vec<Item>, Error> {
        let mut ids = HashSet::new();
        for (i, inst) in list.iter().enumerate() {
            if !ids.insert(inst.id.as_str()) {
                return Err(at(
                    i,
                    FieldError::new("id", "the same instance appears twice in the request"),
                ));
            }
        }
        let mut out = Vec::with_capacity(list.len());
        for mut inst in list {
            let key = inst.service_key();
            if !self.st.namespaces.contains_key(&inst.namespace) {
                out.push(Item::rejected(
                    Rejection::NamespaceMissing,
                    format!("namespace {}", inst.namespace),
                ));
                continue;
            }
            if let Some(t) = self
                .st
                .services
                .get(&key)
                .and_then(|e| e.service.alias_for.as_ref())
            {
                out.push(Item::rejected(
                    Rejection::AliasTakesNoInstances,
                    format!(
                        "{key} is an alias of {}/{}; register to the service itself",
                        t.namespace, t.service
                    ),
                ));
                continue;
            }
            if let Some(owner) = self.st.instance_index.get(&inst.id) {
                if *owner != key {
                    out.push(Item::rejected(
                        Rejection::IdOfAnotherService,
                        format!("instance {} belongs to service {owner}", inst.id),
                    ));
                    continue;
                }
            }
            if !self.st.services.contains_key(&key) {
                self.put_service(Service::bare(&key.namespace, &key.name, self.now));
            }
            if let Some(old) = self.st.instance(&inst.id) {
                inst.ctime = old.ctime.clone();
            }
            out.push(Item::Instance(self.put_instance(inst)));
        }
        Ok(out)
    }

    fn update_instances(
        &mut self,
        list: Vec<(InstanceSelector, InstanceInput)>,
    ) -> Result<Vec<Item>, Error> {
        // Every item is validated against the state first: a field error rejects the request.
        let mut updated = Vec::with_capacity(list.len());
        for (i, (sel, input)) in list.iter().enumerate() {
            let Some(id) = self.st.resolve(sel) else {
                updated.push(Err(sel.describe()));
                continue;
            };
            let cur = self.st.instance(&id).expect("resolved").clone();
            let merged = merge_instance(&cur, input);
            let mut next = merged.validate(self.now).map_err(|e| at(i, e))?;
            next.ctime = cur.ctime.clone();
            updated.push(Ok(next));
        }
        Ok(updated
            .into_iter()
            .map(|r| match r {
                Ok(i) => Item::Instance(self.put_instance(i)),
                Err(what) => Item::rejected(Rejection::InstanceMissing, format!("instance {what}")),
            })
            .collect())
    }

    fn deregister(&mut self, list: Vec<InstanceSelector>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        for sel in list {
            match self
                .st
                .resolve(&sel)
                .and_then(|id| self.st.remove_instance(&id))
            {
                Some(inst) => {
                    let key = inst.service_key();
                    self.touch(&key);
                    self.muts.push(Mutation::DeleteInstance(inst.id.clone()));
                    self.keys.push(ChangeKey::Instances(key));
                    self.beats.push(BeatOp::Remove(inst.id.clone()));
                    out.push(Item::Instance(inst));
                }
                None => out.push(Item::Missing(sel.describe())),
            }
        }
        Ok(out)
    }

    fn put_groups(&mut self, list: Vec<InstanceGroup>) -> Result<Vec<Item>, Error> {
        for (i, g) in list.iter().enumerate() {
            g.validate().map_err(|e| at(i, e))?;
        }
        let mut out = Vec::new();
        for mut g in list {
            let key = ServiceKey::new(&g.namespace, &g.service);
            let Some(entry) = self.st.services.get_mut(&key) else {
                out.push(Item::rejected(
                    Rejection::ServiceMissing,
                    format!("service {key}"),
                ));
                continue;
            };
            g.ctime = self.now.to_string();
            entry.groups.insert(g.name.clone(), g.clone());
            self.touch(&key);
            self.muts.push(Mutation::PutGroup(g.clone()));
            self.keys.push(ChangeKey::Instances(key));
            out.push(Item::Group(g));
        }
        Ok(out)
    }

    fn delete_groups(&mut self, list: Vec<(ServiceKey, String)>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        for (key, name) in list {
            let removed = self
                .st
                .services
                .get_mut(&key)
                .and_then(|e| e.groups.remove(&name));
            match removed {
                Some(g) => {
                    self.touch(&key);
                    self.muts.push(Mutation::DeleteGroup {
                        namespace: key.namespace.clone(),
                        service: key.name.clone(),
                        name,
                    });
                    self.keys.push(ChangeKey::Instances(key));
                    out.push(Item::Group(g));
                }
                None => out.push(Item::Missing(format!("{key} group {name}"))),
            }
        }
        Ok(out)
    }

    fn set_health(&mut self, id: &str, healthy: bool) -> Result<Vec<Item>, Error> {
        let Some(cur) = self.st.instance(id) else {
            return Ok(vec![Item::Missing(id.to_string())]);
        };
        let slot = self.inner.beats.read().get(id).cloned();
        if let Some(slot) = &slot {
            // Decided by the checker a moment ago; a heartbeat may have arrived since.
            if !healthy && !slot.expired(self.inner.now_ms()) {
                return Ok(vec![Item::Instance(cur.clone())]);
            }
            // Visible to heartbeats at once, so a beat racing the commit still triggers recovery.
            slot.healthy.store(healthy, Ordering::Release);
        }
        if cur.healthy == healthy {
            return Ok(vec![Item::Instance(cur.clone())]);
        }
        let mut next = (**cur).clone();
        next.healthy = healthy;
        next.mtime = self.now.to_string();
        let inst = self.put_instance(next);
        Ok(vec![Item::Instance(inst)])
    }
}

/// The input that results from applying the set fields of `input` over `cur`.
fn merge_instance(cur: &Instance, input: &InstanceInput) -> InstanceInput {
    use crate::model::{HealthCheckInput, HeartbeatInput};
    let cur_hc = cur.health_check.map(|hc| HealthCheckInput {
        kind: Some(serde_json::Value::from("HEARTBEAT")),
        heartbeat: Some(HeartbeatInput {
            ttl: Some(i64::from(hc.heartbeat.ttl)),
        }),
    });
    InstanceInput {
        id: Some(cur.id.clone()),
        namespace: Some(cur.namespace.clone()),
        service: Some(cur.service.clone()),
        vpc_id: Some(cur.vpc_id.clone()),
        host: Some(cur.host.clone()),
        port: Some(i64::from(cur.port)),
        protocol: input.protocol.clone().or(Some(cur.protocol.clone())),
        version: input.version.clone().or(Some(cur.version.clone())),
        priority: input.priority.or(Some(i64::from(cur.priority))),
        weight: input.weight.or(Some(i64::from(cur.weight))),
        healthy: input.healthy.or(Some(cur.healthy)),
        isolate: input.isolate.or(Some(cur.isolate)),
        metadata: input.metadata.clone().or(Some(cur.metadata.clone())),
        location: input.location.clone().or(Some(cur.location.clone())),
        logic_set: input.logic_set.clone().or(Some(cur.logic_set.clone())),
        enable_health_check: input.enable_health_check.or(Some(cur.enable_health_check)),
        health_check: input.health_check.clone().or(cur_hc),
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
}
