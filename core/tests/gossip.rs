//! What a node believes of its peers' gossip: never a node outside its configurations, never a
//! committed ts or UST beyond the log's end, and otherwise exactly what `observe` keeps.

use causeway_core::{Epoch, Gossip, GossipTable, Heard, NodeId, Timestamp};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;

fn gossip(node: u64, incarnation: u64, seq: u64, committed: u64, ust: u64) -> Gossip {
    Gossip {
        node: NodeId(node),
        incarnation,
        seq,
        committed: Timestamp(committed),
        current_epoch: Epoch(1),
        next_epoch: None,
        backfilled: true,
        routing_epoch: Epoch(1),
        ust: Timestamp(ust),
        lowest_read: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever arrives (strangers, claims beyond the log, stale and duplicate messages), the
    /// table holds members only, believes no committed ts or UST beyond the log's end, and a
    /// member's claim within the log is believed as `observe` would.
    #[test]
    fn the_table_believes_members_only_and_nothing_beyond_the_log(
        msgs in vec((0u64..8, 1u64..4, 0u64..12, 0u64..300, 0u64..300, 0u64..4), 0..80),
        members in btree_set(0u64..8, 0..8),
        log_end in 0u64..200,
    ) {
        let mut table = GossipTable::new();
        let mut believed = GossipTable::new();
        let is_member = |n: NodeId| members.contains(&n.0);
        for (now, &(node, inc, seq, committed, ust, _)) in msgs.iter().enumerate() {
            let msg = gossip(node, inc, seq, committed, ust);
            let heard = table.admit(msg.clone(), now as u64, is_member, Timestamp(log_end));
            if !members.contains(&node) {
                prop_assert_eq!(heard, Heard::Stranger);
                continue;
            }
            // The model: the same message with its committed ts cut to the log's end, and its
            // UST view, if beyond, replaced by the one held before.
            let mut model = msg.clone();
            model.committed = model.committed.min(Timestamp(log_end));
            if ust > log_end {
                model.ust = believed.get(NodeId(node)).map_or(Timestamp::ZERO, |g| g.ust);
            }
            let newer = believed.observe(model, now as u64);
            match heard {
                Heard::Taken => prop_assert!(newer && committed <= log_end && ust <= log_end),
                Heard::Doubted { claimed } => {
                    prop_assert!(newer && (committed > log_end || ust > log_end));
                    prop_assert_eq!(claimed, Timestamp(committed));
                }
                Heard::Stale => prop_assert!(!newer),
                Heard::Stranger => prop_assert!(false, "a member was taken for a stranger"),
            }
            prop_assert_eq!(&table, &believed);
        }
        for node in table.nodes() {
            prop_assert!(members.contains(&node.0));
            prop_assert!(table.committed(node).unwrap() <= Timestamp(log_end));
            prop_assert!(table.get(node).unwrap().ust <= Timestamp(log_end));
        }
    }

    /// `retain` forgets exactly the nodes that left.
    #[test]
    fn retain_forgets_exactly_the_nodes_that_left(
        heard in btree_set(0u64..16, 0..16),
        staying in btree_set(0u64..16, 0..16),
    ) {
        let mut table = GossipTable::new();
        for &n in &heard {
            table.observe(gossip(n, 1, 1, 5, 5), 0);
        }
        table.retain(|n| staying.contains(&n.0));
        let left: Vec<u64> = table.nodes().map(|n| n.0).collect();
        let expected: Vec<u64> = heard.intersection(&staying).copied().collect();
        prop_assert_eq!(left, expected);
    }
}

/// A forged message of a huge committed ts from a member (an attacker who holds the cluster
/// secret, or a buggy node) is believed no further than the log's end.
#[test]
fn a_forged_committed_beyond_the_log_is_believed_only_up_to_the_log_end() {
    let mut table = GossipTable::new();
    let members = |n: NodeId| n.0 == 1;
    assert_eq!(
        table.admit(gossip(1, 1, 1, 40, 30), 0, members, Timestamp(50)),
        Heard::Taken
    );
    assert_eq!(
        table.admit(
            gossip(1, 1, 2, u64::MAX, u64::MAX),
            1,
            members,
            Timestamp(50)
        ),
        Heard::Doubted {
            claimed: Timestamp(u64::MAX)
        }
    );
    assert_eq!(table.committed(NodeId(1)), Some(Timestamp(50)));
    assert_eq!(table.get(NodeId(1)).unwrap().ust, Timestamp(30));
    assert_eq!(
        table.heard_at_ms(NodeId(1)),
        Some(1),
        "the node is still heard"
    );
    assert_eq!(
        table.admit(gossip(9, 1, 1, 10, 10), 2, members, Timestamp(50)),
        Heard::Stranger
    );
    assert_eq!(table.get(NodeId(9)), None);
}
