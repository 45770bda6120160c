//! The Kafka sink: each event a record of its collection's topic, keyed by `collection/id`
//! (per-key order; log compaction keeps a document's latest), in CloudEvents binary mode (the
//! `ce_*` headers, the value is `data`), with an optional tombstone after a delete.
//!
//! Exactly once: the producer is transactional (`transactional.id` = `causeway-cdc-<feed>`,
//! idempotent, `acks=all`), and one Kafka transaction holds a group of events together with the
//! feed's checkpoint, a record of the checkpoint topic (compacted) keyed by the feed's name.
//! A `read_committed` consumer sees a group's events exactly when the checkpoint after them is
//! committed; a restarted feed reads its checkpoint back from that topic, and `init_transactions`
//! fences a zombie of the same feed, so nothing after a committed checkpoint is written twice
//! and nothing before it is lost. Resolved events go to every topic the feed has written to.

use std::collections::BTreeSet;
use std::time::Duration;

use causeway_core::cdc::Position;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::event::{Body, Event};
use crate::feed::KafkaSinkSpec;

const TIMEOUT: Duration = Duration::from_secs(30);

/// One feed's transactional producer.
pub struct KafkaSink {
    spec: KafkaSinkSpec,
    feed: String,
    source: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    /// Topics the feed has written to, for resolved events.
    topics: BTreeSet<String>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

fn config(spec: &KafkaSinkSpec) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &spec.bootstrap_servers);
    for (k, v) in &spec.properties {
        c.set(k, v);
    }
    c
}

impl KafkaSink {
    /// Connects, fences older producers of the feed, and reads the feed's checkpoint back.
    /// Blocking: call it off the runtime.
    pub fn open(
        feed: &str,
        source: &str,
        spec: &KafkaSinkSpec,
    ) -> Result<(KafkaSink, Option<Position>), String> {
        let producer: ThreadedProducer<DefaultProducerContext> = config(spec)
            .set("transactional.id", format!("causeway-cdc-{feed}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            .create()
            .map_err(|e| format!("kafka producer: {e}"))?;
        producer
            .init_transactions(TIMEOUT)
            .map_err(|e| format!("kafka init_transactions: {e}"))?;
        let sink = KafkaSink {
            spec: spec.clone(),
            feed: feed.to_owned(),
            source: source.to_owned(),
            producer,
            topics: BTreeSet::new(),
        };
        sink.ensure_topic(&spec.checkpoint_topic, true)?;
        let checkpoint = sink.read_checkpoint()?;
        Ok((sink, checkpoint))
    }

    fn ensure_topic(&self, topic: &str, compacted: bool) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = config(&self.spec)
            .create()
            .map_err(|e| format!("kafka admin: {e}"))?;
        let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1));
        if compacted {
            new = new.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new().request_timeout(Some(TIMEOUT));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let results = runtime
            .block_on(admin.create_topics([&new], &opts))
            .map_err(|e| format!("create topic {topic}: {e}"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(format!("create topic {topic}: {code}")),
            }
        }
        Ok(())
    }

    /// The last committed checkpoint of this feed in the checkpoint topic.
    fn read_checkpoint(&self) -> Result<Option<Position>, String> {
        let consumer: BaseConsumer = config(&self.spec)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("group.id", format!("causeway-cdc-{}-checkpoint", self.feed))
            .create()
            .map_err(|e| format!("kafka consumer: {e}"))?;
        let topic = &self.spec.checkpoint_topic;
        let (low, high) = consumer
            .fetch_watermarks(topic, 0, TIMEOUT)
            .map_err(|e| format!("checkpoint topic watermarks: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(low))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let mut found = None;
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            // With read_committed the position stops at the last stable offset, below `high`
            // only while a transaction is open (a fenced zombie's is aborted by our init).
            let position = consumer
                .position()
                .ok()
                .and_then(|p| p.find_partition(topic, 0).map(|e| e.offset()));
            if let Some(Offset::Offset(o)) = position {
                if o >= high {
                    break;
                }
            }
            if high == low {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err("reading the checkpoint topic timed out".into());
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.key() == Some(self.feed.as_bytes()) => {
                    let text = std::str::from_utf8(m.payload().unwrap_or_default())
                        .map_err(|_| "a checkpoint is not UTF-8".to_owned())?;
                    found = Some(
                        text.parse::<Position>()
                            .map_err(|e| format!("checkpoint record: {e}"))?,
                    );
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("reading the checkpoint topic: {e}")),
                None => {}
            }
        }
        Ok(found)
    }

    fn topic_of(&self, collection: &str) -> String {
        self.spec
            .topics
            .get(collection)
            .cloned()
            .unwrap_or_else(|| format!("{}{collection}", self.spec.topic_prefix))
    }

    fn produce(&self, record: BaseRecord<'_, str, [u8]>) -> Result<(), String> {
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(format!("produce: {e}")),
            }
        }
    }

    /// Writes `events` and the checkpoint after them in one Kafka transaction. On an error the
    /// transaction is aborted (nothing of it is visible to `read_committed` consumers) and the
    /// caller may try the same events again. Blocking: call it off the runtime.
    pub fn deliver(
        &mut self,
        events: &[Event],
        checkpoint: Option<Position>,
    ) -> Result<(), String> {
        for e in events {
            if let Body::Change(c) = &e.body {
                let topic = self.topic_of(&c.collection);
                if !self.topics.contains(&topic) {
                    self.ensure_topic(&topic, false)?;
                    self.topics.insert(topic);
                }
            }
        }
        self.producer
            .begin_transaction()
            .map_err(|e| format!("begin transaction: {e}"))?;
        let written = self.write(events, checkpoint).and_then(|()| {
            self.producer
                .commit_transaction(TIMEOUT)
                .map_err(|e| format!("commit transaction: {e}"))
        });
        if let Err(e) = written {
            if let Err(abort) = self.producer.abort_transaction(TIMEOUT) {
                return Err(format!("{e}; abort: {abort}"));
            }
            return Err(e);
        }
        Ok(())
    }

    fn write(&self, events: &[Event], checkpoint: Option<Position>) -> Result<(), String> {
        for e in events {
            let data = serde_json::to_vec(&e.data()).expect("data serializes");
            let mut headers = OwnedHeaders::new();
            for (k, v) in e.binary_headers(&self.source) {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            match &e.body {
                Body::Change(c) => {
                    let topic = self.topic_of(&c.collection);
                    let key = format!("{}/{}", c.collection, c.id);
                    self.produce(
                        BaseRecord::to(&topic)
                            .key(key.as_str())
                            .payload(data.as_slice())
                            .headers(headers),
                    )?;
                    if self.spec.tombstones && c.after.is_none() {
                        self.produce(BaseRecord::<str, [u8]>::to(&topic).key(key.as_str()))?;
                    }
                }
                _ => {
                    for topic in &self.topics {
                        self.produce(
                            BaseRecord::to(topic)
                                .key("causeway.feed")
                                .payload(data.as_slice())
                                .headers(headers.clone()),
                        )?;
                    }
                }
            }
        }
        let Some(checkpoint) = checkpoint else {
            return Ok(());
        };
        let id = checkpoint.id();
        self.produce(
            BaseRecord::to(&self.spec.checkpoint_topic)
                .key(self.feed.as_str())
                .payload(id.as_bytes()),
        )
    }
}
