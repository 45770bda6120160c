//! The node's shared state: configurations, the gossip table and frontiers, active reads.
//!
//! Every protocol decision is made by `causeway_core::Frontiers` from this state; this module
//! only keeps it and hands it out under short locks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use causeway_core::frontier::Eligibility;
use causeway_core::{
    ClusterConfig, Decisions, Epoch, Frontiers, Gossip, GossipTable, Heard, Interval, NodeId,
    Phase, ReadTimestamp, Timestamp, View,
};
use tokio::sync::watch;

use crate::backfill::Plan;
use crate::metrics::Metrics;
use crate::options::Tuning;
use crate::storage::{Ownership, Store};

/// The (current, next) pair of configurations as this node knows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Configs {
    pub revision: u64,
    pub current: Option<Arc<ClusterConfig>>,
    pub next: Option<Arc<ClusterConfig>>,
}

impl Configs {
    /// The next configuration, if it follows the current one.
    pub fn transition(&self) -> Option<&Arc<ClusterConfig>> {
        let current = self.current.as_ref()?;
        self.next.as_ref().filter(|n| n.epoch > current.epoch)
    }

    /// The configuration of `epoch`, if known.
    pub fn at(&self, epoch: Epoch) -> Option<&Arc<ClusterConfig>> {
        [&self.current, &self.next]
            .into_iter()
            .flatten()
            .find(|c| c.epoch == epoch)
    }

    /// Whether `node` is in the current or next configuration.
    pub fn member(&self, node: NodeId) -> bool {
        [&self.current, &self.next]
            .into_iter()
            .flatten()
            .any(|c| c.contains(node))
    }

    /// Saves the pair (and the current configuration in the history), to serve from after a
    /// restart while the config manager is down.
    pub fn save(&self, store: &Store) -> Result<(), crate::storage::Error> {
        if let Some(c) = &self.current {
            store.put_config(
                c.epoch,
                &serde_json::to_vec(&**c).expect("config serializes"),
            )?;
        }
        let saved = SavedConfigs {
            revision: self.revision,
            current: self.current.as_deref().cloned(),
            next: self.next.as_deref().cloned(),
        };
        let bytes = serde_json::to_vec(&saved).expect("configurations serialize");
        store.put_meta(SAVED_CONFIGS, Some(&bytes))
    }

    /// The pair last saved, if any.
    pub fn saved(store: &Store) -> Result<Option<Configs>, String> {
        let Some(bytes) = store.meta(SAVED_CONFIGS).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let saved: SavedConfigs = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the saved configurations do not parse: {e}"))?;
        Ok(Some(Configs {
            revision: saved.revision,
            current: saved.current.map(Arc::new),
            next: saved.next.map(Arc::new),
        }))
    }
}

/// The meta record of the last (current, next) pair seen.
const SAVED_CONFIGS: &str = "configs";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedConfigs {
    revision: u64,
    current: Option<ClusterConfig>,
    next: Option<ClusterConfig>,
}

/// Reads running on this node and holds of the GC timestamp: what the node's gossip says of
/// them holds back an install (a read runs in its epoch) and the GC timestamp (every read and
/// hold needs its ts).
#[derive(Debug, Default)]
pub struct ActiveReads {
    next_id: AtomicU64,
    reads: Mutex<BTreeMap<u64, Active>>,
    /// Query cursors' holds: a client pages at its own pace, so between its pages nothing runs
    /// that would hold the cursor's read timestamp. Locked before `reads` when both are.
    leases: Mutex<Leases>,
}

/// Holds of the GC timestamp that end at a deadline unless renewed, one per read timestamp
/// (the cursors of one timestamp share it).
#[derive(Debug, Default)]
struct Leases {
    /// Per ts: the deadline, the latest deadline renewals may give (the lease's age bound), and
    /// the hold.
    by_ts: BTreeMap<Timestamp, (Instant, Instant, ReadGuard)>,
    /// The same leases by deadline, to end the expired ones without looking at the others.
    by_deadline: BTreeSet<(Instant, Timestamp)>,
}

#[derive(Debug, Clone, Copy)]
enum Active {
    /// A read at its read timestamp: its epoch's owners must keep serving it.
    Read(ReadTimestamp),
    /// Versions at and after this ts are kept (a change feed's checkpoint). Not a read: whoever
    /// reads them later does it in the routing epoch of then, from owners that backfilled the
    /// history above the GC timestamp, so it follows the routing epoch.
    GcHold(Timestamp),
}

impl ActiveReads {
    /// Registers a read; it holds the GC timestamp and its epoch until the guard drops.
    pub fn register(self: &Arc<Self>, at: ReadTimestamp) -> ReadGuard {
        self.insert(Active::Read(at))
    }

    /// Registers a hold of the GC timestamp at `ts` until the guard drops.
    pub fn register_gc_hold(self: &Arc<Self>, ts: Timestamp) -> ReadGuard {
        self.insert(Active::GcHold(ts))
    }

    fn insert(self: &Arc<Self>, active: Active) -> ReadGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.reads).insert(id, active);
        ReadGuard {
            reads: Arc::clone(self),
            id,
        }
    }

    /// What the gossip says: the lowest epoch a read runs in (a hold counts as `routing`) and
    /// the lowest ts a read or hold needs. The two may come from different reads: one read in
    /// an old epoch at a high ts and a hold at a low ts must hold back both the install and the
    /// GC timestamp.
    pub fn lowest(&self, routing: Epoch) -> Option<ReadTimestamp> {
        lock(&self.reads)
            .values()
            .map(|active| match *active {
                Active::Read(at) => at,
                Active::GcHold(ts) => ReadTimestamp::new(routing, ts),
            })
            .reduce(|a, b| ReadTimestamp::new(a.epoch.min(b.epoch), a.ts.min(b.ts)))
    }

    pub fn count(&self) -> usize {
        lock(&self.reads).len()
    }

    /// Holds the GC timestamp at `ts` until `until` (a hold of the GC timestamp, not a read: it
    /// does not hold back an install). A lease at `ts` already held is renewed, never shortened,
    /// and never past `oldest` after it was first taken: whoever replays a cursor cannot hold
    /// a timestamp for ever. False, and nothing held, when `max` leases are held already.
    pub fn lease(
        self: &Arc<Self>,
        ts: Timestamp,
        until: Instant,
        oldest: std::time::Duration,
        max: usize,
    ) -> bool {
        let mut leases = lock(&self.leases);
        let Leases { by_ts, by_deadline } = &mut *leases;
        if let Some((deadline, last, _)) = by_ts.get_mut(&ts) {
            let until = until.min(*last);
            if until > *deadline {
                by_deadline.remove(&(*deadline, ts));
                by_deadline.insert((until, ts));
                *deadline = until;
            }
            return true;
        }
        if by_ts.len() >= max {
            return false;
        }
        let last = Instant::now() + oldest;
        by_ts.insert(ts, (until.min(last), last, self.register_gc_hold(ts)));
        by_deadline.insert((until.min(last), ts));
        true
    }

    /// Ends the leases whose deadline is at or before `now`; returns how many ended.
    pub fn expire_leases(&self, now: Instant) -> usize {
        let ended: Vec<ReadGuard> = {
            let mut leases = lock(&self.leases);
            let Leases { by_ts, by_deadline } = &mut *leases;
            let mut ended = Vec::new();
            while let Some(&(deadline, ts)) = by_deadline.first() {
                if deadline > now {
                    break;
                }
                by_deadline.pop_first();
                ended.extend(by_ts.remove(&ts).map(|(_, _, guard)| guard));
            }
            ended
        };
        // Dropped outside the leases lock: each guard takes the reads lock.
        ended.len()
    }

    /// How many cursor leases are held.
    pub fn leases(&self) -> usize {
        lock(&self.leases).by_ts.len()
    }
}

/// Ends a read when dropped.
#[derive(Debug)]
pub struct ReadGuard {
    reads: Arc<ActiveReads>,
    id: u64,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        lock(&self.reads.reads).remove(&self.id);
    }
}

/// The gossip table and the frontiers, stepped together under one lock.
#[derive(Debug, Default)]
pub struct Protocol {
    pub table: GossipTable,
    pub frontiers: Frontiers,
    pub seq: u64,
}

/// What the node last decided, for waiters and status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decided {
    pub decisions: Decisions,
    pub current_epoch: Epoch,
    pub next_epoch: Option<Epoch>,
}

impl Default for Decided {
    fn default() -> Self {
        Decided {
            decisions: Decisions {
                phase: Phase::Stable,
                routing_epoch: Epoch::ZERO,
                ust: Timestamp::ZERO,
                gc: Timestamp::ZERO,
                can_coordinate: false,
                install: None,
            },
            current_epoch: Epoch::ZERO,
            next_epoch: None,
        }
    }
}

/// State shared by the node's tasks and its gRPC server.
#[derive(Debug)]
pub struct Shared {
    pub node: NodeId,
    pub addr: String,
    pub tuning: Tuning,
    pub store: Arc<Store>,
    pub started: Instant,
    pub incarnation: AtomicU64,
    pub configs: watch::Sender<Configs>,
    pub protocol: Mutex<Protocol>,
    pub decided: watch::Sender<Decided>,
    pub reads: Arc<ActiveReads>,
    /// Named holds (change feeds) and those that outlive their stream.
    pub holds: Arc<crate::hold::Owners>,
    /// `HoldSnapshot` streams open per caller.
    pub hold_callers: Arc<crate::hold::PerCaller>,
    /// The log's next ts as last seen by the apply loop and the log-end task (for lag, and to
    /// doubt gossip of a committed ts beyond it).
    pub log_next: AtomicU64,
    pub metrics: Metrics,
    /// This node's plan for the next configuration (see `backfill`), as last saved.
    pub plan: Mutex<Option<Plan>>,
    /// Held by whoever changes the plan, across its save.
    pub plan_writer: tokio::sync::Mutex<()>,
    /// Held by the apply loop for each group, and by backfill while it hands an interval over
    /// from pending to owned: ownership never changes under an applying group.
    pub apply_gate: tokio::sync::Mutex<()>,
    /// The reads that hold the GC timestamp at the snapshots being backfilled.
    pub backfill_holds: Mutex<Vec<(Interval, ReadGuard)>>,
    /// The node is in neither configuration and has dropped its data.
    pub drained: AtomicBool,
    /// Outgoing backfill streams at most (`Tuning::backfill_max_streams`).
    pub backfill_streams: Arc<tokio::sync::Semaphore>,
    /// Where apply is, and the transaction it waits at for votes (`votes`).
    pub votes: watch::Sender<crate::votes::VoteState>,
    /// A group was made durable (the committed ts rose): the gossip loop steps and sends at
    /// once rather than at its next tick, so the UST follows the commit without waiting out an
    /// interval.
    pub committed_moved: tokio::sync::Notify,
    /// The apply loop wrote a group it did not fsync (`store.sync_writes` off): the sync loop
    /// makes it durable.
    pub applied_moved: tokio::sync::Notify,
    /// A peer's gossip arrived: the gossip loop steps (without sending), so this node's UST view
    /// takes it in at once.
    pub peers_moved: tokio::sync::Notify,
    /// How this node reaches its peers and the config manager, and checks its callers.
    pub link: causeway_proto::link::Link,
    /// A peer's gossip claimed a committed ts beyond the log's end as this node last saw it:
    /// the log-end task looks again (`log_next`).
    pub log_end_wanted: tokio::sync::Notify,
}

impl Shared {
    /// Milliseconds since the node started, from a monotonic clock: the time the core's
    /// liveness rules see.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn configs(&self) -> Configs {
        self.configs.borrow().clone()
    }

    pub fn decided(&self) -> Decided {
        *self.decided.borrow()
    }

    /// Builds this node's gossip, takes it into its own table, steps the frontiers and publishes
    /// the decisions. Returns the message to send to peers.
    pub fn step(&self) -> Option<(Gossip, Decided)> {
        let configs = self.configs();
        let current = configs.current.as_ref()?;
        let next = configs.transition();
        let now_ms = self.now_ms();
        self.reads.expire_leases(Instant::now());
        let mut p = lock(&self.protocol);
        // Nodes that left both configurations are forgotten.
        p.table
            .retain(|n| current.contains(n) || next.is_some_and(|c| c.contains(n)));
        let lowest_read = self.reads.lowest(p.frontiers.routing_epoch());
        p.seq += 1;
        let next_epoch = next.map(|n| n.epoch);
        let backfilled = next_epoch.is_some_and(|epoch| {
            lock(&self.plan)
                .as_ref()
                .is_some_and(|p| p.epoch == epoch && p.backfilled())
        });
        let gossip = Gossip {
            node: self.node,
            incarnation: self.incarnation.load(Ordering::Relaxed),
            seq: p.seq,
            committed: self.store.committed(),
            current_epoch: current.epoch,
            next_epoch,
            backfilled,
            routing_epoch: p.frontiers.routing_epoch(),
            ust: p.frontiers.ust(),
            lowest_read,
        };
        p.table.observe(gossip.clone(), now_ms);
        let Protocol {
            table, frontiers, ..
        } = &mut *p;
        let decisions = frontiers.step(&View {
            node: self.node,
            current,
            next: next.map(|n| &**n),
            table,
            lowest_read,
            now_ms,
            liveness_timeout_ms: self.tuning.liveness_timeout_ms,
        });
        drop(p);
        let decided = Decided {
            decisions,
            current_epoch: current.epoch,
            next_epoch,
        };
        self.decided.send_replace(decided);
        Some((gossip, decided))
    }

    /// What this node stores now: its current intervals and the gained ones it has backfilled
    /// outright, the gained ones still backfilling as pending. Call under `apply_gate`.
    pub fn ownership(&self) -> Ownership {
        let configs = self.configs();
        let Some(current) = &configs.current else {
            return Ownership::default();
        };
        let owned = current.owned_intervals(self.node);
        match (&*lock(&self.plan), configs.transition()) {
            (Some(plan), Some(next)) if plan.epoch == next.epoch => plan.ownership(owned),
            _ => Ownership::owned(owned),
        }
    }

    /// Takes in a peer's gossip, believing only what the core's `GossipTable::admit` allows: a
    /// node in neither configuration (or this node itself) is ignored, and a committed ts or UST beyond the newest ts
    /// this node knows the log holds is not believed (this node then looks at the log's end
    /// again, so that a peer ahead of it is believed soon).
    pub fn observe(&self, gossip: Gossip) -> Heard {
        // This node's own entry is its own word only: gossip in its name comes from someone
        // else (a forgery under the cluster secret would make the node think itself dead).
        if gossip.node == self.node {
            return Heard::Stranger;
        }
        let now_ms = self.now_ms();
        let configs = self.configs();
        let is_member = |n| {
            configs.current.as_ref().is_some_and(|c| c.contains(n))
                || configs.transition().is_some_and(|c| c.contains(n))
        };
        let log_end = self.log_end();
        let heard = lock(&self.protocol)
            .table
            .admit(gossip, now_ms, is_member, log_end);
        match heard {
            Heard::Taken => self.peers_moved.notify_one(),
            Heard::Doubted { .. } => {
                self.log_end_wanted.notify_one();
                self.peers_moved.notify_one();
            }
            Heard::Stale | Heard::Stranger => {}
        }
        heard
    }

    /// The newest ts this node knows the log holds: the end the apply loop and the log-end task
    /// last saw, or its own committed ts if higher.
    pub fn log_end(&self) -> Timestamp {
        let seen = Timestamp(self.log_next.load(Ordering::Relaxed).saturating_sub(1));
        seen.max(self.store.committed())
    }

    /// For each partition of `config`, the replicas that may serve a read at `at` now.
    pub fn readable(
        &self,
        config: &ClusterConfig,
        at: ReadTimestamp,
    ) -> Result<BTreeMap<causeway_core::PartitionId, Vec<NodeId>>, causeway_core::PartitionId> {
        let configs = self.configs();
        let is_next = configs
            .transition()
            .is_some_and(|n| n.epoch == config.epoch);
        let p = lock(&self.protocol);
        let who = Eligibility {
            table: &p.table,
            now_ms: self.now_ms(),
            liveness_timeout_ms: self.tuning.liveness_timeout_ms,
            backfilled_for: is_next.then_some(config.epoch),
        };
        causeway_core::frontier::readable_replicas(config, &who, at.ts)
    }

    /// The latest gossip of every node heard from, with liveness, for status.
    pub fn peers(&self) -> Vec<(Gossip, bool, u64)> {
        let now = self.now_ms();
        let p = lock(&self.protocol);
        p.table
            .nodes()
            .filter(|&n| n != self.node)
            .filter_map(|n| {
                let g = p.table.get(n)?.clone();
                let heard = p.table.heard_at_ms(n).unwrap_or(0);
                let alive = p.table.is_alive(n, now, self.tuning.liveness_timeout_ms);
                Some((g, alive, now.saturating_sub(heard)))
            })
            .collect()
    }
}

/// Locks a mutex, taking over a poisoned one: the data behind these locks stays consistent
/// across a panic (each critical section is a single update).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: u64, ts: u64) -> ReadTimestamp {
        ReadTimestamp::new(Epoch(epoch), Timestamp(ts))
    }

    #[test]
    fn reads_hold_their_epoch_and_holds_only_the_gc_timestamp() {
        let reads = Arc::new(ActiveReads::default());
        let routing = Epoch(2);
        assert_eq!(reads.lowest(routing), None);
        // A hold alone follows the routing epoch: it holds back no install.
        let hold = reads.register_gc_hold(Timestamp(50));
        assert_eq!(reads.lowest(routing), Some(at(2, 50)));
        assert_eq!(reads.lowest(Epoch(3)), Some(at(3, 50)));
        // A read of the old epoch at a higher ts: the old epoch and the hold's lower ts, both.
        let read = reads.register(at(1, 100));
        assert_eq!(reads.lowest(routing), Some(at(1, 50)));
        drop(hold);
        assert_eq!(reads.lowest(routing), Some(at(1, 100)));
        drop(read);
        assert_eq!(reads.lowest(routing), None);
        assert_eq!(reads.count(), 0);
    }

    #[test]
    fn cursor_leases_hold_the_gc_timestamp_until_they_expire_and_are_bounded() {
        let reads = Arc::new(ActiveReads::default());
        let t0 = Instant::now();
        let s = std::time::Duration::from_secs;
        let old = s(100);
        assert!(reads.lease(Timestamp(10), t0 + s(5), old, 2));
        assert!(reads.lease(Timestamp(20), t0 + s(3), old, 2));
        // A lease holds only the GC timestamp: the epoch follows the routing epoch.
        assert_eq!(reads.lowest(Epoch(4)), Some(at(4, 10)));
        // Full: a third timestamp is not leased, renewing one held is.
        assert!(!reads.lease(Timestamp(30), t0 + s(5), old, 2));
        assert!(reads.lease(Timestamp(10), t0 + s(8), old, 2));
        // A renewal never shortens a lease.
        assert!(reads.lease(Timestamp(10), t0 + s(1), old, 2));
        assert_eq!(reads.expire_leases(t0 + s(2)), 0);
        assert_eq!(reads.expire_leases(t0 + s(5)), 1);
        assert_eq!(reads.lowest(Epoch(4)), Some(at(4, 10)));
        assert_eq!(reads.leases(), 1);
        assert_eq!(reads.expire_leases(t0 + s(8)), 1);
        assert_eq!(reads.lowest(Epoch(4)), None);
        assert_eq!((reads.leases(), reads.count()), (0, 0));
        // Renewals stop at the lease's age bound: replaying a cursor holds no ts for ever.
        assert!(reads.lease(Timestamp(40), t0 + s(5), s(10), 2));
        assert!(reads.lease(Timestamp(40), t0 + s(60), s(10), 2));
        assert_eq!(reads.expire_leases(t0 + s(9)), 0);
        assert_eq!(reads.expire_leases(t0 + s(11)), 1);
    }
}
