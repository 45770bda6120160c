//! The config manager: the single, durable authority for Causeway's cluster configurations and
//! membership (DESIGN.md §9). Store nodes register under the ids they chose and heartbeat; every
//! component reads or watches the (current, next) pair of configurations; operators bootstrap the
//! cluster, propose a new shape, mark nodes failed and replace them; store nodes call
//! `CompleteTransition(epoch)` (a compare-and-set) to install next as current. Every configuration
//! decision comes from the pure functions of `causeway_core::ClusterConfig`; this crate adds the
//! durability (an fsynced state file, written before any change is acknowledged or published),
//! the liveness of registered nodes, and the gRPC service of `causeway-proto`.
//!
//! # Layout
//! - [`options`]: [`Options`], the serde-configurable settings and limits, with defaults.
//! - [`error`]: [`Error`], every way a call or the service can fail, and how corruption is named.
//! - [`state`]: the durable state (the pair, the configuration history) and its pure changes.
//! - [`disk`]: loading, validating and atomically writing the state file.
//! - [`registry`]: registered nodes, incarnations and heartbeat liveness.
//! - [`service`]: [`Service`] (bind, run) and its event loop, and the clonable [`Handle`].
//! - [`peers`]: what the config manager asks of others: store nodes' backfill vetoes (for an
//!   abort) and an optional provider of spare store nodes.
//! - [`grpc`]: the tonic `ConfigManager` server, a thin adapter over [`Handle`].
//! - [`client`]: [`Client`], the typed gRPC client for store nodes and the CLI.
//! - [`store_nodes`]: [`StoreNodes`], the clients' view of the store nodes: the config watch,
//!   one channel per node, coordinated calls with failover.

pub mod client;
pub mod disk;
pub mod error;
pub mod grpc;
pub mod options;
pub mod peers;
pub mod registry;
pub mod service;
pub mod state;
pub mod store_nodes;

pub use client::{Client, ConfigWatch};
pub use error::{Corruption, Error};
pub use options::Options;
pub use peers::{GrpcVeto, SpareNodes, SpareNodesError, Veto, VetoAnswer};
pub use registry::{NodeStatus, Registration};
pub use service::{Handle, Service};
pub use state::{Change, Completion, ConfigPair, HistoryEntry};
pub use store_nodes::{StoreError, StoreNodes};
