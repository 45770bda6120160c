//! Causeway's protocol core: the vocabulary of DESIGN.md §1 as types, Random Slicing with
//! Cut-Shift, cluster configurations, and the frontier algebra and transition logic that every
//! store node runs on its gossip.
//!
//! Everything here is pure and deterministic: no IO, no clock, no randomness. Time arrives as
//! arguments (`now_ms`), so every decision can be tested exhaustively and replayed in a seeded
//! simulation (`tests/simulation.rs`).
//!
//! # Layout
//! - [`time`]: `Timestamp` (log offset + 1), `Epoch`, `ReadTimestamp` (epoch, ts).
//! - [`key`]: `KeyHash` (a document's place in the keyspace) and the validated `DocKey`.
//! - [`node`]: `NodeId`, `PartitionId`.
//! - [`slicing`]: Random Slicing with Cut-Shift: intervals, weighted partitions, minimal moves.
//! - [`config`]: `ClusterConfig`: epochs, replicas, failed nodes, next configurations and gains.
//! - [`gossip`]: the gossip message and the table of the latest word from every node.
//! - [`frontier`]: UST, GC timestamp, readable replicas, and `Frontiers`, the monotone per-node
//!   views that drive a transition from backfill to install.
//! - [`query`]: the query language of collection queries: `Filter` (JSON form, limits, matching),
//!   the total order of JSON values, `Order` and `Query`.
//! - [`vote`]: the decision on a transaction from its documents' votes (`Ballot`, `Decision`).
//! - [`cdc`]: change data capture: event positions and cursors, the event a change makes on a
//!   filtered feed, where a feed may resume.
//! - [`admission`]: the ratekeeper: visibility lag and apply rate from samples, and which
//!   writes an api-server admits.

pub mod admission;
pub mod cdc;
pub mod config;
pub mod frontier;
pub mod gossip;
pub mod key;
pub mod node;
pub mod query;
pub mod slicing;
pub mod time;
pub mod vote;

pub use config::{ClusterConfig, ConfigError, Gain, NodeInfo};
pub use frontier::{Decisions, Frontiers, Phase, View};
pub use gossip::{Gossip, GossipTable, Heard};
pub use key::{CollectionPattern, DocKey, KeyError, KeyHash, KeyLimits};
pub use node::{NodeId, PartitionId};
pub use slicing::{Interval, Movement, Slicing, SlicingError, KEYSPACE};
pub use time::{Epoch, ReadTimestamp, Timestamp};
pub use vote::{Ballot, Decision, Vote};
