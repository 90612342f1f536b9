//! The single writer: applies commands to the state (checks first, then mutates) and commits
//! them in groups.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::health::{apply_beat_ops, BeatOp};
use super::{
    Change, ChangeKey, Command, Error, Inner, Item, Job, Rejection, Reply, ServiceEntry, State,
};
use crate::model::rules::Rule;
use crate::model::{
    now_rfc3339, FieldError, Instance, InstanceGroup, InstanceInput, InstanceSelector, Namespace,
    NamespaceInput, Service, ServiceInput, ServiceKey, SYSTEM_NAMESPACES,
};
use crate::store::{self, Mutation, Store};

/// Most commands folded into one store transaction.
const MAX_GROUP: usize = 1024;

/// The single writer. State changes are applied in memory under the lock (fast), then the group
/// is committed on a blocking thread while the next group queues up.
pub(super) async fn writer_loop(
    inner: Arc<Inner>,
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if inner.shared {
            let jobs = jobs.into_iter().map(|j| (j.cmd, j.reply)).collect();
            shared_group(&inner, store.as_ref(), jobs).await;
            continue;
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
        // The store is where the state was before this group; a store shared with other writers
        // would answer a conflict here (the single writer owns a local store, so it never does).
        match store.commit(batch, revision - 1).await {
            Ok(assigned) => {
                debug_assert_eq!(
                    assigned, revision,
                    "a local store assigns the revision after the one expected"
                );
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
                match store.load().await {
                    Ok(snap) => *inner.state.write() = State::from_snapshot(snap),
                    Err(e2) => tracing::error!(error = %e2, "reload after failed commit failed"),
                }
                let e = Arc::new(e);
                for (reply, r) in outcomes {
                    let r = r.and(Err(Error::Store(e.clone())));
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// Times a group is planned against fresh state after losing to another replica's commit.
const MAX_ATTEMPTS: usize = 20;

/// A group of jobs on a store shared with other replicas: planned on a copy of the state and
/// committed only if the store is still where that copy is; when another replica committed
/// first, planned again once this replica has followed that commit. The state and the change
/// feed see the group only once it is committed.
fn shared_group<'a>(
    inner: &'a Arc<Inner>,
    store: &'a dyn Store,
    jobs: Vec<(Command, Reply)>,
) -> futures::future::BoxFuture<'a, ()> {
    Box::pin(shared_group_inner(inner, store, jobs))
}

async fn shared_group_inner(inner: &Arc<Inner>, store: &dyn Store, jobs: Vec<(Command, Reply)>) {
    let (cmds, replies): (Vec<Command>, Vec<Reply>) = jobs.into_iter().unzip();
    for attempt in 1..=MAX_ATTEMPTS {
        let gate = inner.gate.lock().await;
        let mut scratch = inner.state.read().clone();
        let expected = scratch.revision;
        let revision = expected + 1;
        let now = now_rfc3339();
        let mut batch: Vec<Mutation> = Vec::new();
        let mut keys: Vec<ChangeKey> = Vec::new();
        let mut beat_ops: Vec<BeatOp> = Vec::new();
        let mut outcomes: Vec<Result<Vec<Item>, Error>> = Vec::with_capacity(cmds.len());
        for cmd in cmds.iter().cloned() {
            let mut tx = Tx {
                inner,
                st: &mut scratch,
                muts: Vec::new(),
                keys: Vec::new(),
                beats: Vec::new(),
                revision,
                now: &now,
            };
            let r = tx.run(cmd);
            if r.is_ok() {
                batch.append(&mut tx.muts);
                keys.append(&mut tx.keys);
                beat_ops.append(&mut tx.beats);
            }
            outcomes.push(r);
        }
        if batch.is_empty() {
            drop(gate);
            for (reply, r) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(r);
            }
            return;
        }
        if let (Some(max), true) = (store.max_batch(), cmds.len() > 1) {
            if batch.len() > max {
                // More than one commit may hold: the requests go in halves, each whole.
                drop(gate);
                let mut jobs: Vec<(Command, Reply)> = cmds.into_iter().zip(replies).collect();
                let second = jobs.split_off(jobs.len() / 2);
                shared_group(inner, store, jobs).await;
                shared_group(inner, store, second).await;
                return;
            }
        }
        let started = std::time::Instant::now();
        match store.commit(batch, expected).await {
            Ok(assigned) => {
                inner
                    .metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                scratch.revision = assigned;
                *inner.state.write() = scratch;
                inner.store_health.send_if_modified(|h| h.take().is_some());
                apply_beat_ops(inner, beat_ops);
                let mut seen = HashSet::new();
                keys.retain(|k| seen.insert(k.clone()));
                let _ = inner.feed.send(Arc::new(Change {
                    revision: assigned,
                    keys,
                }));
                inner.revision.send_replace(assigned);
                drop(gate);
                for (reply, r) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(r);
                }
                return;
            }
            Err(store::Error::Conflict { actual, .. }) => {
                drop(gate);
                inner.metrics.store_conflicts.inc();
                tracing::debug!(
                    attempt,
                    expected,
                    actual,
                    "another replica committed first; planning again"
                );
                // Plan again once this replica holds what the other one wrote.
                let mut rev = inner.revision.subscribe();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    rev.wait_for(|r| *r >= actual),
                )
                .await;
                // Replicas that lost together would collide again at once: spread them out,
                // more with each loss.
                let spread = (attempt as u64).min(8) * 2;
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as u64)
                    % (spread * 1000 + 1);
                tokio::time::sleep(std::time::Duration::from_micros(jitter)).await;
            }
            Err(e) => {
                drop(gate);
                inner.store_health.send_replace(Some(e.to_string()));
                tracing::error!(error = %e, "store commit failed");
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(Error::Store(e.clone())));
                }
                return;
            }
        }
    }
    for reply in replies {
        let _ = reply.send(Err(Error::Conflict(MAX_ATTEMPTS)));
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
            Command::PutTokens(list) => Ok(list
                .into_iter()
                .map(|t| {
                    let t = Arc::new(t);
                    self.st.put_token(t.clone());
                    self.muts.push(Mutation::PutToken((*t).clone()));
                    Item::Token(t)
                })
                .collect()),
            Command::PutRules { rules, create } => Ok(rules
                .into_iter()
                .map(|r| self.put_rule(r, create))
                .collect()),
            Command::DeleteRules(keys) => Ok(keys
                .into_iter()
                .map(|k| match self.st.remove_rule(&k) {
                    Some(old) => {
                        self.keys.push(ChangeKey::Service(old.target()));
                        self.muts.push(Mutation::DeleteRule(k));
                        Item::Rule(old)
                    }
                    None => Item::Missing(format!("{} rule {}", k.0.as_str(), k.1)),
                })
                .collect()),
            Command::EnableRules(list) => Ok(list
                .into_iter()
                .map(|(k, on)| match self.st.rules.get(&k) {
                    Some(cur) => {
                        let mut r = (**cur).clone();
                        r.set_enabled(on);
                        r.stamp(&k.1, self.now);
                        self.put_rule(r, false)
                    }
                    None => Item::rejected(
                        Rejection::RuleMissing,
                        format!("{} rule {}", k.0.as_str(), k.1),
                    ),
                })
                .collect()),
            Command::RevokeTokens(ids) => Ok(ids
                .into_iter()
                .map(|id| match self.st.remove_token(&id) {
                    Some(t) => {
                        self.muts.push(Mutation::DeleteToken(id));
                        Item::Token(t)
                    }
                    None => Item::Missing(id),
                })
                .collect()),
        }
    }

    /// Creates or replaces a rule: both its old and its new target are re-translated.
    fn put_rule(&mut self, mut r: Rule, create: bool) -> Item {
        let key = r.key();
        match (self.st.rules.get(&key), create) {
            (Some(_), true) => {
                return Item::rejected(
                    Rejection::Exists,
                    format!("{} rule {}", key.0.as_str(), key.1),
                )
            }
            (None, false) => {
                return Item::rejected(
                    Rejection::RuleMissing,
                    format!("{} rule {}", key.0.as_str(), key.1),
                )
            }
            (Some(cur), false) => {
                // An update keeps the creation time.
                let ctime = match cur.as_ref() {
                    Rule::Routing(c) => c.ctime.clone(),
                    Rule::RateLimit(c) => c.ctime.clone(),
                    Rule::CircuitBreaker(c) => c.ctime.clone(),
                    Rule::FaultDetect(c) => c.ctime.clone(),
                };
                match &mut r {
                    Rule::Routing(n) => n.ctime = ctime,
                    Rule::RateLimit(n) => n.ctime = ctime,
                    Rule::CircuitBreaker(n) => n.ctime = ctime,
                    Rule::FaultDetect(n) => n.ctime = ctime,
                }
            }
            (None, true) => {}
        }
        let r = Arc::new(r);
        if let Some(old) = self.st.put_rule(r.clone()) {
            self.keys.push(ChangeKey::Service(old.target()));
        }
        self.keys.push(ChangeKey::Service(r.target()));
        self.muts.push(Mutation::PutRule(r.clone()));
        Item::Rule(r)
    }

    fn touch(&mut self, key: &ServiceKey) {
        if let Some(e) = self.st.services.get_mut(key) {
            e.revision = self.revision;
        }
    }

    fn put_service(&mut self, svc: Service) -> Arc<Service> {
        let key = svc.key();
        let svc = Arc::new(svc);
        let old = self.st.services.get(&key).map(|e| e.service.clone());
        self.st.service_token_changed(old.as_deref(), Some(&svc));
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
                self.st.put_namespace(ns.clone());
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
            self.st.put_namespace(next.clone());
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
                match self.st.remove_namespace(&name) {
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
        self.st.service_token_changed(Some(&e.service), None);
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
