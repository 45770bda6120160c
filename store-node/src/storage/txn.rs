//! Transactions as apply sees them: the parsed record (mutations and conditions grouped by
//! document), the votes a document casts on its state just before the transaction, and the
//! outcome records kept for other nodes and clients (ARCHITECTURE.md, "Transaction outcomes").
//!
//! A vote is a pure function of the document's state at ts − 1 and the record, so every replica
//! of a document casts the same one. Two things make a document vote no: a false condition
//! (`exists`, `version_ts`, a query filter), and a result over the record's document size limit
//! (or raw automerge changes whose dependencies the document lacks). Mutations are otherwise
//! total (`document`), so nothing else can fail.

use std::collections::HashMap;

use automerge::Change;
use causeway_core::key::{validate_collection, validate_id};
use causeway_core::query::{Filter, QueryLimits};
use causeway_core::{KeyHash, KeyLimits, Timestamp, Vote};
use causeway_proto::v1::{self as pb, mutation, Mutation, Transaction, FORMAT_HISTORY_ACTORS};
use serde_json::{Map, Value as Json};

use super::document::{self, Op};
use super::record::{Record, Segment};
use super::{keys, Cached, Rejection};

/// The document size limit of a record that names none (1 MiB).
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The re-base threshold of a record that names none (1024 changes).
pub const DEFAULT_MAX_HISTORY_CHANGES: u32 = 1024;
/// The idempotency window of a record that names none (24 h of the records' wall clock).
pub const DEFAULT_IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// An idempotency key is forgotten this many log positions after its transaction, whatever the
/// window: the bound on the count of keys kept. Part of the record format (GC relies on it).
pub const IDEMPOTENCY_MAX_DISTANCE: u64 = 10_000_000;
/// Longest idempotency key apply takes; a longer one makes the record invalid.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// What apply enforces for one record: the record's own limits, or the format's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_document_bytes: usize,
    pub max_history_changes: u32,
    pub idempotency_window_ms: u64,
    /// A history this record begins (creates or re-bases) shares one actor among the store's
    /// changes to it: records of format `FORMAT_HISTORY_ACTORS` and later.
    pub history_actors: bool,
}

impl Limits {
    pub fn of(tx: &Transaction) -> Limits {
        let limits = tx.limits.unwrap_or_default();
        Limits {
            max_document_bytes: match limits.max_document_bytes {
                0 => DEFAULT_MAX_DOCUMENT_BYTES,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
            max_history_changes: match limits.max_history_changes {
                0 => DEFAULT_MAX_HISTORY_CHANGES,
                n => n,
            },
            idempotency_window_ms: match limits.idempotency_window_ms {
                0 => DEFAULT_IDEMPOTENCY_WINDOW_MS,
                n => n,
            },
            history_actors: tx.format_version >= FORMAT_HISTORY_ACTORS,
        }
    }
}

/// A parsed condition on a document (its index in the record, and what must hold).
#[derive(Debug, Clone)]
pub struct Cond {
    pub index: u32,
    pub exists: Option<bool>,
    pub version_ts: Option<u64>,
    pub filter: Option<Filter>,
}

/// One document's share of one transaction: its mutations and conditions, in log order.
pub(super) struct DocMutations<'a> {
    pub collection: &'a str,
    pub id: &'a str,
    pub ops: Vec<(u32, Op)>,
    pub conditions: Vec<Cond>,
    /// On the first document the transaction writes, when it has an idempotency key: the
    /// prefix of the key's row, beside this document.
    pub key_row: Option<Vec<u8>>,
}

impl DocMutations<'_> {
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.collection, self.id)
    }

    /// Whether this document's vote can be anything but yes: it has conditions, or a mutation
    /// whose result size depends on the document (a replace's result is its payload, checked
    /// when the record is parsed; a delete leaves nothing).
    pub fn decides(&self) -> bool {
        !self.conditions.is_empty()
            || self.key_row.is_some()
            || self
                .ops
                .iter()
                .any(|(_, op)| !matches!(op, Op::Replace(_) | Op::Delete))
    }

    pub fn key(&self) -> DocRef {
        (self.collection.to_owned(), self.id.to_owned())
    }

    /// Whether the transaction writes this document (it is not only under a condition).
    pub fn writes(&self) -> bool {
        !self.ops.is_empty()
    }
}

/// A document as the key of a ballot: (collection, id).
pub type DocRef = (String, String);

/// A parsed record.
pub(super) struct Parsed<'a> {
    pub docs: Vec<DocMutations<'a>>,
    pub limits: Limits,
}

impl Parsed<'_> {
    /// Whether the transaction could abort at all.
    pub fn decides(&self) -> bool {
        self.docs.iter().any(DocMutations::decides)
    }
}

/// Parses one mutation's op (the checks that need no document).
pub(super) fn parse_op(mutation: &Mutation, limits: &Limits) -> Result<Op, Rejection> {
    let keys = KeyLimits::default();
    validate_collection(&mutation.collection, &keys)?;
    validate_id(&mutation.id, &keys)?;
    let max = limits.max_document_bytes;
    let too_large = |bytes: usize| Rejection::DocumentTooLarge { bytes, max };
    let object = |bytes: &[u8]| -> Result<Map<String, Json>, Rejection> {
        if bytes.len() > max {
            return Err(too_large(bytes.len()));
        }
        match serde_json::from_slice(bytes) {
            Ok(Json::Object(map)) => Ok(map),
            Ok(_) => Err(Rejection::NotAnObject),
            Err(_) => Err(Rejection::InvalidJson),
        }
    };
    Ok(match mutation.op.as_ref().ok_or(Rejection::MissingOp)? {
        mutation::Op::Replace(r) => {
            let map = object(&r.json)?;
            // The stored form may be longer than the payload (`1e2` is stored as `100.0`).
            let stored = document::to_bytes(&map).len();
            if stored > max {
                return Err(too_large(stored));
            }
            Op::Replace(map)
        }
        mutation::Op::MergePatch(p) => Op::MergePatch(object(&p.json)?),
        mutation::Op::Increment(i) => {
            if i.path.is_empty() {
                return Err(Rejection::EmptyPath);
            }
            Op::Increment {
                path: i.path.clone(),
                delta: i.delta,
            }
        }
        mutation::Op::Delete(_) => Op::Delete,
        mutation::Op::Changes(c) => {
            let bytes: usize = c.changes.iter().map(Vec::len).sum();
            if bytes > max {
                return Err(too_large(bytes));
            }
            Op::Changes(
                c.changes
                    .iter()
                    .map(|b| {
                        Change::from_bytes(b.clone()).map_err(|_| Rejection::UndecodableChange)
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

fn parse_condition(index: u32, c: &pb::Condition) -> Result<Cond, Rejection> {
    let keys = KeyLimits::default();
    validate_collection(&c.collection, &keys)?;
    validate_id(&c.id, &keys)?;
    let filter = if c.filter.is_empty() {
        None
    } else {
        let text = std::str::from_utf8(&c.filter).map_err(|_| Rejection::InvalidFilter)?;
        Some(
            Filter::parse_str(text, &QueryLimits::default())
                .map_err(|_| Rejection::InvalidFilter)?,
        )
    };
    if c.exists.is_none() && c.version_ts.is_none() && filter.is_none() {
        return Err(Rejection::EmptyCondition);
    }
    Ok(Cond {
        index,
        exists: c.exists,
        version_ts: c.version_ts,
        filter,
    })
}

/// Validates a whole record and groups its mutations and conditions by document (in order of
/// first appearance, mutations before condition-only documents). `Err((culprit, reason))`
/// means the whole transaction is skipped: every node sees the same record and decides the
/// same.
pub(super) fn parse_transaction(tx: &Transaction) -> Result<Parsed<'_>, (Option<u32>, Rejection)> {
    let limits = Limits::of(tx);
    let mut docs: Vec<DocMutations<'_>> = Vec::new();
    let slot = |docs: &mut Vec<DocMutations<'_>>, collection: &str, id: &str| {
        docs.iter()
            .position(|d| d.collection == collection && d.id == id)
    };
    for (index, mutation) in tx.mutations.iter().enumerate() {
        let index = u32::try_from(index).expect("fewer than 2^32 mutations");
        let op = parse_op(mutation, &limits).map_err(|reason| (Some(index), reason))?;
        match slot(&mut docs, &mutation.collection, &mutation.id) {
            Some(at) => docs[at].ops.push((index, op)),
            None => docs.push(DocMutations {
                collection: &mutation.collection,
                id: &mutation.id,
                ops: vec![(index, op)],
                conditions: Vec::new(),
                key_row: None,
            }),
        }
    }
    for (index, condition) in tx.conditions.iter().enumerate() {
        let index = u32::try_from(index).expect("fewer than 2^32 conditions");
        let cond = parse_condition(index, condition).map_err(|reason| (None, reason))?;
        match slot(&mut docs, &condition.collection, &condition.id) {
            Some(at) => docs[at].conditions.push(cond),
            None => docs.push(DocMutations {
                collection: &condition.collection,
                id: &condition.id,
                ops: Vec::new(),
                conditions: vec![cond],
                key_row: None,
            }),
        }
    }
    if !tx.idempotency_key.is_empty() {
        let key = &tx.idempotency_key;
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES || !key.bytes().all(|b| (0x21..0x7f).contains(&b))
        {
            return Err((None, Rejection::InvalidIdempotencyKey));
        }
        // Mutations come first: the first document is the first one written.
        if let Some(first) = docs.first_mut().filter(|d| d.writes()) {
            first.key_row = Some(keys::idempotency_prefix(
                first.hash().0,
                &tx.idempotency_scope,
                key,
            ));
        }
    }
    Ok(Parsed { docs, limits })
}

/// A failure of `doc`'s share.
fn failure(doc: &DocMutations<'_>) -> pb::TxFailure {
    pb::TxFailure {
        collection: doc.collection.to_owned(),
        id: doc.id.to_owned(),
        ..pb::TxFailure::default()
    }
}

/// The conditions of `doc` that do not hold on `state` (the document at ts − 1).
fn failed_conditions(state: &Cached, doc: &DocMutations<'_>) -> Vec<pb::TxFailure> {
    let (version, json) = match state {
        Cached::Live(live) => (live.latest.0, Some(&live.json)),
        Cached::Absent { .. } => (0, None),
    };
    let mut failed = Vec::new();
    for cond in &doc.conditions {
        let holds = cond.exists.is_none_or(|e| e == json.is_some())
            && cond.version_ts.is_none_or(|v| v == version)
            && cond
                .filter
                .as_ref()
                .is_none_or(|f| json.is_some_and(|map| f.matches(&Json::Object(map.clone()))));
        if !holds {
            failed.push(pb::TxFailure {
                condition: Some(cond.index),
                found_version_ts: version,
                ..failure(doc)
            });
        }
    }
    failed
}

/// The failure of a result of `bytes` over the limit, if it is.
fn size_failure(doc: &DocMutations<'_>, bytes: usize, limits: &Limits) -> Option<pb::TxFailure> {
    (bytes > limits.max_document_bytes).then(|| pb::TxFailure {
        bytes: bytes as u64,
        max_bytes: limits.max_document_bytes as u64,
        ..failure(doc)
    })
}

/// `doc`'s vote on `state`, computed without changing it: its false conditions, and whether
/// the result of its mutations stays within the limit.
pub(super) fn vote(
    state: &Cached,
    doc: &DocMutations<'_>,
    ts: Timestamp,
    limits: &Limits,
    duplicate_of: Option<Timestamp>,
) -> Vote<pb::TxFailure> {
    if duplicate_of.is_some() {
        return Vote {
            failures: Vec::new(),
            duplicate_of,
        };
    }
    let result = if doc.writes() {
        result_json(state, doc, ts, limits)
    } else {
        Ok(None)
    };
    let bytes = match &result {
        Ok(Some(json)) => Some(document::to_bytes(json).len()),
        _ => None,
    };
    Vote {
        failures: failures(state, doc, limits, &result, bytes),
        duplicate_of: None,
    }
}

/// `doc`'s reasons to vote no on `state`: its false conditions, a result of its mutations
/// (`result`, of `bytes` bytes of JSON) over the limit, or mutations that cannot apply.
pub(super) fn failures(
    state: &Cached,
    doc: &DocMutations<'_>,
    limits: &Limits,
    result: &Result<Option<Map<String, Json>>, Rejection>,
    bytes: Option<usize>,
) -> Vec<pb::TxFailure> {
    let mut failures = failed_conditions(state, doc);
    failures.extend(bytes.and_then(|bytes| size_failure(doc, bytes, limits)));
    if let Err(reason) = result {
        failures.push(rejected(doc, reason));
    }
    failures
}

/// The failure of mutations that cannot apply to the document.
fn rejected(doc: &DocMutations<'_>, reason: &Rejection) -> pb::TxFailure {
    pb::TxFailure {
        detail: reason.to_string(),
        ..failure(doc)
    }
}

/// The document's JSON after `doc`'s mutations at `ts` (`None`: absent), or why the mutations
/// cannot apply (raw changes missing their dependencies).
pub(super) fn result_json(
    state: &Cached,
    doc: &DocMutations<'_>,
    ts: Timestamp,
    limits: &Limits,
) -> Result<Option<Map<String, Json>>, Rejection> {
    let live = match state {
        Cached::Live(live) => Some(&**live),
        Cached::Absent { .. } => None,
    };
    if !doc.ops.iter().any(|(_, op)| matches!(op, Op::Changes(_))) {
        let mut json = live.map(|l| l.json.clone());
        for (_, op) in &doc.ops {
            match op {
                Op::Delete => json = None,
                local => document::apply_json(json.get_or_insert_with(Map::new), local),
            }
        }
        return Ok(json);
    }
    // Raw changes: the mutations themselves, on a copy of the automerge document, by the actors
    // apply will use (concurrent operations resolve by actor).
    let mut am = live.map(|l| l.doc.clone());
    let mut actors = document::Actors::new(
        live.and_then(|l| l.actor.clone()),
        ts,
        limits.history_actors,
    );
    for (index, op) in &doc.ops {
        if am.is_none() && !matches!(op, Op::Delete) {
            actors.begin(*index);
        }
        match op {
            Op::Delete => am = None,
            Op::Changes(changes) => {
                let target = am.get_or_insert_with(|| document::empty_doc(ts, *index));
                document::apply_changes(target, changes)?;
            }
            local => {
                let target = am.get_or_insert_with(|| document::empty_doc(ts, *index));
                target.set_actor(actors.of(*index));
                let mut tx = target.transaction();
                document::apply_local(&mut tx, local)?;
                tx.commit();
            }
        }
    }
    Ok(am.map(|d| document::materialize(&d)))
}

/// What an idempotency row remembers: the ts of the transaction that committed the key (the
/// row's version), and its wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeyRow {
    pub ts: Timestamp,
    pub wall_clock_ms: u64,
}

/// The earlier commit a transaction at `ts` (logged at `wall_clock_ms`) repeats, if `row` is
/// still remembered for it: within the record's window of wall clock and within
/// [`IDEMPOTENCY_MAX_DISTANCE`] log positions.
pub(super) fn duplicate_of(
    row: Option<KeyRow>,
    ts: Timestamp,
    wall_clock_ms: u64,
    limits: &Limits,
) -> Option<Timestamp> {
    row.filter(|row| {
        ts.0 - row.ts.0 <= IDEMPOTENCY_MAX_DISTANCE
            && wall_clock_ms.saturating_sub(row.wall_clock_ms) <= limits.idempotency_window_ms
    })
    .map(|row| row.ts)
}

/// The value of an idempotency row's version: a snapshot record whose JSON holds the wall
/// clock (and no automerge state: nothing edits it).
pub(super) fn key_row_value(wall_clock_ms: u64) -> Vec<u8> {
    let json = serde_json::to_vec(&serde_json::json!({ "wall_clock_ms": wall_clock_ms }))
        .expect("a JSON object serializes");
    Record::Put {
        segment: Segment::Snapshot,
        history_changes: 0,
        deltas: 0,
        actor: None,
        json: &json,
        automerge: &[],
    }
    .encode()
}

/// An idempotency row's version, read back.
pub(super) fn key_row_of(ts: Timestamp, value: &[u8]) -> KeyRow {
    let wall_clock_ms = Record::decode(value)
        .json()
        .and_then(|json| serde_json::from_slice::<Json>(json).ok())
        .and_then(|json| json["wall_clock_ms"].as_u64())
        .unwrap_or_else(|| panic!("corrupt idempotency row at ts {ts}"));
    KeyRow { ts, wall_clock_ms }
}

/// What a node knows of other nodes' votes, by ts (the `known` of `Outcome` answers).
pub type RemoteVotes = HashMap<Timestamp, Vec<pb::outcome_response::Known>>;

/// A transaction apply stopped at: it needs the votes of documents this node does not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub ts: Timestamp,
    /// This node's votes on the documents it holds.
    pub votes: Vec<pb::DocVote>,
    /// The documents whose votes are missing, with their place in the keyspace.
    pub missing: Vec<(DocRef, KeyHash)>,
    /// This node's votes on later transactions of the group that it can already cast
    /// (`Store::apply_with_votes` says which), by ts.
    pub early: Vec<(Timestamp, Vec<pb::DocVote>)>,
}

/// A document's vote as it goes on the wire.
pub(super) fn doc_vote(key: &DocRef, vote: &Vote<pb::TxFailure>) -> pb::DocVote {
    pb::DocVote {
        collection: key.0.clone(),
        id: key.1.clone(),
        failures: vote.failures.clone(),
        duplicate_of: vote.duplicate_of.map_or(0, |t| t.0),
    }
}

/// A vote from the wire.
pub(super) fn from_doc_vote(v: &pb::DocVote) -> (DocRef, Vote<pb::TxFailure>) {
    (
        (v.collection.clone(), v.id.clone()),
        Vote {
            failures: v.failures.clone(),
            duplicate_of: (v.duplicate_of != 0).then_some(Timestamp(v.duplicate_of)),
        },
    )
}

/// A decision as it goes on the wire and into the outcome record.
pub fn outcome_of(decision: &causeway_core::Decision<pb::TxFailure>) -> pb::TxOutcome {
    use causeway_core::Decision;
    match decision {
        Decision::Committed => pb::TxOutcome {
            committed: true,
            ..pb::TxOutcome::default()
        },
        Decision::Aborted(failures) => pb::TxOutcome {
            committed: false,
            failures: failures.clone(),
            duplicate_of: 0,
        },
        Decision::Duplicate(ts) => pb::TxOutcome {
            committed: false,
            failures: Vec::new(),
            duplicate_of: ts.0,
        },
    }
}

/// A decision from the wire.
pub fn decision_of(outcome: &pb::TxOutcome) -> causeway_core::Decision<pb::TxFailure> {
    use causeway_core::Decision;
    if outcome.duplicate_of != 0 {
        Decision::Duplicate(Timestamp(outcome.duplicate_of))
    } else if outcome.committed {
        Decision::Committed
    } else {
        Decision::Aborted(outcome.failures.clone())
    }
}
