//! The api-server's metrics, rendered as Prometheus text at `/metrics`. Names follow
//! `causeway_api_<name>_<unit>`:
//!
//! - `causeway_api_requests_total{route,method,status}`: requests answered.
//! - `causeway_api_request_duration_seconds{route,method,status}`: a histogram of latencies.
//! - `causeway_api_requests_in_flight`: requests being served now.
//! - `causeway_api_log_appends_total` / `causeway_api_log_append_errors_total`: transactions
//!   appended to the log, and appends that failed.
//! - `causeway_api_store_failovers_total`: store-node calls retried or hedged on another node.
//! - `causeway_api_writes_throttled_total`: writes refused by admission control (429).
//! - `causeway_api_visibility_lag_ms`, `causeway_api_visibility_backlog_records`,
//!   `causeway_api_admitted_writes_per_second`: what admission control last measured, and the
//!   rate it admits writes at (`+Inf` when it does not limit them).
//!
//! `route` is the route's pattern (`/v1/collections/{collection}/documents/{id}`), never the
//! raw path, so label cardinality stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
struct Series {
    count: u64,
    sum_seconds: f64,
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [u64; BUCKETS.len() + 1],
}

/// The metrics of one api-server.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), Series>>,
    in_flight: AtomicI64,
    log_appends: AtomicU64,
    log_append_errors: AtomicU64,
    /// Counted by the store-node client (`StoreNodes`).
    pub store_failovers: Arc<AtomicU64>,
    writes_throttled: AtomicU64,
    visibility_lag_ms: AtomicU64,
    visibility_backlog: AtomicU64,
    /// `None`: no limit.
    admitted_limit: Mutex<Option<f64>>,
    change_streams: AtomicI64,
    change_streams_slow: AtomicU64,
}

impl Metrics {
    /// Records one answered request.
    pub fn observe(&self, route: &str, method: &str, status: u16, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let series = requests
            .entry((route.to_owned(), method.to_owned(), status))
            .or_default();
        series.count += 1;
        series.sum_seconds += seconds;
        let slot = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        series.buckets[slot] += 1;
    }

    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn log_append(&self, ok: bool) {
        if ok {
            self.log_appends.fetch_add(1, Ordering::Relaxed);
        } else {
            self.log_append_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A change stream opened (`1`) or ended (`-1`).
    pub fn change_stream(&self, delta: i64) {
        self.change_streams.fetch_add(delta, Ordering::Relaxed);
    }

    /// A change stream's client was disconnected for reading too slowly.
    pub fn change_stream_slow(&self) {
        self.change_streams_slow.fetch_add(1, Ordering::Relaxed);
    }

    pub fn throttled(&self) {
        self.writes_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// What admission control measured last.
    pub fn set_admission(&self, lag_ms: u64, backlog: u64, limit: Option<f64>) {
        self.visibility_lag_ms.store(lag_ms, Ordering::Relaxed);
        self.visibility_backlog.store(backlog, Ordering::Relaxed);
        *self
            .admitted_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = limit;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(
            "# HELP causeway_api_requests_total Requests answered, by route, method and status.\n",
        );
        out.push_str("# TYPE causeway_api_requests_total counter\n");
        for ((route, method, status), s) in requests.iter() {
            let _ = writeln!(
                out,
                "causeway_api_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                escape(method),
                s.count
            );
        }
        out.push_str("# HELP causeway_api_request_duration_seconds Request latency, by route, method and status.\n");
        out.push_str("# TYPE causeway_api_request_duration_seconds histogram\n");
        for ((route, method, status), s) in requests.iter() {
            let labels = format!(
                "route=\"{}\",method=\"{}\",status=\"{status}\"",
                escape(route),
                escape(method)
            );
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += s.buckets[i];
                let _ = writeln!(
                    out,
                    "causeway_api_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += s.buckets[BUCKETS.len()];
            let _ = writeln!(
                out,
                "causeway_api_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "causeway_api_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_seconds
            );
            let _ = writeln!(
                out,
                "causeway_api_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
        drop(requests);
        let simple = [
            (
                "causeway_api_requests_in_flight",
                "gauge",
                "Requests being served now.",
                self.in_flight.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_log_appends_total",
                "counter",
                "Transactions appended to the log.",
                self.log_appends.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_log_append_errors_total",
                "counter",
                "Log appends that failed.",
                self.log_append_errors.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_store_failovers_total",
                "counter",
                "Store-node calls retried or hedged on another node.",
                self.store_failovers.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_writes_throttled_total",
                "counter",
                "Writes refused by admission control (429).",
                self.writes_throttled.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_change_streams",
                "gauge",
                "Change streams (server-sent events) open now.",
                self.change_streams.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_change_streams_slow_total",
                "counter",
                "Change streams ended because the client read too slowly.",
                self.change_streams_slow.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_visibility_lag_ms",
                "gauge",
                "How long the oldest record not yet visible has been in the log.",
                self.visibility_lag_ms.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_visibility_backlog_records",
                "gauge",
                "Records in the log past the highest UST view of the coordinating nodes.",
                self.visibility_backlog.load(Ordering::Relaxed).to_string(),
            ),
            (
                "causeway_api_admitted_writes_per_second",
                "gauge",
                "The rate admission control admits writes at (+Inf: no limit).",
                match *self
                    .admitted_limit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                {
                    Some(limit) => format!("{limit:.1}"),
                    None => "+Inf".into(),
                },
            ),
        ];
        for (name, kind, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let m = Metrics::default();
        m.observe("/healthz", "GET", 200, Duration::from_micros(100));
        m.observe("/healthz", "GET", 200, Duration::from_millis(30));
        m.observe("/healthz", "GET", 200, Duration::from_secs(60));
        let text = m.render();
        let labels = "route=\"/healthz\",method=\"GET\",status=\"200\"";
        assert!(text.contains(&format!("causeway_api_requests_total{{{labels}}} 3")));
        assert!(text.contains(&format!(
            "causeway_api_request_duration_seconds_bucket{{{labels},le=\"0.0005\"}} 1"
        )));
        assert!(text.contains(&format!(
            "causeway_api_request_duration_seconds_bucket{{{labels},le=\"0.05\"}} 2"
        )));
        assert!(text.contains(&format!(
            "causeway_api_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 3"
        )));
        assert!(text.contains(&format!(
            "causeway_api_request_duration_seconds_count{{{labels}}} 3"
        )));
    }
}
