//! [`Error`]: why the api-server could not start or stopped. Errors of single requests are
//! [`crate::problem::Problem`]s, answered to the client.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the service failed to start or to keep serving.
///
/// `Display` describes this error only; the cause is its `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting that cannot work.
    #[error("invalid api-server options: {0}")]
    InvalidOptions(&'static str),

    /// The tokens file could not be read or is invalid.
    #[error("cannot load the tokens file {path:?}")]
    Tokens {
        path: PathBuf,
        #[source]
        source: crate::auth::TokensError,
    },

    /// The HTTPS certificate or key could not be loaded.
    #[error("cannot load the HTTPS certificate")]
    Tls(#[source] crate::tls::TlsError),

    /// The transaction log could not be opened.
    #[error("cannot open the transaction log")]
    Log(#[source] causeway_txlog::Error),

    /// The config manager address is not a valid endpoint.
    #[error("invalid config manager address")]
    ConfigManager(#[source] causeway_config_manager::Error),

    /// The gRPC security settings cannot be used.
    #[error("security settings")]
    Link(#[from] causeway_proto::link::LinkError),

    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The HTTP server failed while serving.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}
