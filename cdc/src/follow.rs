//! The follower: one feed's events, in log order, from a cursor.
//!
//! It reads the transaction log itself, from the cursor on: the log gives the order, each
//! transaction's documents (in the order it first names them) and its wall clock. For a group of
//! records it asks the store nodes one coordinated `Changes` (which waits for the UST to reach
//! the group's last ts): whether each transaction wrote each document (an aborted or duplicate
//! transaction wrote none) and the JSON of the version written and, when the feed needs it, of
//! the version before. Nothing is computed twice and no document is decoded: the store keeps
//! every version's JSON. A group is up to `max_records` records that are already in the reader's
//! buffer, so a busy log is followed with one round trip per group, an idle one with one per
//! record.
//!
//! The follower's position is always at a whole transaction's end, except right after a resume
//! in the middle of one (then the transaction's events up to the cursor are skipped).

use std::sync::Arc;
use std::time::Duration;

use causeway_config_manager::{StoreError, StoreNodes};
use causeway_core::cdc::{Kind, Op, Position, Resume};
use causeway_core::Timestamp;
use causeway_proto::v1 as pb;
use causeway_txlog::{RecordStream, TxLog};
use futures::{FutureExt, StreamExt};
use serde_json::value::RawValue;

use crate::event::{Body, Change, Event};
use crate::feed::Selection;

/// How a follower groups its work.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Records per `Changes` round trip, at most.
    pub max_records: usize,
    /// How long one `Changes` call may wait for the UST.
    pub changes_timeout_ms: u32,
    /// Pause after a failed call, before the next try.
    pub retry_pause: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            max_records: 512,
            changes_timeout_ms: 5_000,
            retry_pause: Duration::from_millis(50),
        }
    }
}

/// Why a follower cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The history after the cursor is gone: the log was truncated by retention, or a store
    /// node pruned versions the feed needed.
    #[error("the history after {} is gone (pruned below ts {lost_below})", checkpoint.id())]
    HistoryLost {
        checkpoint: Position,
        lost_below: Timestamp,
    },
    /// The log holds a record this build cannot read, or is not the cluster's log.
    #[error("the transaction log: {0}")]
    Log(#[source] causeway_txlog::Error),
    #[error("a store node refused the feed's request: {0}")]
    Refused(String),
}

/// One feed's reader of the log and the store.
#[derive(Debug)]
pub struct Follower {
    log: TxLog,
    nodes: Arc<StoreNodes>,
    selection: Arc<Selection>,
    tuning: Tuning,
    /// The last position emitted (or skipped, up to): everything at or below is done.
    cursor: Position,
    stream: Option<RecordStream>,
}

/// A transaction of the log, as far as a feed cares.
struct Pending {
    ts: Timestamp,
    wall_clock_ms: u64,
    /// Its documents in the feed's collections, each once, in the order it first names them.
    documents: Vec<(String, String)>,
}

impl Follower {
    pub fn new(
        log: TxLog,
        nodes: Arc<StoreNodes>,
        selection: Arc<Selection>,
        cursor: Position,
        tuning: Tuning,
    ) -> Follower {
        Follower {
            log,
            nodes,
            selection,
            tuning,
            cursor,
            stream: None,
        }
    }

    /// Everything at or below this has been returned.
    pub fn cursor(&self) -> Position {
        self.cursor
    }

    /// The ts up to which every transaction's events have been returned.
    pub fn resolved(&self) -> Timestamp {
        self.cursor.resolved()
    }

    /// The cursor of a feed that starts now: after the last record in the log.
    pub async fn now(log: &TxLog) -> Result<Position, FollowError> {
        let bounds = log.bounds().await.map_err(FollowError::Log)?;
        Ok(Position::end_of(Timestamp(
            bounds.next.get().saturating_sub(1),
        )))
    }

    /// Checks, before reading, that the history after `cursor` is still there (the log's
    /// retention, the store nodes' GC): `causeway_core::cdc::resume`.
    pub async fn check_resume(&self) -> Result<(), FollowError> {
        let bounds = self.log.bounds().await.map_err(FollowError::Log)?;
        let gc = match self
            .nodes
            .call(|mut c| async move { c.status(pb::StatusRequest {}).await })
            .await
        {
            Ok(status) => Timestamp(status.into_inner().gc),
            // The reads will tell; a node that cannot answer now is no reason to stop.
            Err(_) => Timestamp::ZERO,
        };
        match causeway_core::cdc::resume(self.cursor, bounds.first, gc) {
            Resume::From(_) => Ok(()),
            Resume::HistoryLost {
                checkpoint,
                lost_below,
            } => Err(FollowError::HistoryLost {
                checkpoint,
                lost_below,
            }),
        }
    }

    /// The next events: waits up to `wait` for a record, then returns the events of the
    /// records at hand (possibly none: the transactions wrote nothing this feed takes, or no
    /// record came).
    pub async fn next(&mut self, wait: Duration) -> Result<Vec<Event>, FollowError> {
        let mut records = Vec::new();
        let stream = self
            .stream
            .get_or_insert_with(|| self.log.read_from(self.cursor.resolved()));
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(item) => records.push(item),
        }
        while records.len() < self.tuning.max_records {
            match stream.next().now_or_never() {
                Some(item) => records.push(item),
                None => break,
            }
        }
        let mut pending = Vec::with_capacity(records.len());
        let mut failed = None;
        for item in records {
            match item {
                Some(Ok(record)) => {
                    let tx =
                        causeway_txlog::codec::decode(&record.payload).map_err(FollowError::Log)?;
                    let mut documents: Vec<(String, String)> = Vec::new();
                    for m in tx.mutations {
                        if self.selection.takes(&m.collection)
                            && !documents
                                .iter()
                                .any(|(c, i)| *c == m.collection && *i == m.id)
                        {
                            documents.push((m.collection, m.id));
                        }
                    }
                    pending.push(Pending {
                        ts: record.ts,
                        wall_clock_ms: tx.wall_clock_ms,
                        documents,
                    });
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                None => {
                    failed = Some(causeway_txlog::Error::Closed);
                    break;
                }
            }
        }
        let events = self.changes(pending).await?;
        if let Some(e) = failed {
            self.stream = None;
            match e {
                causeway_txlog::Error::Truncated {
                    first_available, ..
                } => {
                    return Err(FollowError::HistoryLost {
                        checkpoint: self.cursor,
                        lost_below: first_available,
                    })
                }
                causeway_txlog::Error::Unavailable { .. } | causeway_txlog::Error::Closed => {
                    tracing::warn!(error = %e, "the log reader failed; reading again");
                    tokio::time::sleep(self.tuning.retry_pause).await;
                }
                e => return Err(FollowError::Log(e)),
            }
        }
        Ok(events)
    }

    /// The events of `pending` (whole transactions, in ts order), and the cursor after them.
    async fn changes(&mut self, pending: Vec<Pending>) -> Result<Vec<Event>, FollowError> {
        let Some(last) = pending.last().map(|p| p.ts) else {
            return Ok(Vec::new());
        };
        let keys: Vec<pb::ChangeKey> = pending
            .iter()
            .flat_map(|p| {
                p.documents.iter().map(|(c, i)| pb::ChangeKey {
                    ts: p.ts.get(),
                    collection: c.clone(),
                    id: i.clone(),
                })
            })
            .collect();
        // As many keys per call as the answer's size allows: a group of large documents is
        // asked for in halves until each answer fits a gRPC message.
        let mut answers = Vec::with_capacity(keys.len());
        let mut per_call = MAX_KEYS_PER_CALL;
        let mut rest = &keys[..];
        while !rest.is_empty() {
            let n = per_call.min(rest.len());
            match self.call(rest[..n].to_vec()).await {
                Ok(changes) => {
                    answers.extend(changes);
                    rest = &rest[n..];
                }
                Err(CallError::TooLarge) if n > 1 => per_call = n / 2,
                Err(CallError::TooLarge) => {
                    return Err(FollowError::Refused(
                        "one change is larger than a store node's answer may be".into(),
                    ))
                }
                Err(CallError::Follow(e)) => return Err(e),
            }
        }
        let mut answers = answers.into_iter();
        let mut events = Vec::new();
        for p in pending {
            let mut written = Vec::new();
            for (collection, id) in p.documents {
                let change = answers.next().expect("one answer per key");
                if !change.written {
                    continue;
                }
                let after = change.after_found.then_some(change.after);
                let before = change.before_found.then_some(change.before);
                let Some((kind, op)) = self.selection.classify(before.as_deref(), after.as_deref())
                else {
                    continue;
                };
                written.push((kind, op, collection, id, after, before));
            }
            let count = u32::try_from(written.len()).expect("a transaction's documents fit u32");
            for (index, (kind, op, collection, id, after, before)) in
                written.into_iter().enumerate()
            {
                let position = Position::new(p.ts, index as u32);
                if !self.cursor.emits(position) {
                    continue;
                }
                events.push(Event {
                    position,
                    time_ms: p.wall_clock_ms,
                    body: Body::Change(Change {
                        kind,
                        op,
                        collection,
                        id,
                        tx_count: count,
                        after: after.map(raw),
                        before: self.selection.before.then(|| before.map(raw)),
                    }),
                });
            }
        }
        self.cursor = Position::end_of(last);
        Ok(events)
    }

    /// One `Changes` call, tried again while the cluster cannot answer (the feed waits for it).
    async fn call(&self, keys: Vec<pb::ChangeKey>) -> Result<Vec<pb::Change>, CallError> {
        let request = pb::ChangesRequest {
            keys,
            with_before: self.selection.needs_before(),
            timeout_ms: self.tuning.changes_timeout_ms,
        };
        let mut logged = false;
        loop {
            let result = self
                .nodes
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.changes(request).await }
                })
                .await;
            let status = match result {
                Ok(r) => return Ok(r.into_inner().changes),
                Err(StoreError::NoNodes) => {
                    tonic::Status::unavailable("no store node is known yet")
                }
                Err(StoreError::Status(s)) => s,
            };
            match status.code() {
                tonic::Code::FailedPrecondition
                    if status.message().starts_with("snapshot too old") =>
                {
                    let lowest = request.keys.iter().map(|k| k.ts).min().unwrap_or(1);
                    return Err(CallError::Follow(FollowError::HistoryLost {
                        checkpoint: self.cursor,
                        lost_below: Timestamp(lowest),
                    }));
                }
                tonic::Code::InvalidArgument => {
                    return Err(CallError::Follow(FollowError::Refused(
                        status.message().to_owned(),
                    )))
                }
                // tonic's limit on a message's size, on this side or between store nodes.
                _ if status.message().contains("message length too large") => {
                    return Err(CallError::TooLarge)
                }
                _ => {
                    if !logged {
                        tracing::warn!(code = ?status.code(), message = status.message(), "changes: the store nodes cannot answer yet; trying again");
                        logged = true;
                    }
                    tokio::time::sleep(self.tuning.retry_pause).await;
                }
            }
        }
    }
}

/// Why one `Changes` call failed.
enum CallError {
    /// The answer was larger than a gRPC message may be: ask for fewer keys.
    TooLarge,
    Follow(FollowError),
}

/// The store node refuses more keys than this in one `Changes` call.
pub const MAX_KEYS_PER_CALL: usize = 10_000;

fn raw(json: Vec<u8>) -> Box<RawValue> {
    let text = String::from_utf8(json).expect("stored JSON is UTF-8");
    RawValue::from_string(text).expect("stored JSON is JSON")
}

/// An initial scan: every document of `collections` at `snapshot` (a ts the caller holds) as
/// `op: r` events, page by page, then `causeway.snapshot.complete`.
#[derive(Debug)]
pub struct Scan {
    nodes: Arc<StoreNodes>,
    collections: std::collections::VecDeque<String>,
    selection: Arc<Selection>,
    snapshot: Timestamp,
    index: u32,
    /// The query cursor within the first collection left; empty for its first page.
    cursor: String,
    done: bool,
}

impl Scan {
    pub fn new(nodes: Arc<StoreNodes>, selection: Arc<Selection>, snapshot: Timestamp) -> Scan {
        Scan {
            nodes,
            collections: selection.named_collections().into(),
            selection,
            snapshot,
            index: 0,
            cursor: String::new(),
            done: false,
        }
    }

    /// The next page of events; `None` after `causeway.snapshot.complete`.
    pub async fn next(&mut self) -> Result<Option<Vec<Event>>, FollowError> {
        if self.done {
            return Ok(None);
        }
        let snapshot = self.snapshot;
        let Some(collection) = self.collections.front().cloned() else {
            self.done = true;
            return Ok(Some(vec![Event {
                position: Position::end_of(snapshot),
                time_ms: now_ms(),
                body: Body::SnapshotComplete { snapshot },
            }]));
        };
        let request = pb::QueryRequest {
            collection,
            query: String::new(),
            cursor: self.cursor.clone(),
            min_ts: 0,
            timeout_ms: 10_000,
            max_scanned: 0,
            at_ts: self.cursor.is_empty().then_some(snapshot.get()),
        };
        let page = self
            .nodes
            .call(|mut c| {
                let request = request.clone();
                async move { c.query(request).await }
            })
            .await
            .map_err(|e| match e {
                StoreError::NoNodes => FollowError::Refused("no store node is known".into()),
                StoreError::Status(s)
                    if s.message().starts_with("snapshot too old")
                        || s.message().contains("garbage collected") =>
                {
                    FollowError::HistoryLost {
                        checkpoint: Position::end_of(snapshot),
                        lost_below: snapshot,
                    }
                }
                StoreError::Status(s) => FollowError::Refused(s.message().to_owned()),
            })?
            .into_inner();
        match page.cursor {
            Some(c) => self.cursor = c,
            None => {
                self.cursor.clear();
                self.collections.pop_front();
            }
        }
        let mut events = Vec::with_capacity(page.documents.len());
        for d in page.documents {
            if !self.selection.takes(&d.collection)
                || self.selection.classify(None, Some(&d.json)).is_none()
            {
                continue;
            }
            events.push(Event {
                position: Position::new(snapshot, self.index),
                time_ms: now_ms(),
                body: Body::Change(Change {
                    kind: Kind::Created,
                    op: Op::Read,
                    collection: d.collection,
                    id: d.id,
                    tx_count: 0,
                    after: Some(raw(d.json)),
                    before: self.selection.before.then_some(None),
                }),
            });
            self.index = self
                .index
                .checked_add(1)
                .filter(|&i| i < u32::MAX)
                .ok_or_else(|| FollowError::Refused("an initial scan of 2^32 documents".into()))?;
        }
        Ok(Some(events))
    }
}

/// The UST view of a store node (for lag, and the snapshot of an initial scan).
pub async fn ust(nodes: &StoreNodes) -> Result<Timestamp, FollowError> {
    nodes
        .call(|mut c| async move { c.status(pb::StatusRequest {}).await })
        .await
        .map(|s| Timestamp(s.into_inner().ust))
        .map_err(|_| FollowError::Refused("no store node answered its status".into()))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
