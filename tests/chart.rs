//! The Helm chart (`charts/polaris-mesh`), rendered as `helm template` does by `e2e/chart-render`
//! (Go text/template + sprig from Debian), with default and non-default values. What it renders is
//! checked against the binary (the configuration it ships passes `polaris server --check-config`;
//! the CA Secret it generates is material the CA starts with) and applied with
//! `kubectl apply --dry-run=server` to the real kube-apiserver, so the API validates every object.
//! `scripts/test.sh` builds the renderer and unpacks kubectl (`e2e/chart.sh build`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::kube::TestKube;
use serde_yaml::Value;

fn tool(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run ./scripts/test.sh (it runs e2e/chart.sh build)")
    }))
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/polaris-mesh")
}

/// Renders the chart with `values` (YAML) over its defaults: the manifests, or the renderer's error.
fn render(dir: &Path, values: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(tool("POLARIS_TEST_CHART_RENDER"));
    if let Some(v) = values {
        let f = dir.join(format!("values-{}.yaml", rand_suffix()));
        std::fs::write(&f, v).unwrap();
        cmd.arg("-f").arg(f);
    }
    let out = cmd.arg(chart_dir()).output().expect("running chart-render");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn docs(manifests: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifests)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

/// The server's configuration file the chart ships, parsed.
fn config(docs: &[Value]) -> (String, Value) {
    let text = find(docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let v = serde_yaml::from_str(&text).unwrap();
    (text, v)
}

/// `polaris server --config <the chart's file> --check-config`.
fn check_config(dir: &Path, text: &str) {
    let f = dir.join(format!("config-{}.yaml", rand_suffix()));
    std::fs::write(&f, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_polaris"))
        .args(["server", "--check-config", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the chart's configuration is refused by the server: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn container(docs: &[Value]) -> &Value {
    &find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn port_of(addr: &Value) -> u64 {
    addr.as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Ports of the container, the Service and the configuration agree, by name.
fn ports_agree(docs: &[Value], cfg: &Value) {
    let named = |list: &Value, field: &str| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = list
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().into(),
                    p[field].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let c = named(&container(docs)["ports"], "containerPort");
    let s = named(&find(docs, "Service")["spec"]["ports"], "port");
    assert_eq!(c, s, "container and Service ports");
    let want = |name: &str, key: &str| {
        if !cfg[key].is_null() {
            assert!(
                c.contains(&(name.to_string(), port_of(&cfg[key]))),
                "{key} {:?} not a container port {c:?}",
                cfg[key]
            );
        }
    };
    want("http", "httpAddr");
    want("grpc-xds", "xdsAddr");
    want("grpc-client", "grpcAddr");
    want("https-ca", "caAddr");
    want("https-webhook", "webhookAddr");
    want("grpc-rls", "rlsAddr");
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(tool("POLARIS_TEST_KUBECTL"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The manifests, validated and admitted by the real apiserver without being stored.
fn dry_run(dir: &Path, manifests: &str) {
    let kube = TestKube::from_env();
    let kc = kube.kubeconfig(dir);
    let (ok, out) = kubectl(&kc, &["create", "namespace", "polaris-system"], None);
    assert!(ok || out.contains("AlreadyExists"), "{out}");
    let (ok, out) = kubectl(
        &kc,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(manifests),
    );
    assert!(ok, "the apiserver refused the chart: {out}");
    for d in docs(manifests) {
        let kind = d["kind"].as_str().unwrap().to_lowercase();
        let name = d["metadata"]["name"].as_str().unwrap();
        assert!(
            out.lines().any(|l| l.starts_with(&kind)
                && l.contains(&format!("/{name} "))
                && l.ends_with("(server dry run)")),
            "{kind} {name} not admitted: {out}"
        );
    }
}

#[test]
fn default_values_render_a_control_plane_the_binary_and_the_apiserver_accept() {
    let dir = tempfile::tempdir().unwrap();
    let m = render(dir.path(), None).unwrap();
    let d = docs(&m);
    assert_eq!(
        kinds(&d),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount"
        ]
    );
    let (text, cfg) = config(&d);
    check_config(dir.path(), &text);
    ports_agree(&d, &cfg);
    assert_eq!(cfg["kubernetes"], true);
    assert_eq!(cfg["syncMode"], "all");
    assert_eq!(cfg["injectDefault"], false);
    assert_eq!(cfg["trustDomain"], "cluster.local");
    assert_eq!(cfg["caSecret"], "polaris-system/polaris-mesh-ca");
    assert_eq!(
        cfg["sidecarXdsAddr"],
        "polaris-mesh.polaris-system.svc:15010"
    );
    assert_eq!(
        cfg["sidecarCaAddr"],
        "https://polaris-mesh.polaris-system.svc:15012"
    );
    let names: Vec<&str> = cfg["webhookDnsNames"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"polaris-mesh.polaris-system.svc"),
        "{names:?}"
    );

    // The server reads the file the ConfigMap mounts.
    let c = container(&d);
    assert_eq!(c["args"][2], "/etc/polaris/config.yaml");
    assert!(c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["mountPath"] == "/etc/polaris"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["image"], "polaris-mesh/polaris:0.1.0");
    let pod = &find(&d, "Deployment")["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["polarismesh.cn/inject"], "disabled",
        "the control plane must not inject itself"
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
        "polaris-mesh-data"
    );

    // RBAC: what the controller reads, what the CA and ADS review, the CA's Secret only.
    let rules = &find(&d, "ClusterRole")["rules"];
    let grants = |group: &str, resource: &str, verb: &str| {
        rules.as_sequence().unwrap().iter().any(|r| {
            let has = |k: &str, v: &str| {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .any(|x| x.as_str() == Some(v))
            };
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for (g, r, v) in [
        ("", "services", "watch"),
        ("", "namespaces", "list"),
        ("", "pods", "watch"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("authentication.k8s.io", "tokenreviews", "create"),
    ] {
        assert!(grants(g, r, v), "ClusterRole lacks {v} {g}/{r}");
    }
    assert!(
        !grants("", "secrets", "get"),
        "secrets are read by name only"
    );
    assert_eq!(
        find(&d, "Role")["rules"][0]["resourceNames"][0],
        "polaris-mesh-ca"
    );

    // The webhook trusts the CA that issues its certificate, and fails closed by default.
    let secret = find(&d, "Secret");
    let hooks = find(&d, "MutatingWebhookConfiguration")["webhooks"]
        .as_sequence()
        .unwrap();
    assert_eq!(hooks.len(), 2, "namespace and pod opt-in");
    for h in hooks {
        assert_eq!(h["clientConfig"]["caBundle"], secret["data"]["ca-cert"]);
        assert_eq!(h["failurePolicy"], "Fail");
        assert_eq!(h["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(h["clientConfig"]["service"]["port"], 15017);
    }

    dry_run(dir.path(), &m);
}

#[test]
fn non_default_values_reach_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let m = render(
        dir.path(),
        Some(
            r#"
image: {repository: registry.example/polaris, tag: "1.2.3", pullPolicy: Always}
resources: {requests: {cpu: "2", memory: 1Gi}, limits: {memory: 4Gi}}
persistence: {enabled: false}
trustDomain: mesh.example
sync: {mode: demand, clusterName: east}
injection: {default: true, failurePolicy: Ignore, mtls: false}
rateLimit: {enabled: true}
log: {level: debug, format: text}
extraConfig: {xdsDebounceMs: 20}
"#,
        ),
    )
    .unwrap();
    let d = docs(&m);
    assert!(!kinds(&d).contains(&"PersistentVolumeClaim".to_string()));
    let (text, cfg) = config(&d);
    check_config(dir.path(), &text);
    ports_agree(&d, &cfg);
    assert_eq!(cfg["trustDomain"], "mesh.example");
    assert_eq!(cfg["syncMode"], "demand");
    assert_eq!(cfg["clusterName"], "east");
    assert_eq!(cfg["injectDefault"], true);
    assert_eq!(cfg["injectMtls"], false);
    assert_eq!(cfg["polarisImage"], "registry.example/polaris:1.2.3");
    assert_eq!(cfg["rlsAddr"], "0.0.0.0:8081");
    assert_eq!(
        cfg["rlsAdvertiseAddr"],
        "polaris-mesh.polaris-system.svc:8081"
    );
    assert_eq!(cfg["logFormat"], "text");
    assert_eq!(cfg["xdsDebounceMs"], 20);
    let c = container(&d);
    assert_eq!(c["image"], "registry.example/polaris:1.2.3");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["resources"]["requests"]["cpu"], "2");
    assert_eq!(c["resources"]["limits"]["memory"], "4Gi");
    let pod = &find(&d, "Deployment")["spec"]["template"]["spec"];
    assert!(pod["volumes"][1]["emptyDir"].is_mapping());
    let hooks = find(&d, "MutatingWebhookConfiguration")["webhooks"]
        .as_sequence()
        .unwrap();
    assert_eq!(hooks.len(), 1, "one webhook when injection is the default");
    assert_eq!(hooks[0]["failurePolicy"], "Ignore");
    let exprs = serde_yaml::to_string(&hooks[0]["namespaceSelector"]).unwrap();
    assert!(
        exprs.contains("kube-system") && exprs.contains("disabled"),
        "{exprs}"
    );

    // Injection off: no webhook, no webhook port, no webhook settings.
    let m2 = render(dir.path(), Some("injection: {enabled: false}\n")).unwrap();
    let d2 = docs(&m2);
    assert!(!kinds(&d2).contains(&"MutatingWebhookConfiguration".to_string()));
    let (text2, cfg2) = config(&d2);
    check_config(dir.path(), &text2);
    ports_agree(&d2, &cfg2);
    assert!(cfg2["webhookAddr"].is_null());

    dry_run(dir.path(), &m);
    dry_run(dir.path(), &m2);
}

#[test]
fn bad_values_fail_the_render_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    for (values, says) in [
        ("replicas: 2\n", "replicas"),
        ("sync: {mode: some}\n", "sync.mode"),
        (
            "injection: {failurePolicy: Maybe}\n",
            "injection.failurePolicy",
        ),
        ("auth: sometimes\n", "auth"),
        ("ca: {existingSecret: mine}\n", "ca.rootCert"),
    ] {
        let e = render(dir.path(), Some(values)).unwrap_err();
        assert!(e.contains(says), "{values}: {e}");
    }
}

#[tokio::test]
async fn the_generated_ca_secret_is_material_the_ca_starts_with() {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::{Api, PostParams};
    let dir = tempfile::tempdir().unwrap();
    let d = docs(&render(dir.path(), None).unwrap());
    let kube = TestKube::from_env();
    let client = kube.client().await;
    let ns = format!("chart-ca-{}", std::process::id());
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await;
    let mut secret: Secret = serde_yaml::from_value(find(&d, "Secret").clone()).unwrap();
    secret.metadata.namespace = Some(ns.clone());
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let root_pem = base64::engine::general_purpose::STANDARD
        .decode(find(&d, "Secret")["data"]["ca-cert"].as_str().unwrap())
        .unwrap();
    let ca = common::CaServer::start(
        dir.path(),
        &kube,
        &["--ca-secret", &format!("{ns}/polaris-mesh-ca")],
    )
    .await;
    // A TLS client trusting only the chart's root reaches the CA: the CA serves a certificate
    // it issued from the chart's key.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&root_pem).unwrap())
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "{}/healthz",
            ca.ca_url.replace("127.0.0.1", "localhost")
        ))
        .send()
        .await;
    assert!(r.is_ok(), "TLS to the CA with the chart's root: {r:?}");
}
