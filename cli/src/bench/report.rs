//! Recording latencies (hdrhistogram, microseconds) and rendering the report as text or JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The longest latency recorded exactly; longer ones are recorded as this.
const MAX_LATENCY_US: u64 = 120_000_000;

/// A latency histogram in microseconds, 3 significant digits, 1 µs to 120 s.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
        )
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// The summary, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Summary> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Summary {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: ms(self.0.value_at_quantile(0.5)),
            p90_ms: ms(self.0.value_at_quantile(0.9)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
        })
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The api-server URL, or the raw log's description.
    pub target: String,
    pub workload: String,
    /// `closed` (each worker sends when its previous request is answered) or `open` (a fixed
    /// rate; latency counted from each request's intended send time).
    pub mode: String,
    pub concurrency: usize,
    /// The open loop's rate, requests per second.
    pub rate: Option<f64>,
    pub keys: u64,
    pub zipf: f64,
    pub doc_bytes: usize,
    /// Wall time of the measured phase.
    pub duration_s: f64,
    /// Requests answered successfully.
    pub ok: u64,
    /// Requests that failed (any kind).
    pub errors: u64,
    /// Writes refused with 429 by admission control (not counted in `errors`).
    pub throttled: u64,
    /// Successful requests per second.
    pub throughput_ops_s: f64,
    /// Successful writes (documents or transactions) per second.
    pub writes_per_s: f64,
    /// Successful reads per second.
    pub reads_per_s: f64,
    /// Every successful request.
    pub latency: Option<Summary>,
    /// By operation (`read`, `put`, `patch`, `transfer`, `append`).
    pub by_op: BTreeMap<String, Summary>,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// From a write's acknowledgement until a read with `Causeway-After: <ts>` saw it (sampled).
    pub visibility_lag: Option<Summary>,
    /// Open loop only: requests the schedule asked for within the duration, and those sent.
    pub intended: Option<u64>,
    pub sent: Option<u64>,
    /// The load phase: documents written first, and how long it took.
    pub loaded_docs: Option<u64>,
    pub load_s: Option<f64>,
    /// `transfer` only: the bank invariant after the run (every balance summed at one read
    /// timestamp must be 0).
    pub invariant: Option<String>,
    /// `--sustained`: the search for the highest rate that holds the bounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sustained: Option<Sustained>,
}

/// The sustained rate: the highest open-loop rate at which the write p99 and the visibility lag
/// p99 stayed under their bounds for a whole step, with no error and no 429. A closed-loop rate
/// whose lag grows without bound is not one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sustained {
    pub max_p99_ms: f64,
    pub max_lag_p99_ms: f64,
    /// The offered rate of the best step that held, if any did.
    pub rate: Option<f64>,
    /// What that step achieved.
    pub ops_per_s: Option<f64>,
    pub steps: Vec<Step>,
}

/// One open-loop step of the search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub rate: f64,
    pub ops_per_s: f64,
    pub p99_ms: Option<f64>,
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub lag_samples: u64,
    pub errors: u64,
    pub throttled: u64,
    /// Requests sent of those the schedule asked for.
    pub sent_fraction: f64,
    pub held: bool,
}

/// Fewest visibility probes a step needs for its lag p99 to count.
const MIN_LAG_SAMPLES: u64 = 20;

impl Step {
    /// The step of an open-loop `report` at `rate`, judged against the bounds (write p99 and
    /// visibility lag p99, in ms).
    pub fn of(report: &Report, rate: f64, max_p99_ms: f64, max_lag_p99_ms: f64) -> Step {
        let p99_ms = report.latency.as_ref().map(|l| l.p99_ms);
        let lag = report.visibility_lag.as_ref();
        let lag_samples = lag.map_or(0, |l| l.count);
        let sent_fraction = match (report.sent, report.intended) {
            (Some(sent), Some(intended)) if intended > 0 => sent as f64 / intended as f64,
            _ => 0.0,
        };
        let held = report.errors == 0
            && report.throttled == 0
            && sent_fraction >= 0.99
            && p99_ms.is_some_and(|p| p <= max_p99_ms)
            && lag_samples >= MIN_LAG_SAMPLES
            && lag.is_some_and(|l| l.p99_ms <= max_lag_p99_ms);
        Step {
            rate,
            ops_per_s: report.throughput_ops_s,
            p99_ms,
            lag_p50_ms: lag.map(|l| l.p50_ms),
            lag_p99_ms: lag.map(|l| l.p99_ms),
            lag_samples,
            errors: report.errors,
            throttled: report.throttled,
            sent_fraction,
            held,
        }
    }
}

fn line(name: &str, s: &Summary) -> String {
    format!(
        "  {name:<14} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
        s.count, s.mean_ms, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
    )
}

/// The human-readable report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let mode = match r.rate {
        Some(rate) => format!(
            "open loop at {rate} req/s, at most {} in flight",
            r.concurrency
        ),
        None => format!("closed loop, {} workers", r.concurrency),
    };
    out.push_str(&format!(
        "{} on {}: {mode}\n  {} keys, zipf {}, {} B documents, {:.1} s\n",
        r.workload, r.target, r.keys, r.zipf, r.doc_bytes, r.duration_s
    ));
    if let (Some(docs), Some(s)) = (r.loaded_docs, r.load_s) {
        out.push_str(&format!("  loaded {docs} documents first in {s:.1} s\n"));
    }
    out.push_str(&format!(
        "\nthroughput  {:.0} ops/s ({:.0} writes/s, {:.0} reads/s); {} ok, {} errors\n",
        r.throughput_ops_s, r.writes_per_s, r.reads_per_s, r.ok, r.errors
    ));
    if let (Some(intended), Some(sent)) = (r.intended, r.sent) {
        out.push_str(&format!(
            "open loop   {sent} of {intended} scheduled requests sent\n"
        ));
    }
    out.push_str("\nlatency (ms)        count      mean       p50       p99      p999       max\n");
    if let Some(all) = &r.latency {
        out.push_str(&line("all", all));
    }
    for (op, s) in &r.by_op {
        out.push_str(&line(op, s));
    }
    if let Some(lag) = &r.visibility_lag {
        out.push_str(&line("visibility lag", lag));
    }
    if r.throttled > 0 {
        out.push_str(&format!(
            "\nthrottled   {} writes refused with 429\n",
            r.throttled
        ));
    }
    if let Some(s) = &r.sustained {
        out.push_str(&format!(
            "\nsustained rate (write p99 <= {} ms, visibility lag p99 <= {} ms): {}\n",
            s.max_p99_ms,
            s.max_lag_p99_ms,
            match (s.rate, s.ops_per_s) {
                (Some(rate), Some(ops)) => format!("{rate:.0} offered, {ops:.0} ops/s"),
                _ => "none of the rates tried".into(),
            }
        ));
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        for step in &s.steps {
            out.push_str(&format!(
                "  {:>8.0}/s: {:>8.0} ops/s  p99 {:>8}  lag p50 {:>8} p99 {:>8} ({} probes)  {} errors  {} throttled  {}\n",
                step.rate,
                step.ops_per_s,
                ms(step.p99_ms),
                ms(step.lag_p50_ms),
                ms(step.lag_p99_ms),
                step.lag_samples,
                step.errors,
                step.throttled,
                if step.held { "held" } else { "not held" }
            ));
        }
    }
    if !r.errors_by_kind.is_empty() {
        out.push_str("\nerrors\n");
        for (kind, n) in &r.errors_by_kind {
            out.push_str(&format!("  {kind:<40} {n}\n"));
        }
    }
    if let Some(inv) = &r.invariant {
        out.push_str(&format!("\nbank invariant: {inv}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut h = Latencies::default();
        assert_eq!(h.summary(), None);
        // 1..=1000 ms, one sample each.
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary().unwrap();
        assert_eq!(s.count, 1000);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.001;
        assert!(close(s.p50_ms, 500.0), "{s:?}");
        assert!(close(s.p99_ms, 990.0), "{s:?}");
        assert!(close(s.p999_ms, 999.0), "{s:?}");
        assert!(close(s.max_ms, 1000.0), "{s:?}");
        assert!(close(s.mean_ms, 500.5), "{s:?}");
    }

    #[test]
    fn extremes_are_clamped() {
        let mut a = Latencies::default();
        a.record(Duration::ZERO);
        a.record(Duration::from_secs(3600));
        a.record(Duration::from_micros(250));
        let s = a.summary().unwrap();
        assert_eq!(s.count, 3);
        assert!(s.max_ms <= MAX_LATENCY_US as f64 / 1000.0 * 1.001, "{s:?}");
        assert!(s.max_ms >= 119_000.0, "{s:?}");
        assert!((s.p50_ms - 0.25).abs() < 0.001, "{s:?}");
    }

    /// An open-loop report of 5000 requests at 1000/s, every latency and lag 2 ms (`lags`
    /// probes).
    fn open_report(lags: u64) -> Report {
        let mut h = Latencies::default();
        h.record(Duration::from_millis(2));
        let s = h.summary().unwrap();
        let mut lag = Latencies::default();
        for _ in 0..lags {
            lag.record(Duration::from_millis(2));
        }
        Report {
            target: "http://127.0.0.1:7300".into(),
            workload: "ycsb-a".into(),
            mode: "open".into(),
            concurrency: 8,
            rate: Some(1000.0),
            keys: 100,
            zipf: 0.99,
            doc_bytes: 256,
            duration_s: 5.0,
            ok: 4990,
            errors: 10,
            throttled: 0,
            throughput_ops_s: 998.0,
            writes_per_s: 499.0,
            reads_per_s: 499.0,
            latency: Some(s.clone()),
            by_op: BTreeMap::from([("read".to_string(), s.clone())]),
            errors_by_kind: BTreeMap::from([("503 overloaded".to_string(), 10)]),
            visibility_lag: lag.summary(),
            intended: Some(5000),
            sent: Some(5000),
            loaded_docs: Some(100),
            load_s: Some(0.5),
            invariant: None,
            sustained: None,
        }
    }

    #[test]
    fn a_step_holds_only_within_every_bound() {
        let mut clean = open_report(100);
        clean.errors = 0;
        clean.errors_by_kind.clear();
        assert!(Step::of(&clean, 1000.0, 50.0, 20.0).held);
        assert!(
            !Step::of(&clean, 1000.0, 1.0, 20.0).held,
            "write p99 over the bound"
        );
        assert!(
            !Step::of(&clean, 1000.0, 50.0, 1.0).held,
            "lag p99 over the bound"
        );
        let few = Report {
            errors: 0,
            ..open_report(5)
        };
        assert!(
            !Step::of(&few, 1000.0, 50.0, 20.0).held,
            "too few probes to judge the lag"
        );
        let throttled = Report {
            throttled: 1,
            ..clean.clone()
        };
        assert!(!Step::of(&throttled, 1000.0, 50.0, 20.0).held, "a 429");
        let failed = Report {
            errors: 1,
            ..clean.clone()
        };
        assert!(!Step::of(&failed, 1000.0, 50.0, 20.0).held, "an error");
        let behind = Report {
            sent: Some(4000),
            ..clean
        };
        assert!(
            !Step::of(&behind, 1000.0, 50.0, 20.0).held,
            "the schedule not kept"
        );
    }

    #[test]
    fn the_report_renders_every_part_and_serialises() {
        let report = open_report(1);
        let text = render(&report);
        for needle in [
            "open loop at 1000 req/s",
            "998 ops/s",
            "5000 of 5000 scheduled",
            "visibility lag",
            "503 overloaded",
            "2.00",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latency"]["p99_ms"], 2.0);
        assert_eq!(json["errors_by_kind"]["503 overloaded"], 10);
    }
}
