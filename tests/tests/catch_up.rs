//! Catch-up under load on 2P × 2R over Kafka: a replica killed (kill -9) while transactions stream
//! in, then restarted, reaches the log's end within a bounded time while the load goes on, and the
//! other nodes stay near the log's end all along (sampled). Prints the catch-up rate as a multiple
//! of the write rate (BENCHMARKS.md records it): reaching the end in bounded time is what the test
//! asserts; the rate is what it reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_core::{NodeId, PartitionId};
use causeway_tests::{tx, until, ClusterSpec, LocalCluster};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The steady load: transactions per second, in appends of `PER_APPEND` every tick.
const RATE: u64 = 200;
const PER_APPEND: u64 = 2;
/// How long the victim stays down: the records it must catch up on are about `RATE` × this.
const DOWN: Duration = Duration::from_secs(8);
/// The bound on catching up after the restart (process start, RocksDB open, registration and
/// the backlog, while the load goes on).
const CATCH_UP_WITHIN: Duration = Duration::from_secs(45);
/// "At the log's end": within this many records of the newest acknowledged append (half a
/// second of load).
const AT_END: u64 = RATE / 2;
/// How far behind the log's end the other nodes may be seen at any sample: five seconds of load
/// (a loaded two-core machine stalls a process now and then; a node that stops keeping up falls
/// behind by far more).
const OTHERS_WITHIN: u64 = RATE * 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_load_catches_up_to_the_log_end() {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    let cm = cluster.config_manager().await.unwrap();
    let config = cm
        .get_config()
        .await
        .unwrap()
        .current
        .expect("bootstrapped");
    let victim = config.replicas_of(PartitionId(0))[1];
    let others: Vec<NodeId> = cluster
        .node_ids()
        .into_iter()
        .filter(|n| *n != victim)
        .collect();

    // The load: one appender, `PER_APPEND` replaces of 1,000 documents every tick.
    let head = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (head, stop, log) = (head.clone(), stop.clone(), cluster.log().clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * PER_APPEND / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut appended = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                let records = (0..PER_APPEND)
                    .map(|_| {
                        let id = format!("doc-{}", rng.random_range(0..1000));
                        let t = tx::replace(&[(
                            "load",
                            &id,
                            json!({"n": appended, "pad": "x".repeat(150)}),
                        )]);
                        appended += 1;
                        causeway_txlog::codec::encode(&t)
                    })
                    .collect();
                match log.append(records).await {
                    Ok(ts) => {
                        head.fetch_max(ts.last().unwrap().get(), Ordering::Relaxed);
                    }
                    // The tick bursts to make up for it.
                    Err(e) if e.is_transient() => {}
                    Err(e) => panic!("append under load: {e}"),
                }
            }
            appended
        })
    };
    let head_now = || head.load(Ordering::Relaxed);

    tokio::time::sleep(Duration::from_secs(3)).await;
    // The others' lag behind the log's end, sampled from the kill until the victim caught up.
    let watching = Arc::new(AtomicBool::new(true));
    let watch = {
        let (head, watching, others) = (head.clone(), watching.clone(), others.clone());
        let clients: Vec<_> = others
            .iter()
            .map(|n| (*n, cluster.client(*n).unwrap()))
            .collect();
        tokio::spawn(async move {
            let mut worst = (0u64, NodeId(0));
            while watching.load(Ordering::Relaxed) {
                for (node, client) in &clients {
                    let mut client = client.clone();
                    let status = client.status(causeway_proto::v1::StatusRequest {}).await;
                    if let Ok(s) = status {
                        let lag = head
                            .load(Ordering::Relaxed)
                            .saturating_sub(s.into_inner().committed);
                        if lag > worst.0 {
                            worst = (lag, *node);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            worst
        })
    };
    cluster.kill(victim).unwrap();
    let killed_at = head_now();
    tokio::time::sleep(DOWN).await;
    let behind = head_now() - killed_at;

    let restarted = Instant::now();
    cluster.restart(victim).unwrap();
    let caught_up = until(
        "the restarted replica to reach the log end",
        CATCH_UP_WITHIN,
        || async {
            let s = cluster.status(victim).await.ok()?;
            (s.committed + AT_END >= head_now()).then_some(s.committed)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: head {}\n{}", head_now(), cluster.logs()));
    let took = restarted.elapsed();

    // The others kept up all along.
    watching.store(false, Ordering::Relaxed);
    let (worst, worst_node) = watch.await.unwrap();
    assert!(
        worst <= OTHERS_WITHIN,
        "{worst_node} was seen {worst} records behind the log's end"
    );

    stop.store(true, Ordering::Relaxed);
    let appended = load.await.unwrap();
    let last = causeway_core::Timestamp(head_now());
    for node in cluster.node_ids() {
        cluster
            .wait_ust(node, last, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let applied = caught_up.saturating_sub(killed_at);
    let rate = applied as f64 / took.as_secs_f64();
    eprintln!(
        "catch-up: {victim} was {behind} records behind after {DOWN:?} down; it reached the log \
         end {took:.1?} after the restart (process start included), applying {applied} records: \
         {rate:.0} records/s = {:.1}× the write rate of {RATE}/s ({appended} transactions in all); \
         the other nodes were at most {worst} records behind",
        rate / RATE as f64
    );
}
