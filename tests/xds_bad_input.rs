//! The ADS and REST ports under bad input: every malformed request gets a status that says what was
//! wrong, other streams and real proxies are not disturbed, connections that send nothing are
//! closed, the number of open connections is bounded, and memory stays bounded whatever arrives.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{frame, Ended, RawConn, Rng, DELTA, SOTW};
use common::{get, post, Backend, Envoy, Server};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use serde_json::json;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

async fn register(c: &reqwest::Client, s: &Server, svc: &str, port: u16) {
    let (st, b) = post(
        c,
        &s.url("/naming/v1/instances"),
        json!([{"namespace": "default", "service": svc, "host": "127.0.0.1", "port": port}]),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

async fn metric(c: &reqwest::Client, s: &Server, line: &str) -> u64 {
    let text = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line}"))
}

/// A stream that is told what was wrong, for each kind of bad request, on both ADS methods; a
/// well-behaved stream on the same connection keeps receiving updates meanwhile.
#[tokio::test]
async fn bad_requests_end_their_stream_with_a_status_and_other_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &["--xds-max-request-bytes", "65536"]).await;
    let c = reqwest::Client::new();
    register(&c, &s, "svc-0", 9000).await;
    let mut conn = RawConn::connect(s.xds_port).await;
    let mut good = conn.grpc(DELTA).await;
    good.send_msg(&DeltaDiscoveryRequest {
        node: Some(node("good")),
        type_url: CDS.into(),
        ..Default::default()
    });
    let r: DeltaDiscoveryResponse = good.next().await.unwrap();
    assert_eq!(r.resources.len(), 1);
    let mut services = 1;
    let valid_sotw = DiscoveryRequest {
        node: Some(node("bad-node")),
        type_url: CDS.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let valid_delta = DeltaDiscoveryRequest {
        node: Some(node("bad-node")),
        type_url: CDS.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let cases: Vec<(&str, Vec<u8>, i32, &str)> = vec![
        (
            "garbage",
            frame(false, &[0xff, 0xff, 0xff, 0xff]),
            3,
            "not a",
        ),
        (
            "oversized",
            {
                let mut w = vec![0];
                w.extend((65_537u32).to_be_bytes());
                w.extend([0u8; 100]);
                w
            },
            8,
            "65537 bytes exceeds the limit of 65536",
        ),
        ("compressed", frame(true, &valid_sotw), 12, "compressed"),
    ];
    for path in [SOTW, DELTA] {
        for (what, wire, code, says) in &cases {
            let mut bad = conn.grpc(path).await;
            bad.send_raw(wire.clone());
            let end = bad.next::<DiscoveryResponse>().await.unwrap_err();
            assert_eq!(end.code, *code, "{path} {what}: {end:?}");
            assert!(end.message.contains(says), "{path} {what}: {end:?}");
            // The good stream on the same connection still gets every update.
            register(&c, &s, &format!("svc-{services}"), 9000).await;
            services += 1;
            let r: DeltaDiscoveryResponse = good.next().await.unwrap();
            assert_eq!(r.type_url, CDS, "{path} {what}");
            good.send_msg(&DeltaDiscoveryRequest {
                type_url: CDS.into(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            });
        }
        // A garbage request after a valid first one: logged with the node.
        let mut bad = conn.grpc(path).await;
        bad.send_raw(frame(
            false,
            if path == SOTW {
                &valid_sotw
            } else {
                &valid_delta
            },
        ));
        bad.send_raw(frame(false, &[0xff, 0xff, 0xff, 0xff]));
        let end = loop {
            match bad.next::<DiscoveryResponse>().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(end.code, 3, "{end:?}");
        // Not gRPC at all: the HTTP status says so.
        let mut wrong = conn.stream(path, "text/plain").await;
        wrong.send_raw(frame(false, &valid_sotw));
        let _ = wrong.next::<DiscoveryResponse>().await;
        assert_eq!(wrong.http_status, Some(415), "{path}");
    }
    // SotW names are checked for UTF-8 when a request's names differ from the subscription's
    // (they are not split into strings otherwise): still refused, and counted as undecodable.
    let mut bad = conn.grpc(SOTW).await;
    let mut wire = DiscoveryRequest {
        node: Some(node("bad-names")),
        type_url: EDS.into(),
        resource_names: vec!["ok".into(), "zz".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let at = wire.windows(2).position(|w| w == b"zz").unwrap();
    wire[at] = 0xff;
    bad.send_raw(frame(false, &wire));
    let end = bad.next::<DiscoveryResponse>().await.unwrap_err();
    assert_eq!(end.code, 3, "{end:?}");
    assert!(end.message.contains("not UTF-8"), "{end:?}");
    for (kind, n) in [("undecodable", 5), ("too_large", 2), ("compressed", 2)] {
        assert_eq!(
            metric(
                &c,
                &s,
                &format!("polaris_xds_request_errors_total{{kind=\"{kind}\"}}")
            )
            .await,
            n,
            "{kind}"
        );
    }
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("bad xDS request") && l.contains("bad-node")),
        "{log}"
    );
}

/// Reads until the peer closes the connection (EOF or reset); false if it stays open past `limit`.
fn closed_within(tcp: &mut std::net::TcpStream, limit: Duration) -> bool {
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if Instant::now() > deadline {
                    return false;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections that never send a request are closed after the deadline; past the maximum of open
/// connections a new one is closed at once; both on the xDS and the REST port.
#[tokio::test]
async fn silent_connections_are_closed_and_open_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--first-request-timeout-ms",
            "300",
            "--xds-max-connections",
            "12",
            "--http-max-connections",
            "12",
        ],
    )
    .await;
    let c = reqwest::Client::new();
    register(&c, &s, "svc", 9000).await;
    let (xds, http) = (s.xds_port, s.http_port);
    let silent = tokio::task::spawn_blocking(move || {
        let mut conns = Vec::new();
        for i in 0..10 {
            let port = if i % 2 == 0 { xds } else { http };
            let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i % 4 == 0 {
                t.write_all(PREFACE).unwrap();
            }
            conns.push(t);
        }
        conns
            .iter_mut()
            .all(|t| closed_within(t, Duration::from_secs(10)))
    })
    .await
    .unwrap();
    assert!(silent, "a silent connection stayed open");
    for port in ["xds", "http"] {
        assert_eq!(
            metric(
                &c,
                &s,
                &format!("polaris_connections_silent_closed_total{{port=\"{port}\"}}")
            )
            .await,
            5,
            "{port}"
        );
    }
    // Fill the xDS port with connections that did send a request.
    let mut held = Vec::new();
    for i in 0..12 {
        let mut conn = RawConn::connect(xds).await;
        let mut st = conn.grpc(DELTA).await;
        st.send_msg(&DeltaDiscoveryRequest {
            node: Some(node(&format!("holder-{i}"))),
            type_url: CDS.into(),
            ..Default::default()
        });
        let _: DeltaDiscoveryResponse = st.next().await.unwrap();
        held.push((conn, st));
    }
    // They stay open past the deadline (they are not silent).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, nodes) = get(&c, &s.url("/debug/xds/nodes")).await;
    assert_eq!(nodes["count"], 12, "{nodes}");
    // The next one is closed at once.
    let refused = tokio::task::spawn_blocking(move || {
        let mut t = std::net::TcpStream::connect(("127.0.0.1", xds)).unwrap();
        closed_within(&mut t, Duration::from_millis(250))
    })
    .await
    .unwrap();
    assert!(refused, "a connection past the maximum was kept");
    assert!(metric(&c, &s, "polaris_connections_refused_total{port=\"xds\"}").await >= 1);
    // One leaves: there is room again.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let mut conn = RawConn::connect(xds).await;
        let mut st = conn.grpc(DELTA).await;
        st.send_msg(&DeltaDiscoveryRequest {
            node: Some(node("late")),
            type_url: CDS.into(),
            ..Default::default()
        });
        if tokio::time::timeout(
            Duration::from_millis(500),
            st.next::<DeltaDiscoveryResponse>(),
        )
        .await
        .is_ok_and(|r| r.is_ok())
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "no room after a connection left");
    // The REST port: keep-alive connections that made a request count; the 13th is closed.
    let rest_refused = tokio::task::spawn_blocking(move || {
        let mut open = Vec::new();
        // The reqwest client above may hold one pooled connection.
        for _ in 0..11 {
            let mut t = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
            t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 512];
            let n = t.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            open.push(t);
        }
        let mut extra = Vec::new();
        let mut closed = 0;
        for _ in 0..2 {
            let mut t = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
            if closed_within(&mut t, Duration::from_millis(250)) {
                closed += 1;
            }
            extra.push(t);
        }
        closed
    })
    .await
    .unwrap();
    assert!(
        rest_refused >= 1,
        "no REST connection refused past the maximum"
    );
}

/// Byte budget of the fuzz run's server: every bound it has, stated.
const FUZZ_MAX_REQUEST: usize = 1 << 20;
const FUZZ_BUDGET: usize = 8 << 20;
const FUZZ_CONCURRENCY: usize = 120;
/// Asserted peak RSS of the server while it is fuzzed: its idle size (about 30 MiB in a debug
/// build) plus four times the decode budget (a decoded request takes up to about 4 times its wire
/// size) plus, per concurrent connection, its HTTP/2 receive window, send buffer and state (about
/// 200 KiB), rounded up.
const FUZZ_RSS_BOUND_MIB: u64 = 120;

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// One attacking connection: what it sends is chosen by `rng`.
async fn attack(port: u16, rng: &mut Rng) {
    use tokio::io::AsyncWriteExt;
    let strategy = rng.below(11);
    match strategy {
        // Random bytes, no preface.
        0 => {
            if let Ok(mut t) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let n = rng.below(64 << 10) as usize;
                let _ = t.write_all(&rng.bytes(n)).await;
                tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
            }
        }
        // The preface, then random frames (some with a length that lies).
        1 | 2 => {
            if let Ok(mut t) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = t.write_all(PREFACE).await;
                for _ in 0..rng.below(20) {
                    let len = rng.below(if strategy == 2 { 40_000 } else { 2000 }) as usize;
                    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8];
                    f.push(rng.below(10) as u8);
                    f.push(rng.next() as u8);
                    f.extend(((rng.below(8) * 2 + 1) as u32).to_be_bytes());
                    let payload = rng.below(len as u64 + 1) as usize;
                    f.extend(rng.bytes(payload));
                    if t.write_all(&f).await.is_err() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            }
        }
        // Connects and says nothing (closed at the deadline).
        10 => {
            if let Ok(t) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                drop(t);
            }
        }
        // A header block of junk that never ends (CONTINUATION flood).
        3 => {
            if let Ok(mut t) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = t.write_all(PREFACE).await;
                let _ = t.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await; // SETTINGS
                let mut f = vec![0, 0x40, 0, 1, 0x4, 0, 0, 0, 1];
                f.extend(rng.bytes(0x4000));
                let _ = t.write_all(&f).await;
                for _ in 0..40 {
                    let mut f = vec![0, 0x40, 0, 9, 0, 0, 0, 0, 1];
                    f.extend(rng.bytes(0x4000));
                    if t.write_all(&f).await.is_err() {
                        break;
                    }
                }
            }
        }
        // gRPC streams with bad messages.
        _ => {
            let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let Ok((send, conn)) = h2::client::handshake(tcp).await else {
                return;
            };
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut conn = RawConn::from_parts(send);
            for _ in 0..=rng.below(4) {
                let path = if rng.below(2) == 0 { SOTW } else { DELTA };
                let ct = match rng.below(8) {
                    0 => "text/html",
                    1 => "application/grpc+json",
                    _ => "application/grpc",
                };
                let Some(mut st) = conn.try_stream(path, ct).await else {
                    break;
                };
                let body: Vec<u8> = match strategy {
                    // Garbage.
                    4 => {
                        let n = rng.below(3000) as usize;
                        frame(false, &rng.bytes(n))
                    }
                    // Truncated.
                    5 => {
                        let mut w = frame(false, &rng.bytes(2000));
                        w.truncate(rng.below(2000) as usize);
                        w
                    }
                    // Oversized length prefix, part of a body, then the sender stalls.
                    6 => {
                        let mut w = vec![0];
                        w.extend(
                            ((FUZZ_MAX_REQUEST + 1 + rng.below(1 << 30) as usize) as u32)
                                .to_be_bytes(),
                        );
                        w.extend(rng.bytes(1000));
                        w
                    }
                    // Compressed.
                    7 => frame(true, &rng.bytes(100)),
                    // A large but valid request (an EDS subscription naming many clusters),
                    // sometimes just under the limit.
                    _ => {
                        let n = rng.below(30_000) as usize;
                        let req = DiscoveryRequest {
                            node: Some(node("fuzz")),
                            type_url: EDS.into(),
                            resource_names: (0..n)
                                .map(|i| format!("OUTBOUND|default|fuzz-{i}"))
                                .collect(),
                            ..Default::default()
                        };
                        let body = req.encode_to_vec();
                        if body.len() > FUZZ_MAX_REQUEST {
                            frame(false, &body[..FUZZ_MAX_REQUEST.min(body.len())])
                        } else {
                            frame(false, &body)
                        }
                    }
                };
                st.try_send_raw(body);
                let _ = tokio::time::timeout(
                    Duration::from_millis(rng.below(400)),
                    st.next::<DiscoveryResponse>(),
                )
                .await;
            }
            task.abort();
        }
    }
}

/// Random bytes, random HTTP/2 frames, truncated, oversized and compressed gRPC messages, wrong
/// content types and endless header blocks, from many connections at once: a well-behaved client
/// and a real Envoy keep receiving every update, the server stays up, and its memory stays under
/// the stated bound.
#[tokio::test]
async fn fuzz_the_ads_port_while_real_clients_keep_their_updates() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--xds-max-request-bytes",
            &FUZZ_MAX_REQUEST.to_string(),
            "--xds-decode-budget-bytes",
            &FUZZ_BUDGET.to_string(),
            "--first-request-timeout-ms",
            "1000",
        ],
    )
    .await;
    let c = reqwest::Client::new();
    let seed = std::env::var("POLARIS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fuzz seed {seed} (POLARIS_FUZZ_SEED={seed} repeats this run)");
    let a = Backend::start("a").await;
    register(&c, &s, "watched", a.port).await;
    let e = Envoy::start(
        dir.path(),
        "sidecar~default/fuzzed~127.0.0.1",
        s.xds_port,
        false,
    )
    .await;
    // The well-behaved client: delta, CDS and EDS of the watched service.
    let mut good = RawConn::connect(s.xds_port).await;
    let mut g = good.grpc(DELTA).await;
    g.send_msg(&DeltaDiscoveryRequest {
        node: Some(node("well-behaved")),
        type_url: EDS.into(),
        resource_names_subscribe: vec!["OUTBOUND|default|watched".into()],
        ..Default::default()
    });
    let r: DeltaDiscoveryResponse = g.next().await.unwrap();
    assert_eq!(r.resources.len(), 1);
    let idle_rss = rss_mib(s.child.id());
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(idle_rss));
    let sampler = {
        let (stop, peak, pid) = (stop.clone(), peak.clone(), s.child.id());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_mib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let attacks = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..FUZZ_CONCURRENCY)
        .map(|i| {
            let (stop, attacks, port) = (stop.clone(), attacks.clone(), s.xds_port);
            tokio::spawn(async move {
                let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9));
                while !stop.load(Ordering::Relaxed) && attacks.load(Ordering::Relaxed) < 3000 {
                    attacks.fetch_add(1, Ordering::Relaxed);
                    attack(port, &mut rng).await;
                }
            })
        })
        .collect();
    // Meanwhile: one endpoint change every 250 ms; the client sees each one.
    let started = Instant::now();
    for k in 1..=16u16 {
        let port = 20_000 + k;
        register(&c, &s, "watched", port).await;
        let want = 1 + k as usize;
        loop {
            let r: DeltaDiscoveryResponse = g.next().await.unwrap_or_else(|e: Ended| {
                panic!("the well-behaved stream ended during the fuzz: {e:?}")
            });
            g.send_msg(&DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            });
            let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                r.resources[0].resource.as_ref().unwrap().value.as_slice(),
            )
            .unwrap();
            let n: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            if n == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            s.child.id() > 0 && std::fs::metadata(format!("/proc/{}", s.child.id())).is_ok(),
            "the server exited"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "fuzz: {} attacking connections in {:?}, server RSS idle {idle_rss} MiB, peak {peak} MiB (bound {FUZZ_RSS_BOUND_MIB} MiB)",
        attacks.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        peak <= FUZZ_RSS_BOUND_MIB,
        "server RSS peaked at {peak} MiB"
    );
    // Still serving: healthz, and the real Envoy routes to a service registered now.
    let (st, _) = get(&c, &s.url("/healthz")).await;
    assert_eq!(st, 200);
    let late = Backend::start("late").await;
    register(&c, &s, "late", late.port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, body) = e.get(&c, "late.default").await;
        if st == 200 && body == "late" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy does not route after the fuzz: {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            &c,
            &s,
            "polaris_connections_silent_closed_total{port=\"xds\"}"
        )
        .await
            > 0
    );
}
