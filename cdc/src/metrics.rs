//! The cdc service's Prometheus metrics (`causeway_cdc_*`), per feed:
//! - `causeway_cdc_events_total`: events delivered (acknowledged by the sink).
//! - `causeway_cdc_batches_total`: batches delivered.
//! - `causeway_cdc_lag_ts`: how many ts the feed's resolved ts is behind the UST.
//! - `causeway_cdc_lag_ms`: how long ago the UST passed the feed's resolved ts (to within the
//!   resolved interval).
//! - `causeway_cdc_delivery_lag_ms`: commit (the record's wall clock) to acknowledgement of
//!   change events, a histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the delivery lag histogram, in ms.
const BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 60_000,
];

#[derive(Debug, Default)]
pub struct FeedMetrics {
    events: AtomicU64,
    batches: AtomicU64,
    lag_ts: AtomicU64,
    lag_ms: AtomicU64,
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    lag_sum_ms: AtomicU64,
    lag_count: AtomicU64,
}

impl FeedMetrics {
    pub fn delivered(&self, events: u64, lags_ms: &[u64]) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        for &l in lags_ms {
            let i = BUCKETS_MS
                .iter()
                .position(|&b| l <= b)
                .unwrap_or(BUCKETS_MS.len());
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
            self.lag_sum_ms.fetch_add(l, Ordering::Relaxed);
            self.lag_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn lag(&self, lag_ts: u64, lag_ms: u64) {
        self.lag_ts.store(lag_ts, Ordering::Relaxed);
        self.lag_ms.store(lag_ms, Ordering::Relaxed);
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Renders this feed's lines.
    pub fn render(&self, feed: &str, out: &mut String) {
        let l = |m: &AtomicU64| m.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "causeway_cdc_events_total{{feed=\"{feed}\"}} {}",
            l(&self.events)
        );
        let _ = writeln!(
            out,
            "causeway_cdc_batches_total{{feed=\"{feed}\"}} {}",
            l(&self.batches)
        );
        let _ = writeln!(
            out,
            "causeway_cdc_lag_ts{{feed=\"{feed}\"}} {}",
            l(&self.lag_ts)
        );
        let _ = writeln!(
            out,
            "causeway_cdc_lag_ms{{feed=\"{feed}\"}} {}",
            l(&self.lag_ms)
        );
        let mut cumulative = 0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            cumulative += l(&self.buckets[i]);
            let _ = writeln!(
                out,
                "causeway_cdc_delivery_lag_ms_bucket{{feed=\"{feed}\",le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += l(&self.buckets[BUCKETS_MS.len()]);
        let _ = writeln!(
            out,
            "causeway_cdc_delivery_lag_ms_bucket{{feed=\"{feed}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "causeway_cdc_delivery_lag_ms_sum{{feed=\"{feed}\"}} {}",
            l(&self.lag_sum_ms)
        );
        let _ = writeln!(
            out,
            "causeway_cdc_delivery_lag_ms_count{{feed=\"{feed}\"}} {}",
            l(&self.lag_count)
        );
    }
}

/// The header lines of every metric.
pub fn preamble(out: &mut String) {
    for (name, kind, help) in [
        (
            "causeway_cdc_events_total",
            "counter",
            "Events delivered (acknowledged by the sink).",
        ),
        (
            "causeway_cdc_batches_total",
            "counter",
            "Batches delivered.",
        ),
        (
            "causeway_cdc_lag_ts",
            "gauge",
            "How many ts the feed's resolved ts is behind the UST.",
        ),
        (
            "causeway_cdc_lag_ms",
            "gauge",
            "How long ago the UST passed the feed's resolved ts, in ms.",
        ),
        (
            "causeway_cdc_delivery_lag_ms",
            "histogram",
            "Commit to acknowledgement of change events, in ms.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}
