//! The in-memory state and its indexes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ServiceEntry;
use crate::model::{Instance, InstanceSelector, Namespace, ServiceKey};
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
    pub(super) instance_index: HashMap<String, ServiceKey>,
    pub(super) addr_index: HashMap<(ServiceKey, String, u16), String>,
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
