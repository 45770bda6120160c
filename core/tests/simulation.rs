//! A seeded, deterministic simulation of store nodes running the pure core: gossip with random
//! delays, drops, duplicates and reordering; crashes (committed ts and backfill progress
//! survive, everything else is lost); pauses (as by SIGSTOP); long reads; and a whole transition from 1P×2R to 2P×2R and
//! back, with every invariant checked at every step. A failure prints the seed that replays it:
//! `CAUSEWAY_SIM_SEED=<seed> cargo test -p causeway-core --test simulation`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use causeway_core::config::NodeInfo;
use causeway_core::{
    ClusterConfig, Epoch, Frontiers, Gossip, GossipTable, Heard, NodeId, ReadTimestamp, Timestamp,
    View,
};
use common::Rng;

const TICK_MS: u64 = 10;
const LIVENESS_TIMEOUT_MS: u64 = 150;
const MAX_TICKS: u64 = 4_000;
/// The id of a node in no configuration, whose gossip is forged.
const STRANGER: u64 = 99;

#[derive(Debug, Clone, Copy)]
struct Read {
    at: ReadTimestamp,
    ends_at: u64,
}

struct Node {
    id: NodeId,
    // Durable.
    committed: u64,
    consuming: bool,
    backfilled_for: Option<Epoch>,
    /// Epochs this node promised never to backfill for (an abort).
    vetoed: BTreeSet<Epoch>,
    incarnation: u64,
    // Volatile.
    up: bool,
    down_until: u64,
    /// Paused (as by SIGSTOP) until this tick: applies nothing, sends and handles nothing.
    paused_until: u64,
    seq: u64,
    backfill_done_at: Option<(Epoch, u64)>,
    current: ClusterConfig,
    next: Option<ClusterConfig>,
    table: GossipTable,
    frontiers: Frontiers,
    reads: Vec<Read>,
    /// The highest ts this incarnation has read at: reads never go back in time.
    last_read_ts: Timestamp,
    /// Crashed at least once: its first reads after a restart may meet SnapshotTooOld.
    restarted: bool,
    /// The newest ts of the log this node knows of (its view lags the log).
    log_view: u64,
}

struct Message {
    deliver_at: u64,
    to: NodeId,
    gossip: Gossip,
}

struct Sim {
    seed: u64,
    rng: Rng,
    tick: u64,
    log_end: u64,
    nodes: BTreeMap<NodeId, Node>,
    cm_current: ClusterConfig,
    cm_next: Option<ClusterConfig>,
    net: Vec<Message>,
    installs: Vec<Epoch>,
    /// The highest epoch ever proposed: an aborted one is never used again.
    proposed: Epoch,
    aborts: u64,
    reads_served: u64,
    too_old_retries: u64,
}

fn infos(ids: std::ops::Range<u64>) -> Vec<NodeInfo> {
    ids.map(|i| NodeInfo {
        id: NodeId(i),
        addr: format!("sim-{i}"),
    })
    .collect()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let current = ClusterConfig::bootstrap(1, 2, &infos(1..3)).unwrap();
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            tick: 0,
            log_end: 0,
            nodes: BTreeMap::new(),
            cm_current: current.clone(),
            cm_next: None,
            net: Vec::new(),
            installs: Vec::new(),
            proposed: current.epoch,
            aborts: 0,
            reads_served: 0,
            too_old_retries: 0,
        };
        for info in infos(1..5) {
            sim.nodes.insert(
                info.id,
                Node {
                    id: info.id,
                    committed: 0,
                    consuming: current.contains(info.id),
                    backfilled_for: None,
                    vetoed: BTreeSet::new(),
                    incarnation: 1,
                    up: current.contains(info.id),
                    down_until: 0,
                    paused_until: 0,
                    seq: 0,
                    backfill_done_at: None,
                    current: current.clone(),
                    next: None,
                    table: GossipTable::new(),
                    frontiers: Frontiers::new(),
                    reads: Vec::new(),
                    last_read_ts: Timestamp::ZERO,
                    restarted: false,
                    log_view: 0,
                },
            );
        }
        sim
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {} tick {}: {what}\nreplay: CAUSEWAY_SIM_SEED={} cargo test -p causeway-core --test simulation",
            self.seed, self.tick, self.seed
        );
    }

    fn now_ms(&self) -> u64 {
        self.tick * TICK_MS
    }

    /// The highest ts every partition of `config` really has on a replica that counts (durable
    /// committed ts, dead nodes included: their data is on disk). For a next configuration only
    /// backfilled replicas count.
    fn true_ust(&self, config: &ClusterConfig, next: bool) -> u64 {
        config
            .slicing
            .partitions()
            .map(|p| {
                config
                    .replicas_of(p)
                    .iter()
                    .filter(|n| !config.failed.contains(n))
                    .map(|n| &self.nodes[n])
                    .filter(|n| !next || n.backfilled_for == Some(config.epoch))
                    .map(|n| n.committed)
                    .max()
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0)
    }

    fn run(&mut self) {
        // The config manager's plan: scale up (perhaps aborted at a random moment, then
        // proposed again), then back down, then stop.
        let mut plan = 0;
        let mut abort_at = 0;
        while self.tick < MAX_TICKS {
            self.tick += 1;
            let settled = self.cm_next.is_none() && self.tick > self.installs_tick() + 30;
            match plan {
                0 if self.tick > 30 => {
                    self.propose(2, 2);
                    abort_at = self.tick + self.rng.below(60);
                    plan = 1;
                }
                1 if self.cm_next.is_none() => plan = 2,
                1 if self.tick >= abort_at => {
                    if self.abort() {
                        self.propose(2, 2);
                    }
                    plan = 2;
                }
                2 if settled => {
                    self.propose(1, 2);
                    plan = 3;
                }
                3 if settled => return,
                _ => {}
            }
            self.log_end += self.rng.below(4);
            self.deliver();
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.step_node(id);
            }
            self.check_reads();
        }
        self.fail(&format!(
            "the transitions did not finish: installed {:?}, cm at epoch {}",
            self.installs, self.cm_current.epoch
        ));
    }

    fn propose(&mut self, partitions: u32, replicas: u32) {
        let mut next = self
            .cm_current
            .next_for_shape(partitions, replicas, &infos(3..5))
            .unwrap();
        next.epoch = self.proposed.next();
        self.proposed = next.epoch;
        self.cm_current.validate_successor(&next).unwrap();
        self.cm_next = Some(next);
    }

    /// `AbortTransition`: the first running node of next that gains intervals and has not
    /// backfilled vetoes the epoch; then next is dropped. False when none can.
    fn abort(&mut self) -> bool {
        let Some(next) = self.cm_next.clone() else {
            return false;
        };
        let tick = self.tick;
        let current = &self.cm_current;
        let vetoer = self.nodes.values_mut().find(|n| {
            next.contains(n.id)
                && !current.gains(&next, n.id).is_empty()
                && n.up
                && tick >= n.paused_until
                && n.backfilled_for != Some(next.epoch)
        });
        let Some(node) = vetoer else {
            return false;
        };
        node.vetoed.insert(next.epoch);
        self.cm_next = None;
        self.aborts += 1;
        true
    }

    fn installs_tick(&self) -> u64 {
        // Installs are recorded with the tick in the high bits for the plan's pauses.
        self.installs.last().map_or(0, |e| e.get() >> 32)
    }

    fn deliver(&mut self) {
        let now = self.tick;
        let now_ms = self.now_ms();
        let (due, later): (Vec<Message>, Vec<Message>) =
            self.net.drain(..).partition(|m| m.deliver_at <= now);
        self.net = later;
        let log_end = self.log_end;
        for m in due {
            let Node {
                up,
                paused_until,
                table,
                current,
                next,
                committed,
                log_view,
                ..
            } = self.nodes.get_mut(&m.to).unwrap();
            if *up && now >= *paused_until {
                let is_member =
                    |n| current.contains(n) || next.as_ref().is_some_and(|c| c.contains(n));
                // The node's view of the log's end lags: its own committed ts, or what it last
                // looked at; a claim beyond it makes it look again (as a store node does).
                *log_view = (*log_view).max(*committed);
                let heard = table.admit(m.gossip, now_ms, is_member, Timestamp(*log_view));
                if matches!(heard, Heard::Doubted { .. }) {
                    *log_view = log_end;
                }
            }
        }
    }

    fn step_node(&mut self, id: NodeId) {
        let tick = self.tick;
        let now_ms = self.now_ms();
        let member = |c: &ClusterConfig, n: &Option<ClusterConfig>| {
            c.contains(id) || n.as_ref().is_some_and(|n| n.contains(id))
        };
        // Crashes and restarts.
        {
            let in_cluster = member(&self.cm_current, &self.cm_next);
            let crash = self.rng.chance(2);
            let down_for = 5 + self.rng.below(40);
            let pause = self.rng.chance(4);
            let pause_for = 5 + self.rng.below(60);
            let node = self.nodes.get_mut(&id).unwrap();
            if node.up && tick < node.paused_until {
                return;
            }
            if node.up && pause {
                node.paused_until = tick + pause_for;
                return;
            }
            if node.up && !in_cluster && node.current.epoch < self.cm_current.epoch {
                node.up = false; // left the cluster: it stops
                node.reads.clear();
                return;
            }
            if node.up && crash {
                node.up = false;
                node.down_until = tick + down_for;
                node.reads.clear();
                return;
            }
            if !node.up {
                if !in_cluster || tick < node.down_until {
                    return;
                }
                // (Re)start: new incarnation, volatile state lost, configs fetched anew.
                node.up = true;
                node.restarted |= node.incarnation > 1 || node.consuming;
                node.incarnation += 1;
                node.seq = 0;
                node.table = GossipTable::new();
                node.frontiers = Frontiers::new();
                node.last_read_ts = Timestamp::ZERO;
                node.backfill_done_at = None;
                node.current = self.cm_current.clone();
                node.next = self.cm_next.clone();
                // A store node looks at the log's end when it starts applying.
                node.log_view = self.log_end;
            }
        }
        // Watch: the node learns the config manager's state with some delay.
        if self.rng.chance(300) {
            let node = self.nodes.get_mut(&id).unwrap();
            node.current = self.cm_current.clone();
            node.next = self.cm_next.clone();
        }
        let advance = self.rng.below(4);
        let backfill_time = 3 + self.rng.below(30);
        let log_end = self.log_end;
        let node = self.nodes.get_mut(&id).unwrap();
        if !node.consuming && member(&node.current, &node.next) {
            node.consuming = true;
            node.committed = log_end; // a new node starts at the end of the log
        }
        if node.consuming {
            node.committed = (node.committed + advance).min(log_end);
        }
        if let Some(next) = &node.next {
            if next.epoch > node.current.epoch
                && node.backfilled_for != Some(next.epoch)
                && !node.vetoed.contains(&next.epoch)
            {
                if node.current.gains(next, id).is_empty() {
                    node.backfilled_for = Some(next.epoch);
                } else {
                    if node.backfill_done_at.is_none_or(|(e, _)| e != next.epoch) {
                        node.backfill_done_at = Some((next.epoch, tick + backfill_time));
                    }
                    if node.backfill_done_at.is_some_and(|(_, at)| tick >= at) {
                        node.backfilled_for = Some(next.epoch);
                    }
                }
            }
        }
        node.reads.retain(|r| r.ends_at > tick);

        // Gossip out, then take our own word into our table and step the frontiers.
        node.seq += 1;
        let next_epoch = node
            .next
            .as_ref()
            .map(|n| n.epoch)
            .filter(|&e| e > node.current.epoch);
        let lowest_read = node.reads.iter().map(|r| r.at).min();
        let gossip = Gossip {
            node: id,
            incarnation: node.incarnation,
            seq: node.seq,
            committed: Timestamp(node.committed),
            current_epoch: node.current.epoch,
            next_epoch,
            backfilled: next_epoch.is_some() && node.backfilled_for == next_epoch,
            routing_epoch: node.frontiers.routing_epoch(),
            ust: node.frontiers.ust(),
            lowest_read,
        };
        node.table.observe(gossip.clone(), now_ms);
        let mut peers: BTreeSet<NodeId> = node.current.node_ids();
        if let Some(next) = &node.next {
            peers.extend(next.node_ids());
        }
        peers.remove(&id);
        let routed_before = node.frontiers.routing_epoch();
        let decisions = node.frontiers.step(&View {
            node: id,
            current: &node.current,
            next: node.next.as_ref(),
            table: &node.table,
            lowest_read,
            now_ms,
            liveness_timeout_ms: LIVENESS_TIMEOUT_MS,
        });
        if decisions.routing_epoch > routed_before
            && node
                .next
                .as_ref()
                .is_some_and(|n| n.epoch == decisions.routing_epoch)
            && node.frontiers.next_ust() < node.frontiers.current_ust()
        {
            let what = format!("{id} switched routing with next UST below the current UST");
            self.fail(&what);
        }
        let routing_config = match &node.next {
            Some(n) if n.epoch == decisions.routing_epoch => n.clone(),
            _ => node.current.clone(),
        };
        for peer in peers {
            if self.rng.chance(100) {
                continue; // dropped
            }
            let copies = if self.rng.chance(50) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = 1 + self.rng.below(8);
                self.net.push(Message {
                    deliver_at: tick + delay,
                    to: peer,
                    gossip: gossip.clone(),
                });
            }
            // A forgery: a node in no configuration claiming a committed ts and a UST beyond
            // the log. Believed, it would hold every node's UST back or past what is stable.
            if self.rng.chance(40) {
                let mut forged = gossip.clone();
                forged.node = NodeId(STRANGER);
                forged.committed = Timestamp(self.log_end + 100 + self.rng.below(1_000));
                forged.ust = forged.committed;
                self.net.push(Message {
                    deliver_at: tick + 1,
                    to: peer,
                    gossip: forged,
                });
            }
        }

        // Install: the config manager takes it as a compare-and-set.
        if let Some(epoch) = decisions.install {
            if self.cm_next.as_ref().is_some_and(|n| n.epoch == epoch) {
                self.check_install(epoch);
                self.cm_current = self.cm_next.take().unwrap();
                self.installs.push(Epoch((tick << 32) | epoch.get()));
            }
        }

        // Reads: start one now and then at the routing UST.
        let start = decisions.can_coordinate && self.rng.chance(300);
        let length = 1 + self.rng.below(60);
        if start {
            let at = ReadTimestamp::new(decisions.routing_epoch, decisions.ust);
            let is_next = routing_config.epoch > self.cm_current.epoch
                || self
                    .cm_next
                    .as_ref()
                    .is_some_and(|n| n.epoch == routing_config.epoch);
            let stable = self.true_ust(&routing_config, is_next);
            if decisions.ust.get() > stable {
                let n = &self.nodes[&id];
                self.fail(&format!(
                    "{id} reads at {at} but only {stable} is stable in epoch {} (node knows {}/{:?}, cm {}/{:?}, {:?}, committed {:?})",
                    routing_config.epoch, n.current.epoch, n.next.as_ref().map(|c| c.epoch), self.cm_current.epoch, self.cm_next.as_ref().map(|c| c.epoch), n.frontiers,
                    self.nodes.values().map(|n| (n.id, n.committed, n.backfilled_for, n.up)).collect::<Vec<_>>()
                ));
            }
            // A replica whose GC passed the read answers SnapshotTooOld; the coordinator retries
            // at a fresh timestamp. Only a restarted coordinator may meet it.
            let highest_gc = self
                .nodes
                .values()
                .filter(|n| n.up)
                .map(|n| n.frontiers.gc())
                .max()
                .unwrap_or_default();
            let restarted = self.nodes[&id].restarted;
            if highest_gc > at.ts {
                if !restarted {
                    self.fail(&format!("{id} starts a read at {at} below GC {highest_gc}"));
                }
                self.too_old_retries += 1;
                return;
            }
            if at.ts < self.nodes[&id].last_read_ts {
                self.fail(&format!(
                    "{id} reads at {at}, back in time from {}",
                    self.nodes[&id].last_read_ts
                ));
            }
            self.reads_served += 1;
            self.nodes.get_mut(&id).unwrap().last_read_ts = at.ts;
            self.nodes.get_mut(&id).unwrap().reads.push(Read {
                at,
                ends_at: tick + length,
            });
        }
    }

    /// While a read is active, no node's GC timestamp passes it.
    fn check_reads(&self) {
        for node in self.nodes.values().filter(|n| n.up) {
            for read in &node.reads {
                for other in self.nodes.values().filter(|n| n.up) {
                    if other.frontiers.gc() > read.at.ts {
                        self.fail(&format!(
                            "{} GC {} passed the active read {} of {}",
                            other.id,
                            other.frontiers.gc(),
                            read.at,
                            node.id
                        ));
                    }
                }
            }
        }
    }

    /// Install is declared only when no node of current ∪ next has a read of the old epoch.
    fn check_install(&self, epoch: Epoch) {
        for node in self.nodes.values().filter(|n| n.up) {
            if let Some(r) = node.reads.iter().find(|r| r.at.epoch < epoch) {
                self.fail(&format!(
                    "install of {epoch} while {} reads at {}",
                    node.id, r.at
                ));
            }
        }
    }
}

fn run_seed(seed: u64) -> (u64, u64, u64) {
    let mut sim = Sim::new(seed);
    sim.run();
    assert_eq!(
        (
            sim.installs.len(),
            sim.cm_current.slicing.partitions().count()
        ),
        (2, 1),
        "seed {seed}: both transitions installed"
    );
    assert_eq!(
        sim.cm_current.epoch.get(),
        3 + sim.aborts,
        "seed {seed}: an aborted epoch is never reused"
    );
    assert!(sim.reads_served > 0, "seed {seed}: no read was served");
    (sim.reads_served, sim.too_old_retries, sim.aborts)
}

#[test]
fn transitions_keep_every_invariant() {
    if let Ok(seed) = std::env::var("CAUSEWAY_SIM_SEED") {
        run_seed(seed.parse().expect("CAUSEWAY_SIM_SEED is a u64"));
        return;
    }
    let seeds: u64 = std::env::var("CAUSEWAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let (mut reads, mut retries, mut aborts) = (0, 0, 0);
    for seed in 0..seeds {
        let (r, t, a) = run_seed(seed);
        reads += r;
        retries += t;
        aborts += a;
    }
    println!(
        "{seeds} seeds: {reads} reads served, {retries} SnapshotTooOld retries after restarts, {aborts} transitions aborted"
    );
    assert!(
        aborts > seeds / 10 && aborts < seeds,
        "some seeds abort and some cannot ({aborts} of {seeds})"
    );
}
