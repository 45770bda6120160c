//! The frontier algebra of DESIGN.md §7 and the transition of §10, as pure code.
//!
//! A store node keeps one [`Frontiers`] and calls [`Frontiers::step`] with its configurations and
//! its gossip table whenever either changes. Out come the decisions: its UST view and routing
//! epoch (where new reads run), its GC timestamp (what it may prune), the transition phase, and
//! whether it may declare the next configuration installed. Every view here only moves forward.
//!
//! In Materialize's words the retained window of versions is `[gc, ust]`: the GC timestamp is
//! the "since" frontier, the UST the "upper".

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::gossip::GossipTable;
use crate::node::{NodeId, PartitionId};
use crate::time::{Epoch, ReadTimestamp, Timestamp};

/// Which replicas count for a configuration's UST and reads.
#[derive(Debug, Clone, Copy)]
pub struct Eligibility<'a> {
    pub table: &'a GossipTable,
    pub now_ms: u64,
    /// A node not heard from for longer is taken as dead.
    pub liveness_timeout_ms: u64,
    /// For a next configuration, replicas count only once they report backfilled for it.
    pub backfilled_for: Option<Epoch>,
}

impl Eligibility<'_> {
    /// A replica counts when it is not marked failed, is alive, and (for a next configuration)
    /// has backfilled.
    pub fn counts(&self, config: &ClusterConfig, node: NodeId) -> bool {
        if config.failed.contains(&node)
            || !self
                .table
                .is_alive(node, self.now_ms, self.liveness_timeout_ms)
        {
            return false;
        }
        match self.backfilled_for {
            None => true,
            Some(epoch) => self
                .table
                .get(node)
                .is_some_and(|g| g.next_epoch == Some(epoch) && g.backfilled),
        }
    }

    fn committed(&self, config: &ClusterConfig, node: NodeId) -> Option<Timestamp> {
        self.counts(config, node)
            .then(|| self.table.committed(node))
            .flatten()
    }
}

/// The UST of `config`: the minimum over partitions of the highest committed ts among the
/// partition's counting replicas. One lagging or dead replica does not hold it back while another
/// replica of its partition is current; a partition with no counting replica gives `None`.
pub fn ust(config: &ClusterConfig, who: &Eligibility<'_>) -> Option<Timestamp> {
    config
        .slicing
        .partitions()
        .map(|p| {
            config
                .replicas_of(p)
                .iter()
                .filter_map(|&n| who.committed(config, n))
                .max()
        })
        .try_fold(Timestamp::MAX, |low, best| best.map(|b| low.min(b)))
}

/// For each partition of `config`, the counting replicas that have committed `ts`, in replica
/// order: the nodes a read at `ts` may ask. `Err(p)` names a partition with none.
pub fn readable_replicas(
    config: &ClusterConfig,
    who: &Eligibility<'_>,
    ts: Timestamp,
) -> Result<BTreeMap<PartitionId, Vec<NodeId>>, PartitionId> {
    config
        .slicing
        .partitions()
        .map(|p| {
            let nodes: Vec<NodeId> = config
                .replicas_of(p)
                .iter()
                .filter(|&&n| who.committed(config, n).is_some_and(|c| c >= ts))
                .copied()
                .collect();
            if nodes.is_empty() {
                Err(p)
            } else {
                Ok((p, nodes))
            }
        })
        .collect()
}

/// The GC timestamp over `nodes`: the minimum of each node's hold (lowest active read, else its
/// UST view). `None` while any of them has never been heard from: nothing may be pruned on the
/// word of a partial table.
pub fn gc_timestamp(
    nodes: &BTreeSet<NodeId>,
    table: &GossipTable,
    own: (NodeId, Timestamp),
) -> Option<Timestamp> {
    nodes
        .iter()
        .map(|&n| {
            if n == own.0 {
                Some(own.1)
            } else {
                table.get(n).map(|g| g.gc_hold())
            }
        })
        .try_fold(Timestamp::MAX, |low, hold| hold.map(|h| low.min(h)))
}

/// Where a transition stands, as seen by one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No next configuration.
    Stable,
    /// A next configuration exists; some of its nodes have not backfilled yet.
    Backfilling,
    /// Every node of next has backfilled: the current UST is frozen, this node waits for the next
    /// UST to reach it.
    Switching,
    /// This node coordinates new reads in the next epoch; waiting for every other node to do the
    /// same and for old-epoch reads to finish.
    Routed,
    /// Every node routes in the next epoch and no read of the old epoch is active: the next
    /// configuration may be installed.
    Installable,
}

/// What a node should do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    pub phase: Phase,
    /// New reads run at `(routing_epoch, ust)` or later.
    pub routing_epoch: Epoch,
    pub ust: Timestamp,
    /// Versions that no read at or above this ts can see may be pruned.
    pub gc: Timestamp,
    /// Whether this node may coordinate reads now: it is a node of the routing configuration and
    /// has heard from every node it must (so its views include everyone's).
    pub can_coordinate: bool,
    /// `Some(next epoch)` when this node may declare the transition complete.
    pub install: Option<Epoch>,
}

/// The inputs of one step.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub node: NodeId,
    pub current: &'a ClusterConfig,
    pub next: Option<&'a ClusterConfig>,
    /// The latest gossip of every peer (this node's own entry is ignored: its live state is below).
    pub table: &'a GossipTable,
    /// This node's lowest active read, if any.
    pub lowest_read: Option<ReadTimestamp>,
    pub now_ms: u64,
    pub liveness_timeout_ms: u64,
}

/// One node's monotone views: the UST of the current and of the next configuration, the GC
/// timestamp, and the routing epoch. Volatile: a restarted node starts a new one, and cannot
/// coordinate reads until it has heard from every node (so its views start at least as high as
/// any peer's, which keeps the GC timestamp below every read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frontiers {
    current_epoch: Epoch,
    /// The epoch of the next configuration the views below are about.
    next_epoch: Option<Epoch>,
    current_ust: Timestamp,
    next_ust: Timestamp,
    gc: Timestamp,
    routing_epoch: Epoch,
    /// Set once every node of next has backfilled: the current UST stops rising so the next UST
    /// can catch up with it (DESIGN.md §10 step 4).
    current_frozen: bool,
    /// The highest UST this node has read at or could have: its view, which never goes back.
    /// After an install this node did not route through (it restarted, or missed the switch),
    /// the UST computed for the new configuration can start below it; the node then does not
    /// coordinate reads until that UST reaches the floor, so its reads never go back in time.
    floor: Timestamp,
}

impl Frontiers {
    pub fn new() -> Frontiers {
        Frontiers::default()
    }

    /// The UST of the routing configuration as this node computes it: what it gossips and where
    /// its reads run.
    pub fn ust(&self) -> Timestamp {
        if self.routing_epoch > self.current_epoch {
            self.next_ust
        } else {
            self.current_ust
        }
    }

    pub fn gc(&self) -> Timestamp {
        self.gc
    }

    /// The node's monotone UST view (see the `floor` field).
    pub fn floor(&self) -> Timestamp {
        self.floor
    }

    pub fn routing_epoch(&self) -> Epoch {
        self.routing_epoch
    }

    pub fn current_ust(&self) -> Timestamp {
        self.current_ust
    }

    pub fn next_ust(&self) -> Timestamp {
        self.next_ust
    }

    /// Takes in the configurations and gossip as they are now and moves the views forward.
    pub fn step(&mut self, view: &View<'_>) -> Decisions {
        let before = self.clone();
        let current = view.current;
        let next = view.next.filter(|n| n.epoch > current.epoch);
        if current.epoch > self.current_epoch {
            self.install(current.epoch);
        }
        if next.map(|n| n.epoch) != self.next_epoch {
            // A new transition, or the last one was aborted: nothing of the old next view
            // carries over. Abort is only possible before any node can switch (a node of next
            // vetoes its own backfill), so this node never routed in an abandoned epoch.
            assert!(
                self.routing_epoch <= self.current_epoch,
                "routing epoch {} was abandoned (current {})",
                self.routing_epoch,
                self.current_epoch
            );
            self.next_epoch = next.map(|n| n.epoch);
            self.next_ust = Timestamp::ZERO;
            self.current_frozen = false;
        }
        let eligible = |backfilled_for| Eligibility {
            table: view.table,
            now_ms: view.now_ms,
            liveness_timeout_ms: view.liveness_timeout_ms,
            backfilled_for,
        };
        // The highest UST view any peer routing in `epoch` reports: a view is a valid UST of
        // that configuration, so taking it keeps every node at least as high as its peers.
        let peer_view = |config: &ClusterConfig| {
            config
                .nodes
                .keys()
                .filter(|&&n| n != view.node)
                .filter_map(|&n| view.table.get(n))
                .filter(|g| g.routing_epoch == config.epoch)
                .map(|g| g.ust)
                .max()
                .unwrap_or_default()
        };

        let all_backfilled = next.is_some_and(|next| {
            next.live_node_ids().iter().all(|&n| {
                view.table
                    .get(n)
                    .is_some_and(|g| g.next_epoch == Some(next.epoch) && g.backfilled)
            })
        });
        if all_backfilled {
            self.current_frozen = true;
        }
        if !self.current_frozen {
            let computed = ust(current, &eligible(None)).unwrap_or_default();
            self.current_ust = self.current_ust.max(computed).max(peer_view(current));
        }

        let mut phase = Phase::Stable;
        let mut install = None;
        if let Some(next) = next {
            phase = Phase::Backfilling;
            if all_backfilled {
                phase = Phase::Switching;
                let computed = ust(next, &eligible(Some(next.epoch))).unwrap_or_default();
                self.next_ust = self.next_ust.max(computed).max(peer_view(next));
                if self.next_ust >= self.current_ust {
                    self.routing_epoch = self.routing_epoch.max(next.epoch);
                }
            }
            if self.routing_epoch == next.epoch {
                phase = Phase::Routed;
                let everyone: BTreeSet<NodeId> = current
                    .live_node_ids()
                    .union(&next.live_node_ids())
                    .copied()
                    .collect();
                let old_reads_done = view.lowest_read.is_none_or(|r| r.epoch >= next.epoch);
                let all_routed = everyone.iter().filter(|&&n| n != view.node).all(|&n| {
                    view.table.get(n).is_some_and(|g| {
                        g.routing_epoch >= next.epoch
                            && g.lowest_read.is_none_or(|r| r.epoch >= next.epoch)
                    })
                });
                if old_reads_done && all_routed {
                    phase = Phase::Installable;
                    install = Some(next.epoch);
                }
            }
        }

        let mut nodes = current.live_node_ids();
        if let Some(next) = next {
            nodes.extend(next.live_node_ids());
        }
        let own_hold = view
            .lowest_read
            .map_or(self.ust(), |r| r.ts.min(self.ust()));
        if let Some(gc) = gc_timestamp(&nodes, view.table, (view.node, own_hold)) {
            self.gc = self.gc.max(gc);
        }
        let heard_all = nodes
            .iter()
            .all(|&n| n == view.node || view.table.get(n).is_some());
        let routing_config = match next {
            Some(next) if self.routing_epoch == next.epoch => next,
            _ => current,
        };
        let caught_up = self.ust() >= self.floor;
        self.floor = self.floor.max(self.ust());
        self.check_monotone(&before);
        Decisions {
            phase,
            routing_epoch: self.routing_epoch,
            ust: self.ust(),
            gc: self.gc,
            can_coordinate: heard_all && routing_config.contains(view.node) && caught_up,
            install,
        }
    }

    /// `epoch` became current: the next UST view becomes the current one.
    fn install(&mut self, epoch: Epoch) {
        // The next UST is a UST of the new configuration (it is at least the frozen current UST
        // if this node routed in it; else the floor keeps reads from going back in time).
        self.current_ust = self.next_ust;
        self.current_epoch = epoch;
        self.next_ust = Timestamp::ZERO;
        self.next_epoch = None;
        self.current_frozen = false;
        self.routing_epoch = self.routing_epoch.max(epoch);
    }

    /// Frontiers only move forward; the GC timestamp never passes the UST.
    fn check_monotone(&self, before: &Frontiers) {
        assert!(
            self.routing_epoch >= before.routing_epoch,
            "routing epoch went back"
        );
        assert!(
            self.floor >= before.floor,
            "UST view went back: {before:?} -> {self:?}"
        );
        assert!(
            (self.routing_epoch, self.ust()) >= (before.routing_epoch, before.ust()),
            "routing UST went back: {before:?} -> {self:?}"
        );
        if self.current_epoch == before.current_epoch {
            assert!(
                self.current_ust >= before.current_ust,
                "current UST went back"
            );
            if self.next_epoch == before.next_epoch {
                assert!(self.next_ust >= before.next_ust, "next UST went back");
            }
        }
        assert!(self.gc >= before.gc, "GC timestamp went back");
        assert!(
            self.gc <= self.floor,
            "GC timestamp {} passed the UST view {}",
            self.gc,
            self.floor
        );
    }
}
