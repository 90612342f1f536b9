//! Process metrics in the Prometheus text format.
//!
//! Counters and histograms are plain atomics so the hot paths (heartbeats, registrations, xDS pushes)
//! pay one relaxed add. Gauges that describe registry state are computed at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(std::sync::atomic::AtomicI64);

impl Gauge {
    /// Sets it.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connections of one listening port.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    /// Open now.
    pub open: Gauge,
    /// Accepted by the kernel (including those refused right after).
    pub accepted: Counter,
    /// Closed at once: the port had its maximum of open connections.
    pub refused: Counter,
    /// Closed because no request arrived within the deadline.
    pub silent: Counter,
}

/// Why an xDS request could not be decoded; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Not a protobuf message of the expected type.
    Undecodable,
    /// Larger than the configured limit.
    TooLarge,
    /// Compressed (we do not negotiate compression).
    Compressed,
    /// The stream ended, or stalled past the deadline, inside a message.
    Truncated,
}

impl RequestError {
    /// All kinds, in rendering order.
    pub const ALL: [RequestError; 4] = [
        RequestError::Undecodable,
        RequestError::TooLarge,
        RequestError::Compressed,
        RequestError::Truncated,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RequestError::Undecodable => "undecodable",
            RequestError::TooLarge => "too_large",
            RequestError::Compressed => "compressed",
            RequestError::Truncated => "truncated",
        }
    }
}

/// Why the CA refused to sign; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaDenial {
    /// Bad body or CSR (400).
    BadRequest,
    /// No, invalid, expired or wrong-audience token (401).
    Unauthenticated,
    /// The CSR asks for another identity than the token's (403).
    Forbidden,
    /// Too many signs for one identity (429).
    RateLimited,
    /// TokenReview did not answer (503).
    ReviewUnavailable,
    /// Signing failed (500).
    Internal,
}

impl CaDenial {
    /// All reasons, in rendering order.
    pub const ALL: [CaDenial; 6] = [
        CaDenial::BadRequest,
        CaDenial::Unauthenticated,
        CaDenial::Forbidden,
        CaDenial::RateLimited,
        CaDenial::ReviewUnavailable,
        CaDenial::Internal,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CaDenial::BadRequest => "bad_request",
            CaDenial::Unauthenticated => "unauthenticated",
            CaDenial::Forbidden => "forbidden",
            CaDenial::RateLimited => "rate_limited",
            CaDenial::ReviewUnavailable => "review_unavailable",
            CaDenial::Internal => "internal",
        }
    }
}

/// Why the REST API refused a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token (401).
    Missing,
    /// A token that authenticates nothing: unknown, revoked, deleted (401).
    Unknown,
    /// Too many failures from the address (403001).
    RateLimited,
    /// A valid token outside its scope (403).
    Forbidden,
}

impl AuthFailure {
    /// All reasons, in rendering order.
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::Missing,
        AuthFailure::Unknown,
        AuthFailure::RateLimited,
        AuthFailure::Forbidden,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Unknown => "unknown",
            AuthFailure::RateLimited => "rate_limited",
            AuthFailure::Forbidden => "forbidden",
        }
    }
}

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// All process metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Instances registered (each item of a batch counts).
    pub registrations: Counter,
    /// Instances deregistered.
    pub deregistrations: Counter,
    /// Heartbeats accepted.
    pub heartbeats: Counter,
    /// Store commit latency.
    pub commit_seconds: Histogram,
    /// HTTP request latency by method and route.
    requests: RwLock<BTreeMap<(String, String, u16), Histogram>>,
    /// xDS responses sent.
    pub xds_pushes: Counter,
    /// Kubernetes controller reconcile passes.
    pub controller_passes: Counter,
    /// Registry items the Kubernetes controller wrote.
    pub controller_writes: Counter,
    /// Commits of other replicas applied from a shared store's watch.
    pub followed_commits: Counter,
    /// Writes retried because another replica committed first.
    pub store_conflicts: Counter,
    /// Heartbeats passed to the replica that owns their instance.
    pub heartbeats_forwarded: Counter,
    /// Whole reloads of the state from the store (its history compacted past this replica).
    pub store_reloads: Counter,
    /// Commits in the shared store this replica has not applied yet (last measured).
    pub store_watch_lag: Gauge,
    /// Pods the injector patched.
    pub injections: Counter,
    /// xDS NACKs received.
    pub xds_nacks: Counter,
    /// Bytes of xDS resources sent.
    pub xds_bytes: Counter,
    /// xDS requests that ended their stream undecoded, by [`RequestError`].
    xds_request_errors: [Counter; 4],
    /// Rate-limit decisions by rule: (allowed, limited).
    rls: RwLock<BTreeMap<String, (Counter, Counter)>>,
    /// xDS streams refused for their credentials.
    pub xds_auth_refused: Counter,
    /// xDS requests that waited for the decode budget (bytes of requests being decoded at once).
    pub xds_decode_waits: Counter,
    /// Certificates the CA issued.
    pub ca_issued: Counter,
    ca_denied: [Counter; 6],
    auth_failures: [Counter; 4],
    /// Connections of the REST port.
    pub http_conns: std::sync::Arc<ConnMetrics>,
    /// Connections of the xDS port.
    pub xds_conns: std::sync::Arc<ConnMetrics>,
    /// Connections of the CA port.
    pub ca_conns: std::sync::Arc<ConnMetrics>,
    /// Connections of the injector's webhook port.
    pub webhook_conns: std::sync::Arc<ConnMetrics>,
}

/// Instance counts by health, computed at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct InstanceGauges {
    /// Healthy and not isolated.
    pub healthy: u64,
    /// Unhealthy.
    pub unhealthy: u64,
    /// Isolated.
    pub isolated: u64,
    /// Services.
    pub services: u64,
    /// Connected xDS streams.
    pub xds_streams: u64,
}

impl Metrics {
    /// Counts an xDS request that could not be decoded.
    pub fn xds_request_error(&self, kind: RequestError) {
        self.xds_request_errors[kind as usize].inc();
    }

    /// xDS requests that could not be decoded, of one kind.
    pub fn xds_request_errors(&self, kind: RequestError) -> u64 {
        self.xds_request_errors[kind as usize].get()
    }

    /// xDS requests that ended their stream undecoded, of every kind.
    pub fn xds_request_errors_total(&self) -> u64 {
        self.xds_request_errors.iter().map(Counter::get).sum()
    }

    /// Counts a certificate the CA refused.
    pub fn ca_denied(&self, reason: CaDenial) {
        self.ca_denied[reason as usize].inc();
    }

    /// Counts a rate-limit decision of `rule`.
    pub fn rls_decision(&self, rule: &str, allowed: bool) {
        let pick = |c: &(Counter, Counter)| if allowed { c.0.inc() } else { c.1.inc() };
        if let Some(c) = self.rls.read().get(rule) {
            pick(c);
            return;
        }
        let mut m = self.rls.write();
        pick(m.entry(rule.to_string()).or_default());
    }

    /// Rate-limit decisions of `rule`: (allowed, limited).
    pub fn rls_decisions(&self, rule: &str) -> (u64, u64) {
        self.rls
            .read()
            .get(rule)
            .map_or((0, 0), |c| (c.0.get(), c.1.get()))
    }

    /// Counts a refused credential.
    pub fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures[reason as usize].inc();
    }

    /// Credentials refused for `reason`.
    pub fn auth_failures(&self, reason: AuthFailure) -> u64 {
        self.auth_failures[reason as usize].get()
    }

    /// Certificates refused for `reason`.
    pub fn ca_denials(&self, reason: CaDenial) -> u64 {
        self.ca_denied[reason as usize].get()
    }

    /// Records one HTTP request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, secs: f64) {
        let key = (method.to_string(), route.to_string(), status);
        if let Some(h) = self.requests.read().get(&key) {
            h.observe(secs);
            return;
        }
        self.requests.write().entry(key).or_default().observe(secs);
    }

    /// Renders everything in the Prometheus text format.
    pub fn render(&self, g: InstanceGauges) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "polaris_registrations_total",
            "Instances registered.",
            self.registrations.get(),
        );
        counter(
            &mut out,
            "polaris_deregistrations_total",
            "Instances deregistered.",
            self.deregistrations.get(),
        );
        counter(
            &mut out,
            "polaris_heartbeats_total",
            "Heartbeats accepted.",
            self.heartbeats.get(),
        );
        counter(
            &mut out,
            "polaris_controller_passes_total",
            "Kubernetes controller reconcile passes.",
            self.controller_passes.get(),
        );
        counter(
            &mut out,
            "polaris_store_followed_commits_total",
            "Commits of other replicas applied from the shared store's watch.",
            self.followed_commits.get(),
        );
        counter(
            &mut out,
            "polaris_heartbeats_forwarded_total",
            "Heartbeats passed to the replica that owns their instance (cluster mode).",
            self.heartbeats_forwarded.get(),
        );
        counter(
            &mut out,
            "polaris_store_reloads_total",
            "Whole reloads of the state from the shared store (its history compacted past this replica).",
            self.store_reloads.get(),
        );
        counter(
            &mut out,
            "polaris_store_conflicts_total",
            "Writes planned again because another replica committed first.",
            self.store_conflicts.get(),
        );
        counter(
            &mut out,
            "polaris_controller_writes_total",
            "Registry items the Kubernetes controller wrote (0 on a pass that found nothing changed).",
            self.controller_writes.get(),
        );
        counter(
            &mut out,
            "polaris_injections_total",
            "Pods the sidecar injector patched.",
            self.injections.get(),
        );
        counter(
            &mut out,
            "polaris_xds_pushes_total",
            "xDS responses sent.",
            self.xds_pushes.get(),
        );
        counter(
            &mut out,
            "polaris_xds_nacks_total",
            "xDS responses rejected by clients (NACK).",
            self.xds_nacks.get(),
        );
        counter(
            &mut out,
            "polaris_xds_sent_bytes_total",
            "Bytes of xDS resources sent.",
            self.xds_bytes.get(),
        );
        let _ = writeln!(
            out,
            "# HELP polaris_instances Registered instances by health.\n# TYPE polaris_instances gauge\n\
             polaris_instances{{health=\"healthy\"}} {}\npolaris_instances{{health=\"unhealthy\"}} {}\n\
             polaris_instances{{health=\"isolated\"}} {}",
            g.healthy, g.unhealthy, g.isolated
        );
        let _ = writeln!(
            out,
            "# HELP polaris_services Registered services.\n# TYPE polaris_services gauge\npolaris_services {}",
            g.services
        );
        let _ = writeln!(
            out,
            "# HELP polaris_store_watch_lag_revisions Store revisions committed but not yet applied by this replica (cluster mode; measured every second).\n# TYPE polaris_store_watch_lag_revisions gauge\npolaris_store_watch_lag_revisions {}",
            self.store_watch_lag.get()
        );
        let _ = writeln!(
            out,
            "# HELP polaris_xds_streams Connected xDS streams.\n# TYPE polaris_xds_streams gauge\npolaris_xds_streams {}",
            g.xds_streams
        );
        let _ = writeln!(
            out,
            "# HELP polaris_xds_request_errors_total xDS requests that ended their stream undecoded, by reason.\n# TYPE polaris_xds_request_errors_total counter"
        );
        for k in RequestError::ALL {
            let _ = writeln!(
                out,
                "polaris_xds_request_errors_total{{kind=\"{}\"}} {}",
                k.label(),
                self.xds_request_errors(k)
            );
        }
        counter(
            &mut out,
            "polaris_ca_issued_total",
            "Certificates the CA issued.",
            self.ca_issued.get(),
        );
        let _ = writeln!(
            out,
            "# HELP polaris_ca_denied_total Certificates the CA refused, by reason.\n# TYPE polaris_ca_denied_total counter"
        );
        for r in CaDenial::ALL {
            let _ = writeln!(
                out,
                "polaris_ca_denied_total{{reason=\"{}\"}} {}",
                r.label(),
                self.ca_denials(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP polaris_auth_failures_total REST requests refused for their credentials, by reason.\n# TYPE polaris_auth_failures_total counter"
        );
        for r in AuthFailure::ALL {
            let _ = writeln!(
                out,
                "polaris_auth_failures_total{{reason=\"{}\"}} {}",
                r.label(),
                self.auth_failures(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP polaris_rls_decisions_total Global rate-limit decisions, by rule.\n# TYPE polaris_rls_decisions_total counter"
        );
        for (rule, (ok, limited)) in self.rls.read().iter() {
            let _ = writeln!(
                out,
                "polaris_rls_decisions_total{{rule=\"{rule}\",decision=\"ok\"}} {}\npolaris_rls_decisions_total{{rule=\"{rule}\",decision=\"over_limit\"}} {}",
                ok.get(),
                limited.get()
            );
        }
        counter(
            &mut out,
            "polaris_xds_auth_refused_total",
            "xDS streams refused for their credentials (none, unknown, expired, wrong trust domain).",
            self.xds_auth_refused.get(),
        );
        counter(
            &mut out,
            "polaris_xds_decode_budget_waits_total",
            "xDS requests that waited because the bytes of requests being decoded at once reached the budget.",
            self.xds_decode_waits.get(),
        );
        for (name, help, get) in [
            (
                "polaris_connections_accepted_total",
                "Connections accepted, by port.",
                (|c: &ConnMetrics| c.accepted.get() as i64) as fn(&ConnMetrics) -> i64,
            ),
            (
                "polaris_connections_refused_total",
                "Connections closed at once because the port had its maximum open.",
                |c| c.refused.get() as i64,
            ),
            (
                "polaris_connections_silent_closed_total",
                "Connections closed because no request arrived within the deadline.",
                |c| c.silent.get() as i64,
            ),
            (
                "polaris_connections_open",
                "Open connections, by port.",
                |c| c.open.get(),
            ),
        ] {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (port, c) in [
                ("http", &self.http_conns),
                ("xds", &self.xds_conns),
                ("ca", &self.ca_conns),
                ("webhook", &self.webhook_conns),
            ] {
                let _ = writeln!(out, "{name}{{port=\"{port}\"}} {}", get(c));
            }
        }
        if let Some(h) = heap() {
            let _ = writeln!(
                out,
                "# HELP polaris_heap_allocated_bytes Heap in use.\n# TYPE polaris_heap_allocated_bytes gauge\npolaris_heap_allocated_bytes {}\n\
                 # HELP polaris_heap_resident_bytes Memory the allocator holds from the system.\n# TYPE polaris_heap_resident_bytes gauge\npolaris_heap_resident_bytes {}",
                h.allocated, h.resident
            );
        }
        let _ = writeln!(
            out,
            "# HELP polaris_store_commit_seconds Store commit latency.\n# TYPE polaris_store_commit_seconds histogram"
        );
        self.commit_seconds
            .render(&mut out, "polaris_store_commit_seconds", "");
        let _ = writeln!(
            out,
            "# HELP polaris_http_request_duration_seconds HTTP request latency.\n# TYPE polaris_http_request_duration_seconds histogram"
        );
        for ((method, route, status), h) in self.requests.read().iter() {
            h.render(
                &mut out,
                "polaris_http_request_duration_seconds",
                &format!("method=\"{method}\",route=\"{route}\",status=\"{status}\""),
            );
        }
        out
    }
}

/// Heap figures from the allocator.
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes of physical memory the allocator holds (in use, cached, metadata).
    pub resident: u64,
}

/// Lets jemalloc return freed pages to the system from its own threads, so memory freed after a
/// burst goes back even while the process is idle.
pub fn purge_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc background purging unavailable");
    }
}

/// The allocator's current figures, when jemalloc is the global allocator (the `polaris` binary).
pub fn heap() -> Option<Heap> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()? as u64;
    // Without the global allocator only jemalloc's own bootstrap shows.
    (allocated > 1 << 20).then_some(Heap {
        allocated,
        resident,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_request("GET", "/x", 200, 0.0003);
        m.observe_request("GET", "/x", 200, 0.2);
        let text = m.render(InstanceGauges::default());
        assert!(text.contains(
            "polaris_http_request_duration_seconds_bucket{method=\"GET\",route=\"/x\",status=\"200\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "polaris_http_request_duration_seconds_bucket{method=\"GET\",route=\"/x\",status=\"200\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("polaris_http_request_duration_seconds_count{method=\"GET\",route=\"/x\",status=\"200\"} 2"));
    }
}
