//! The cdc service's settings, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_txlog::{EmbeddedOptions, LogOptions};
use serde::{Deserialize, Serialize};

use crate::feed::FeedSpec;

/// Settings of a cdc service, from JSON or code; `{}` is valid (an embedded log in `data/log`,
/// state in `data/cdc`, no feeds until the admin API creates some).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// The admin API and `/metrics`. Default `127.0.0.1:7500`.
    pub listen_addr: SocketAddr,
    /// The config manager (`host:port`). Default `127.0.0.1:7400`.
    pub config_manager_addr: String,
    /// The cluster's transaction log.
    pub log: LogOptions,
    /// Feeds created through the admin API and the webhook checkpoints. Default `data/cdc`.
    pub state_dir: PathBuf,
    /// Feeds of the configuration file. A feed of the same name in the state is replaced by
    /// this spec (its checkpoint stays).
    pub feeds: Vec<FeedSpec>,
    /// How often every feed emits `causeway.resolved`, even when idle. Default 1000 ms.
    pub resolved_interval_ms: u64,
    /// How long a feed whose checkpoint does not move holds the cluster's GC timestamp.
    /// Default 24 h.
    pub protect_max_age_ms: u64,
    /// How long the store nodes keep a feed's GC hold after this process went away (killed,
    /// crashed, restarting, upgraded): a feed back within it resumes from its checkpoint; later,
    /// it may find its history gone (`causeway.history_lost`). At most `protect_max_age_ms`.
    /// Default 10 min.
    pub hold_linger_ms: u64,
    /// The bearer token of the admin API; none: the admin API refuses every change (reads of
    /// `/v1/feeds` and `/metrics` stay open).
    pub admin_token: Option<String>,
    /// Store nodes tried per call.
    pub store_tries: usize,
    /// How this service's gRPC calls to the config manager and the store nodes are
    /// authenticated (mutual TLS with a `cdc` certificate, or the cluster secret); see
    /// `causeway_proto::link`. Default: the open mode.
    pub security: causeway_proto::link::Security,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 7500)),
            config_manager_addr: "127.0.0.1:7400".into(),
            log: LogOptions::Embedded(EmbeddedOptions {
                dir: PathBuf::from("data/log"),
                max_record_bytes: 1 << 20,
                segment_bytes: 64 << 20,
                retention_bytes: None,
                max_group_bytes: 4 << 20,
                append_queue: 1024,
                read_buffer_records: 1024,
            }),
            state_dir: PathBuf::from("data/cdc"),
            feeds: Vec::new(),
            resolved_interval_ms: 1000,
            protect_max_age_ms: 24 * 3600 * 1000,
            hold_linger_ms: 10 * 60 * 1000,
            admin_token: None,
            store_tries: 3,
            security: Default::default(),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |why: &str| Err(crate::Error::Options(why.to_owned()));
        if self.resolved_interval_ms == 0 || self.resolved_interval_ms > 3_600_000 {
            return bad("resolved_interval_ms is 1 to 3600000");
        }
        if self.protect_max_age_ms == 0 {
            return bad("protect_max_age_ms must be positive");
        }
        if self.store_tries == 0 {
            return bad("store_tries must be positive");
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return bad("admin_token has at least 16 bytes");
        }
        let mut names = std::collections::BTreeSet::new();
        for f in &self.feeds {
            f.selection()
                .map_err(|e| crate::Error::Options(e.to_string()))?;
            if !names.insert(&f.name) {
                return Err(crate::Error::Options(format!(
                    "feed {:?} is configured twice",
                    f.name
                )));
            }
        }
        Ok(())
    }
}
