//! What nodes tell each other, and the table in which a node keeps the latest word of each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::NodeId;
use crate::time::{Epoch, ReadTimestamp, Timestamp};

/// One gossip message: a node's state as it stands when sent. DESIGN.md §7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gossip {
    pub node: NodeId,
    /// Rises on every restart of the node; orders messages across restarts.
    pub incarnation: u64,
    /// Rises with every message of one incarnation; orders messages within it.
    pub seq: u64,
    /// The highest ts the node has applied and made durable. Survives restarts.
    pub committed: Timestamp,
    /// The newest current configuration the node has seen.
    pub current_epoch: Epoch,
    /// The next configuration the node has seen, during a transition.
    pub next_epoch: Option<Epoch>,
    /// Whether the node holds every interval it owns in `next_epoch` (always true for a node that
    /// gains nothing).
    pub backfilled: bool,
    /// The epoch in which the node coordinates new reads.
    pub routing_epoch: Epoch,
    /// The node's UST view of its routing configuration.
    pub ust: Timestamp,
    /// The lowest read timestamp of any read active on the node (coordinated reads, backfill
    /// scans, CDC and export holds), if any.
    pub lowest_read: Option<ReadTimestamp>,
}

impl Gossip {
    /// The timestamp this node holds the GC timestamp at: its lowest active read, else its UST
    /// view.
    pub fn gc_hold(&self) -> Timestamp {
        self.lowest_read.map_or(self.ust, |r| r.ts.min(self.ust))
    }

    fn order(&self) -> (u64, u64) {
        (self.incarnation, self.seq)
    }
}

/// What [`GossipTable::admit`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Taken in: newer than what the table held.
    Taken,
    /// Taken in with its committed ts (claimed: `claimed`) cut to the log's end, or without its
    /// UST view, beyond it.
    Doubted { claimed: Timestamp },
    /// Not newer than what the table holds: nothing changed.
    Stale,
    /// From a node in no configuration: ignored.
    Stranger,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    latest: Gossip,
    /// The highest committed ts ever heard from the node: committed ts never goes backwards, so
    /// this is safe to keep even if a message reports less.
    committed: Timestamp,
    heard_at_ms: u64,
}

/// The latest gossip from every node, with the local time it arrived.
///
/// Messages may arrive late, twice, or out of order: only a message newer than the one held (by
/// incarnation, then sequence number) replaces it. Time is passed in; nothing here reads a clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipTable {
    entries: BTreeMap<NodeId, Entry>,
}

impl GossipTable {
    pub fn new() -> GossipTable {
        GossipTable::default()
    }

    /// Takes in a message received at `now_ms`. Returns whether it was newer than what the table
    /// held; a stale or duplicate message changes nothing.
    pub fn observe(&mut self, msg: Gossip, now_ms: u64) -> bool {
        match self.entries.get_mut(&msg.node) {
            Some(entry) if msg.order() <= entry.latest.order() => false,
            Some(entry) => {
                entry.committed = entry.committed.max(msg.committed);
                entry.heard_at_ms = entry.heard_at_ms.max(now_ms);
                entry.latest = msg;
                true
            }
            None => {
                let entry = Entry {
                    committed: msg.committed,
                    heard_at_ms: now_ms,
                    latest: msg,
                };
                self.entries.insert(entry.latest.node, entry);
                true
            }
        }
    }

    /// Takes in a message from a peer, as [`GossipTable::observe`] does, but only what the
    /// peer can be believed on. A message from a node that `is_member` denies (in no
    /// configuration this node knows: a forgery, or a node that left) is ignored and never
    /// enters the table. A committed ts beyond `log_end`, the newest ts the log holds as far as
    /// this node knows, is believed only up to `log_end`, and a UST view beyond it not at all
    /// (the view held before stays); the rest of the message (liveness, epochs, reads) is
    /// taken. No node can have committed what the log does
    /// not hold, and a UST computed from such a claim would serve reads at timestamps the log
    /// has not reached. An honest peer ahead of this node's view loses nothing that matters:
    /// this node's own committed ts, and so any UST it computes, is within its view anyway. A
    /// claim within the log cannot be checked here (mutual TLS makes only the node itself able
    /// to make it).
    pub fn admit(
        &mut self,
        mut msg: Gossip,
        now_ms: u64,
        is_member: impl Fn(NodeId) -> bool,
        log_end: Timestamp,
    ) -> Heard {
        if !is_member(msg.node) {
            return Heard::Stranger;
        }
        let claimed = msg.committed;
        let doubted = msg.committed > log_end || msg.ust > log_end;
        msg.committed = msg.committed.min(log_end);
        if msg.ust > log_end {
            // A UST view is no claim about the sender itself: one beyond the log is not taken
            // at all, the view held before stays.
            msg.ust = self
                .entries
                .get(&msg.node)
                .map_or(Timestamp::ZERO, |e| e.latest.ust);
        }
        match (self.observe(msg, now_ms), doubted) {
            (false, _) => Heard::Stale,
            (true, false) => Heard::Taken,
            (true, true) => Heard::Doubted { claimed },
        }
    }

    /// Forgets every node that `is_member` denies (nodes that left every configuration).
    pub fn retain(&mut self, is_member: impl Fn(NodeId) -> bool) {
        self.entries.retain(|&node, _| is_member(node));
    }

    /// The latest message from `node`, if any was heard.
    pub fn get(&self, node: NodeId) -> Option<&Gossip> {
        self.entries.get(&node).map(|e| &e.latest)
    }

    /// The highest committed ts heard from `node`.
    pub fn committed(&self, node: NodeId) -> Option<Timestamp> {
        self.entries.get(&node).map(|e| e.committed)
    }

    /// When the latest message from `node` arrived (local millis).
    pub fn heard_at_ms(&self, node: NodeId) -> Option<u64> {
        self.entries.get(&node).map(|e| e.heard_at_ms)
    }

    /// Whether `node` was heard from within `timeout_ms` before `now_ms`.
    pub fn is_alive(&self, node: NodeId, now_ms: u64, timeout_ms: u64) -> bool {
        self.heard_at_ms(node)
            .is_some_and(|at| now_ms.saturating_sub(at) <= timeout_ms)
    }

    /// Forgets a node (one that left every configuration this node knows).
    pub fn forget(&mut self, node: NodeId) {
        self.entries.remove(&node);
    }

    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.entries.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(node: u64, inc: u64, seq: u64, committed: u64) -> Gossip {
        Gossip {
            node: NodeId(node),
            incarnation: inc,
            seq,
            committed: Timestamp(committed),
            current_epoch: Epoch(1),
            next_epoch: None,
            backfilled: true,
            routing_epoch: Epoch(1),
            ust: Timestamp(0),
            lowest_read: None,
        }
    }

    #[test]
    fn stale_and_duplicate_messages_change_nothing() {
        let mut t = GossipTable::new();
        assert!(t.observe(msg(1, 1, 5, 50), 10));
        assert!(!t.observe(msg(1, 1, 5, 50), 11), "duplicate");
        assert!(!t.observe(msg(1, 1, 4, 40), 12), "older seq");
        assert!(!t.observe(msg(1, 0, 9, 90), 13), "older incarnation");
        assert_eq!(t.get(NodeId(1)).unwrap().seq, 5);
        assert!(
            t.observe(msg(1, 2, 0, 50), 14),
            "a restart starts its seq again"
        );
        assert_eq!(t.committed(NodeId(1)), Some(Timestamp(50)));
        assert!(t.is_alive(NodeId(1), 100, 86));
        assert!(!t.is_alive(NodeId(1), 101, 86));
        assert!(!t.is_alive(NodeId(2), 0, 1000));
    }
}
