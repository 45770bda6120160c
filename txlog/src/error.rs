//! The errors of the transaction log, shared by both backends.

use std::path::PathBuf;

use causeway_core::Timestamp;

/// The cause of a Kafka failure: librdkafka's error, or nothing that can exist when the crate is
/// built without its Kafka backend.
#[cfg(feature = "kafka")]
pub type KafkaCause = rdkafka::error::KafkaError;
/// The cause of a Kafka failure: librdkafka's error, or nothing that can exist when the crate is
/// built without its Kafka backend.
#[cfg(not(feature = "kafka"))]
pub type KafkaCause = std::convert::Infallible;

/// What can go wrong with the transaction log.
///
/// `Display` describes this error only; the cause (an IO or librdkafka error) is its `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The log cannot be reached: the Kafka brokers do not answer within the configured timeouts.
    /// Retry later; the handle recovers by itself when the brokers come back.
    #[error("transaction log unavailable: {what}")]
    Unavailable {
        what: String,
        #[source]
        source: Option<KafkaCause>,
    },

    /// A record is larger than the log accepts (`max_record_bytes`). Nothing of the batch was
    /// appended.
    #[error("record of {size} bytes is larger than the log's limit of {max} bytes")]
    RecordTooLarge { size: usize, max: usize },

    /// A read wanted the records after `after`, but retention already dropped some of them: the
    /// oldest retained record has ts `first_available`. The reader cannot replay the log and must
    /// re-seed its state from elsewhere (store nodes: backfill from peers). Records are never
    /// skipped.
    #[error(
        "the log no longer holds the records after ts {after}: it starts at ts {first_available}"
    )]
    Truncated {
        after: Timestamp,
        first_available: Timestamp,
    },

    /// A read wanted the records after `position`, but the log ends before it (the next append
    /// gets `next`): the reader has applied records this log never had, so it is pointed at the
    /// wrong log (or the log lost data).
    #[error("position {position} is beyond the end of the log (next ts {next})")]
    BeyondEnd {
        position: Timestamp,
        next: Timestamp,
    },

    /// Stored data failed its checks (CRC, framing, continuity of offsets).
    #[error("transaction log corrupt: {what}")]
    Corrupt { what: String },

    /// The configuration cannot work (bad option values, a librdkafka property it rejects).
    #[error("invalid transaction log configuration: {what}")]
    Config { what: String },

    /// The Kafka topic exists with more than one partition: it cannot give a total order.
    #[error(
        "topic {topic:?} has {partitions} partitions; the transaction log needs exactly one \
         (create it with one partition or configure another topic)"
    )]
    TooManyPartitions { topic: String, partitions: usize },

    /// The log's topic does not exist and this handle may not create it (`create_topic` false),
    /// or the brokers did not learn of the one it created within the request timeout.
    #[error("topic {topic:?} does not exist on the brokers (a log with create_topic false does not create it)")]
    UnknownTopic { topic: String },

    /// A file operation of the embedded log failed.
    #[error("{op} {path:?} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// librdkafka reported an error that is not one of the above.
    #[error("kafka error during {op}")]
    Kafka {
        op: &'static str,
        #[source]
        source: KafkaCause,
    },

    /// The log was closed, or its writer stopped after an earlier failure.
    #[error("the transaction log is closed")]
    Closed,

    /// A transaction record in a format this build does not know.
    #[error("transaction record has format version {found}; this build reads version {supported}")]
    UnknownFormatVersion { found: u32, supported: u32 },

    /// A transaction record that is not a valid protobuf `Transaction`.
    #[error("transaction record does not decode")]
    Decode(#[source] prost::DecodeError),
}

impl Error {
    /// Whether retrying the same operation later may succeed (the log was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Error {
        Error::Corrupt { what: what.into() }
    }

    pub(crate) fn config(what: impl Into<String>) -> Error {
        Error::Config { what: what.into() }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
