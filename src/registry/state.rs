//! The in-memory state and its indexes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ServiceEntry;
use crate::model::rules::{Rule, RuleKey};
use crate::model::{AccessToken, Instance, InstanceSelector, Namespace, Service, ServiceKey};
use crate::store;

/// The in-memory state, read through [`Registry::read`].
#[derive(Debug, Default)]
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
