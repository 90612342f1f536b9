//! What the injector adds to a pod, as a JSON patch built from typed objects (pure).
//!
//! Whether: the pod's label `polarismesh.cn/inject` (`enabled` / `disabled`) wins over its
//! namespace's, which wins over the injector's default. A pod already injected (annotation
//! [`STATUS_ANNOTATION`], or a container named [`ENVOY`]) is left as it is, so a replayed
//! admission does not inject twice.
//!
//! What: an init container writing Envoy's bootstrap (`polaris bootstrap --output`, node id
//! `sidecar~<ns>/<pod>~<pod ip>` from the downward API, the node metadata translation reads), the
//! Envoy container (uid 1337), and for mTLS the `polaris agent` container with a projected
//! ServiceAccount token for the CA's audience and the SDS socket shared with Envoy. Every path
//! that names a map key is escaped (RFC 6901: `~` → `~0`, `/` → `~1`), and maps or lists the pod
//! lacks are added whole, never appended to.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, ProjectedVolumeSource,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use serde_json::{json, Value};

/// Label (pod or namespace): `enabled` or `disabled`.
pub const INJECT_LABEL: &str = "polarismesh.cn/inject";
/// The port of an injected sidecar's inbound listener: callers reach the pod there (the controller
/// registers an injected pod's instance at it), so that the service's TLS mode applies.
pub const SIDECAR_INBOUND_PORT: u16 = 15006;

/// Annotation marking an injected pod.
pub const STATUS_ANNOTATION: &str = "sidecar.polarismesh.cn/status";
/// Annotation holding the CA's root (PEM) when the injector knows it; the agent reads it through a
/// downward API volume, so no ConfigMap has to be published into every namespace.
pub const ROOT_ANNOTATION: &str = "sidecar.polarismesh.cn/ca-root";
/// Pod annotation: the TLS mode the pod starts in (`none`, `permissive`, `strict`).
pub const TLS_MODE_ANNOTATION: &str = "polarismesh.cn/tls-mode";
/// Pod annotation: fetch virtual hosts on demand.
pub const ON_DEMAND_ANNOTATION: &str = "sidecar.polarismesh.cn/openOnDemand";
/// The Envoy container's name.
pub const ENVOY: &str = "envoy";
/// The agent container's name.
pub const AGENT: &str = "polaris-agent";
/// The bootstrap init container's name.
pub const BOOTSTRAP: &str = "polaris-bootstrap";

const ENVOY_UID: i64 = 1337;
const CONFIG_VOLUME: &str = "polaris-envoy";
const SDS_VOLUME: &str = "polaris-sds";
const TOKEN_VOLUME: &str = "polaris-token";
const ROOT_VOLUME: &str = "polaris-root";

/// The injector's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inject pods whose pod and namespace say nothing.
    pub default_enabled: bool,
    /// Give pods the agent and the mTLS bootstrap unless their annotation says `none`.
    pub default_mtls: bool,
    /// The `polaris` image (bootstrap, agent).
    pub polaris_image: String,
    /// The Envoy image.
    pub envoy_image: String,
    /// ADS address sidecars reach.
    pub xds_addr: String,
    /// The CA sidecars' agents reach (`https://host:port`).
    pub ca_addr: String,
    /// ConfigMap holding the CA's root (`root-cert.pem`), used when `root_pem` is not known.
    pub root_config_map: String,
    /// The CA's root (PEM), when the injector runs beside the CA: it goes into the pod as
    /// [`ROOT_ANNOTATION`].
    pub root_pem: Option<String>,
    /// Audience of the agents' tokens.
    pub token_audience: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_enabled: false,
            default_mtls: true,
            polaris_image: "polaris-mesh/polaris:latest".into(),
            envoy_image: "envoyproxy/envoy:v1.40-latest".into(),
            xds_addr: "polaris.polaris-system:15010".into(),
            ca_addr: "https://polaris.polaris-system:8443".into(),
            root_config_map: "polaris-root-ca".into(),
            root_pem: None,
            token_audience: "polaris-ca".into(),
        }
    }
}

/// RFC 6901 escaping of one path segment.
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Whether to inject: pod label, then namespace label, then the default.
pub fn wanted(cfg: &Config, pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> bool {
    let says = |v: Option<&String>| match v.map(String::as_str) {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    };
    says(
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECT_LABEL)),
    )
    .or_else(|| says(namespace_labels.get(INJECT_LABEL)))
    .unwrap_or(cfg.default_enabled)
}

/// Whether the pod already carries the sidecar.
pub fn injected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
        || pod
            .spec
            .as_ref()
            .is_some_and(|s| s.containers.iter().any(|c| c.name == ENVOY))
}

/// The service a pod belongs to: label `app`, else its workload's name (`generateName` without
/// the ReplicaSet's hash), else its own name.
pub fn service_of(pod: &Pod) -> String {
    if let Some(app) = pod.metadata.labels.as_ref().and_then(|l| l.get("app")) {
        return app.clone();
    }
    if let Some(g) = pod.metadata.generate_name.as_deref() {
        let g = g.trim_end_matches('-');
        // `<deployment>-<replicaset hash>`: the hash goes too.
        let hashed = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"));
        return match hashed {
            Some(h) => g.strip_suffix(&format!("-{h}")).unwrap_or(g).to_string(),
            None => g.to_string(),
        };
    }
    pod.metadata.name.clone().unwrap_or_default()
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }
}

/// The patch injecting `pod` (in `namespace`), or `None` when it is not to be injected.
pub fn patch(
    cfg: &Config,
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Option<Vec<Value>> {
    if !wanted(cfg, pod, namespace_labels) || injected(pod) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let tls = annotations
        .get(TLS_MODE_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| {
            if cfg.default_mtls {
                "permissive"
            } else {
                "none"
            }
            .into()
        });
    let mtls = tls != "none";
    let service = service_of(pod);
    let ports: Vec<String> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.container_port.to_string())
        .collect();
    let mut args: Vec<String> = vec![
        "bootstrap".into(),
        "--node-id".into(),
        "sidecar~$(POD_NAMESPACE)/$(POD_NAME)~$(POD_IP)".into(),
        "--xds-addr".into(),
        cfg.xds_addr.clone(),
        "--output".into(),
        "/etc/envoy/envoy.yaml".into(),
    ];
    let mut meta = vec![
        format!("sidecar.polarismesh.cn/serviceName={service}"),
        format!("sidecar.polarismesh.cn/serviceNamespace={namespace}"),
        format!("polarismesh.cn/tls-mode={tls}"),
        format!("polarismesh.cn/inboundPort={SIDECAR_INBOUND_PORT}"),
    ];
    if !ports.is_empty() {
        meta.push(format!(
            "sidecar.polarismesh.cn/bindPorts={}",
            ports.join(",")
        ));
    }
    if annotations.get(ON_DEMAND_ANNOTATION).map(String::as_str) == Some("true") {
        meta.push(format!("{ON_DEMAND_ANNOTATION}=true"));
    }
    for m in meta {
        args.push("--metadata".into());
        args.push(m);
    }
    if mtls {
        args.extend([
            "--tls".into(),
            "--sds-socket".into(),
            "/var/run/polaris/sds.sock".into(),
        ]);
    }
    let downward = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
    ];
    let init = Container {
        name: BOOTSTRAP.into(),
        image: Some(cfg.polaris_image.clone()),
        args: Some(args),
        env: Some(downward),
        volume_mounts: Some(vec![mount(CONFIG_VOLUME, "/etc/envoy")]),
        ..Default::default()
    };
    let mut envoy_mounts = vec![mount(CONFIG_VOLUME, "/etc/envoy")];
    if mtls {
        envoy_mounts.push(mount(SDS_VOLUME, "/var/run/polaris"));
    }
    let envoy = Container {
        name: ENVOY.into(),
        image: Some(cfg.envoy_image.clone()),
        args: Some(vec![
            "-c".into(),
            "/etc/envoy/envoy.yaml".into(),
            "--disable-hot-restart".into(),
        ]),
        security_context: Some(SecurityContext {
            run_as_user: Some(ENVOY_UID),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(envoy_mounts),
        ..Default::default()
    };
    let mut containers = vec![envoy];
    let mut volumes = vec![empty_dir(CONFIG_VOLUME)];
    if mtls {
        containers.push(Container {
            name: AGENT.into(),
            image: Some(cfg.polaris_image.clone()),
            args: Some(vec![
                "agent".into(),
                "--ca-addr".into(),
                cfg.ca_addr.clone(),
                "--ca-root".into(),
                "/etc/polaris/root/root-cert.pem".into(),
                "--token-file".into(),
                "/var/run/secrets/polaris/token".into(),
                "--sds-socket".into(),
                "/var/run/polaris/sds.sock".into(),
            ]),
            volume_mounts: Some(vec![
                mount(SDS_VOLUME, "/var/run/polaris"),
                mount(TOKEN_VOLUME, "/var/run/secrets/polaris"),
                mount(ROOT_VOLUME, "/etc/polaris/root"),
            ]),
            ..Default::default()
        });
        volumes.push(empty_dir(SDS_VOLUME));
        volumes.push(Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(cfg.token_audience.clone()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        volumes.push(match &cfg.root_pem {
            Some(_) => Volume {
                name: ROOT_VOLUME.into(),
                downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIVolumeSource {
                    items: Some(vec![k8s_openapi::api::core::v1::DownwardAPIVolumeFile {
                        path: "root-cert.pem".into(),
                        field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                            field_path: format!("metadata.annotations['{ROOT_ANNOTATION}']"),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None => Volume {
                name: ROOT_VOLUME.into(),
                config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                    name: cfg.root_config_map.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
    }
    let mut ops = Vec::new();
    // A list the pod may lack is added whole; otherwise each item is appended.
    let mut append = |path: &str, have: bool, items: Vec<Value>| {
        if have {
            for i in items {
                ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": i}));
            }
        } else {
            ops.push(json!({"op": "add", "path": path, "value": items}));
        }
    };
    append(
        "/spec/initContainers",
        spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()),
        vec![to(&init)],
    );
    append(
        "/spec/containers",
        true,
        containers.iter().map(to).collect(),
    );
    append(
        "/spec/volumes",
        spec.volumes.as_ref().is_some_and(|v| !v.is_empty()),
        volumes.iter().map(to).collect(),
    );
    if mtls
        && spec
            .service_account_name
            .as_deref()
            .unwrap_or("")
            .is_empty()
    {
        // A projected token needs the pod's ServiceAccount named (the API server refuses it
        // otherwise); `default` is what the ServiceAccount admission plugin would have named.
        ops.push(json!({"op": "add", "path": "/spec/serviceAccountName", "value": "default"}));
    }
    let mut marks = vec![(STATUS_ANNOTATION, "injected")];
    if let (true, Some(root)) = (mtls, &cfg.root_pem) {
        marks.push((ROOT_ANNOTATION, root.as_str()));
    }
    match &pod.metadata.annotations {
        Some(_) => {
            for (k, v) in marks {
                ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(k)), "value": v}));
            }
        }
        None => {
            let all: serde_json::Map<String, Value> = marks
                .into_iter()
                .map(|(k, v)| (k.into(), json!(v)))
                .collect();
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": all}));
        }
    }
    Some(ops)
}

/// A typed object as JSON (Kubernetes objects always serialise).
fn to<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    /// Applies a JSON patch of `add` operations the way the API server does (RFC 6902), failing
    /// where it would: a missing parent, an index past the end.
    fn apply(doc: &mut Value, ops: &[Value]) {
        for op in ops {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let segs: Vec<String> = path[1..]
                .split('/')
                .map(|s| s.replace("~1", "/").replace("~0", "~"))
                .collect();
            let (last, parents) = segs.split_last().unwrap();
            let mut at = &mut *doc;
            for s in parents {
                at = match at {
                    Value::Object(m) => m.get_mut(s).unwrap_or_else(|| panic!("no {s} in {path}")),
                    Value::Array(a) => &mut a[s.parse::<usize>().unwrap()],
                    _ => panic!("{path}"),
                };
            }
            match at {
                Value::Object(m) => {
                    m.insert(last.clone(), op["value"].clone());
                }
                Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                _ => panic!("cannot add at {path}"),
            }
        }
    }

    fn names(doc: &Value, list: &str) -> Vec<String> {
        doc["spec"][list]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_root_goes_into_the_pod_when_the_injector_knows_it() {
        let raw = json!({"metadata": {"name": "web", "annotations": {"a": "b"}, "labels": {"polarismesh.cn/inject": "enabled"}},
                         "spec": {"containers": [{"name": "web", "image": "web:1"}]}});
        let root = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n";
        let cfg = Config {
            root_pem: Some(root.into()),
            ..Config::default()
        };
        let vol = |doc: &Value| {
            doc["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == ROOT_VOLUME)
                .cloned()
                .unwrap()
        };
        let mut doc = raw.clone();
        apply(
            &mut doc,
            &patch(&cfg, &pod(raw.clone()), "shop", &BTreeMap::new()).unwrap(),
        );
        assert_eq!(doc["metadata"]["annotations"][ROOT_ANNOTATION], root);
        assert_eq!(doc["metadata"]["annotations"]["a"], "b");
        let v = vol(&doc);
        assert_eq!(
            v["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            format!("metadata.annotations['{ROOT_ANNOTATION}']")
        );
        assert_eq!(v["downwardAPI"]["items"][0]["path"], "root-cert.pem");
        // Without it, the ConfigMap of the pod's namespace.
        let mut doc = raw.clone();
        apply(
            &mut doc,
            &patch(&Config::default(), &pod(raw), "shop", &BTreeMap::new()).unwrap(),
        );
        assert!(doc["metadata"]["annotations"][ROOT_ANNOTATION].is_null());
        assert_eq!(vol(&doc)["configMap"]["name"], "polaris-root-ca");
    }

    #[test]
    fn a_bare_pod_gets_the_sidecar_the_agent_and_the_mark() {
        let raw = json!({"metadata": {"name": "web-7d9f-abcde", "generateName": "web-7d9f-",
                                      "labels": {"pod-template-hash": "7d9f", "polarismesh.cn/inject": "enabled"}},
                         "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}});
        let p = pod(raw.clone());
        let ops = patch(&Config::default(), &p, "shop", &BTreeMap::new()).unwrap();
        let mut doc = raw;
        apply(&mut doc, &ops);
        assert_eq!(names(&doc, "containers"), ["web", ENVOY, AGENT]);
        assert_eq!(names(&doc, "initContainers"), [BOOTSTRAP]);
        assert_eq!(
            doc["metadata"]["annotations"][STATUS_ANNOTATION],
            "injected"
        );
        let after: Pod = serde_json::from_value(doc.clone()).expect("still a pod");
        assert!(injected(&after));
        let args = doc["spec"]["initContainers"][0]["args"].to_string();
        for want in [
            "sidecar~$(POD_NAMESPACE)/$(POD_NAME)~$(POD_IP)",
            "sidecar.polarismesh.cn/serviceName=web",
            "sidecar.polarismesh.cn/serviceNamespace=shop",
            "sidecar.polarismesh.cn/bindPorts=8080",
            "--tls",
        ] {
            assert!(args.contains(want), "{want} in {args}");
        }
        let token = &doc["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == TOKEN_VOLUME)
            .unwrap()["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "polaris-ca");
        assert_eq!(
            doc["spec"]["serviceAccountName"], "default",
            "a projected token needs one"
        );
        // Injected once: a replayed admission changes nothing.
        assert_eq!(
            patch(&Config::default(), &after, "shop", &BTreeMap::new()),
            None
        );
    }

    #[test]
    fn existing_lists_and_maps_are_appended_to_with_escaped_keys() {
        let raw = json!({"metadata": {"name": "p", "labels": {"app": "pay"},
                                      "annotations": {"polarismesh.cn/tls-mode": "none", "a~b/c": "x"}},
                         "spec": {"initContainers": [{"name": "migrate", "image": "m:1"}],
                                  "containers": [{"name": "pay", "image": "pay:1"}],
                                  "volumes": [{"name": "data", "emptyDir": {}}]}});
        let p = pod(raw.clone());
        let ns = BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())]);
        let ops = patch(&Config::default(), &p, "shop", &ns).unwrap();
        assert!(ops
            .iter()
            .any(|o| o["path"] == "/metadata/annotations/sidecar.polarismesh.cn~1status"));
        let mut doc = raw;
        apply(&mut doc, &ops);
        assert_eq!(names(&doc, "initContainers"), ["migrate", BOOTSTRAP]);
        // tls-mode none: Envoy without the agent.
        assert_eq!(names(&doc, "containers"), ["pay", ENVOY]);
        assert_eq!(doc["metadata"]["annotations"]["a~b/c"], "x");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace_label_over_the_default() {
        let on = BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())]);
        let off = BTreeMap::from([(INJECT_LABEL.to_string(), "disabled".to_string())]);
        let none = BTreeMap::new();
        let p = |label: Option<&str>| {
            let mut v = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
            if let Some(l) = label {
                v["metadata"]["labels"] = json!({INJECT_LABEL: l});
            }
            pod(v)
        };
        let off_default = Config::default();
        let on_default = Config {
            default_enabled: true,
            ..Config::default()
        };
        assert!(!wanted(&off_default, &p(None), &none));
        assert!(wanted(&on_default, &p(None), &none));
        assert!(wanted(&off_default, &p(None), &on));
        assert!(!wanted(&on_default, &p(None), &off));
        assert!(wanted(&off_default, &p(Some("enabled")), &off));
        assert!(!wanted(&on_default, &p(Some("disabled")), &on));
    }
}
