//! The pure side of the admin output: a transition's backfill totals, the time left, progress
//! lines, whether a watched transition has finished, and a configuration as text. No IO here, so
//! every line an operator reads is tested by feeding a status in.

use std::time::Duration;

use causeway_config_manager::ConfigPair;
use causeway_core::{ClusterConfig, KEYSPACE};
use causeway_proto::v1::BackfillStatus;
use serde::Serialize;

/// The backfill for one epoch, summed over the nodes that report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Nodes reporting a backfill for the epoch.
    pub nodes: u32,
    /// Of those, how many have backfilled every interval they gain.
    pub nodes_backfilled: u32,
    pub intervals_done: u64,
    pub intervals_total: u64,
    pub bytes_done: u64,
    /// The sources' estimates of the intervals started so far (0: none known yet).
    pub bytes_estimated: u64,
}

impl Totals {
    /// The totals of the reports for `epoch` (reports of other epochs are stale: left out).
    pub fn of<'a>(epoch: u64, reports: impl IntoIterator<Item = &'a BackfillStatus>) -> Totals {
        let mut t = Totals::default();
        for b in reports.into_iter().filter(|b| b.epoch == epoch) {
            t.nodes += 1;
            t.nodes_backfilled += u32::from(b.backfilled);
            t.intervals_done += u64::from(b.intervals_done);
            t.intervals_total += u64::from(b.intervals_total);
            t.bytes_done += b.bytes_done;
            t.bytes_estimated += b.bytes_estimated;
        }
        t
    }
}

/// The time left, from two samples `elapsed` apart: the rate of bytes backfilled against the
/// bytes estimated, or, while no size is known, the rate of intervals done. `None` while nothing
/// moved between the samples; zero once every interval is done.
pub fn time_left(first: &Totals, second: &Totals, elapsed: Duration) -> Option<Duration> {
    if second.intervals_total > 0 && second.intervals_done >= second.intervals_total {
        return Some(Duration::ZERO);
    }
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let (done_before, done, total) = if second.bytes_estimated > 0 {
        (first.bytes_done, second.bytes_done, second.bytes_estimated)
    } else {
        (
            first.intervals_done,
            second.intervals_done,
            second.intervals_total,
        )
    };
    let rate = done.saturating_sub(done_before) as f64 / secs;
    if rate <= 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        total.saturating_sub(done) as f64 / rate,
    ))
}

/// `1.5 KiB`, `3.2 MiB`…
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `45s`, `3m 05s`, `2h 10m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `3/8 intervals, 1.2 MiB of 4.0 MiB` (bytes: `1.2 MiB so far` while no estimate is known).
pub fn describe(t: &Totals) -> String {
    let bytes_part = if t.bytes_estimated > 0 {
        format!("{} of {}", bytes(t.bytes_done), bytes(t.bytes_estimated))
    } else {
        format!("{} so far", bytes(t.bytes_done))
    };
    format!(
        "{}/{} intervals, {bytes_part}",
        t.intervals_done, t.intervals_total
    )
}

/// One plain progress line (for a terminal that is not a TTY, and for `admin status`).
pub fn progress_line(epoch: u64, phase: &str, t: &Totals, left: Option<Duration>) -> String {
    let left = match left {
        Some(d) => format!(", about {} left", duration(d)),
        None => String::new(),
    };
    if t.nodes == 0 {
        return format!("epoch {epoch}: {phase}, no node reports a backfill yet");
    }
    format!(
        "epoch {epoch}: {phase}, {}, {}/{} nodes backfilled{left}",
        describe(t),
        t.nodes_backfilled,
        t.nodes
    )
}

/// The phases the nodes report, as one text (`-` for none).
pub fn phases(phases: &[String]) -> String {
    if phases.is_empty() {
        "-".into()
    } else {
        phases.join(", ")
    }
}

/// Where a watched transition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The proposed configuration is still next.
    Running,
    /// The current epoch has reached the proposed one.
    Installed,
    /// Next disappeared without being installed.
    Aborted,
    /// Next is another configuration (the proposal was aborted and another made).
    Replaced,
}

/// Where the transition to `proposed` stands, by the pair the config manager holds now.
pub fn outcome(proposed: &ClusterConfig, pair: &ConfigPair) -> Outcome {
    if pair.current_epoch() >= proposed.epoch {
        return Outcome::Installed;
    }
    match &pair.next {
        None => Outcome::Aborted,
        // Marking a node failed amends next without changing its places: still the same.
        Some(next)
            if next.epoch == proposed.epoch
                && next.slicing == proposed.slicing
                && next.replicas == proposed.replicas =>
        {
            Outcome::Running
        }
        Some(_) => Outcome::Replaced,
    }
}

/// A configuration, one line per partition: `p0  50.0%  n1 n2 (n2 failed)`.
pub fn render_config(config: &ClusterConfig) -> String {
    let shares = config.slicing.shares();
    let replicas = config.replicas.values().map(Vec::len).max().unwrap_or(0);
    let mut out = format!(
        "epoch {}: {} partition(s) × {replicas} replica(s)\n",
        config.epoch,
        config.replicas.len()
    );
    for (p, nodes) in &config.replicas {
        let share = shares.get(p).copied().unwrap_or(0) as f64 / KEYSPACE as f64;
        let names: Vec<String> = nodes
            .iter()
            .map(|n| {
                let addr = config.nodes.get(n).map_or("", |i| i.addr.as_str());
                let failed = if config.failed.contains(n) {
                    " (failed)"
                } else {
                    ""
                };
                format!("{n} {addr}{failed}")
            })
            .collect();
        out.push_str(&format!(
            "  p{:<4} {:>6.1}%  {}\n",
            p.0,
            share * 100.0,
            names.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_core::{Epoch, NodeId, NodeInfo};

    fn report(epoch: u64, done: u32, total: u32, bytes_done: u64, est: u64) -> BackfillStatus {
        BackfillStatus {
            epoch,
            intervals_total: total,
            intervals_done: done,
            bytes_done,
            bytes_estimated: est,
            backfilled: done == total,
            ..Default::default()
        }
    }

    #[test]
    fn totals_sum_the_reports_of_the_epoch_only() {
        let reports = [
            report(2, 1, 4, 100, 400),
            report(2, 2, 2, 50, 50),
            report(1, 9, 9, 999, 999),
        ];
        let t = Totals::of(2, &reports);
        assert_eq!(
            t,
            Totals {
                nodes: 2,
                nodes_backfilled: 1,
                intervals_done: 3,
                intervals_total: 6,
                bytes_done: 150,
                bytes_estimated: 450,
            }
        );
        assert_eq!(describe(&t), "3/6 intervals, 150 B of 450 B");
    }

    #[test]
    fn the_time_left_follows_the_byte_rate_then_the_interval_rate() {
        let at = |done, total, bytes_done, est| {
            Totals::of(2, &[report(2, done, total, bytes_done, est)])
        };
        // 1 MiB in 2 s, 2 MiB to go: 4 s.
        let left = time_left(
            &at(0, 4, 1 << 20, 4 << 20),
            &at(1, 4, 2 << 20, 4 << 20),
            Duration::from_secs(2),
        );
        assert_eq!(left, Some(Duration::from_secs(4)));
        // No size known: 1 interval per 5 s, 2 to go.
        let left = time_left(&at(1, 4, 0, 0), &at(2, 4, 0, 0), Duration::from_secs(5));
        assert_eq!(left, Some(Duration::from_secs(10)));
        // Nothing moved: no estimate.
        assert_eq!(
            time_left(&at(1, 4, 10, 40), &at(1, 4, 10, 40), Duration::from_secs(1)),
            None
        );
        // Done.
        assert_eq!(
            time_left(&at(3, 4, 10, 40), &at(4, 4, 40, 40), Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn units_read_as_an_operator_expects() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::from_secs(185)), "3m 05s");
        assert_eq!(duration(Duration::from_secs(7800)), "2h 10m");
    }

    #[test]
    fn a_progress_line_says_the_phase_the_amounts_and_the_time_left() {
        let t = Totals::of(
            3,
            &[report(3, 1, 2, 1 << 20, 4 << 20), report(3, 2, 2, 5, 5)],
        );
        let line = progress_line(3, "backfilling", &t, Some(Duration::from_secs(70)));
        assert_eq!(
            line,
            "epoch 3: backfilling, 3/4 intervals, 1.0 MiB of 4.0 MiB, 1/2 nodes backfilled, about 1m 10s left"
        );
        let none = progress_line(3, "backfilling", &Totals::default(), None);
        assert_eq!(none, "epoch 3: backfilling, no node reports a backfill yet");
        let unknown = Totals::of(3, &[report(3, 0, 2, 0, 0)]);
        assert!(progress_line(3, "x", &unknown, None).contains("0 B so far"));
    }

    fn nodes(ids: std::ops::Range<u64>) -> Vec<NodeInfo> {
        ids.map(|i| NodeInfo {
            id: NodeId(i),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
    }

    #[test]
    fn a_transition_is_installed_aborted_or_replaced_by_the_pair() {
        let current = ClusterConfig::bootstrap(1, 1, &nodes(1..2)).unwrap();
        let proposed = current.next_for_shape(2, 1, &nodes(2..3)).unwrap();
        let pair = |current: &ClusterConfig, next: Option<&ClusterConfig>| ConfigPair {
            revision: 1,
            current: Some(current.clone()),
            next: next.cloned(),
        };
        assert_eq!(
            outcome(&proposed, &pair(&current, Some(&proposed))),
            Outcome::Running
        );
        let amended = proposed.with_failed(NodeId(2)).unwrap();
        assert_eq!(
            outcome(&proposed, &pair(&current, Some(&amended))),
            Outcome::Running
        );
        assert_eq!(outcome(&proposed, &pair(&current, None)), Outcome::Aborted);
        let other = current.next_for_shape(1, 2, &nodes(2..3)).unwrap();
        assert_eq!(
            outcome(&proposed, &pair(&current, Some(&other))),
            Outcome::Replaced
        );
        assert_eq!(
            outcome(&proposed, &pair(&proposed, None)),
            Outcome::Installed
        );
        assert_eq!(proposed.epoch, Epoch(2));
    }

    #[test]
    fn a_configuration_reads_one_partition_a_line() {
        let config = ClusterConfig::bootstrap(2, 2, &nodes(1..5))
            .unwrap()
            .with_failed(NodeId(4))
            .unwrap();
        let text = render_config(&config);
        assert!(
            text.starts_with("epoch 1: 2 partition(s) × 2 replica(s)\n"),
            "{text}"
        );
        assert!(
            text.contains("  p0      50.0%  n1 127.0.0.1:7001, n2 127.0.0.1:7002\n"),
            "{text}"
        );
        assert!(text.contains("n4 127.0.0.1:7004 (failed)"), "{text}");
    }
}
