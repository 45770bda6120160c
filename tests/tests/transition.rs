//! Transitions between configurations on real processes and a real broker: the data moves by
//! backfill while writes and reads go on, the new configuration is installed, and the nodes that
//! lost intervals drop them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use causeway_core::{ClusterConfig, Epoch, Interval, NodeId, Timestamp};
use causeway_proto::v1 as pb;
use causeway_tests::{tx, until, ClusterSpec, LocalCluster};
use rand::{Rng, SeedableRng};
use serde_json::json;

const TRANSITION: Duration = Duration::from_secs(90);

fn key(collection: &str, id: &str) -> pb::DocumentKey {
    pb::DocumentKey {
        collection: collection.to_owned(),
        id: id.to_owned(),
    }
}

fn json_of(doc: &pb::Document) -> serde_json::Value {
    serde_json::from_slice(&doc.json).unwrap()
}

async fn current(cluster: &LocalCluster) -> ClusterConfig {
    let cm = cluster.config_manager().await.unwrap();
    cm.get_config()
        .await
        .unwrap()
        .current
        .expect("bootstrapped")
}

/// Waits until `epoch` is current with no transition after it.
async fn installed(cluster: &LocalCluster, epoch: Epoch) -> Result<ClusterConfig> {
    let cm = cluster.config_manager().await?;
    let done = until(
        &format!("epoch {epoch} to be installed"),
        TRANSITION,
        || {
            let cm = cm.clone();
            async move {
                let pair = cm.get_config().await.ok()?;
                (pair.current_epoch() == epoch && pair.next.is_none()).then_some(pair.current?)
            }
        },
    )
    .await;
    match done {
        Ok(c) => Ok(c),
        Err(e) => {
            let mut statuses = String::new();
            for node in cluster.node_ids() {
                statuses.push_str(&format!("{node}: {:?}\n", cluster.status(node).await.ok()));
            }
            bail!("{e}\n{statuses}\n{}", cluster.logs())
        }
    }
}

/// The least keyspace any scheme must move: what each partition's share grows by.
fn least_movement(current: &ClusterConfig, next: &ClusterConfig) -> u128 {
    next.slicing
        .partitions()
        .map(|p| {
            next.slicing
                .share(p)
                .saturating_sub(current.slicing.share(p))
        })
        .sum()
}

/// The moved keyspace of a transition: what the partitions gain, once per partition.
fn moved(current: &ClusterConfig, next: &ClusterConfig) -> u128 {
    next.slicing
        .partitions()
        .filter_map(|p| next.replicas_of(p).first().copied())
        .flat_map(|n| current.gains(next, n))
        .map(|g| g.interval.len())
        .sum()
}

/// The digests of each interval of `config` on each of its replicas, at `ts`: equal per
/// partition.
async fn assert_replicas_equal(cluster: &LocalCluster, config: &ClusterConfig, ts: Timestamp) {
    for p in config.slicing.partitions() {
        let intervals: Vec<pb::KeyInterval> = config
            .slicing
            .intervals_of(p)
            .iter()
            .map(|i| pb::KeyInterval {
                start: i.start,
                end: i.end_hash(),
            })
            .collect();
        let mut seen: Option<(NodeId, Vec<String>)> = None;
        for &node in config.replicas_of(p) {
            until(&format!("{node} to commit {ts}"), TRANSITION, || async move {
                (cluster.status(node).await.ok()?.committed >= ts.get()).then_some(())
            })
            .await
            .unwrap();
            let digests = digests(cluster, node, ts, intervals.clone()).await;
            match &seen {
                None => seen = Some((node, digests)),
                Some((first, theirs)) => assert_eq!(
                    &digests, theirs,
                    "{p}: the digests of {node} and {first} differ at {ts}"
                ),
            }
        }
    }
}

async fn digests(
    cluster: &LocalCluster,
    node: NodeId,
    ts: Timestamp,
    intervals: Vec<pb::KeyInterval>,
) -> Vec<String> {
    let mut client = cluster.client(node).unwrap();
    client
        .digest(pb::DigestRequest {
            ts: ts.get(),
            intervals,
        })
        .await
        .unwrap_or_else(|e| panic!("digest on {node}: {e}"))
        .into_inner()
        .digests
}

/// The digest of an interval with no documents.
fn empty_digest() -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = causeway_store_node::storage::Store::open(dir.path(), Default::default()).unwrap();
    let all = Interval::new(0, causeway_core::KEYSPACE);
    format!("{:032x}", store.digest(&all, Timestamp::ZERO).unwrap())
}

/// A steady stream of writes straight into the log: new documents and bank transfers. Records
/// every acknowledged document with its content.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Timestamp>>,
    acknowledged: Arc<Mutex<BTreeMap<String, i64>>>,
}

impl Writer {
    fn start(cluster: Arc<LocalCluster>, accounts: Vec<String>, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
        let task = {
            let stop = Arc::clone(&stop);
            let acknowledged = Arc::clone(&acknowledged);
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut last = Timestamp::ZERO;
                for round in 0..20_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("w{seed}-{round}");
                    let from = rng.random_range(0..accounts.len());
                    let to = (from + rng.random_range(1..accounts.len())) % accounts.len();
                    let amount = rng.random_range(1..=20);
                    let batch = vec![
                        tx::replace(&[("things", &id, json!({"round": round}))]),
                        tx::increment(&[
                            ("accounts", &accounts[from], "balance", -amount),
                            ("accounts", &accounts[to], "balance", amount),
                        ]),
                    ];
                    last = *cluster.append(&batch).await?.last().expect("two");
                    acknowledged.lock().unwrap().insert(id, round as i64);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(last)
            })
        };
        Writer {
            stop,
            task,
            acknowledged,
        }
    }

    async fn stop(self) -> (Timestamp, BTreeMap<String, i64>) {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.task.await.unwrap().unwrap();
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        (last, acknowledged)
    }
}

/// Snapshot reads of every account through `node`: the total never changes, time never goes
/// back. Counts the reads; any failed read fails the test.
struct Reader {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    reads: Arc<AtomicU64>,
}

impl Reader {
    fn start(
        cluster: Arc<LocalCluster>,
        node: NodeId,
        accounts: Vec<String>,
        total: i64,
    ) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let task = {
            let stop = Arc::clone(&stop);
            let reads = Arc::clone(&reads);
            tokio::spawn(async move {
                let keys: Vec<pb::DocumentKey> =
                    accounts.iter().map(|a| key("accounts", a)).collect();
                let mut last = (0, 0);
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut client = cluster.client(node).unwrap();
                    let r = client
                        .read(pb::ReadRequest {
                            keys: keys.clone(),
                            min_ts: 0,
                            timeout_ms: 5_000,
                            with_automerge: false,
                        })
                        .await
                        .unwrap_or_else(|e| panic!("a read through {node} failed: {e}"))
                        .into_inner();
                    let at = r.at.unwrap();
                    assert!(
                        (at.epoch, at.ts) >= last,
                        "reads through {node} went back: {last:?} then {at:?}"
                    );
                    last = (at.epoch, at.ts);
                    let sum: i64 = r
                        .documents
                        .iter()
                        .map(|d| json_of(d)["balance"].as_i64().unwrap_or(0))
                        .sum();
                    assert_eq!(sum, total, "a read at {at:?} through {node} sums to {sum}");
                    reads.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Reader { stop, task, reads }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.reads.load(Ordering::Relaxed)
    }
}

/// Every acknowledged document reads back through `node` with its content.
async fn assert_readable(
    cluster: &LocalCluster,
    node: NodeId,
    acknowledged: &BTreeMap<String, i64>,
    at: Timestamp,
) {
    let ids: Vec<&String> = acknowledged.keys().collect();
    for chunk in ids.chunks(200) {
        let mut client = cluster.client(node).unwrap();
        let r = client
            .read(pb::ReadRequest {
                keys: chunk.iter().map(|id| key("things", id)).collect(),
                min_ts: at.get(),
                timeout_ms: 10_000,
                with_automerge: false,
            })
            .await
            .unwrap()
            .into_inner();
        for doc in &r.documents {
            assert!(doc.found, "acknowledged {} is missing", doc.id);
            assert_eq!(json_of(doc)["round"], json!(acknowledged[&doc.id]));
        }
    }
}

/// 2×2 → 1×2 → 2×2 under writes and snapshot reads: the data of the removed partition moves to
/// the remaining one, the nodes that left drop theirs and report drained, then they come back
/// as the spares of a scale-up. Every acknowledged write reads back, every snapshot read sums to
/// the bank total, replicas hold equal digests, and the moved keyspace is the Cut-Shift minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_and_up_under_load() {
    let cluster = Arc::new(LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap());
    let first = current(&cluster).await;
    let accounts: Vec<String> = (0..16).map(|i| format!("acct-{i}")).collect();
    const OPENING: i64 = 100;
    let total = OPENING * accounts.len() as i64;
    let deposits: Vec<(&str, &str, &str, i64)> = accounts
        .iter()
        .map(|a| ("accounts", a.as_str(), "balance", OPENING))
        .collect();
    let opened = cluster.append(&[tx::increment(&deposits)]).await.unwrap()[0];
    // Enough documents on both partitions that the backfill takes several chunks.
    let seed: Vec<_> = (0..600)
        .map(|i| {
            tx::replace(&[(
                "seed",
                &format!("s{i}"),
                json!({"i": i, "pad": "x".repeat(200)}),
            )])
        })
        .collect();
    cluster.append(&seed).await.unwrap();
    // Node 1 is in partition 0 in all three configurations: it coordinates the reads.
    let reader_node = NodeId(1);
    cluster
        .wait_ust(reader_node, opened, TRANSITION)
        .await
        .unwrap();

    let writer = Writer::start(Arc::clone(&cluster), accounts.clone(), 1);
    let reader = Reader::start(Arc::clone(&cluster), reader_node, accounts.clone(), total);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cm = cluster.config_manager().await.unwrap();
    let proposed = cm
        .propose_shape(1, 2)
        .await
        .unwrap()
        .next
        .expect("a next configuration");
    assert_eq!(
        moved(&first, &proposed),
        first.slicing.share(causeway_core::PartitionId(1)),
        "scale-down moves exactly the removed partition's share"
    );
    assert_eq!(moved(&first, &proposed), least_movement(&first, &proposed));
    let second = installed(&cluster, proposed.epoch).await.unwrap();
    let left: Vec<NodeId> = first
        .node_ids()
        .difference(&second.node_ids())
        .copied()
        .collect();
    assert_eq!(left.len(), 2);
    for &node in &left {
        let cluster = &cluster;
        until(
            &format!("{node} to report drained"),
            TRANSITION,
            || async move { cluster.status(node).await.ok()?.drained.then_some(()) },
        )
        .await
        .unwrap();
    }

    // Back up to 2×2: the drained nodes are the spares.
    let proposed = cm
        .propose_shape(2, 2)
        .await
        .unwrap()
        .next
        .expect("a next configuration");
    assert_eq!(
        moved(&second, &proposed),
        least_movement(&second, &proposed)
    );
    let third = installed(&cluster, proposed.epoch).await.unwrap();
    let (last, acknowledged) = writer.stop().await;
    let reads = reader.stop().await;
    assert!(
        reads > 20,
        "the reader ran through both transitions ({reads} reads)"
    );
    assert!(
        acknowledged.len() >= 10,
        "the writer ran ({} writes)",
        acknowledged.len()
    );

    for node in third.node_ids() {
        cluster.wait_ust(node, last, TRANSITION).await.unwrap();
    }
    assert_readable(&cluster, reader_node, &acknowledged, last).await;
    assert_replicas_equal(&cluster, &third, last).await;
    // What a node no longer owns is gone from it.
    let empty = empty_digest();
    for &node in &third.node_ids() {
        let lost: Vec<pb::KeyInterval> = third
            .slicing
            .intervals()
            .filter(|&(_, p)| Some(p) != third.partition_of_node(node))
            .map(|(i, _)| pb::KeyInterval {
                start: i.start,
                end: i.end_hash(),
            })
            .collect();
        let committed = Timestamp(cluster.status(node).await.unwrap().committed);
        for d in digests(&cluster, node, committed, lost).await {
            assert_eq!(d, empty, "{node} still holds documents it does not own");
        }
    }
    println!(
        "checked {reads} snapshot reads and {} acknowledged writes through two transitions: 0 failures",
        acknowledged.len()
    );
}

/// A 2×2 cluster whose backfill is slow (small chunks, a low rate bound) and holds `docs`
/// documents, so that a test can act in the middle of a transition.
async fn slow_cluster(docs: usize) -> LocalCluster {
    let mut spec = ClusterSpec::new(2, 2);
    spec.tuning.backfill_chunk_records = CHUNK;
    spec.tuning.backfill_chunk_bytes = 16 << 10;
    spec.tuning.backfill_bytes_per_second = 80_000;
    let cluster = LocalCluster::start(spec).await.unwrap();
    let seed: Vec<_> = (0..docs)
        .map(|i| {
            tx::replace(&[(
                "seed",
                &format!("s{i}"),
                json!({"i": i, "pad": "x".repeat(200)}),
            )])
        })
        .collect();
    let mut last = Timestamp::ZERO;
    for batch in seed.chunks(500) {
        last = *cluster.append(batch).await.unwrap().last().unwrap();
    }
    for node in cluster.node_ids() {
        cluster.wait_ust(node, last, TRANSITION).await.unwrap();
    }
    cluster
}

const CHUNK: u32 = 25;

/// A node's backfill progress, once it has one.
async fn backfill(cluster: &LocalCluster, node: NodeId) -> Option<pb::BackfillStatus> {
    cluster.status(node).await.ok()?.backfill
}

/// A counter from a node's metrics.
async fn counter(cluster: &LocalCluster, node: NodeId, name: &str) -> u64 {
    let text = cluster.metrics(node).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("causeway_store_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics of {node}"))
}

/// Every seeded document reads back through `node`.
async fn assert_seed_readable(cluster: &LocalCluster, node: NodeId, docs: usize) {
    let ids: Vec<String> = (0..docs).map(|i| format!("s{i}")).collect();
    for chunk in ids.chunks(300) {
        let mut client = cluster.client(node).unwrap();
        let r = client
            .read(pb::ReadRequest {
                keys: chunk.iter().map(|id| key("seed", id)).collect(),
                min_ts: 0,
                timeout_ms: 10_000,
                with_automerge: false,
            })
            .await
            .unwrap()
            .into_inner();
        for doc in &r.documents {
            assert!(doc.found, "seeded {} is missing through {node}", doc.id);
        }
    }
}

/// kill -9 of a receiver in the middle of its backfill: restarted, it resumes from its last
/// chunk instead of starting over (the sources re-send only the chunks in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_receiver_resumes_its_backfill() {
    const DOCS: usize = 2_400;
    let mut cluster = slow_cluster(DOCS).await;
    let cm = cluster.config_manager().await.unwrap();
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    let (steady, victim) = (NodeId(1), NodeId(2));
    let before = until("the victim to be halfway", TRANSITION, || {
        let cluster = &cluster;
        async move {
            let b = backfill(cluster, victim).await?;
            (b.records_done >= 400 && !b.backfilled).then_some(b.records_done)
        }
    })
    .await
    .unwrap();
    cluster.kill(victim).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(victim).unwrap();
    installed(&cluster, next.epoch).await.unwrap();
    let moved = counter(&cluster, steady, "backfill_records_received_total").await;
    // The victim's counter starts at its restart.
    let after = counter(&cluster, victim, "backfill_records_received_total").await;
    let resent = (before + after).saturating_sub(moved);
    println!(
        "the interval holds {moved} records; {before} were in before the kill, {after} came after the restart: {resent} were sent again"
    );
    assert!(moved > 800, "the moved interval is large ({moved} records)");
    assert!(
        resent <= u64::from(12 * CHUNK),
        "{resent} records were sent again after the restart: the backfill started over"
    );
    assert_seed_readable(&cluster, victim, DOCS).await;
    let config = current(&cluster).await;
    let at = Timestamp(cluster.status(steady).await.unwrap().ust);
    assert_replicas_equal(&cluster, &config, at).await;
}

/// kill -9 of the source in the middle of a stream: the receivers finish from the other owner
/// while it is down, and the transition installs once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_is_replaced_by_another_owner() {
    const DOCS: usize = 1_600;
    let mut cluster = slow_cluster(DOCS).await;
    let cm = cluster.config_manager().await.unwrap();
    let config = current(&cluster).await;
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    let sources = config.replicas_of(causeway_core::PartitionId(1)).to_vec();
    let receivers = config.replicas_of(causeway_core::PartitionId(0)).to_vec();
    let watched = receivers[0];
    until("a receiver to be in the middle", TRANSITION, || {
        let cluster = &cluster;
        async move {
            let b = backfill(cluster, watched).await?;
            (b.records_done >= 200 && !b.backfilled).then_some(())
        }
    })
    .await
    .unwrap();
    // Both receivers start with the first owner.
    let (first, other) = (sources[0], sources[1]);
    let sent_before = counter(&cluster, other, "backfill_records_sent_total").await;
    cluster.kill(first).unwrap();
    for &node in &receivers {
        let cluster = &cluster;
        until(
            &format!("{node} to finish while {first} is down"),
            TRANSITION,
            || async move { backfill(cluster, node).await?.backfilled.then_some(()) },
        )
        .await
        .unwrap();
    }
    let sent_after = counter(&cluster, other, "backfill_records_sent_total").await;
    assert!(
        sent_after > sent_before,
        "{other} served the rest of the backfill ({sent_before} → {sent_after} records)"
    );
    cluster.restart(first).unwrap();
    let installed = installed(&cluster, next.epoch).await.unwrap();
    for &node in &receivers {
        assert_seed_readable(&cluster, node, DOCS).await;
    }
    let at = Timestamp(cluster.status(receivers[0]).await.unwrap().ust);
    assert_replicas_equal(&cluster, &installed, at).await;
}
