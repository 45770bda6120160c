//! Kafka-only tests against a real Apache Kafka (KRaft, one node): topic checks, broker restarts
//! and outages, readers, fetch waits (the three-node tests are in `replicated.rs`). Without the
//! broker these fail.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use causeway_txlog::testing::Broker;
use causeway_txlog::{Error, KafkaLog, LogOptions, Timestamp, TxLog};
use common::{append_n, next_error, payload, take};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// A broker of the test's own, for tests that stop it.
fn start_broker() -> Result<Broker> {
    tokio::task::block_in_place(Broker::start).context("starting the Kafka broker")
}

/// The test process's shared broker, for tests that only need topics of their own.
fn shared_broker() -> Result<&'static Broker> {
    tokio::task::block_in_place(Broker::shared).context("starting the Kafka broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_several_partitions_is_refused() -> Result<()> {
    let broker = shared_broker()?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()?;
    let topic = NewTopic::new("three-partitions", 3, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    for r in admin.create_topics([&topic], &opts).await? {
        r.map_err(|(t, code)| anyhow::anyhow!("creating {t}: {code}"))?;
    }
    tokio::task::spawn_blocking(move || drop(admin));
    match TxLog::open(LogOptions::Kafka(broker.log_options("three-partitions"))).await {
        Err(Error::TooManyPartitions { topic, partitions }) => {
            ensure!(
                topic == "three-partitions" && partitions == 3,
                "{topic} {partitions}"
            );
        }
        other => bail!("expected TooManyPartitions, got {other:?}"),
    }
    // A missing topic is refused when the log may not create it.
    let mut options = broker.log_options("never-created");
    options.create_topic = false;
    match TxLog::open(LogOptions::Kafka(options)).await {
        Err(Error::UnknownTopic { topic }) => ensure!(topic == "never-created", "{topic}"),
        other => bail!("expected UnknownTopic, got {other:?}"),
    }
    // A topic with one partition is fine, created or existing.
    let log = KafkaLog::open(broker.log_options("one")).await?;
    log.close().await?;
    let log = KafkaLog::open(broker.log_options("one")).await?;
    log.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_broker_restart() -> Result<()> {
    let mut broker = start_broker()?;
    let log = TxLog::open(LogOptions::Kafka(broker.log_options("tx"))).await?;
    let before = append_n(&log, "pre", 100, 200).await?;
    log.close().await?;
    drop(log);
    // kill -9, then the same data directory.
    tokio::task::block_in_place(|| broker.restart())?;
    let log = TxLog::open(LogOptions::Kafka(broker.log_options("tx"))).await?;
    let b = log.bounds().await?;
    ensure!(b.next == Timestamp(before[99].get() + 1), "{b:?}");
    let after = append_n(&log, "post", 10, 200).await?;
    ensure!(after[0] > before[99]);
    let read = take(&mut log.read_from(Timestamp::ZERO), 110).await?;
    for (i, r) in read.iter().enumerate() {
        let want = if i < 100 {
            payload("pre", i, 200)
        } else {
            payload("post", i - 100, 200)
        };
        ensure!(r.payload == want, "record {i} (ts {}) differs", r.ts);
    }
    log.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_reported_as_unavailable_and_the_handle_recovers() -> Result<()> {
    let mut broker = start_broker()?;
    let mut options = broker.log_options("tx");
    options.delivery_timeout_ms = 3_000;
    options.request_timeout_ms = 2_000;
    options.unavailable_after_ms = 2_000;
    let log = TxLog::open(LogOptions::Kafka(options.clone())).await?;
    append_n(&log, "up", 5, 50).await?;
    let mut reader = log.read_from(Timestamp(5));

    tokio::task::block_in_place(|| broker.stop())?;
    let started = Instant::now();
    match log.append(vec![Bytes::from_static(b"during")]).await {
        Err(e @ Error::Unavailable { .. }) => ensure!(e.is_transient()),
        other => bail!("expected Unavailable while the broker is down, got {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "append took {:?}",
        started.elapsed()
    );
    ensure!(matches!(log.bounds().await, Err(Error::Unavailable { .. })));
    match next_error(&mut reader).await? {
        Error::Unavailable { .. } => {}
        e => bail!("expected the reader to report Unavailable, got {e:?}"),
    }
    // Opening against a dead broker fails the same way, within the timeouts.
    let started = Instant::now();
    match TxLog::open(LogOptions::Kafka(options.clone())).await {
        Err(Error::Unavailable { .. }) => {}
        other => bail!("expected Unavailable from open, got {other:?}"),
    }
    ensure!(started.elapsed() < Duration::from_secs(15));

    tokio::task::block_in_place(|| broker.restart())?;
    // The same handle works again once the broker is back.
    let deadline = Instant::now() + common::WAIT;
    let back = loop {
        match log.append(vec![Bytes::from_static(b"back")]).await {
            Ok(ts) => break ts[0],
            Err(e) if e.is_transient() && Instant::now() < deadline => continue,
            Err(e) => bail!("appends did not recover within {:?}: {e:?}", common::WAIT),
        }
    };
    // Nothing acknowledged was lost, and nothing unacknowledged is in the way of reading.
    let mut stream = log.read_from(Timestamp(5));
    let mut last = Timestamp(5);
    while last < back {
        let r = take(&mut stream, 1).await?.remove(0);
        ensure!(r.ts > last);
        last = r.ts;
    }
    let first_five = take(&mut log.read_from(Timestamp::ZERO), 5).await?;
    ensure!(first_five
        .iter()
        .enumerate()
        .all(|(i, r)| r.payload == payload("up", i, 50)));
    log.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_come_and_go_without_blocking_the_runtime() -> Result<()> {
    let broker = shared_broker()?;
    let log = TxLog::open(LogOptions::Kafka(broker.log_options("many-readers"))).await?;
    append_n(&log, "m", 20, 50).await?;
    let started = Instant::now();
    for round in 0..10 {
        let mut stream = log.read_from(Timestamp(round));
        let got = take(&mut stream, 1).await?;
        ensure!(got[0].ts == Timestamp(round + 1));
        drop(stream);
    }
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "opening and dropping readers took {:?}",
        started.elapsed()
    );
    log.close().await?;
    Ok(())
}

/// Kafka answers a waiting fetch as soon as a record is committed: with a 3 s fetch wait, a
/// tailing reader still sees each append well before the wait would end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailing_reader_sees_appends_before_its_fetch_wait_ends() -> Result<()> {
    let broker = shared_broker()?;
    let mut options = broker.log_options("long-fetch-wait");
    options.fetch_wait_max_ms = 3_000;
    let log = TxLog::open(LogOptions::Kafka(options)).await?;
    let start = append_n(&log, "before", 1, 50).await?[0];
    let mut reader = log.read_from(start);
    // Let the reader's first fetch reach the broker and wait there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut took = Vec::new();
    for i in 0..5 {
        let sent = Instant::now();
        let ts = log.append(vec![payload("tail", i, 50)]).await?[0];
        let got = take(&mut reader, 1).await?.remove(0);
        ensure!(got.ts == ts, "read {} for append {ts}", got.ts);
        took.push(sent.elapsed());
        // The next append finds the reader's next fetch waiting at the broker.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    took.sort();
    ensure!(
        took[2] < Duration::from_millis(1_000),
        "append → tail reader took {took:?} with a 3 s fetch wait: the broker held the fetch"
    );
    log.close().await?;
    Ok(())
}
