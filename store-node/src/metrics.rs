//! The store node's metrics, rendered as Prometheus text on the admin port. Names follow
//! `causeway_store_<name>_<unit>`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
        );
    }
}

/// Counters and histograms the node's tasks update.
#[derive(Debug, Default)]
pub struct Metrics {
    pub applied_records_total: AtomicU64,
    pub skipped_mutations_total: AtomicU64,
    pub aborted_transactions_total: AtomicU64,
    pub vote_waits_total: AtomicU64,
    pub apply_batches_total: AtomicU64,
    pub gc_pruned_versions_total: AtomicU64,
    pub gossip_sent_total: AtomicU64,
    pub gossip_send_errors_total: AtomicU64,
    pub gossip_strangers: AtomicU64,
    pub snapshot_too_old_retries_total: AtomicU64,
    pub backfill_chunks_sent_total: AtomicU64,
    pub backfill_records_sent_total: AtomicU64,
    pub backfill_records_received_total: AtomicU64,
    pub backfill_bytes_received_total: AtomicU64,
    pub backfill_intervals_done_total: AtomicU64,
    pub apply_batch_seconds: Histogram,
    pub read_seconds: Histogram,
    pub query_seconds: Histogram,
    pub sub_read_seconds: Histogram,
}

/// The gauges, read from the node's state when rendering.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub committed_ts: u64,
    pub ust_ts: u64,
    pub gc_ts: u64,
    pub log_next_ts: u64,
    pub current_epoch: u64,
    pub next_epoch: u64,
    pub routing_epoch: u64,
    pub peers_alive: u64,
    pub peers_known: u64,
    pub active_reads: u64,
    pub cached_documents: u64,
}

impl Metrics {
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let log_end = g.log_next_ts.saturating_sub(1);
        let gauges = [
            (
                "committed_ts",
                g.committed_ts,
                "highest ts applied and fsynced",
            ),
            (
                "ust_ts",
                g.ust_ts,
                "universally stable timestamp of the routing configuration",
            ),
            (
                "gc_ts",
                g.gc_ts,
                "GC timestamp: versions no read at or above it sees are pruned",
            ),
            ("log_end_ts", log_end, "newest ts of the log, as last seen"),
            (
                "log_end_lag_ts",
                log_end.saturating_sub(g.committed_ts),
                "log records not yet applied",
            ),
            (
                "visibility_lag_ts",
                log_end.saturating_sub(g.ust_ts),
                "log records not yet visible at the UST",
            ),
            (
                "current_epoch",
                g.current_epoch,
                "epoch of the current configuration",
            ),
            (
                "next_epoch",
                g.next_epoch,
                "epoch of the transition running, 0 when none runs",
            ),
            (
                "routing_epoch",
                g.routing_epoch,
                "epoch in which new reads are coordinated",
            ),
            (
                "peers_alive",
                g.peers_alive,
                "peers heard from within the liveness timeout",
            ),
            ("peers_known", g.peers_known, "peers ever heard from"),
            ("active_reads", g.active_reads, "reads running on this node"),
            (
                "cached_documents",
                g.cached_documents,
                "documents in the apply cache",
            ),
        ];
        for (name, value, help) in gauges {
            let _ = writeln!(
                out,
                "# HELP causeway_store_{name} {help}\n# TYPE causeway_store_{name} gauge\ncauseway_store_{name} {value}"
            );
        }
        let counters = [
            (
                "applied_records_total",
                &self.applied_records_total,
                "log records applied",
            ),
            (
                "skipped_mutations_total",
                &self.skipped_mutations_total,
                "transactions skipped whole as invalid",
            ),
            (
                "aborted_transactions_total",
                &self.aborted_transactions_total,
                "transactions aborted by a condition or the size limit, decided on this node",
            ),
            (
                "vote_waits_total",
                &self.vote_waits_total,
                "times apply stopped at a transaction to obtain other partitions' votes",
            ),
            (
                "apply_batches_total",
                &self.apply_batches_total,
                "WriteBatches applied",
            ),
            (
                "gc_pruned_versions_total",
                &self.gc_pruned_versions_total,
                "versions removed by GC",
            ),
            (
                "gossip_sent_total",
                &self.gossip_sent_total,
                "gossip messages sent",
            ),
            (
                "gossip_send_errors_total",
                &self.gossip_send_errors_total,
                "gossip messages that failed",
            ),
            (
                "gossip_strangers_total",
                &self.gossip_strangers,
                "gossip messages ignored: from a node in no configuration",
            ),
            (
                "snapshot_too_old_retries_total",
                &self.snapshot_too_old_retries_total,
                "coordinated reads retried after SnapshotTooOld",
            ),
            (
                "backfill_chunks_sent_total",
                &self.backfill_chunks_sent_total,
                "backfill chunks streamed to nodes of a next configuration",
            ),
            (
                "backfill_records_sent_total",
                &self.backfill_records_sent_total,
                "version records streamed by backfill",
            ),
            (
                "backfill_records_received_total",
                &self.backfill_records_received_total,
                "version records ingested by backfill",
            ),
            (
                "backfill_bytes_received_total",
                &self.backfill_bytes_received_total,
                "bytes of version records ingested by backfill",
            ),
            (
                "backfill_intervals_done_total",
                &self.backfill_intervals_done_total,
                "gained intervals backfilled, verified and replayed",
            ),
        ];
        for (name, value, help) in counters {
            let _ = writeln!(
                out,
                "# HELP causeway_store_{name} {help}\n# TYPE causeway_store_{name} counter\ncauseway_store_{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.apply_batch_seconds.render(
            &mut out,
            "causeway_store_apply_batch_seconds",
            "",
            "time to apply and fsync one batch",
        );
        self.read_seconds.render(
            &mut out,
            "causeway_store_read_seconds",
            "kind=\"read\"",
            "coordinated read latency",
        );
        self.query_seconds.render(
            &mut out,
            "causeway_store_query_seconds",
            "kind=\"query\"",
            "coordinated query latency",
        );
        self.sub_read_seconds.render(
            &mut out,
            "causeway_store_sub_read_seconds",
            "",
            "replica sub-read latency",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_render_as_prometheus_text() {
        let text = Metrics::default().render(&Gauges {
            committed_ts: 90,
            ust_ts: 80,
            gc_ts: 70,
            log_next_ts: 101,
            current_epoch: 3,
            next_epoch: 4,
            routing_epoch: 3,
            peers_alive: 2,
            peers_known: 3,
            active_reads: 0,
            cached_documents: 5,
        });
        for line in [
            "causeway_store_committed_ts 90",
            "causeway_store_ust_ts 80",
            "causeway_store_log_end_lag_ts 10",
            "causeway_store_visibility_lag_ts 20",
            "causeway_store_next_epoch 4",
            "# TYPE causeway_store_next_epoch gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
