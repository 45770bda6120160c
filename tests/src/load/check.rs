//! The history of a load run and its checkers: pure functions from what the clients saw to a
//! [`Report`], so that the same code judges a real run and a fabricated history.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// How many failures a report keeps with their details.
const FIRST_FAILURES: usize = 10;
/// How many violations of each checker a report keeps with their details (all are counted).
const FIRST_VIOLATIONS_PER_CHECK: usize = 10;

/// What a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Creating the bank accounts before the load starts.
    Setup,
    /// A write of a new unique document.
    Write,
    /// A read of an acknowledged document at `Causeway-After` its ts.
    Read,
    /// A transfer between two accounts: one transaction of two increments.
    Transfer,
    /// A snapshot read of every account in one request.
    BankRead,
    /// A transfer between two accounts of the conditional bank, only if the source's balance
    /// covers it: one transaction of two increments and a condition.
    ConditionalTransfer,
    /// A query of every account of the conditional bank (one page, one read timestamp).
    Query,
    /// A causal session's write of its own document.
    SessionWrite,
    /// A causal session's read of its own document with its token.
    SessionRead,
}

impl Kind {
    /// Whether requests of this kind write (the others read).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Kind::Setup
                | Kind::Write
                | Kind::Transfer
                | Kind::ConditionalTransfer
                | Kind::SessionWrite
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Kind::Setup => "setup",
            Kind::Write => "write",
            Kind::Read => "read",
            Kind::Transfer => "transfer",
            Kind::BankRead => "bank read",
            Kind::ConditionalTransfer => "conditional transfer",
            Kind::Query => "query",
            Kind::SessionWrite => "session write",
            Kind::SessionRead => "session read",
        };
        f.write_str(name)
    }
}

/// How a request ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Ok,
    /// A 4xx answer (the load only sends valid requests, so this is a failure too).
    ClientError(u16),
    /// A 5xx answer.
    ServerError(u16),
    /// No answer within the client timeout.
    Timeout,
    /// The connection failed (refused, reset, closed early).
    Connection,
    /// A 2xx answer without what it must carry (a write's ts, a read's read timestamp).
    Malformed,
    /// Not sent: the load already had its maximum of requests in flight, so the servers were
    /// too slow for the rate asked.
    Saturated,
    /// 412: a conditional transfer's condition was false and it aborted, as it may: an answer,
    /// not a failure.
    ConditionFailed,
    /// 429: admission control refused a write (it changed nothing); the load sends it again
    /// after its `Retry-After`, so this is counted, not failed.
    Throttled,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::ConditionFailed)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Throttled => f.write_str("429 (throttled, sent again)"),
            Outcome::ConditionFailed => f.write_str("412 (condition false, aborted)"),
            Outcome::ClientError(s) => write!(f, "{s} (4xx)"),
            Outcome::ServerError(s) => write!(f, "{s} (5xx)"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Connection => f.write_str("connection error"),
            Outcome::Malformed => f.write_str("malformed answer"),
            Outcome::Saturated => f.write_str("not sent: in-flight limit"),
        }
    }
}

/// One request and its outcome.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub kind: Kind,
    /// The base URL of the api-server it went to.
    pub api: String,
    pub outcome: Outcome,
    pub latency: Duration,
    /// Since the load started, when the request was sent.
    pub sent_at: Duration,
    /// The method and path, and for a failure what the server or the client said.
    pub detail: String,
}

/// A write the api-server acknowledged: it must be readable, with this content, at any ts at
/// least `ts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Acknowledged {
    pub collection: String,
    pub id: String,
    pub ts: u64,
    pub document: Value,
}

/// A read of an acknowledged document, at `Causeway-After` its ts.
#[derive(Debug, Clone)]
pub struct ReadObservation {
    pub api: String,
    pub write: Acknowledged,
    /// What the read answered: `None` for 404.
    pub seen: Option<Value>,
}

/// A snapshot read of every account.
#[derive(Debug, Clone)]
pub struct BankRead {
    pub api: String,
    /// `<epoch>.<ts>` as answered.
    pub read_timestamp: String,
    pub total: i64,
    /// Accounts the read did not find.
    pub missing: usize,
}

/// One step of a causal session, in the session's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The session wrote `{"seq": seq}` to its document; `ts` is the commit ts when the write
    /// was acknowledged, `None` when its outcome is unknown (it may or may not have committed).
    Write { seq: u64, ts: Option<u64> },
    /// The session read its document with the token `after`: the read ran at `ts` (the ts of
    /// its read timestamp) and saw `seq` (`None`: not found).
    Read {
        api: String,
        after: u64,
        ts: u64,
        seq: Option<u64>,
    },
}

/// Everything the clients of a load saw.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub requests: Vec<RequestRecord>,
    /// The sum of the balances, fixed at the start: every snapshot read must see it.
    pub bank_total: i64,
    pub bank_reads: Vec<BankRead>,
    pub reads: Vec<ReadObservation>,
    pub acknowledged: Vec<Acknowledged>,
    /// One list of events per session.
    pub sessions: Vec<Vec<SessionEvent>>,
    /// The kinds the load was asked to send: a clean report needs at least one successful
    /// request of each, so a load that never ran cannot pass.
    pub expected: Vec<Kind>,
    /// Labelled moments of the run (since its start, in order), such as the start of a
    /// transition: the report counts requests and failures between one and the next.
    pub marks: Vec<(Duration, String)>,
    /// Every operation as the fault and consistency suite records it, judged by
    /// [`crate::history::check`].
    pub ops: crate::history::History,
}

/// The requests sent between one mark and the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseStats {
    pub label: String,
    /// Since the start of the run.
    pub from: Duration,
    pub requests: usize,
    pub failures: usize,
    /// Of those, the writes (writes, transfers, session writes) and how many failed.
    pub writes: usize,
    pub write_failures: usize,
}

/// The phase label before any mark.
pub const FIRST_PHASE: &str = "start";

/// Counts and latencies of one kind of request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStats {
    pub ok: usize,
    pub failed: usize,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
}

/// The verdict on a history.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub requests: usize,
    pub per_kind: BTreeMap<Kind, KindStats>,
    /// Requests that did not end in a 2xx answer.
    pub failures: usize,
    /// Writes refused with 429 by admission control and sent again.
    pub throttled: usize,
    /// The first failures, with their details.
    pub first_failures: Vec<String>,
    /// How many violations the checkers found.
    pub violation_count: usize,
    /// The first violations of each checker (of `violation_count` in all), each saying what was
    /// expected and seen.
    pub violations: Vec<String>,
    /// The acknowledged writes, for [`Report::verify_acknowledged`].
    pub acknowledged: Vec<Acknowledged>,
    pub bank_total: i64,
    /// How many bank snapshots, plain reads and session reads were checked.
    pub checked_bank_reads: usize,
    pub checked_reads: usize,
    pub checked_session_reads: usize,
    /// Requests and failures per phase: from the start, then from each mark.
    pub phases: Vec<PhaseStats>,
    /// The anomalies of the recorded operations (snapshot isolation, lost and phantom writes,
    /// bank balances, session guarantees).
    pub consistency: crate::history::check::Report,
    /// The recorded operations, to keep with a run.
    pub ops: crate::history::History,
}

impl Report {
    /// Judges a history: every failed request, and every violation of the bank total, of
    /// acknowledged writes being readable, and of read-your-writes and monotonic reads in each
    /// session.
    pub fn check(history: &History) -> Report {
        let mut report = Report {
            requests: history.requests.len(),
            acknowledged: history.acknowledged.clone(),
            bank_total: history.bank_total,
            checked_bank_reads: history.bank_reads.len(),
            checked_reads: history.reads.len(),
            consistency: crate::history::check::check(&history.ops),
            ops: history.ops.clone(),
            ..Report::default()
        };
        report.phases = std::iter::once((Duration::ZERO, FIRST_PHASE.to_owned()))
            .chain(history.marks.iter().cloned())
            .map(|(from, label)| PhaseStats {
                label,
                from,
                requests: 0,
                failures: 0,
                writes: 0,
                write_failures: 0,
            })
            .collect();
        report.count_requests(&history.requests);
        let mut vacuous = Vec::new();
        for kind in &history.expected {
            if report.per_kind.get(kind).is_none_or(|s| s.ok == 0) {
                vacuous.push(format!("no {kind} request succeeded"));
            }
        }
        report.keep_violations(vacuous);
        report.keep_violations(check_bank(history.bank_total, &history.bank_reads));
        report.keep_violations(check_reads(&history.reads));
        let mut sessions = Vec::new();
        for (i, events) in history.sessions.iter().enumerate() {
            report.checked_session_reads += events
                .iter()
                .filter(|e| matches!(e, SessionEvent::Read { .. }))
                .count();
            sessions.extend(check_session(i, events));
        }
        report.keep_violations(sessions);
        report
    }

    /// Counts one checker's violations and keeps its first few, so that a flood of one kind does
    /// not hide another.
    fn keep_violations(&mut self, mut violations: Vec<String>) {
        self.violation_count += violations.len();
        violations.truncate(FIRST_VIOLATIONS_PER_CHECK);
        self.violations.extend(violations);
    }

    fn count_requests(&mut self, requests: &[RequestRecord]) {
        let mut latencies: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
        for r in requests {
            if r.outcome == Outcome::Throttled {
                // Sent again: the request it ends in is counted, not this attempt.
                self.throttled += 1;
                continue;
            }
            // The phases are in time order.
            let phase = self
                .phases
                .partition_point(|p| p.from <= r.sent_at)
                .saturating_sub(1);
            self.phases[phase].requests += 1;
            self.phases[phase].writes += usize::from(r.kind.is_write());
            let stats = self.per_kind.entry(r.kind).or_default();
            if r.outcome.is_ok() {
                stats.ok += 1;
            } else {
                stats.failed += 1;
                self.failures += 1;
                self.phases[phase].failures += 1;
                self.phases[phase].write_failures += usize::from(r.kind.is_write());
                if self.first_failures.len() < FIRST_FAILURES {
                    self.first_failures.push(format!(
                        "{} via {} at {:?} ({}): {} after {:?}: {}",
                        r.kind,
                        r.api,
                        r.sent_at,
                        self.phases[phase].label,
                        r.outcome,
                        r.latency,
                        r.detail
                    ));
                }
            }
            latencies.entry(r.kind).or_default().push(r.latency);
        }
        for (kind, mut l) in latencies {
            l.sort();
            let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
            let stats = self.per_kind.entry(kind).or_default();
            stats.latency_p50 = at(0.5);
            stats.latency_p99 = at(0.99);
            stats.latency_max = l[l.len() - 1];
        }
    }

    /// True when no request failed and no checker found a violation or an anomaly.
    pub fn is_clean(&self) -> bool {
        self.failures == 0 && self.violation_count == 0 && self.consistency.is_clean()
    }

    /// Panics with the details of every failure and violation kept; otherwise prints the
    /// summary, "checked N requests: 0 failures, 0 violations".
    pub fn assert_clean(&self) {
        if !self.is_clean() {
            panic!("the load was not clean:\n{self}");
        }
        println!("{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked {} requests: {} failures, {} violations ({} throttled and sent again)",
            self.requests, self.failures, self.violation_count, self.throttled
        )?;
        writeln!(
            f,
            "  ({} bank snapshots, {} reads of acknowledged writes, {} session reads, {} acknowledged writes)",
            self.checked_bank_reads,
            self.checked_reads,
            self.checked_session_reads,
            self.acknowledged.len()
        )?;
        writeln!(f, "  consistency: {}", self.consistency)?;
        for (kind, s) in &self.per_kind {
            writeln!(
                f,
                "  {kind}: {} ok, {} failed, latency p50 {:?} p99 {:?} max {:?}",
                s.ok, s.failed, s.latency_p50, s.latency_p99, s.latency_max
            )?;
        }
        if self.phases.len() > 1 {
            for p in &self.phases {
                writeln!(
                    f,
                    "  from {:?} ({}): {} requests, {} failures",
                    p.from, p.label, p.requests, p.failures
                )?;
            }
        }
        for failure in &self.first_failures {
            writeln!(f, "  failure: {failure}")?;
        }
        if self.failures > self.first_failures.len() {
            writeln!(
                f,
                "  ... and {} more failures",
                self.failures - self.first_failures.len()
            )?;
        }
        for v in &self.violations {
            writeln!(f, "  violation: {v}")?;
        }
        if self.violation_count > self.violations.len() {
            writeln!(
                f,
                "  ... and {} more violations",
                self.violation_count - self.violations.len()
            )?;
        }
        Ok(())
    }
}

/// Every snapshot read sees every account and the fixed total.
pub fn check_bank(total: i64, reads: &[BankRead]) -> Vec<String> {
    let mut out = Vec::new();
    for r in reads {
        if r.missing > 0 {
            out.push(format!(
                "bank read at {} via {}: {} accounts missing",
                r.read_timestamp, r.api, r.missing
            ));
        }
        if r.total != total {
            out.push(format!(
                "bank read at {} via {}: total {} instead of {total}",
                r.read_timestamp, r.api, r.total
            ));
        }
    }
    out
}

/// Every read of an acknowledged write at its ts finds it with the written content.
pub fn check_reads(reads: &[ReadObservation]) -> Vec<String> {
    let mut out = Vec::new();
    for r in reads {
        let w = &r.write;
        match &r.seen {
            None => out.push(format!(
                "{}/{} acknowledged at ts {} not found by a read after it via {}",
                w.collection, w.id, w.ts, r.api
            )),
            Some(seen) if *seen != w.document => out.push(format!(
                "{}/{} acknowledged at ts {} as {} read as {seen} via {}",
                w.collection, w.id, w.ts, w.document, r.api
            )),
            Some(_) => {}
        }
    }
    out
}

/// Read-your-writes and monotonic reads in one session: a read runs at a ts at least its token,
/// at least the session's last acknowledged write and at least its previous read; it sees the
/// session's last acknowledged write, and never an older one than a previous read saw, unless
/// what it sees is a write whose outcome was unknown. Such a write may take effect at any time
/// after it was sent, even after later writes of the session: each api-server appends on its
/// own, so a write that timed out through one can land after the next one through the other.
pub fn check_session(session: usize, events: &[SessionEvent]) -> Vec<String> {
    let mut out = Vec::new();
    let mut acked: Option<(u64, u64)> = None; // (seq, ts) of the last acknowledged write
    let mut unknown: Vec<u64> = Vec::new(); // writes of unknown outcome
    let mut last_read: Option<(u64, Option<u64>)> = None; // (ts, seq) of the previous read
    for (step, e) in events.iter().enumerate() {
        match e {
            SessionEvent::Write { seq, ts: Some(ts) } => acked = Some((*seq, *ts)),
            SessionEvent::Write { seq, ts: None } => unknown.push(*seq),
            SessionEvent::Read {
                api,
                after,
                ts,
                seq,
            } => {
                let at = format!("session {session} step {step} via {api}");
                if ts < after {
                    out.push(format!("{at}: read at ts {ts} below its token {after}"));
                }
                if let Some((wseq, wts)) = acked {
                    if *ts < wts {
                        out.push(format!(
                            "{at}: read-your-writes: read at ts {ts} below its own write at ts {wts}"
                        ));
                    }
                    match seq {
                        None => out.push(format!(
                            "{at}: read-your-writes: its write of seq {wseq} (ts {wts}) is not found"
                        )),
                        Some(s) if *s < wseq && !unknown.contains(s) => out.push(format!(
                            "{at}: read-your-writes: saw seq {s}, its last acknowledged write is seq {wseq} (ts {wts})"
                        )),
                        Some(s) if *s > wseq && !unknown.contains(s) => out.push(format!(
                            "{at}: saw seq {s}, which the session never wrote after seq {wseq}"
                        )),
                        Some(_) => {}
                    }
                }
                if let Some((prev_ts, prev_seq)) = last_read {
                    if *ts < prev_ts {
                        out.push(format!(
                            "{at}: monotonic reads: read at ts {ts} after a read at ts {prev_ts}"
                        ));
                    }
                    if let (Some(prev), cur) = (prev_seq, seq) {
                        if cur.is_none_or(|c| c < prev && !unknown.contains(&c)) {
                            out.push(format!(
                                "{at}: monotonic reads: saw {cur:?} after a read saw seq {prev}"
                            ));
                        }
                    }
                }
                last_read = Some((*ts, *seq));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ts: u64, seq: u64) -> SessionEvent {
        SessionEvent::Read {
            api: "a".into(),
            after: ts,
            ts,
            seq: Some(seq),
        }
    }

    #[test]
    fn a_session_may_see_a_write_of_unknown_outcome_land_after_a_later_one() {
        let events = [
            SessionEvent::Write { seq: 1, ts: None },
            SessionEvent::Write {
                seq: 2,
                ts: Some(10),
            },
            read(11, 2),
            // Write 1 timed out through one api-server and landed at ts 12.
            read(12, 1),
        ];
        assert_eq!(check_session(0, &events), Vec::<String>::new());
    }

    #[test]
    fn a_session_that_reads_an_older_acknowledged_write_is_a_violation() {
        let events = [
            SessionEvent::Write {
                seq: 1,
                ts: Some(5),
            },
            SessionEvent::Write {
                seq: 2,
                ts: Some(10),
            },
            read(11, 1),
        ];
        let found = check_session(0, &events);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("read-your-writes"), "{found:?}");
    }
}
