//! The controller's loop: five watches (Namespaces, Services, EndpointSlices, Pods, Nodes) kept in
//! reflector stores, the namespaces they touch marked dirty, and the Services of dirty namespaces
//! reconciled after a short debounce; everything is reconciled after each watch's (re)list and
//! every resync period, and the registry is swept of what this cluster owns but no Service stands
//! for (a Service deleted while the controller was down).
//!
//! Watches recover on their own: kube's watcher relists after 410 Gone and reconnects after a
//! dropped connection with backoff, and the stores are replaced atomically on each relist, so an
//! apiserver restart loses and duplicates nothing; the reconcile only ever writes differences.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use tokio::sync::{mpsc, watch};

use super::target::{SyncItem, Target};
use super::translate::{self, slice_service, synced, translate};
use crate::metrics::Metrics;
use crate::model::ServiceKey;

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// What the translation needs.
    pub translate: translate::Config,
    /// Everything is reconciled this often, whatever the watches say.
    pub resync: Duration,
    /// Changes are gathered this long before a reconcile.
    pub debounce: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            translate: translate::Config {
                cluster_name: "default".into(),
                mode: translate::SyncMode::All,
            },
            resync: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
        }
    }
}

/// What ended the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A watch's store was dropped before its first list completed.
    #[error("a watch ended before its first list")]
    WatchEnded,
}

/// What a watch event makes dirty.
#[derive(Debug, Clone)]
enum Dirty {
    /// One Service (its record or its EndpointSlices changed).
    Service(String, String),
    /// The Services of one namespace (a namespace or a pod changed).
    Namespace(String),
    /// Everything.
    All,
}

/// What a pass covers, short of everything.
#[derive(Debug, Default)]
struct Scope {
    namespaces: BTreeSet<String>,
    services: BTreeSet<(String, String)>,
}

impl Scope {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.services.is_empty()
    }

    fn covers(&self, ns: &str, svc: &str) -> bool {
        self.namespaces.contains(ns) || self.services.contains(&(ns.to_string(), svc.to_string()))
    }
}

struct Stores {
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    nodes: Store<Node>,
}

/// Starts one watch into a store; its events mark what they touch dirty.
fn watch_into<K>(
    api: Api<K>,
    tx: mpsc::UnboundedSender<Dirty>,
    dirty: fn(&K) -> Dirty,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let (reader, writer) = reflector::store::<K>();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let d = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => dirty(&o),
                // A (re)list replaced the store: anything may have changed.
                Ok(watcher::Event::InitDone) => Dirty::All,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying");
                    continue;
                }
            };
            if tx.send(d).is_err() {
                return;
            }
        }
    });
    (reader, task)
}

fn ns_of<K: Resource>(o: &K) -> Dirty {
    Dirty::Namespace(o.meta().namespace.clone().unwrap_or_default())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The controller's name in `/readyz`.
pub const COMPONENT: &str = "kubernetes-controller";

/// Runs the controller until `stop` turns true; ready (`/readyz`) once its watches have listed and
/// its first pass has run.
pub async fn run(
    client: Client,
    target: Arc<dyn Target>,
    cfg: Config,
    metrics: Arc<Metrics>,
    ready: Arc<crate::ready::Readiness>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    ready.not_ready(COMPONENT, "watches have not listed yet");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (namespaces, t1) = watch_into(Api::<Namespace>::all(client.clone()), tx.clone(), |n| {
        Dirty::Namespace(n.metadata.name.clone().unwrap_or_default())
    });
    let (services, t2) = watch_into(Api::<Service>::all(client.clone()), tx.clone(), |s| {
        Dirty::Service(
            s.metadata.namespace.clone().unwrap_or_default(),
            s.metadata.name.clone().unwrap_or_default(),
        )
    });
    let slices_api = Api::<EndpointSlice>::all(client.clone());
    let (slices, t3) = match slices_api
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            // Kubernetes before 1.21 serves no discovery.k8s.io/v1: Services still sync (their
            // labels, so TLS modes), without instances.
            tracing::error!("the Kubernetes API serves no discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21 or later is needed); Services sync without instances");
            let (reader, mut writer) = reflector::store::<EndpointSlice>();
            writer.apply_watcher_event(&watcher::Event::Init);
            writer.apply_watcher_event(&watcher::Event::InitDone);
            (
                reader,
                tokio::spawn(async move {
                    // The writer lives as long as the controller: its store stays ready and empty.
                    std::future::pending::<()>().await;
                    drop(writer);
                }),
            )
        }
        _ => watch_into(slices_api, tx.clone(), |s| {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            match slice_service(s) {
                Some(svc) => Dirty::Service(ns, svc.to_string()),
                None => Dirty::Namespace(ns),
            }
        }),
    };
    let (pods, t4) = watch_into(Api::<Pod>::all(client.clone()), tx.clone(), ns_of);
    let (nodes, t5) = watch_into(Api::<Node>::all(client), tx, |_| Dirty::All);
    let tasks = [t1, t2, t3, t4, t5];
    let stores = Stores {
        namespaces,
        services,
        slices,
        pods,
        nodes,
    };
    let listed = async {
        stores.namespaces.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
        stores.pods.wait_until_ready().await?;
        stores.nodes.wait_until_ready().await
    };
    tokio::select! {
        r = listed => r.map_err(|_| Error::WatchEnded)?,
        _ = stopped(&mut stop) => {
            tasks.iter().for_each(|t| t.abort());
            return Ok(());
        }
    }
    tracing::info!(cluster = %cfg.translate.cluster_name, "controller synced its watches; reconciling");
    // Which registry service each synced Service was written to (annotations may rename it).
    let mut written: HashMap<(String, String), ServiceKey> = HashMap::new();
    let mut all = true;
    let mut dirty = Scope::default();
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    loop {
        if all || !dirty.is_empty() {
            let scope = if all { None } else { Some(&dirty) };
            reconcile(
                &cfg,
                target.as_ref(),
                &stores,
                scope,
                &mut written,
                &metrics,
            )
            .await;
            ready.ready(COMPONENT);
            all = false;
            dirty = Scope::default();
        }
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = resync.tick() => all = true,
            d = rx.recv() => {
                let Some(d) = d else { break };
                let mut note = |d: Dirty| match d {
                    Dirty::All => all = true,
                    Dirty::Namespace(n) => { dirty.namespaces.insert(n); }
                    Dirty::Service(n, s) => { dirty.services.insert((n, s)); }
                };
                note(d);
                // Gather what else arrives within the debounce.
                let until = tokio::time::Instant::now() + cfg.debounce;
                while let Ok(Some(d)) = tokio::time::timeout_at(until, rx.recv()).await {
                    note(d);
                }
            }
        }
    }
    tasks.iter().for_each(|t| t.abort());
    Ok(())
}

/// One pass over the Services of `scope` (every namespace: `None`, which also sweeps what this
/// cluster owns in the registry but no Service stands for).
async fn reconcile(
    cfg: &Config,
    target: &dyn Target,
    stores: &Stores,
    scope: Option<&Scope>,
    written: &mut HashMap<(String, String), ServiceKey>,
    metrics: &Metrics,
) {
    metrics.controller_passes.inc();
    let in_scope = |ns: &str, svc: &str| scope.is_none_or(|s| s.covers(ns, svc));
    let mut slices_of: BTreeMap<(String, String), Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for s in stores.slices.state() {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let Some(svc) = slice_service(&s) else {
            continue;
        };
        if in_scope(&ns, svc) {
            slices_of
                .entry((ns, svc.to_string()))
                .or_default()
                .push(s.clone());
        }
    }
    // Desired state of every synced Service in scope.
    let mut desired = Vec::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for svc in stores.services.state() {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        if !in_scope(&ns, &name) {
            continue;
        }
        let namespace = stores
            .namespaces
            .get(&ObjectRef::new(&ns))
            .map(|n| (*n).clone())
            .unwrap_or_else(|| Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
        if !synced(&cfg.translate, &namespace, &svc) {
            continue;
        }
        let k8s = (ns.clone(), name.clone());
        seen.insert(k8s.clone());
        let slices = slices_of.remove(&k8s).unwrap_or_default();
        let pods: HashMap<String, Arc<Pod>> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .filter_map(|p| {
                let pod = stores.pods.get(&ObjectRef::new(&p).within(&ns))?;
                Some((p, pod))
            })
            .collect();
        let nodes: HashMap<String, Arc<Node>> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter_map(|e| e.node_name.clone())
            .filter_map(|n| Some((n.clone(), stores.nodes.get(&ObjectRef::new(&n))?)))
            .collect();
        match translate(
            &cfg.translate,
            &svc,
            slices.iter().map(|s| s.as_ref()),
            |p| pods.get(p).map(|p| p.as_ref()),
            |n| nodes.get(n).map(|n| n.as_ref()),
        ) {
            Ok(d) => desired.push((k8s, d)),
            Err(e) => tracing::warn!(error = %e, "Service left as the registry has it"),
        }
    }
    // Services gone, or no longer synced, in scope.
    let mut gone: Vec<ServiceKey> = written
        .iter()
        .filter(|(k, _)| in_scope(&k.0, &k.1) && !seen.contains(*k))
        .map(|(_, v)| v.clone())
        .collect();
    written.retain(|k, _| !in_scope(&k.0, &k.1) || seen.contains(k));
    for (k8s, d) in &desired {
        let key = ServiceKey::new(&d.namespace, &d.name);
        if let Some(old) = written.insert(k8s.clone(), key.clone()) {
            if old != key {
                gone.push(old);
            }
        }
    }
    if scope.is_none() {
        // What this cluster owns in the registry that no Service stands for now.
        let wanted: BTreeSet<&ServiceKey> = written.values().collect();
        match target.owned(&cfg.translate).await {
            Ok(owned) => gone.extend(owned.into_iter().filter(|k| !wanted.contains(k))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list what this cluster owns; the next pass sweeps")
            }
        }
    }
    let items: Vec<SyncItem> = desired
        .into_iter()
        .map(|(_, d)| SyncItem {
            service: ServiceKey::new(&d.namespace, &d.name),
            desired: Some(d),
        })
        .chain(gone.into_iter().map(|k| SyncItem {
            service: k,
            desired: None,
        }))
        .collect();
    match target.sync(&cfg.translate, items).await {
        Ok(out) => {
            for (key, id) in &out.foreign {
                tracing::warn!(service = %key, instance = %id, "address held by another writer; left alone");
            }
            for (key, why) in &out.failed {
                tracing::warn!(service = %key, error = %why, "cannot sync this Service; the next pass retries");
            }
        }
        Err(e) => tracing::warn!(error = %e, "sync failed; the next pass retries"),
    }
}

/// `polaris controller`: the controller in its own process, writing to the control plane at
/// `server` over REST (`token`: an admin token, when its authentication is on) until `shutdown`.
/// The control plane is asked first, so a wrong address or token fails at once.
pub async fn standalone(
    server: String,
    token: Option<String>,
    roots: Option<Vec<u8>>,
    kube: Client,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let target = Arc::new(
        super::target::Remote::new(&server, token, roots.as_deref())
            .context("the control plane's CA certificates")?,
    );
    let owned = target
        .owned(&cfg.translate)
        .await
        .context("reaching the control plane")?;
    tracing::info!(%server, cluster = %cfg.translate.cluster_name, owned = owned.len(), "polaris controller started");
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    run(
        kube,
        target,
        cfg,
        Arc::new(Metrics::default()),
        Arc::new(crate::ready::Readiness::default()),
        rx,
    )
    .await?;
    tracing::info!("polaris controller stopped");
    Ok(())
}
