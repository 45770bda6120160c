//! Property tests of the frontier algebra: UST, GC timestamp, routing switch and install.

use causeway_core::config::NodeInfo;
use causeway_core::frontier::{self, Eligibility};
use causeway_core::{
    ClusterConfig, Epoch, Frontiers, Gossip, GossipTable, NodeId, Phase, ReadTimestamp, Timestamp,
    View,
};
use proptest::prelude::*;

const TIMEOUT_MS: u64 = 100;

fn nodes(ids: std::ops::Range<u64>) -> Vec<NodeInfo> {
    ids.map(|i| NodeInfo {
        id: NodeId(i),
        addr: format!("127.0.0.1:{}", 7000 + i),
    })
    .collect()
}

fn gossip(node: u64, seq: u64, committed: u64, ust: u64, epoch: u64) -> Gossip {
    Gossip {
        node: NodeId(node),
        incarnation: 1,
        seq,
        committed: Timestamp(committed),
        current_epoch: Epoch(epoch),
        next_epoch: None,
        backfilled: true,
        routing_epoch: Epoch(epoch),
        ust: Timestamp(ust),
        lowest_read: None,
    }
}

fn view<'a>(
    node: u64,
    current: &'a ClusterConfig,
    next: Option<&'a ClusterConfig>,
    table: &'a GossipTable,
    now_ms: u64,
) -> View<'a> {
    View {
        node: NodeId(node),
        current,
        next,
        table,
        lowest_read: None,
        now_ms,
        liveness_timeout_ms: TIMEOUT_MS,
    }
}

fn eligible(table: &GossipTable, now_ms: u64) -> Eligibility<'_> {
    Eligibility {
        table,
        now_ms,
        liveness_timeout_ms: TIMEOUT_MS,
        backfilled_for: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Gossip arrives in any order, stale and duplicated: every view stays monotone (asserted
    /// inside `step`) and GC never passes the UST.
    #[test]
    fn views_are_monotone_under_any_delivery_order(
        // Per node, a rising committed ts, and the order in which the messages are delivered.
        steps in prop::collection::vec((1u64..5, 0u64..4, any::<bool>()), 8..40),
        order in prop::collection::vec(any::<prop::sample::Index>(), 40..120),
    ) {
        let config = ClusterConfig::bootstrap(2, 2, &nodes(1..5)).unwrap();
        // Each node's messages, in the order it sent them.
        let mut sent: Vec<Gossip> = Vec::new();
        let mut committed = [0u64; 5];
        let mut seq = [0u64; 5];
        for (node, advance, reading) in steps {
            let n = node as usize;
            committed[n] += advance;
            seq[n] += 1;
            let mut g = gossip(node, seq[n], committed[n], committed[n] / 2, 1);
            if reading {
                g.lowest_read = Some(ReadTimestamp::new(Epoch(1), Timestamp(committed[n] / 3)));
            }
            sent.push(g);
        }
        let mut table = GossipTable::new();
        let mut f = Frontiers::new();
        let mut last = f.clone();
        for (t, pick) in order.iter().enumerate() {
            let msg = pick.get(&sent).clone();
            table.observe(msg, t as u64);
            let d = f.step(&view(1, &config, None, &table, t as u64));
            prop_assert!(d.gc <= d.ust);
            prop_assert!(f.ust() >= last.ust() && f.gc() >= last.gc());
            last = f.clone();
        }
    }
}

#[test]
fn a_dead_replica_does_not_stall_the_ust_but_a_dead_partition_does() {
    let config = ClusterConfig::bootstrap(2, 2, &nodes(1..5)).unwrap();
    let mut table = GossipTable::new();
    for n in 1..5 {
        table.observe(gossip(n, 1, 10, 0, 1), 0);
    }
    assert_eq!(
        frontier::ust(&config, &eligible(&table, 0)),
        Some(Timestamp(10))
    );
    // Node 2 (partition 0) dies; node 1 keeps advancing, as do nodes 3 and 4.
    for t in 1..5u64 {
        let now = t * 60;
        for n in [1, 3, 4] {
            table.observe(gossip(n, 1 + t, 10 + t * 5, 0, 1), now);
        }
        let ust = frontier::ust(&config, &eligible(&table, now)).unwrap();
        assert_eq!(
            ust,
            Timestamp(10 + t * 5),
            "the UST follows the live replica"
        );
    }
    // Reads at the UST go to the live replica only.
    let now = 240;
    let readable =
        frontier::readable_replicas(&config, &eligible(&table, now), Timestamp(30)).unwrap();
    assert!(readable.values().all(|nodes| !nodes.contains(&NodeId(2))));
    // Node 1 dies too: partition 0 has no live replica and the UST cannot be computed; the
    // monotone view of a node holds where it was.
    let later = now + 2 * TIMEOUT_MS;
    for n in [3, 4] {
        table.observe(gossip(n, 100, 90, 0, 1), later);
    }
    assert_eq!(frontier::ust(&config, &eligible(&table, later)), None);
    let mut f = Frontiers::new();
    let before = f.step(&view(3, &config, None, &table, now)).ust;
    let after = f.step(&view(3, &config, None, &table, later)).ust;
    assert_eq!(
        after, before,
        "a partition with no live replica stalls the UST"
    );
    // Marking both failed is no way around it: the partition still has nobody.
    let failed = config
        .with_failed(NodeId(1))
        .unwrap()
        .with_failed(NodeId(2))
        .unwrap();
    assert_eq!(frontier::ust(&failed, &eligible(&table, later)), None);
}

#[test]
fn gc_is_the_lowest_hold_and_waits_for_every_node() {
    let config = ClusterConfig::bootstrap(1, 3, &nodes(1..4)).unwrap();
    let mut table = GossipTable::new();
    table.observe(gossip(2, 1, 50, 40, 1), 0);
    let mut f = Frontiers::new();
    let d = f.step(&view(1, &config, None, &table, 0));
    assert_eq!(d.gc, Timestamp::ZERO, "node 3 never heard from: GC holds");
    assert!(
        !d.can_coordinate,
        "a node that has not heard from everyone does not coordinate"
    );
    let mut g = gossip(3, 1, 50, 45, 1);
    g.lowest_read = Some(ReadTimestamp::new(Epoch(1), Timestamp(20)));
    table.observe(g, 1);
    let d = f.step(&view(1, &config, None, &table, 1));
    assert_eq!(d.gc, Timestamp(20), "a long read holds the GC timestamp");
    assert!(d.can_coordinate);
    assert!(
        d.ust >= Timestamp(45),
        "a node's view is at least its peers' views"
    );
    table.observe(gossip(3, 2, 60, 55, 1), 2);
    let d = f.step(&view(1, &config, None, &table, 2));
    assert_eq!(d.gc, Timestamp(40), "read done: the lowest UST view");
    assert!(d.gc <= d.ust);
}

/// A 1×2 → 2×2 transition driven step by step: routing switches only when the next UST reaches
/// the frozen current UST, and install waits for every node to route in the next epoch with no
/// old-epoch read left.
#[test]
fn transition_switches_and_installs_only_when_allowed() {
    let current = ClusterConfig::bootstrap(1, 2, &nodes(1..3)).unwrap();
    let next = current.next_for_shape(2, 2, &nodes(3..5)).unwrap();
    let mut table = GossipTable::new();
    let send = |table: &mut GossipTable,
                node: u64,
                seq: u64,
                committed: u64,
                backfilled: bool,
                routing: u64,
                read: Option<u64>| {
        let mut g = gossip(node, seq, committed, committed, 1);
        g.next_epoch = Some(Epoch(2));
        g.backfilled = backfilled;
        g.routing_epoch = Epoch(routing);
        g.lowest_read = read.map(|ts| ReadTimestamp::new(Epoch(1), Timestamp(ts)));
        table.observe(g, seq);
    };
    let mut f = Frontiers::new();
    // Old nodes at 100 gain nothing; new nodes started at the log end but have not backfilled.
    send(&mut table, 2, 1, 100, true, 1, None);
    send(&mut table, 3, 1, 70, false, 1, None);
    send(&mut table, 4, 1, 70, false, 1, None);
    let step =
        |f: &mut Frontiers, table: &GossipTable| f.step(&view(1, &current, Some(&next), table, 1));
    let d = step(&mut f, &table);
    assert_eq!(d.phase, Phase::Backfilling);
    assert_eq!(d.routing_epoch, Epoch(1));
    // Node 1 itself reports backfilled (it gains nothing) only through its own gossip.
    send(&mut table, 1, 2, 100, true, 1, None);
    // Nodes 3 and 4 are backfilled but behind: the next UST is below the current UST.
    send(&mut table, 3, 2, 80, true, 1, None);
    send(&mut table, 4, 2, 90, true, 1, None);
    send(&mut table, 2, 2, 120, true, 1, None);
    let d = step(&mut f, &table);
    assert_eq!(d.phase, Phase::Switching);
    let frozen = f.current_ust();
    assert_eq!(frozen, Timestamp(100));
    assert_eq!(f.next_ust(), Timestamp(90));
    assert_eq!(
        d.routing_epoch,
        Epoch(1),
        "no switch while next UST < current UST"
    );
    // The current UST is frozen now: new commits do not raise it.
    send(&mut table, 2, 3, 150, true, 1, None);
    step(&mut f, &table);
    assert_eq!(
        f.current_ust(),
        frozen,
        "current UST frozen once next is backfilled"
    );
    // Partition 1 of next catches up: the routing switch happens.
    send(&mut table, 3, 3, 200, true, 1, None);
    send(&mut table, 4, 3, 200, true, 1, None);
    send(&mut table, 1, 3, 200, true, 1, None);
    let d = step(&mut f, &table);
    assert!(f.next_ust() >= frozen);
    assert_eq!(d.routing_epoch, Epoch(2));
    assert_eq!(d.phase, Phase::Routed, "others still route in epoch 1");
    // Everyone routes in epoch 2, but node 3 still has a read of epoch 1: no install.
    for (n, read) in [(2, None), (3, Some(150)), (4, None)] {
        let mut g = gossip(n, 10, 200, 200, 1);
        g.next_epoch = Some(Epoch(2));
        g.routing_epoch = Epoch(2);
        g.lowest_read = read.map(|ts| ReadTimestamp::new(Epoch(1), Timestamp(ts)));
        table.observe(g, 10);
    }
    let d = step(&mut f, &table);
    assert_eq!(d.install, None, "an old-epoch read blocks install");
    // That read ends: install may be declared.
    let mut g = gossip(3, 11, 200, 200, 1);
    g.next_epoch = Some(Epoch(2));
    g.routing_epoch = Epoch(2);
    table.observe(g, 11);
    let d = step(&mut f, &table);
    assert_eq!(d.phase, Phase::Installable);
    assert_eq!(d.install, Some(Epoch(2)));
    // After install the next configuration is current; the views carry over.
    let ust = f.ust();
    let d = f.step(&view(1, &next, None, &table, 12));
    assert_eq!(d.phase, Phase::Stable);
    assert_eq!(d.routing_epoch, Epoch(2));
    assert!(d.ust >= ust);
}
