//! Cluster tests on 2P × 2R with the Kafka backend: real processes, a real broker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use causeway_core::{ClusterConfig, KeyHash, NodeId, PartitionId, Timestamp};
use causeway_proto::v1 as pb;
use causeway_tests::{tx, until, ClusterSpec, LocalCluster};
use rand::{Rng, SeedableRng};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn key(collection: &str, id: &str) -> pb::DocumentKey {
    pb::DocumentKey {
        collection: collection.to_owned(),
        id: id.to_owned(),
    }
}

async fn config(cluster: &LocalCluster) -> ClusterConfig {
    let cm = cluster.config_manager().await.unwrap();
    cm.get_config()
        .await
        .unwrap()
        .current
        .expect("bootstrapped")
}

/// Ids whose documents land on each partition, `per` of each.
fn ids_per_partition(
    config: &ClusterConfig,
    collection: &str,
    per: usize,
) -> BTreeMap<PartitionId, Vec<String>> {
    let mut out: BTreeMap<PartitionId, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let id = format!("doc-{i}");
        let p = config.partition_of(KeyHash::of(collection, &id));
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

async fn read(
    cluster: &LocalCluster,
    node: NodeId,
    keys: Vec<pb::DocumentKey>,
    min_ts: Timestamp,
) -> pb::ReadResponse {
    let mut client = cluster.client(node).unwrap();
    client
        .read(pb::ReadRequest {
            keys,
            min_ts: min_ts.get(),
            timeout_ms: 10_000,
            with_automerge: false,
        })
        .await
        .unwrap_or_else(|e| panic!("read on {node}: {e}\n{}", cluster.logs()))
        .into_inner()
}

fn json_of(doc: &pb::Document) -> serde_json::Value {
    serde_json::from_slice(&doc.json).unwrap()
}

/// Transactions appended through the log become visible at the UST on every partition, and
/// every node coordinates reads that see them.
/// Versions of one document written after the held read in
/// `a_long_read_holds_gc_and_then_versions_are_pruned`.
const NEWER_VERSIONS: u64 = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_transactions_become_visible_everywhere() {
    let cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    let config = config(&cluster).await;
    let ids = ids_per_partition(&config, "things", 3);
    let all: Vec<&String> = ids.values().flatten().collect();
    let mut txs = Vec::new();
    for (n, id) in all.iter().enumerate() {
        txs.push(tx::replace(&[(
            "things",
            id,
            json!({"n": n, "name": id, "nested": {"ok": true}}),
        )]));
    }
    let stamps = cluster.append(&txs).await.unwrap();
    let last = *stamps.last().unwrap();
    for node in cluster.node_ids() {
        cluster.wait_ust(node, last, WAIT).await.unwrap();
    }
    for node in cluster.node_ids() {
        let keys = all.iter().map(|id| key("things", id)).collect();
        let r = read(&cluster, node, keys, last).await;
        assert!(r.at.unwrap().ts >= last.get());
        for (n, doc) in r.documents.iter().enumerate() {
            assert!(
                doc.found,
                "{} missing on a read coordinated by {node}",
                doc.id
            );
            assert_eq!(json_of(doc)["n"], json!(n));
            assert_eq!(json_of(doc)["nested"]["ok"], json!(true));
        }
    }
    // The metrics show the same frontier.
    let text = cluster.metrics(cluster.node_ids()[0]).await.unwrap();
    assert!(text.contains("causeway_store_ust_ts"), "{text}");
}

/// 1,000 random transfers between accounts on both partitions, with concurrent snapshot
/// readers: every read sums to the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_invariant_holds_under_concurrent_transfers() {
    let cluster = Arc::new(LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap());
    let config = config(&cluster).await;
    let accounts: Vec<String> = ids_per_partition(&config, "accounts", 5)
        .into_values()
        .flatten()
        .collect();
    const OPENING: i64 = 100;
    let total = OPENING * accounts.len() as i64;
    let deposits: Vec<(&str, &str, &str, i64)> = accounts
        .iter()
        .map(|a| ("accounts", a.as_str(), "balance", OPENING))
        .collect();
    let opened = cluster.append(&[tx::increment(&deposits)]).await.unwrap()[0];

    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for (i, node) in cluster.node_ids().into_iter().enumerate() {
        let cluster = Arc::clone(&cluster);
        let done = Arc::clone(&done);
        let reads = Arc::clone(&reads);
        let keys: Vec<pb::DocumentKey> = accounts.iter().map(|a| key("accounts", a)).collect();
        readers.push(tokio::spawn(async move {
            let mut last_ts = 0;
            for _ in 0..2_000 {
                if done.load(Ordering::Relaxed) && i > 0 {
                    break;
                }
                let r = read(&cluster, node, keys.clone(), opened).await;
                let at = r.at.unwrap().ts;
                assert!(
                    at >= last_ts,
                    "reads on {node} went back in time: {last_ts} then {at}"
                );
                last_ts = at;
                let sum: i64 = r
                    .documents
                    .iter()
                    .map(|d| json_of(d)["balance"].as_i64().unwrap())
                    .sum();
                assert_eq!(sum, total, "a read at {at} on {node} sums to {sum}");
                reads.fetch_add(1, Ordering::Relaxed);
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut last = opened;
    for _ in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let from = rng.random_range(0..accounts.len());
                let to = (from + rng.random_range(1..accounts.len())) % accounts.len();
                let amount = rng.random_range(1..=20);
                tx::increment(&[
                    ("accounts", &accounts[from], "balance", -amount),
                    ("accounts", &accounts[to], "balance", amount),
                ])
            })
            .collect();
        last = *cluster.append(&batch).await.unwrap().last().unwrap();
    }
    for node in cluster.node_ids() {
        cluster.wait_ust(node, last, WAIT).await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) >= 4, "the readers ran");
    let r = read(
        &cluster,
        cluster.node_ids()[0],
        accounts.iter().map(|a| key("accounts", a)).collect(),
        last,
    )
    .await;
    let sum: i64 = r
        .documents
        .iter()
        .map(|d| json_of(d)["balance"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, total);
    assert!(
        r.documents
            .iter()
            .any(|d| json_of(d)["balance"].as_i64() != Some(OPENING)),
        "transfers applied"
    );
}

/// kill -9 of one replica: the UST keeps rising and reads keep succeeding; restarted, it catches
/// up and its per-interval digests equal its peer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_does_not_stall_and_catches_up() {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    let config = config(&cluster).await;
    let ids = ids_per_partition(&config, "items", 4);
    let all: Vec<String> = ids.values().flatten().cloned().collect();
    let write = |round: u64| {
        all.iter()
            .map(|id| tx::replace(&[("items", id, json!({"round": round, "id": id}))]))
            .collect::<Vec<_>>()
    };
    let first = *cluster.append(&write(0)).await.unwrap().last().unwrap();
    for node in cluster.node_ids() {
        cluster.wait_ust(node, first, WAIT).await.unwrap();
    }

    let victim = config.replicas_of(PartitionId(0))[1];
    let peer = config.replicas_of(PartitionId(0))[0];
    let coordinator = config.replicas_of(PartitionId(1))[0];
    cluster.kill(victim).unwrap();
    let mut last = first;
    for round in 1..=5 {
        last = *cluster.append(&write(round)).await.unwrap().last().unwrap();
        // The UST follows the live replica of partition 0.
        cluster.wait_ust(coordinator, last, WAIT).await.unwrap();
        let r = read(
            &cluster,
            coordinator,
            all.iter().map(|id| key("items", id)).collect(),
            last,
        )
        .await;
        assert!(r
            .documents
            .iter()
            .all(|d| json_of(d)["round"] == json!(round)));
    }
    // The rounds above need not outlast the liveness timeout: the UST never waited for the
    // victim. Its peer declares it dead once its gossip has been missing for that long.
    until("the peer to see the victim dead", WAIT, || async {
        let status = cluster.status(peer).await.ok()?;
        status
            .peers
            .iter()
            .any(|p| p.node_id == victim.0 && !p.alive)
            .then_some(())
    })
    .await
    .unwrap();

    cluster.restart(victim).unwrap();
    until("the restarted replica to catch up", WAIT, || async {
        let s = cluster.status(victim).await.ok()?;
        (s.committed >= last.get() && s.can_coordinate).then_some(())
    })
    .await
    .unwrap();
    let intervals: Vec<pb::KeyInterval> = config
        .slicing
        .intervals_of(PartitionId(0))
        .iter()
        .map(|i| pb::KeyInterval {
            start: i.start,
            end: i.end_hash(),
        })
        .collect();
    let digest = |node: NodeId| {
        let intervals = intervals.clone();
        let mut client = cluster.client(node).unwrap();
        async move {
            client
                .digest(pb::DigestRequest {
                    ts: last.get(),
                    intervals,
                })
                .await
                .unwrap()
                .into_inner()
                .digests
        }
    };
    let (a, b) = (digest(victim).await, digest(peer).await);
    assert_eq!(a, b, "the restarted replica's digests equal its peer's");
    assert!(!a.is_empty());
    // And it serves reads again.
    let r = read(
        &cluster,
        victim,
        all.iter().map(|id| key("items", id)).collect(),
        last,
    )
    .await;
    assert!(r.documents.iter().all(|d| json_of(d)["round"] == json!(5)));
}

/// A long-running read holds the GC timestamp; once it ends, versions below the GC timestamp
/// are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_holds_gc_and_then_versions_are_pruned() {
    let cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    let nodes = cluster.node_ids();
    let first = cluster
        .append(&[tx::replace(&[("docs", "x", json!({"v": 0}))])])
        .await
        .unwrap()[0];
    for &node in &nodes {
        cluster.wait_ust(node, first, WAIT).await.unwrap();
    }
    // Hold a snapshot on one node.
    let mut holder = cluster.client(nodes[0]).unwrap();
    let mut hold = holder
        .hold_snapshot(pb::HoldSnapshotRequest {
            min_ts: first.get(),
            timeout_ms: 10_000,
            max_hold_ms: 120_000,
            at: None,
            owner: String::new(),
            linger_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let held = hold.message().await.unwrap().unwrap().at.unwrap();
    assert!(held.ts >= first.get());

    // Many newer versions of x: more than `snapshot_every_versions` (64), so that once GC passes
    // them, some are older than the snapshot the newest one's delta chain rests on.
    let mut last = first;
    for v in 1..=NEWER_VERSIONS {
        last = cluster
            .append(&[tx::replace(&[("docs", "x", json!({"v": v}))])])
            .await
            .unwrap()[0];
    }
    for &node in &nodes {
        cluster.wait_ust(node, last, WAIT).await.unwrap();
    }
    // The GC timestamp rises to the held read everywhere, and no further.
    for &node in &nodes {
        until(
            &format!("{node}'s GC to reach the held read"),
            WAIT,
            || async {
                let s = cluster.status(node).await.ok()?;
                assert!(
                    s.gc <= held.ts,
                    "{node} GC {} passed the held read {}",
                    s.gc,
                    held.ts
                );
                (s.gc == held.ts).then_some(())
            },
        )
        .await
        .unwrap();
    }
    let config = config(&cluster).await;
    let owners = config
        .replicas_of(config.partition_of(KeyHash::of("docs", "x")))
        .to_vec();
    for &node in &owners {
        let mut client = cluster.client(node).unwrap();
        let r = client
            .get_at(pb::GetAtRequest {
                at: Some(held),
                keys: vec![key("docs", "x")],
                with_automerge: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            json_of(&r.documents[0])["v"],
            json!(0),
            "the held version on {node}"
        );
    }

    // Release the hold: GC moves past it and the old versions go.
    drop(hold);
    for &node in &nodes {
        until(
            &format!("{node}'s GC to pass the released read"),
            WAIT,
            || async {
                let s = cluster.status(node).await.ok()?;
                (s.gc > held.ts).then_some(())
            },
        )
        .await
        .unwrap();
    }
    for &node in &owners {
        until(&format!("{node} to prune"), WAIT, || async {
            let m = cluster.metrics(node).await.ok()?;
            let pruned = m
                .lines()
                .find(|l| l.starts_with("causeway_store_gc_pruned_versions_total "))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()?;
            (pruned > 0).then_some(())
        })
        .await
        .unwrap();
        let mut client = cluster.client(node).unwrap();
        let err = client
            .get_at(pb::GetAtRequest {
                at: Some(held),
                keys: vec![key("docs", "x")],
                with_automerge: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    }
    // The newest version is of course still there.
    let r = read(&cluster, nodes[0], vec![key("docs", "x")], last).await;
    assert_eq!(json_of(&r.documents[0])["v"], json!(NEWER_VERSIONS));
}
