//! Apply: log records become versions. A group of records is routed into each owned document's
//! share (its mutations in ts order); documents are independent, so their shares are applied in
//! parallel, each on its own decoded automerge document, and the results are written as one
//! WriteBatch. Every replica computes the same versions whatever the thread count: a document's
//! versions depend only on its own mutations, in log order, and on the transactions' outcomes.
//!
//! # Outcomes
//! Each transaction commits or aborts as a whole (ARCHITECTURE.md, "Transaction outcomes"):
//! - one that cannot abort (no conditions; only replaces and deletes) commits;
//! - one that names a single document is decided inside that document's share, on its state
//!   just before the transaction;
//! - any other stops the parallel run: the shares so far are applied, then each document this
//!   node holds votes on its state ([`txn::vote`]) into a [`Ballot`], completed by the votes
//!   other nodes sent ([`RemoteVotes`]). Without every vote, apply stops before the transaction
//!   and says which are missing ([`Blocked`]); the caller obtains them and calls again.
//!
//! The outcome of every transaction this node decided is written with its versions (meta
//! `outcome/‖ts`), so that other nodes and clients can learn it after the fact.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use automerge::ActorId;
use causeway_core::{Ballot, Decision, Timestamp};
use causeway_proto::v1::{self as pb, outcome_response::Known};
use causeway_proto::v1::{transaction_format_supported, Transaction};
use prost::Message;
use rocksdb::WriteBatch;

use super::document::{self, Op};
use super::record::{Record, Segment};
use super::txn::{self, Blocked, DocMutations, KeyRow, Limits, Parsed, RemoteVotes};
use super::{
    is_version_of, keys, parse_json, ApplyOutcome, Cached, Error, Live, Ownership, Skipped, Store,
    Writer, CF_BY_COLLECTION, CF_DOCS, CF_META, CF_PENDING, META_APPLIED,
};

/// How a version's transaction is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decided {
    /// Here, on this document alone: the transaction names no other.
    Local,
    /// Already: it commits.
    Committed,
}

/// One transaction's mutations of one document, and when it was logged.
pub(super) struct Version<'a> {
    pub ts: Timestamp,
    pub wall_clock_ms: u64,
    pub mutations: DocMutations<'a>,
    pub limits: Limits,
    pub decided: Decided,
}

/// One document's share of a group: its versions in ts order.
struct DocWork<'a> {
    prefix: Vec<u8>,
    versions: Vec<Version<'a>>,
}

/// A group's documents' shares, in order of first appearance.
#[derive(Default)]
pub(super) struct Shares<'a> {
    work: Vec<DocWork<'a>>,
    /// Prefix → index in `work`.
    index: HashMap<Vec<u8>, usize>,
}

impl<'a> Shares<'a> {
    /// Files `version` under its document's share, making the share on first sight.
    pub fn push(&mut self, prefix: Vec<u8>, version: Version<'a>) {
        match self.index.get(&prefix) {
            Some(&slot) => self.work[slot].versions.push(version),
            None => {
                self.index.insert(prefix.clone(), self.work.len());
                self.work.push(DocWork {
                    prefix,
                    versions: vec![version],
                });
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.work.is_empty()
    }
}

/// What applying one document's share produced, for the group's batch.
struct DocOutput {
    prefix: Vec<u8>,
    state: Cached,
    /// (column family, key, value)
    puts: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    /// The outcomes of the transactions decided here ([`Decided::Local`]).
    outcomes: Vec<(Timestamp, pb::TxOutcome)>,
    /// The idempotency rows this share wrote.
    rows: Vec<(Vec<u8>, KeyRow)>,
    versions_written: usize,
}

/// Reads idempotency rows as of the group so far: the group's own, then the disk's.
struct Rows<'s> {
    store: &'s Store,
    group: &'s HashMap<Vec<u8>, KeyRow>,
}

impl Rows<'_> {
    /// The newest version of the row at `prefix`; `share` holds rows written by the share
    /// being applied (newest last).
    fn get(&self, prefix: &[u8], share: &[(Vec<u8>, KeyRow)]) -> Result<Option<KeyRow>, Error> {
        if let Some((_, row)) = share.iter().rev().find(|(p, _)| p == prefix) {
            return Ok(Some(*row));
        }
        if let Some(row) = self.group.get(prefix) {
            return Ok(Some(*row));
        }
        let mut it = self.store.db.raw_iterator_cf(self.store.cf(CF_DOCS));
        it.seek(prefix);
        match (it.key(), it.value()) {
            (Some(key), Some(value)) if is_version_of(key, prefix) => Ok(Some(txn::key_row_of(
                keys::version_key_parts(key).ts,
                value,
            ))),
            _ => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// The earlier commit `version` repeats, if its document holds the transaction's key.
    fn duplicate_of(
        &self,
        version: &Version<'_>,
        share: &[(Vec<u8>, KeyRow)],
    ) -> Result<Option<Timestamp>, Error> {
        let Some(prefix) = &version.mutations.key_row else {
            return Ok(None);
        };
        let row = self.get(prefix, share)?;
        Ok(txn::duplicate_of(
            row,
            version.ts,
            version.wall_clock_ms,
            &version.limits,
        ))
    }
}

/// A group being applied: the batch so far, the shares not yet applied, the states of the
/// documents the group touched (ahead of disk until the batch is written, so kept out of the
/// cache, which could evict one and reload an older version), the counters.
pub(super) struct Run<'a> {
    pub batch: WriteBatch,
    pub shares: Shares<'a>,
    states: HashMap<Vec<u8>, Cached>,
    /// The idempotency rows written by the group so far, by prefix.
    rows: HashMap<Vec<u8>, KeyRow>,
    pub outcome: ApplyOutcome,
}

impl Run<'_> {
    pub fn new(outcome: ApplyOutcome) -> Self {
        Run {
            batch: WriteBatch::default(),
            shares: Shares::default(),
            states: HashMap::new(),
            rows: HashMap::new(),
            outcome,
        }
    }

    /// Once the batch is written: the group's states join the cache.
    pub fn cache_states(&mut self, writer: &mut Writer) {
        for (prefix, state) in self.states.drain() {
            let weight = state.weight();
            writer.cache.insert(prefix, state, weight);
        }
    }
}

/// How many records after a blocked transaction are looked at for early votes.
const EARLY_VOTES: usize = 256;

/// Below this many documents per thread a group is applied on the calling thread: a thread
/// costs more than a document or two.
const MIN_DOCUMENTS_PER_THREAD: usize = 2;

/// The meta key of the outcome of the transaction at `ts`.
pub(super) fn outcome_key(ts: Timestamp) -> Vec<u8> {
    [super::META_OUTCOME, &ts.0.to_be_bytes()].concat()
}

impl Store {
    /// Applies a group of log records, in strictly increasing ts order, as one WriteBatch, with
    /// no votes from other nodes: enough for a node that holds every document it applies.
    pub fn apply(
        &self,
        records: &[(Timestamp, Transaction)],
        ownership: &Ownership,
    ) -> Result<ApplyOutcome, Error> {
        self.apply_with_votes(records, ownership, &RemoteVotes::new())
    }

    /// Applies a group of log records, in strictly increasing ts order, as one WriteBatch.
    ///
    /// Records at or below the applied position are ignored (counted in `repeated`), so a
    /// stream may be resumed from any earlier position. A transaction that needs votes neither
    /// held here nor in `remote` stops the group before it ([`ApplyOutcome::blocked`]). An
    /// unknown record format stops the group before anything is written
    /// ([`Error::UnsupportedFormat`]): this build cannot apply it and must not skip it. On an
    /// error nothing of the group is applied.
    pub fn apply_with_votes(
        &self,
        records: &[(Timestamp, Transaction)],
        ownership: &Ownership,
        remote: &RemoteVotes,
    ) -> Result<ApplyOutcome, Error> {
        let mut writer = self.lock();
        let start = self.applied();
        let mut previous = None;
        for (ts, tx) in records {
            assert!(
                previous.is_none_or(|p| p < *ts),
                "records out of order: {ts} after {previous:?}"
            );
            previous = Some(*ts);
            if !transaction_format_supported(tx.format_version) && *ts > start {
                return Err(Error::UnsupportedFormat(tx.format_version));
            }
        }
        let mut run = Run::new(ApplyOutcome {
            applied: start,
            ..ApplyOutcome::default()
        });
        self.route_group(&mut writer, &mut run, records, ownership, remote, start)?;
        self.flush(&mut writer, &mut run)?;
        let mut outcome = std::mem::take(&mut run.outcome);
        if outcome.applied == start {
            // Nothing changed: the states loaded for votes are those on disk.
            run.cache_states(&mut writer);
            return Ok(outcome);
        }
        let mut batch = std::mem::take(&mut run.batch);
        batch.put_cf(
            self.cf(CF_META),
            META_APPLIED,
            outcome.applied.0.to_be_bytes(),
        );
        // A group that stops for votes is written without an fsync: the caller goes on with
        // the same group once it has them, and the fsync at its end covers both writes. (Its
        // outcomes may be told meanwhile: they are a function of the log, so a crash that
        // loses them makes the node decide the same again.)
        let sync = self.options.sync_writes && outcome.blocked.is_none();
        self.write(batch, sync)?;
        run.cache_states(&mut writer);
        self.applied.store(outcome.applied.0, Ordering::SeqCst);
        if sync {
            self.committed
                .fetch_max(outcome.applied.0, Ordering::SeqCst);
        }
        outcome.skipped.sort_by_key(|s| (s.ts, s.mutation));
        for skipped in &outcome.skipped {
            tracing::warn!(ts = skipped.ts.0, mutation = ?skipped.mutation, reason = %skipped.reason, "transaction skipped");
        }
        Ok(outcome)
    }

    fn route_group<'a>(
        &self,
        writer: &mut Writer,
        run: &mut Run<'a>,
        records: &'a [(Timestamp, Transaction)],
        ownership: &Ownership,
        remote: &RemoteVotes,
        start: Timestamp,
    ) -> Result<(), Error> {
        for (i, (ts, tx)) in records.iter().enumerate() {
            if *ts <= start {
                run.outcome.repeated += 1;
                continue;
            }
            if let Some(mut blocked) = self.route(writer, run, *ts, tx, ownership, remote)? {
                blocked.early = self.early_votes(writer, run, tx, &records[i + 1..], ownership)?;
                run.outcome.blocked = Some(blocked);
                return Ok(());
            }
            run.outcome.applied = *ts;
        }
        Ok(())
    }

    /// Sends one record's mutations where they go once its outcome is known: owned documents'
    /// into their share of the group, those of intervals being backfilled into `pending`, the
    /// rest nowhere. `Some` when the outcome needs votes this node does not have.
    fn route<'a>(
        &self,
        writer: &mut Writer,
        run: &mut Run<'a>,
        ts: Timestamp,
        tx: &'a Transaction,
        ownership: &Ownership,
        remote: &RemoteVotes,
    ) -> Result<Option<Blocked>, Error> {
        let parsed = match txn::parse_transaction(tx) {
            Ok(parsed) => parsed,
            Err((culprit, reason)) => {
                tracing::debug!(ts = ts.0, ?culprit, %reason, "whole transaction skipped");
                run.outcome.skipped.push(Skipped {
                    ts,
                    mutation: None,
                    reason,
                });
                return Ok(None);
            }
        };
        let owned: Vec<bool> = parsed
            .docs
            .iter()
            .map(|d| ownership.owns(d.hash()))
            .collect();
        let held = |i: usize| owned[i] || ownership.pends(parsed.docs[i].hash());
        if !(0..parsed.docs.len()).any(held) {
            return Ok(None);
        }
        if !parsed.decides() {
            self.put_outcome(&mut run.batch, ts, &txn::outcome_of(&Decision::Committed));
            self.route_committed(run, ts, tx, parsed, ownership, Decided::Committed);
            return Ok(None);
        }
        if parsed.docs.len() == 1 && owned[0] {
            self.route_committed(run, ts, tx, parsed, ownership, Decided::Local);
            return Ok(None);
        }
        // The documents' votes depend on every earlier version: apply the shares so far.
        self.flush(writer, run)?;
        let mut ballot = Ballot::new(
            parsed
                .docs
                .iter()
                .filter(|d| d.decides())
                .map(DocMutations::key),
        );
        let own = self.own_votes(writer, run, ts, tx, &parsed, &owned)?;
        for vote in &own {
            let (key, vote) = txn::from_doc_vote(vote);
            ballot.record(&key, vote).map_err(diverged(ts))?;
        }
        let mut decision = ballot.decision();
        for known in remote.get(&ts).into_iter().flatten() {
            if decision.is_some() {
                break;
            }
            match known {
                Known::Decided(outcome) => {
                    let theirs = txn::decision_of(outcome);
                    if !ballot.agrees_with(&theirs) {
                        return Err(diverged(ts)(causeway_core::vote::Conflict {
                            document: "(a decision)".into(),
                        }));
                    }
                    decision = Some(theirs);
                }
                Known::Votes(votes) => {
                    for vote in &votes.votes {
                        let (key, vote) = txn::from_doc_vote(vote);
                        ballot.record(&key, vote).map_err(diverged(ts))?;
                    }
                    decision = ballot.decision();
                }
            }
        }
        match decision {
            Some(decision) => {
                self.put_outcome(&mut run.batch, ts, &txn::outcome_of(&decision));
                if decision.applies() {
                    self.route_committed(run, ts, tx, parsed, ownership, Decided::Committed);
                }
                Ok(None)
            }
            None if !(0..parsed.docs.len()).any(|i| held(i) && parsed.docs[i].writes()) => {
                // This node writes nothing of the transaction: its votes are all it owes.
                let known = Known::Votes(pb::TxVotes { votes: own });
                self.put_known(&mut run.batch, ts, known);
                Ok(None)
            }
            None => {
                let missing = ballot.missing().cloned().collect::<Vec<_>>();
                let missing = missing
                    .into_iter()
                    .map(|key| {
                        let hash = causeway_core::KeyHash::of(&key.0, &key.1);
                        (key, hash)
                    })
                    .collect();
                Ok(Some(Blocked {
                    ts,
                    votes: own,
                    missing,
                    early: Vec::new(),
                }))
            }
        }
    }

    /// This node's votes on `tx` at `ts`: those of the documents it owns that can vote no, on
    /// their states as of the group so far.
    fn own_votes(
        &self,
        writer: &mut Writer,
        run: &mut Run<'_>,
        ts: Timestamp,
        tx: &Transaction,
        parsed: &Parsed<'_>,
        owned: &[bool],
    ) -> Result<Vec<pb::DocVote>, Error> {
        let mut own = Vec::new();
        for (doc, &owned) in parsed.docs.iter().zip(owned) {
            if !(owned && doc.decides()) {
                continue;
            }
            let prefix = keys::doc_prefix(doc.collection, doc.id);
            let state = self.state(writer, run, &prefix)?;
            let rows = Rows {
                store: self,
                group: &run.rows,
            };
            let row = match &doc.key_row {
                Some(row) => rows.get(row, &[])?,
                None => None,
            };
            let duplicate = txn::duplicate_of(row, ts, tx.wall_clock_ms, &parsed.limits);
            let vote = txn::vote(&state, doc, ts, &parsed.limits, duplicate);
            run.states.insert(prefix, state);
            own.push(txn::doc_vote(&doc.key(), &vote));
        }
        Ok(own)
    }

    /// The votes this node can already cast on the transactions after the one it stopped at:
    /// those that will need other nodes' votes and whose documents here no transaction from
    /// the blocked one on writes (so their states are final for them). Sent with the blocked
    /// one's votes, they let the other partitions decide a run of transactions in one round.
    fn early_votes(
        &self,
        writer: &mut Writer,
        run: &mut Run<'_>,
        blocked: &Transaction,
        after: &[(Timestamp, Transaction)],
        ownership: &Ownership,
    ) -> Result<Vec<(Timestamp, Vec<pb::DocVote>)>, Error> {
        let mut written: HashSet<Vec<u8>> = HashSet::new();
        let note_writes = |written: &mut HashSet<Vec<u8>>, parsed: &Parsed<'_>| {
            for doc in parsed.docs.iter().filter(|d| d.writes()) {
                written.insert(keys::doc_prefix(doc.collection, doc.id));
            }
        };
        if let Ok(parsed) = txn::parse_transaction(blocked) {
            note_writes(&mut written, &parsed);
        }
        let mut early = Vec::new();
        for (ts, tx) in after.iter().take(EARLY_VOTES) {
            let Ok(parsed) = txn::parse_transaction(tx) else {
                continue;
            };
            let owned: Vec<bool> = parsed
                .docs
                .iter()
                .map(|d| ownership.owns(d.hash()))
                .collect();
            let needs_others = parsed.decides()
                && parsed
                    .docs
                    .iter()
                    .zip(&owned)
                    .any(|(d, o)| d.decides() && !o);
            let untouched = parsed.docs.iter().zip(&owned).all(|(d, o)| {
                !(*o && d.decides() && written.contains(&keys::doc_prefix(d.collection, d.id)))
            });
            if needs_others && untouched {
                let votes = self.own_votes(writer, run, *ts, tx, &parsed, &owned)?;
                if !votes.is_empty() {
                    early.push((*ts, votes));
                }
            }
            note_writes(&mut written, &parsed);
        }
        Ok(early)
    }

    /// Routes a transaction that commits (or is decided in its document's share).
    fn route_committed<'a>(
        &self,
        run: &mut Run<'a>,
        ts: Timestamp,
        tx: &'a Transaction,
        parsed: Parsed<'a>,
        ownership: &Ownership,
        decided: Decided,
    ) {
        let limits = parsed.limits;
        for doc in parsed.docs {
            if !doc.writes() {
                continue;
            }
            let hash = doc.hash();
            if ownership.owns(hash) {
                let prefix = keys::doc_prefix(doc.collection, doc.id);
                let version = Version {
                    ts,
                    wall_clock_ms: tx.wall_clock_ms,
                    mutations: doc,
                    limits,
                    decided,
                };
                run.shares.push(prefix, version);
            } else if ownership.pends(hash) {
                let prefix = keys::doc_prefix(doc.collection, doc.id);
                if let Some(row) = &doc.key_row {
                    // The key's row, replayed with the document's mutations.
                    let value = encode_pending(tx.wall_clock_ms, &limits, None);
                    run.batch
                        .put_cf(self.cf(CF_PENDING), keys::pending_key(row, ts, 0), value);
                    run.outcome.pending_written += 1;
                }
                for (index, _) in &doc.ops {
                    let mutation = &tx.mutations[*index as usize];
                    let value = encode_pending(tx.wall_clock_ms, &limits, Some(mutation));
                    run.batch.put_cf(
                        self.cf(CF_PENDING),
                        keys::pending_key(&prefix, ts, *index),
                        value,
                    );
                    run.outcome.pending_written += 1;
                }
            }
        }
    }

    fn put_outcome(&self, batch: &mut WriteBatch, ts: Timestamp, outcome: &pb::TxOutcome) {
        self.put_known(batch, ts, Known::Decided(outcome.clone()));
    }

    fn put_known(&self, batch: &mut WriteBatch, ts: Timestamp, known: Known) {
        let record = pb::OutcomeResponse {
            known: Some(known),
            ..pb::OutcomeResponse::default()
        };
        batch.put_cf(self.cf(CF_META), outcome_key(ts), record.encode_to_vec());
    }

    /// A document's state as of the group so far: the group's, else the cache's, else its
    /// newest version on disk. The caller puts it back in `run.states`.
    fn state(
        &self,
        writer: &mut Writer,
        run: &mut Run<'_>,
        prefix: &[u8],
    ) -> Result<Cached, Error> {
        match run
            .states
            .remove(prefix)
            .or_else(|| writer.cache.take(prefix))
        {
            Some(state) => Ok(state),
            None => self.load_newest(prefix),
        }
    }

    /// Applies the shares routed so far (in parallel over documents): their versions and
    /// outcomes join the run's batch, their states the run's.
    pub(super) fn flush(&self, writer: &mut Writer, run: &mut Run<'_>) -> Result<(), Error> {
        if run.shares.is_empty() {
            return Ok(());
        }
        let shares = std::mem::take(&mut run.shares);
        let jobs: Vec<_> = shares
            .work
            .into_iter()
            .map(|share| {
                let cached = run
                    .states
                    .remove(&share.prefix)
                    .or_else(|| writer.cache.take(&share.prefix));
                (share, cached)
            })
            .collect();
        let rows = Rows {
            store: self,
            group: &run.rows,
        };
        let results = parallel_map(jobs, self.apply_threads, |(share, cached)| {
            self.apply_share(share, cached, &rows)
        });
        for result in results {
            let output = result?;
            for (cf, key, value) in output.puts {
                run.batch.put_cf(self.cf(cf), key, value);
            }
            for (ts, outcome) in &output.outcomes {
                self.put_outcome(&mut run.batch, *ts, outcome);
                if !outcome.committed {
                    run.outcome.aborted += 1;
                }
            }
            run.outcome.versions_written += output.versions_written;
            run.states.insert(output.prefix, output.state);
            run.rows.extend(output.rows);
        }
        Ok(())
    }

    /// Applies one document's share, starting from its cached state or its newest version.
    fn apply_share(
        &self,
        share: DocWork<'_>,
        cached: Option<Cached>,
        rows: &Rows<'_>,
    ) -> Result<DocOutput, Error> {
        let state = match cached {
            Some(state) => state,
            None => self.load_newest(&share.prefix)?,
        };
        let mut output = DocOutput {
            prefix: share.prefix,
            state,
            puts: Vec::new(),
            outcomes: Vec::new(),
            rows: Vec::new(),
            versions_written: 0,
        };
        for version in &share.versions {
            let duplicate = match version.decided {
                Decided::Local => rows.duplicate_of(version, &output.rows)?,
                Decided::Committed => None,
            };
            apply_version(&mut output, version, duplicate, &self.options);
        }
        Ok(output)
    }

    /// Decodes a document from its newest version (a snapshot and the deltas after it).
    pub(super) fn load_newest(&self, prefix: &[u8]) -> Result<Cached, Error> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(prefix);
        let mut chain: Vec<Vec<u8>> = Vec::new();
        let mut newest: Option<(Timestamp, u32, u32, Vec<u8>)> = None;
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !is_version_of(key, prefix) {
                break;
            }
            let ts = keys::version_key_parts(key).ts;
            match Record::decode(value) {
                Record::Tombstone => {
                    assert!(newest.is_none(), "a delta follows a tombstone");
                    return Ok(Cached::Absent { latest: Some(ts) });
                }
                Record::Put {
                    segment,
                    history_changes,
                    deltas,
                    actor,
                    json,
                    automerge,
                } => {
                    if newest.is_none() {
                        newest = Some((ts, history_changes, deltas, json.to_vec()));
                    }
                    chain.push(automerge.to_vec());
                    if segment == Segment::Snapshot {
                        let (latest, history_changes, deltas, json) = newest.expect("set above");
                        let snapshot = chain.pop().expect("pushed");
                        let doc =
                            document::load_chain(&snapshot, chain.iter().rev().map(Vec::as_slice));
                        return Ok(Cached::Live(Box::new(Live {
                            doc,
                            latest,
                            history_changes,
                            deltas,
                            actor: actor.map(ActorId::from),
                            json: parse_json(&json),
                            json_bytes: json.len(),
                        })));
                    }
                }
            }
            it.next();
        }
        it.status()?;
        assert!(newest.is_none(), "a delta chain without a snapshot");
        Ok(Cached::Absent { latest: None })
    }
}

/// The error of votes that disagree: replicas diverged, and applying on would spread it.
fn diverged(ts: Timestamp) -> impl Fn(causeway_core::vote::Conflict) -> Error {
    move |conflict| Error::Diverged {
        ts,
        detail: conflict.to_string(),
    }
}

/// The bytes of the limits a pending mutation carries (they are part of its record).
const LIMITS_BYTES: usize = 8 + 4 + 8;
/// Marks a pending row whose record begins histories with one actor (`Limits::history_actors`).
/// No protobuf message starts with a byte below 8 (field numbers start at 1), so a row written
/// before the marker existed reads as one without it.
const PENDING_HISTORY_ACTORS: u8 = 3;

/// A pending row's value: `wall_clock_ms u64 BE ‖ limits ‖ [PENDING_HISTORY_ACTORS] ‖ mutation`
/// (no mutation for an idempotency key's row).
pub(super) fn encode_pending(
    wall_clock_ms: u64,
    limits: &Limits,
    mutation: Option<&pb::Mutation>,
) -> Vec<u8> {
    let mut out = wall_clock_ms.to_be_bytes().to_vec();
    out.extend_from_slice(&(limits.max_document_bytes as u64).to_be_bytes());
    out.extend_from_slice(&limits.max_history_changes.to_be_bytes());
    out.extend_from_slice(&limits.idempotency_window_ms.to_be_bytes());
    if limits.history_actors {
        out.push(PENDING_HISTORY_ACTORS);
    }
    if let Some(mutation) = mutation {
        mutation.encode(&mut out).expect("a Vec grows");
    }
    out
}

/// A pending row's wall clock, limits and mutation bytes (see `encode_pending`).
pub(super) fn decode_pending(value: &[u8]) -> (u64, Limits, &[u8]) {
    let head = 8 + LIMITS_BYTES;
    assert!(value.len() >= head, "corrupt pending value");
    let u64_at = |at: usize| u64::from_be_bytes(value[at..at + 8].try_into().expect("8 bytes"));
    let history_actors = value.get(head) == Some(&PENDING_HISTORY_ACTORS);
    let limits = Limits {
        max_document_bytes: usize::try_from(u64_at(8)).unwrap_or(usize::MAX),
        max_history_changes: u32::from_be_bytes(value[16..20].try_into().expect("4 bytes")),
        idempotency_window_ms: u64_at(20),
        history_actors,
    };
    let mutation = &value[head + usize::from(history_actors)..];
    (u64_at(0), limits, mutation)
}

/// Applies one transaction's mutations of the document in `output.state`: at most one new
/// version (a delta, a snapshot or a tombstone) goes to `output.puts`, and the state moves on.
/// A transaction decided here ([`Decided::Local`]) first votes on the state (`duplicate_of`:
/// the earlier commit of its idempotency key); one that votes no leaves it as it was.
fn apply_version(
    output: &mut DocOutput,
    version: &Version<'_>,
    duplicate_of: Option<Timestamp>,
    options: &super::StoreOptions,
) {
    let Version {
        ts,
        wall_clock_ms,
        mutations,
        limits,
        decided,
    } = version;
    let (ts, wall_clock_ms) = (*ts, *wall_clock_ms);
    if let Some(latest) = output.state.latest() {
        assert!(
            latest < ts,
            "version {latest} is not older than applied ts {ts}"
        );
    }
    let result = txn::result_json(&output.state, mutations, ts, limits);
    let result_bytes = match &result {
        Ok(Some(json)) => Some(document::to_bytes(json)),
        _ => None,
    };
    if let Some(original) = duplicate_of {
        output
            .outcomes
            .push((ts, txn::outcome_of(&Decision::Duplicate(original))));
        return;
    }
    if *decided == Decided::Local {
        let bytes = result_bytes.as_ref().map(Vec::len);
        let failures = txn::failures(&output.state, mutations, limits, &result, bytes);
        let decision = if failures.is_empty() {
            Decision::Committed
        } else {
            Decision::Aborted(failures)
        };
        output.outcomes.push((ts, txn::outcome_of(&decision)));
        if !decision.applies() {
            return;
        }
    }
    let result = match result {
        Ok(result) => result,
        // Decided elsewhere to commit: every voter found the changes applicable.
        Err(reason) => panic!("committed mutations of ts {ts} cannot apply: {reason}"),
    };
    if let Some(row) = &mutations.key_row {
        output.puts.push((
            CF_DOCS,
            keys::version_key(row, ts),
            txn::key_row_value(wall_clock_ms),
        ));
        output
            .rows
            .push((row.clone(), KeyRow { ts, wall_clock_ms }));
    }
    let state = std::mem::replace(&mut output.state, Cached::Absent { latest: None });
    let latest_before = state.latest();
    let (mut doc, mut history_changes, deltas_before, heads_before, history) = match state {
        Cached::Live(live) => {
            let heads = live.doc.get_heads();
            (
                Some(live.doc),
                live.history_changes,
                live.deltas,
                Some(heads),
                live.actor,
            )
        }
        Cached::Absent { .. } => (None, 0, 0, None, None),
    };
    let mut actors = document::Actors::new(history, ts, limits.history_actors);
    let existed = doc.is_some();
    // A document created (or re-created after a delete) within this transaction gets a
    // snapshot: it has no previous version to be a delta of.
    let mut fresh = false;
    for (index, op) in &mutations.ops {
        let created = doc.is_none();
        if created && !matches!(op, Op::Delete) {
            actors.begin(*index);
        }
        match op {
            Op::Delete => {
                doc = None;
                history_changes = 0;
                continue;
            }
            Op::Changes(changes) => {
                let target = doc.get_or_insert_with(|| document::empty_doc(ts, *index));
                let added = document::apply_changes(target, changes)
                    .unwrap_or_else(|e| panic!("changes of ts {ts} voted applicable: {e}"));
                history_changes =
                    history_changes.saturating_add(u32::try_from(added).unwrap_or(u32::MAX));
            }
            local => {
                let target = doc.get_or_insert_with(|| document::empty_doc(ts, *index));
                target.set_actor(actors.of(*index));
                let mut tx = target.transaction();
                if let Err(e) = document::apply_local(&mut tx, local) {
                    panic!("mutation {index} of ts {ts} failed on a total operation: {e}");
                }
                let (hash, _) = tx.commit_with(document::commit_options(wall_clock_ms));
                if hash.is_some() {
                    history_changes = history_changes.saturating_add(1);
                }
            }
        }
        fresh |= created;
    }
    let key = keys::version_key(&output.prefix, ts);
    let (Some(mut live_doc), Some(model)) = (doc, result) else {
        // Deleted. A document that was already absent needs no tombstone.
        if existed {
            output.puts.push((CF_DOCS, key, Record::Tombstone.encode()));
            output.versions_written += 1;
        }
        let latest = if existed { Some(ts) } else { latest_before };
        output.state = Cached::Absent { latest };
        return;
    };
    let hash = u64::from_be_bytes(output.prefix[..8].try_into().expect("hash prefix"));
    output.puts.push((
        CF_BY_COLLECTION,
        keys::collection_key(mutations.collection, hash, mutations.id),
        Vec::new(),
    ));
    debug_assert_eq!(
        model,
        document::materialize(&live_doc),
        "the JSON model drifted"
    );
    let json_bytes = result_bytes.expect("a live result has its bytes");
    let (segment, automerge) = if history_changes > limits.max_history_changes {
        live_doc = document::rebase(&live_doc, ts, wall_clock_ms);
        actors.rebased(&live_doc);
        history_changes = 1;
        (Segment::Snapshot, document::snapshot(&live_doc))
    } else {
        match heads_before {
            Some(heads) if !fresh && deltas_before + 1 < options.snapshot_every_versions => {
                (Segment::Delta, live_doc.save_after(&heads))
            }
            _ => (Segment::Snapshot, document::snapshot(&live_doc)),
        }
    };
    let deltas = match segment {
        Segment::Snapshot => 0,
        Segment::Delta => deltas_before + 1,
    };
    let value = Record::Put {
        segment,
        history_changes,
        deltas,
        actor: match segment {
            Segment::Snapshot => actors.history().map(ActorId::to_bytes),
            Segment::Delta => None,
        },
        json: &json_bytes,
        automerge: &automerge,
    }
    .encode();
    output.puts.push((CF_DOCS, key, value));
    output.versions_written += 1;
    output.state = Cached::Live(Box::new(Live {
        doc: live_doc,
        latest: ts,
        history_changes,
        deltas,
        actor: actors.history().cloned(),
        json: model,
        json_bytes: json_bytes.len(),
    }));
}

/// `f` over `items` on up to `threads` threads (the caller's among them), results in the order
/// of `items`. Items are handed out one at a time, so one slow item does not hold up a thread's
/// whole share. A panic in `f` is re-raised here.
fn parallel_map<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(items.len() / MIN_DOCUMENTS_PER_THREAD);
    if threads <= 1 {
        return items.into_iter().map(f).collect();
    }
    let count = items.len();
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= count {
                return done;
            }
            let item = slots[index]
                .lock()
                .expect("an item slot is never poisoned")
                .take()
                .expect("each item is handed out once");
            done.push((index, f(item)));
        }
    };
    let mut results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(worker)).collect();
        let mut results = worker();
        for helper in helpers {
            match helper.join() {
                Ok(done) => results.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    results.sort_unstable_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

#[cfg(test)]
mod tests {
    use super::parallel_map;

    #[test]
    fn parallel_map_keeps_order_and_runs_every_item_once() {
        for threads in [0, 1, 2, 8] {
            for count in [0, 1, 3, 4, 100] {
                let items: Vec<u64> = (0..count).collect();
                let out = parallel_map(items, threads, |i| i * 3);
                assert_eq!(out, (0..count).map(|i| i * 3).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    #[should_panic(expected = "item 37")]
    fn parallel_map_reraises_a_panic() {
        parallel_map((0..100).collect::<Vec<u32>>(), 4, |i| {
            assert!(i != 37, "item 37");
            i
        });
    }
}
