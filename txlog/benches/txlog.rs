//! Transaction log throughput: appends (records/s, MB/s) with concurrent appenders for 200 B and
//! 1 KiB records, and tail reads, on both backends; against the broker also a raw rdkafka
//! `FutureProducer` loop with the same records and producer settings, as the reference.
//!
//! `cargo bench -p causeway-txlog` (release build; the Kafka half starts Apache Kafka through
//! `causeway_txlog::testing`: one node, or `TXLOG_BENCH_KAFKA_NODES=3` for three with replication
//! factor 3 and `min.insync.replicas=2`). Set `TXLOG_BENCH_SECS` to change the time per append
//! case (default 3).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bytes::Bytes;
use causeway_txlog::testing::Broker;
use causeway_txlog::{EmbeddedOptions, KafkaOptions, LogOptions, Timestamp, TxLog};
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

struct Row {
    backend: &'static str,
    case: String,
    records: u64,
    bytes: u64,
    secs: f64,
}

impl Row {
    fn print(&self) {
        println!(
            "| {:<8} | {:<42} | {:>10.0} | {:>8.1} | {:>9} |",
            self.backend,
            self.case,
            self.records as f64 / self.secs,
            self.bytes as f64 / self.secs / 1e6,
            self.records
        );
    }
}

fn record(size: usize, i: u64) -> Bytes {
    let mut v = vec![b'x'; size];
    let tag = i.to_le_bytes();
    v[..8].copy_from_slice(&tag);
    Bytes::from(v)
}

/// `appenders` tasks, each appending `batch` records per call, for `secs`.
async fn append_case(
    log: &TxLog,
    backend: &'static str,
    size: usize,
    appenders: usize,
    batch: usize,
    secs: f64,
) -> Result<Row> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let (log, stop, count) = (log.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = a as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let records: Vec<Bytes> = (0..batch).map(|j| record(size, i + j as u64)).collect();
                let ts = log.append(records).await?;
                anyhow::ensure!(ts.len() == batch);
                i += batch as u64;
                count.fetch_add(batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records = count.load(Ordering::Relaxed);
    Ok(Row {
        backend,
        case: format!("append {size} B, {appenders} appenders x {batch}/call"),
        records,
        bytes: records * size as u64,
        secs: elapsed,
    })
}

/// Reads the whole log from the start, as a store node catching up, then tails it.
async fn read_case(log: &TxLog, backend: &'static str) -> Result<Row> {
    let next = log.bounds().await?.next;
    let total = next.get() - 1;
    let started = Instant::now();
    let mut stream = log.read_from(Timestamp::ZERO);
    let mut records = 0u64;
    let mut bytes = 0u64;
    while records < total {
        let r = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await?
            .expect("streams do not end")?;
        records += 1;
        bytes += r.payload.len() as u64;
        if r.ts.get() >= total {
            break;
        }
    }
    Ok(Row {
        backend,
        case: "catch-up read from ts 0 (mixed sizes)".into(),
        records,
        bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Tail latency: a reader waiting at the end, one appender; the time from append start to the
/// reader seeing the record, median of `n`.
async fn tail_case(log: &TxLog, backend: &'static str, n: usize) -> Result<String> {
    let end = Timestamp(log.bounds().await?.next.get() - 1);
    let mut stream = log.read_from(end);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let ts = log.append(vec![record(200, i as u64)]).await?;
        let r = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .expect("streams do not end")?;
        ensure!(r.ts == ts[0]);
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(format!(
        "| {backend:<8} | append -> tail reader latency, 200 B, p50 {:.2} ms, p99 {:.2} ms ({n} samples) |",
        lat[n / 2].as_secs_f64() * 1e3,
        lat[n * 99 / 100].as_secs_f64() * 1e3
    ))
}

/// The reference: rdkafka's `FutureProducer` with the producer settings of `KafkaLog`, all records
/// enqueued as fast as librdkafka takes them (up to `window` in flight), every delivery awaited.
async fn raw_producer_case(o: &KafkaOptions, size: usize, window: usize, secs: f64) -> Result<Row> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &o.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", o.linger_ms.to_string())
        .set("compression.type", &o.compression)
        .create()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut in_flight = std::collections::VecDeque::with_capacity(window);
    let mut records = 0u64;
    let mut i = 0u64;
    while Instant::now() < deadline || !in_flight.is_empty() {
        if Instant::now() < deadline && in_flight.len() < window {
            let payload = record(size, i);
            match producer.send_result(
                FutureRecord::<(), [u8]>::to(&o.topic)
                    .partition(0)
                    .payload(&payload[..]),
            ) {
                Ok(f) => {
                    in_flight.push_back(f);
                    i += 1;
                    continue;
                }
                Err((e, _)) => {
                    if in_flight.is_empty() {
                        return Err(e.into());
                    }
                }
            }
        }
        if let Some(f) = in_flight.pop_front() {
            f.await?.map_err(|(e, _)| e)?;
            records += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::task::spawn_blocking(move || drop(producer));
    Ok(Row {
        backend: "rdkafka",
        case: format!("raw FutureProducer {size} B, {window} in flight"),
        records,
        bytes: records * size as u64,
        secs,
    })
}

const CASES: &[(usize, usize, usize)] = &[
    // (size, appenders, records per call)
    (200, 1, 1),
    (200, 16, 1),
    (200, 64, 1),
    (200, 16, 64),
    (1024, 1, 1),
    (1024, 16, 1),
    (1024, 64, 1),
    (1024, 16, 64),
];

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let secs: f64 = std::env::var("TXLOG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    println!("| backend  | case                                       |  records/s |     MB/s |   records |");
    println!("|----------|--------------------------------------------|-----------:|---------:|----------:|");

    let dir = tempfile::tempdir()?;
    let log = TxLog::open(LogOptions::Embedded(EmbeddedOptions::new(
        dir.path().join("log"),
    )))
    .await?;
    for &(size, appenders, batch) in CASES {
        append_case(&log, "embedded", size, appenders, batch, secs)
            .await?
            .print();
    }
    read_case(&log, "embedded").await?.print();
    let tail_embedded = tail_case(&log, "embedded", 200).await?;
    log.close().await?;

    let nodes: usize = std::env::var("TXLOG_BENCH_KAFKA_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let broker = tokio::task::block_in_place(|| Broker::start_cluster(nodes))?;
    let mut options = broker.log_options("bench");
    let kafka_setup = format!(
        "Kafka: {nodes} node(s), replication factor {}, min.insync.replicas {}",
        options.replication_factor, options.min_insync_replicas
    );
    options.delivery_timeout_ms = 30_000;
    let log = TxLog::open(LogOptions::Kafka(options.clone())).await?;
    for &(size, appenders, batch) in CASES {
        append_case(&log, "kafka", size, appenders, batch, secs)
            .await?
            .print();
    }
    read_case(&log, "kafka").await?.print();
    let tail_kafka = tail_case(&log, "kafka", 200).await?;
    log.close().await?;
    for size in [200, 1024] {
        raw_producer_case(&options, size, 1024, secs).await?.print();
    }
    println!();
    println!("{kafka_setup}");
    println!("{tail_embedded}");
    println!("{tail_kafka}");
    drop(broker);
    Ok(())
}
