//! The checkers of the mixed load report what they must on fabricated histories.

use std::time::Duration;

use causeway_tests::load::{
    Acknowledged, BankRead, History, Kind, Outcome, ReadObservation, Report, RequestRecord,
    SessionEvent,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The checkers on fabricated histories

fn request(kind: Kind, outcome: Outcome) -> RequestRecord {
    RequestRecord {
        kind,
        api: "http://a".into(),
        outcome,
        latency: Duration::from_millis(3),
        sent_at: Duration::from_millis(100),
        detail: "GET /x".into(),
    }
}

fn acked(id: &str, ts: u64) -> Acknowledged {
    Acknowledged {
        collection: "c".into(),
        id: id.into(),
        ts,
        document: json!({"n": ts}),
    }
}

fn read(after: u64, ts: u64, seq: Option<u64>) -> SessionEvent {
    SessionEvent::Read {
        api: "http://a".into(),
        after,
        ts,
        seq,
    }
}

/// A history in which everything went right: the positive control of every other test here.
fn clean_history() -> History {
    let kinds = [
        Kind::Write,
        Kind::Read,
        Kind::Transfer,
        Kind::BankRead,
        Kind::SessionWrite,
        Kind::SessionRead,
    ];
    History {
        requests: kinds.iter().map(|&k| request(k, Outcome::Ok)).collect(),
        bank_total: 800,
        bank_reads: vec![BankRead {
            api: "http://a".into(),
            read_timestamp: "1.10".into(),
            total: 800,
            missing: 0,
        }],
        reads: vec![ReadObservation {
            api: "http://a".into(),
            write: acked("w1", 5),
            seen: Some(json!({"n": 5})),
        }],
        acknowledged: vec![acked("w1", 5)],
        sessions: vec![vec![
            SessionEvent::Write {
                seq: 1,
                ts: Some(7),
            },
            read(7, 7, Some(1)),
            read(7, 9, Some(1)),
            SessionEvent::Write {
                seq: 2,
                ts: Some(12),
            },
            read(12, 12, Some(2)),
        ]],
        expected: kinds.to_vec(),
    }
}

fn violations(history: &History) -> Vec<String> {
    let report = Report::check(history);
    assert_eq!(report.failures, 0);
    report.violations
}

#[test]
fn a_clean_history_is_clean() {
    let report = Report::check(&clean_history());
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.requests, 6);
    assert_eq!(report.checked_session_reads, 3);
    report.assert_clean();
}

#[test]
fn a_bank_read_with_a_wrong_total_or_a_missing_account_is_a_violation() {
    let mut h = clean_history();
    h.bank_reads.push(BankRead {
        api: "http://b".into(),
        read_timestamp: "1.11".into(),
        total: 799,
        missing: 0,
    });
    h.bank_reads.push(BankRead {
        api: "http://b".into(),
        read_timestamp: "1.12".into(),
        total: 800,
        missing: 1,
    });
    let v = violations(&h);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[0].contains("1.11") && v[0].contains("total 799 instead of 800"),
        "{v:?}"
    );
    assert!(
        v[1].contains("1.12") && v[1].contains("1 accounts missing"),
        "{v:?}"
    );
}

#[test]
fn an_acknowledged_write_read_as_absent_or_different_is_a_violation() {
    let mut h = clean_history();
    for seen in [None, Some(json!({"n": 4}))] {
        h.reads.push(ReadObservation {
            api: "http://b".into(),
            write: acked("w2", 6),
            seen,
        });
    }
    let v = violations(&h);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[0].contains("c/w2 acknowledged at ts 6 not found"),
        "{v:?}"
    );
    assert!(v[1].contains("read as {\"n\":4}"), "{v:?}");
}

#[test]
fn a_session_read_older_than_its_last_write_is_a_violation() {
    let mut h = clean_history();
    // Read at a ts below the session's own write, and not seeing it.
    h.sessions.push(vec![
        SessionEvent::Write {
            seq: 1,
            ts: Some(20),
        },
        read(20, 18, None),
    ]);
    let v = violations(&h);
    assert!(
        v.iter()
            .any(|v| v.contains("session 1 step 1") && v.contains("below its token 20")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|v| v.contains("read-your-writes: read at ts 18 below its own write at ts 20")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|v| v.contains("read-your-writes: its write of seq 1 (ts 20) is not found")),
        "{v:?}"
    );

    // At a high enough ts, but seeing the previous write.
    let mut h = clean_history();
    h.sessions.push(vec![
        SessionEvent::Write {
            seq: 1,
            ts: Some(20),
        },
        SessionEvent::Write {
            seq: 2,
            ts: Some(25),
        },
        read(25, 25, Some(1)),
    ]);
    let v = violations(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("saw seq 1, its last acknowledged write is seq 2"),
        "{v:?}"
    );
}

#[test]
fn a_session_read_going_back_is_a_monotonic_reads_violation() {
    let mut h = clean_history();
    h.sessions.push(vec![
        SessionEvent::Write {
            seq: 1,
            ts: Some(20),
        },
        read(20, 30, Some(1)),
        read(20, 26, Some(1)),
    ]);
    let v = violations(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("monotonic reads: read at ts 26 after a read at ts 30"),
        "{v:?}"
    );

    // A later write of unknown outcome may be seen, and then must stay seen.
    let mut h = clean_history();
    h.sessions.push(vec![
        SessionEvent::Write {
            seq: 1,
            ts: Some(20),
        },
        SessionEvent::Write { seq: 2, ts: None },
        read(20, 30, Some(2)),
        read(30, 31, Some(1)),
    ]);
    let v = violations(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("monotonic reads: saw Some(1) after a read saw seq 2"),
        "{v:?}"
    );
}

#[test]
fn a_session_seeing_a_write_it_never_made_is_a_violation() {
    let mut h = clean_history();
    h.sessions.push(vec![
        SessionEvent::Write {
            seq: 1,
            ts: Some(20),
        },
        read(20, 22, Some(3)),
    ]);
    let v = violations(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("saw seq 3, which the session never wrote"),
        "{v:?}"
    );
}

#[test]
fn failed_requests_are_failures_and_fail_assert_clean() {
    let mut h = clean_history();
    h.requests
        .push(request(Kind::Write, Outcome::ServerError(503)));
    h.requests.push(request(Kind::Read, Outcome::Timeout));
    h.requests
        .push(request(Kind::Transfer, Outcome::Connection));
    h.requests
        .push(request(Kind::BankRead, Outcome::ClientError(400)));
    h.requests
        .push(request(Kind::SessionRead, Outcome::Saturated));
    let report = Report::check(&h);
    assert_eq!(report.failures, 5);
    assert_eq!(report.violation_count, 0);
    assert_eq!(report.per_kind[&Kind::Write].failed, 1);
    assert!(report.first_failures[0].contains("503 (5xx)"), "{report}");
    assert!(report.first_failures[1].contains("timeout"), "{report}");
    let panic = std::panic::catch_unwind(|| report.assert_clean()).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("checked 11 requests: 5 failures, 0 violations"),
        "{message}"
    );
    assert!(message.contains("connection error"), "{message}");
}

#[test]
fn a_kind_that_never_succeeded_is_a_violation() {
    let mut h = clean_history();
    h.requests.retain(|r| r.kind != Kind::Transfer);
    let v = violations(&h);
    assert_eq!(v, vec!["no transfer request succeeded".to_owned()]);

    let empty = History {
        expected: vec![Kind::Write],
        ..History::default()
    };
    assert!(!Report::check(&empty).is_clean());
}
