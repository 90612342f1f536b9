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
    /// xDS NACKs received.
    pub xds_nacks: Counter,
    /// Bytes of xDS resources sent.
    pub xds_bytes: Counter,
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
            "# HELP polaris_xds_streams Connected xDS streams.\n# TYPE polaris_xds_streams gauge\npolaris_xds_streams {}",
            g.xds_streams
        );
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
