//! The sidecar injector against the real kube-apiserver: a MutatingWebhookConfiguration points
//! the apiserver at `polaris server --webhook-addr`; pods created for real come back stored with
//! the sidecar (or without it when their label opts out), and a replayed admission is not
//! injected twice.

mod common;

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_created_for_real_are_injected_by_the_webhook() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().unwrap();
    // The webhook's certificate, and the CA bundle the apiserver verifies it with.
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.path().join("wh.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("wh-key.pem"), key.serialize_pem()).unwrap();
    let files = [
        "--webhook-cert-file".to_string(),
        dir.path().join("wh.pem").to_str().unwrap().to_string(),
        "--webhook-key-file".to_string(),
        dir.path().join("wh-key.pem").to_str().unwrap().to_string(),
    ];
    scenario(&dir, "files", &files, |_| ca.pem()).await;
}

/// Without certificate files, the control plane's CA issues the webhook's certificate, and its
/// root is the caBundle.
#[tokio::test]
async fn the_ca_issues_the_webhook_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = [
        "--ca-addr".to_string(),
        format!("127.0.0.1:{}", common::free_port()),
    ];
    scenario(&dir, "ca", &ca, |data: &std::path::Path| {
        std::fs::read_to_string(data.join("ca/root-cert.pem")).unwrap()
    })
    .await;
}

/// A server with `flags` serving the webhook, registered with the apiserver with the caBundle
/// `bundle(data dir)`; pods created for real come back injected.
async fn scenario(
    dir: &tempfile::TempDir,
    tag: &str,
    flags: &[String],
    bundle: impl FnOnce(&std::path::Path) -> String,
) {
    use base64::Engine;
    let k = common::kube::TestKube::from_env();
    let client = k.client().await;
    let kc = k.kubeconfig(dir.path());
    let port = common::free_port();
    let mut args: Vec<String> = vec![
        "--webhook-addr".into(),
        format!("127.0.0.1:{port}"),
        "--kubeconfig".into(),
        kc.to_str().unwrap().into(),
    ];
    args.extend(flags.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let data = dir.path().join("d");
    let _s = common::Server::start(&data, &args).await;
    let ca_bundle = bundle(&data);
    let ns = format!("inj-{tag}-{}", std::process::id());
    let hook_name = format!("polaris-inject-{ns}");
    let hook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": hook_name},
        "webhooks": [{
            "name": "inject.polarismesh.cn",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject"),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca_bundle)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"polaris-test": ns}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "timeoutSeconds": 10,
        }]
    }))
    .unwrap();
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    hooks.create(&PostParams::default(), &hook).await.unwrap();
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns,
        "labels": {"polaris-test": ns, "polarismesh.cn/inject": "enabled"}}}))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &nsobj)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &str, label: Option<&str>| -> Pod {
        let mut v = json!({"metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}});
        if let Some(l) = label {
            v["metadata"]["labels"]["polarismesh.cn/inject"] = json!(l);
        }
        serde_json::from_value(v).unwrap()
    };
    // The webhook configuration takes a moment to reach the apiserver's admission chain.
    let mut stored = None;
    for attempt in 0..50 {
        let p = pods
            .create(
                &PostParams::default(),
                &pod(&format!("web-{attempt}"), None),
            )
            .await
            .unwrap();
        if names(&p).contains(&"envoy".to_string()) {
            stored = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = stored.expect("the apiserver never called the webhook");
    assert_eq!(names(&stored), ["web", "envoy", "polaris-agent"]);
    let init: Vec<String> = stored
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(init, ["polaris-bootstrap"]);
    assert_eq!(
        stored.metadata.annotations.as_ref().unwrap()["sidecar.polarismesh.cn/status"],
        "injected"
    );
    // Beside the CA, the pod carries its root (the agent reads it through the downward API).
    let root = stored
        .metadata
        .annotations
        .as_ref()
        .unwrap()
        .get("sidecar.polarismesh.cn/ca-root");
    if tag == "ca" {
        assert_eq!(root, Some(&ca_bundle));
    } else {
        assert!(root.is_none(), "no CA, no root: {root:?}");
    }
    // Read back: the stored pod is the injected one.
    let again = pods
        .get(stored.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(names(&again), names(&stored));
    // The pod's label opts out.
    let out = pods
        .create(&PostParams::default(), &pod("opted-out", Some("disabled")))
        .await
        .unwrap();
    assert_eq!(names(&out), ["web"]);
    // An already injected pod (a replay) is left as it is.
    let mut replay = stored.clone();
    replay.metadata.name = Some("replayed".into());
    replay.metadata.resource_version = None;
    replay.metadata.uid = None;
    replay.metadata.creation_timestamp = None;
    replay.metadata.managed_fields = None;
    replay.status = None;
    let r = pods.create(&PostParams::default(), &replay).await.unwrap();
    assert_eq!(names(&r), ["web", "envoy", "polaris-agent"]);
    hooks
        .delete(&hook_name, &DeleteParams::default())
        .await
        .unwrap();
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
