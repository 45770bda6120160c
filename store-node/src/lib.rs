//! The Causeway store node: it consumes the transaction log, applies each transaction to
//! multi-version automerge documents in RocksDB, deterministically, and serves reads at any
//! retained timestamp (DESIGN.md §2, §5, §6).
//!
//! The node service around it registers with the config manager, follows its configurations,
//! gossips its committed ts and active reads, computes the UST and GC timestamp with the pure
//! `causeway_core::Frontiers`, serves sub-reads to its peers and coordinates snapshot reads for
//! the api-server.
//!
//! # Layout
//! - [`storage`]: the storage engine: the RocksDB layout, deterministic apply, reads at a
//!   timestamp, GC, digests and backfill records.
//! - [`options`]: [`Options`] and [`Tuning`], the node's settings with defaults.
//! - [`state`]: the shared state: configurations, gossip table and frontiers, active reads.
//! - [`service`]: [`Service`] (bind, run) with its tasks (membership, apply, gossip, GC, servers)
//!   and the clonable [`Handle`].
//! - [`grpc`]: the `StoreNode` gRPC server: gossip, replica sub-reads, coordinated reads;
//!   collection queries (pages, cursors, their leases and work limits) in `grpc/query.rs`.
//! - [`changes`]: what the transactions wrote, for change data capture (`Changes`, `ChangesAt`).
//! - [`hold`]: named snapshot holds that outlive their stream (a change feed's GC hold).
//! - [`metrics`]: the node's Prometheus metrics.

pub mod backfill;
pub mod changes;
pub mod grpc;
pub mod hold;
pub mod metrics;
pub mod options;
pub mod service;
pub mod state;
pub mod storage;
pub mod votes;

pub use options::{Options, Tuning};
pub use service::{Error as ServiceError, Handle, Service};
pub use storage::{Error, Store, StoreOptions};
