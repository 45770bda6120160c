//! Registered store nodes: their addresses, incarnations and liveness.
//!
//! Registrations live in memory only: after a config-manager restart, nodes learn from a
//! `NotFound` heartbeat that they must register again. Time is passed in, so liveness is a pure
//! function of the last heartbeat and the timeout.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use causeway_core::{NodeId, NodeInfo};
use tokio::time::Instant;

use crate::error::Error;

/// What a node gets back from registering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    pub node: NodeId,
    /// Higher than every incarnation handed out before, across config-manager restarts.
    pub incarnation: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

/// A registered node as `ListNodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub info: NodeInfo,
    pub incarnation: u64,
    /// Heard from within the heartbeat timeout.
    pub live: bool,
    /// Wall-clock milliseconds since the Unix epoch of the last registration or heartbeat.
    pub last_heartbeat_unix_ms: u64,
    /// Milliseconds since then by the monotonic clock.
    pub since_heartbeat_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    info: NodeInfo,
    incarnation: u64,
    /// Monotonic time of the last heartbeat, for liveness.
    heard: Instant,
    /// Wall-clock time of the same, for operators only.
    heard_wall: SystemTime,
}

/// The registered nodes, in node-id order.
#[derive(Debug)]
pub struct Registry {
    nodes: BTreeMap<NodeId, Entry>,
    timeout: Duration,
    max_nodes: usize,
}

impl Registry {
    pub fn new(timeout: Duration, max_nodes: usize) -> Registry {
        Registry {
            nodes: BTreeMap::new(),
            timeout,
            max_nodes,
        }
    }

    /// Whether `node` may register now (the registry has room for it).
    pub fn check_room(&self, node: NodeId) -> Result<(), Error> {
        if !self.nodes.contains_key(&node) && self.nodes.len() >= self.max_nodes {
            return Err(Error::TooManyNodes(self.nodes.len()));
        }
        Ok(())
    }

    /// Records a registration (replacing an older one of the same node).
    pub fn register(&mut self, info: NodeInfo, incarnation: u64, now: Instant, wall: SystemTime) {
        let entry = Entry {
            info,
            incarnation,
            heard: now,
            heard_wall: wall,
        };
        self.nodes.insert(entry.info.id, entry);
    }

    /// Records a heartbeat of `node` at `incarnation`.
    pub fn heartbeat(
        &mut self,
        node: NodeId,
        incarnation: u64,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), Error> {
        let entry = self.nodes.get_mut(&node).ok_or(Error::UnknownNode(node))?;
        if entry.incarnation != incarnation {
            return Err(Error::StaleIncarnation {
                node,
                given: incarnation,
                current: entry.incarnation,
            });
        }
        entry.heard = now;
        entry.heard_wall = wall;
        Ok(())
    }

    /// The registered node `node`, live or not.
    pub fn get(&self, node: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&node).map(|e| &e.info)
    }

    /// Whether `node` is registered and heard from within the timeout.
    pub fn is_live(&self, node: NodeId, now: Instant) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|e| self.entry_live(e, now))
    }

    /// The live nodes, in node-id order.
    pub fn live(&self, now: Instant) -> Vec<NodeInfo> {
        self.nodes
            .values()
            .filter(|e| self.entry_live(e, now))
            .map(|e| e.info.clone())
            .collect()
    }

    /// Every registered node with its liveness, in node-id order.
    pub fn statuses(&self, now: Instant) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|e| NodeStatus {
                info: e.info.clone(),
                incarnation: e.incarnation,
                live: self.entry_live(e, now),
                last_heartbeat_unix_ms: e
                    .heard_wall
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                since_heartbeat_ms: u64::try_from(
                    now.saturating_duration_since(e.heard).as_millis(),
                )
                .unwrap_or(u64::MAX),
            })
            .collect()
    }

    fn entry_live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.heard) <= self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_heartbeats_and_stale_incarnations_are_refused() {
        let mut r = Registry::new(Duration::from_millis(100), 2);
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let n1 = NodeInfo {
            id: NodeId(1),
            addr: "a:1".into(),
        };
        r.register(n1.clone(), 1, t0, wall);
        assert!(r.is_live(NodeId(1), t0 + Duration::from_millis(100)));
        assert!(!r.is_live(NodeId(1), t0 + Duration::from_millis(101)));
        r.heartbeat(NodeId(1), 1, t0 + Duration::from_millis(90), wall)
            .unwrap();
        assert_eq!(r.live(t0 + Duration::from_millis(150)), vec![n1.clone()]);
        assert!(matches!(
            r.heartbeat(NodeId(1), 0, t0, wall),
            Err(Error::StaleIncarnation { current: 1, .. })
        ));
        assert!(matches!(
            r.heartbeat(NodeId(2), 1, t0, wall),
            Err(Error::UnknownNode(_))
        ));
        r.register(
            NodeInfo {
                id: NodeId(2),
                addr: "a:2".into(),
            },
            2,
            t0,
            wall,
        );
        assert!(matches!(
            r.check_room(NodeId(3)),
            Err(Error::TooManyNodes(2))
        ));
        r.check_room(NodeId(1)).unwrap();
    }
}
