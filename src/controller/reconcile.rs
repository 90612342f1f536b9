//! The difference between what Kubernetes says a service is and what the registry holds, as the
//! writes that close it (pure: [`plan`]), and those writes applied in batches ([`apply`]).
//!
//! Only what this cluster's controller owns is changed or removed (see
//! [`super::translate::owned`]): instances registered by SDKs, or by another cluster's controller,
//! are never touched, even at the same address; a service some other writer created gets the
//! Service's labels merged into its metadata, never its own keys removed. Equal state plans no
//! write, so a resync of an unchanged cluster writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::translate::{owned, Config, DesiredService, CLUSTER_KEY, SOURCE_KEY};
use crate::model::{Instance, InstanceSelector, NamespaceInput, Service, ServiceInput, ServiceKey};
use crate::registry::{Command, Registry, State};

/// Instances written per registry command.
const BATCH: usize = 500;

/// Writes that bring one service to its desired state.
#[derive(Debug, Default)]
pub struct Plan {
    /// Registry namespace to create first.
    pub namespace: Option<String>,
    /// The service, to create.
    pub create: Option<Service>,
    /// The service's metadata, to set.
    pub update: Option<ServiceInput>,
    /// Instances to register (new or changed).
    pub register: Vec<Instance>,
    /// Owned instances to remove.
    pub deregister: Vec<String>,
    /// An alias to create.
    pub alias: Option<Service>,
    /// Desired instances left alone because another writer holds their address.
    pub foreign: Vec<String>,
    /// Owned aliases of a service that is going, to delete (before it).
    pub delete_aliases: Vec<ServiceKey>,
    /// An owned service left with no instance, its Service gone, to delete.
    pub delete: Option<ServiceKey>,
}

impl Plan {
    /// Registry writes (items) it makes.
    pub fn writes(&self) -> usize {
        usize::from(self.namespace.is_some())
            + usize::from(self.create.is_some())
            + usize::from(self.update.is_some())
            + self.register.len()
            + self.deregister.len()
            + usize::from(self.alias.is_some())
            + self.delete_aliases.len()
            + usize::from(self.delete.is_some())
    }
}

/// Whether a stored instance already is the desired one (times aside; health aside when
/// heartbeats decide it).
fn same(stored: &Instance, want: &Instance) -> bool {
    let health = want.enable_health_check || stored.healthy == want.healthy;
    stored.host == want.host
        && stored.port == want.port
        && stored.protocol == want.protocol
        && stored.version == want.version
        && stored.weight == want.weight
        && stored.isolate == want.isolate
        && stored.metadata == want.metadata
        && stored.location == want.location
        && stored.enable_health_check == want.enable_health_check
        && stored.health_check == want.health_check
        && health
}

/// The writes for the service at `key`: to `desired`, or (None: its Service is gone or no longer
/// synced) to nothing of what this cluster owns.
pub fn plan(
    cfg: &Config,
    key: &ServiceKey,
    desired: Option<&DesiredService>,
    st: &State,
    now: &str,
) -> Result<Plan, crate::model::FieldError> {
    let mut p = Plan::default();
    let entry = st.services.get(key);
    let stored: BTreeMap<&str, &Instance> = entry
        .map(|e| {
            e.instances
                .values()
                .map(|i| (i.id.as_str(), i.as_ref()))
                .collect()
        })
        .unwrap_or_default();
    let mut wanted: BTreeSet<&str> = BTreeSet::new();
    if let Some(d) = desired {
        if !st.namespaces.contains_key(&d.namespace) {
            p.namespace = Some(d.namespace.clone());
        }
        match entry {
            None => {
                let mut s = Service::bare(&d.namespace, &d.name, now);
                s.metadata = d.metadata.clone();
                p.create = Some(s);
            }
            Some(e) => {
                let mine = owned(cfg, &e.service.metadata);
                let mut meta = if mine {
                    d.metadata.clone()
                } else {
                    // Someone else's service: the labels join its metadata, ownership does not.
                    let mut m = e.service.metadata.clone();
                    m.extend(
                        d.metadata
                            .iter()
                            .filter(|(k, _)| *k != SOURCE_KEY && *k != CLUSTER_KEY)
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                    m
                };
                // Keys the registry keeps on a service of its own accord stay.
                if let Some(p) = e.service.metadata.get(crate::model::PROTOCOL_KEY) {
                    meta.entry(crate::model::PROTOCOL_KEY.into())
                        .or_insert_with(|| p.clone());
                }
                if meta != e.service.metadata {
                    p.update = Some(ServiceInput {
                        namespace: Some(d.namespace.clone()),
                        name: Some(d.name.clone()),
                        metadata: Some(meta),
                        ..Default::default()
                    });
                }
            }
        }
        for input in &d.instances {
            let want = input.clone().validate(now)?;
            wanted.insert(input.id.as_deref().unwrap_or_default());
            match stored.get(want.id.as_str()) {
                Some(s) if !owned(cfg, &s.metadata) => p.foreign.push(want.id.clone()),
                Some(s) if same(s, &want) => {}
                _ => p.register.push(want),
            }
        }
        if let Some((ans, aname)) = &d.alias {
            let akey = ServiceKey::new(ans, aname);
            if !st.services.contains_key(&akey) {
                let mut a = Service::bare(ans, aname, now);
                a.metadata = ownership(&d.metadata);
                a.alias_for = Some(crate::model::AliasTarget {
                    namespace: d.namespace.clone(),
                    service: d.name.clone(),
                });
                p.alias = Some(a);
            }
        }
    }
    p.deregister = stored
        .iter()
        .filter(|(id, i)| !wanted.contains(**id) && owned(cfg, &i.metadata))
        .map(|(id, _)| id.to_string())
        .collect();
    if let (None, Some(e)) = (desired, entry) {
        if owned(cfg, &e.service.metadata) && p.deregister.len() == stored.len() {
            let aliases = || {
                st.services.iter().filter(|(_, a)| {
                    a.service
                        .alias_for
                        .as_ref()
                        .is_some_and(|t| t.namespace == key.namespace && t.service == key.name)
                })
            };
            p.delete_aliases = aliases()
                .filter(|(_, a)| owned(cfg, &a.service.metadata))
                .map(|(k, _)| k.clone())
                .collect();
            // Another writer's alias keeps the service.
            if aliases().all(|(_, a)| owned(cfg, &a.service.metadata)) {
                p.delete = Some(key.clone());
            }
        }
    }
    Ok(p)
}

/// The ownership keys of `metadata`.
fn ownership(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metadata
        .iter()
        .filter(|(k, _)| *k == SOURCE_KEY || *k == CLUSTER_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Applies `p` through the registry's writer (every write durable and on the change feed).
pub async fn apply(reg: &Registry, p: Plan) -> Result<(), crate::registry::Error> {
    if let Some(ns) = p.namespace {
        let n = NamespaceInput {
            name: Some(ns),
            ..Default::default()
        }
        .validate(&crate::model::now_rfc3339())
        .map_err(crate::registry::Error::from)?;
        reg.submit(Command::CreateNamespaces(vec![n])).await?;
    }
    if let Some(s) = p.create {
        reg.submit(Command::CreateServices(vec![s])).await?;
    }
    if let Some(u) = p.update {
        reg.submit(Command::UpdateServices(vec![u])).await?;
    }
    let mut register = p.register;
    while !register.is_empty() {
        let rest = register.split_off(register.len().min(BATCH));
        reg.submit(Command::RegisterInstances(register)).await?;
        register = rest;
    }
    for chunk in p.deregister.chunks(BATCH) {
        reg.submit(Command::DeregisterInstances(
            chunk.iter().cloned().map(InstanceSelector::Id).collect(),
        ))
        .await?;
    }
    if let Some(a) = p.alias {
        reg.submit(Command::CreateAlias(Box::new(a))).await?;
    }
    if !p.delete_aliases.is_empty() {
        reg.submit(Command::DeleteAliases(p.delete_aliases)).await?;
    }
    if let Some(k) = p.delete {
        reg.submit(Command::DeleteServices(vec![k])).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::translate::{translate, SyncMode};
    use crate::metrics::Metrics;
    use crate::model::InstanceInput;
    use crate::store::RedbStore;
    use k8s_openapi::api::core::v1::{Node, Pod, Service as K8sService};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use std::sync::Arc;

    fn recorded<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/kube/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn cfg(name: &str) -> Config {
        Config {
            cluster_name: name.into(),
            mode: SyncMode::All,
        }
    }

    /// The recorded Service, its slice with `mutate` applied, translated for cluster `c1`.
    fn desired(mutate: impl FnOnce(&mut EndpointSlice)) -> DesiredService {
        let svc: K8sService = recorded("service.json");
        let mut slice: EndpointSlice = recorded("endpointslice.json");
        mutate(&mut slice);
        let pods: k8s_openapi::List<Pod> = recorded("pods.json");
        let node: Node = recorded("node.json");
        translate(
            &cfg("c1"),
            &svc,
            [&slice],
            |n| {
                pods.items
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(n))
            },
            |_| Some(&node),
        )
        .unwrap()
    }

    async fn registry(dir: &std::path::Path) -> Registry {
        Registry::open(
            Arc::new(RedbStore::open(dir).unwrap()),
            crate::registry::Config::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap()
    }

    async fn sync(reg: &Registry, c: &Config, d: Option<&DesiredService>) -> usize {
        let key = ServiceKey::new("shop", "echo");
        let p = plan(c, &key, d, &reg.read(), "t").unwrap();
        let n = p.writes();
        apply(reg, p).await.unwrap();
        n
    }

    fn ids(reg: &Registry) -> Vec<String> {
        let st = reg.read();
        let mut v: Vec<String> = st.services[&ServiceKey::new("shop", "echo")]
            .instances
            .values()
            .map(|i| format!("{}:{}", i.host, i.port))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_sync_writes_the_difference_and_a_resync_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let d = desired(|_| {});
        // Cold: namespace, service, four instances, alias.
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d)).await, 7);
        assert_eq!(ids(&reg).len(), 4);
        {
            let st = reg.read();
            let s = &st.services[&ServiceKey::new("shop", "echo")].service;
            assert_eq!(s.metadata["polarismesh.cn/tls-mode"], "strict");
            assert!(st
                .services
                .contains_key(&ServiceKey::new("shop", "echo-alias")));
        }
        assert_eq!(
            sync(&reg, &cfg("c1"), Some(&d)).await,
            0,
            "resync writes nothing"
        );
        // Deleted, then synced again: the service, its alias and instances go, then come back.
        assert_eq!(sync(&reg, &cfg("c1"), None).await, 6);
        assert!(reg.read().services.is_empty());
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d)).await, 6);
        // Heartbeats decide health of a TTL service: a healthy instance is not reset.
        let first = d.instances[0].clone();
        let mut hb = first.clone().validate("t").unwrap();
        hb.healthy = true;
        reg.submit(Command::RegisterInstances(vec![hb]))
            .await
            .unwrap();
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d)).await, 0);
        // The ready pod turns not ready: its two instances are isolated, nothing else written.
        let d2 = desired(|s| s.endpoints[0].conditions.as_mut().unwrap().ready = Some(false));
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d2)).await, 2);
        assert!(reg.read().services[&ServiceKey::new("shop", "echo")]
            .instances
            .values()
            .all(|i| i.isolate));
    }

    #[tokio::test]
    async fn only_what_this_cluster_owns_is_changed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let d = desired(|_| {});
        sync(&reg, &cfg("c1"), Some(&d)).await;
        // An SDK registers next to them; another cluster's controller too.
        let sdk = InstanceInput {
            namespace: Some("shop".into()),
            service: Some("echo".into()),
            host: Some("10.9.9.9".into()),
            port: Some(7000),
            ..Default::default()
        };
        let mut other = sdk.clone();
        other.host = Some("10.8.8.8".into());
        other.metadata = Some(
            [("source", "kubernetes"), ("clusterName", "c2")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        );
        reg.submit(Command::RegisterInstances(vec![
            sdk.validate("t").unwrap(),
            other.validate("t").unwrap(),
        ]))
        .await
        .unwrap();
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d)).await, 0);
        // A pod is gone from the slice: its instances go, nobody else's.
        let d2 = desired(|s| {
            s.endpoints.remove(1);
        });
        assert_eq!(sync(&reg, &cfg("c1"), Some(&d2)).await, 2);
        assert_eq!(
            ids(&reg),
            [
                "10.244.0.11:8080",
                "10.244.0.11:9090",
                "10.8.8.8:7000",
                "10.9.9.9:7000"
            ]
        );
        // The Service is deleted: what c1 wrote goes, the SDK's and c2's instances stay (and with
        // them the service and its alias).
        assert_eq!(sync(&reg, &cfg("c1"), None).await, 2);
        assert_eq!(ids(&reg), ["10.8.8.8:7000", "10.9.9.9:7000"]);
        assert!(reg
            .read()
            .services
            .contains_key(&ServiceKey::new("shop", "echo-alias")));
        // Another cluster's controller plans nothing for c1's instances.
        let c1_again = desired(|_| {});
        sync(&reg, &cfg("c1"), Some(&c1_again)).await;
        let p = plan(
            &cfg("c2"),
            &ServiceKey::new("shop", "echo"),
            None,
            &reg.read(),
            "t",
        )
        .unwrap();
        assert_eq!(
            p.deregister,
            vec![crate::model::instance_id("shop", "echo", "10.8.8.8", 7000)]
        );
    }

    #[tokio::test]
    async fn an_address_held_by_another_writer_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let d = desired(|_| {});
        let taken = d.instances[0].clone();
        let mut sdk = taken.clone();
        sdk.metadata = None;
        reg.submit(Command::CreateNamespaces(vec![NamespaceInput {
            name: Some("shop".into()),
            ..Default::default()
        }
        .validate("t")
        .unwrap()]))
            .await
            .unwrap();
        reg.submit(Command::RegisterInstances(vec![sdk.validate("t").unwrap()]))
            .await
            .unwrap();
        let p = plan(
            &cfg("c1"),
            &ServiceKey::new("shop", "echo"),
            Some(&d),
            &reg.read(),
            "t",
        )
        .unwrap();
        assert_eq!(p.foreign, vec![taken.id.unwrap()]);
        assert_eq!(p.register.len(), 3);
        // The service exists (created by the registration), not ours: labels merge in, no claim.
        let meta = p.update.unwrap().metadata.unwrap();
        assert_eq!(meta["polarismesh.cn/tls-mode"], "strict");
        assert!(!meta.contains_key(SOURCE_KEY));
    }
}
