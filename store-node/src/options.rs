//! The store node's settings, with documented defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_core::NodeId;
use causeway_txlog::LogOptions;
use serde::{Deserialize, Serialize};

use crate::storage::StoreOptions;

/// Everything a store node needs to run. Deserialised from JSON (the binary's `--config`) or
/// built in code (`causeway dev`, the tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// This node's id: stable across restarts, unique in the cluster.
    pub node_id: NodeId,
    /// Where the gRPC server (gossip, reads) listens. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The address other nodes and the api-server use to reach the gRPC server; defaults to the
    /// bound address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the admin HTTP server (`/metrics`, `/healthz`, `/readyz`) listens; none if absent.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The node's RocksDB directory.
    pub data_dir: PathBuf,
    /// The config manager's gRPC address (`host:port`).
    pub config_manager: String,
    /// The transaction log.
    pub log: LogOptions,
    #[serde(default)]
    pub store: StoreOptions,
    #[serde(default)]
    pub tuning: Tuning,
    /// How the gRPC links are authenticated (mutual TLS, or the cluster secret); see
    /// `causeway_proto::link`. Default: the open mode, which serves on loopback only.
    #[serde(default)]
    pub security: causeway_proto::link::Security,
}

/// Timings and limits. Every field has a default suited to a LAN cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// How often the node gossips its state to every peer (default 10 ms).
    pub gossip_interval_ms: u64,
    /// A peer not heard from for this long is taken as dead (default 1 000 ms).
    pub liveness_timeout_ms: u64,
    /// Timeout of one gossip or sub-read RPC to a peer (default 2 000 ms).
    pub peer_rpc_timeout_ms: u64,
    /// A sub-read to a peer that has not answered after this long goes to the partition's next
    /// replica as well, the first answer winning: at once for a point read, for a scan only
    /// while the peer has sent no gossip since it was asked (a paused or cut-off node). About a
    /// sub-read's p99 (default 20 ms; 0 = never hedge).
    pub sub_read_hedge_ms: u64,
    /// Most log records applied as one WriteBatch and fsync (default 512).
    pub apply_batch_records: usize,
    /// Most payload bytes applied as one WriteBatch and fsync (default 8 MiB).
    pub apply_batch_bytes: usize,
    /// How often GC runs a step (default 200 ms).
    pub gc_interval_ms: u64,
    /// Version keys GC examines per step (default 10 000).
    pub gc_step_budget: usize,
    /// Longest a coordinated read may wait for the UST, when the request gives no timeout
    /// (default 5 000 ms); also the ceiling of any requested timeout.
    pub read_timeout_ms: u64,
    /// Attempts of a coordinated read at fresh timestamps after `SnapshotTooOld` (default 3).
    pub read_attempts: u32,
    /// Documents a query may examine over all partitions for one page (default 100 000).
    pub query_max_scanned: u32,
    /// Documents one page of a query returns at most (default 1 000).
    pub query_max_limit: u32,
    /// Bytes of document JSON one page of a query gathers at most, over all partitions: a page
    /// stops there (with at least one document) and returns a cursor for the rest
    /// (default 8 MiB).
    pub query_max_page_bytes: u64,
    /// Milliseconds one page of a query scans at most before it returns what it has with a
    /// cursor for the rest (default 1 000 ms).
    pub query_max_page_ms: u32,
    /// How long a query cursor holds its read timestamp after each page: the GC timestamp does
    /// not pass it meanwhile, and each page renews it. Past it the cursor may answer "gone"
    /// (default 60 000 ms).
    pub query_cursor_lease_ms: u64,
    /// The longest one node holds a cursor's read timestamp, however often its pages come: a
    /// client paging (or replaying a cursor) for longer meets "gone" (default 3 600 000 ms).
    pub query_cursor_max_age_ms: u64,
    /// Cursor leases one node keeps at most (one per read timestamp); past it a page is served
    /// and its cursor holds no lease (default 10 000).
    pub query_max_cursor_leases: usize,
    /// Longest encoded cursor a page returns: an ordered query whose pass over the collection
    /// spans pages carries its best candidates so far in the cursor, as many as fit (at least
    /// one). The api-server must accept cursors this long (default 4 096 bytes).
    pub query_max_cursor_bytes: usize,
    /// Coordinated reads, queries and UST waits served at once; more are refused at once with
    /// `ResourceExhausted` (the api-server tries another node). Gossip, sub-reads, votes and
    /// backfill are not counted: they never wait behind clients (default 1 024).
    pub max_concurrent_requests: usize,
    /// The largest gRPC message the node takes or sends (default 64 MiB: a query page of
    /// 1 000 large documents, or a multi-get of the most keys, fits).
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive pings on every gRPC connection, and how long a ping may go unanswered
    /// before the connection is closed; also how long a new connection may take to send its
    /// first bytes (default 10 000 ms).
    pub http2_keepalive_ms: u64,
    /// gRPC connections open at once; past it, new ones wait in the listen backlog (default
    /// 4 096).
    pub max_connections: usize,
    /// `HoldSnapshot` streams one caller may hold open at once (default 1 024; a cdc service
    /// holds one per feed, two while a feed moves its hold). A caller is the node or role its
    /// certificate names under mutual TLS, else its IP address.
    pub max_holds_per_caller: usize,
    /// The longest a `HoldSnapshot` stream may hold its snapshot (default 3 600 000 ms). The
    /// stream's first message says how long it lasts, and change feeds open each successor
    /// before that.
    pub max_hold_ms: u64,
    /// Most version records in one backfill chunk (default 2 000).
    pub backfill_chunk_records: u32,
    /// Most bytes of keys and values in one backfill chunk (default 4 MiB).
    pub backfill_chunk_bytes: u32,
    /// Longest a backfill source waits to commit the snapshot asked for (default 10 000 ms).
    pub backfill_wait_ms: u32,
    /// Bound on the bytes per second a node ingests by backfill, so that moving data does not
    /// starve the foreground (default 64 MiB/s; 0 = no bound).
    pub backfill_bytes_per_second: u64,
    /// Backfill streams a node serves at once; more are refused, to be asked again (default 8).
    pub backfill_max_streams: usize,
    /// Transaction outcomes kept, in log positions behind the applied position, for lagging
    /// nodes and `GET /v1/transactions/{ts}` (default 10 000 000).
    pub outcome_retention: u64,
}

impl Tuning {
    /// Refuses the settings of the gRPC server that cannot work: why, when one cannot.
    pub fn check_server(&self) -> Result<(), &'static str> {
        if !(1..=causeway_proto::MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err("tuning.max_connections must be between 1 and 1 048 576");
        }
        if self.http2_keepalive_ms < 100 {
            return Err("tuning.http2_keepalive_ms must be at least 100");
        }
        if self.max_hold_ms < 1_000 {
            return Err("tuning.max_hold_ms must be at least 1 000");
        }
        Ok(())
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            gossip_interval_ms: 10,
            liveness_timeout_ms: 1_000,
            peer_rpc_timeout_ms: 2_000,
            sub_read_hedge_ms: 20,
            apply_batch_records: 512,
            apply_batch_bytes: 8 << 20,
            gc_interval_ms: 200,
            gc_step_budget: 10_000,
            read_timeout_ms: 5_000,
            read_attempts: 3,
            query_max_scanned: 100_000,
            query_max_limit: 1_000,
            query_max_page_bytes: 8 << 20,
            query_max_page_ms: 1_000,
            query_cursor_lease_ms: 60_000,
            query_cursor_max_age_ms: 3_600_000,
            query_max_cursor_leases: 10_000,
            query_max_cursor_bytes: 4_096,
            max_concurrent_requests: 1_024,
            max_message_bytes: 64 << 20,
            http2_keepalive_ms: 10_000,
            max_connections: 4_096,
            max_holds_per_caller: 1_024,
            max_hold_ms: 3_600_000,
            backfill_chunk_records: 2_000,
            backfill_chunk_bytes: 4 << 20,
            backfill_wait_ms: 10_000,
            backfill_bytes_per_second: 64 << 20,
            backfill_max_streams: 8,
            outcome_retention: 10_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_settings_that_cannot_work_are_refused() {
        assert_eq!(Tuning::default().check_server(), Ok(()));
        for bad in [
            Tuning {
                max_connections: 0,
                ..Tuning::default()
            },
            Tuning {
                max_connections: usize::MAX,
                ..Tuning::default()
            },
            Tuning {
                http2_keepalive_ms: 0,
                ..Tuning::default()
            },
            Tuning {
                max_hold_ms: 0,
                ..Tuning::default()
            },
        ] {
            assert!(bad.check_server().is_err(), "{bad:?}");
        }
    }
}
