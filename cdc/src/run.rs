//! One feed at work: open its sink and checkpoint, start (now, a ts, an initial scan), then
//! follow the log, batch, deliver, checkpoint, emit `causeway.resolved` at its interval, and
//! hold the GC timestamp at the checkpoint.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_config_manager::StoreNodes;
use causeway_core::cdc::Position;
use causeway_core::Timestamp;
use causeway_txlog::TxLog;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::event::{Body, Event};
use crate::feed::{FeedSpec, Selection, Start};
use crate::follow::{self, FollowError, Follower, Tuning};
use crate::hold::{Hold, HoldOptions};
use crate::metrics::FeedMetrics;
use crate::sink::{Delivered, Sink};

/// What a feed is doing, for status and the admin API (and, read back, `causeway admin feeds`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FeedStatus {
    /// `starting`, `scanning`, `running`, `paused`, `history_lost`, `failed`.
    pub state: String,
    /// The highest position below which every event is acknowledged by the sink.
    pub checkpoint: Option<String>,
    /// Every event with ts at or below this is delivered.
    pub resolved: u64,
    /// The UST last seen, and how far the feed is behind it (ts, and milliseconds of the
    /// wall clock of the records).
    pub ust: u64,
    pub lag_ts: u64,
    pub lag_ms: u64,
    pub last_error: Option<String>,
}

/// What a feed's task needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub log: TxLog,
    pub nodes: Arc<StoreNodes>,
    pub state_dir: PathBuf,
    pub resolved_interval: Duration,
    pub hold: HoldOptions,
    pub status: Arc<Mutex<FeedStatus>>,
    pub metrics: Arc<FeedMetrics>,
}

impl Context {
    fn set(&self, f: impl FnOnce(&mut FeedStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Runs the feed until `stop`; restarts it after a failure that may pass.
pub async fn run(spec: FeedSpec, cx: Context, mut stop: watch::Receiver<bool>) {
    let mut pause = Duration::from_millis(200);
    let mut stopped = stop.clone();
    loop {
        let outcome = tokio::select! {
            r = run_once(&spec, &cx, &stop) => r,
            _ = stopped.wait_for(|s| *s) => return,
        };
        match outcome {
            Ok(()) => return,
            Err(Stop::HistoryLost) => {
                cx.set(|s| s.state = "history_lost".into());
                return;
            }
            Err(Stop::Fatal(why)) => {
                tracing::error!(feed = %spec.name, %why, "the feed stopped");
                cx.set(|s| {
                    s.state = "failed".into();
                    s.last_error = Some(why);
                });
                return;
            }
            Err(Stop::Retry(why)) => {
                tracing::warn!(feed = %spec.name, %why, "the feed failed; starting it again");
                cx.set(|s| s.last_error = Some(why));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

enum Stop {
    HistoryLost,
    Fatal(String),
    Retry(String),
}

impl From<FollowError> for Stop {
    fn from(e: FollowError) -> Stop {
        match e {
            FollowError::HistoryLost { .. } => Stop::HistoryLost,
            FollowError::Log(ref log) if log_error_is_permanent(log) => Stop::Fatal(e.to_string()),
            e @ (FollowError::Log(_) | FollowError::Refused(_)) => Stop::Retry(e.to_string()),
        }
    }
}

/// Whether a log error will not pass by itself: a configuration that cannot work, or a log that
/// is not the one the feed follows. Any other (a broker down or electing a leader, which librdkafka
/// reports under many codes) may pass: the feed starts again after a pause. A feed stopped for
/// good on a Kafka failover once lost its history: its checkpoint fell below the GC timestamp
/// while it waited for a restart.
fn log_error_is_permanent(e: &causeway_txlog::Error) -> bool {
    use causeway_txlog::Error::*;
    matches!(
        e,
        Config { .. }
            | TooManyPartitions { .. }
            | BeyondEnd { .. }
            | Corrupt { .. }
            | UnknownFormatVersion { .. }
            | RecordTooLarge { .. }
    )
}

/// Batches events within the sink's limits and delivers them with the checkpoint after them.
struct Batcher {
    events: Vec<Event>,
    bytes: usize,
    since: Option<Instant>,
    limits: (usize, usize, Duration),
}

impl Batcher {
    fn push(&mut self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            self.bytes += approximate_bytes(&e);
            self.events.push(e);
            self.since.get_or_insert_with(Instant::now);
        }
    }

    fn full(&self) -> bool {
        let (max_events, max_bytes, max_delay) = self.limits;
        self.events.len() >= max_events
            || self.bytes >= max_bytes
            || self.since.is_some_and(|t| t.elapsed() >= max_delay)
            || self.events.last().is_some_and(|e| !e.is_change())
    }

    /// How long the batch may still wait for more.
    fn wait(&self, idle: Duration) -> Duration {
        match self.since {
            Some(t) => self.limits.2.saturating_sub(t.elapsed()),
            None => idle,
        }
    }

    fn take(&mut self) -> Vec<Event> {
        self.bytes = 0;
        self.since = None;
        std::mem::take(&mut self.events)
    }
}

fn approximate_bytes(e: &Event) -> usize {
    match &e.body {
        Body::Change(c) => {
            300 + c.after.as_ref().map_or(0, |a| a.get().len())
                + c.before
                    .as_ref()
                    .and_then(|b| b.as_ref())
                    .map_or(0, |b| b.get().len())
        }
        _ => 300,
    }
}

async fn deliver(
    sink: &mut Sink,
    events: Vec<Event>,
    checkpoint: Option<Position>,
    cx: &Context,
    stop: &watch::Receiver<bool>,
) -> Result<(), Stop> {
    if events.is_empty() {
        return Ok(());
    }
    let now = follow::now_ms();
    let changes: Vec<u64> = events
        .iter()
        .filter(|e| e.is_change())
        .map(|e| now.saturating_sub(e.time_ms))
        .collect();
    let count = events.len();
    // One follower round may hand over more than a batch may hold (a group of 512 records of
    // multi-document transactions, a feed catching up): the batch goes in pieces within the
    // sink's limits, each with the checkpoint after its last event (a position inside a
    // transaction is a valid cursor).
    let (max_events, max_bytes, _) = sink.batch_limits();
    let mut pieces = Vec::new();
    let mut piece = Vec::new();
    let mut bytes = 0;
    for e in events {
        let size = approximate_bytes(&e);
        if !piece.is_empty() && (piece.len() >= max_events.max(1) || bytes + size > max_bytes) {
            pieces.push(std::mem::take(&mut piece));
            bytes = 0;
        }
        bytes += size;
        piece.push(e);
    }
    pieces.push(piece);
    let last = pieces.len() - 1;
    for (i, mut batch) in pieces.into_iter().enumerate() {
        let checkpoint = match checkpoint {
            Some(c) if i == last => Some(c),
            Some(_) => batch.last().map(|e| e.position),
            None => None,
        };
        loop {
            match sink
                .deliver(batch, checkpoint, stop)
                .await
                .map_err(Stop::Retry)?
            {
                Delivered::All => break,
                Delivered::Gap(gap) => batch = vec![gap],
            }
        }
    }
    cx.metrics.delivered(count as u64, &changes);
    if let Some(c) = checkpoint {
        cx.set(|s| s.checkpoint = Some(c.id()));
    }
    Ok(())
}

async fn run_once(spec: &FeedSpec, cx: &Context, stop: &watch::Receiver<bool>) -> Result<(), Stop> {
    cx.set(|s| {
        s.state = "starting".into();
    });
    let selection = Arc::new(spec.selection().map_err(|e| Stop::Fatal(e.to_string()))?);
    let (mut sink, checkpoint) = Sink::open(spec, &cx.state_dir).await.map_err(Stop::Retry)?;
    let hold = Hold::start(
        Arc::clone(&cx.nodes),
        format!("causeway-cdc/{}", spec.name),
        cx.hold,
    );
    let mut batcher = Batcher {
        events: Vec::new(),
        bytes: 0,
        since: None,
        limits: sink.batch_limits(),
    };
    let cursor = match checkpoint {
        Some(c) => c,
        None => {
            let start = match spec.start {
                Start::Now => Follower::now(&cx.log).await?,
                Start::After(ts) => Position::end_of(ts),
                Start::InitialScan => {
                    cx.set(|s| s.state = "scanning".into());
                    // The snapshot is held from the moment it is chosen until the scan is done
                    // (the feed's own hold takes over at it).
                    let (snapshot, scan_hold) =
                        crate::hold::snapshot(&cx.nodes, cx.hold.protect_max_age)
                            .await
                            .map_err(|s| {
                                Stop::Retry(format!(
                                    "holding the initial scan's snapshot: {}",
                                    s.message()
                                ))
                            })?;
                    hold.set(snapshot);
                    initial_scan(&mut sink, &selection, snapshot, cx, stop).await?;
                    drop(scan_hold);
                    Position::end_of(snapshot)
                }
            };
            // The start is the first checkpoint, so a restart does not move it.
            let first = Event {
                position: start,
                time_ms: follow::now_ms(),
                body: Body::Resolved { ts: start.ts },
            };
            deliver(&mut sink, vec![first], Some(start), cx, stop).await?;
            start
        }
    };
    cx.set(|s| {
        s.checkpoint = Some(cursor.id());
        s.last_error = None;
    });
    hold.set(cursor.resolved());
    let mut follower = Follower::new(
        cx.log.clone(),
        Arc::clone(&cx.nodes),
        Arc::clone(&selection),
        cursor,
        Tuning::default(),
    );
    if let Err(e) = follower.check_resume().await {
        return lost(&mut sink, e, cx, stop).await;
    }
    cx.set(|s| s.state = "running".into());
    let mut next_resolved = Instant::now() + cx.resolved_interval;
    let mut ust_samples = UstSamples::default();
    loop {
        let wait = batcher
            .wait(next_resolved.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        match follower.next(wait).await {
            Ok(events) => batcher.push(events),
            Err(e @ FollowError::HistoryLost { .. }) => {
                let events = batcher.take();
                deliver(&mut sink, events, Some(follower.cursor()), cx, stop).await?;
                return lost(&mut sink, e, cx, stop).await;
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= next_resolved {
            let ts = follower.resolved();
            batcher.push([Event {
                position: Position::end_of(ts),
                time_ms: follow::now_ms(),
                body: Body::Resolved { ts },
            }]);
            next_resolved = Instant::now() + cx.resolved_interval;
            observe_lag(cx, ts, &mut ust_samples).await;
        }
        if batcher.full() {
            let checkpoint = follower.cursor();
            deliver(&mut sink, batcher.take(), Some(checkpoint), cx, stop).await?;
            hold.set(checkpoint.resolved());
            cx.set(|s| s.resolved = follower.resolved().get());
        }
    }
}

/// When the UST passed each ts, as far as a feed samples it: how long ago the UST first went
/// past the feed's resolved ts is the feed's lag in time. Samples come with the resolved
/// events, so the lag is known to within `resolved_interval` (an underestimate by at most it).
#[derive(Debug, Default)]
struct UstSamples {
    /// Rising UST values and when each was first seen.
    seen: std::collections::VecDeque<(Timestamp, Instant)>,
}

impl UstSamples {
    /// Takes in the UST at `now`; answers the lag of a feed resolved up to `resolved`.
    fn lag(&mut self, ust: Timestamp, resolved: Timestamp, now: Instant) -> Duration {
        if self.seen.back().is_none_or(|&(last, _)| ust > last) {
            self.seen.push_back((ust, now));
        }
        while self.seen.front().is_some_and(|&(u, _)| u <= resolved) {
            self.seen.pop_front();
        }
        self.seen
            .front()
            .map_or(Duration::ZERO, |&(_, at)| now.duration_since(at))
    }
}

async fn observe_lag(cx: &Context, resolved: Timestamp, samples: &mut UstSamples) {
    let Ok(ust) = follow::ust(&cx.nodes).await else {
        return;
    };
    let lag_ts = ust.get().saturating_sub(resolved.get());
    let lag_ms = samples.lag(ust, resolved, Instant::now()).as_millis() as u64;
    cx.set(|s| {
        s.ust = ust.get();
        s.lag_ts = lag_ts;
        s.lag_ms = lag_ms;
    });
    cx.metrics.lag(lag_ts, lag_ms);
}

async fn initial_scan(
    sink: &mut Sink,
    selection: &Arc<Selection>,
    snapshot: Timestamp,
    cx: &Context,
    stop: &watch::Receiver<bool>,
) -> Result<(), Stop> {
    let mut scan = follow::Scan::new(Arc::clone(&cx.nodes), Arc::clone(selection), snapshot);
    let max_events = sink.batch_limits().0.max(1);
    while let Some(events) = scan.next().await? {
        for chunk in events.chunks(max_events) {
            // Scan events carry no checkpoint: an interrupted scan starts over.
            deliver(sink, chunk.to_vec(), None, cx, stop).await?;
        }
    }
    Ok(())
}

async fn lost(
    sink: &mut Sink,
    e: FollowError,
    cx: &Context,
    stop: &watch::Receiver<bool>,
) -> Result<(), Stop> {
    let FollowError::HistoryLost {
        checkpoint,
        lost_below,
    } = e
    else {
        return Err(e.into());
    };
    tracing::error!(checkpoint = %checkpoint, lost_below = lost_below.get(), "the feed's history is gone; it stops (delete it and create it again with an initial scan)");
    let event = Event {
        position: checkpoint,
        time_ms: follow::now_ms(),
        body: Body::HistoryLost {
            checkpoint,
            lost_below,
        },
    };
    deliver(sink, vec![event], None, cx, stop).await?;
    cx.set(|s| s.last_error = Some(format!("history lost below ts {}", lost_below.get())));
    Err(Stop::HistoryLost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_retries_after_a_log_error_that_may_pass_and_stops_on_one_that_cannot() {
        use causeway_txlog::Error;
        let stop = |e| Stop::from(FollowError::Log(e));
        for passing in [
            Error::Unavailable {
                what: "fetch watermarks: leader not available".into(),
                source: None,
            },
            Error::Closed,
            Error::UnknownTopic { topic: "t".into() },
            // What a feed once stopped on for good, during a Kafka failover.
            Error::Kafka {
                op: "fetch watermarks",
                source: rdkafka::error::KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                ),
            },
        ] {
            assert!(matches!(stop(passing), Stop::Retry(_)));
        }
        assert!(matches!(
            stop(Error::Config { what: "x".into() }),
            Stop::Fatal(_)
        ));
        assert!(matches!(
            stop(Error::BeyondEnd {
                position: Timestamp(9),
                next: Timestamp(3)
            }),
            Stop::Fatal(_)
        ));
    }

    #[test]
    fn the_lag_in_time_is_since_the_ust_first_passed_the_resolved_ts() {
        let mut samples = UstSamples::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Caught up: no lag.
        assert_eq!(
            samples.lag(Timestamp(10), Timestamp(10), at(0)),
            Duration::ZERO
        );
        // The UST moved to 20 at 1 s; the feed is still at 10.
        assert_eq!(
            samples.lag(Timestamp(20), Timestamp(10), at(1_000)),
            Duration::ZERO
        );
        assert_eq!(
            samples.lag(Timestamp(30), Timestamp(10), at(2_000)),
            Duration::from_secs(1)
        );
        // The feed passed 20: its lag counts from when the UST passed 20 (2 s).
        assert_eq!(
            samples.lag(Timestamp(30), Timestamp(25), at(2_500)),
            Duration::from_millis(500)
        );
        assert_eq!(
            samples.lag(Timestamp(30), Timestamp(30), at(3_000)),
            Duration::ZERO
        );
        assert!(samples.seen.is_empty());
    }
}
