//! Every way a config-manager call, the service, or the client can fail.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_core::{ConfigError, Epoch, NodeId};

use crate::peers::{SpareNodesError, VetoAnswer};

/// Errors of the config manager, its [`crate::Handle`] and its [`crate::Client`].
///
/// The gRPC server turns each into a `tonic::Status` (see [`Error::code`]); the client turns a
/// `Status` back into [`Error::Rpc`], whose [`Error::code`] is the server's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
    #[error("cannot read or write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file {} is corrupt (refusing to start; restore it from a backup)", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: Corruption,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("security settings: {0}")]
    Link(#[from] causeway_proto::link::LinkError),
    #[error("the config manager has stopped")]
    Stopped,

    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
    #[error("the cluster is already bootstrapped (current epoch {0})")]
    AlreadyBootstrapped(Epoch),
    #[error("a transition to epoch {0} is already running")]
    TransitionRunning(Epoch),
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    #[error("node {0} is registered but not live")]
    NodeNotLive(NodeId),
    #[error("node {node} is at incarnation {current}, not {given}")]
    StaleIncarnation {
        node: NodeId,
        given: u64,
        current: u64,
    },
    #[error("node {node} is in the configuration at {configured}, not at {given}")]
    AddressConflict {
        node: NodeId,
        configured: String,
        given: String,
    },
    #[error("invalid node address {0:?} (expected host:port)")]
    InvalidAddr(String),
    #[error("{0} nodes are registered, the limit")]
    TooManyNodes(usize),
    #[error("{0} watchers are open, the limit")]
    TooManyWatchers(usize),
    #[error(
        "the shape {partitions} x {replicas} exceeds the limit {max_partitions} x {max_replicas}"
    )]
    ShapeTooLarge {
        partitions: u32,
        replicas: u32,
        max_partitions: u32,
        max_replicas: u32,
    },
    #[error("cannot complete the transition to epoch {requested}: the current epoch is {current}, the next is {}", .next.map_or_else(|| "none".to_string(), |e| e.to_string()))]
    EpochMismatch {
        requested: Epoch,
        current: Epoch,
        next: Option<Epoch>,
    },
    #[error("no transition is running (current epoch {current}): there is nothing to abort")]
    NoTransition { current: Epoch },
    #[error("cannot abort the transition to epoch {requested}: the transition running is to epoch {next}")]
    AbortMismatch { requested: Epoch, next: Epoch },
    #[error("the transition to epoch {0} changed while its nodes were asked (a node marked failed, or a new proposal); nothing was aborted: run the abort again")]
    TransitionChanged(Epoch),
    /// No node of next vetoed the abort; `answers` says what each node asked answered.
    #[error("{}", no_veto_message(.epoch, .answers))]
    NoVeto {
        epoch: Epoch,
        answers: Vec<(NodeId, VetoAnswer)>,
    },
    #[error("no registered live node is free to replace node {0}: start another store node")]
    NoFreeNode(NodeId),
    #[error("cannot start spare store nodes")]
    SpareNodes(#[source] SpareNodesError),
    #[error(
        "{wanted} spare nodes are needed but only {registered} registered within {waited_ms} ms"
    )]
    SpareNodesTimeout {
        wanted: usize,
        registered: usize,
        waited_ms: u64,
    },
    /// A configuration cannot be computed (too few nodes, an empty shape, an unknown node...).
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("invalid config manager address {0:?}")]
    InvalidEndpoint(String),
    #[error("cannot connect to the config manager at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the config manager answered {}: {}", .0.code(), .0.message())]
    Rpc(Box<tonic::Status>),
    #[error("the config manager sent a configuration that does not parse")]
    BadConfigJson(#[source] serde_json::Error),
}

/// What is wrong with a state file.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    #[error("it is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    #[error("format version {0} is unknown to this build")]
    UnknownFormat(u32),
    #[error("its current configuration is invalid")]
    InvalidCurrent(#[source] ConfigError),
    #[error("its next configuration cannot follow the current one")]
    InvalidNext(#[source] ConfigError),
    #[error("it has a next configuration but no current one")]
    NextWithoutCurrent,
    #[error("its history disagrees with its configuration of epoch {0}")]
    HistoryMismatch(Epoch),
    #[error("its history revisions are not rising or exceed the state's revision")]
    RevisionOrder,
}

impl Error {
    /// The gRPC code this error is served with (or, for [`Error::Rpc`], was received with).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Rpc(status) => status.code(),
            Error::NotBootstrapped
            | Error::AlreadyBootstrapped(_)
            | Error::TransitionRunning(_)
            | Error::NodeNotLive(_)
            | Error::StaleIncarnation { .. }
            | Error::AddressConflict { .. }
            | Error::NoTransition { .. }
            | Error::NoVeto { .. }
            | Error::NoFreeNode(_)
            | Error::SpareNodesTimeout { .. } => Code::FailedPrecondition,
            Error::UnknownNode(_) => Code::NotFound,
            Error::InvalidAddr(_) | Error::ShapeTooLarge { .. } | Error::InvalidEndpoint(_) => {
                Code::InvalidArgument
            }
            Error::TooManyNodes(_) | Error::TooManyWatchers(_) => Code::ResourceExhausted,
            Error::EpochMismatch { .. }
            | Error::AbortMismatch { .. }
            | Error::TransitionChanged(_) => Code::Aborted,
            Error::Config(e) => match e {
                ConfigError::EmptyShape { .. } => Code::InvalidArgument,
                ConfigError::NotEnoughNodes { .. } | ConfigError::NodeInUse(_) => {
                    Code::FailedPrecondition
                }
                ConfigError::UnknownNode(_) => Code::NotFound,
                _ => Code::Internal,
            },
            Error::Stopped | Error::Connect { .. } | Error::SpareNodes(_) => Code::Unavailable,
            Error::InvalidOptions(_)
            | Error::Io { .. }
            | Error::Corrupt { .. }
            | Error::Bind { .. }
            | Error::Serve(_)
            | Error::Link(_)
            | Error::BadConfigJson(_) => Code::Internal,
        }
    }

    /// The message with its chain of causes, `a: b: c`, for logs and gRPC statuses.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}

/// Why an abort found no veto: every node asked has backfilled (or none gains anything, so every
/// node of next counts as backfilled), or some could not be heard.
fn no_veto_message(epoch: &Epoch, answers: &[(NodeId, VetoAnswer)]) -> String {
    if answers.iter().all(|(_, a)| *a == VetoAnswer::Backfilled) {
        return "every node of the next configuration has backfilled: routing may have switched; \
                the transition cannot be aborted"
            .to_string();
    }
    let each: Vec<String> = answers.iter().map(|(n, a)| format!("{n} {a}")).collect();
    format!(
        "no node of the next configuration (epoch {epoch}) vetoed its backfill, so the transition \
         cannot be aborted safely (retry once the nodes answer): {}",
        each.join("; ")
    )
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rpc(Box::new(status))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Rpc(status) => *status,
            e => tonic::Status::new(e.code(), e.chain()),
        }
    }
}
