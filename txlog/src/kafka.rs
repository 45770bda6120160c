//! The Kafka backend: the transaction log as partition 0 of a single-partition topic (rdkafka).
//!
//! - Appends go through one idempotent producer (`enable.idempotence=true`, `acks=all`, a small
//!   `linger.ms`, compression). The records of a call are enqueued in order, then their delivery
//!   reports awaited: a record's ts is its offset + 1, known only once every in-sync replica has
//!   it. A producer that hits a fatal error (the idempotence guarantees broken) is replaced.
//! - Each reader is its own consumer, `assign()`ed to partition 0 at an explicit offset: no consumer
//!   group, no rebalancing, no committed offsets (the store nodes keep their applied position in
//!   their own storage). `isolation.level=read_committed`, `auto.offset.reset=error`, so a position
//!   that retention removed is reported ([`Error::Truncated`]), never silently skipped.
//! - Open creates the topic through the admin client (one partition, the configured replication
//!   factor and `min.insync.replicas`) and refuses an existing topic with more partitions.
//! - Every broker round trip has a bounded timeout and maps to [`Error::Unavailable`] when the
//!   brokers do not answer; librdkafka reconnects by itself, so the same handle works again once
//!   they are back.
//! - Dropping a librdkafka consumer can block for seconds (rust-rdkafka issues 509 and 611), so
//!   readers drop theirs on the blocking pool; [`KafkaLog::close`] waits for those with a deadline.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_core::Timestamp;
use futures::Stream;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::{Bounds, ChannelStream, Record};

/// Options of the Kafka backend. `bootstrap_servers` and `topic` are required; the other fields
/// have the defaults below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaOptions {
    /// `host:port[,host:port...]` of the brokers.
    pub bootstrap_servers: String,
    /// The topic of the log. It must have exactly one partition.
    pub topic: String,
    /// Create the topic if it does not exist. Default true.
    #[serde(default = "defaults::yes")]
    pub create_topic: bool,
    /// Replication factor of a topic this creates. Default 3 (production; tests use 1).
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of a topic this creates. Default 2: with `acks=all` an acknowledged
    /// append is on at least two brokers.
    #[serde(default = "defaults::min_insync_replicas")]
    pub min_insync_replicas: i32,
    /// More topic configuration for a topic this creates (`retention.ms`, `retention.bytes`, ...).
    /// `min.insync.replicas` and `unclean.leader.election.enable=false` are always set.
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    /// librdkafka properties for every client, applied last so they override the settings this
    /// backend makes (TLS: `security.protocol`, `ssl.*`; SASL: `sasl.*`; timeouts; ...). Do not
    /// override `enable.idempotence`, `acks` or `isolation.level`: the log's guarantees rest on them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// The largest record payload accepted. Default 1 MiB, which fits the brokers' default
    /// `message.max.bytes` with room for the batch overhead.
    #[serde(default = "defaults::max_record_bytes")]
    pub max_record_bytes: usize,
    /// Producer `linger.ms`: how long appends wait to be batched. Default 2.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Producer `compression.type`. Default `lz4`.
    #[serde(default = "defaults::compression")]
    pub compression: String,
    /// Timeout of metadata, admin and watermark requests. Default 10 000.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// An append fails with [`Error::Unavailable`] when its records are not acknowledged within
    /// this time (producer `message.timeout.ms`). Default 30 000.
    #[serde(default = "defaults::delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// A reader reports [`Error::Unavailable`] after the brokers have been unreachable this long.
    /// Default 30 000.
    #[serde(default = "defaults::unavailable_after_ms")]
    pub unavailable_after_ms: u64,
    /// Records buffered per reader between its task and its stream. Default 1024.
    #[serde(default = "defaults::read_buffer_records")]
    pub read_buffer_records: usize,
    /// librdkafka's prefetch buffer per reader (`queued.max.messages.kbytes`). Default 16 384.
    #[serde(default = "defaults::read_prefetch_kbytes")]
    pub read_prefetch_kbytes: u64,
    /// The longest a reader's fetch waits at the broker for new records (`fetch.wait.max.ms`).
    /// Default 100. Kafka answers a waiting fetch as soon as a record is committed
    /// (`fetch.min.bytes` 1), so this bounds only how often an idle reader asks again (10 times
    /// a second), not how soon it sees an append (BENCHMARKS.md: append → tail reader latency).
    #[serde(default = "defaults::fetch_wait_max_ms")]
    pub fetch_wait_max_ms: u64,
}

mod defaults {
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn replication_factor() -> i32 {
        3
    }
    pub(super) fn min_insync_replicas() -> i32 {
        2
    }
    pub(super) fn max_record_bytes() -> usize {
        1 << 20
    }
    pub(super) fn linger_ms() -> u64 {
        2
    }
    pub(super) fn compression() -> String {
        "lz4".into()
    }
    pub(super) fn request_timeout_ms() -> u64 {
        10_000
    }
    pub(super) fn delivery_timeout_ms() -> u64 {
        30_000
    }
    pub(super) fn unavailable_after_ms() -> u64 {
        30_000
    }
    pub(super) fn read_buffer_records() -> usize {
        1024
    }
    pub(super) fn read_prefetch_kbytes() -> u64 {
        16 * 1024
    }
    pub(super) fn fetch_wait_max_ms() -> u64 {
        100
    }
}

impl KafkaOptions {
    /// The defaults, for `topic` on `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>, topic: impl Into<String>) -> KafkaOptions {
        KafkaOptions {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            create_topic: true,
            replication_factor: defaults::replication_factor(),
            min_insync_replicas: defaults::min_insync_replicas(),
            topic_config: BTreeMap::new(),
            properties: BTreeMap::new(),
            max_record_bytes: defaults::max_record_bytes(),
            linger_ms: defaults::linger_ms(),
            compression: defaults::compression(),
            request_timeout_ms: defaults::request_timeout_ms(),
            delivery_timeout_ms: defaults::delivery_timeout_ms(),
            unavailable_after_ms: defaults::unavailable_after_ms(),
            read_buffer_records: defaults::read_buffer_records(),
            read_prefetch_kbytes: defaults::read_prefetch_kbytes(),
            fetch_wait_max_ms: defaults::fetch_wait_max_ms(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() || self.topic.trim().is_empty() {
            return Err(Error::config(
                "bootstrap_servers and topic must not be empty",
            ));
        }
        if self.replication_factor < 1
            || self.min_insync_replicas < 1
            || self.min_insync_replicas > self.replication_factor
        {
            return Err(Error::config(
                "need 1 <= min_insync_replicas <= replication_factor",
            ));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > 512 << 20 {
            return Err(Error::config("max_record_bytes must be in 1..=512 MiB"));
        }
        if self.read_buffer_records == 0 || self.request_timeout_ms == 0 {
            return Err(Error::config(
                "read_buffer_records and request_timeout_ms must be positive",
            ));
        }
        Ok(())
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    fn client_config(&self, extra: &[(&str, String)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            // Come back quickly after a broker restart.
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "4");
        for (k, v) in extra {
            config.set(*k, v);
        }
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    fn producer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", self.linger_ms.to_string()),
            ("compression.type", self.compression.clone()),
            // Room for the record batch overhead around the largest record.
            (
                "message.max.bytes",
                (self.max_record_bytes + 4096).to_string(),
            ),
            ("message.timeout.ms", self.delivery_timeout_ms.to_string()),
        ])
    }

    fn consumer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("isolation.level", "read_committed".into()),
            ("auto.offset.reset", "error".into()),
            ("enable.partition.eof", "false".into()),
            (
                "fetch.max.bytes",
                (self.max_record_bytes + 4096).max(52_428_800).to_string(),
            ),
            (
                "queued.max.messages.kbytes",
                self.read_prefetch_kbytes.to_string(),
            ),
            ("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string()),
            // Answer a fetch with the first committed record.
            ("fetch.min.bytes", "1".into()),
        ])
    }
}

/// A handle to the log on Kafka. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("bootstrap_servers", &self.inner.options.bootstrap_servers)
            .field("topic", &self.inner.options.topic)
            .finish_non_exhaustive()
    }
}

struct Inner {
    options: KafkaOptions,
    /// Replaced when librdkafka reports a fatal producer error.
    producer: RwLock<Arc<FutureProducer>>,
    /// A group-less consumer used only for metadata and watermarks.
    meta: Arc<BaseConsumer>,
    /// Consumers being dropped on the blocking pool.
    drops: Mutex<Vec<JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
}

/// Whether an error code means "the brokers did not answer" rather than "they said no".
fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | Resolve
            | MessageTimedOut
            | AllBrokersDown
            | OperationTimedOut
            | RequestTimedOut
            | BrokerNotAvailable
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NetworkException
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | PreferredLeaderNotAvailable
            | NotCoordinator
            | CoordinatorNotAvailable
            | TimedOutQueue
    )
}

/// Whether an error means the partition's leader moved (or is being elected): worth asking again.
fn is_leader_change(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            NotLeaderForPartition
                | LeaderNotAvailable
                | NotCoordinator
                | FencedLeaderEpoch
                | UnknownLeaderEpoch
        )
    )
}

fn classify(op: &'static str, e: KafkaError) -> Error {
    let code = match &e {
        // rdkafka does not expose the code of a failed admin request.
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    };
    match code {
        Some(code) if is_unavailable(code) => Error::Unavailable {
            what: format!("{op}: {code}"),
            source: Some(e),
        },
        _ => Error::Kafka { op, source: e },
    }
}

impl KafkaLog {
    /// Connects, creates the topic if configured to, and checks it has one partition.
    pub async fn open(options: KafkaOptions) -> Result<KafkaLog> {
        options.validate()?;
        let producer: FutureProducer = options
            .producer_config()
            .create()
            .map_err(|e| Error::config(format!("producer configuration rejected: {e}")))?;
        let meta: BaseConsumer = options
            .consumer_config()
            .create()
            .map_err(|e| Error::config(format!("consumer configuration rejected: {e}")))?;
        let log = KafkaLog {
            inner: Arc::new(Inner {
                options,
                producer: RwLock::new(Arc::new(producer)),
                meta: Arc::new(meta),
                drops: Mutex::new(Vec::new()),
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        if log.inner.options.create_topic {
            log.create_topic().await?;
            // A broker learns of a topic from the controller's metadata log after the
            // controller answered the create: wait for it there, within the request timeout.
            let deadline = Instant::now() + log.inner.options.request_timeout();
            loop {
                match log.check_topic().await {
                    Err(Error::UnknownTopic { .. } | Error::Unavailable { .. })
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    other => break other?,
                }
            }
        } else {
            log.check_topic().await?;
        }
        info!(
            bootstrap_servers = %log.inner.options.bootstrap_servers,
            topic = %log.inner.options.topic,
            "opened kafka transaction log"
        );
        Ok(log)
    }

    async fn create_topic(&self) -> Result<()> {
        let o = &self.inner.options;
        let admin: AdminClient<DefaultClientContext> = o
            .client_config(&[])
            .create()
            .map_err(|e| Error::config(format!("admin client configuration rejected: {e}")))?;
        let min_isr = o.min_insync_replicas.to_string();
        let mut topic = NewTopic::new(&o.topic, 1, TopicReplication::Fixed(o.replication_factor))
            .set("min.insync.replicas", &min_isr)
            .set("unclean.leader.election.enable", "false");
        for (k, v) in &o.topic_config {
            topic = topic.set(k, v);
        }
        let opts = AdminOptions::new()
            .request_timeout(Some(o.request_timeout()))
            .operation_timeout(Some(o.request_timeout()));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| classify("create topic", e))?;
        // The admin client's threads stop on drop; keep that off the runtime too.
        tokio::task::spawn_blocking(move || drop(admin));
        for result in results {
            match result {
                Ok(name) => {
                    info!(topic = %name, partitions = 1, replication_factor = o.replication_factor, "created the log topic")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    debug!(topic = %o.topic, "log topic exists")
                }
                Err((_, code)) if is_unavailable(code) => {
                    return Err(Error::Unavailable {
                        what: format!("create topic {}: {code}", o.topic),
                        source: None,
                    })
                }
                Err((_, code)) => {
                    return Err(Error::Kafka {
                        op: "create topic",
                        source: KafkaError::AdminOp(code),
                    })
                }
            }
        }
        Ok(())
    }

    async fn check_topic(&self) -> Result<()> {
        let inner = self.inner.clone();
        let partitions = tokio::task::spawn_blocking(move || {
            let o = &inner.options;
            let md = inner
                .meta
                .fetch_metadata(Some(&o.topic), o.request_timeout())
                .map_err(|e| classify("fetch metadata", e))?;
            let topic = md
                .topics()
                .iter()
                .find(|t| t.name() == o.topic)
                .ok_or_else(|| Error::UnknownTopic {
                    topic: o.topic.clone(),
                })?;
            if let Some(e) = topic.error() {
                let code = RDKafkaErrorCode::from(e);
                return Err(if is_unavailable(code) {
                    Error::Unavailable {
                        what: format!("topic {} metadata: {code}", o.topic),
                        source: None,
                    }
                } else if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                    Error::UnknownTopic {
                        topic: o.topic.clone(),
                    }
                } else {
                    Error::Kafka {
                        op: "topic metadata",
                        source: KafkaError::MetadataFetch(code),
                    }
                });
            }
            Ok(topic.partitions().len())
        })
        .await
        .expect("metadata fetch panicked")?;
        match partitions {
            1 => Ok(()),
            0 => Err(Error::Unavailable {
                what: format!("topic {} has no partitions yet", self.inner.options.topic),
                source: None,
            }),
            n => Err(Error::TooManyPartitions {
                topic: self.inner.options.topic.clone(),
                partitions: n,
            }),
        }
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.inner
            .producer
            .read()
            .expect("producer lock poisoned")
            .clone()
    }

    /// Replaces `failed` if librdkafka declared it unusable (a fatal idempotence error).
    fn replace_if_fatal(&self, failed: &Arc<FutureProducer>) {
        if let Some((code, reason)) = failed.client().fatal_error() {
            error!(%code, %reason, "kafka producer hit a fatal error; replacing it");
            self.replace(failed);
        }
    }

    /// Replaces `failed` (unless another append already did) with a new producer, which gets a
    /// new producer id and so starts a fresh idempotence sequence. Done after any failed
    /// delivery: after an outage the old producer's sequence numbers may no longer match the
    /// broker's (an `OutOfOrderSequence` would follow), and the failed records were reported to
    /// their appenders, who retry them.
    fn replace(&self, failed: &Arc<FutureProducer>) {
        let mut slot = self.inner.producer.write().expect("producer lock poisoned");
        if !Arc::ptr_eq(&slot, failed) {
            return;
        }
        match self
            .inner
            .options
            .producer_config()
            .create::<FutureProducer>()
        {
            Ok(p) => {
                let old = std::mem::replace(&mut *slot, Arc::new(p));
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => error!(error = %e, "could not create a new kafka producer"),
        }
    }

    /// See [`crate::TxLog::append`]. Returns once every in-sync replica has the records.
    pub async fn append(&self, records: Vec<Bytes>) -> Result<Vec<Timestamp>> {
        let o = &self.inner.options;
        let max = o.max_record_bytes;
        if let Some(r) = records.iter().find(|r| r.len() > max) {
            return Err(Error::RecordTooLarge { size: r.len(), max });
        }
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let producer = self.producer();
        let deadline = Instant::now() + Duration::from_millis(o.delivery_timeout_ms);
        let mut deliveries = Vec::with_capacity(records.len());
        for payload in &records {
            loop {
                let record = FutureRecord::<(), [u8]>::to(&o.topic)
                    .partition(0)
                    .payload(&payload[..]);
                // Settle the outcome before any await: the refused record is not `Send`.
                let refused = match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((e, _record)) => e,
                };
                if let KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) = refused {
                    // librdkafka's queue is full (its own bound): wait for deliveries to drain
                    // it, as long as the delivery timeout allows.
                    if Instant::now() >= deadline {
                        return Err(Error::Unavailable {
                            what: "append: the producer queue stayed full".into(),
                            source: Some(refused),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    self.replace_if_fatal(&producer);
                    return Err(classify("append", refused));
                }
            }
        }
        let mut timestamps = Vec::with_capacity(deliveries.len());
        let mut failure = None;
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(d)) => {
                    let offset = u64::try_from(d.offset).map_err(|_| {
                        Error::corrupt(format!("delivery report with offset {}", d.offset))
                    })?;
                    timestamps.push(Timestamp::from_offset(offset));
                }
                Ok(Err((e, msg))) => {
                    let size = msg.payload().map_or(0, <[u8]>::len);
                    let err = match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                            Error::RecordTooLarge { size, max }
                        }
                        _ => classify("append", e),
                    };
                    failure.get_or_insert(err);
                }
                Err(_canceled) => {
                    failure.get_or_insert(Error::Closed);
                }
            }
        }
        if let Some(e) = failure {
            if !matches!(e, Error::RecordTooLarge { .. }) {
                warn!(error = %e, "kafka append failed; starting a new producer");
                self.replace(&producer);
            }
            return Err(e);
        }
        if timestamps.windows(2).any(|w| w[0] >= w[1]) {
            // One idempotent producer on one partition keeps the enqueue order.
            return Err(Error::corrupt(format!(
                "the records of one append got out-of-order offsets {timestamps:?}"
            )));
        }
        Ok(timestamps)
    }

    /// See [`crate::TxLog::read_from`].
    pub fn read_from(&self, position: Timestamp) -> Reader {
        let (tx, rx) = mpsc::channel(self.inner.options.read_buffer_records);
        tokio::spawn(read_task(self.inner.clone(), position.get(), tx));
        Reader(ChannelStream::new(rx))
    }

    /// See [`crate::TxLog::bounds`]: the partition's low and high watermarks, plus one.
    pub async fn bounds(&self) -> Result<Bounds> {
        self.inner.clone().bounds().await
    }

    /// The largest payload [`KafkaLog::append`] accepts.
    pub fn max_record_bytes(&self) -> usize {
        self.inner.options.max_record_bytes
    }

    /// The options this log was opened with.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    /// Flushes the producer and waits for dropped readers' consumers, each bounded by the request
    /// timeout. Appends on any clone fail with [`Error::Closed`] afterwards.
    pub async fn close(&self) -> Result<()> {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let producer = self.producer();
        let timeout = self.inner.options.request_timeout();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .expect("producer flush panicked");
        let drops = std::mem::take(&mut *self.inner.drops.lock().expect("drops lock poisoned"));
        let deadline = tokio::time::Instant::now() + timeout;
        for handle in drops {
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                warn!("a kafka consumer is still closing after the deadline; leaving it");
                break;
            }
        }
        flushed.map_err(|e| classify("flush", e))
    }
}

impl Inner {
    async fn bounds(self: Arc<Self>) -> Result<Bounds> {
        tokio::task::spawn_blocking(move || {
            let o = &self.options;
            // After a leader change the first request may go to the old leader; librdkafka
            // refreshes its metadata on that answer, so asking again soon finds the new one.
            let deadline = Instant::now() + o.request_timeout();
            let (low, high) = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.meta.fetch_watermarks(&o.topic, 0, left) {
                    Ok(w) => break w,
                    Err(e) if is_leader_change(&e) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(classify("fetch watermarks", e)),
                }
            };
            let high = u64::try_from(high)
                .map_err(|_| Error::corrupt(format!("high watermark {high}")))?;
            // An empty partition may report a negative low watermark.
            let low = u64::try_from(low).unwrap_or(high).min(high);
            Ok(Bounds {
                first: Timestamp::from_offset(low),
                next: Timestamp::from_offset(high),
            })
        })
        .await
        .expect("watermark fetch panicked")
    }

    /// Drops a consumer on the blocking pool: librdkafka may block while closing it.
    fn drop_consumer(&self, consumer: StreamConsumer) {
        let handle = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            drop(consumer);
            let took = started.elapsed();
            if took > Duration::from_secs(2) {
                warn!(
                    took_ms = took.as_millis() as u64,
                    "closing a kafka consumer was slow"
                );
            }
        });
        let mut drops = self.drops.lock().expect("drops lock poisoned");
        drops.retain(|h| !h.is_finished());
        drops.push(handle);
    }
}

/// The stream of [`KafkaLog::read_from`].
#[derive(Debug)]
pub struct Reader(ChannelStream);

impl Stream for Reader {
    type Item = Result<Record>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx)
    }
}

/// How often a reader that saw a broker error checks whether the brokers answer again.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

async fn read_task(inner: Arc<Inner>, position: u64, tx: mpsc::Sender<Result<Record>>) {
    // librdkafka wants a group for `assign()`, but the consumer never joins it (no `subscribe`)
    // and never commits to it: the group id only names the client.
    let mut config = inner.options.consumer_config();
    config.set(
        "group.id",
        format!("causeway-txlog-{}", inner.options.topic),
    );
    let consumer: StreamConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx
                .send(Err(Error::config(format!(
                    "consumer configuration rejected: {e}"
                ))))
                .await;
            return;
        }
    };
    if let Err(e) = read_loop(&inner, &consumer, position, &tx).await {
        let _ = tx.send(Err(e)).await;
    }
    inner.drop_consumer(consumer);
}

/// The position check that both the start of a read and an out-of-range fetch use.
async fn check_position(inner: &Arc<Inner>, position: u64) -> Result<()> {
    let bounds = inner.clone().bounds().await?;
    if position + 1 < bounds.first.get() {
        return Err(Error::Truncated {
            after: Timestamp(position),
            first_available: bounds.first,
        });
    }
    if position + 1 > bounds.next.get() {
        return Err(Error::BeyondEnd {
            position: Timestamp(position),
            next: bounds.next,
        });
    }
    Ok(())
}

/// Feeds `tx` until the stream is dropped (`Ok`) or an error ends the read.
async fn read_loop(
    inner: &Arc<Inner>,
    consumer: &StreamConsumer,
    position: u64,
    tx: &mpsc::Sender<Result<Record>>,
) -> Result<()> {
    let o = &inner.options;
    check_position(inner, position).await?;
    let start = i64::try_from(position).map_err(|_| Error::BeyondEnd {
        position: Timestamp(position),
        next: Timestamp(i64::MAX as u64),
    })?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&o.topic, 0, Offset::Offset(start))
        .map_err(|e| Error::Kafka {
            op: "assign",
            source: e,
        })?;
    consumer.assign(&assignment).map_err(|e| Error::Kafka {
        op: "assign",
        source: e,
    })?;
    let unavailable_after = Duration::from_millis(o.unavailable_after_ms);
    // The offset the next record must be at or above.
    let mut expected = position;
    // Since when the brokers have been failing us, while they are.
    let mut trouble_since: Option<Instant> = None;
    loop {
        let probing = trouble_since.is_some();
        let probe = async move {
            if probing {
                tokio::time::sleep(PROBE_INTERVAL).await
            } else {
                futures::future::pending().await
            }
        };
        // Copy what we need out of the message inside the future: a borrowed message is not
        // `Send` and must not live across an await.
        let next = async {
            consumer.recv().await.map(|m| {
                let payload = m.payload().map(Bytes::copy_from_slice).unwrap_or_default();
                (m.offset(), payload)
            })
        };
        tokio::select! {
            message = next => {
                let (offset, payload) = match message {
                    Ok(m) => m,
                    Err(e) => {
                        match e.rdkafka_error_code() {
                            Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset) => {
                                check_position(inner, expected).await?;
                                return Err(Error::Kafka { op: "fetch", source: e });
                            }
                            Some(code) if is_unavailable(code) => {
                                debug!(%code, "kafka reader lost the brokers");
                                trouble_since.get_or_insert_with(Instant::now);
                            }
                            _ if matches!(e, KafkaError::MessageConsumptionFatal(_)) => {
                                return Err(Error::Kafka { op: "fetch", source: e });
                            }
                            _ => warn!(error = %e, "kafka reader error; retrying"),
                        }
                        continue;
                    }
                };
                let offset = u64::try_from(offset)
                    .map_err(|_| Error::corrupt(format!("fetched a record at offset {offset}")))?;
                if offset < expected {
                    return Err(Error::corrupt(format!(
                        "fetched offset {offset} after offset {}: the partition went backwards",
                        expected as i128 - 1
                    )));
                }
                expected = offset + 1;
                trouble_since = None;
                let record = Record { ts: Timestamp::from_offset(offset), payload };
                if tx.send(Ok(record)).await.is_err() {
                    return Ok(());
                }
            }
            () = tx.closed() => return Ok(()),
            () = probe => {
                match inner.clone().bounds().await {
                    Ok(_) => trouble_since = None,
                    Err(e) if e.is_transient() => {
                        let since = trouble_since.expect("probing only in trouble");
                        if since.elapsed() >= unavailable_after {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}
