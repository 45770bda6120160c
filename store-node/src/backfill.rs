//! Backfill between store nodes (DESIGN.md §10 step 2): how a node that gains intervals in the
//! next configuration gets their data while the log keeps flowing.
//!
//! **The plan.** When a node learns of a next configuration it makes a [`Plan`]: one entry per
//! gained interval, with the position `start` from which it stores that interval's mutations (as
//! pending). A node new to the cluster first moves its applied position to the log's end. The
//! plan is durable (one meta record, rewritten after every chunk), so a restart resumes it.
//!
//! **One interval.** The receiver asks a live current owner for the interval as of a snapshot
//! `upto ≥ start - 1` (the source picks it the first time, then it is fixed), holds its own read
//! at `upto` (so the GC timestamp of every node stays at or below it until the interval is done),
//! ingests the chunks, and records the resume key after each. Each chunk carries the source's
//! digest at `upto` of the documents it covers; the receiver's own digest of them must equal
//! it (the chunks cover the interval, and each check is bounded work). Then the pending
//! mutations above `upto` are replayed (the last of them with the apply loop held off) and the
//! interval is owned outright.
//! A source that fails mid-stream is replaced by another owner, resuming from the last chunk; a
//! snapshot pruned at the source or a digest mismatch starts the interval over.
//!
//! **The source** ([`serve`]) streams bounded chunks pulled by the receiver (gRPC flow control),
//! holding its GC timestamp at `upto` while the stream is open.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_core::{
    ClusterConfig, Epoch, Interval, NodeId, PartitionId, ReadTimestamp, Timestamp,
};
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_txlog::TxLog;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Response, Status};
use tracing::{info, warn};

use crate::grpc::{endpoint, interval_from_proto, interval_to_proto, storage_status};
use crate::service::Error;
use crate::state::{lock, ReadGuard, Shared};
use crate::storage::{BackfillRecord, Ownership};

/// The meta record that holds the plan.
const PLAN: &str = "transition-plan";

/// The chunks of one interval, as the source streams them.
pub type ChunkStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackfillChunk, Status>> + Send>>;

/// What this node does to join the next configuration: durable, rewritten as it progresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The epoch of the next configuration.
    pub epoch: Epoch,
    /// The node promised never to backfill for this epoch (an abort asked it to).
    pub vetoed: bool,
    pub intervals: Vec<IntervalPlan>,
}

/// One gained interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalPlan {
    pub interval: Interval,
    pub from_partition: PartitionId,
    /// The first ts whose mutations of this interval the node stores (as pending).
    pub start: Timestamp,
    /// The snapshot being backfilled, once a source has chosen it.
    pub upto: Option<Timestamp>,
    /// Where the next chunk starts; `None` = the interval's start.
    pub next_key: Option<Vec<u8>>,
    /// Every chunk is in and the digest matched: from here on the interval is only replayed,
    /// never started over (the replay has consumed pending mutations).
    #[serde(default)]
    pub verified: bool,
    /// Backfilled, verified and replayed: the node owns the interval outright.
    pub done: bool,
    pub source: Option<NodeId>,
    pub records: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub estimated_bytes: u64,
    pub restarts: u32,
}

impl Plan {
    /// The plan of `node` for the transition `current` → `next`, storing from `start`.
    pub fn new(
        current: &ClusterConfig,
        next: &ClusterConfig,
        node: NodeId,
        start: Timestamp,
    ) -> Plan {
        let intervals = current
            .gains(next, node)
            .into_iter()
            .map(|g| IntervalPlan {
                interval: g.interval,
                from_partition: g.from_partition,
                start,
                upto: None,
                next_key: None,
                verified: false,
                done: false,
                source: None,
                records: 0,
                bytes: 0,
                chunks: 0,
                estimated_bytes: 0,
                restarts: 0,
            })
            .collect();
        Plan {
            epoch: next.epoch,
            vetoed: false,
            intervals,
        }
    }

    /// Every gained interval is in, and no veto: what the node gossips as `backfilled`.
    pub fn backfilled(&self) -> bool {
        !self.vetoed && self.intervals.iter().all(|i| i.done)
    }

    /// What the node stores: its current intervals and the done ones outright, the others as
    /// pending.
    pub fn ownership(&self, current_owned: Vec<Interval>) -> Ownership {
        let mut owned = current_owned;
        let mut pending = Vec::new();
        for i in &self.intervals {
            if i.done {
                owned.push(i.interval);
            } else {
                pending.push(i.interval);
            }
        }
        Ownership { owned, pending }
    }

    pub fn status(&self) -> pb::BackfillStatus {
        let sum = |f: fn(&IntervalPlan) -> u64| self.intervals.iter().map(f).sum::<u64>();
        pb::BackfillStatus {
            epoch: self.epoch.get(),
            intervals_total: self.intervals.len() as u32,
            intervals_done: self.intervals.iter().filter(|i| i.done).count() as u32,
            bytes_done: sum(|i| i.bytes),
            bytes_estimated: sum(|i| i.estimated_bytes.max(i.bytes)),
            records_done: sum(|i| i.records),
            chunks_done: sum(|i| i.chunks),
            backfilled: self.backfilled(),
            vetoed: self.vetoed,
            restarts: self.intervals.iter().map(|i| i.restarts).sum(),
        }
    }
}

/// Loads the saved plan (and takes up its GC holds) when the node starts.
pub fn load(shared: &Shared) -> Result<(), Error> {
    let Some(bytes) = shared.store.meta(PLAN)? else {
        return Ok(());
    };
    let plan: Plan = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Apply(format!("the saved transition plan does not parse: {e}")))?;
    info!(epoch = %plan.epoch, intervals = plan.intervals.len(),
        done = plan.intervals.iter().filter(|i| i.done).count(), "resuming the transition plan");
    let mut holds = lock(&shared.backfill_holds);
    for i in plan.intervals.iter().filter(|i| !i.done) {
        if let Some(upto) = i.upto {
            holds.push((i.interval, hold(shared, upto)));
        }
    }
    drop(holds);
    *lock(&shared.plan) = Some(plan);
    Ok(())
}

/// A read at `upto` in the current epoch: it keeps every node's GC timestamp at or below the
/// snapshot being backfilled (its gossip carries it), across source failures.
fn hold(shared: &Shared, upto: Timestamp) -> ReadGuard {
    let epoch = shared
        .configs()
        .current
        .as_ref()
        .map_or(Epoch::ZERO, |c| c.epoch);
    shared.reads.register(ReadTimestamp { epoch, ts: upto })
}

fn release_hold(shared: &Shared, interval: &Interval) {
    lock(&shared.backfill_holds).retain(|(i, _)| i != interval);
}

/// Saves `plan` (`None`: no plan), then makes it the one in memory: the node never gossips a
/// state of its plan that a restart could forget. Callers hold `plan_writer`.
async fn save(shared: &Arc<Shared>, plan: Option<Plan>) -> Result<(), Error> {
    let bytes = plan
        .as_ref()
        .map(|p| serde_json::to_vec(p).expect("plan serializes"));
    let store = Arc::clone(&shared.store);
    tokio::task::spawn_blocking(move || store.put_meta(PLAN, bytes.as_deref()))
        .await
        .expect("save plan task")?;
    *lock(&shared.plan) = plan;
    Ok(())
}

/// Changes the plan (if it is still for `epoch` and not vetoed) and saves it. `Ok(false)` when
/// the plan is no longer that one.
async fn update(
    shared: &Arc<Shared>,
    epoch: Epoch,
    f: impl FnOnce(&mut Plan),
) -> Result<bool, Error> {
    let _writer = shared.plan_writer.lock().await;
    let mut plan = match lock(&shared.plan).clone() {
        Some(p) if p.epoch == epoch && !p.vetoed => p,
        _ => return Ok(false),
    };
    f(&mut plan);
    save(shared, Some(plan)).await?;
    Ok(true)
}

/// Follows the configurations: makes the plan when a transition appears, backfills it, and once
/// no transition runs, drops the plan and every interval the node no longer owns.
pub async fn transition_loop(
    shared: Arc<Shared>,
    log: TxLog,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut configs = shared.configs.subscribe();
    let mut settled = None;
    loop {
        let snapshot = shared.configs();
        let mut retry = false;
        if let Some(current) = snapshot.current.clone() {
            match snapshot.transition().cloned() {
                Some(next) if next.contains(shared.node) || current.contains(shared.node) => {
                    settled = None;
                    shared.drained.store(false, Ordering::Relaxed);
                    make_plan(&shared, &log, &current, &next).await?;
                    retry = !backfill_all(&shared, &current, &next, &stop).await?;
                }
                Some(_) => {}
                None => {
                    if settled != Some(current.epoch) {
                        settle(&shared, &current).await?;
                        settled = Some(current.epoch);
                    }
                }
            }
        }
        let pause = if retry {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            r = configs.changed() => if r.is_err() { return Ok(()) },
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Makes the plan for `next` if the node has none for it. Holds the apply loop off meanwhile,
/// so every record after `start` is applied with the plan's ownership.
async fn make_plan(
    shared: &Arc<Shared>,
    log: &TxLog,
    current: &ClusterConfig,
    next: &ClusterConfig,
) -> Result<(), Error> {
    if lock(&shared.plan)
        .as_ref()
        .is_some_and(|p| p.epoch == next.epoch)
    {
        return Ok(());
    }
    let _writer = shared.plan_writer.lock().await;
    let _gate = shared.apply_gate.lock().await;
    if lock(&shared.plan)
        .as_ref()
        .is_some_and(|p| p.epoch == next.epoch)
    {
        return Ok(()); // a veto came first
    }
    if lock(&shared.plan).is_some() {
        // The plan of a transition that is gone (aborted, and the pair without next was never
        // seen): what it took in must not outlive it.
        drop_not_owned(shared, current).await?;
    }
    if !current.contains(shared.node) {
        // Nothing of the current configuration is stored here: start at the log's end.
        let end = match log.bounds().await {
            Ok(bounds) => bounds.next.get().saturating_sub(1),
            Err(e) => {
                warn!(error = %e, "cannot read the log's end; the plan is made later");
                return Ok(());
            }
        };
        let store = Arc::clone(&shared.store);
        tokio::task::spawn_blocking(move || store.skip_to(Timestamp(end)))
            .await
            .expect("skip task")?;
    }
    let start = Timestamp(shared.store.applied().get() + 1);
    let plan = Plan::new(current, next, shared.node, start);
    info!(epoch = %next.epoch, %start, intervals = plan.intervals.len(), "transition plan made");
    lock(&shared.backfill_holds).clear();
    save(shared, Some(plan)).await
}

/// Backfills every interval of the plan that is not done. `Ok(false)` when some interval must be
/// tried again later (no source yet, a failure) or the transition changed.
async fn backfill_all(
    shared: &Arc<Shared>,
    current: &ClusterConfig,
    next: &ClusterConfig,
    stop: &watch::Receiver<bool>,
) -> Result<bool, Error> {
    let todo: Vec<usize> = match &*lock(&shared.plan) {
        Some(p) if p.epoch == next.epoch && !p.vetoed => p
            .intervals
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.done)
            .map(|(k, _)| k)
            .collect(),
        Some(p) if p.epoch == next.epoch => return Ok(true), // vetoed: nothing to do
        _ => return Ok(false),                               // no plan yet: later
    };
    let mut complete = true;
    for k in todo {
        if *stop.borrow() || still_next(shared) != Some(next.epoch) {
            return Ok(false);
        }
        complete &= backfill_interval(shared, current, next.epoch, k).await?;
    }
    Ok(complete)
}

fn still_next(shared: &Shared) -> Option<Epoch> {
    shared.configs().transition().map(|n| n.epoch)
}

/// Why one attempt at an interval did not finish.
enum Failure {
    /// Start the interval over (snapshot pruned at the source, digest mismatch).
    Restart(String),
    /// Try another source, or later.
    Retry(String),
    /// The plan changed under the attempt (veto, another transition).
    Gone,
}

/// One interval: tries its live current owners in turn. `Ok(true)` when it is done.
async fn backfill_interval(
    shared: &Arc<Shared>,
    current: &ClusterConfig,
    epoch: Epoch,
    k: usize,
) -> Result<bool, Error> {
    let Some(entry) = plan_entry(shared, epoch, k) else {
        return Ok(false);
    };
    if entry.verified {
        // Stopped during its replay (a restart): finish it.
        finish(shared, current, epoch, k).await?;
        return Ok(true);
    }
    for source in sources(shared, current, &entry) {
        let Some(info) = current.nodes.get(&source) else {
            continue;
        };
        match stream_from(shared, current, epoch, k, source, &info.addr).await? {
            Ok(()) => return Ok(true),
            Err(Failure::Gone) => return Ok(false),
            Err(Failure::Restart(why)) => {
                warn!(interval = ?entry.interval, %source, why, "backfill starts the interval over");
                restart(shared, epoch, k).await?;
                return Ok(false);
            }
            Err(Failure::Retry(why)) => {
                warn!(interval = ?entry.interval, %source, why, "backfill from this source failed");
            }
        }
    }
    Ok(false)
}

fn plan_entry(shared: &Shared, epoch: Epoch, k: usize) -> Option<IntervalPlan> {
    match &*lock(&shared.plan) {
        Some(p) if p.epoch == epoch && !p.vetoed => p.intervals.get(k).cloned(),
        _ => None,
    }
}

/// The owners to ask, best first: the last source if it is still alive, then the other live
/// replicas of the interval's current partition.
fn sources(shared: &Shared, current: &ClusterConfig, entry: &IntervalPlan) -> Vec<NodeId> {
    let now = shared.now_ms();
    let p = lock(&shared.protocol);
    let mut out: Vec<NodeId> = current
        .replicas_of(entry.from_partition)
        .iter()
        .copied()
        .filter(|&n| n != shared.node && !current.failed.contains(&n))
        .filter(|&n| p.table.is_alive(n, now, shared.tuning.liveness_timeout_ms))
        .collect();
    drop(p);
    if let Some(last) = entry.source {
        if let Some(pos) = out.iter().position(|&n| n == last) {
            out.swap(0, pos);
        }
    }
    out
}

/// Drops what was ingested of interval `k` and clears its progress (its pending mutations stay).
async fn restart(shared: &Arc<Shared>, epoch: Epoch, k: usize) -> Result<(), Error> {
    let Some(entry) = plan_entry(shared, epoch, k) else {
        return Ok(());
    };
    let store = Arc::clone(&shared.store);
    let interval = entry.interval;
    tokio::task::spawn_blocking(move || store.drop_documents(&[interval]))
        .await
        .expect("drop task")?;
    release_hold(shared, &interval);
    update(shared, epoch, |p| {
        let i = &mut p.intervals[k];
        i.upto = None;
        i.next_key = None;
        i.records = 0;
        i.bytes = 0;
        i.chunks = 0;
        i.restarts += 1;
    })
    .await?;
    Ok(())
}

/// Streams interval `k` from `source` to its end, verifies and replays it.
async fn stream_from(
    shared: &Arc<Shared>,
    current: &ClusterConfig,
    epoch: Epoch,
    k: usize,
    source: NodeId,
    addr: &str,
) -> Result<Result<(), Failure>, Error> {
    let Some(entry) = plan_entry(shared, epoch, k) else {
        return Ok(Err(Failure::Gone));
    };
    let tuning = &shared.tuning;
    // The HTTP/2 window is what the source may send ahead of what this node has taken: about
    // two chunks, so a stream holds little memory and the rate bound reaches the source.
    let window = (2 * tuning.backfill_chunk_bytes).clamp(64 << 10, 16 << 20);
    let endpoint = match endpoint(&shared.link, source, addr) {
        Ok(endpoint) => endpoint,
        Err(e) => return Ok(Err(Failure::Retry(e.to_string()))),
    };
    let channel = endpoint
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect_lazy();
    let mut client =
        StoreNodeClient::new(shared.link.channel(channel)).max_decoding_message_size(256 << 20);
    let request = pb::BackfillRequest {
        epoch: epoch.get(),
        interval: Some(interval_to_proto(&entry.interval)),
        upto: entry.upto.map_or(0, Timestamp::get),
        min_upto: entry.start.get().saturating_sub(1),
        from_key: entry.next_key.clone().unwrap_or_default(),
        max_records: tuning.backfill_chunk_records,
        max_bytes: tuning.backfill_chunk_bytes,
        timeout_ms: tuning.backfill_wait_ms,
    };
    let wait =
        Duration::from_millis(u64::from(tuning.backfill_wait_ms) + tuning.peer_rpc_timeout_ms);
    let opened = tokio::time::timeout(wait, client.backfill(request)).await;
    let mut stream = match opened {
        Err(_) => {
            return Ok(Err(Failure::Retry(
                "the source did not answer in time".into(),
            )))
        }
        Ok(Err(s)) if crate::grpc::is_too_old(&s) => {
            return Ok(Err(Failure::Restart(s.message().to_owned())))
        }
        Ok(Err(s)) => return Ok(Err(Failure::Retry(s.to_string()))),
        Ok(Ok(r)) => r.into_inner(),
    };
    let chunk_wait = Duration::from_millis(tuning.peer_rpc_timeout_ms.max(5_000));
    let started = Instant::now();
    let mut streamed = 0u64;
    loop {
        // The rate bound: the next chunk is pulled only once the bytes so far are within it.
        if let Some(due) = Duration::from_secs_f64(
            streamed as f64 / tuning.backfill_bytes_per_second.max(1) as f64,
        )
        .checked_sub(started.elapsed())
        .filter(|_| tuning.backfill_bytes_per_second > 0)
        {
            tokio::time::sleep(due).await;
        }
        let chunk = match tokio::time::timeout(chunk_wait, stream.message()).await {
            Err(_) => return Ok(Err(Failure::Retry("no chunk in time".into()))),
            Ok(Err(s)) if crate::grpc::is_too_old(&s) => {
                return Ok(Err(Failure::Restart(s.message().to_owned())))
            }
            Ok(Err(s)) => return Ok(Err(Failure::Retry(s.to_string()))),
            Ok(Ok(None)) => return Ok(Err(Failure::Retry("the stream ended early".into()))),
            Ok(Ok(Some(chunk))) => chunk,
        };
        let upto = Timestamp(chunk.upto);
        let Some(entry) =
            plan_entry(shared, epoch, k).filter(|_| still_next(shared) == Some(epoch))
        else {
            return Ok(Err(Failure::Gone));
        };
        match entry.upto {
            None => {
                if upto.get() + 1 < entry.start.get() {
                    return Ok(Err(Failure::Retry(format!(
                        "the source offered snapshot {upto}, below {}",
                        entry.start.get() - 1
                    ))));
                }
                lock(&shared.backfill_holds).push((entry.interval, hold(shared, upto)));
            }
            Some(fixed) if fixed != upto => {
                return Ok(Err(Failure::Retry(format!(
                    "the source sent snapshot {upto}, not {fixed}"
                ))));
            }
            Some(_) => {}
        }
        let records: Vec<BackfillRecord> = chunk
            .records
            .into_iter()
            .map(|r| BackfillRecord {
                key: r.key,
                value: r.value,
            })
            .collect();
        let bytes: u64 = records
            .iter()
            .map(|r| (r.key.len() + r.value.len()) as u64)
            .sum();
        let count = records.len() as u64;
        streamed += bytes;
        let store = Arc::clone(&shared.store);
        let ingested = tokio::task::spawn_blocking(move || store.ingest(&records))
            .await
            .expect("ingest task");
        if let Err(e) = ingested {
            return Ok(Err(Failure::Restart(format!(
                "a chunk does not ingest: {e}"
            ))));
        }
        let m = &shared.metrics;
        m.backfill_records_received_total
            .fetch_add(count, Ordering::Relaxed);
        m.backfill_bytes_received_total
            .fetch_add(bytes, Ordering::Relaxed);
        let next_key = (!chunk.next_key.is_empty()).then_some(chunk.next_key);
        match verify(shared, &entry, upto, next_key.as_deref(), &chunk.digest).await? {
            Verified::Yes => {}
            Verified::Mismatch(why) => return Ok(Err(Failure::Restart(why))),
            Verified::NotYet(why) => return Ok(Err(Failure::Retry(why))),
        }
        let kept = update(shared, epoch, |p| {
            let i = &mut p.intervals[k];
            i.upto = Some(upto);
            i.next_key = next_key;
            i.source = Some(source);
            i.records += count;
            i.bytes += bytes;
            i.chunks += 1;
            if chunk.estimated_bytes > 0 {
                i.estimated_bytes = chunk.estimated_bytes;
            }
        })
        .await?;
        if !kept {
            return Ok(Err(Failure::Gone));
        }
        if chunk.done {
            if !update(shared, epoch, |p| p.intervals[k].verified = true).await? {
                return Ok(Err(Failure::Gone));
            }
            finish(shared, current, epoch, k).await?;
            return Ok(Ok(()));
        }
    }
}

/// What the receiver's digest of an interval says against the source's.
enum Verified {
    Yes,
    /// The data differs: start the interval over.
    Mismatch(String),
    /// This node has not applied up to the snapshot yet: try again (from the last chunk).
    NotYet(String),
}

/// The receiver's digest of a chunk (from `entry.next_key` to `next`) at `upto` must equal the
/// source's: the chunks cover the interval, so the whole interval is checked, each part as it
/// comes.
async fn verify(
    shared: &Arc<Shared>,
    entry: &IntervalPlan,
    upto: Timestamp,
    next: Option<&[u8]>,
    theirs: &str,
) -> Result<Verified, Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.store.applied() < upto {
        if Instant::now() >= deadline {
            return Ok(Verified::NotYet(format!(
                "this node did not apply up to {upto} in time"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = Arc::clone(&shared.store);
    let (interval, from) = (entry.interval, entry.next_key.clone());
    let next = next.map(<[u8]>::to_vec);
    let ours = tokio::task::spawn_blocking(move || {
        chunk_digest(&store, &interval, from.as_deref(), next.as_deref(), upto)
    })
    .await
    .expect("digest task");
    Ok(match ours {
        Ok(d) if format!("{d:032x}") == theirs => Verified::Yes,
        Ok(d) => Verified::Mismatch(format!(
            "digest mismatch at {upto}: ours {d:032x}, the source's {theirs}"
        )),
        Err(e) => Verified::Mismatch(format!("no digest at {upto}: {e}")),
    })
}

/// Replays the interval's pending mutations (the last ones with the apply loop held off) and
/// marks it done: from then on its mutations are applied directly.
async fn finish(
    shared: &Arc<Shared>,
    current: &ClusterConfig,
    epoch: Epoch,
    k: usize,
) -> Result<(), Error> {
    let Some(entry) = plan_entry(shared, epoch, k) else {
        return Ok(());
    };
    let step = 2_000;
    let upto = entry.upto.expect("a verified interval has its snapshot");
    let replay = |limit| {
        let store = Arc::clone(&shared.store);
        let interval = entry.interval;
        async move {
            tokio::task::spawn_blocking(move || store.replay_pending(&interval, upto, limit))
                .await
                .expect("replay task")
        }
    };
    let mut replayed = 0;
    loop {
        let n = replay(step).await?;
        replayed += n;
        if n < step {
            break;
        }
    }
    let gate = shared.apply_gate.lock().await;
    loop {
        let n = replay(step).await?;
        replayed += n;
        if n == 0 {
            break;
        }
    }
    update(shared, epoch, |p| p.intervals[k].done = true).await?;
    drop(gate);
    release_hold(shared, &entry.interval);
    shared
        .metrics
        .backfill_intervals_done_total
        .fetch_add(1, Ordering::Relaxed);
    info!(interval = ?entry.interval, from = %current.epoch, to = %epoch, upto = ?entry.upto,
        records = entry.records, replayed, "interval backfilled");
    Ok(())
}

/// No transition runs: the plan is over (installed or aborted). Drops it, and every document the
/// node does not own in `current` (all of them when it left the configuration).
async fn settle(shared: &Arc<Shared>, current: &ClusterConfig) -> Result<(), Error> {
    let _writer = shared.plan_writer.lock().await;
    let _gate = shared.apply_gate.lock().await;
    drop_not_owned(shared, current).await?;
    // The plan goes last: a node without one has dropped what it does not own.
    if lock(&shared.plan).is_some() {
        save(shared, None).await?;
    }
    lock(&shared.backfill_holds).clear();
    // Drained: it was in an earlier configuration and is not in this one (a spare that never
    // joined is not drained, only idle).
    let was_member = shared.store.configs()?.iter().any(|(_, json)| {
        serde_json::from_slice::<ClusterConfig>(json).is_ok_and(|c| c.contains(shared.node))
    });
    let drained = !current.contains(shared.node) && was_member;
    shared.drained.store(drained, Ordering::Relaxed);
    if drained {
        info!(epoch = %current.epoch, "this node left the configuration: its data is dropped and it serves nothing");
    }
    Ok(())
}

/// Drops every document and pending mutation outside what the node owns in `current`. Call
/// under the apply gate.
async fn drop_not_owned(shared: &Arc<Shared>, current: &ClusterConfig) -> Result<(), Error> {
    let dropped = complement(&current.owned_intervals(shared.node));
    if dropped.is_empty() {
        return Ok(());
    }
    let store = Arc::clone(&shared.store);
    tokio::task::spawn_blocking(move || store.drop_intervals(&dropped))
        .await
        .expect("drop task")?;
    Ok(())
}

/// The intervals of the keyspace outside `owned`.
fn complement(owned: &[Interval]) -> Vec<Interval> {
    let mut sorted: Vec<Interval> = owned.to_vec();
    sorted.sort_by_key(|i| i.start);
    let mut out = Vec::new();
    let mut at: u128 = 0;
    for i in sorted {
        if u128::from(i.start) > at {
            out.push(Interval::new(at as u64, u128::from(i.start)));
        }
        at = at.max(i.end);
    }
    if at < causeway_core::KEYSPACE {
        out.push(Interval::new(at as u64, causeway_core::KEYSPACE));
    }
    out
}

/// The source side of one interval's backfill.
pub async fn serve(
    shared: &Arc<Shared>,
    req: pb::BackfillRequest,
) -> Result<Response<ChunkStream>, Status> {
    let interval = interval_from_proto(
        req.interval
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("an interval is required"))?,
    )?;
    let configs = shared.configs();
    let current = configs
        .current
        .clone()
        .ok_or_else(|| Status::unavailable("this node has no configuration yet"))?;
    if configs.transition().map(|n| n.epoch) != Some(Epoch(req.epoch)) {
        return Err(Status::unavailable(format!(
            "this node knows no transition to epoch {}",
            req.epoch
        )));
    }
    let owns = current
        .owned_intervals(shared.node)
        .iter()
        .any(|o| o.start <= interval.start && interval.end <= o.end);
    if !owns {
        return Err(Status::unavailable(format!(
            "{} does not own {interval:?} in epoch {}",
            shared.node, current.epoch
        )));
    }
    if !req.from_key.is_empty() && !crate::storage::key_in(&interval, &req.from_key) {
        return Err(Status::invalid_argument(
            "from_key is not a key of the interval",
        ));
    }
    let upto = match req.upto {
        0 => Timestamp(req.min_upto).max(shared.decided().decisions.ust),
        u => Timestamp(u),
    };
    let permit = Arc::clone(&shared.backfill_streams)
        .try_acquire_owned()
        .map_err(|_| {
            Status::resource_exhausted(format!(
                "{} already serves {} backfill streams",
                shared.node, shared.tuning.backfill_max_streams
            ))
        })?;
    let held = shared.reads.register(ReadTimestamp {
        epoch: current.epoch,
        ts: upto,
    });
    let gc = shared
        .decided()
        .decisions
        .gc
        .max(shared.store.gc_watermark());
    if gc > upto {
        return Err(storage_status(crate::storage::Error::SnapshotTooOld {
            requested: upto,
            gc,
        }));
    }
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(req.timeout_ms.clamp(1, 60_000)));
    while shared.store.committed() < upto {
        if Instant::now() >= deadline {
            return Err(Status::deadline_exceeded(format!(
                "this node has not committed {upto} (at {})",
                shared.store.committed()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let limit = (req.max_records.clamp(1, 100_000)) as usize;
    let max_bytes = (req.max_bytes.clamp(1 << 10, 64 << 20)) as usize;
    let mut source = Source {
        shared: Arc::clone(shared),
        interval,
        upto,
        from: (!req.from_key.is_empty()).then_some(req.from_key),
        first: true,
        _held: held,
        _permit: permit,
    };
    // One chunk is made ahead; a receiver that takes none for `STREAM_IDLE` loses the stream
    // (and with it the hold on the GC timestamp). It resumes from its last chunk.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let chunk = source.next_chunk(limit, max_bytes).await;
            let last = chunk.as_ref().map_or(true, |c| c.done);
            if tx.send_timeout(chunk, STREAM_IDLE).await.is_err() || last {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok(Response::new(Box::pin(stream)))
}

/// How long an outgoing stream waits for its receiver to take the next chunk.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// The state of one outgoing backfill stream; the read it holds ends with it.
struct Source {
    shared: Arc<Shared>,
    interval: Interval,
    upto: Timestamp,
    from: Option<Vec<u8>>,
    first: bool,
    _held: ReadGuard,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Source {
    async fn next_chunk(
        &mut self,
        limit: usize,
        max_bytes: usize,
    ) -> Result<pb::BackfillChunk, Status> {
        let store = Arc::clone(&self.shared.store);
        let (interval, upto, from, first) =
            (self.interval, self.upto, self.from.take(), self.first);
        let made = tokio::task::spawn_blocking(move || {
            let gc = store.gc_watermark().min(upto);
            let batch =
                store.backfill_batch(&interval, gc, upto, from.as_deref(), limit, max_bytes)?;
            let digest = chunk_digest(
                &store,
                &interval,
                from.as_deref(),
                batch.next.as_deref(),
                upto,
            )?;
            let digest = format!("{digest:032x}");
            let estimated = if first {
                store.estimate_bytes(&interval)
            } else {
                0
            };
            Ok::<_, crate::storage::Error>((batch, digest, estimated))
        })
        .await
        .map_err(|e| Status::internal(format!("backfill task: {e}")))?
        .map_err(storage_status)?;
        let (batch, digest, estimated_bytes) = made;
        self.first = false;
        self.from.clone_from(&batch.next);
        let m = &self.shared.metrics;
        m.backfill_records_sent_total
            .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        m.backfill_chunks_sent_total.fetch_add(1, Ordering::Relaxed);
        Ok(pb::BackfillChunk {
            upto: upto.get(),
            records: batch
                .records
                .into_iter()
                .map(|r| pb::BackfillRecord {
                    key: r.key,
                    value: r.value,
                })
                .collect(),
            next_key: batch.next.clone().unwrap_or_default(),
            done: batch.next.is_none(),
            digest,
            estimated_bytes,
        })
    }
}

/// The digest, at `upto`, of the documents of one chunk: those of `interval` from `from` (its
/// start when `None`) to `next` (its end when `None`). Source and receiver compute it alike.
fn chunk_digest(
    store: &crate::storage::Store,
    interval: &Interval,
    from: Option<&[u8]>,
    next: Option<&[u8]>,
    upto: Timestamp,
) -> Result<u128, crate::storage::Error> {
    let (start, end) = crate::storage::interval_range(interval);
    store.digest_range(from.unwrap_or(&start), next.unwrap_or(&end), upto)
}

/// `VetoBackfill`: promises never to report backfilled for `epoch`, unless already done.
pub async fn veto(
    shared: &Arc<Shared>,
    epoch: Epoch,
) -> Result<Response<pb::VetoBackfillResponse>, Status> {
    let configs = shared.configs();
    let next = configs
        .transition()
        .filter(|n| n.epoch == epoch)
        .ok_or_else(|| Status::failed_precondition(format!("no transition to epoch {epoch} here")))?
        .clone();
    let current = configs
        .current
        .clone()
        .ok_or_else(|| Status::failed_precondition("no current configuration here"))?;
    if current.gains(&next, shared.node).is_empty() {
        return Err(Status::failed_precondition(format!(
            "{} gains nothing in epoch {epoch}: it has no backfill to veto",
            shared.node
        )));
    }
    let _writer = shared.plan_writer.lock().await;
    let plan = lock(&shared.plan).clone().filter(|p| p.epoch == epoch);
    if plan.as_ref().is_some_and(Plan::backfilled) {
        return Ok(Response::new(pb::VetoBackfillResponse {
            vetoed: false,
            backfilled: true,
        }));
    }
    // Not started yet: a vetoed plan that stores nothing. Else the plan, vetoed: what it has
    // ingested is dropped once the transition is gone.
    let mut plan = plan.unwrap_or(Plan {
        epoch: next.epoch,
        vetoed: false,
        intervals: Vec::new(),
    });
    plan.vetoed = true;
    save(shared, Some(plan))
        .await
        .map_err(|e| Status::internal(format!("cannot save the veto: {e}")))?;
    // A vetoed backfill holds no snapshot: the GC timestamp may move on.
    lock(&shared.backfill_holds).clear();
    let answer = pb::VetoBackfillResponse {
        vetoed: true,
        backfilled: false,
    };
    if answer.vetoed {
        info!(%epoch, "backfill vetoed: this node will not join epoch {epoch}");
    }
    Ok(Response::new(answer))
}

/// The backfill progress for `NodeStatus`.
pub fn status(shared: &Shared) -> Option<pb::BackfillStatus> {
    lock(&shared.plan).as_ref().map(Plan::status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_core::NodeInfo;

    fn infos(ids: std::ops::RangeInclusive<u64>) -> Vec<NodeInfo> {
        ids.map(|i| NodeInfo {
            id: NodeId(i),
            addr: format!("n{i}"),
        })
        .collect()
    }

    #[test]
    fn the_complement_covers_what_is_not_owned() {
        let full = causeway_core::KEYSPACE;
        assert_eq!(complement(&[]), vec![Interval::new(0, full)]);
        assert_eq!(complement(&[Interval::new(0, full)]), vec![]);
        let owned = [Interval::new(100, 200), Interval::new(10, 50)];
        assert_eq!(
            complement(&owned),
            vec![
                Interval::new(0, 10),
                Interval::new(50, 100),
                Interval::new(200, full)
            ]
        );
    }

    #[test]
    fn a_plan_owns_what_is_done_and_pends_the_rest() {
        let current = ClusterConfig::bootstrap(1, 2, &infos(1..=2)).unwrap();
        let next = current.next_for_shape(2, 2, &infos(3..=4)).unwrap();
        // A new node gains its whole partition; an old one gains nothing.
        let mut plan = Plan::new(&current, &next, NodeId(3), Timestamp(40));
        assert!(!plan.intervals.is_empty());
        assert!(plan.intervals.iter().all(|i| i.start == Timestamp(40)));
        assert!(!plan.backfilled());
        let ownership = plan.ownership(vec![]);
        assert!(ownership.owned.is_empty());
        assert_eq!(ownership.pending.len(), plan.intervals.len());
        for i in &mut plan.intervals {
            i.done = true;
            i.bytes = 10;
        }
        assert!(plan.backfilled());
        assert_eq!(plan.ownership(vec![]).owned.len(), plan.intervals.len());
        let status = plan.status();
        assert_eq!(status.intervals_done, status.intervals_total);
        assert_eq!(status.bytes_done, 10 * plan.intervals.len() as u64);
        plan.vetoed = true;
        assert!(!plan.backfilled(), "a vetoed plan never reports backfilled");
        let old = Plan::new(&current, &next, NodeId(1), Timestamp(40));
        assert!(old.intervals.is_empty() && old.backfilled());
        // The saved form reads back the same.
        let bytes = serde_json::to_vec(&plan).unwrap();
        assert_eq!(serde_json::from_slice::<Plan>(&bytes).unwrap(), plan);
    }
}
