//! Cluster configurations: which partition owns which intervals, and which nodes replicate it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::key::KeyHash;
use crate::node::{NodeId, PartitionId};
use crate::slicing::{Interval, Slicing, SlicingError};
use crate::time::Epoch;

/// A store node as configurations name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub id: NodeId,
    /// The node's gRPC address (`host:port`) for gossip, reads and backfill.
    pub addr: String,
}

/// Why a configuration is invalid or cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Slicing(#[from] SlicingError),
    #[error("partition {0} has no replica")]
    NoReplica(PartitionId),
    #[error("partition {0} has replicas but is not in the slicing")]
    UnslicedPartition(PartitionId),
    #[error("node {0} is a replica more than once")]
    DuplicateReplica(NodeId),
    #[error("node {0} is a replica but has no address")]
    MissingAddress(NodeId),
    #[error("node {0} has an address but is no replica")]
    StrayNode(NodeId),
    #[error("node {0} is marked failed but is not in the configuration")]
    UnknownFailed(NodeId),
    #[error("epoch {next} is not after epoch {current}")]
    EpochNotAfter { current: Epoch, next: Epoch },
    #[error("the epoch of a configuration is at least 1 (0 is the empty configuration)")]
    ZeroEpoch,
    #[error("a shape needs at least one partition and one replica, got {partitions} x {replicas}")]
    EmptyShape { partitions: u32, replicas: u32 },
    #[error("{needed} more nodes are needed for this shape but only {available} are available")]
    NotEnoughNodes { needed: usize, available: usize },
    #[error("node {0} is not in the configuration")]
    UnknownNode(NodeId),
    #[error("node {0} is already in the configuration")]
    NodeInUse(NodeId),
}

/// One cluster configuration: its epoch, the slicing of the keyspace into partitions, the replica
/// nodes of every partition, and the nodes declared failed.
///
/// A node replicates exactly one partition. Nodes marked failed keep their place (their data is
/// still there if they return) but are left out of the UST, the GC timestamp and install.
/// Marking a node failed changes no ownership, so it amends the configuration of the current
/// epoch instead of starting a transition; replacing the node is a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub epoch: Epoch,
    pub slicing: Slicing,
    /// The replica nodes of each partition, in a stable order.
    pub replicas: BTreeMap<PartitionId, Vec<NodeId>>,
    /// The address of every replica node.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    #[serde(default)]
    pub failed: BTreeSet<NodeId>,
}

/// An interval a node owns in the next configuration but not in the current one, and the current
/// owners it can backfill it from (failed nodes and the node itself left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gain {
    pub interval: Interval,
    pub from_partition: PartitionId,
    pub sources: Vec<NodeId>,
}

impl ClusterConfig {
    /// The first configuration, epoch 1: `partitions × replicas` over `nodes`, taken in order.
    pub fn bootstrap(
        partitions: u32,
        replicas: u32,
        nodes: &[NodeInfo],
    ) -> Result<ClusterConfig, ConfigError> {
        check_shape(partitions, replicas)?;
        let needed = partitions as usize * replicas as usize;
        if nodes.len() < needed {
            return Err(ConfigError::NotEnoughNodes {
                needed,
                available: nodes.len(),
            });
        }
        let slicing = Slicing::uniform(partitions)?;
        let mut chosen = nodes.iter();
        let mut config = ClusterConfig {
            epoch: Epoch(1),
            slicing,
            replicas: BTreeMap::new(),
            nodes: BTreeMap::new(),
            failed: BTreeSet::new(),
        };
        for p in 0..partitions {
            for _ in 0..replicas {
                let node = chosen.next().expect("counted above").clone();
                config.place(PartitionId(p), node);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the configuration on its own: slicing valid, every partition of the slicing has at
    /// least one replica and no others have any, no node twice, every replica has an address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.epoch == Epoch::ZERO {
            return Err(ConfigError::ZeroEpoch);
        }
        self.slicing.validate()?;
        for p in self.slicing.partitions() {
            if self.replicas.get(&p).is_none_or(Vec::is_empty) {
                return Err(ConfigError::NoReplica(p));
            }
        }
        let mut seen = BTreeSet::new();
        for (&p, nodes) in &self.replicas {
            if !self.slicing.weights().contains_key(&p) {
                return Err(ConfigError::UnslicedPartition(p));
            }
            for &n in nodes {
                if !seen.insert(n) {
                    return Err(ConfigError::DuplicateReplica(n));
                }
                if self.nodes.get(&n).is_none_or(|info| info.id != n) {
                    return Err(ConfigError::MissingAddress(n));
                }
            }
        }
        if let Some(&n) = self.nodes.keys().find(|n| !seen.contains(n)) {
            return Err(ConfigError::StrayNode(n));
        }
        if let Some(&n) = self.failed.iter().find(|n| !seen.contains(n)) {
            return Err(ConfigError::UnknownFailed(n));
        }
        Ok(())
    }

    /// Checks that `next` is a valid configuration that may follow this one. Its epoch is
    /// higher, not always by one: the epoch of an aborted transition is never used again.
    pub fn validate_successor(&self, next: &ClusterConfig) -> Result<(), ConfigError> {
        next.validate()?;
        if next.epoch <= self.epoch {
            return Err(ConfigError::EpochNotAfter {
                current: self.epoch,
                next: next.epoch,
            });
        }
        Ok(())
    }

    /// Every node of the configuration, failed ones included.
    pub fn node_ids(&self) -> BTreeSet<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Nodes that count: every node not marked failed.
    pub fn live_node_ids(&self) -> BTreeSet<NodeId> {
        self.nodes
            .keys()
            .filter(|n| !self.failed.contains(n))
            .copied()
            .collect()
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// The partition `node` replicates, if it is in this configuration.
    pub fn partition_of_node(&self, node: NodeId) -> Option<PartitionId> {
        self.replicas
            .iter()
            .find(|(_, nodes)| nodes.contains(&node))
            .map(|(&p, _)| p)
    }

    /// The partition owning a document.
    pub fn partition_of(&self, hash: KeyHash) -> PartitionId {
        self.slicing.partition_of(hash)
    }

    /// The replicas of `partition` (empty for an unknown one).
    pub fn replicas_of(&self, partition: PartitionId) -> &[NodeId] {
        self.replicas.get(&partition).map_or(&[], Vec::as_slice)
    }

    /// The intervals `node` stores in this configuration (none if it is not a replica).
    pub fn owned_intervals(&self, node: NodeId) -> Vec<Interval> {
        self.partition_of_node(node)
            .map(|p| self.slicing.intervals_of(p))
            .unwrap_or_default()
    }

    /// Whether `node` stores the document at `hash` in this configuration.
    pub fn owns(&self, node: NodeId, hash: KeyHash) -> bool {
        self.partition_of_node(node) == Some(self.partition_of(hash))
    }

    /// The intervals `node` owns in `next` but not here, each with the current owners to
    /// backfill it from, in keyspace order.
    pub fn gains(&self, next: &ClusterConfig, node: NodeId) -> Vec<Gain> {
        let Some(target) = next.partition_of_node(node) else {
            return Vec::new();
        };
        let mine_now = self.partition_of_node(node);
        let mut gains: Vec<Gain> = Vec::new();
        for wanted in next.slicing.intervals_of(target) {
            for (have, owner) in self.slicing.intervals() {
                let Some(piece) = wanted.intersect(&have) else {
                    continue;
                };
                if Some(owner) == mine_now {
                    continue;
                }
                let sources: Vec<NodeId> = self
                    .replicas_of(owner)
                    .iter()
                    .filter(|&&n| n != node && !self.failed.contains(&n))
                    .copied()
                    .collect();
                match gains.last_mut() {
                    Some(last)
                        if last.from_partition == owner
                            && last.interval.end == u128::from(piece.start) =>
                    {
                        last.interval.end = piece.end;
                    }
                    _ => gains.push(Gain {
                        interval: piece,
                        from_partition: owner,
                        sources,
                    }),
                }
            }
        }
        gains
    }

    /// The next configuration for the shape `partitions × replicas`, moving the fewest keys that
    /// the rule below allows.
    ///
    /// Partitions keep their ids; new ones take the next free ids, removed ones are the highest.
    /// Every partition gets weight 1. When the shape needs fewer nodes than the live ones, the
    /// nodes of highest id leave: a cluster whose node ids are ordinals (a StatefulSet's pods)
    /// then shrinks by exactly the ordinals that the orchestrator removes. Staying replicas keep
    /// their places (the first `replicas` of them in each partition); empty places are filled
    /// first from staying nodes left without a place, then from `spare`, each in id order.
    pub fn next_for_shape(
        &self,
        partitions: u32,
        replicas: u32,
        spare: &[NodeInfo],
    ) -> Result<ClusterConfig, ConfigError> {
        check_shape(partitions, replicas)?;
        let mut ids: Vec<PartitionId> = self.slicing.partitions().collect();
        let mut fresh = ids.last().map_or(0, |p| p.0 + 1);
        ids.truncate(partitions as usize);
        while ids.len() < partitions as usize {
            ids.push(PartitionId(fresh));
            fresh += 1;
        }
        let weights = ids.iter().map(|&p| (p, 1)).collect();
        let (slicing, _) = self.slicing.rebalance(&weights)?;

        let needed = partitions as usize * replicas as usize;
        let staying: BTreeSet<NodeId> = self.live_node_ids().into_iter().take(needed).collect();
        let mut next = ClusterConfig {
            epoch: self.epoch.next(),
            slicing,
            replicas: BTreeMap::new(),
            nodes: BTreeMap::new(),
            failed: BTreeSet::new(),
        };
        for &p in &ids {
            let kept = self.replicas_of(p).iter().filter(|n| staying.contains(n));
            for n in kept.take(replicas as usize) {
                next.place(p, self.nodes[n].clone());
            }
        }
        let displaced: Vec<&NodeInfo> = staying
            .iter()
            .filter(|n| !next.contains(**n))
            .map(|n| &self.nodes[n])
            .collect();
        let spare: Vec<&NodeInfo> = spare.iter().filter(|n| !self.contains(n.id)).collect();
        let spare_count = spare.len();
        let mut unused = displaced.into_iter().chain(spare);
        let mut missing = 0;
        for &p in &ids {
            let placed = next.replicas.get(&p).map_or(0, Vec::len);
            for _ in placed..replicas as usize {
                match unused.next() {
                    Some(node) => next.place(p, node.clone()),
                    None => missing += 1,
                }
            }
        }
        if missing > 0 {
            return Err(ConfigError::NotEnoughNodes {
                needed: spare_count + missing,
                available: spare_count,
            });
        }
        self.validate_successor(&next)?;
        Ok(next)
    }

    /// The next configuration with `failed` replaced by `with` in its partition.
    pub fn next_replacing(
        &self,
        failed: NodeId,
        with: NodeInfo,
    ) -> Result<ClusterConfig, ConfigError> {
        let p = self
            .partition_of_node(failed)
            .ok_or(ConfigError::UnknownNode(failed))?;
        if self.contains(with.id) {
            return Err(ConfigError::NodeInUse(with.id));
        }
        let mut next = self.clone();
        next.epoch = self.epoch.next();
        next.nodes.remove(&failed);
        next.failed.remove(&failed);
        for n in next
            .replicas
            .get_mut(&p)
            .expect("partition of a node")
            .iter_mut()
        {
            if *n == failed {
                *n = with.id;
            }
        }
        next.nodes.insert(with.id, with);
        self.validate_successor(&next)?;
        Ok(next)
    }

    /// This configuration with `node` marked failed (same epoch: ownership does not change).
    pub fn with_failed(&self, node: NodeId) -> Result<ClusterConfig, ConfigError> {
        if !self.contains(node) {
            return Err(ConfigError::UnknownNode(node));
        }
        let mut amended = self.clone();
        amended.failed.insert(node);
        Ok(amended)
    }

    fn place(&mut self, partition: PartitionId, node: NodeInfo) {
        self.replicas.entry(partition).or_default().push(node.id);
        self.nodes.insert(node.id, node);
    }
}

fn check_shape(partitions: u32, replicas: u32) -> Result<(), ConfigError> {
    if partitions == 0 || replicas == 0 {
        return Err(ConfigError::EmptyShape {
            partitions,
            replicas,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slicing::KEYSPACE;

    pub(crate) fn nodes(ids: std::ops::Range<u64>) -> Vec<NodeInfo> {
        ids.map(|i| NodeInfo {
            id: NodeId(i),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
    }

    #[test]
    fn bootstrap_places_nodes_in_order() {
        let c = ClusterConfig::bootstrap(2, 2, &nodes(1..5)).unwrap();
        assert_eq!(c.epoch, Epoch(1));
        assert_eq!(c.replicas_of(PartitionId(0)), &[NodeId(1), NodeId(2)]);
        assert_eq!(c.replicas_of(PartitionId(1)), &[NodeId(3), NodeId(4)]);
        assert_eq!(
            ClusterConfig::bootstrap(2, 2, &nodes(1..4)),
            Err(ConfigError::NotEnoughNodes {
                needed: 4,
                available: 3
            })
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ClusterConfig>(&json).unwrap(), c);
    }

    #[test]
    fn scale_up_gains_half_from_the_old_partition() {
        let c = ClusterConfig::bootstrap(1, 2, &nodes(1..3)).unwrap();
        let n = c.next_for_shape(2, 2, &nodes(3..5)).unwrap();
        assert_eq!(n.epoch, Epoch(2));
        assert_eq!(n.replicas_of(PartitionId(0)), &[NodeId(1), NodeId(2)]);
        assert_eq!(n.replicas_of(PartitionId(1)), &[NodeId(3), NodeId(4)]);
        let gains = c.gains(&n, NodeId(3));
        assert_eq!(
            gains.iter().map(|g| g.interval.len()).sum::<u128>(),
            KEYSPACE / 2
        );
        assert!(gains
            .iter()
            .all(|g| g.sources == vec![NodeId(1), NodeId(2)]));
        assert!(c.gains(&n, NodeId(1)).is_empty(), "old owners gain nothing");
        // And back down: the old nodes gain the half they lost, from the leaving nodes.
        let down = n.next_for_shape(1, 2, &[]).unwrap();
        let gains = n.gains(&down, NodeId(1));
        assert_eq!(
            gains.iter().map(|g| g.interval.len()).sum::<u128>(),
            KEYSPACE / 2
        );
        assert!(gains
            .iter()
            .all(|g| g.sources == vec![NodeId(3), NodeId(4)]));
        assert!(!down.contains(NodeId(3)));
    }

    #[test]
    fn scale_down_drains_the_highest_node_ids() {
        // Fewer replicas: nodes 4 and 5 leave, node 2 moves to the partition they leave short.
        let c = ClusterConfig::bootstrap(2, 3, &nodes(0..6)).unwrap();
        let n = c.next_for_shape(2, 2, &[]).unwrap();
        assert_eq!(n.replicas_of(PartitionId(0)), &[NodeId(0), NodeId(1)]);
        assert_eq!(n.replicas_of(PartitionId(1)), &[NodeId(3), NodeId(2)]);
        // Fewer partitions whose nodes are not the highest: the highest ids leave all the same.
        let c = ClusterConfig::bootstrap(3, 1, &nodes(0..3)).unwrap();
        let mut shuffled = c.clone();
        shuffled.replicas.insert(PartitionId(1), vec![NodeId(2)]);
        shuffled.replicas.insert(PartitionId(2), vec![NodeId(1)]);
        let n = shuffled.next_for_shape(2, 1, &[]).unwrap();
        assert_eq!(n.node_ids(), [NodeId(0), NodeId(1)].into());
        assert_eq!(n.replicas_of(PartitionId(1)), &[NodeId(1)]);
        // A failed node counts as gone: the next lowest stays in its place.
        let c = ClusterConfig::bootstrap(1, 3, &nodes(0..3)).unwrap();
        let n = c
            .with_failed(NodeId(1))
            .unwrap()
            .next_for_shape(1, 2, &[])
            .unwrap();
        assert_eq!(n.replicas_of(PartitionId(0)), &[NodeId(0), NodeId(2)]);
    }

    proptest::proptest! {
        /// A cluster whose nodes are numbered 0, 1, 2, … like a StatefulSet's pods, offered the
        /// next ordinals as spares when it grows, uses exactly ordinals `0..partitions×replicas`
        /// after every change of shape, so the orchestrator may remove the highest pods.
        #[test]
        fn every_shape_uses_the_lowest_ordinals(
            first in (1u32..4, 1u32..4),
            shapes in proptest::collection::vec((1u32..5, 1u32..4), 1..8),
        ) {
            let size = |(p, r): (u32, u32)| u64::from(p * r);
            let mut config = ClusterConfig::bootstrap(first.0, first.1, &nodes(0..size(first))).unwrap();
            for shape in shapes {
                let current = config.node_ids().len() as u64;
                let spare = nodes(current..current.max(size(shape)));
                config = config.next_for_shape(shape.0, shape.1, &spare).unwrap();
                let ordinals: BTreeSet<NodeId> = (0..size(shape)).map(NodeId).collect();
                proptest::prop_assert_eq!(config.node_ids(), ordinals);
                proptest::prop_assert_eq!(config.replicas.len(), shape.0 as usize);
            }
        }
    }

    #[test]
    fn replacement_swaps_one_node_and_gains_its_whole_partition() {
        let c = ClusterConfig::bootstrap(2, 2, &nodes(1..5)).unwrap();
        let c = c.with_failed(NodeId(2)).unwrap();
        let n = c
            .next_replacing(NodeId(2), nodes(9..10)[0].clone())
            .unwrap();
        assert_eq!(n.replicas_of(PartitionId(0)), &[NodeId(1), NodeId(9)]);
        assert!(n.failed.is_empty());
        let gains = c.gains(&n, NodeId(9));
        let total: u128 = gains.iter().map(|g| g.interval.len()).sum();
        assert_eq!(total, c.slicing.share(PartitionId(0)));
        assert!(
            gains.iter().all(|g| g.sources == vec![NodeId(1)]),
            "failed node is no source"
        );
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let c = ClusterConfig::bootstrap(2, 1, &nodes(1..3)).unwrap();
        let mut bad = c.clone();
        bad.replicas
            .get_mut(&PartitionId(1))
            .unwrap()
            .push(NodeId(1));
        assert_eq!(
            bad.validate(),
            Err(ConfigError::DuplicateReplica(NodeId(1)))
        );
        let mut bad = c.clone();
        bad.replicas.insert(PartitionId(1), vec![]);
        bad.nodes.remove(&NodeId(2));
        assert_eq!(bad.validate(), Err(ConfigError::NoReplica(PartitionId(1))));
        let mut skip = c.clone();
        skip.epoch = Epoch(3);
        assert_eq!(c.validate_successor(&skip), Ok(()), "past an aborted epoch");
        assert!(matches!(
            c.validate_successor(&c),
            Err(ConfigError::EpochNotAfter { .. })
        ));
        assert_eq!(
            c.next_for_shape(3, 1, &[]),
            Err(ConfigError::NotEnoughNodes {
                needed: 1,
                available: 0
            })
        );
        assert!(matches!(
            c.next_for_shape(0, 1, &[]),
            Err(ConfigError::EmptyShape { .. })
        ));
    }
}
