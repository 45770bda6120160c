//! Fault tests on 2P × 2R with the Kafka backend: a store node paused (SIGSTOP) under a steady
//! read load must not stall the reads, since the other replica of its partition is current; and
//! a store node killed and restarted under a heavy write load must not hold the UST back nor
//! stall causal reads while it catches up.
//!
//! A paused node is the worst kind of failure for a client: its kernel still accepts
//! connections and buffers requests, so nothing fails fast, and its peers only call it dead
//! after the liveness timeout. It is two cases at once: a coordinator that api-servers send
//! reads to, and a replica that other coordinators send sub-reads to. The test measures both:
//! closed-loop readers through the two api-servers (the coordinator case, and the sub-read case
//! behind it), and a reader that sends coordinated reads straight to a live node of the other
//! partition (the sub-read case alone).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_core::{ClusterConfig, KeyHash, NodeId, PartitionId};
use causeway_proto::v1 as pb;
use causeway_tests::{tx, until, ClusterSpec, LocalCluster, API_TOKEN};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);
const COLLECTION: &str = "things";
/// Closed-loop readers through the api-servers.
const HTTP_READERS: usize = 8;
/// How long each phase is measured.
const BEFORE: Duration = Duration::from_secs(3);
const PAUSE: Duration = Duration::from_secs(5);
/// A reader's client timeout: past it, the read is a failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);
/// During the pause, no read may take longer than this (the liveness timeout of the test
/// cluster is 600 ms; failing over must not wait for it, nor for the 2 s peer RPC timeout).
const MAX_LATENCY: Duration = Duration::from_millis(1_000);
/// During the pause, reads must complete at least at this share of the rate before it.
const MIN_SHARE: f64 = 0.5;

/// The tests of this file measure rates on two cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One request of a reader: when it started and ended (since the test's origin), and how.
#[derive(Debug, Clone)]
struct Done {
    reader: &'static str,
    start: Duration,
    end: Duration,
    /// `None` when it succeeded, else why not.
    failure: Option<String>,
}

#[derive(Debug)]
struct Recorder {
    origin: Instant,
    done: Mutex<Vec<Done>>,
}

impl Recorder {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn record(&self, reader: &'static str, start: Duration, failure: Option<String>) {
        let end = self.now();
        self.done.lock().unwrap().push(Done {
            reader,
            start,
            end,
            failure,
        });
    }

    /// Reads of `reader` that ended in `[from, to)`: (succeeded, failed, slowest success).
    fn window(&self, reader: &str, from: Duration, to: Duration) -> Window {
        let done = self.done.lock().unwrap();
        let mut w = Window {
            seconds: (to - from).as_secs_f64(),
            ..Window::default()
        };
        for d in done
            .iter()
            .filter(|d| d.reader == reader && d.end >= from && d.end < to)
        {
            match &d.failure {
                None => {
                    w.ok += 1;
                    w.slowest = w.slowest.max(d.end - d.start);
                }
                Some(why) => {
                    w.failed += 1;
                    if w.failures.len() < 5 {
                        w.failures.push(why.clone());
                    }
                }
            }
        }
        w
    }

    /// The slowest request of `reader` that started in `[from, to)`, however it ended (or
    /// `None` if none started).
    fn slowest_started(&self, reader: &str, from: Duration, to: Duration) -> Option<Duration> {
        let done = self.done.lock().unwrap();
        done.iter()
            .filter(|d| d.reader == reader && d.start >= from && d.start < to)
            .map(|d| d.end - d.start)
            .max()
    }

    /// Every failure of `reader` (at most `n`).
    fn failures(&self, reader: &str, n: usize) -> Vec<String> {
        let done = self.done.lock().unwrap();
        done.iter()
            .filter(|d| d.reader == reader)
            .filter_map(|d| {
                d.failure.as_ref().map(|f| {
                    format!(
                        "{:.2}s→{:.2}s {f}",
                        d.start.as_secs_f64(),
                        d.end.as_secs_f64()
                    )
                })
            })
            .take(n)
            .collect()
    }
}

#[derive(Debug, Default)]
struct Window {
    seconds: f64,
    /// The slowest request that started in the window, wherever it ended.
    slowest_started: Option<Duration>,
    ok: u64,
    failed: u64,
    slowest: Duration,
    failures: Vec<String>,
}

impl Window {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} reads/s ({} ok, {} failed, slowest {} ms{}){}",
            self.rate(),
            self.ok,
            self.failed,
            self.slowest.as_millis(),
            self.slowest_started
                .map(|d| format!(", slowest started in it {} ms", d.as_millis()))
                .unwrap_or_default(),
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(" failures: {:?}", self.failures)
            }
        )
    }
}

/// Ids whose documents land on each partition, `per` of each.
fn ids_per_partition(config: &ClusterConfig, per: usize) -> BTreeMap<PartitionId, Vec<String>> {
    let mut out: BTreeMap<PartitionId, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let id = format!("doc-{i}");
        let p = config.partition_of(KeyHash::of(COLLECTION, &id));
        let ids = out.entry(p).or_default();
        if ids.len() < per {
            ids.push(id);
        }
        if out.len() == config.slicing.partitions().count() && out.values().all(|v| v.len() == per)
        {
            return out;
        }
    }
    unreachable!()
}

/// What readers share: the recorder, an HTTP client with the client timeout, and the switch
/// that stops them.
fn readers() -> (
    Arc<Recorder>,
    reqwest::Client,
    (watch::Sender<bool>, watch::Receiver<bool>),
) {
    let rec = Arc::new(Recorder {
        origin: Instant::now(),
        done: Mutex::new(Vec::new()),
    });
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap();
    (rec, http, watch::channel(false))
}

/// One key of each partition, at random.
fn keys_across(ids: &BTreeMap<PartitionId, Vec<String>>) -> Vec<String> {
    let mut rng = rand::rng();
    ids.values()
        .map(|v| v[rng.random_range(0..v.len())].clone())
        .collect()
}

/// A closed-loop reader of multi-gets (one key of each partition) through the api-servers,
/// alternating between them.
async fn http_reader(
    rec: Arc<Recorder>,
    http: reqwest::Client,
    urls: Vec<String>,
    ids: Arc<BTreeMap<PartitionId, Vec<String>>>,
    first: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut i = first;
    while !*stop.borrow() {
        let url = &urls[i % urls.len()];
        i += 1;
        let keys: Vec<Value> = keys_across(&ids)
            .into_iter()
            .map(|id| json!({"collection": COLLECTION, "id": id}))
            .collect();
        let start = rec.now();
        let sent = http
            .post(format!("{url}/v1/documents:get"))
            .bearer_auth(API_TOKEN)
            .json(&json!({ "keys": keys }))
            .send();
        let answer = tokio::select! {
            a = sent => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let failure = match answer {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(body) if body["documents"].as_array().is_some_and(|d| d.len() == 2) => None,
                Ok(body) => Some(format!("unexpected body {body}")),
                Err(e) => Some(format!("body: {e}")),
            },
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                Some(format!(
                    "{url}: {status} {}",
                    body.chars().take(200).collect::<String>()
                ))
            }
            Err(e) if e.is_timeout() => Some(format!("{url}: client timeout")),
            Err(e) => Some(format!("{url}: {e}")),
        };
        rec.record("http", start, failure);
    }
}

/// A closed-loop reader of coordinated reads (one key of each partition) sent straight to
/// `node`.
async fn grpc_reader(
    rec: Arc<Recorder>,
    mut client: causeway_proto::v1::store_node_client::StoreNodeClient<
        causeway_proto::link::Channel,
    >,
    ids: Arc<BTreeMap<PartitionId, Vec<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let keys = keys_across(&ids)
            .into_iter()
            .map(|id| pb::DocumentKey {
                collection: COLLECTION.to_owned(),
                id,
            })
            .collect();
        let mut request = tonic::Request::new(pb::ReadRequest {
            keys,
            min_ts: 0,
            timeout_ms: 10_000,
            with_automerge: false,
        });
        request.set_timeout(CLIENT_TIMEOUT);
        let start = rec.now();
        let answer = tokio::select! {
            a = client.read(request) => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let failure = match answer {
            Ok(r) if r.get_ref().documents.len() == 2 => None,
            Ok(r) => Some(format!("{} documents", r.get_ref().documents.len())),
            Err(s) => Some(format!("{:?}: {}", s.code(), s.message())),
        };
        rec.record("grpc", start, failure);
    }
}

/// A closed loop of read-your-writes: a write through one api-server, then a read of it with
/// `Causeway-After` through the other, which must see it.
async fn causal_session(
    rec: Arc<Recorder>,
    http: reqwest::Client,
    urls: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut step = 0u64;
    while !*stop.borrow() {
        step += 1;
        let id = format!("session-{}", step % 16);
        let start = rec.now();
        let run = async {
            let put = http
                .put(format!(
                    "{}/v1/collections/{COLLECTION}/documents/{id}",
                    urls[0]
                ))
                .bearer_auth(API_TOKEN)
                .json(&json!({ "step": step }))
                .send()
                .await
                .map_err(|e| format!("write: {e}"))?;
            if !put.status().is_success() {
                return Err(format!("write: {}", put.status()));
            }
            let ts = put
                .json::<Value>()
                .await
                .map_err(|e| format!("write body: {e}"))?["ts"]
                .as_u64()
                .ok_or("write without a ts")?;
            let get = http
                .get(format!(
                    "{}/v1/collections/{COLLECTION}/documents/{id}",
                    urls[1]
                ))
                .bearer_auth(API_TOKEN)
                .header("Causeway-After", ts.to_string())
                .send()
                .await
                .map_err(|e| format!("causal read: {e}"))?;
            let status = get.status();
            if !status.is_success() {
                let body = get.text().await.unwrap_or_default();
                return Err(format!("causal read: {status} {body}"));
            }
            let at = get
                .headers()
                .get("Causeway-Read-Timestamp")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('.').next()?.parse::<u64>().ok())
                .ok_or("causal read without a read timestamp")?;
            let body = get
                .json::<Value>()
                .await
                .map_err(|e| format!("read body: {e}"))?;
            if at < ts || body["step"] != json!(step) {
                return Err(format!(
                    "causal read at {at} after {ts} saw {body}, not step {step}"
                ));
            }
            Ok(())
        };
        let outcome = tokio::select! {
            r = run => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        rec.record("causal", start, outcome.err());
    }
}

/// The replica of a partition other than `node`'s, to coordinate reads whose sub-reads of
/// `node`'s partition must go to a peer.
fn coordinator_away_from(config: &ClusterConfig, node: NodeId) -> NodeId {
    let partition = config.partition_of_node(node).unwrap();
    *config
        .replicas
        .iter()
        .find(|(p, _)| **p != partition)
        .unwrap()
        .1
        .first()
        .unwrap()
}

/// Pauses `node` for [`PAUSE`] under the running readers and checks the rates. Returns the
/// measured windows (before, during) per reader.
async fn pause_and_measure(
    cluster: &LocalCluster,
    rec: &Recorder,
    node: NodeId,
    readers: &[&str],
    label: &str,
) -> Vec<(String, Window, Window)> {
    let before_from = rec.now();
    tokio::time::sleep(BEFORE).await;
    let paused_at = rec.now();
    cluster.pause(node).unwrap();
    tokio::time::sleep(PAUSE).await;
    let resumed_at = rec.now();
    cluster.resume(node).unwrap();
    let mut out = Vec::new();
    for &reader in readers {
        let before = rec.window(reader, before_from, paused_at);
        let mut during = rec.window(reader, paused_at, resumed_at);
        during.slowest_started = rec.slowest_started(reader, paused_at, resumed_at);
        eprintln!("{label}, {reader}: before {before}; during the pause of {node}: {during}");
        out.push((reader.to_owned(), before, during));
    }
    out
}

/// After the resume, every node coordinates reads again at a UST that moves.
async fn assert_healthy(cluster: &LocalCluster, ids: &BTreeMap<PartitionId, Vec<String>>) {
    let ts = cluster
        .append(&[tx::replace(&[(
            COLLECTION,
            "after-resume",
            json!({"ok": true}),
        )])])
        .await
        .unwrap()[0];
    for node in cluster.node_ids() {
        cluster
            .wait_ust(node, ts, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{node} after the resume: {e}\n{}", cluster.logs()));
        let status = cluster.status(node).await.unwrap();
        assert!(
            status.can_coordinate,
            "{node} cannot coordinate: {status:?}"
        );
        assert!(
            status.peers.iter().all(|p| p.alive),
            "{node} sees a dead peer after the resume: {:?}",
            status.peers
        );
        let keys = keys_across(ids)
            .into_iter()
            .chain(["after-resume".to_owned()])
            .map(|id| pb::DocumentKey {
                collection: COLLECTION.to_owned(),
                id,
            })
            .collect();
        let read = cluster
            .client(node)
            .unwrap()
            .read(pb::ReadRequest {
                keys,
                min_ts: ts.get(),
                timeout_ms: 10_000,
                with_automerge: false,
            })
            .await
            .unwrap_or_else(|e| panic!("read on {node} after the resume: {e}"))
            .into_inner();
        assert_eq!(read.documents.len(), 3);
        assert!(read.documents.iter().all(|d| d.found), "{node}: {read:?}");
    }
}

/// What is wrong with the rates of a phase, if anything.
fn check(results: &[(String, Window, Window)], label: &str, problems: &mut Vec<String>) {
    for (reader, before, during) in results {
        if before.ok == 0 || before.failed > 0 {
            problems.push(format!(
                "{label}, {reader}: the load before the pause was not clean: {before}"
            ));
        }
        if during.rate() < MIN_SHARE * before.rate() {
            problems.push(format!(
                "{label}, {reader}: reads stalled during the pause: {during}, against {before} before"
            ));
        }
        if during.slowest_started.is_some_and(|d| d > MAX_LATENCY) {
            problems.push(format!(
                "{label}, {reader}: a read waited for the paused node: {during}"
            ));
        }
        if during.failed > 0 {
            problems.push(format!(
                "{label}, {reader}: reads failed during the pause: {during}"
            ));
        }
    }
}

/// A SIGSTOP of one store node of a 2 × 2 cluster, first under reads only (the paused
/// replica's committed ts is then still the UST, so only liveness and deadlines keep sub-reads
/// away from it), then of a node of the other partition under reads and causal sessions (the
/// writes move the UST past the paused replica). Reads must keep flowing at half their rate
/// or more, none may fail, and after each resume every node coordinates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_keep_flowing_while_a_store_node_is_paused() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    cluster.wait_ready(WAIT).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    let urls = cluster.api_urls();
    let config = cluster.current_config().await.unwrap();
    let ids = Arc::new(ids_per_partition(&config, 20));
    let docs: Vec<(&str, &str, Value)> = ids
        .values()
        .flatten()
        .map(|id| (COLLECTION, id.as_str(), json!({ "id": id })))
        .collect();
    let ts = cluster.append(&[tx::replace(&docs)]).await.unwrap()[0];
    for node in cluster.node_ids() {
        cluster.wait_ust(node, ts, WAIT).await.unwrap();
    }

    let partitions: Vec<&Vec<NodeId>> = config.replicas.values().collect();
    let (first, second) = (partitions[0][1], partitions[1][1]);

    let (rec, http, (stop, stopped)) = readers();
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..HTTP_READERS {
        tasks.spawn(http_reader(
            Arc::clone(&rec),
            http.clone(),
            urls.clone(),
            Arc::clone(&ids),
            r,
            stopped.clone(),
        ));
    }
    let grpc_stop = watch::channel(false);
    let mut grpc_tasks = tokio::task::JoinSet::new();
    grpc_tasks.spawn(grpc_reader(
        Arc::clone(&rec),
        cluster
            .client(coordinator_away_from(&config, first))
            .unwrap(),
        Arc::clone(&ids),
        grpc_stop.1.clone(),
    ));
    until("the reads to flow", WAIT, || async {
        (rec.window("http", Duration::ZERO, rec.now()).ok > 20).then_some(())
    })
    .await
    .unwrap();

    // 1. Reads only: the paused replica stays readable by its committed ts.
    let phase = "reads only";
    let results = pause_and_measure(&cluster, &rec, first, &["http", "grpc"], phase).await;
    let mut problems = Vec::new();
    check(&results, phase, &mut problems);
    assert_healthy(&cluster, &ids).await;
    let _ = grpc_stop.0.send(true);
    while grpc_tasks.join_next().await.is_some() {}

    // 2. Reads, a reader at the other partition, and causal sessions writing.
    let grpc_stop = watch::channel(false);
    grpc_tasks.spawn(grpc_reader(
        Arc::clone(&rec),
        cluster
            .client(coordinator_away_from(&config, second))
            .unwrap(),
        Arc::clone(&ids),
        grpc_stop.1.clone(),
    ));
    for _ in 0..2 {
        tasks.spawn(causal_session(
            Arc::clone(&rec),
            http.clone(),
            urls.clone(),
            stopped.clone(),
        ));
    }
    let phase = "reads and causal sessions";
    let results =
        pause_and_measure(&cluster, &rec, second, &["http", "grpc", "causal"], phase).await;
    let _ = stop.send(true);
    let _ = grpc_stop.0.send(true);
    while tasks.join_next().await.is_some() {}
    while grpc_tasks.join_next().await.is_some() {}
    check(&results, phase, &mut problems);
    for reader in ["http", "grpc", "causal"] {
        let failures = rec.failures(reader, 10);
        if !failures.is_empty() {
            problems.push(format!("{reader} failures: {failures:?}"));
        }
    }
    assert_healthy(&cluster, &ids).await;
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("\n"),
        cluster.logs()
    );
}

/// Kills (on drop) a child process started by a test.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lag of the UST behind the log, in records: the highest committed ts of the running
/// nodes less the lowest UST among them.
async fn ust_lag(cluster: &LocalCluster, running: &[NodeId]) -> Option<u64> {
    let mut committed = 0;
    let mut ust = u64::MAX;
    for &node in running {
        let s = cluster.status(node).await.ok()?;
        committed = committed.max(s.committed);
        ust = ust.min(s.ust);
    }
    Some(committed.saturating_sub(ust))
}

/// A store node killed -9 and restarted under a heavy closed-loop write load (`causeway bench`,
/// 32 writers, thousands of writes/s): while it is down and while it catches up on the log, the
/// UST follows the other replica of its partition (it stays within a second of writes of the
/// log) and causal sessions (a write through one api-server, a read of it at `Causeway-After`
/// through the other) keep going at half their rate or more with no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_node_restarted_under_heavy_writes_holds_back_neither_the_ust_nor_causal_reads() {
    /// The most the UST may lag the log, in records (a second of this load's writes or so).
    const MAX_LAG: u64 = 1_500;
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    let urls = cluster.api_urls();
    let node = cluster.node_ids()[0];
    let _bench = Child(
        std::process::Command::new(causeway_tests::binary("causeway").unwrap())
            .args(["bench", "--url", &urls[0], "--token", API_TOKEN])
            .args(["--workload", "write", "--concurrency", "32", "--no-load"])
            .args(["--duration", "300", "--collection", "heavy"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (rec, http, (stop, stopped)) = readers();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        tasks.spawn(causal_session(
            Arc::clone(&rec),
            http.clone(),
            urls.clone(),
            stopped.clone(),
        ));
    }
    let all = cluster.node_ids();
    let others: Vec<NodeId> = all.iter().copied().filter(|n| *n != node).collect();
    let mut lags = Vec::new();
    let sample = |lags: &mut Vec<u64>, lag: Option<u64>| lags.extend(lag);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = rec.window("causal", Duration::ZERO, rec.now());
    let applied_before = cluster.status(others[0]).await.unwrap().committed;

    let killed_at = rec.now();
    cluster.kill(node).unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sample(&mut lags, ust_lag(&cluster, &others).await);
    }
    cluster.restart(node).unwrap();
    // Until the restarted node has caught up with the log (its committed ts reaches where the
    // others were when it restarted), then a little more.
    let target = cluster.status(others[0]).await.unwrap().committed;
    let caught_up = until(
        "the restarted node to catch up",
        Duration::from_secs(90),
        || {
            let cluster = &cluster;
            async move {
                let s = cluster.status(node).await.ok()?;
                (s.committed >= target).then_some(())
            }
        },
    );
    let sampling = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            lags.extend(ust_lag(&cluster, &others).await);
        }
    };
    tokio::select! {
        r = caught_up => r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs())),
        () = sampling => unreachable!(),
    }
    let caught_up_at = rec.now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sample(&mut lags, ust_lag(&cluster, &all).await);
    }
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let during = rec.window("causal", killed_at, caught_up_at);
    let written = cluster.status(others[0]).await.unwrap().committed - applied_before;
    let max_lag = lags.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{written} records written from the kill on; the restarted node caught up {:.1} s after \
         the kill; UST lag samples (records): max {max_lag}, {lags:?}; causal sessions before: \
         {before}; from the kill until caught up: {during}",
        (caught_up_at - killed_at).as_secs_f64()
    );
    let failures = rec.failures("causal", 10);
    assert!(failures.is_empty(), "causal failures: {failures:?}");
    assert!(
        during.rate() >= MIN_SHARE * before.rate(),
        "causal sessions stalled: {during}, against {before} before"
    );
    assert!(
        max_lag <= MAX_LAG,
        "the UST fell {max_lag} records behind the log: {lags:?}"
    );
    assert!(
        written > 5_000,
        "the write load was light: {written} records"
    );
}
