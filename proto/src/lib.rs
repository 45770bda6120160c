//! Causeway's wire formats, generated from `proto/causeway/v1/*.proto` with prost and tonic.
//!
//! # Layout
//! - [`v1`]: the `Transaction` record of the log (`txlog.proto`); the `ConfigManager` service
//!   (`cluster.proto`): registration, heartbeats, `GetConfig`, `Watch` and the admin calls; the
//!   `StoreNode` service (`node.proto`): gossip, replica sub-reads and coordinated reads.

/// Version 1 of the wire formats.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("causeway.v1");

    /// The transaction record format this build writes and reads.
    pub const TRANSACTION_FORMAT_VERSION: u32 = 1;
}
