//! The mixed load and its checkers: the load against a steady 2P × 2R cluster through two
//! api-servers is clean, and the checkers report what they must on fabricated histories.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use causeway_core::{NodeId, Timestamp};
use causeway_tests::load::{
    Acknowledged, BankRead, History, Kind, Load, LoadSpec, Outcome, ReadObservation, Report,
    RequestRecord, SessionEvent,
};
use causeway_tests::{until, ClusterSpec, LocalCluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// The steady load through two api-servers for 8 s: no failed request, no violation, every
/// acknowledged write read back through both, and the replicas of each partition agree. The
/// spare nodes register without joining the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_through_two_api_servers_is_clean() {
    let spec = ClusterSpec {
        spares: 1,
        ..ClusterSpec::new(2, 2)
    };
    let mut cluster = LocalCluster::start(spec).await.unwrap();
    let added = cluster.add_node().await.unwrap();
    assert_eq!(
        added,
        NodeId(6),
        "node ids follow the 4 bootstrapped and 1 spare"
    );
    let config = cluster.wait_stable(WAIT).await.unwrap();
    assert_eq!(config.epoch.get(), 1);
    let registered = cluster
        .config_manager()
        .await
        .unwrap()
        .list_nodes()
        .await
        .unwrap();
    for spare in [NodeId(5), NodeId(6)] {
        assert!(
            registered.iter().any(|n| n.info.id == spare && n.live),
            "{spare} is registered live"
        );
        assert!(
            !config.nodes.contains_key(&spare),
            "{spare} is not in the configuration"
        );
    }
    assert_eq!(config.nodes.len(), 4);

    cluster.start_api_servers(2).await.unwrap();
    let urls = cluster.api_urls();
    assert_eq!(urls.len(), 2);

    // The digests of a partition before the load, to see after it that they follow the data.
    let first = config.replicas.values().next().unwrap()[0];
    let partition = config.partition_of_node(first).unwrap();
    let intervals = config.slicing.intervals_of(partition);
    let before_ts = Timestamp(cluster.status(first).await.unwrap().ust);
    let before = cluster.digests(first, before_ts, &intervals).await.unwrap();

    let load = Load::start(urls.clone(), LoadSpec::default())
        .await
        .unwrap();
    until("the load to flow", WAIT, || async {
        (load.completed() > 50).then_some(())
    })
    .await
    .unwrap();
    // The run length, not a synchronisation: the load runs at its rates meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    load.mark("second half");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.stop().await;
    if !report.is_clean() {
        panic!("{report}\n{}", cluster.logs());
    }
    report.assert_clean();
    for kind in [
        Kind::Write,
        Kind::Read,
        Kind::Transfer,
        Kind::BankRead,
        Kind::SessionRead,
    ] {
        let ok = report.per_kind[&kind].ok;
        assert!(ok >= 20, "{ok} {kind} requests succeeded in 8 s");
    }
    assert_eq!(report.phases.len(), 2);
    assert_eq!(report.phases[1].label, "second half");
    assert!(report
        .phases
        .iter()
        .all(|p| p.requests >= 100 && p.failures == 0));
    assert!(report.checked_bank_reads >= 20);
    assert!(report.checked_session_reads >= 20);

    let checked = report.verify_acknowledged(&urls).await.unwrap();
    assert_eq!(checked, 2 * report.acknowledged.len());
    assert!(report.acknowledged.len() >= 100);

    // The read-back is not vacuous: a changed document and a missing one are reported.
    let mut tampered = report.clone();
    tampered.acknowledged[0].document = json!({"n": -1});
    let mut missing = report.acknowledged[0].clone();
    missing.id.push_str("-never-written");
    tampered.acknowledged.push(missing);
    let err = tampered
        .verify_acknowledged(&urls)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 acknowledged writes not read back"), "{err}");
    assert!(
        err.contains("not found") && err.contains("written as"),
        "{err}"
    );

    // The replicas of each partition hold the same documents.
    let ts = cluster.verify_replicas_agree(WAIT).await.unwrap();
    assert!(ts > before_ts);
    let after = cluster.digests(first, ts, &intervals).await.unwrap();
    assert_eq!(after.len(), intervals.len());
    assert_ne!(
        before, after,
        "the load's documents changed {partition:?}'s digests"
    );
}

/// A stand-in for an api-server on a loopback port: `answer(method, path)` gives each request's
/// status, extra header lines and JSON body. One request per connection.
async fn fake_api_server<F>(answer: F) -> String
where
    F: Fn(&str, &str) -> (u16, &'static str, String) + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                // The head, then as much body as it announces.
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while request.len() < head_end + length {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap(), words.next().unwrap());
                let (status, headers, body) = answer(&method.to_uppercase(), path);
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{headers}\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    url
}

/// A small load, for the fake api-servers.
fn small_load() -> LoadSpec {
    LoadSpec {
        writes_per_s: 20,
        reads_per_s: 20,
        transfers_per_s: 10,
        bank_reads_per_s: 10,
        sessions: 1,
        ..LoadSpec::default()
    }
}

/// A load against a server that fails every request after the accounts' creation reports the
/// failures; one whose first request fails does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_of_a_running_load_are_reported() {
    let first = AtomicBool::new(true);
    let url = fake_api_server(move |_, _| {
        if first.swap(false, Ordering::Relaxed) {
            (200, "", r#"{"ts":1}"#.to_owned())
        } else {
            (503, "", r#"{"title":"down"}"#.to_owned())
        }
    })
    .await;
    let load = Load::start(vec![url], small_load()).await.unwrap();
    until("failed requests", WAIT, || async {
        (load.sent() > 20).then_some(())
    })
    .await
    .unwrap();
    let report = load.stop().await;
    assert!(!report.is_clean());
    assert!(report.failures >= 20, "{report}");
    assert!(
        report
            .first_failures
            .iter()
            .any(|f| f.contains("503 (5xx)") && f.contains("down")),
        "{report}"
    );
    // Nothing succeeded but the setup, so no kind of the load passes by having done nothing.
    assert!(
        report
            .violations
            .iter()
            .any(|v| v == "no write request succeeded"),
        "{report}"
    );
    let text = report.to_string();
    assert!(
        text.contains(&format!("{} failures", report.failures)),
        "{text}"
    );

    let refused = Load::start(vec!["http://127.0.0.1:1".into()], LoadSpec::default()).await;
    let err = refused.unwrap_err().to_string();
    assert!(err.contains("creating the accounts failed"), "{err}");
}

/// A load against a server that answers 200 with wrong data: every checker reports it, from
/// what the load parsed out of the answers, though no request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_answers_to_a_running_load_are_violations() {
    let url = fake_api_server(|method, path| {
        let write = (200, "", r#"{"ts":5}"#.to_owned());
        match (method, path) {
            ("POST", "/v1/transactions") | ("PUT", _) => write,
            // A multi-get or a query of a bank.
            ("POST", p) if p == "/v1/documents:get" || p.ends_with("/query") => {
                // Eight accounts of 1 each: a total of 8, not 8 × 1000.
                let doc = r#"{"collection":"b","id":"a","found":true,"version_ts":2,"document":{"balance":1}}"#;
                let docs = [doc; 8].join(",");
                let body = format!(r#"{{"read_timestamp":"1.9","documents":[{docs}]}}"#);
                (200, "causeway-read-timestamp: 1.9\r\n", body)
            }
            // A session's document at a ts below its token, with a seq it did not write last.
            ("GET", p) if p.contains("load_sessions") => (
                200,
                "causeway-read-timestamp: 1.3\r\n",
                r#"{"seq":0}"#.to_owned(),
            ),
            ("GET", _) => (
                200,
                "causeway-read-timestamp: 1.9\r\n",
                r#"{"n":-1}"#.to_owned(),
            ),
            _ => (404, "", "{}".to_owned()),
        }
    })
    .await;
    let load = Load::start(vec![url], small_load()).await.unwrap();
    until("reads of every kind", WAIT, || async {
        (load.sent() > 60).then_some(())
    })
    .await
    .unwrap();
    let report = load.stop().await;
    assert_eq!(report.failures, 0, "{report}");
    assert!(!report.is_clean());
    let has = |what: &str| report.violations.iter().any(|v| v.contains(what));
    assert!(has("total 8 instead of 8000"), "{report}");
    assert!(has("read as {\"n\":-1}"), "{report}");
    assert!(has("below its token 5"), "{report}");
    assert!(
        has("read-your-writes: read at ts 3 below its own write at ts 5"),
        "{report}"
    );
    assert!(has("read-your-writes: saw seq 0"), "{report}");
}

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
        marks: Vec::new(),
        ops: Default::default(),
    }
}

fn violations(history: &History) -> Vec<String> {
    let report = Report::check(history);
    assert_eq!(report.failures, 0);
    report.violations
}

/// Asserts that the checker finds exactly one violation in `history`, saying `expected`.
fn only_violation(history: &History, expected: &str) {
    let v = violations(history);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains(expected), "{v:?}");
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
    only_violation(&h, "saw seq 1, its last acknowledged write is seq 2");
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
    only_violation(&h, "monotonic reads: read at ts 26 after a read at ts 30");

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
    only_violation(&h, "monotonic reads: saw Some(1) after a read saw seq 2");
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
    only_violation(&h, "saw seq 3, which the session never wrote");
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

#[test]
fn failures_are_counted_in_the_phase_they_were_sent_in() {
    let mut h = clean_history();
    h.marks = vec![
        (Duration::from_secs(1), "scale out".to_owned()),
        (Duration::from_secs(3), "scale in".to_owned()),
    ];
    for (at, outcome) in [
        (1500, Outcome::Timeout),
        (2500, Outcome::Ok),
        (3500, Outcome::Ok),
    ] {
        let mut r = request(Kind::Write, outcome);
        r.sent_at = Duration::from_millis(at);
        h.requests.push(r);
    }
    let report = Report::check(&h);
    let phases: Vec<(&str, usize, usize)> = report
        .phases
        .iter()
        .map(|p| (p.label.as_str(), p.requests, p.failures))
        .collect();
    // The clean history's six requests were sent at 100 ms.
    assert_eq!(
        phases,
        vec![("start", 6, 0), ("scale out", 2, 1), ("scale in", 1, 0)]
    );
    assert!(report.first_failures[0].contains("(scale out)"), "{report}");
    assert!(report
        .to_string()
        .contains("(scale out): 2 requests, 1 failures"));
}
