//! Causeway's wire formats, generated from `proto/causeway/v1/*.proto` with prost and tonic.
//!
//! # Layout
//! - [`v1`]: the `Transaction` record of the log (`txlog.proto`); the `ConfigManager` service
//!   (`cluster.proto`): registration, heartbeats, `GetConfig`, `Watch` and the admin calls; the
//!   `StoreNode` service (`node.proto`): gossip, replica sub-reads and coordinated reads.
//! - [`incoming`]: the connections a gRPC server of ours accepts.
//! - [`link`]: how our processes authenticate each other (mutual TLS, the cluster secret, the
//!   admin token).

mod incoming;
pub mod link;

pub use incoming::{incoming, Connection, FIRST_BYTES, MAX_CONNECTIONS};

/// Version 1 of the wire formats.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("causeway.v1");

    /// The transaction record format this build writes.
    pub const TRANSACTION_FORMAT_VERSION: u32 = 3;

    /// The first format whose records begin document histories whose store changes share one
    /// automerge actor (earlier ones give each mutation its own). The fields are those of
    /// format 2: the version tells a build that applies histories the old way to stop rather
    /// than make other bytes than its replicas.
    pub const FORMAT_HISTORY_ACTORS: u32 = 3;

    /// Whether this build applies records of format `version`. Format 1 records (without
    /// conditions, limits or idempotency keys) read as format 2 ones.
    pub fn transaction_format_supported(version: u32) -> bool {
        matches!(version, 1..=3)
    }
}
