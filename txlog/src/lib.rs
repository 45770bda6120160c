//! The transaction log of Causeway: one totally ordered log of records whose positions are the
//! transaction timestamps (`ts` = log offset + 1, `Timestamp::ZERO` = the empty log; DESIGN.md §1
//! and §4). Writers [`TxLog::append`] batches and get the timestamps once the records are durable;
//! store nodes [`TxLog::read_from`] their applied position and tail the log forever through a
//! bounded stream. Two backends share these semantics and one conformance suite
//! (`tests/conformance.rs`): Kafka (a single-partition topic, for clusters) and an embedded log of
//! local segment files (for `causeway dev` and fast tests).
//!
//! # Layout
//! - [`error`]: [`Error`], the typed failures both backends report (unavailable, record too large,
//!   truncated by retention, corrupt, ...).
//! - [`codec`]: encode and decode the `causeway.v1.Transaction` record, refusing unknown formats.
//! - [`embedded`]: [`EmbeddedLog`], CRC-framed segment files with group fsync, torn-tail recovery
//!   and size-based retention.
//! - [`kafka`] (feature `kafka`, on by default): [`KafkaLog`], rdkafka with an idempotent
//!   `acks=all` producer and consumers assigned to partition 0 at an explicit offset.
//! - `testing` (feature `testing`): `Broker`, Apache Kafka (KRaft, one node or a replicated
//!   three) on loopback ports with its own temp dir, for tests and benchmarks.
//!
//! This file holds the seam itself: [`Record`], [`Bounds`], [`LogOptions`], [`TxLog`] and
//! [`RecordStream`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};

pub use causeway_core::Timestamp;

pub mod codec;
pub mod embedded;
pub mod error;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "testing")]
pub mod testing;

pub use embedded::{EmbeddedLog, EmbeddedOptions};
pub use error::{Error, Result};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaLog, KafkaOptions};

/// One record of the log: its position and its payload (an encoded `Transaction`, see [`codec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ts: Timestamp,
    pub payload: Bytes,
}

/// The retained range of the log.
///
/// The log holds the records with `first <= ts < next`; it is empty when `first == next`.
/// Timestamps in that range need not be dense on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// The timestamp of the oldest retained record (or `next` when nothing is retained).
    /// Reading from a position `c` needs `c + 1 >= first`.
    pub first: Timestamp,
    /// The timestamp the next append would get: one past the newest durable record.
    pub next: Timestamp,
}

impl Bounds {
    /// Whether a reader that has applied everything up to `position` can continue from this log.
    pub fn can_read_from(&self, position: Timestamp) -> bool {
        position.get() + 1 >= self.first.get() && position <= self.next
    }
}

/// Which log to open, and how. Serialised with a `backend` tag:
///
/// ```
/// # use causeway_txlog::LogOptions;
/// let opts: LogOptions =
///     serde_json::from_str(r#"{"backend": "embedded", "dir": "/var/lib/causeway/log"}"#).unwrap();
/// assert!(matches!(opts, LogOptions::Embedded(_)));
/// let opts: LogOptions = serde_json::from_str(
///     r#"{"backend": "kafka", "bootstrap_servers": "k1:9092", "topic": "causeway-tx",
///         "properties": {"security.protocol": "ssl"}}"#,
/// ).unwrap();
/// assert!(matches!(opts, LogOptions::Kafka(_)));
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum LogOptions {
    Embedded(EmbeddedOptions),
    #[cfg(feature = "kafka")]
    Kafka(KafkaOptions),
}

/// A transaction log on either backend, with the same methods and semantics.
#[derive(Debug, Clone)]
pub enum TxLog {
    Embedded(EmbeddedLog),
    #[cfg(feature = "kafka")]
    Kafka(KafkaLog),
}

impl TxLog {
    /// Opens (creating it if needed) the log the options describe.
    pub async fn open(options: LogOptions) -> Result<TxLog> {
        Ok(match options {
            LogOptions::Embedded(o) => TxLog::Embedded(EmbeddedLog::open(o).await?),
            #[cfg(feature = "kafka")]
            LogOptions::Kafka(o) => TxLog::Kafka(KafkaLog::open(o).await?),
        })
    }

    /// Appends `records` and returns their timestamps, in order, once they are durable.
    ///
    /// The records of one call get increasing timestamps but are not atomic: records of other
    /// concurrent calls may come between them, and on an error some of them may have been
    /// appended (their timestamps are then unknown to the caller). A record larger than
    /// [`TxLog::max_record_bytes`] fails the whole call with [`Error::RecordTooLarge`] before anything
    /// is written.
    pub async fn append(&self, records: Vec<Bytes>) -> Result<Vec<Timestamp>> {
        match self {
            TxLog::Embedded(log) => log.append(records).await,
            #[cfg(feature = "kafka")]
            TxLog::Kafka(log) => log.append(records).await,
        }
    }

    /// Every record with `ts > position`, in order, then the new ones as they are appended, forever.
    ///
    /// The stream buffers a bounded number of records: a slow consumer slows the reader, never
    /// grows a queue. An `Err` item is the last one: [`Error::Truncated`] when retention dropped
    /// records after `position`, [`Error::BeyondEnd`] when `position` is past the end of the log,
    /// [`Error::Unavailable`] when the log cannot be reached for a while, [`Error::Corrupt`]. After an
    /// error, open a new stream from the last applied position.
    pub fn read_from(&self, position: Timestamp) -> RecordStream {
        match self {
            TxLog::Embedded(log) => RecordStream::Embedded(log.read_from(position)),
            #[cfg(feature = "kafka")]
            TxLog::Kafka(log) => RecordStream::Kafka(log.read_from(position)),
        }
    }

    /// The retained range of the log.
    pub async fn bounds(&self) -> Result<Bounds> {
        match self {
            TxLog::Embedded(log) => log.bounds().await,
            #[cfg(feature = "kafka")]
            TxLog::Kafka(log) => log.bounds().await,
        }
    }

    /// The largest payload [`TxLog::append`] accepts.
    pub fn max_record_bytes(&self) -> usize {
        match self {
            TxLog::Embedded(log) => log.max_record_bytes(),
            #[cfg(feature = "kafka")]
            TxLog::Kafka(log) => log.max_record_bytes(),
        }
    }

    /// Flushes and stops this handle's background work (the embedded writer, the Kafka producer),
    /// waiting a bounded time. Other clones of the handle fail with [`Error::Closed`] afterwards.
    pub async fn close(&self) -> Result<()> {
        match self {
            TxLog::Embedded(log) => log.close().await,
            #[cfg(feature = "kafka")]
            TxLog::Kafka(log) => log.close().await,
        }
    }
}

/// The stream [`TxLog::read_from`] returns.
#[derive(Debug)]
pub enum RecordStream {
    Embedded(embedded::Reader),
    #[cfg(feature = "kafka")]
    Kafka(kafka::Reader),
}

impl Stream for RecordStream {
    type Item = Result<Record>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            RecordStream::Embedded(r) => Pin::new(r).poll_next(cx),
            #[cfg(feature = "kafka")]
            RecordStream::Kafka(r) => Pin::new(r).poll_next(cx),
        }
    }
}

/// The bounded channel between a reader task and its stream. The task ends when the stream is
/// dropped (the send fails), so an abandoned stream leaks nothing.
#[derive(Debug)]
pub(crate) struct ChannelStream {
    rx: tokio::sync::mpsc::Receiver<Result<Record>>,
    done: bool,
}

impl ChannelStream {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Result<Record>>) -> ChannelStream {
        ChannelStream { rx, done: false }
    }
}

impl Stream for ChannelStream {
    type Item = Result<Record>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Err(e))) => {
                // An error is the last item, whatever the reader task does afterwards.
                self.done = true;
                self.rx.close();
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}
