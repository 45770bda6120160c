//! The gRPC request handlers of a store node under random requests: every RPC gets messages
//! decoded from random bytes and structured ones with odd values (empty, long and control-laden
//! keys, huge limits, bad cursors and filters, timestamps at the ends of the range). Each call
//! must answer a response or a clean `Status`, no handler may panic, and the node must still
//! answer a good request after each one.
//!
//! Seeded and bounded: `CAUSEWAY_GRPC_FUZZ_SEED` replays a run, `CAUSEWAY_GRPC_FUZZ_SECONDS`
//! (default 4) sets its length. The seed is printed at the start.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use causeway_core::NodeId;
use causeway_proto::v1::{self as pb, store_node_client::StoreNodeClient};
use causeway_store_node::{Options, Service, Store, Tuning};
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use common::*;
use prost::Message;
use tonic::transport::Channel;

/// The most calls one run makes, whatever its time.
const MAX_CALLS: usize = 20_000;

/// Panics of the node's tasks (the handlers run on this process's runtime), with their message.
static PANICS: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

fn options(data: PathBuf, log: LogOptions) -> Options {
    Options {
        node_id: NodeId(1),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        admin_listen: None,
        data_dir: data,
        config_manager: "127.0.0.1:1".into(),
        log,
        store: small_options(),
        // Waits bounded well below the per-call deadline below.
        tuning: Tuning {
            read_timeout_ms: 200,
            backfill_wait_ms: 200,
            peer_rpc_timeout_ms: 200,
            ..Tuning::default()
        },
        security: Default::default(),
    }
}

/// Random input: raw bytes, and the odd values structured requests are made of.
struct Gen(Rng);

impl Gen {
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = match self.below(4) {
            0 => 0,
            1 => self.below(8),
            2 => self.below(64),
            _ => self.below(2048),
        };
        (0..len).map(|_| self.0.next() as u8).collect()
    }

    fn u64(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX - self.below(3),
            3 => 1 << self.below(64),
            4 => self.below(100),
            _ => self.0.next(),
        }
    }

    fn u32(&mut self) -> u32 {
        match self.below(4) {
            0 => 0,
            1 => u32::MAX,
            2 => self.below(10) as u32,
            _ => self.0.next() as u32,
        }
    }

    /// A bounded wait: the node caps waits by its tuning, these keep a run short anyway.
    fn wait_ms(&mut self) -> u32 {
        self.below(50) as u32
    }

    fn string(&mut self) -> String {
        match self.below(10) {
            0 => String::new(),
            1 => "items".into(),
            2 => format!("d{}", self.below(12)),
            3 => "x".repeat(64 * 1024),
            4 => "\0/..\\\u{7f}".into(),
            5 => "..".into(),
            6 => "é🦀\u{202e}".repeat(1 + self.below(40) as usize),
            7 => "$gt".into(),
            _ => String::from_utf8_lossy(&self.bytes()).into_owned(),
        }
    }

    fn key(&mut self) -> pb::DocumentKey {
        pb::DocumentKey {
            collection: self.string(),
            id: self.string(),
        }
    }

    fn keys(&mut self) -> Vec<pb::DocumentKey> {
        if self.below(4) == 0 {
            // Many keys, short ones: the message stays within the server's 4 MiB.
            let n = 1000 + self.below(5000);
            return (0..n)
                .map(|i| pb::DocumentKey {
                    collection: "items".into(),
                    id: format!("d{i}"),
                })
                .collect();
        }
        let n = self.below(8);
        (0..n).map(|_| self.key()).collect()
    }

    fn interval(&mut self) -> pb::KeyInterval {
        pb::KeyInterval {
            start: self.u64(),
            end: (self.below(3) > 0).then(|| self.u64()),
        }
    }

    fn intervals(&mut self) -> Vec<pb::KeyInterval> {
        let n = if self.below(8) == 0 {
            2000
        } else {
            self.below(4)
        };
        (0..n).map(|_| self.interval()).collect()
    }

    fn filter(&mut self) -> String {
        const FILTERS: &[&str] = &[
            "",
            "{}",
            "{",
            "null",
            "[]",
            r#"{"a": {"$gt": 1}}"#,
            r#"{"$or": []}"#,
            r#"{"$and": [{"$not": {"a": 1}}]}"#,
            r#"{"a": {"$bogus": 1}}"#,
            r#"{"n.x": {"$in": [1, 2, 3]}, "s": {"$exists": true}}"#,
            r#"{"a": 123456789012345678901234567890}"#,
            r#"{"": 1}"#,
            r#"{"a..b": 1}"#,
        ];
        match self.below(4) {
            0 => {
                let depth = self.below(200) as usize;
                format!("{}{{}}{}", r#"{"$not": "#.repeat(depth), "}".repeat(depth))
            }
            1 => self.string(),
            _ => FILTERS[self.below(FILTERS.len() as u64) as usize].to_owned(),
        }
    }

    fn query(&mut self) -> String {
        match self.below(5) {
            0 => self.string(),
            1 => format!(
                r#"{{"filter": {}, "limit": {}}}"#,
                self.filter(),
                self.u64()
            ),
            2 => format!(
                r#"{{"order": {{"path": "{}", "descending": {}}}, "limit": {}}}"#,
                ["a", "n.x", "", "$x", "a..b", "0", "s.0.1"][self.below(7) as usize],
                self.below(2) == 1,
                1 + self.below(20)
            ),
            3 => r#"{"limit": 0}"#.into(),
            _ => "{}".into(),
        }
    }

    fn cursor(&mut self) -> String {
        match self.below(4) {
            0 => String::new(),
            1 => "not a cursor".into(),
            2 => "A".repeat(self.below(10_000) as usize),
            _ => String::from_utf8_lossy(&self.bytes()).into_owned(),
        }
    }

    /// A message of type `M`: decoded from random bytes (when they decode), else built.
    fn message<M: Message + Default>(&mut self, build: impl FnOnce(&mut Gen) -> M) -> M {
        if self.below(3) == 0 {
            if let Ok(m) = M::decode(&self.bytes()[..]) {
                return m;
            }
        }
        build(self)
    }
}

/// One random call of one RPC. `Ok` is any response or a clean `Status`; `Err` is a failure of
/// the test (the transport broke, or the call did not end in time).
async fn call(c: &mut StoreNodeClient<Channel>, g: &mut Gen) -> Result<String, String> {
    let rpc = g.below(14);
    macro_rules! unary {
        ($method:ident, $req:expr) => {{
            let req = $req;
            let shown = format!("{}({:?})", stringify!($method), req)
                .chars()
                .take(400)
                .collect::<String>();
            let answer = c.$method(req).await;
            check(answer.map(drop), shown)
        }};
    }
    macro_rules! stream {
        ($method:ident, $req:expr) => {{
            let req = $req;
            let shown = format!("{}({:?})", stringify!($method), req)
                .chars()
                .take(400)
                .collect::<String>();
            let answer = match c.$method(req).await {
                // The first item (or the end), then the stream is dropped.
                Ok(s) => s.into_inner().message().await.map(drop),
                Err(status) => Err(status),
            };
            check(answer, shown)
        }};
    }
    match rpc {
        0 => unary!(
            gossip,
            g.message(|g| pb::GossipMessage {
                node_id: g.u64(),
                incarnation: g.u64(),
                seq: g.u64(),
                committed: g.u64(),
                current_epoch: g.u64(),
                next_epoch: (g.below(2) == 0).then(|| g.u64()),
                backfilled: g.below(2) == 0,
                routing_epoch: g.u64(),
                ust: g.u64(),
                lowest_read: (g.below(2) == 0).then(|| pb::ReadTs {
                    epoch: g.u64(),
                    ts: g.u64(),
                }),
            })
        ),
        1 => unary!(
            get_at,
            g.message(|g| pb::GetAtRequest {
                at: Some(pb::ReadTs {
                    epoch: g.u64(),
                    ts: g.u64(),
                }),
                keys: g.keys(),
                with_automerge: g.below(2) == 0,
            })
        ),
        2 => unary!(
            scan_at,
            g.message(|g| pb::ScanAtRequest {
                at: (g.below(4) > 0).then(|| pb::ReadTs {
                    epoch: g.u64(),
                    ts: g.u64(),
                }),
                collection: g.string(),
                intervals: g.intervals(),
                filter: g.filter(),
                after_hash: (g.below(2) == 0).then(|| g.u64()),
                after_id: g.string(),
                limit: g.u32(),
                max_scanned: g.u32(),
                with_automerge: g.below(2) == 0,
                max_bytes: g.u64(),
                max_ms: g.u32(),
            })
        ),
        3 => unary!(
            read,
            g.message(|g| pb::ReadRequest {
                keys: g.keys(),
                min_ts: g.u64(),
                timeout_ms: g.wait_ms(),
                with_automerge: g.below(2) == 0,
            })
        ),
        4 => unary!(
            query,
            g.message(|g| pb::QueryRequest {
                collection: g.string(),
                query: g.query(),
                cursor: g.cursor(),
                min_ts: g.u64(),
                timeout_ms: g.wait_ms(),
                max_scanned: g.u32(),
                at_ts: (g.below(3) == 0).then(|| g.u64()),
            })
        ),
        5 => unary!(
            wait_for_ust,
            g.message(|g| pb::WaitForUstRequest {
                ts: g.u64(),
                timeout_ms: g.wait_ms(),
            })
        ),
        6 => unary!(status, pb::StatusRequest {}),
        7 => stream!(
            hold_snapshot,
            g.message(|g| pb::HoldSnapshotRequest {
                min_ts: g.u64(),
                timeout_ms: g.wait_ms(),
                max_hold_ms: g.u64(),
                at: (g.below(2) == 0).then(|| g.u64()),
                owner: g.string(),
                linger_ms: g.u64(),
            })
        ),
        8 => unary!(
            digest,
            g.message(|g| pb::DigestRequest {
                ts: g.u64(),
                intervals: g.intervals(),
            })
        ),
        9 => stream!(
            backfill,
            g.message(|g| pb::BackfillRequest {
                epoch: g.u64(),
                upto: g.u64(),
                min_upto: g.u64(),
                from_key: g.bytes(),
                max_records: g.u32(),
                max_bytes: g.u32(),
                timeout_ms: g.wait_ms(),
                interval: (g.below(3) > 0).then(|| g.interval()),
            })
        ),
        10 => unary!(
            veto_backfill,
            g.message(|g| pb::VetoBackfillRequest { epoch: g.u64() })
        ),
        11 => unary!(
            outcome,
            g.message(|g| pb::OutcomeRequest {
                ts: g.u64(),
                wait_ms: g.wait_ms(),
                following: g.u32(),
            })
        ),
        12 => unary!(
            changes,
            g.message(|g| pb::ChangesRequest {
                keys: change_keys(g),
                with_before: g.below(2) == 0,
                timeout_ms: g.wait_ms(),
            })
        ),
        _ => unary!(
            changes_at,
            g.message(|g| pb::ChangesAtRequest {
                keys: change_keys(g),
                with_before: g.below(2) == 0,
                at: (g.below(3) > 0).then(|| pb::ReadTs {
                    epoch: g.u64(),
                    ts: g.u64(),
                }),
            })
        ),
    }
}

fn change_keys(g: &mut Gen) -> Vec<pb::ChangeKey> {
    if g.below(8) == 0 {
        return (0..3000)
            .map(|i| pb::ChangeKey {
                ts: g.u64(),
                collection: "items".into(),
                id: format!("d{i}"),
            })
            .collect();
    }
    let n = g.below(5);
    (0..n)
        .map(|_| pb::ChangeKey {
            ts: g.u64(),
            collection: g.string(),
            id: g.string(),
        })
        .collect()
}

/// A response or a status the handler chose passes; a broken transport (what a panicking
/// handler leaves) fails.
fn check(answer: Result<(), tonic::Status>, shown: String) -> Result<String, String> {
    match answer {
        Ok(()) => Ok(shown),
        Err(s) if is_transport_failure(&s) => Err(format!("{shown}: transport failure {s:?}")),
        Err(_) => Ok(shown),
    }
}

fn is_transport_failure(s: &tonic::Status) -> bool {
    // tonic reports a connection that dropped mid-call as Unknown or Unavailable with a
    // transport or h2 error as its source.
    matches!(
        s.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal
    ) && (s.message().contains("transport") || s.message().contains("h2 protocol error"))
}

/// A good read, tried three times: a refused oversized message may close the connection, and
/// the channel then connects again.
async fn good_read(
    client: &mut StoreNodeClient<Channel>,
    good: &pb::ReadRequest,
) -> Result<pb::ReadResponse, String> {
    let mut last = String::new();
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(10), client.read(good.clone())).await {
            Ok(Ok(answer)) => return Ok(answer.into_inner()),
            Ok(Err(s)) => last = format!("a good read fails: {s:?}"),
            Err(_) => last = "a good read did not answer within 10 s".into(),
        }
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_a_response_or_a_clean_status() {
    // A fixed seed by default, so that the test suite cannot fail by chance; `random` draws
    // one (a longer exploring run: CAUSEWAY_GRPC_FUZZ_SECONDS=300).
    let seed = match std::env::var("CAUSEWAY_GRPC_FUZZ_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        Ok(s) => s
            .parse()
            .expect("CAUSEWAY_GRPC_FUZZ_SEED: a number or `random`"),
        Err(_) => 1,
    };
    let seconds: u64 = std::env::var("CAUSEWAY_GRPC_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    println!("grpc fuzz seed {seed} (CAUSEWAY_GRPC_FUZZ_SEED={seed} replays it), {seconds} s");
    fuzz(seed, seconds, MAX_CALLS).await;
}

/// A seed whose gossip in the node's own name, with a higher incarnation, once made the node
/// count itself dead: it stopped serving reads ("no live replica").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_in_the_nodes_own_name_is_ignored() {
    fuzz(1_796_563_708_567_456_752, 30, 450).await;
}

/// `max_calls` random calls of `seed`, for at most `seconds`, each followed by a good read.
async fn fuzz(seed: u64, seconds: u64, max_calls: usize) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        *LAST_PANIC.lock().unwrap() = info.to_string();
        default_hook(info);
    }));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    save_one_node_config(&Store::open(&data, small_options()).unwrap());
    let log_options = LogOptions::Embedded(EmbeddedOptions::new(dir.path().join("log")));
    let log = TxLog::open(log_options.clone()).await.unwrap();
    // Some documents to read: 30 records over 12 documents of "items".
    let records = (1..=30)
        .map(|ts| stream_record(seed, ts, 12).1.encode_to_vec().into())
        .collect();
    let last = *log.append(records).await.unwrap().last().unwrap();
    let service = Service::bind_with_log(options(data, log_options), log.clone())
        .await
        .unwrap();
    let addr = service.local_addr();
    let handle = service.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(service.run(async {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(30), async {
        while handle.committed() < last {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the node applies the records");

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Larger messages than tonic's default both ways: the point is the handlers, not the limits.
    let mut client = StoreNodeClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let good = pb::ReadRequest {
        keys: vec![pb::DocumentKey {
            collection: "items".into(),
            id: "d1".into(),
        }],
        min_ts: last.get(),
        timeout_ms: 1_000,
        with_automerge: false,
    };

    // A key far longer than any limit is refused with a status the client can read: the
    // message names only its start (echoed whole, it made a header the client reset).
    let long = "x".repeat(100_000);
    let read = client
        .read(pb::ReadRequest {
            keys: vec![pb::DocumentKey {
                collection: long.clone(),
                id: long.clone(),
            }],
            ..good.clone()
        })
        .await;
    let changes = client
        .changes_at(pb::ChangesAtRequest {
            at: Some(pb::ReadTs {
                epoch: 1,
                ts: last.get(),
            }),
            keys: vec![pb::ChangeKey {
                ts: 1,
                collection: long.clone(),
                id: long,
            }],
            with_before: false,
        })
        .await;
    for answer in [read.map(|_| ()), changes.map(|_| ())] {
        let status = answer.expect_err("a key past the limits was taken");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().len() < 1_000, "{}", status.message().len());
    }

    let mut g = Gen(Rng(seed));
    let started = Instant::now();
    let mut calls = 0;
    while calls < max_calls && started.elapsed() < Duration::from_secs(seconds) {
        calls += 1;
        let shown = tokio::time::timeout(Duration::from_secs(10), call(&mut client, &mut g))
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: call {calls} did not end within 10 s"))
            .unwrap_or_else(|e| panic!("seed {seed}: call {calls}: {e}"));
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            0,
            "seed {seed}: call {calls} {shown} panicked: {}",
            LAST_PANIC.lock().unwrap()
        );
        let answer = good_read(&mut client, &good)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: after call {calls} {shown}: {e}"));
        assert_eq!(answer.documents.len(), 1, "seed {seed}: after {shown}");
    }
    println!("grpc fuzz: {calls} random calls in {:?}", started.elapsed());
    assert!(
        calls >= 50,
        "seed {seed}: only {calls} calls in {seconds} s"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the node stops")
        .unwrap()
        .unwrap();
    log.close().await.unwrap();
}
