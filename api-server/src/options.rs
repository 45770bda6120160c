//! The api-server's settings. Every limit and timeout lives here with its documented default.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_core::admission::AdmissionOptions;
use causeway_core::query::QueryLimits;
use causeway_core::KeyLimits;
use causeway_txlog::{EmbeddedOptions, LogOptions};
use serde::{Deserialize, Serialize};

pub use crate::changes::ChangesOptions;
use crate::error::Error;

/// Settings of an api-server, read from JSON or built in code. Every field has a default, so
/// `{}` is a valid configuration (an embedded log under `data/log`, no tokens: every `/v1`
/// request is refused with 401 until a tokens file is given).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Where the HTTP server listens. Default `127.0.0.1:7300`; port 0 picks a free port (read it
    /// back with [`crate::Service::local_addr`]).
    pub listen_addr: SocketAddr,
    /// The config manager (`host:port`), from which the store nodes and the configuration that
    /// routes reads are learnt. Default `127.0.0.1:7400`.
    pub config_manager_addr: String,
    /// The transaction log that writes go to. Default: the embedded log in `data/log`.
    pub log: LogOptions,
    /// The bearer tokens file (JSON, see [`crate::auth`]). Default none: no token is valid.
    pub tokens_file: Option<PathBuf>,
    /// How often the tokens file is read again, in ms: a file whose contents changed is loaded
    /// and replaces the tokens (rotation without a restart); a file that does not load keeps
    /// the tokens in use and logs an error. Default 2000.
    pub tokens_reload_ms: u64,
    /// HTTPS: when set, the API serves TLS only (HTTP/1.1 and HTTP/2 by ALPN). Default none:
    /// plain HTTP.
    pub https: Option<HttpsOptions>,
    /// Input limits.
    pub limits: Limits,
    /// Timeouts of reads and waits.
    pub timeouts: Timeouts,
    /// Admission control of writes (`causeway_core::admission`): past half of `max_lag_ms` of
    /// visibility lag, writes are admitted at the rate the cluster applies them; the rest wait
    /// up to `max_queue_ms`, then get 429 `throttled`.
    pub admission: AdmissionOptions,
    /// The server-sent events of committed changes (`/v1/changes`).
    pub changes: ChangesOptions,
    /// How the api-server's gRPC calls to the config manager and the store nodes are
    /// authenticated (mutual TLS with an `api-server` certificate, or the cluster secret); see
    /// `causeway_proto::link`. Default: the open mode.
    pub security: causeway_proto::link::Security,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 7300)),
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
            tokens_file: None,
            tokens_reload_ms: 2000,
            https: None,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            admission: AdmissionOptions::default(),
            changes: ChangesOptions::default(),
            security: Default::default(),
        }
    }
}

/// The certificate of the HTTPS API: PEM files, reloaded when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsOptions {
    /// The certificate chain, PEM: the server's certificate first, then its intermediates.
    pub cert_chain_file: PathBuf,
    /// The private key of the certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the two files are read again, in ms. Files whose contents changed are loaded
    /// and serve every new connection; files that do not load (or whose key does not match the
    /// certificate) keep the certificate in use and log an error. Default 5000.
    #[serde(default = "default_https_reload_ms")]
    pub reload_ms: u64,
}

fn default_https_reload_ms() -> u64 {
    5000
}

/// Limits on what a request may ask. Past one, the request gets its 4xx and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes, whether or not it has a `Content-Length`. Default 1 MiB.
    /// Larger: 413 `body_too_large`.
    pub max_body_bytes: usize,
    /// Largest document (or merge patch) as JSON text, in bytes. Default 256 KiB. Larger: 413
    /// `document_too_large`. A whole transaction must also fit the log's record limit.
    pub max_document_bytes: usize,
    /// Deepest nesting of arrays and objects in a request body, checked on the raw bytes before
    /// anything is parsed. Default 32, at most 128. Deeper: 400 `json_too_deep`.
    pub max_json_depth: usize,
    /// Collection names and document ids (lengths; the characters are fixed by `DocKey`).
    /// Defaults: 64 bytes of collection, 256 bytes of id.
    pub keys: KeyLimits,
    /// Most mutations in one `POST /v1/transactions`. Default 256.
    pub max_mutations_per_transaction: usize,
    /// Most keys in one multi-get. Default 256.
    pub max_keys_per_get: usize,
    /// Most requests served at once; more get 503 `overloaded` at once. A request takes its
    /// place only once its body has been read, so clients that send their bodies slowly hold
    /// none. Default 1024.
    pub max_concurrent_requests: usize,
    /// Most connections open at once (TCP, with or without TLS). A connection past it waits
    /// in the listen backlog, not accepted, until one closes. Default 4096.
    pub max_connections: usize,
    /// Bytes of request bodies held in memory at once, over every connection and stream: a
    /// body reserves its `Content-Length` (`max_body_bytes` without one) before it is read, and
    /// keeps it until its response. A body that finds no room gets 503 `overloaded` with
    /// `Retry-After` and its connection closes. Default 256 MiB; at least `max_body_bytes`.
    pub max_buffered_body_bytes: usize,
    /// Requests per second each token may send (a token bucket per token name, refilled at
    /// this rate); past it a request gets 429 `rate_limited` with `Retry-After`. Default 0:
    /// no rate limit.
    pub token_requests_per_s: u32,
    /// How many requests a token may send at once above its rate (the bucket's size). Default
    /// 0: as many as one second of the rate.
    pub token_burst: u32,
    /// Largest answer the api-server takes from a store node, in bytes (a query page of
    /// `max_query_limit` documents of up to `max_document_bytes` each must fit). Default 64 MiB.
    pub max_store_message_bytes: usize,
    /// Largest page of a query (its `limit`, and the default when it gives none). Default 1000.
    pub max_query_limit: u32,
    /// Most documents a query page may examine over all partitions; past it the page is partial
    /// and carries a cursor. Default 10000.
    pub max_query_scanned: u32,
    /// The size of query filters.
    pub query: QueryLimits,
    /// Longest `Idempotency-Key` header, in bytes. Default 128.
    #[serde(alias = "max_request_id_bytes")]
    pub max_idempotency_key_bytes: usize,
    /// Most conditions in one transaction. Default 256.
    pub max_conditions_per_transaction: usize,
    /// How long, in the records' wall clock, a committed `Idempotency-Key` makes a retry a
    /// duplicate (written into every record, so every store node applies the same). Default
    /// 24 h. Keys are also forgotten 10,000,000 log records after their transaction.
    pub idempotency_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_document_bytes: 256 << 10,
            max_json_depth: 32,
            keys: KeyLimits::default(),
            max_mutations_per_transaction: 256,
            max_keys_per_get: 256,
            max_concurrent_requests: 1024,
            max_connections: 4096,
            max_buffered_body_bytes: 256 << 20,
            token_requests_per_s: 0,
            token_burst: 0,
            max_store_message_bytes: 64 << 20,
            max_query_limit: 1000,
            max_query_scanned: 10_000,
            query: QueryLimits::default(),
            max_idempotency_key_bytes: 128,
            max_conditions_per_transaction: 256,
            idempotency_window_ms: 24 * 3600 * 1000,
        }
    }
}

/// Timeouts. Every wait of a request is bounded by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// How long a read waits for the UST to reach a `Causeway-After` token before answering 503
    /// with `Retry-After`. Default 5000 ms.
    pub causal_wait_ms: u32,
    /// How long `?wait=visible` waits for the UST to reach a write's ts. Default 10000 ms.
    pub visible_wait_ms: u32,
    /// Deadline of one store-node call (on top of any causal wait). Default 10000 ms.
    pub store_rpc_ms: u64,
    /// How many store nodes a read tries before giving up (503). Default 3.
    pub store_tries: usize,
    /// A read whose store node has answered nothing (to it or any other call) for this long
    /// is sent to another store node too, the first answer winning: a frozen node (SIGSTOP, a
    /// VM pause) fails nothing, it only stops answering. Default 50 ms; 0 = never hedge.
    pub store_hedge_ms: u64,
    /// Deadline of one log append. Default 10000 ms.
    pub append_ms: u64,
    /// The `Retry-After` of a 503, in seconds. Default 1.
    pub retry_after_s: u32,
    /// How long a graceful shutdown waits for in-flight requests. Default 10000 ms.
    pub shutdown_grace_ms: u64,
    /// How long a request head (HTTP/1) may take to arrive, from the first moment the server
    /// waits for it: a connection that sends no complete head for this long is closed, whether
    /// it trickles one or sits idle between requests. It also bounds a TLS handshake.
    /// Default 10000 ms.
    pub header_read_ms: u64,
    /// How long a request body may take to arrive, whole; past it the request gets 408
    /// `request_timeout` and the connection is closed. Default 10000 ms.
    pub body_read_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            causal_wait_ms: 5000,
            visible_wait_ms: 10_000,
            store_rpc_ms: 10_000,
            store_tries: 3,
            store_hedge_ms: 50,
            append_ms: 10_000,
            retry_after_s: 1,
            shutdown_grace_ms: 10_000,
            header_read_ms: 10_000,
            body_read_ms: 10_000,
        }
    }
}

impl Options {
    /// Checks the settings for values that cannot work.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: &'static str| Err(Error::InvalidOptions(why));
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_document_bytes == 0 {
            return bad("max_body_bytes and max_document_bytes must be positive");
        }
        if l.max_body_bytes > u32::MAX as usize {
            return bad("max_body_bytes must be at most 4 GiB");
        }
        if l.max_buffered_body_bytes < l.max_body_bytes {
            return bad("max_buffered_body_bytes must be at least max_body_bytes");
        }
        if l.max_json_depth == 0 || l.max_json_depth > 128 {
            return bad("max_json_depth must be between 1 and 128");
        }
        if l.max_mutations_per_transaction == 0 || l.max_keys_per_get == 0 {
            return bad("max_mutations_per_transaction and max_keys_per_get must be positive");
        }
        if l.max_concurrent_requests == 0 || l.max_connections == 0 {
            return bad("max_concurrent_requests and max_connections must be positive");
        }
        if l.max_store_message_bytes < 4 << 20 {
            return bad("max_store_message_bytes must be at least 4 MiB");
        }
        let t = &self.timeouts;
        if t.header_read_ms == 0 || t.body_read_ms == 0 {
            return bad("header_read_ms and body_read_ms must be positive");
        }
        if self.tokens_reload_ms == 0 {
            return bad("tokens_reload_ms must be positive");
        }
        if self.https.as_ref().is_some_and(|h| h.reload_ms == 0) {
            return bad("https.reload_ms must be positive");
        }
        if l.max_query_limit == 0 || l.max_query_scanned == 0 {
            return bad("max_query_limit and max_query_scanned must be positive");
        }
        if l.keys.max_id_bytes == 0 || l.keys.max_collection_bytes == 0 {
            return bad("key limits must be positive");
        }
        // The store nodes apply keys, ids and collections within the record format's limits.
        let format = causeway_core::KeyLimits::default();
        if l.keys.max_id_bytes > format.max_id_bytes
            || l.keys.max_collection_bytes > format.max_collection_bytes
        {
            return bad("key limits cannot exceed the record format's (the defaults)");
        }
        if l.max_idempotency_key_bytes == 0 || l.max_idempotency_key_bytes > 256 {
            return bad("max_idempotency_key_bytes must be between 1 and 256");
        }
        if l.idempotency_window_ms == 0 {
            return bad("idempotency_window_ms must be positive");
        }
        if self.timeouts.store_tries == 0 {
            return bad("store_tries must be positive");
        }
        if let Some(why) = self.admission.problem() {
            return bad(why);
        }
        if let Some(why) = self.changes.problem() {
            return bad(why);
        }
        if self.config_manager_addr.is_empty() {
            return bad("config_manager_addr must be set");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_admission_settings_that_cannot_work_are_refused() {
        assert!(Options::default().validate().is_ok());
        for admission in [
            AdmissionOptions {
                max_lag_ms: 1,
                ..AdmissionOptions::default()
            },
            AdmissionOptions {
                rate_window_ms: 0,
                ..AdmissionOptions::default()
            },
            AdmissionOptions {
                sample_ms: 0,
                ..AdmissionOptions::default()
            },
            AdmissionOptions {
                sample_ms: 500,
                max_lag_ms: 500,
                ..AdmissionOptions::default()
            },
        ] {
            let options = Options {
                admission,
                ..Options::default()
            };
            assert!(
                matches!(options.validate(), Err(Error::InvalidOptions(_))),
                "{admission:?} was accepted"
            );
        }
    }
}
