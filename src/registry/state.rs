//! The in-memory state and its indexes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ServiceEntry;
use crate::model::rules::{Rule, RuleKey};
use crate::model::{AccessToken, Instance, InstanceSelector, Namespace, Service, ServiceKey};
use crate::store;

/// The in-memory state, read through [`Registry::read`].
#[derive(Debug, Default, Clone)]
pub struct State {
    /// Revision of the last committed change.
    pub revision: u64,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Services by key.
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    /// Access tokens by id.
    pub tokens: BTreeMap<String, Arc<AccessToken>>,
    /// Governance rules by kind and id.
    pub rules: BTreeMap<RuleKey, Arc<Rule>>,
    /// The rules acting on each service.
    rules_by_target: BTreeMap<ServiceKey, std::collections::BTreeSet<RuleKey>>,
    pub(super) instance_index: HashMap<String, ServiceKey>,
    pub(super) addr_index: HashMap<(ServiceKey, String, u16), String>,
    /// Every secret's SHA-256 → what it authenticates: access tokens, and the tokens of
    /// namespaces and services. Kept in step with them by the writer, so a revoked token or a
    /// deleted service stops authenticating in the same commit.
    credentials: HashMap<String, Credential>,
}

/// What a secret authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An access token.
    Token(Arc<AccessToken>),
    /// A namespace's token: writes in that namespace.
    Namespace(String),
    /// A service's token: writes that service's instances.
    Service(ServiceKey),
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

    /// What the secret whose SHA-256 is `hash` authenticates as.
    pub fn credential(&self, hash: &str) -> Option<&Credential> {
        self.credentials.get(hash)
    }

    fn index(&mut self, hash: &str, c: Option<Credential>) {
        if hash.is_empty() {
            return;
        }
        match c {
            Some(c) => {
                self.credentials.insert(hash.to_string(), c);
            }
            None => {
                self.credentials.remove(hash);
            }
        }
    }

    /// Inserts or replaces a namespace (and its token).
    pub(super) fn put_namespace(&mut self, ns: Namespace) {
        if let Some(old) = self.namespaces.get(&ns.name) {
            let h = old.token_hash.clone();
            self.index(&h, None);
        }
        self.index(&ns.token_hash, Some(Credential::Namespace(ns.name.clone())));
        self.namespaces.insert(ns.name.clone(), ns);
    }

    /// Removes a namespace (and its token).
    pub(super) fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        let ns = self.namespaces.remove(name)?;
        self.index(&ns.token_hash, None);
        Some(ns)
    }

    /// Keeps a service's token in the index across a change of its record (`None`: absent).
    pub(super) fn service_token_changed(&mut self, old: Option<&Service>, new: Option<&Service>) {
        if let Some(o) = old {
            let h = o.token_hash.clone();
            self.index(&h, None);
        }
        if let Some(n) = new {
            self.index(&n.token_hash, Some(Credential::Service(n.key())));
        }
    }

    /// Inserts or replaces an access token.
    pub(super) fn put_token(&mut self, t: Arc<AccessToken>) {
        if let Some(old) = self.tokens.remove(&t.id) {
            self.index(&old.hash, None);
        }
        self.index(&t.hash.clone(), Some(Credential::Token(t.clone())));
        self.tokens.insert(t.id.clone(), t);
    }

    /// Removes an access token.
    pub(super) fn remove_token(&mut self, id: &str) -> Option<Arc<AccessToken>> {
        let t = self.tokens.remove(id)?;
        self.index(&t.hash, None);
        Some(t)
    }

    /// The rules acting on `svc` (enabled or not), in key order.
    pub fn rules_of(&self, svc: &ServiceKey) -> Vec<Arc<Rule>> {
        self.rules_by_target
            .get(svc)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.rules.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Inserts or replaces a rule; returns the one it replaced.
    pub(super) fn put_rule(&mut self, r: Arc<Rule>) -> Option<Arc<Rule>> {
        let key = r.key();
        let old = self.remove_rule(&key);
        self.rules_by_target
            .entry(r.target())
            .or_default()
            .insert(key.clone());
        self.rules.insert(key, r);
        old
    }

    /// Removes a rule.
    pub(super) fn remove_rule(&mut self, key: &RuleKey) -> Option<Arc<Rule>> {
        let r = self.rules.remove(key)?;
        let target = r.target();
        if let Some(set) = self.rules_by_target.get_mut(&target) {
            set.remove(key);
            if set.is_empty() {
                self.rules_by_target.remove(&target);
            }
        }
        Some(r)
    }

    pub(super) fn insert_instance(&mut self, inst: Arc<Instance>) {
        let key = inst.service_key();
        self.instance_index.insert(inst.id.clone(), key.clone());
        self.addr_index
            .insert((key.clone(), inst.host.clone(), inst.port), inst.id.clone());
        if let Some(e) = self.services.get_mut(&key) {
            e.instances.insert(inst.id.clone(), inst);
        }
    }

    pub(super) fn remove_instance(&mut self, id: &str) -> Option<Arc<Instance>> {
        let key = self.instance_index.remove(id)?;
        let inst = self.services.get_mut(&key)?.instances.remove(id)?;
        self.addr_index.remove(&(key, inst.host.clone(), inst.port));
        Some(inst)
    }

    /// Applies a batch another writer committed at `revision` (a replica's registry following a
    /// shared store); answers what it touched. Records go in before what refers to them
    /// (namespaces, services, then instances and groups) and come out in the reverse order,
    /// whatever order the store reports them in.
    pub(super) fn apply_committed(
        &mut self,
        batch: &[store::Mutation],
        revision: u64,
    ) -> Vec<super::ChangeKey> {
        use super::ChangeKey;
        use store::Mutation as M;
        let rank = |m: &M| match m {
            M::PutNamespace(_) => 0,
            M::PutService(_) => 1,
            M::PutInstance(_) | M::PutGroup(_) | M::PutToken(_) | M::PutRule(_) => 2,
            M::DeleteInstance(_) | M::DeleteGroup { .. } | M::DeleteToken(_) | M::DeleteRule(_) => {
                3
            }
            M::DeleteService { .. } => 4,
            M::DeleteNamespace(_) => 5,
        };
        let mut ordered: Vec<&M> = batch.iter().collect();
        ordered.sort_by_key(|m| rank(m));
        let mut keys = Vec::new();
        let touch = |st: &mut State, key: &ServiceKey| {
            if let Some(e) = st.services.get_mut(key) {
                e.revision = revision;
            }
        };
        for m in ordered {
            match m {
                M::PutNamespace(n) => {
                    keys.push(ChangeKey::Namespace(n.name.clone()));
                    self.put_namespace(n.clone());
                }
                M::DeleteNamespace(n) => {
                    keys.push(ChangeKey::Namespace(n.clone()));
                    self.remove_namespace(n);
                }
                M::PutService(s) => {
                    let key = s.key();
                    let old = self.services.get(&key).map(|e| e.service.clone());
                    self.service_token_changed(old.as_deref(), Some(s));
                    let e =
                        self.services
                            .entry(key.clone())
                            .or_insert_with(|| super::ServiceEntry {
                                service: s.clone(),
                                instances: BTreeMap::new(),
                                groups: BTreeMap::new(),
                                revision,
                            });
                    e.service = s.clone();
                    e.revision = revision;
                    keys.push(ChangeKey::Service(key));
                }
                M::DeleteService { namespace, name } => {
                    let key = ServiceKey::new(namespace, name);
                    if let Some(e) = self.services.remove(&key) {
                        self.service_token_changed(Some(&e.service), None);
                        for id in e.instances.keys() {
                            self.instance_index.remove(id);
                        }
                        for i in e.instances.values() {
                            self.addr_index
                                .remove(&(key.clone(), i.host.clone(), i.port));
                        }
                    }
                    keys.push(ChangeKey::Service(key));
                }
                M::PutInstance(i) => {
                    self.remove_instance(&i.id);
                    let key = ServiceKey::new(&i.namespace, &i.service);
                    self.insert_instance(i.clone());
                    touch(self, &key);
                    keys.push(ChangeKey::Instances(key));
                }
                M::DeleteInstance(id) => {
                    if let Some(i) = self.remove_instance(id) {
                        let key = ServiceKey::new(&i.namespace, &i.service);
                        touch(self, &key);
                        keys.push(ChangeKey::Instances(key));
                    }
                }
                M::PutGroup(g) => {
                    let key = ServiceKey::new(&g.namespace, &g.service);
                    if let Some(e) = self.services.get_mut(&key) {
                        e.groups.insert(g.name.clone(), g.clone());
                    }
                    touch(self, &key);
                    keys.push(ChangeKey::Instances(key));
                }
                M::DeleteGroup {
                    namespace,
                    service,
                    name,
                } => {
                    let key = ServiceKey::new(namespace, service);
                    if let Some(e) = self.services.get_mut(&key) {
                        e.groups.remove(name);
                    }
                    touch(self, &key);
                    keys.push(ChangeKey::Instances(key));
                }
                M::PutToken(t) => self.put_token(Arc::new(t.clone())),
                M::DeleteToken(id) => {
                    self.remove_token(id);
                }
                M::PutRule(r) => {
                    if let Some(old) = self.put_rule(r.clone()) {
                        keys.push(ChangeKey::Service(old.target()));
                    }
                    keys.push(ChangeKey::Service(r.target()));
                }
                M::DeleteRule(k) => {
                    if let Some(old) = self.remove_rule(k) {
                        keys.push(ChangeKey::Service(old.target()));
                    }
                }
            }
        }
        self.revision = self.revision.max(revision);
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(k.clone()));
        keys
    }

    pub(super) fn from_snapshot(snap: store::Snapshot) -> Self {
        let mut s = State {
            revision: snap.revision,
            ..Default::default()
        };
        for ns in snap.namespaces {
            s.put_namespace(ns);
        }
        for t in snap.tokens {
            s.put_token(Arc::new(t));
        }
        for r in snap.rules {
            s.put_rule(Arc::new(r));
        }
        for svc in snap.services {
            s.service_token_changed(None, Some(&svc));
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
