//! A loopback Kubernetes API speaking list + watch (for `bench controller` and the controller's
//! tests) for the resources the controller watches
//! (namespaces, services, pods, nodes; discovery.k8s.io/v1 endpointslices, which the real 1.20
//! apiserver of the other tier does not serve). Lists answer with a resourceVersion; watches
//! replay what happened after the requested version, then stream, with bookmarks. The test can
//! expire history (the next watch gets 410 Gone and must relist) and drop every open watch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// The resources served: (plural, apiVersion, kind).
const RESOURCES: [(&str, &str, &str); 5] = [
    ("namespaces", "v1", "Namespace"),
    ("services", "v1", "Service"),
    ("pods", "v1", "Pod"),
    ("nodes", "v1", "Node"),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
];

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// (rv, plural, event type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// Watches from before this version get 410 Gone.
    expired_before: u64,
    lists: u64,
    watches: u64,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(u64, String, &'static str, Value)>,
    /// Bumped to end every open watch.
    drops: watch::Sender<u64>,
}

/// The fake API server.
pub struct FakeApi {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    shared: Shared,
    _task: tokio::task::JoinHandle<()>,
}

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    let r = RESOURCES.iter().find(|r| r.0 == plural).expect("served");
    (r.1, r.2)
}

impl FakeApi {
    /// Starts serving on a free loopback port.
    pub async fn start() -> FakeApi {
        let (events, _) = broadcast::channel(4096);
        let (drops, _) = watch::channel(0);
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                ..Default::default()
            })),
            events,
            drops,
        };
        let app = Router::new()
            .route("/api/v1/{plural}", get(core))
            .route("/api/v1/{plural}/{name}", get(one))
            .route("/apis/discovery.k8s.io/v1/{plural}", get(core))
            .with_state(shared.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(l, app).await.unwrap();
        });
        FakeApi {
            url,
            shared,
            _task: task,
        }
    }

    /// A kubeconfig for this server, written to `path`.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        write_kubeconfig(path, &self.url);
    }

    /// Creates or replaces an object of `plural` (ADDED or MODIFIED to watchers).
    pub fn put(&self, plural: &str, mut obj: Value) {
        let (api_version, kind) = kind_of(plural);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut g = self.shared.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (plural.to_string(), ns, name);
        let ty = if g.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        g.objects.insert(key, obj.clone());
        g.log.push((rv, plural.to_string(), ty, obj.clone()));
        let _ = self.shared.events.send((rv, plural.to_string(), ty, obj));
    }

    /// Deletes an object (DELETED to watchers).
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut g = self.shared.inner.lock().unwrap();
        let Some(mut obj) =
            g.objects
                .remove(&(plural.to_string(), ns.to_string(), name.to_string()))
        else {
            return;
        };
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        g.log.push((rv, plural.to_string(), "DELETED", obj.clone()));
        let _ = self
            .shared
            .events
            .send((rv, plural.to_string(), "DELETED", obj));
    }

    /// Forgets history and ends every watch: watchers resume from a version that is gone, get 410
    /// and must relist (as after an apiserver restart with compacted etcd).
    pub fn expire(&self) {
        {
            let mut g = self.shared.inner.lock().unwrap();
            g.expired_before = g.rv + 1;
            g.log.clear();
        }
        self.drop_watches();
    }

    /// Ends every open watch (a dropped connection); watchers resume from their last version.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let g = self.shared.inner.lock().unwrap();
        (g.lists, g.watches)
    }
}

/// GET of one cluster-scoped object (a namespace, a node).
async fn one(State(s): State<Shared>, Path((plural, name)): Path<(String, String)>) -> Response {
    let g = s.inner.lock().unwrap();
    match g.objects.get(&(plural, String::new(), name.clone())) {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": format!("{name} not found"), "reason": "NotFound", "code": 404})),
        )
            .into_response(),
    }
}

async fn core(
    State(s): State<Shared>,
    Path(plural): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if !RESOURCES.iter().any(|r| r.0 == plural) {
        return (axum::http::StatusCode::NOT_FOUND, "not served").into_response();
    }
    let (api_version, kind) = kind_of(&plural);
    if q.get("watch").map(String::as_str) != Some("true")
        && q.get("watch").map(String::as_str) != Some("1")
    {
        let mut g = s.inner.lock().unwrap();
        g.lists += 1;
        let items: Vec<Value> = g
            .objects
            .iter()
            .filter(|(k, _)| k.0 == plural)
            .map(|(_, v)| v.clone())
            .collect();
        let body = json!({
            "kind": format!("{kind}List"), "apiVersion": api_version,
            "metadata": {"resourceVersion": g.rv.to_string()}, "items": items,
        });
        return axum::Json(body).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (replay, expired, rv) = {
        let mut g = s.inner.lock().unwrap();
        g.watches += 1;
        let replay: Vec<(u64, String, &'static str, Value)> = g
            .log
            .iter()
            .filter(|e| e.0 > from && e.1 == plural)
            .cloned()
            .collect();
        (replay, from < g.expired_before, g.rv)
    };
    let line = |v: Value| {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.push(b'\n');
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(b))
    };
    if expired {
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
        return axum::body::Body::from_stream(futures::stream::iter([line(status)]))
            .into_response();
    }
    let mut events = s.events.subscribe();
    let mut drops = s.drops.subscribe();
    drops.borrow_and_update();
    let stream = async_stream(move |tx| async move {
        for (_, _, ty, obj) in replay {
            if tx
                .send(line(json!({"type": ty, "object": obj})))
                .await
                .is_err()
            {
                return;
            }
        }
        let mut last = rv;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                biased;
                _ = drops.changed() => return,
                e = events.recv() => match e {
                    Ok((erv, p, ty, obj)) if p == plural && erv > from => {
                        last = erv;
                        if tx.send(line(json!({"type": ty, "object": obj}))).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    let b = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(b)).await.is_err() { return; }
                }
            }
        }
    });
    axum::body::Body::from_stream(stream).into_response()
}

/// A stream fed by a task.
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<axum::body::Bytes, std::convert::Infallible>>
where
    F: FnOnce(
        tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::convert::Infallible>>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Writes a kubeconfig for the API server at `url` (plain HTTP, no credentials) to `path`.
pub fn write_kubeconfig(path: &std::path::Path, url: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
}
