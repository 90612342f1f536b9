//! End to end with a real Envoy 1.40: registry → xDS → Envoy → real HTTP traffic.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::traffic::{answering, converge, deregister, register, set};
use common::{get, post, Backend, Envoy, Server};
use serde_json::json;

async fn scenario(sotw: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    register(&c, &s, "echo", a.port, json!({})).await;
    register(&c, &s, "echo", b.port, json!({})).await;
    let mode = if sotw { "sotw" } else { "delta" };
    let e = Envoy::start(
        dir.path(),
        &format!("sidecar~default/e2e-{mode}~127.0.0.1"),
        s.xds_port,
        sotw,
    )
    .await;

    // Both backends answer through Envoy.
    let t = converge(&e, &c, "echo.default", &["a", "b"], Duration::from_secs(10)).await;
    eprintln!("[{mode}] first traffic through Envoy after {t:?}");

    // Deregister one: only the other answers, quickly.
    deregister(&c, &s, "echo", "127.0.0.1", a.port).await;
    let t = converge(&e, &c, "echo.default", &["b"], Duration::from_secs(2)).await;
    eprintln!("[{mode}] deregistration reached traffic in {t:?}");

    // A heartbeat instance that stops beating is drained (unhealthy after 3×TTL).
    let hb = Backend::start("hb").await;
    register(&c, &s, "echo", hb.port, json!({"enableHealthCheck": true, "healthCheck": {"type": "HEARTBEAT", "heartbeat": {"ttl": 1}}})).await;
    converge(&e, &c, "echo.default", &["b", "hb"], Duration::from_secs(3)).await;
    let silent = Instant::now();
    let t = converge(&e, &c, "echo.default", &["b"], Duration::from_secs(8)).await;
    eprintln!(
        "[{mode}] unhealthy instance drained {:?} after its last heartbeat",
        silent.elapsed().max(t)
    );
    let (_, v) = get(
        &c,
        &s.url("/naming/v1/instances?namespace=default&service=echo&healthy=false"),
    )
    .await;
    assert_eq!(v["amount"], 1, "{v}");

    // A new service appears while traffic runs: zero non-2xx on the running traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, bad, c) = (stop.clone(), ok.clone(), bad.clone(), c.clone());
        let url = format!("http://127.0.0.1:{}/", e.outbound_port);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c.get(&url).header("host", "echo.default").send().await;
                match r {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let fresh = Backend::start("fresh").await;
    register(&c, &s, "fresh", fresh.port, json!({})).await;
    let t = converge(&e, &c, "fresh.default", &["fresh"], Duration::from_secs(5)).await;
    eprintln!("[{mode}] new service routable after {t:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 10);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "non-2xx while a service was added"
    );

    let (st, cfg) = get(
        &c,
        &s.url(&format!(
            "/debug/xds/config?node=sidecar~default/e2e-{mode}~127.0.0.1"
        )),
    )
    .await;
    assert_eq!(st, 200);
    assert!(cfg["resources"]["CDS"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "OUTBOUND|default|echo"));
}

#[tokio::test]
async fn envoy_delta_end_to_end() {
    scenario(false).await;
}

#[tokio::test]
async fn envoy_sotw_end_to_end() {
    scenario(true).await;
}

#[tokio::test]
async fn envoy_on_demand_virtual_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let a = Backend::start("a").await;
    register(&c, &s, "echo", a.port, json!({})).await;
    let t0 = Instant::now();
    let e = Envoy::start_with(
        dir.path(),
        "sidecar~default/on-demand~127.0.0.1",
        s.xds_port,
        false,
        &["sidecar.polarismesh.cn/openOnDemand=true"],
    )
    .await;
    eprintln!("[vhds] envoy ready after {:?}", t0.elapsed());
    // Readiness was not reached through Envoy's 15 s initial fetch timeout.
    for stat in [
        "http.OUTBOUND_HTTP.rds.polaris-on-demand-router.init_fetch_timeout",
        "http.OUTBOUND_HTTP.rds.vhds.polaris-on-demand-router.init_fetch_timeout",
        "listener_manager.lds.init_fetch_timeout",
        "cluster_manager.cds.init_fetch_timeout",
    ] {
        assert_eq!(e.stat(stat).await, Some(0), "{stat}");
    }
    // The first request for a host is paused until its virtual host arrives, then routed.
    let t = Instant::now();
    let (st, body) = e.get(&c, "echo.default").await;
    assert_eq!(
        (st, body.as_str()),
        (200, "a"),
        "log:\n{}",
        std::fs::read_to_string(&e.log).unwrap_or_default()
    );
    eprintln!(
        "[vhds] first on-demand request answered in {:?}",
        t.elapsed()
    );
    // An unknown host: 404 at once, no hang.
    let t = Instant::now();
    let (st, _) = e.get(&c, "nope.default").await;
    assert_eq!(st, 404);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "unknown host hung for {:?}",
        t.elapsed()
    );
    // Only the hosts asked for were sent.
    let (_, nodes) = get(&c, &s.url("/debug/xds/nodes")).await;
    assert_eq!(
        nodes["nodes"][0]["types"]["VHDS"]["resources"], 2,
        "{nodes}"
    );
    let t = Instant::now();
    assert_eq!(answering(&e, &c, "echo", 5).await, set(&["a"]));
    eprintln!("[vhds] bare host answered in {:?}", t.elapsed());

    // On-demand CDS: a service registered after Envoy started is reached (its virtual host and
    // its cluster both fetched on the first request), and Envoy holds only the service clusters
    // it called, not every cluster of the namespace.
    let b = Backend::start("b").await;
    let idle = Backend::start("idle").await;
    register(&c, &s, "late", b.port, json!({})).await;
    register(&c, &s, "never-called", idle.port, json!({})).await;
    let t = Instant::now();
    let (st, body) = loop {
        let (st, body) = e.get(&c, "late.default").await;
        if st == 200 || t.elapsed() > Duration::from_secs(10) {
            break (st, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((st, body.as_str()), (200, "b"));
    let clusters = c
        .get(format!("{}/clusters", e.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let held: std::collections::BTreeSet<&str> = clusters
        .lines()
        .filter_map(|l| l.split("::").next())
        .filter(|n| n.starts_with("OUTBOUND|"))
        .collect();
    assert_eq!(
        held,
        ["OUTBOUND|default|echo", "OUTBOUND|default|late"]
            .into_iter()
            .collect(),
        "{clusters}"
    );
    // An unknown host is still a 404 at once.
    let t = Instant::now();
    let (st, _) = e.get(&c, "still-nope.default").await;
    assert_eq!(st, 404);
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn envoy_inbound_listener_reaches_the_local_app() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let app = Backend::start("local-app").await;
    register(&c, &s, "echo", app.port, json!({})).await;
    let inbound = common::free_port();
    let md = [
        "sidecar.polarismesh.cn/serviceName=echo".to_string(),
        format!("polarismesh.cn/inboundPort={inbound}"),
        format!("sidecar.polarismesh.cn/bindPorts={}", app.port),
    ];
    let md: Vec<&str> = md.iter().map(String::as_str).collect();
    let e = Envoy::start_with(
        dir.path(),
        "sidecar~default/echo-0~127.0.0.1",
        s.xds_port,
        false,
        &md,
    )
    .await;
    // Traffic arriving on the inbound listener goes to the local application port.
    let start = Instant::now();
    loop {
        let r = c.get(format!("http://127.0.0.1:{inbound}/")).send().await;
        if let Ok(r) = r {
            if r.status().is_success() {
                assert_eq!(r.text().await.unwrap(), "local-app");
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "inbound listener never answered; log:\n{}",
            std::fs::read_to_string(&e.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, cfg) = get(
        &c,
        &s.url("/debug/xds/config?node=sidecar~default/echo-0~127.0.0.1"),
    )
    .await;
    assert!(
        cfg["resources"]["CDS"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "INBOUND|default|echo"),
        "{cfg}"
    );
}

/// A service registered by hostname becomes a STRICT_DNS cluster that Envoy resolves itself; it
/// goes back to EDS when the last hostname goes, and neither switch fails a request.
async fn hostname_scenario(sotw: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let (a, b, o1, o2) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("o1").await,
        Backend::start("o2").await,
    );
    let mode = if sotw { "sotw" } else { "delta" };
    let reg_host = |host: &'static str, svc: &'static str, port: u16| {
        let (c, url) = (c.clone(), s.url("/naming/v1/instances"));
        async move {
            let (st, body) = post(
                &c,
                &url,
                json!([{"namespace": "default", "service": svc, "host": host, "port": port}]),
            )
            .await;
            assert_eq!(st, 200, "{body}");
        }
    };
    reg_host("localhost", "echo", a.port).await;
    register(&c, &s, "other", o1.port, json!({})).await;
    let node = format!("sidecar~default/dns-{mode}~127.0.0.1");
    let e = Envoy::start(dir.path(), &node, s.xds_port, sotw).await;
    converge(&e, &c, "echo.default", &["a"], Duration::from_secs(10)).await;
    converge(&e, &c, "other.default", &["o1"], Duration::from_secs(5)).await;

    // The debug view says what became of the instance.
    let (_, cfg) = get(
        &c,
        &s.url(&format!("/debug/xds/config?node={node}&service=echo")),
    )
    .await;
    let t = &cfg["translation"][0];
    assert_eq!(t["discovery"], "STRICT_DNS", "{cfg}");
    assert_eq!(
        t["instances"][0]["state"], "STRICT_DNS endpoint (hostname resolved by Envoy)",
        "{cfg}"
    );

    // Steady traffic to the service while it switches between DNS and EDS.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, bad, c) = (stop.clone(), ok.clone(), bad.clone(), c.clone());
        let url = format!("http://127.0.0.1:{}/", e.outbound_port);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c.get(&url).header("host", "echo.default").send().await;
                match r {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // An IP instance joins the DNS cluster.
    register(&c, &s, "echo", b.port, json!({})).await;
    converge(&e, &c, "echo.default", &["a", "b"], Duration::from_secs(10)).await;
    // Endpoint updates of other services keep flowing meanwhile.
    register(&c, &s, "other", o2.port, json!({})).await;
    converge(
        &e,
        &c,
        "other.default",
        &["o1", "o2"],
        Duration::from_secs(5),
    )
    .await;
    // The last hostname goes: back to EDS.
    deregister(&c, &s, "echo", "localhost", a.port).await;
    converge(&e, &c, "echo.default", &["b"], Duration::from_secs(10)).await;
    let (_, cfg) = get(
        &c,
        &s.url(&format!("/debug/xds/config?node={node}&service=echo")),
    )
    .await;
    assert_eq!(cfg["translation"][0]["discovery"], "EDS", "{cfg}");
    // And to DNS once more.
    reg_host("localhost", "echo", a.port).await;
    converge(&e, &c, "echo.default", &["a", "b"], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "failed requests while the service switched between DNS and EDS"
    );
    for stat in [
        "cluster_manager.cds.update_rejected",
        "listener_manager.lds.update_rejected",
        "cluster.OUTBOUND|default|other.update_rejected",
        "cluster.OUTBOUND|default|echo.update_rejected",
    ] {
        assert_eq!(e.stat(stat).await.unwrap_or(0), 0, "{stat}");
    }
    assert_eq!(e.stat("cluster_manager.warming_clusters").await, Some(0));
    let log = std::fs::read_to_string(&e.log).unwrap_or_default();
    assert!(
        !log.contains("deprecated"),
        "Envoy warned about deprecated configuration:\n{log}"
    );
}

#[tokio::test]
async fn envoy_delta_routes_to_hostname_instances() {
    hostname_scenario(false).await;
}

#[tokio::test]
async fn envoy_sotw_routes_to_hostname_instances() {
    hostname_scenario(true).await;
}

/// An instance on a new port is an EDS push only: the route configuration is not sent again, and
/// callers that put a port (any port) or capitals in `Host` still reach the service.
#[tokio::test]
async fn envoy_instance_on_a_new_port_pushes_eds_and_no_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    register(&c, &s, "echo", a.port, json!({})).await;
    let e = Envoy::start(
        dir.path(),
        "sidecar~default/ports~127.0.0.1",
        s.xds_port,
        false,
    )
    .await;
    converge(&e, &c, "echo.default", &["a"], Duration::from_secs(10)).await;
    const RDS: &str = "http.OUTBOUND_HTTP.rds.polaris-outbound-router.update_success";
    const EDS: &str = "cluster.OUTBOUND|default|echo.update_success";
    let (rds0, eds0) = (e.stat(RDS).await.unwrap(), e.stat(EDS).await.unwrap());
    // `b` listens on another port than `a`: a port the service did not have.
    register(&c, &s, "echo", b.port, json!({})).await;
    converge(&e, &c, "echo.default", &["a", "b"], Duration::from_secs(5)).await;
    assert!(e.stat(EDS).await.unwrap() > eds0, "no EDS update");
    assert_eq!(
        e.stat(RDS).await.unwrap(),
        rds0,
        "the route was pushed again"
    );
    for host in [
        "echo",
        "echo:1234",
        "echo.default:8080",
        format!("echo.default:{}", a.port).as_str(),
        "echo.default.svc:80",
        "echo.default.svc.cluster.local:443",
        "ECHO.Default",
    ] {
        assert_eq!(answering(&e, &c, host, 8).await, set(&["a", "b"]), "{host}");
    }
    // The last instance on a port leaves: EDS again, still no route.
    deregister(&c, &s, "echo", "127.0.0.1", a.port).await;
    converge(&e, &c, "echo.default", &["b"], Duration::from_secs(5)).await;
    assert_eq!(
        e.stat(RDS).await.unwrap(),
        rds0,
        "the route was pushed again"
    );
    assert_eq!(
        e.stat("http.OUTBOUND_HTTP.rds.polaris-outbound-router.update_rejected")
            .await
            .unwrap_or(0),
        0
    );
}

/// Namespace names PolarisMesh allows that are not DNS labels (capitals, `_`, `.`) work through
/// Envoy: clusters carry the namespace verbatim, and Envoy matches hosts case-insensitively.
#[tokio::test]
async fn envoy_routes_services_of_namespaces_that_are_not_dns_labels() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).await;
    let c = reqwest::Client::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (st, body) = post(
        &c,
        &s.url("/naming/v1/namespaces"),
        json!([{"name": "team_a.Prod"}]),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    for (ns, port) in [("Production", a.port), ("team_a.Prod", b.port)] {
        let (st, body) = post(
            &c,
            &s.url("/naming/v1/instances"),
            json!([{"namespace": ns, "service": "echo", "host": "127.0.0.1", "port": port}]),
        )
        .await;
        assert_eq!(st, 200, "{body}");
    }
    let e = Envoy::start_with(
        dir.path(),
        "sidecar~Production/caps~127.0.0.1",
        s.xds_port,
        false,
        &["sidecar.polarismesh.cn/visibleNamespaces=team_a.Prod"],
    )
    .await;
    for host in [
        "echo",
        "echo.Production",
        "echo.production",
        "ECHO.PRODUCTION.svc.cluster.local:80",
    ] {
        converge(&e, &c, host, &["a"], Duration::from_secs(10)).await;
    }
    for host in ["echo.team_a.Prod", "echo.team_a.prod:8080"] {
        converge(&e, &c, host, &["b"], Duration::from_secs(10)).await;
    }
    assert_eq!(
        e.stat("cluster_manager.cds.update_rejected")
            .await
            .unwrap_or(0),
        0
    );
}
