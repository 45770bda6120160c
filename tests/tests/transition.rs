//! Transitions between configurations on real processes and a real broker, under a steady
//! mixed load through two api-servers (writes, reads, bank transfers, causal sessions) that
//! records every request: the data moves by backfill, the new configuration is installed, the
//! nodes that lost intervals drop them, and no request fails.

use std::time::Duration;

use anyhow::{bail, Result};
use causeway_core::{ClusterConfig, Epoch, Interval, NodeId, Timestamp};
use causeway_proto::v1 as pb;
use causeway_tests::load::{Load, LoadSpec};
use causeway_tests::{tx, until, ClusterSpec, LocalCluster};
use serde_json::json;

const TRANSITION: Duration = Duration::from_secs(120);

fn key(collection: &str, id: &str) -> pb::DocumentKey {
    pb::DocumentKey {
        collection: collection.to_owned(),
        id: id.to_owned(),
    }
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

/// The keyspace a transition moves: what the partitions gain, once per partition.
fn moved(current: &ClusterConfig, next: &ClusterConfig) -> u128 {
    next.slicing
        .partitions()
        .filter_map(|p| next.replicas_of(p).first().copied())
        .flat_map(|n| current.gains(next, n))
        .map(|g| g.interval.len())
        .sum()
}

/// The digest of an interval with no documents.
fn empty_digest() -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = causeway_store_node::storage::Store::open(dir.path(), Default::default()).unwrap();
    let all = Interval::new(0, causeway_core::KEYSPACE);
    format!("{:032x}", store.digest(&all, Timestamp::ZERO).unwrap())
}

/// Every node of `config` holds nothing outside its partition; every node of `before` that is
/// not in `config` reports drained and holds nothing at all.
async fn assert_dropped(cluster: &LocalCluster, before: &ClusterConfig, config: &ClusterConfig) {
    let empty = empty_digest();
    for node in before.node_ids().union(&config.node_ids()) {
        let node = *node;
        // A node drops what it no longer owns before it drops its plan.
        until(&format!("{node} to settle"), TRANSITION, || async move {
            cluster
                .status(node)
                .await
                .ok()?
                .backfill
                .is_none()
                .then_some(())
        })
        .await
        .unwrap();
        let not_owned: Vec<Interval> = match config.partition_of_node(node) {
            Some(mine) => config
                .slicing
                .intervals()
                .filter(|&(_, p)| p != mine)
                .map(|(i, _)| i)
                .collect(),
            None => {
                until(
                    &format!("{node} to report drained"),
                    TRANSITION,
                    || async move { cluster.status(node).await.ok()?.drained.then_some(()) },
                )
                .await
                .unwrap();
                vec![Interval::new(0, causeway_core::KEYSPACE)]
            }
        };
        let committed = Timestamp(cluster.status(node).await.unwrap().committed);
        for d in cluster.digests(node, committed, &not_owned).await.unwrap() {
            assert_eq!(d, empty, "{node} still holds documents it does not own");
        }
    }
}

/// Documents straight into the log, so that transitions have data to move.
async fn seed(cluster: &LocalCluster, docs: usize) -> Timestamp {
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
    last
}

/// Starts `spec` with two api-servers and the mixed load, runs the transitions to `shapes` one
/// after the other (each checked: the keyspace moved is the least, the data dropped where it is
/// no longer owned), then stops the load and checks every request and every acknowledged write.
async fn transitions_under_load(spec: ClusterSpec, shapes: &[(u32, u32)]) {
    let mut cluster = LocalCluster::start(spec).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    seed(&cluster, 600).await;
    let load = Load::start(cluster.api_urls(), LoadSpec::default())
        .await
        .unwrap();
    let warm = until("the load to flow", TRANSITION, || async {
        (load.completed() > 50).then_some(())
    })
    .await;
    warm.unwrap();
    let cm = cluster.config_manager().await.unwrap();
    for &(partitions, replicas) in shapes {
        let before = cluster.current_config().await.unwrap();
        load.mark(&format!("to {partitions}x{replicas}"));
        let next = cm
            .propose_shape(partitions, replicas)
            .await
            .unwrap()
            .next
            .expect("a next configuration");
        assert_eq!(
            moved(&before, &next),
            least_movement(&before, &next),
            "the transition to {partitions}x{replicas} moves the least keyspace"
        );
        let after = cluster.wait_stable(TRANSITION).await.unwrap();
        assert_eq!(after.epoch, next.epoch);
        load.mark(&format!("steady {partitions}x{replicas}"));
        assert_dropped(&cluster, &before, &after).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let report = load.stop().await;
    report.assert_clean();
    let read_back = report
        .verify_acknowledged(&cluster.api_urls())
        .await
        .unwrap();
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
    println!(
        "{} transitions: {read_back} acknowledged writes read back, replicas agree",
        shapes.len()
    );
}

/// 1×2 → 2×2 → 3×2 → 1×2: partitions added twice (on spare nodes), then two removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_twice_and_down_under_load() {
    let spec = ClusterSpec {
        spares: 4,
        ..ClusterSpec::new(1, 2)
    };
    transitions_under_load(spec, &[(2, 2), (3, 2), (1, 2)]).await;
}

/// 2×2 → 2×3 → 2×2: a replica added to each partition, then removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_count_up_and_down_under_load() {
    let spec = ClusterSpec {
        spares: 2,
        ..ClusterSpec::new(2, 2)
    };
    transitions_under_load(spec, &[(2, 3), (2, 2)]).await;
}

/// A replica killed under load is marked failed and replaced by a spare, which backfills from
/// the surviving replica; no request fails through the kill or the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_replaced_under_load() {
    let mut cluster = LocalCluster::start(ClusterSpec {
        spares: 1,
        ..ClusterSpec::new(2, 2)
    })
    .await
    .unwrap();
    cluster.start_api_servers(2).await.unwrap();
    seed(&cluster, 600).await;
    let load = Load::start(cluster.api_urls(), LoadSpec::default())
        .await
        .unwrap();
    let warm = until("the load to flow", TRANSITION, || async {
        (load.completed() > 50).then_some(())
    })
    .await;
    warm.unwrap();
    let before = cluster.current_config().await.unwrap();
    let (victim, spare) = (NodeId(4), NodeId(5));
    load.mark("kill");
    cluster.kill(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.mark("replace");
    let cm = cluster.config_manager().await.unwrap();
    // Replacing marks the victim failed, so nothing waits for it.
    let replaced = cm.replace_node(victim, spare).await.unwrap();
    assert!(replaced.current.unwrap().failed.contains(&victim));
    let next = replaced.next.unwrap();
    assert!(next.contains(spare) && !next.contains(victim));
    let after = cluster.wait_stable(TRANSITION).await.unwrap();
    assert_eq!(after.epoch, next.epoch);
    load.mark("steady");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;
    report.assert_clean();
    report
        .verify_acknowledged(&cluster.api_urls())
        .await
        .unwrap();
    // The survivors keep their places; the victim is gone from the configuration.
    for node in before.node_ids() {
        assert_eq!(after.contains(node), node != victim, "{node}");
    }
    assert_dropped(&cluster, &after, &after).await;
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
}

/// A 2×2 cluster whose backfill is slow (small chunks, a low rate bound) and holds `docs`
/// documents, so that a test can act in the middle of a transition.
async fn slow_cluster(docs: usize) -> LocalCluster {
    let mut spec = ClusterSpec::new(2, 2);
    spec.tuning.backfill_chunk_records = CHUNK;
    spec.tuning.backfill_chunk_bytes = 16 << 10;
    spec.tuning.backfill_bytes_per_second = 80_000;
    let cluster = LocalCluster::start(spec).await.unwrap();
    let last = seed(&cluster, docs).await;
    for node in cluster.node_ids() {
        cluster.wait_ust(node, last, TRANSITION).await.unwrap();
    }
    cluster
}

const CHUNK: u32 = 25;

/// Waits until `node` is backfilling and has taken in at least `records` records; answers how
/// many it has.
async fn mid_backfill(cluster: &LocalCluster, node: NodeId, records: u64) -> u64 {
    until(
        &format!("{node} to be in the middle of its backfill"),
        TRANSITION,
        || async move {
            let b = backfill(cluster, node).await?;
            (b.records_done >= records && !b.backfilled).then_some(b.records_done)
        },
    )
    .await
    .unwrap()
}

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
    let before = mid_backfill(&cluster, victim, 400).await;
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
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
}

/// kill -9 of the source in the middle of a stream: the receivers finish from the other owner
/// while it is down, and the transition installs once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_is_replaced_by_another_owner() {
    const DOCS: usize = 1_600;
    let mut cluster = slow_cluster(DOCS).await;
    let cm = cluster.config_manager().await.unwrap();
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    let config = cluster.current_config().await.unwrap();
    let sources = config.replicas_of(causeway_core::PartitionId(1)).to_vec();
    let receivers = config.replicas_of(causeway_core::PartitionId(0)).to_vec();
    mid_backfill(&cluster, receivers[0], 200).await;
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
    installed(&cluster, next.epoch).await.unwrap();
    for &node in &receivers {
        assert_seed_readable(&cluster, node, DOCS).await;
    }
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
}

/// The config manager is killed in the middle of a transition. Meanwhile the nodes go on: a node
/// killed and restarted serves reads from its saved configurations, and the backfill finishes.
/// Once the config manager is back, the transition installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_manager_restarts_mid_transition() {
    const DOCS: usize = 1_600;
    let mut cluster = slow_cluster(DOCS).await;
    let cm = cluster.config_manager().await.unwrap();
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    let receiver = NodeId(1);
    mid_backfill(&cluster, receiver, 100).await;
    cluster.kill_config_manager().unwrap();
    let restarted = NodeId(3);
    cluster.kill(restarted).unwrap();
    cluster.restart(restarted).unwrap();
    let cluster_ref = &cluster;
    until(
        &format!("{restarted} to coordinate without the config manager"),
        TRANSITION,
        || async move {
            let s = cluster_ref.status(restarted).await.ok()?;
            (s.can_coordinate && s.next_epoch == Some(next.epoch.get())).then_some(())
        },
    )
    .await
    .unwrap();
    assert_seed_readable(&cluster, restarted, DOCS).await;
    until("the backfill to finish", TRANSITION, || async move {
        backfill(cluster_ref, receiver)
            .await?
            .backfilled
            .then_some(())
    })
    .await
    .unwrap();
    cluster.restart_config_manager().unwrap();
    installed(&cluster, next.epoch).await.unwrap();
    cluster.wait_stable(TRANSITION).await.unwrap();
    assert_seed_readable(&cluster, receiver, DOCS).await;
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
}

/// `abort` in the middle of a backfill: a receiver vetoes, next is dropped, the nodes return to
/// the current configuration and drop what they had taken in; the same shape proposed again
/// (under a new epoch) then installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transition_leaves_the_current_configuration() {
    const DOCS: usize = 1_600;
    let cluster = slow_cluster(DOCS).await;
    let cm = cluster.config_manager().await.unwrap();
    let before = cluster.current_config().await.unwrap();
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    let receiver = NodeId(1);
    mid_backfill(&cluster, receiver, 100).await;
    let pair = cm.abort_transition(Epoch::ZERO).await.unwrap();
    assert_eq!((pair.current_epoch(), pair.next), (before.epoch, None));
    let after = cluster.wait_stable(TRANSITION).await.unwrap();
    assert_eq!(after, before);
    assert_dropped(&cluster, &before, &after).await;
    for node in before.node_ids() {
        assert_seed_readable(&cluster, node, DOCS).await;
    }
    cluster.verify_replicas_agree(TRANSITION).await.unwrap();
    // Proposed again: a new epoch, which the veto of the aborted one does not touch.
    let again = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    assert!(again.epoch > next.epoch);
    installed(&cluster, again.epoch).await.unwrap();
    cluster.wait_stable(TRANSITION).await.unwrap();
    assert_seed_readable(&cluster, receiver, DOCS).await;
}

/// On an idle cluster (no write moves anything), a change feed's hold of the GC timestamp at a
/// ts does not hold back an install, and still holds the GC timestamp after it; a snapshot held
/// at a read timestamp (a reader's) holds the install back until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feeds_hold_lets_an_idle_transition_install_and_a_read_holds_it_back() {
    let cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    let last = seed(&cluster, 50).await;
    let nodes = cluster.node_ids();
    for &node in &nodes {
        cluster.wait_ust(node, last, TRANSITION).await.unwrap();
    }
    let request = |at: Option<u64>, owner: &str| pb::HoldSnapshotRequest {
        min_ts: last.get(),
        timeout_ms: 10_000,
        max_hold_ms: 600_000,
        at,
        owner: owner.to_owned(),
        linger_ms: 0,
    };
    let mut feed = cluster.client(nodes[0]).unwrap();
    let mut feed_hold = feed
        .hold_snapshot(request(Some(last.get()), "causeway-cdc/test"))
        .await
        .unwrap()
        .into_inner();
    feed_hold.message().await.unwrap().unwrap();
    let mut reader = cluster.client(nodes[1]).unwrap();
    let mut read_hold = reader
        .hold_snapshot(request(None, ""))
        .await
        .unwrap()
        .into_inner();
    read_hold.message().await.unwrap().unwrap();

    // 2×2 → 1×2: no spare node needed, and nothing written meanwhile.
    let cm = cluster.config_manager().await.unwrap();
    let before = cluster.current_config().await.unwrap();
    let next = cm.propose_shape(1, 2).await.unwrap().next.unwrap();
    until(
        "every node to route in the next epoch",
        TRANSITION,
        || async {
            for &node in &nodes {
                let s = cluster.status(node).await.ok()?;
                (s.routing_epoch == next.epoch.get()).then_some(())?;
            }
            Some(())
        },
    )
    .await
    .unwrap();
    // The read in the old epoch holds the install back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cluster.current_config().await.unwrap().epoch, before.epoch);
    drop(read_hold);
    drop(reader);
    installed(&cluster, next.epoch).await.unwrap();
    // The feed's hold still holds the GC timestamp on every node of the new configuration.
    for node in next.node_ids() {
        let s = cluster.status(node).await.unwrap();
        assert!(
            s.gc <= last.get(),
            "{node}: GC {} passed the feed's hold {last}",
            s.gc
        );
    }
    drop(feed_hold);
}
