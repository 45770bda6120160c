//! The Kafka backend with the production settings, on three KRaft nodes: the topic Causeway
//! creates has replication factor 3, `min.insync.replicas=2` and no unclean leader election; an
//! acknowledged append survives kill -9 of the partition leader, exactly once and in one total
//! order; with two of three brokers down appends fail with `Unavailable`, and nothing of them is
//! half there when the brokers return. Each test starts its own cluster; they run one at a time
//! (six JVMs and the appenders do not fit two cores at once).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use causeway_txlog::testing::Broker;
use causeway_txlog::{Error, KafkaOptions, LogOptions, Timestamp, TxLog};
use common::take;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// One three-node cluster at a time in this process.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Appenders in the leader-kill test.
const APPENDERS: usize = 4;
/// Acknowledged appends the leader-kill test wants after the kill.
const AFTER_KILL: usize = 200;
/// How long appends may take to resume after the leader's kill -9: the controller fences the
/// dead broker after `broker.session.timeout.ms` (3 s on the test cluster) and elects a new
/// leader from the ISR; the producer then finds it.
const RESUME_WITHIN: Duration = Duration::from_secs(30);

fn start_cluster() -> Result<Broker> {
    tokio::task::block_in_place(|| Broker::start_cluster(3)).context("starting 3 Kafka nodes")
}

fn options(broker: &Broker, topic: &str) -> KafkaOptions {
    // The production defaults of the replication settings, not the test broker's.
    let defaults = KafkaOptions::new(broker.bootstrap_servers(), topic);
    let mut o = broker.log_options(topic);
    o.replication_factor = defaults.replication_factor;
    o.min_insync_replicas = defaults.min_insync_replicas;
    o.delivery_timeout_ms = 8_000;
    o
}

/// What the topic looks like to the admin client: its replica count and its configuration.
async fn topic_settings(broker: &Broker, topic: &str) -> Result<(usize, BTreeMap<String, String>)> {
    let config = {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", broker.bootstrap_servers());
        c
    };
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    let mut settings = BTreeMap::new();
    for resource in described {
        let resource = resource.map_err(|e| anyhow::anyhow!("describing {topic}: {e}"))?;
        for entry in resource.entries {
            if let Some(value) = entry.value {
                settings.insert(entry.name, value);
            }
        }
    }
    tokio::task::spawn_blocking(move || drop(admin));
    let consumer: BaseConsumer = config.create()?;
    let replicas = tokio::task::block_in_place(|| {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .context("the topic is not in the metadata")?;
        ensure!(
            t.partitions().len() == 1,
            "{} partitions",
            t.partitions().len()
        );
        Ok::<_, anyhow::Error>(t.partitions()[0].replicas().len())
    })?;
    tokio::task::spawn_blocking(move || drop(consumer));
    Ok((replicas, settings))
}

/// One append attempt: the record it sent and how it ended.
#[derive(Debug, Clone)]
struct Attempt {
    payload: Bytes,
    acked: Option<Timestamp>,
    at: Instant,
}

fn attempt_payload(appender: usize, seq: usize, attempt: usize) -> Bytes {
    Bytes::from(format!("appender-{appender}/seq-{seq}/attempt-{attempt}"))
}

/// Reads the whole log `[first, next)` as it is now.
async fn read_all(log: &TxLog) -> Result<Vec<(Timestamp, Bytes)>> {
    let bounds = log.bounds().await?;
    let n = (bounds.next.get() - bounds.first.get()) as usize;
    let mut stream = log.read_from(Timestamp(bounds.first.get() - 1));
    Ok(take(&mut stream, n)
        .await?
        .into_iter()
        .map(|r| (r.ts, r.payload))
        .collect())
}

/// Every acknowledged attempt is in `records` exactly once, at the ts it was acknowledged
/// with; every record is one whole attempt, and no attempt appears twice. Returns how many
/// acknowledged appends were checked.
fn check_log(records: &[(Timestamp, Bytes)], attempts: &[Attempt]) -> Result<usize> {
    let sent: HashMap<&Bytes, &Attempt> = attempts.iter().map(|a| (&a.payload, a)).collect();
    ensure!(sent.len() == attempts.len(), "two attempts share a payload");
    let mut seen: HashMap<&Bytes, Timestamp> = HashMap::new();
    for w in records.windows(2) {
        ensure!(
            w[0].0 < w[1].0,
            "the log goes from ts {} to {}",
            w[0].0,
            w[1].0
        );
    }
    for (ts, payload) in records {
        let Some(attempt) = sent.get(payload) else {
            bail!("ts {ts} holds a record nobody sent: {payload:?}");
        };
        if let Some(first) = seen.insert(payload, *ts) {
            bail!("{payload:?} is in the log twice, at ts {first} and {ts}");
        }
        if let Some(acked) = attempt.acked {
            ensure!(
                acked == *ts,
                "{payload:?} was acknowledged at ts {acked} but is at {ts}"
            );
        }
    }
    let mut checked = 0;
    for a in attempts.iter().filter(|a| a.acked.is_some()) {
        ensure!(
            seen.contains_key(&a.payload),
            "{:?} was acknowledged at ts {} and is not in the log",
            a.payload,
            a.acked.unwrap()
        );
        checked += 1;
    }
    Ok(checked)
}

/// Runs `test` on a fresh three-node cluster; a failure comes with the brokers' output.
async fn on_three_nodes<F>(test: F) -> Result<()>
where
    F: for<'a> FnOnce(&'a mut Broker) -> futures::future::BoxFuture<'a, Result<()>>,
{
    let _one = ONE_CLUSTER.lock().await;
    let mut broker = start_cluster()?;
    let result = test(&mut broker).await;
    result.map_err(|e| e.context(format!("the brokers' output:\n{}", broker.log_tail(4096))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_killing_the_leader_exactly_once() -> Result<()> {
    on_three_nodes(|broker| Box::pin(leader_kill(broker))).await
}

async fn leader_kill(broker: &mut Broker) -> Result<()> {
    let topic = "replicated";
    let log = TxLog::open(LogOptions::Kafka(options(broker, topic))).await?;

    // The topic Causeway created has the production settings.
    let (replicas, settings) = topic_settings(broker, topic).await?;
    ensure!(replicas == 3, "replication factor {replicas}");
    ensure!(
        settings.get("min.insync.replicas").map(String::as_str) == Some("2"),
        "min.insync.replicas {:?}",
        settings.get("min.insync.replicas")
    );
    ensure!(
        settings
            .get("unclean.leader.election.enable")
            .map(String::as_str)
            == Some("false"),
        "unclean.leader.election.enable {:?}",
        settings.get("unclean.leader.election.enable")
    );

    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = Vec::new();
    for appender in 0..APPENDERS {
        let (log, attempts, stop) = (log.clone(), attempts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0;
            let mut attempt = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let payload = attempt_payload(appender, seq, attempt);
                let result = log.append(vec![payload.clone()]).await;
                let acked = match result {
                    Ok(ts) => Some(ts[0]),
                    Err(e) if e.is_transient() => None,
                    Err(e) => return Err(anyhow::Error::from(e)),
                };
                attempts.lock().unwrap().push(Attempt {
                    payload,
                    acked,
                    at: Instant::now(),
                });
                if acked.is_some() {
                    seq += 1;
                    attempt = 0;
                } else {
                    attempt += 1;
                }
            }
            Ok(())
        }));
    }
    let acked = |since: Option<Instant>| acked_since(&attempts.lock().unwrap(), since);
    common::wait_for(
        || std::future::ready(Ok(acked(None) >= 100)),
        "100 appends before the kill",
    )
    .await?;

    let leader = tokio::task::block_in_place(|| broker.leader(topic, 0))?
        .context("the topic has no leader")?;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| broker.kill(leader))?;
    let wanted = Instant::now() + RESUME_WITHIN + Duration::from_secs(60);
    while acked(Some(killed_at)) < AFTER_KILL {
        if Instant::now() >= wanted {
            bail!(
                "{} acknowledged appends since the kill of node {}\n{}",
                acked(Some(killed_at)),
                leader + 1,
                broker.log_tail(3000)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let attempts = attempts.lock().unwrap().clone();
    let resumed = attempts
        .iter()
        .filter(|a| a.acked.is_some() && a.at > killed_at)
        .map(|a| a.at)
        .min()
        .context("no acknowledged append after the kill")?;
    let resume = resumed - killed_at;
    ensure!(
        resume <= RESUME_WITHIN,
        "appends resumed {resume:?} after the kill"
    );

    // The killed node back, then the whole log as one fresh reader sees it.
    tokio::task::block_in_place(|| broker.restart_node(leader))?;
    let records = read_all(&log).await?;
    let checked = check_log(&records, &attempts)?;
    // The same order from a second reader.
    let again = read_all(&log).await?;
    ensure!(again == records, "two readers saw different logs");
    let failed = attempts.iter().filter(|a| a.acked.is_none()).count();
    eprintln!(
        "leader kill: checked {checked} acknowledged appends ({} after the kill), {failed} failed \
         attempts retried, {} records in the log; appends resumed {resume:?} after kill -9 of \
         node {}",
        acked_since(&attempts, Some(killed_at)),
        records.len(),
        leader + 1
    );
    ensure!(checked >= 100 + AFTER_KILL);
    log.close().await?;
    Ok(())
}

/// Acknowledged attempts, all or those that ended after `since`.
fn acked_since(attempts: &[Attempt], since: Option<Instant>) -> usize {
    attempts
        .iter()
        .filter(|a| a.acked.is_some() && since.is_none_or(|s| a.at > s))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_of_three_brokers_down_appends_are_unavailable() -> Result<()> {
    on_three_nodes(|broker| Box::pin(two_down(broker))).await
}

async fn two_down(broker: &mut Broker) -> Result<()> {
    let topic = "quorum";
    let log = TxLog::open(LogOptions::Kafka(options(broker, topic))).await?;
    let mut attempts = Vec::new();
    for seq in 0..20 {
        let payload = attempt_payload(0, seq, 0);
        let ts = log.append(vec![payload.clone()]).await?;
        attempts.push(Attempt {
            payload,
            acked: Some(ts[0]),
            at: Instant::now(),
        });
    }

    // Down: the leader and one follower.
    let leader = tokio::task::block_in_place(|| broker.leader(topic, 0))?
        .context("the topic has no leader")?;
    let other = (leader + 1) % 3;
    tokio::task::block_in_place(|| {
        broker.kill(leader)?;
        broker.kill(other)
    })?;
    for attempt in 0..2 {
        let payload = attempt_payload(1, 0, attempt);
        let started = Instant::now();
        match log.append(vec![payload.clone()]).await {
            Err(e @ Error::Unavailable { .. }) => ensure!(e.is_transient()),
            other => bail!("expected Unavailable with two brokers down, got {other:?}"),
        }
        let took = started.elapsed();
        ensure!(
            took < Duration::from_secs(20),
            "the failed append took {took:?}"
        );
        attempts.push(Attempt {
            payload,
            acked: None,
            at: Instant::now(),
        });
    }

    tokio::task::block_in_place(|| {
        broker.restart_node(leader)?;
        broker.restart_node(other)
    })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0;
    while seq < 20 {
        let payload = attempt_payload(2, seq, attempts.len());
        let result = log.append(vec![payload.clone()]).await;
        let acked = match result {
            Ok(ts) => Some(ts[0]),
            Err(e) if e.is_transient() && Instant::now() < deadline => None,
            Err(e) => bail!(
                "appends did not come back: {e:?}\n{}",
                broker.log_tail(3000)
            ),
        };
        attempts.push(Attempt {
            payload,
            acked,
            at: Instant::now(),
        });
        seq += usize::from(acked.is_some());
    }
    let records = read_all(&log).await?;
    let checked = check_log(&records, &attempts)?;
    let during = records
        .iter()
        .filter(|(_, p)| p.starts_with(b"appender-1/"))
        .count();
    eprintln!(
        "two of three down: {checked} acknowledged appends checked; {during} of the 2 appends \
         that failed while the brokers were down are in the log whole (a timed-out append may \
         still commit), none in part"
    );
    log.close().await?;
    Ok(())
}
