//! The config manager's settings. Every limit lives here with its default.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_proto::link::Security;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Settings of a config manager, read from JSON (`--config file.json`) or built in code. Every
/// field has a default, so `{}` is a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Where the gRPC server listens. Default `127.0.0.1:7400`; port 0 picks a free port (read it
    /// back with [`crate::Service::local_addr`]).
    pub listen_addr: SocketAddr,
    /// The directory of the state file (`state.json`). Default `data/config-manager`. Created if
    /// missing; it must be on a disk of its own to the config manager.
    pub data_dir: PathBuf,
    /// How often nodes are told to heartbeat. Default 1000 ms.
    pub heartbeat_interval_ms: u64,
    /// A node not heard from for this long is not live: it is no candidate for bootstrap, a new
    /// shape or a replacement. Default 5000 ms; must exceed `heartbeat_interval_ms`.
    pub heartbeat_timeout_ms: u64,
    /// Capacity of the event loop's command queue; callers wait when it is full. Default 1024.
    pub command_queue_capacity: usize,
    /// How many nodes may be registered at once. Default 4096.
    pub max_nodes: usize,
    /// How many `Watch` streams may be open at once. Default 1024.
    pub max_watchers: usize,
    /// The largest number of partitions a shape may have. Default 1024.
    pub max_partitions: u32,
    /// The largest number of replicas per partition a shape may have. Default 9.
    pub max_replicas: u32,
    /// The longest node address accepted at registration, in bytes. Default 255.
    pub max_addr_len: usize,
    /// HTTP/2 keepalive pings on every connection, so dead watchers are noticed. Default 10000 ms.
    pub http2_keepalive_interval_ms: u64,
    /// Concurrent requests served per connection. Default 256.
    pub max_concurrent_requests_per_connection: usize,
    /// Connections open at once; past it, new ones wait in the listen backlog. A new connection
    /// must send its first bytes within `http2_keepalive_interval_ms`. Default 4096.
    pub max_connections: usize,
    /// How long `AbortTransition` waits for each node's `VetoBackfill` answer. Default 2000 ms.
    pub veto_timeout_ms: u64,
    /// How long a proposal waits for the store nodes a spare-node provider starts to register.
    /// Default 30000 ms.
    pub spare_nodes_wait_ms: u64,
    /// How the gRPC links are authenticated: mutual TLS, the cluster secret, and the admin
    /// token admin calls need (see `causeway_proto::link`). Default: the open mode, on
    /// loopback only.
    pub security: Security,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data_dir: PathBuf::from("data/config-manager"),
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            command_queue_capacity: 1024,
            max_nodes: 4096,
            max_watchers: 1024,
            max_partitions: 1024,
            max_replicas: 9,
            max_addr_len: 255,
            http2_keepalive_interval_ms: 10_000,
            max_concurrent_requests_per_connection: 256,
            max_connections: 4096,
            veto_timeout_ms: 2000,
            spare_nodes_wait_ms: 30_000,
            security: Security::default(),
        }
    }
}

impl Options {
    /// Checks the settings for values that cannot work.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why| Err(Error::InvalidOptions(why));
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms must be positive");
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return bad("heartbeat_timeout_ms must exceed heartbeat_interval_ms");
        }
        if self.command_queue_capacity == 0 {
            return bad("command_queue_capacity must be positive");
        }
        if self.max_nodes == 0 || self.max_watchers == 0 {
            return bad("max_nodes and max_watchers must be positive");
        }
        if self.max_partitions == 0 || self.max_replicas == 0 {
            return bad("max_partitions and max_replicas must be positive");
        }
        if self.max_addr_len == 0 || self.max_concurrent_requests_per_connection == 0 {
            return bad("max_addr_len and max_concurrent_requests_per_connection must be positive");
        }
        if self.http2_keepalive_interval_ms == 0 {
            return bad("http2_keepalive_interval_ms must be positive");
        }
        if !(1..=causeway_proto::MAX_CONNECTIONS).contains(&self.max_connections) {
            return bad("max_connections must be between 1 and 1 048 576");
        }
        if self.veto_timeout_ms == 0 || self.spare_nodes_wait_ms == 0 {
            return bad("veto_timeout_ms and spare_nodes_wait_ms must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_the_defaults_and_unknown_fields_are_refused() {
        let o: Options = serde_json::from_str("{}").unwrap();
        assert_eq!(o, Options::default());
        o.validate().unwrap();
        assert!(serde_json::from_str::<Options>(r#"{"listen": "x"}"#).is_err());
        let o: Options = serde_json::from_str(r#"{"heartbeat_timeout_ms": 10}"#).unwrap();
        assert!(matches!(o.validate(), Err(Error::InvalidOptions(_))));
    }
}
