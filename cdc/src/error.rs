//! [`Error`]: why the cdc service could not start or keep serving.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("cannot open the transaction log")]
    Log(#[source] causeway_txlog::Error),
    #[error("cannot reach the config manager")]
    ConfigManager(#[source] causeway_config_manager::Error),
    #[error("security settings")]
    Link(#[from] causeway_proto::link::LinkError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the feeds state in {path}: {why}")]
    State { path: String, why: String },
    #[error("serving the admin API failed")]
    Serve(#[source] std::io::Error),
}
