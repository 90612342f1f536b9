//! Cluster mode: `polaris server` replicas sharing a registry on a real etcd (Debian's
//! etcd-server, from `e2e/etcd.sh`). What one replica acknowledges, the others serve (REST and
//! xDS, to a real Envoy); concurrent writes through two replicas lose nothing; a replica restarts
//! from etcd; with etcd gone, writes fail with 503 and reads go on.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::traffic::{converge, deregister, register};
use common::{free_port, get, post, Backend, Envoy, Server};
use serde_json::json;

fn etcd_url() -> String {
    std::env::var("POLARIS_TEST_ETCD").expect(
        "POLARIS_TEST_ETCD is not set: run ./scripts/test.sh (it starts a real etcd, e2e/etcd.sh)",
    )
}

/// A replica on `endpoint` under `prefix`.
async fn replica(dir: &std::path::Path, name: &str, endpoint: &str, prefix: &str) -> Server {
    Server::start(
        &dir.join(name),
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            endpoint,
            "--etcd-prefix",
            prefix,
        ],
    )
    .await
}

fn prefix(tag: &str) -> String {
    format!("/polaris-cluster-test/{tag}-{}", std::process::id())
}

/// Instances (`host:port`) of `default/<svc>` as a replica lists them.
async fn hosts(c: &reqwest::Client, s: &Server, svc: &str) -> BTreeSet<String> {
    let (_, v) = get(
        c,
        &s.url(&format!(
            "/naming/v1/instances?namespace=default&service={svc}&limit=10000"
        )),
    )
    .await;
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| format!("{}:{}", i["host"].as_str().unwrap(), i["port"]))
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually_hosts(c: &reqwest::Client, s: &Server, svc: &str, want: &BTreeSet<String>) {
    let start = Instant::now();
    loop {
        let got = hosts(c, s, svc).await;
        if &got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{svc} on {}: {} of {} instances\n{}",
            s.http,
            got.len(),
            want.len(),
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_registration_through_one_replica_is_routed_by_an_envoy_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, p) = (etcd_url(), prefix("route"));
    let a = replica(dir.path(), "a", &etcd, &p).await;
    let b = replica(dir.path(), "b", &etcd, &p).await;
    let c = reqwest::Client::new();
    let e = Envoy::start(
        dir.path(),
        "sidecar~default/cluster-0~127.0.0.1",
        b.xds_port,
        false,
    )
    .await;
    let one = Backend::start("one").await;
    register(&c, &a, "echo", one.port, json!({})).await;
    let t = converge(&e, &c, "echo.default", &["one"], Duration::from_secs(10)).await;
    eprintln!("registered through A, routed by an Envoy on B after {t:?}");
    let two = Backend::start("two").await;
    register(&c, &a, "echo", two.port, json!({})).await;
    converge(
        &e,
        &c,
        "echo.default",
        &["one", "two"],
        Duration::from_secs(5),
    )
    .await;
    // Deregistered through B: gone from A's answers too.
    deregister(&c, &b, "echo", "127.0.0.1", one.port).await;
    converge(&e, &c, "echo.default", &["two"], Duration::from_secs(5)).await;
    let want: BTreeSet<String> = [format!("127.0.0.1:{}", two.port)].into();
    eventually_hosts(&c, &a, "echo", &want).await;
}

#[tokio::test]
async fn concurrent_writes_through_two_replicas_lose_nothing_and_a_restart_reloads_them() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, p) = (etcd_url(), prefix("race"));
    let a = replica(dir.path(), "a", &etcd, &p).await;
    let mut b = replica(dir.path(), "b", &etcd, &p).await;
    let c = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..150u32 {
        for (s, side) in [(&a, 1), (&b, 2)] {
            let (c, url) = (c.clone(), s.url("/naming/v1/instances"));
            tasks.push(tokio::spawn(async move {
                let host = format!("10.{side}.{}.{}", i / 250, i % 250);
                let (st, body) = post(
                    &c,
                    &url,
                    json!([{"namespace": "default", "service": "race", "host": host, "port": 80}]),
                )
                .await;
                (st, body, format!("{host}:80"))
            }));
        }
    }
    let mut acked = BTreeSet::new();
    let mut conflicts = 0;
    for t in tasks {
        let (st, body, addr) = t.await.unwrap();
        match st {
            200 => {
                acked.insert(addr);
            }
            409 => conflicts += 1,
            other => panic!("registration answered {other}: {body}"),
        }
    }
    eprintln!("{} acknowledged, {conflicts} answered 409", acked.len());
    assert!(acked.len() >= 150, "most writes land: {}", acked.len());
    // Every acknowledged write is on both replicas, and nothing that was not acknowledged.
    eventually_hosts(&c, &a, "race", &acked).await;
    eventually_hosts(&c, &b, "race", &acked).await;
    // Caught up: no commit left to apply, as the lag gauge says once it has measured.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(b.metric("polaris_store_watch_lag_revisions").await, 0);
    // A replica killed and started again loads everything from etcd.
    b.kill9();
    let b2 = replica(dir.path(), "b2", &etcd, &p).await;
    eventually_hosts(&c, &b2, "race", &acked).await;
    let m = a.metrics().await;
    assert!(m.contains("polaris_store_followed_commits_total"), "{m}");
}

/// An etcd of this test's own, to stop and restart.
struct OwnEtcd {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
    ports: (u16, u16),
}

impl OwnEtcd {
    async fn start(dir: &std::path::Path) -> OwnEtcd {
        Self::start_on(dir, (free_port(), free_port())).await
    }

    /// Kills it and starts it again on the same data and ports.
    async fn restart(&mut self, down: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        tokio::time::sleep(down).await;
        *self = Self::start_on(&self.dir, self.ports).await;
    }

    async fn start_on(dir: &std::path::Path, ports: (u16, u16)) -> OwnEtcd {
        let bin = std::env::var("POLARIS_TEST_ETCD_BIN").expect(
            "POLARIS_TEST_ETCD_BIN is not set: run ./scripts/test.sh (e2e/etcd.sh unpacks etcd)",
        );
        let (client, peer) = ports;
        let child = Command::new(bin)
            .args([
                "--data-dir",
                dir.join("etcd").to_str().unwrap(),
                "--name",
                "own",
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &format!("own=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("etcd.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{client}");
        let start = Instant::now();
        while reqwest::get(format!("{url}/health")).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "etcd did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        OwnEtcd {
            child,
            url,
            dir: dir.to_path_buf(),
            ports,
        }
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn with_etcd_gone_writes_fail_with_503_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = OwnEtcd::start(dir.path()).await;
    let s = replica(dir.path(), "a", &etcd.url, "/polaris").await;
    let c = reqwest::Client::new();
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": "echo", "host": "10.0.0.1", "port": 80}]),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    etcd.child.kill().unwrap();
    etcd.child.wait().unwrap();
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": "echo", "host": "10.0.0.2", "port": 80}]),
    )
    .await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["code"], 500001, "{body}");
    assert!(
        body["responses"][0]["info"]
            .as_str()
            .unwrap()
            .contains("etcd store"),
        "the answer names the store: {body}"
    );
    // Reads are served from the replica's state; readiness says the store is gone.
    let want: BTreeSet<String> = ["10.0.0.1:80".to_string()].into();
    assert_eq!(hosts(&c, &s, "echo").await, want);
    let (st, v) = get(&c, &s.url("/readyz")).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["components"]["store"].as_str().unwrap().contains("etcd"),
        "{v}"
    );
    assert_eq!(
        get(&c, &s.url("/healthz")).await.0,
        200,
        "alive all the same"
    );
}

/// `healthy` of each instance of `default/hb`, by host, as a replica lists them.
async fn health(c: &reqwest::Client, s: &Server) -> std::collections::BTreeMap<String, bool> {
    let (_, v) = get(
        c,
        &s.url("/naming/v1/instances?namespace=default&service=hb&limit=1000"),
    )
    .await;
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["host"].as_str().unwrap().to_string(),
                        i["healthy"].as_bool().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Heartbeats for `hosts` through `s`, every 300 ms, until dropped; counts the failed ones.
fn beat(
    s: &Server,
    hosts: Vec<String>,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (url, f) = (s.url("/v1/Heartbeat"), failed.clone());
    let task = tokio::spawn(async move {
        let c = reqwest::Client::new();
        loop {
            for h in &hosts {
                let r = c
                    .post(&url)
                    .json(&json!({"namespace": "default", "service": "hb", "host": h, "port": 80}))
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status().is_success()) {
                    f.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    (task, failed)
}

#[tokio::test]
async fn heartbeats_reach_the_owner_from_any_replica_and_ownership_survives_a_death() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, p) = (etcd_url(), prefix("beats"));
    let mut a = replica(dir.path(), "a", &etcd, &p).await;
    let b = replica(dir.path(), "b", &etcd, &p).await;
    let c = reqwest::Client::new();
    let hosts: Vec<String> = (1..=20).map(|i| format!("10.3.0.{i}")).collect();
    let list: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| json!({"namespace": "default", "service": "hb", "host": h, "port": 80,
            "enableHealthCheck": true, "healthCheck": {"type": "HEARTBEAT", "heartbeat": {"ttl": 1}}}))
        .collect();
    let (st, body) = post(&c, &a.url("/naming/v1/instances"), json!(list)).await;
    assert_eq!(st, 200, "{body}");
    let all: BTreeSet<String> = hosts.iter().map(|h| format!("{h}:80")).collect();
    eventually_hosts(&c, &b, "hb", &all).await;
    // Every heartbeat goes through B; A owns about half of the instances.
    let (task, failed) = beat(&b, hosts.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    for s in [&a, &b] {
        let h = health(&c, s).await;
        assert_eq!(h.len(), 20);
        assert!(h.values().all(|v| *v), "all healthy on {}: {h:?}", s.http);
    }
    assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 0);
    let forwarded = b.metric("polaris_heartbeats_forwarded_total").await;
    assert!(forwarded > 0, "B forwarded the beats of A's instances");
    // Both replicas see both, and the instances split between them.
    for s in [&a, &b] {
        let (_, v) = get(&c, &s.url("/debug/cluster")).await;
        let replicas = v["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 2, "{v}");
        let total: u64 = replicas
            .iter()
            .map(|r| r["heartbeatInstances"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 20, "{v}");
        assert!(v["storeError"].is_null(), "{v}");
    }
    task.abort();
    // The silent instances' last beat was at most one round (300 ms) before this.
    let last_round = std::time::Instant::now();

    // A dies. Half the instances go on beating through B, half fall silent.
    let (beating, silent) = hosts.split_at(10);
    let (task, _) = beat(&b, beating.to_vec());
    let died = std::time::Instant::now();
    a.kill9();
    let mut silent_down = None;
    while died.elapsed() < Duration::from_secs(20) {
        let h = health(&c, &b).await;
        for host in beating {
            assert!(
                h[host],
                "{host} beats through B but turned unhealthy after A died: {h:?}"
            );
        }
        let down = silent.iter().filter(|s| !h[*s]).count();
        if down > 0 {
            assert!(
                last_round.elapsed() >= Duration::from_millis(2600),
                "a silent instance turned unhealthy {:?} after the last round of beats, before 3×TTL",
                last_round.elapsed()
            );
        }
        if down == silent.len() {
            silent_down = Some(died.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = silent_down.expect("the silent instances turned unhealthy once B owned them");
    eprintln!("silent instances unhealthy {t:?} after A died (lease 5 s + 3×TTL grace)");
    // And the beating ones stay healthy a while longer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = health(&c, &b).await;
    assert!(beating.iter().all(|x| h[x]), "{h:?}");
    task.abort();
}

#[tokio::test]
async fn a_delta_envoy_moves_to_the_other_replica_without_a_failed_request() {
    failover(false).await;
}

#[tokio::test]
async fn a_sotw_envoy_moves_to_the_other_replica_without_a_failed_request() {
    failover(true).await;
}

/// An Envoy sidecar whose bootstrap lists both replicas keeps routing when the replica it is
/// connected to dies: it reconnects to the other, which sends it nothing it already holds.
async fn failover(sotw: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (etcd, p) = (
        etcd_url(),
        prefix(if sotw { "failover-sotw" } else { "failover" }),
    );
    let mut a = replica(dir.path(), "a", &etcd, &p).await;
    let mut b = replica(dir.path(), "b", &etcd, &p).await;
    let c = reqwest::Client::new();
    let one = Backend::start("one").await;
    register(&c, &a, "echo", one.port, json!({})).await;
    let node = if sotw {
        "sidecar~default/failover-sotw~127.0.0.1"
    } else {
        "sidecar~default/failover-delta~127.0.0.1"
    };
    let e = Envoy::start_bootstrap(
        dir.path(),
        node,
        a.xds_port,
        sotw,
        &[],
        &[
            "--xds-addr",
            &format!("127.0.0.1:{},127.0.0.1:{}", a.xds_port, b.xds_port),
        ],
    )
    .await;
    converge(&e, &c, "echo.default", &["one"], Duration::from_secs(10)).await;
    // Which replica holds the stream?
    let connected = |s: &Server| {
        let (c, url) = (c.clone(), s.url("/debug/xds/nodes"));
        async move {
            let (_, v) = get(&c, &url).await;
            v["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["node"]["id"] == node))
        }
    };
    let on_a = connected(&a).await;
    assert!(on_a || connected(&b).await, "the Envoy is on one replica");
    let updates = |e: &Envoy| {
        let admin = e.admin.clone();
        async move {
            let text = reqwest::get(format!("{admin}/stats"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let mut v: Vec<String> = text
                .lines()
                .filter(|l| l.contains(".update_success:") || l.contains(".update_rejected:"))
                .map(String::from)
                .collect();
            v.sort();
            v
        }
    };
    let before = updates(&e).await;
    // Steady traffic through the sidecar while its replica dies.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, bad, c) = (stop.clone(), ok.clone(), bad.clone(), c.clone());
        let url = format!("http://127.0.0.1:{}/", e.outbound_port);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("host", "echo.default").send().await {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (dead, alive) = if on_a { (&mut a, &b) } else { (&mut b, &a) };
    dead.kill9();
    let start = Instant::now();
    while !connected(alive).await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the Envoy never reached the other replica; log:\n{}",
            std::fs::read_to_string(&e.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "reconnected to the other replica after {:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "requests failed during the failover"
    );
    // Same content, same versions (content hashes, equal on every replica): the new replica
    // sends nothing the Envoy already holds, whether it names its holdings (delta) or resumes
    // with the version it last accepted (SotW).
    assert_eq!(updates(&e).await, before, "updates after the failover");
    // And a change now reaches it through the surviving replica.
    let two = Backend::start("two").await;
    register(&c, alive, "echo", two.port, json!({})).await;
    converge(
        &e,
        &c,
        "echo.default",
        &["one", "two"],
        Duration::from_secs(5),
    )
    .await;
}

/// etcd restarted while registrations go on through one replica: every acknowledged one is there,
/// on both replicas, and they resumed their watches without reloading everything.
#[tokio::test]
async fn etcd_restarted_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = OwnEtcd::start(dir.path()).await;
    let a = replica(dir.path(), "a", &etcd.url, "/polaris").await;
    let b = replica(dir.path(), "b", &etcd.url, "/polaris").await;
    let c = reqwest::Client::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (c, url, stop) = (c.clone(), a.url("/naming/v1/instances"), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused) = (BTreeSet::new(), BTreeSet::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let host = format!("10.4.{}.{}", i / 250, i % 250);
                let (st, _) = post(
                    &c,
                    &url,
                    json!([{"namespace": "default", "service": "load", "host": host, "port": 80}]),
                )
                .await;
                if st == 200 {
                    acked.insert(format!("{host}:80"));
                } else {
                    refused.insert(format!("{host}:80"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    etcd.restart(Duration::from_millis(700)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = load.await.unwrap();
    eprintln!(
        "{} registrations acknowledged, {} refused while etcd was down",
        acked.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "some writes met etcd down");
    assert!(acked.len() > 50);
    // Every acknowledged write is there. A refused one may be too: etcd can commit a transaction
    // whose answer is lost when it goes down, and then every replica serves it alike.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_a = hosts(&c, &a, "load").await;
    assert!(on_a.is_superset(&acked), "an acknowledged write is missing");
    assert!(
        on_a.difference(&acked).all(|h| refused.contains(h)),
        "only acknowledged or refused writes"
    );
    eventually_hosts(&c, &b, "load", &on_a).await;
    for s in [&a, &b] {
        let m = s.metrics().await;
        assert!(
            m.contains("polaris_store_reloads_total 0\n"),
            "{} reloaded everything:\n{m}",
            s.http
        );
    }
    let (st, _) = get(&c, &a.url("/readyz")).await;
    assert_eq!(st, 200, "ready again once etcd is back");
}

/// A watch from a revision etcd has compacted away says so (the follower then reloads), and a
/// watch from after the compaction goes on.
#[tokio::test]
async fn a_watch_from_before_etcd_compaction_reports_it() {
    use futures::StreamExt;
    use polaris_mesh::store::{etcd::Config, Error, EtcdStore, Mutation, Store};
    let dir = tempfile::tempdir().unwrap();
    let etcd = OwnEtcd::start(dir.path()).await;
    let s = EtcdStore::connect(Config {
        endpoints: vec![etcd.url.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = |n: &str| {
        Mutation::PutNamespace(
            polaris_mesh::model::NamespaceInput {
                name: Some(n.into()),
                ..Default::default()
            }
            .validate("t")
            .unwrap(),
        )
    };
    let r1 = s.commit(vec![ns("a")], 0).await.unwrap();
    let r2 = s.commit(vec![ns("b")], r1).await.unwrap();
    s.client()
        .kv_client()
        .compact(r2 as i64, None)
        .await
        .unwrap();
    let mut w = s.watch(0).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Err(Error::Compacted { oldest, .. }) if oldest == r2),
        "{first:?}"
    );
    let mut w = s.watch(r2).await.unwrap();
    let r3 = s.commit(vec![ns("c")], r2).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.revision, r3);
}
