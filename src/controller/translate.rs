//! Kubernetes objects → the registry state they stand for. Pure: the controller feeds it what its
//! watches hold and applies the difference (see `reconcile`).
//!
//! One service per Kubernetes Service (same namespace and name unless overridden by annotation),
//! its labels as service metadata (so `polarismesh.cn/tls-mode` on a Service is the service's TLS
//! mode). One instance per EndpointSlice endpoint address × port: not ready → isolated,
//! terminating → absent; the pod's labels as metadata and its `version` label as the version;
//! zone from the endpoint, region (and zone when the endpoint has none) from its node's topology
//! labels. Annotations use polaris-controller's names. Everything carries the ownership keys
//! `source=kubernetes` and `clusterName=<name>`: only what this cluster's controller wrote is
//! ever changed or removed by it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{
    instance_id, HealthCheckInput, HeartbeatInput, InstanceInput, Location, MAX_WEIGHT, TTL_RANGE,
};

/// Metadata key naming who wrote a record.
pub const SOURCE_KEY: &str = "source";
/// [`SOURCE_KEY`]'s value for records synced from Kubernetes.
pub const SOURCE: &str = "kubernetes";
/// Metadata key naming the cluster whose controller wrote a record.
pub const CLUSTER_KEY: &str = "clusterName";

/// Instance metadata: the app's own port, behind the sidecar's inbound port.
pub const APP_PORT_KEY: &str = "polarismesh.cn/appPort";
/// Service or namespace annotation: `"true"` syncs, `"false"` does not (the Service's wins).
pub const SYNC_ANNOTATION: &str = "polarismesh.cn/sync";
/// Service annotation: instance weight (default 100).
pub const WEIGHT_ANNOTATION: &str = "polarismesh.cn/weight";
/// Service annotation: heartbeat TTL in seconds (1..=60); instances then start unhealthy and are
/// healthy while their workload sends heartbeats.
pub const TTL_ANNOTATION: &str = "polarismesh.cn/ttl";
/// Service annotation: a JSON object of extra instance metadata.
pub const METADATA_ANNOTATION: &str = "polarismesh.cn/metadata";
/// Service annotations: an alias of the service (name, and namespace, default the service's).
pub const ALIAS_SERVICE_ANNOTATION: &str = "polarismesh.cn/aliasService";
/// See [`ALIAS_SERVICE_ANNOTATION`].
pub const ALIAS_NAMESPACE_ANNOTATION: &str = "polarismesh.cn/aliasNamespace";
/// Service annotations (polaris-controller's spelling): register under another name / namespace.
pub const OVERRIDE_SERVICE_ANNOTATION: &str = "polarismesh.cn/overideService";
/// See [`OVERRIDE_SERVICE_ANNOTATION`].
pub const OVERRIDE_NAMESPACE_ANNOTATION: &str = "polarismesh.cn/overideNamespace";

/// Namespaces never synced.
pub const IGNORED_NAMESPACES: [&str; 5] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "istio-system",
    "polaris-system",
];

const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which Services are synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every Service of every namespace but the ignored ones, unless annotated `"false"`.
    #[default]
    All,
    /// Only Services annotated `"true"`, or in namespaces annotated `"true"`.
    Demand,
}

/// What the translation needs to know of the controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// This cluster's name, in every record's [`CLUSTER_KEY`].
    pub cluster_name: String,
    /// Which Services are synced.
    pub mode: SyncMode,
}

/// A Service as the registry should hold it (also the body a standalone controller sends).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredService {
    /// Registry namespace.
    pub namespace: String,
    /// Registry service name.
    pub name: String,
    /// The Service's labels and the ownership keys.
    pub metadata: BTreeMap<String, String>,
    /// An alias (namespace, name) to keep pointing at the service.
    pub alias: Option<(String, String)>,
    /// Its instances, ids set, sorted by id.
    pub instances: Vec<InstanceInput>,
}

/// A Service whose annotations cannot be translated: it is left as the registry has it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{namespace}/{service}: annotation {key}: {why}")]
pub struct TranslateError {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes Service.
    pub service: String,
    /// The annotation.
    pub key: &'static str,
    /// What is wrong with it.
    pub why: String,
}

fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether `svc` (in `ns`) is synced under `cfg`.
pub fn synced(cfg: &Config, ns: &Namespace, svc: &Service) -> bool {
    let ns_name = ns.metadata.name.as_deref().unwrap_or_default();
    if IGNORED_NAMESPACES.contains(&ns_name) {
        return false;
    }
    match annotation(&svc.metadata, SYNC_ANNOTATION)
        .or_else(|| annotation(&ns.metadata, SYNC_ANNOTATION))
    {
        Some(v) => v == "true",
        None => cfg.mode == SyncMode::All,
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
}

/// The registry state of `svc`, from its EndpointSlices, the pods they point at and their nodes
/// (looked up by name in the Service's namespace).
pub fn translate<'a>(
    cfg: &Config,
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pod: impl Fn(&str) -> Option<&'a Pod>,
    node: impl Fn(&str) -> Option<&'a Node>,
) -> Result<DesiredService, TranslateError> {
    let k8s_ns = svc.metadata.namespace.clone().unwrap_or_default();
    let k8s_name = svc.metadata.name.clone().unwrap_or_default();
    let err = |key: &'static str, why: String| TranslateError {
        namespace: k8s_ns.clone(),
        service: k8s_name.clone(),
        key,
        why,
    };
    let get = |key| annotation(&svc.metadata, key);
    let namespace = get(OVERRIDE_NAMESPACE_ANNOTATION)
        .unwrap_or(&k8s_ns)
        .to_string();
    let name = get(OVERRIDE_SERVICE_ANNOTATION)
        .unwrap_or(&k8s_name)
        .to_string();
    let weight: i64 = match get(WEIGHT_ANNOTATION) {
        None => 100,
        Some(w) => w
            .trim()
            .parse()
            .ok()
            .filter(|w| (0..=MAX_WEIGHT).contains(w))
            .ok_or_else(|| {
                err(
                    WEIGHT_ANNOTATION,
                    format!("{w:?} is not an integer in 0..={MAX_WEIGHT}"),
                )
            })?,
    };
    let ttl: Option<i64> = match get(TTL_ANNOTATION) {
        None => None,
        Some(t) => Some(
            t.trim()
                .parse()
                .ok()
                .filter(|t| TTL_RANGE.contains(t))
                .ok_or_else(|| {
                    err(
                        TTL_ANNOTATION,
                        format!("{t:?} is not an integer in {TTL_RANGE:?}"),
                    )
                })?,
        ),
    };
    let extra: BTreeMap<String, String> = match get(METADATA_ANNOTATION) {
        None => BTreeMap::new(),
        Some(m) => serde_json::from_str(m).map_err(|e| {
            err(
                METADATA_ANNOTATION,
                format!("not a JSON object of strings: {e}"),
            )
        })?,
    };
    let ownership = |m: &mut BTreeMap<String, String>| {
        m.insert(SOURCE_KEY.into(), SOURCE.into());
        m.insert(CLUSTER_KEY.into(), cfg.cluster_name.clone());
    };
    let mut metadata: BTreeMap<String, String> = svc
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    ownership(&mut metadata);
    let alias = get(ALIAS_SERVICE_ANNOTATION)
        .filter(|a| !a.is_empty())
        .map(|a| {
            (
                get(ALIAS_NAMESPACE_ANNOTATION)
                    .unwrap_or(&namespace)
                    .to_string(),
                a.to_string(),
            )
        });

    let mut instances: BTreeMap<String, InstanceInput> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            if cond.and_then(|c| c.terminating) == Some(true) {
                continue;
            }
            // The API: an unknown readiness is to be read as ready.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
                .and_then(&pod);
            let node = ep.node_name.as_deref().and_then(&node);
            let node_label = |k: &str| {
                node.and_then(|n| n.metadata.labels.as_ref()?.get(k).cloned())
                    .unwrap_or_default()
            };
            let location = Location {
                region: node_label(REGION_LABEL),
                zone: ep.zone.clone().unwrap_or_else(|| node_label(ZONE_LABEL)),
                campus: String::new(),
            };
            let labels: BTreeMap<String, String> = pod
                .and_then(|p| p.metadata.labels.clone())
                .unwrap_or_default()
                .into_iter()
                .collect();
            let version = labels.get("version").cloned();
            // An injected pod is reached through its sidecar's inbound listener, which forwards
            // to the app's ports: one instance at that port, the app's port kept in metadata.
            let sidecar = pod.is_some_and(crate::inject::patch::injected);
            let mut meta = labels;
            meta.extend(extra.clone());
            ownership(&mut meta);
            for port in slice.ports.iter().flatten() {
                let Some(app_port) = port.port else { continue };
                let mut meta = meta.clone();
                let p = if sidecar {
                    meta.insert(APP_PORT_KEY.into(), app_port.to_string());
                    i32::from(crate::inject::patch::SIDECAR_INBOUND_PORT)
                } else {
                    app_port
                };
                let protocol = port.app_protocol.clone().unwrap_or_else(|| {
                    format!(
                        "{}/{}",
                        port.name.as_deref().unwrap_or_default(),
                        port.protocol.as_deref().unwrap_or("TCP")
                    )
                });
                for host in &ep.addresses {
                    let id = instance_id(&namespace, &name, host, p as u16);
                    let inst = InstanceInput {
                        id: Some(id.clone()),
                        namespace: Some(namespace.clone()),
                        service: Some(name.clone()),
                        host: Some(host.clone()),
                        port: Some(i64::from(p)),
                        protocol: Some(protocol.clone()),
                        version: version.clone(),
                        weight: Some(weight),
                        isolate: Some(!ready),
                        healthy: Some(ttl.is_none()),
                        enable_health_check: Some(ttl.is_some()),
                        health_check: ttl.map(|t| HealthCheckInput {
                            kind: Some(serde_json::json!("HEARTBEAT")),
                            heartbeat: Some(HeartbeatInput { ttl: Some(t) }),
                        }),
                        metadata: Some(meta.clone()),
                        location: Some(location.clone()),
                        ..Default::default()
                    };
                    // An address in two slices (while it moves): the ready one counts.
                    match instances.get(&id) {
                        Some(prev) if prev.isolate == Some(false) => {}
                        _ => {
                            instances.insert(id, inst);
                        }
                    }
                }
            }
        }
    }
    Ok(DesiredService {
        namespace,
        name,
        metadata,
        alias,
        instances: instances.into_values().collect(),
    })
}

/// Whether a record's metadata says this cluster's controller wrote it.
pub fn owned(cfg: &Config, metadata: &BTreeMap<String, String>) -> bool {
    metadata.get(SOURCE_KEY).map(String::as_str) == Some(SOURCE)
        && metadata.get(CLUSTER_KEY) == Some(&cfg.cluster_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/kube/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn cfg(mode: SyncMode) -> Config {
        Config {
            cluster_name: "c1".into(),
            mode,
        }
    }

    struct World {
        ns: Namespace,
        svc: Service,
        slice: EndpointSlice,
        pods: Vec<Pod>,
        node: Node,
    }

    fn world() -> World {
        let pods: k8s_openapi::List<Pod> = recorded("pods.json");
        World {
            ns: recorded("namespace.json"),
            svc: recorded("service.json"),
            slice: recorded("endpointslice.json"),
            pods: pods.items,
            node: recorded("node.json"),
        }
    }

    fn run(w: &World) -> Result<DesiredService, TranslateError> {
        translate(
            &cfg(SyncMode::All),
            &w.svc,
            [&w.slice],
            |name| {
                w.pods
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(name))
            },
            |name| (w.node.metadata.name.as_deref() == Some(name)).then_some(&w.node),
        )
    }

    #[test]
    fn a_recorded_service_becomes_its_service_and_instances() {
        let w = world();
        assert_eq!(slice_service(&w.slice), Some("echo"));
        let d = run(&w).unwrap();
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("shop", "echo"));
        assert_eq!(d.metadata["polarismesh.cn/tls-mode"], "strict");
        assert_eq!(d.metadata[SOURCE_KEY], SOURCE);
        assert_eq!(d.metadata[CLUSTER_KEY], "c1");
        assert_eq!(d.alias, Some(("shop".into(), "echo-alias".into())));
        // Two live endpoints × two ports; the terminating one is gone.
        let got: Vec<(String, i64, bool, String)> = d
            .instances
            .iter()
            .map(|i| {
                (
                    i.host.clone().unwrap(),
                    i.port.unwrap(),
                    i.isolate.unwrap(),
                    i.protocol.clone().unwrap(),
                )
            })
            .collect();
        let mut want = vec![
            (
                "10.244.0.11".to_string(),
                8080,
                false,
                "http/TCP".to_string(),
            ),
            ("10.244.0.11".to_string(), 9090, false, "grpc".to_string()),
            (
                "10.244.0.12".to_string(),
                8080,
                true,
                "http/TCP".to_string(),
            ),
            ("10.244.0.12".to_string(), 9090, true, "grpc".to_string()),
        ];
        let mut got = got;
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let v1 = d
            .instances
            .iter()
            .find(|i| i.host.as_deref() == Some("10.244.0.11"))
            .unwrap();
        assert_eq!(v1.version.as_deref(), Some("v1"));
        assert_eq!(v1.weight, Some(50));
        let m = v1.metadata.as_ref().unwrap();
        assert_eq!(m["tier"], "backend");
        assert_eq!(m["team"], "payments", "the metadata annotation");
        assert!(owned(&cfg(SyncMode::All), m));
        let loc = v1.location.as_ref().unwrap();
        assert_eq!((loc.region.as_str(), loc.zone.as_str()), ("r1", "z1"));
        // TTL: heartbeats decide health.
        assert_eq!(v1.enable_health_check, Some(true));
        assert_eq!(v1.healthy, Some(false));
        // Every instance validates as the registry would take it.
        for i in &d.instances {
            i.clone().validate("t").unwrap();
        }
        // Same input, same output (the reconcile relies on it to write nothing on a resync).
        assert_eq!(run(&w).unwrap(), d);
    }

    #[test]
    fn an_injected_pod_is_reached_at_its_sidecars_inbound_port() {
        let mut w = world();
        let ready_pod = w
            .slice
            .endpoints
            .iter()
            .find(|e| e.addresses == ["10.244.0.11"])
            .and_then(|e| e.target_ref.as_ref()?.name.clone())
            .unwrap();
        let p = w
            .pods
            .iter_mut()
            .find(|p| p.metadata.name.as_deref() == Some(ready_pod.as_str()))
            .unwrap();
        p.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                crate::inject::patch::STATUS_ANNOTATION.into(),
                "injected".into(),
            );
        let d = run(&w).unwrap();
        let of = |host: &str| -> Vec<(i64, Option<String>)> {
            let mut v: Vec<_> = d
                .instances
                .iter()
                .filter(|i| i.host.as_deref() == Some(host))
                .map(|i| {
                    (
                        i.port.unwrap(),
                        i.metadata.as_ref().unwrap().get(APP_PORT_KEY).cloned(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        // One instance at the inbound port, whatever the Service's ports; the app's port kept.
        assert_eq!(of("10.244.0.11"), [(15006, Some("8080".into()))]);
        // A pod without a sidecar is reached at its own ports.
        assert_eq!(of("10.244.0.12"), [(8080, None), (9090, None)]);
    }

    #[test]
    fn bad_annotations_name_the_annotation() {
        let mut w = world();
        let a = w.svc.metadata.annotations.as_mut().unwrap();
        a.insert(WEIGHT_ANNOTATION.into(), "heavy".into());
        assert_eq!(run(&w).unwrap_err().key, WEIGHT_ANNOTATION);
        let a = w.svc.metadata.annotations.as_mut().unwrap();
        a.insert(WEIGHT_ANNOTATION.into(), "10".into());
        a.insert(TTL_ANNOTATION.into(), "0".into());
        assert_eq!(run(&w).unwrap_err().key, TTL_ANNOTATION);
        let a = w.svc.metadata.annotations.as_mut().unwrap();
        a.remove(TTL_ANNOTATION);
        a.insert(METADATA_ANNOTATION.into(), "[1]".into());
        let e = run(&w).unwrap_err();
        assert_eq!(e.key, METADATA_ANNOTATION);
        assert!(
            e.to_string()
                .starts_with("shop/echo: annotation polarismesh.cn/metadata"),
            "{e}"
        );
    }

    #[test]
    fn sync_modes_and_annotations_decide_what_is_synced() {
        let w = world();
        let mut svc = w.svc.clone();
        let mut ns = w.ns.clone();
        // The recorded namespace says "true".
        assert!(synced(&cfg(SyncMode::Demand), &ns, &svc));
        ns.metadata.annotations = None;
        assert!(synced(&cfg(SyncMode::All), &ns, &svc));
        assert!(!synced(&cfg(SyncMode::Demand), &ns, &svc));
        svc.metadata
            .annotations
            .get_or_insert_default()
            .insert(SYNC_ANNOTATION.into(), "false".into());
        assert!(
            !synced(&cfg(SyncMode::All), &ns, &svc),
            "the Service's annotation wins"
        );
        svc.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SYNC_ANNOTATION.into(), "true".into());
        assert!(synced(&cfg(SyncMode::Demand), &ns, &svc));
        ns.metadata.name = Some("kube-system".into());
        assert!(
            !synced(&cfg(SyncMode::All), &ns, &svc),
            "system namespaces never"
        );
    }

    #[test]
    fn overrides_and_other_clusters() {
        let mut w = world();
        let a = w.svc.metadata.annotations.as_mut().unwrap();
        a.insert(OVERRIDE_SERVICE_ANNOTATION.into(), "payments".into());
        a.insert(OVERRIDE_NAMESPACE_ANNOTATION.into(), "prod".into());
        let d = run(&w).unwrap();
        assert_eq!(
            (d.namespace.as_str(), d.name.as_str()),
            ("prod", "payments")
        );
        assert!(d.instances.iter().all(|i| i.id.as_deref()
            == Some(
                instance_id(
                    "prod",
                    "payments",
                    i.host.as_deref().unwrap(),
                    i.port.unwrap() as u16
                )
                .as_str()
            )));
        let other = Config {
            cluster_name: "c2".into(),
            mode: SyncMode::All,
        };
        assert!(!owned(&other, d.instances[0].metadata.as_ref().unwrap()));
        // An instance without ownership keys (an SDK's) is nobody's.
        assert!(!owned(&cfg(SyncMode::All), &BTreeMap::new()));
    }
}
