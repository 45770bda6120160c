//! Fixtures shared by the txlog test files: a log on either backend that can be reopened and
//! made to drop its oldest records.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use causeway_txlog::testing::Broker;
use causeway_txlog::{
    EmbeddedOptions, Error, KafkaOptions, LogOptions, Record, RecordStream, Timestamp, TxLog,
};
use futures::StreamExt;

/// The upper bound of any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// A log under test and what it takes to open it again.
pub enum Fixture {
    Embedded {
        dir: tempfile::TempDir,
        options: EmbeddedOptions,
    },
    Kafka {
        options: KafkaOptions,
    },
}

impl Fixture {
    pub fn embedded() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let mut options = EmbeddedOptions::new(dir.path().join("log"));
        options.max_record_bytes = 64 * 1024;
        Ok(Fixture::Embedded { dir, options })
    }

    /// The test process's shared broker (tests must fail, not skip, without one) and a topic
    /// of the test's own, `topic`.
    pub fn kafka(topic: &str) -> Result<Fixture> {
        let broker = Broker::shared().context("starting the Kafka broker")?;
        let mut options = broker.log_options(topic);
        options.max_record_bytes = 64 * 1024;
        Ok(Fixture::Kafka { options })
    }

    pub fn options(&self) -> LogOptions {
        match self {
            Fixture::Embedded { options, .. } => LogOptions::Embedded(options.clone()),
            Fixture::Kafka { options, .. } => LogOptions::Kafka(options.clone()),
        }
    }

    pub async fn open(&self) -> Result<TxLog> {
        Ok(TxLog::open(self.options()).await?)
    }

    pub fn is_kafka(&self) -> bool {
        matches!(self, Fixture::Kafka { .. })
    }

    /// Configures the log to drop old records: small segments and a size limit (embedded), a
    /// short `retention.ms` and `segment.ms` with the delete policy (Kafka, whose retention
    /// check runs every 500 ms on the test broker and deletes only segments that rolled).
    pub fn with_retention(&mut self) {
        match self {
            Fixture::Embedded { options, .. } => {
                options.segment_bytes = 4096;
                options.retention_bytes = Some(8192);
            }
            Fixture::Kafka { options, .. } => {
                for (k, v) in [
                    ("cleanup.policy", "delete"),
                    ("retention.ms", "1500"),
                    ("segment.ms", "500"),
                ] {
                    options.topic_config.insert(k.into(), v.into());
                }
            }
        }
    }

    /// Makes the log drop the records appended so far by retention, appending `filler` records
    /// (which may or may not survive). Returns the log's bounds afterwards.
    pub async fn drop_old_records(&mut self, log: &TxLog, filler: usize) -> Result<TxLog> {
        match self {
            Fixture::Embedded { .. } => {
                // 4 KiB segments, 8 KiB retention: ~50 KiB of records rolls many segments.
                append_n(log, "filler", filler.max(200), 256).await?;
                Ok(log.clone())
            }
            Fixture::Kafka { options } => {
                // Let what is there age past retention.ms; the next append rolls the segment
                // (older than segment.ms), and the broker's retention check deletes the old one.
                let aged = tokio::time::Instant::now() + Duration::from_millis(2000);
                tokio::time::sleep_until(aged).await;
                append_n(log, "filler", filler.max(1), 256).await?;
                wait_for(
                    || {
                        let log = log.clone();
                        async move { Ok(log.bounds().await?.first > Timestamp(1)) }
                    },
                    "the broker to apply retention",
                )
                .await?;
                // Retention stops here: Kafka also ages out the active segment, and the records
                // the test appends next must stay while it reads them.
                keep_everything(options).await?;
                Ok(log.clone())
            }
        }
    }
}

/// Sets the topic of `options` to keep its records forever (the whole configuration: Kafka's
/// `AlterConfigs` replaces it).
async fn keep_everything(options: &KafkaOptions) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &options.bootstrap_servers)
            .create()?;
    let min_isr = options.min_insync_replicas.to_string();
    let config = AlterConfig::new(ResourceSpecifier::Topic(&options.topic))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1")
        .set("min.insync.replicas", &min_isr)
        .set("unclean.leader.election.enable", "false");
    let opts = AdminOptions::new().request_timeout(Some(WAIT));
    for result in admin.alter_configs([&config], &opts).await? {
        result.map_err(|(r, code)| anyhow::anyhow!("altering {r:?}: {code}"))?;
    }
    tokio::task::spawn_blocking(move || drop(admin));
    Ok(())
}

/// `n` records `"{tag}-{i}"` padded to `size` bytes, appended one call each.
pub async fn append_n(log: &TxLog, tag: &str, n: usize, size: usize) -> Result<Vec<Timestamp>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.extend(log.append(vec![payload(tag, i, size)]).await?);
    }
    Ok(out)
}

pub fn payload(tag: &str, i: usize, size: usize) -> Bytes {
    let mut s = format!("{tag}-{i}").into_bytes();
    if s.len() < size {
        s.resize(size, b'.');
    }
    Bytes::from(s)
}

/// The next `n` records of `stream`, each within [`WAIT`].
pub async fn take(stream: &mut RecordStream, n: usize) -> Result<Vec<Record>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Err(_) => bail!("waited {WAIT:?} for record {} of {n}", out.len() + 1),
            Ok(None) => bail!("stream ended after {} of {n} records", out.len()),
            Ok(Some(Err(e))) => bail!("stream failed after {} of {n} records: {e:?}", out.len()),
            Ok(Some(Ok(r))) => out.push(r),
        }
    }
    Ok(out)
}

/// The next item of `stream`, which must be an error, within [`WAIT`].
pub async fn next_error(stream: &mut RecordStream) -> Result<Error> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Err(_) => bail!("waited {WAIT:?} for an error"),
        Ok(None) => bail!("stream ended without an error"),
        Ok(Some(Ok(r))) => bail!("expected an error, got record {}", r.ts),
        Ok(Some(Err(e))) => Ok(e),
    }
}

/// Polls `cond` until it holds, for at most [`WAIT`].
pub async fn wait_for<F, Fut>(mut cond: F, what: &str) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        match cond().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("waited {WAIT:?} for {what} (last error: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
