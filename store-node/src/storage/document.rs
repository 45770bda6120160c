//! Documents as automerge objects: JSON in, JSON out, and the deterministic application of one
//! mutation.
//!
//! JSON maps to automerge as: object → map, array → list, string → string scalar, integer →
//! `Int` (or `Uint` above `i64::MAX`), other numbers → `F64`, booleans and null → their scalars.
//! Back to JSON: counters and timestamps → integers, text objects → strings, bytes → arrays of
//! integers, NaN and unknown scalars → null. Writes only touch the fields that change (a field
//! whose value is already equal is left alone), which keeps the history small.
//!
//! The local mutations are total: none fails against the document it finds.
//! - An increment adds to the integer a field holds (a counter, a plain integer, a timestamp:
//!   whatever reads as an integer that fits i64) and leaves a counter; a field holding anything
//!   else, or nothing, starts a counter at the delta (Firestore's rule). A parent on the path that
//!   is not a map is replaced by one.
//! - Counters saturate at the i64 bounds instead of overflowing.
//! - A PUT or merge patch writing an integer that fits i64 into a counter keeps it a counter,
//!   moved to the new value; writing anything else into it replaces it.
//!
//! The JSON each rule leaves depends only on the JSON the document reads as, never on the
//! automerge types behind it, so [`apply_json`], which sees only JSON, mirrors them exactly.

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, AutomergeError, Change, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT,
};
use causeway_core::Timestamp;
use serde_json::{Map, Number, Value as Json};

use super::Rejection;

/// Tags the actor ids this store derives, after `ts ‖ mutation index`.
const ACTOR_TAG_MUTATION: &[u8; 4] = b"cwm1";
const ACTOR_TAG_REBASE: &[u8; 4] = b"cwr1";
/// The mutation index a re-base uses in its actor id: no transaction has that many mutations.
const REBASE_INDEX: u32 = u32::MAX;

/// The automerge actor of a history begun by mutation `index` of the transaction at `ts` (or
/// of that one mutation, in a history stored before actors were kept per document): the same
/// on every replica and unique per history, so two replicas make byte-identical changes and no
/// two histories share an actor.
pub fn actor(ts: Timestamp, index: u32) -> ActorId {
    let tag = if index == REBASE_INDEX {
        ACTOR_TAG_REBASE
    } else {
        ACTOR_TAG_MUTATION
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&ts.0.to_be_bytes());
    bytes[8..12].copy_from_slice(&index.to_be_bytes());
    bytes[12..].copy_from_slice(tag);
    ActorId::from(&bytes[..])
}

/// The actors of the store's changes to one document while a transaction applies: one per
/// history (from the document's creation or re-base to the next: the actor of the mutation that
/// began it, named by its snapshots), so their sequence numbers count them and the document holds
/// one store actor per history rather than one per write; or, for a history begun before that
/// (by a record of an earlier format, or stored before actors were kept), one per mutation.
/// Apply and the votes that predict it choose them alike, so both see the same conflicts.
#[derive(Debug, Clone)]
pub struct Actors {
    history: Option<ActorId>,
    ts: Timestamp,
    per_history: bool,
}

impl Actors {
    /// For the transaction at `ts` on a document whose history's actor is `history`;
    /// `per_history`: histories it begins get one actor (`Limits::history_actors`).
    pub fn new(history: Option<ActorId>, ts: Timestamp, per_history: bool) -> Actors {
        Actors {
            history,
            ts,
            per_history,
        }
    }

    /// Mutation `index` begins a new history (the document is absent before it).
    pub fn begin(&mut self, index: u32) {
        self.history = self.per_history.then(|| actor(self.ts, index));
    }

    /// The document was re-based into `doc`: a new history, begun by the re-base's actor.
    pub fn rebased(&mut self, doc: &Automerge) {
        self.history = self.per_history.then(|| doc.get_actor().clone());
    }

    /// The actor of mutation `index`'s change.
    pub fn of(&self, index: u32) -> ActorId {
        match &self.history {
            Some(actor) => actor.clone(),
            None => actor(self.ts, index),
        }
    }

    /// The history's actor, for its snapshots and the cache.
    pub fn history(&self) -> Option<&ActorId> {
        self.history.as_ref()
    }
}

/// The commit options of a change made while applying a transaction: its time is the record's
/// wall clock, never the local one.
pub fn commit_options(wall_clock_ms: u64) -> CommitOptions {
    CommitOptions::default().with_time(i64::try_from(wall_clock_ms).unwrap_or(i64::MAX))
}

/// The bytes of a snapshot version: the whole document, not deflated. RocksDB compresses its
/// blocks anyway, and automerge's deflate allocates some 300 KB of compressor state per call,
/// which the allocator could not give back while the cached documents around it lived: a node
/// writing 1 KB documents grew by that much per document.
pub fn snapshot(doc: &Automerge) -> Vec<u8> {
    doc.save_nocompress()
}

/// An empty document whose actor is set (automerge picks a random one otherwise).
pub fn empty_doc(ts: Timestamp, index: u32) -> Automerge {
    let mut doc = Automerge::new();
    doc.set_actor(actor(ts, index));
    doc
}

/// The document as a JSON object.
pub fn materialize<R: ReadDoc>(doc: &R) -> Map<String, Json> {
    match object_to_json(doc, &ROOT, ObjType::Map) {
        Json::Object(map) => map,
        other => panic!("automerge root materialized as {other}"),
    }
}

fn object_to_json<R: ReadDoc>(doc: &R, obj: &ObjId, kind: ObjType) -> Json {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut map = Map::new();
            for key in doc.keys(obj) {
                if let Ok(Some((value, id))) = doc.get(obj, key.as_str()) {
                    map.insert(key, value_to_json(doc, value, &id));
                }
            }
            Json::Object(map)
        }
        ObjType::List => {
            let len = doc.length(obj);
            let mut items = Vec::with_capacity(len);
            for index in 0..len {
                match doc.get(obj, index) {
                    Ok(Some((value, id))) => items.push(value_to_json(doc, value, &id)),
                    _ => items.push(Json::Null),
                }
            }
            Json::Array(items)
        }
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

fn value_to_json<R: ReadDoc>(doc: &R, value: Value<'_>, id: &ObjId) -> Json {
    match value {
        Value::Object(kind) => object_to_json(doc, id, kind),
        Value::Scalar(scalar) => scalar_to_json(&scalar),
    }
}

fn scalar_to_json(scalar: &ScalarValue) -> Json {
    match scalar {
        ScalarValue::Bytes(bytes) => Json::Array(bytes.iter().map(|&b| Json::from(b)).collect()),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}

/// The scalar a JSON leaf is stored as; `None` for objects and arrays.
fn json_to_scalar(value: &Json) -> Option<ScalarValue> {
    Some(match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Where a value goes: a map key or a list position (inserted).
#[derive(Clone, Copy)]
enum Slot<'a> {
    Key(&'a str),
    Insert(usize),
}

/// Writes `value` fresh at `slot` of `obj`.
fn write_value(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    slot: Slot<'_>,
    value: &Json,
) -> Result<(), AutomergeError> {
    let kind = match value {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        leaf => return put_scalar(tx, obj, slot, json_to_scalar(leaf).expect("a leaf")),
    };
    let child = match slot {
        Slot::Key(key) => tx.put_object(obj, key, kind)?,
        Slot::Insert(index) => tx.insert_object(obj, index, kind)?,
    };
    match value {
        Json::Object(map) => {
            for (key, item) in map {
                write_value(tx, &child, Slot::Key(key), item)?;
            }
        }
        Json::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                write_value(tx, &child, Slot::Insert(index), item)?;
            }
        }
        _ => unreachable!("leaves returned above"),
    }
    Ok(())
}

/// Writes `scalar` at `slot` of `obj`.
fn put_scalar(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    slot: Slot<'_>,
    scalar: ScalarValue,
) -> Result<(), AutomergeError> {
    match slot {
        Slot::Key(key) => tx.put(obj, key, scalar),
        Slot::Insert(index) => tx.insert(obj, index, scalar),
    }
}

/// Sets `key` of map `obj` to `value`, leaving it alone when it is already equal and syncing
/// nested objects field by field.
fn sync_field(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    value: &Json,
) -> Result<(), AutomergeError> {
    match (get_owned(tx, obj, key)?, value) {
        (Some((Value::Object(ObjType::Map), child)), Json::Object(map)) => {
            sync_map(tx, &child, map)
        }
        (Some((Value::Scalar(scalar), _)), leaf) => sync_scalar(tx, obj, key, &scalar, leaf),
        (Some((Value::Object(kind), child)), Json::Array(_) | Json::String(_))
            if kind != ObjType::Map && object_to_json(tx, &child, kind) == *value =>
        {
            Ok(())
        }
        _ => write_value(tx, obj, Slot::Key(key), value),
    }
}

/// Sets `key` of map `obj`, which holds `scalar`, to `value`. A counter written with an integer
/// that fits i64 stays a counter, moved to that value by increments (so a read-modify-write PUT
/// keeps the document's counters counters); an equal value is left alone; anything else is
/// written fresh.
///
/// An integer above `i64::MAX` (JSON holds u64 up to `u64::MAX`) does not fit a counter and
/// replaces it with a plain `Uint`, as it would any other value. It does not saturate the counter
/// at `i64::MAX`: the JSON model cannot tell a counter from a plain number, so [`apply_json`]
/// could not mirror a result other than the value written.
fn sync_scalar(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    scalar: &ScalarValue,
    value: &Json,
) -> Result<(), AutomergeError> {
    match (scalar, value.as_i64()) {
        (ScalarValue::Counter(counter), Some(target)) => {
            move_counter(tx, obj, key, i64::from(counter), target)
        }
        _ if json_to_scalar(value).as_ref() == Some(scalar) => Ok(()),
        _ => write_value(tx, obj, Slot::Key(key), value),
    }
}

/// Makes map `obj` equal to `map` (replace semantics).
fn sync_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    map: &Map<String, Json>,
) -> Result<(), AutomergeError> {
    let stale: Vec<String> = tx.keys(obj).filter(|k| !map.contains_key(k)).collect();
    for key in stale {
        tx.delete(obj, key.as_str())?;
    }
    for (key, value) in map {
        sync_field(tx, obj, key, value)?;
    }
    Ok(())
}

/// Applies an RFC 7396 merge patch to map `obj`.
fn merge_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    patch: &Map<String, Json>,
) -> Result<(), AutomergeError> {
    for (key, value) in patch {
        match value {
            Json::Null => {
                if tx.get(obj, key.as_str())?.is_some() {
                    tx.delete(obj, key.as_str())?;
                }
            }
            Json::Object(inner) => {
                let child = map_at(tx, obj, key)?;
                merge_map(tx, &child, inner)?;
            }
            leaf => sync_field(tx, obj, key, leaf)?,
        }
    }
    Ok(())
}

/// `key` of map `obj`, owned (so `tx` can be written while it is held).
fn get_owned(
    tx: &Transaction<'_>,
    obj: &ObjId,
    key: &str,
) -> Result<Option<(Value<'static>, ObjId)>, AutomergeError> {
    Ok(tx.get(obj, key)?.map(|(value, id)| (value.to_owned(), id)))
}

/// The map at `key` of map `obj`. Whatever else is there (or nothing) is replaced by an empty
/// map, as a merge patch does; [`json_map_at`] on JSON. That includes a table: automerge 0.12
/// cannot write into one, and it reads as an empty object, so the JSON still agrees.
fn map_at(tx: &mut Transaction<'_>, obj: &ObjId, key: &str) -> Result<ObjId, AutomergeError> {
    match get_owned(tx, obj, key)? {
        Some((Value::Object(ObjType::Map), child)) => Ok(child),
        _ => tx.put_object(obj, key, ObjType::Map),
    }
}

/// The integer a scalar reads as in JSON, if it reads as one that fits i64: a counter, an `Int`,
/// a `Uint` up to `i64::MAX`, a timestamp. [`Json::as_i64`] of [`scalar_to_json`], which is
/// what [`apply_json`] sees.
fn scalar_integer(scalar: &ScalarValue) -> Option<i64> {
    match scalar {
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Some(*i),
        ScalarValue::Counter(counter) => Some(i64::from(counter)),
        ScalarValue::Uint(u) => i64::try_from(*u).ok(),
        _ => None,
    }
}

/// The value of a counter after an increment by `delta` of a field whose integer is `current`
/// (see [`scalar_integer`]): the sum, saturated at the i64 bounds; a field that holds no integer
/// (absent, a string, a float, an object, ...) starts over at `delta`.
fn incremented(current: Option<i64>, delta: i64) -> i64 {
    current.unwrap_or(0).saturating_add(delta)
}

/// Increments `key` of map `obj` by `delta` (see [`incremented`]). A counter is moved by
/// increments, so concurrent increments from CRDT clients still add up; anything else is
/// replaced by a new counter (see [`put_counter`]).
fn increment(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    delta: i64,
) -> Result<(), AutomergeError> {
    let scalar = match get_owned(tx, obj, key)? {
        Some((Value::Scalar(scalar), _)) => Some(scalar.into_owned()),
        Some((Value::Object(_), _)) | None => None,
    };
    match scalar {
        Some(ScalarValue::Counter(counter)) => {
            let current = i64::from(&counter);
            move_counter(tx, obj, key, current, incremented(Some(current), delta))
        }
        other => {
            let target = incremented(other.as_ref().and_then(scalar_integer), delta);
            put_counter(tx, obj, Slot::Key(key), target)
        }
    }
}

/// Writes a new counter holding `value` at `slot` of `obj`: a counter at 0, then incremented to
/// `value`. Automerge reads a counter as its start plus the sum of its increments, and adds that
/// sum up in i64 (panicking on overflow when overflow checks are on): from a start of 0 the sum
/// is always a value the counter held, so it never overflows, however the counter moves later.
fn put_counter(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    slot: Slot<'_>,
    value: i64,
) -> Result<(), AutomergeError> {
    put_scalar(tx, obj, slot, ScalarValue::counter(0))?;
    match slot {
        _ if value == 0 => Ok(()),
        Slot::Key(key) => tx.increment(obj, key, value),
        Slot::Insert(index) => tx.increment(obj, index, value),
    }
}

/// Moves counter `key` of map `obj` from `current` to `target` by increments; none when they are
/// equal. Automerge takes an i64 per increment and the distance between two i64 can exceed one,
/// hence up to three steps, each toward `target`, so no value in between overflows (nor, for a
/// counter made by [`put_counter`], the sum of its increments).
fn move_counter(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    current: i64,
    target: i64,
) -> Result<(), AutomergeError> {
    let mut remaining = i128::from(target) - i128::from(current);
    while remaining != 0 {
        let step = remaining.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        tx.increment(obj, key, i64::try_from(step).expect("clamped to i64"))?;
        remaining -= step;
    }
    Ok(())
}

/// A mutation as it is applied to a document (already validated and parsed).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Replace(Map<String, Json>),
    MergePatch(Map<String, Json>),
    Increment { path: Vec<String>, delta: i64 },
    Delete,
    Changes(Vec<Change>),
}

/// Performs one JSON mutation (not `Delete` or `Changes`) inside `tx`. It fails only on an
/// empty counter path (which validation refuses first) or an automerge error, never because of
/// the document it finds (see the module doc). On `Err` the caller rolls the transaction back.
pub fn apply_local(tx: &mut Transaction<'_>, op: &Op) -> Result<(), Rejection> {
    let automerge = |e: AutomergeError| Rejection::Automerge(e.to_string());
    match op {
        Op::Replace(map) => sync_map(tx, &ROOT, map).map_err(automerge),
        Op::MergePatch(patch) => merge_map(tx, &ROOT, patch).map_err(automerge),
        Op::Increment { path, delta } => {
            let (last, parents) = path.split_last().ok_or(Rejection::EmptyPath)?;
            let mut obj = ROOT;
            for key in parents {
                obj = map_at(tx, &obj, key).map_err(automerge)?;
            }
            increment(tx, &obj, last, *delta).map_err(automerge)
        }
        Op::Delete | Op::Changes(_) => unreachable!("applied by the caller"),
    }
}

/// What [`materialize`] gives after `op`, a local JSON mutation that [`apply_local`] accepted,
/// computed from the JSON before it instead of read back from automerge (a read of every field
/// of the document). Values map to automerge and back unchanged, and the rules of
/// [`apply_local`] depend only on the JSON (see the module doc), so the two agree; apply checks
/// that they do in debug builds.
pub fn apply_json(json: &mut Map<String, Json>, op: &Op) {
    match op {
        Op::Replace(map) => json.clone_from(map),
        Op::MergePatch(patch) => merge_json(json, patch),
        Op::Increment { path, delta } => {
            let (last, parents) = path
                .split_last()
                .expect("apply_local refuses an empty path");
            let mut obj = json;
            for key in parents {
                obj = json_map_at(obj, key);
            }
            let current = obj.get(last).and_then(Json::as_i64);
            obj.insert(last.clone(), Json::from(incremented(current, *delta)));
        }
        Op::Delete | Op::Changes(_) => unreachable!("not a local JSON mutation"),
    }
}

/// The object at `key` of `json`; whatever else is there (or nothing) is replaced by an empty
/// object. [`map_at`] on JSON.
fn json_map_at<'a>(json: &'a mut Map<String, Json>, key: &str) -> &'a mut Map<String, Json> {
    let slot = json.entry(key).or_insert_with(|| Json::Object(Map::new()));
    if !slot.is_object() {
        *slot = Json::Object(Map::new());
    }
    match slot {
        Json::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

/// RFC 7396 on JSON, as [`merge_map`] does it on automerge.
fn merge_json(json: &mut Map<String, Json>, patch: &Map<String, Json>) {
    for (key, value) in patch {
        match value {
            Json::Null => {
                json.remove(key);
            }
            Json::Object(inner) => merge_json(json_map_at(json, key), inner),
            leaf => {
                json.insert(key.clone(), leaf.clone());
            }
        }
    }
}

/// Applies raw changes to `doc` as one batch. Refuses (and leaves `doc` unchanged) changes whose
/// dependencies are neither in the document nor in the batch: automerge would queue them
/// silently, and a document must never hold invisible state.
pub fn apply_changes(doc: &mut Automerge, changes: &[Change]) -> Result<usize, Rejection> {
    let batch: std::collections::HashSet<_> = changes.iter().map(Change::hash).collect();
    let known = |hash| batch.contains(hash) || doc.get_change_by_hash(hash).is_some();
    if !changes.iter().all(|c| c.deps().iter().all(known)) {
        return Err(Rejection::MissingDependencies);
    }
    let new = changes
        .iter()
        .filter(|c| doc.get_change_by_hash(&c.hash()).is_none())
        .count();
    doc.apply_changes(changes.iter().cloned())
        .map_err(|e| Rejection::Automerge(e.to_string()))?;
    assert!(
        doc.get_missing_deps(&[]).is_empty(),
        "changes queued after the dependency check"
    );
    Ok(new)
}

/// A copy of `doc` with a one-change history: same values and types (counters stay counters,
/// text stays text), made deterministically by actor `(ts, REBASE_INDEX)` at `wall_clock_ms`.
pub fn rebase(doc: &Automerge, ts: Timestamp, wall_clock_ms: u64) -> Automerge {
    let mut fresh = empty_doc(ts, REBASE_INDEX);
    let mut tx = fresh.transaction();
    copy_object(doc, &ROOT, ObjType::Map, &mut tx, &ROOT).expect("copying into a fresh document");
    tx.commit_with(commit_options(wall_clock_ms));
    fresh
}

fn copy_object(
    src: &Automerge,
    src_obj: &ObjId,
    kind: ObjType,
    tx: &mut Transaction<'_>,
    dst: &ObjId,
) -> Result<(), AutomergeError> {
    match kind {
        ObjType::Map | ObjType::Table => {
            for key in src.keys(src_obj) {
                let Some((value, id)) = src.get(src_obj, key.as_str())? else {
                    continue;
                };
                match value {
                    Value::Object(kind) => {
                        let child = tx.put_object(dst, key.as_str(), kind)?;
                        copy_object(src, &id, kind, tx, &child)?;
                    }
                    Value::Scalar(scalar) => copy_scalar(tx, dst, Slot::Key(&key), &scalar)?,
                }
            }
        }
        ObjType::List => {
            for index in 0..src.length(src_obj) {
                let Some((value, id)) = src.get(src_obj, index)? else {
                    continue;
                };
                let at = tx.length(dst);
                match value {
                    Value::Object(kind) => {
                        let child = tx.insert_object(dst, at, kind)?;
                        copy_object(src, &id, kind, tx, &child)?;
                    }
                    Value::Scalar(scalar) => copy_scalar(tx, dst, Slot::Insert(at), &scalar)?,
                }
            }
        }
        ObjType::Text => {
            let text = src.text(src_obj)?;
            tx.splice_text(dst, 0, 0, &text)?;
        }
    }
    Ok(())
}

/// Writes a copy of `scalar` at `slot` of `dst`. A counter is copied as a new counter holding its
/// current value (a put of the `Counter` itself would keep its start).
fn copy_scalar(
    tx: &mut Transaction<'_>,
    dst: &ObjId,
    slot: Slot<'_>,
    scalar: &ScalarValue,
) -> Result<(), AutomergeError> {
    match scalar {
        ScalarValue::Counter(counter) => put_counter(tx, dst, slot, i64::from(counter)),
        other => put_scalar(tx, dst, slot, other.clone()),
    }
}

/// The compact JSON bytes of a document.
pub fn to_bytes(map: &Map<String, Json>) -> Vec<u8> {
    serde_json::to_vec(map).expect("a JSON map serializes")
}

/// Loads a document from its nearest snapshot and the deltas after it (oldest first).
pub fn load_chain<'a>(snapshot: &[u8], deltas: impl Iterator<Item = &'a [u8]>) -> Automerge {
    let mut doc = match Automerge::load(snapshot) {
        Ok(doc) => doc,
        Err(e) => panic!("corrupt automerge snapshot: {e}"),
    };
    for delta in deltas {
        if let Err(e) = doc.load_incremental(delta) {
            panic!("corrupt automerge delta: {e}");
        }
    }
    assert!(
        doc.get_missing_deps(&[]).is_empty(),
        "a delta chain with missing dependencies"
    );
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Applies `op` as apply does, and checks that [`apply_json`] on the JSON before gives the
    /// JSON after.
    fn apply(doc: &mut Automerge, ts: u64, op: &Op) -> Result<(), Rejection> {
        let mut model = materialize(doc);
        doc.set_actor(actor(Timestamp(ts), 0));
        let mut tx = doc.transaction();
        match apply_local(&mut tx, op) {
            Ok(()) => {
                tx.commit_with(commit_options(1000 + ts));
                apply_json(&mut model, op);
                assert_eq!(model, materialize(doc), "apply_json mirrors {op:?}");
                Ok(())
            }
            Err(e) => {
                tx.rollback();
                Err(e)
            }
        }
    }

    fn inc(path: &[&str], delta: i64) -> Op {
        Op::Increment {
            path: path.iter().map(|key| key.to_string()).collect(),
            delta,
        }
    }

    /// The scalar at `path` of `doc`, if there is one.
    fn scalar(doc: &Automerge, path: &[&str]) -> Option<ScalarValue> {
        let (last, parents) = path.split_last()?;
        let mut obj = ROOT;
        for key in parents {
            obj = match doc.get(&obj, *key).unwrap()? {
                (Value::Object(_), id) => id,
                (Value::Scalar(_), _) => return None,
            };
        }
        match doc.get(&obj, *last).unwrap()? {
            (Value::Scalar(scalar), _) => Some(scalar.into_owned()),
            (Value::Object(_), _) => None,
        }
    }

    fn counter(value: i64) -> Option<ScalarValue> {
        Some(ScalarValue::counter(value))
    }

    /// A document made by raw automerge writes, as a CRDT client's changes make it.
    fn raw_doc(write: impl FnOnce(&mut Transaction<'_>)) -> Automerge {
        let mut doc = empty_doc(Timestamp(1), 7);
        let mut tx = doc.transaction();
        write(&mut tx);
        tx.commit_with(commit_options(1));
        doc
    }

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn replace_patch_increment_round_trip() {
        let mut doc = empty_doc(Timestamp(1), 0);
        let v = json!({"a": 1, "b": {"c": [1, "x", null, 2.5, true]}, "u": u64::MAX, "s": "é"});
        apply(&mut doc, 1, &Op::Replace(obj(v.clone()))).unwrap();
        assert_eq!(Json::Object(materialize(&doc)), v);
        apply(
            &mut doc,
            2,
            &Op::MergePatch(obj(json!({"a": null, "b": {"d": {"e": null, "f": 1}}}))),
        )
        .unwrap();
        assert_eq!(
            Json::Object(materialize(&doc)),
            json!({"b": {"c": [1, "x", null, 2.5, true], "d": {"f": 1}}, "u": u64::MAX, "s": "é"})
        );
        let add = inc(&["n", "k"], 5);
        apply(&mut doc, 3, &add).unwrap();
        apply(&mut doc, 4, &add).unwrap();
        assert_eq!(materialize(&doc)["n"], json!({"k": 10}));
        assert_eq!(scalar(&doc, &["n", "k"]), counter(10));
        assert_eq!(apply(&mut doc, 5, &inc(&[], 1)), Err(Rejection::EmptyPath));
    }

    #[test]
    fn increment_of_an_integer_makes_a_counter_of_the_sum() {
        let mut doc = raw_doc(|tx| {
            tx.put(ROOT, "uint", ScalarValue::Uint(7)).unwrap();
            // A timestamp reads as an integer, so it is one for an increment (see the module doc).
            tx.put(ROOT, "ts", ScalarValue::Timestamp(1_000)).unwrap();
        });
        apply(&mut doc, 2, &Op::MergePatch(obj(json!({"int": -5})))).unwrap();
        assert_eq!(scalar(&doc, &["int"]), Some(ScalarValue::Int(-5)));
        for (ts, (key, sum)) in (3..).zip([("int", -2), ("uint", 10), ("ts", 1_003)]) {
            apply(&mut doc, ts, &inc(&[key], 3)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(sum), "{key}");
            apply(&mut doc, ts + 10, &inc(&[key], 2)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(sum + 2), "{key} again");
        }
        assert_eq!(
            Json::Object(materialize(&doc)),
            json!({"int": 0, "uint": 12, "ts": 1_005})
        );
    }

    #[test]
    fn increment_of_a_non_integer_replaces_it_by_a_counter_at_the_delta() {
        let mut doc = raw_doc(|tx| {
            // A merge patch deletes a null field, so the null is written raw too.
            tx.put(ROOT, "null", ScalarValue::Null).unwrap();
            tx.put(ROOT, "bytes", ScalarValue::Bytes(vec![1, 2]))
                .unwrap();
            let text = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
            tx.splice_text(&text, 0, 0, "12").unwrap();
        });
        let fields = obj(json!({
            "string": "12", "float": 1.5, "whole_float": 2.0, "bool": true,
            "object": {"a": 1}, "array": [1], "big": u64::MAX,
        }));
        apply(&mut doc, 2, &Op::MergePatch(fields.clone())).unwrap();
        let keys: Vec<String> = fields.keys().cloned().collect();
        let keys = keys
            .iter()
            .map(String::as_str)
            .chain(["null", "bytes", "text"]);
        for (ts, key) in (3..).zip(keys) {
            apply(&mut doc, ts, &inc(&[key], 4)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(4), "{key}");
        }
    }

    #[test]
    fn increment_through_a_non_map_replaces_the_parent_by_a_map() {
        let mut doc = raw_doc(|tx| {
            tx.put_object(ROOT, "table", ObjType::Table).unwrap();
        });
        let fields = json!({"s": "x", "l": [1, 2], "n": 5, "m": {"keep": 1, "deep": "x"}});
        apply(&mut doc, 2, &Op::MergePatch(obj(fields))).unwrap();
        for (ts, path) in (3..).zip([
            &["s", "c"][..],
            &["l", "c"],
            &["n", "a", "c"],
            &["m", "deep", "c"],
            &["table", "c"],
        ]) {
            apply(&mut doc, ts, &inc(path, 2)).unwrap();
            assert_eq!(scalar(&doc, path), counter(2), "{path:?}");
        }
        assert_eq!(
            Json::Object(materialize(&doc)),
            json!({
                "s": {"c": 2}, "l": {"c": 2}, "n": {"a": {"c": 2}},
                "m": {"keep": 1, "deep": {"c": 2}}, "table": {"c": 2},
            })
        );
    }

    #[test]
    fn counters_saturate_at_the_i64_bounds() {
        let mut doc = empty_doc(Timestamp(1), 0);
        apply(&mut doc, 1, &Op::Replace(obj(json!({"int": i64::MAX - 1})))).unwrap();
        apply(&mut doc, 2, &inc(&["max"], i64::MAX - 1)).unwrap();
        apply(&mut doc, 3, &inc(&["min"], i64::MIN)).unwrap();
        for (ts, (key, delta, bound)) in (4..).zip([
            ("max", 5, i64::MAX),
            ("int", i64::MAX, i64::MAX),
            ("min", -1, i64::MIN),
        ]) {
            apply(&mut doc, ts, &inc(&[key], delta)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(bound), "{key} saturates");
            apply(&mut doc, ts + 10, &inc(&[key], delta)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(bound), "{key} stays");
            apply(&mut doc, ts + 20, &inc(&[key], -delta.signum())).unwrap();
            assert_eq!(
                scalar(&doc, &[key]),
                counter(bound - bound.signum()),
                "{key} still a counter"
            );
        }
    }

    #[test]
    fn counters_cross_the_whole_range() {
        // Automerge adds up a counter's increments in i64: from a start of -5, +i64::MAX then +10
        // would overflow that sum although the value stays in range.
        let mut doc = empty_doc(Timestamp(1), 0);
        for (ts, delta) in (1..).zip([-5, i64::MAX, 10, i64::MIN, i64::MIN, 1]) {
            apply(&mut doc, ts, &inc(&["n"], delta)).unwrap();
        }
        assert_eq!(scalar(&doc, &["n"]), counter(i64::MIN + 1));
        let fresh = rebase(&doc, Timestamp(10), 99);
        assert_eq!(scalar(&fresh, &["n"]), counter(i64::MIN + 1));
        let mut doc = fresh;
        apply(&mut doc, 11, &Op::Replace(obj(json!({"n": i64::MAX})))).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(i64::MAX));
    }

    #[test]
    fn put_of_a_read_document_keeps_its_counters() {
        let mut doc = empty_doc(Timestamp(1), 0);
        apply(&mut doc, 1, &Op::Replace(obj(json!({"a": "x"})))).unwrap();
        apply(&mut doc, 2, &inc(&["n"], 3)).unwrap();
        apply(&mut doc, 3, &inc(&["m", "k"], 4)).unwrap();
        let mut read = materialize(&doc);
        read.insert("a".into(), json!("y"));
        apply(&mut doc, 4, &Op::Replace(read)).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(3));
        assert_eq!(scalar(&doc, &["m", "k"]), counter(4));
        apply(&mut doc, 5, &inc(&["n"], 2)).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(5), "a later increment adds");
        let put = obj(json!({"a": "y", "n": i64::MIN, "m": {"k": i64::MAX}}));
        apply(&mut doc, 6, &Op::Replace(put)).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(i64::MIN), "a new value");
        assert_eq!(scalar(&doc, &["m", "k"]), counter(i64::MAX), "a new value");
        apply(&mut doc, 7, &Op::MergePatch(obj(json!({"n": i64::MAX})))).unwrap();
        assert_eq!(
            scalar(&doc, &["n"]),
            counter(i64::MAX),
            "farther than one i64 step"
        );
    }

    #[test]
    fn merge_patch_of_an_integer_moves_the_counter() {
        let mut doc = empty_doc(Timestamp(1), 0);
        apply(&mut doc, 1, &inc(&["n"], 3)).unwrap();
        apply(&mut doc, 2, &Op::MergePatch(obj(json!({"n": 7})))).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(7));
        apply(&mut doc, 3, &inc(&["n"], 1)).unwrap();
        assert_eq!(scalar(&doc, &["n"]), counter(8));
    }

    #[test]
    fn writing_a_non_integer_into_a_counter_replaces_it() {
        let mut doc = empty_doc(Timestamp(1), 0);
        for (ts, key) in (1..).zip(["s", "f", "big"]) {
            apply(&mut doc, ts, &inc(&[key], 3)).unwrap();
        }
        let patch = obj(json!({"s": "x", "f": 2.5, "big": u64::MAX}));
        apply(&mut doc, 4, &Op::MergePatch(patch)).unwrap();
        assert_eq!(scalar(&doc, &["s"]), Some(ScalarValue::Str("x".into())));
        assert_eq!(scalar(&doc, &["f"]), Some(ScalarValue::F64(2.5)));
        // Above i64::MAX: no counter holds it, so it replaces the counter, as the JSON says.
        assert_eq!(scalar(&doc, &["big"]), Some(ScalarValue::Uint(u64::MAX)));
        for (ts, key) in (5..).zip(["s", "f", "big"]) {
            apply(&mut doc, ts, &inc(&[key], 2)).unwrap();
            assert_eq!(scalar(&doc, &[key]), counter(2), "{key}: a new counter");
        }
    }

    #[test]
    fn writing_a_counters_value_adds_no_operation() {
        let mut doc = empty_doc(Timestamp(1), 0);
        apply(&mut doc, 1, &inc(&["n"], 3)).unwrap();
        apply(&mut doc, 2, &inc(&["m", "k"], 2)).unwrap();
        let heads = doc.get_heads();
        let same = obj(json!({"n": 3, "m": {"k": 2}}));
        apply(&mut doc, 3, &Op::Replace(same.clone())).unwrap();
        apply(&mut doc, 4, &Op::MergePatch(same)).unwrap();
        assert_eq!(doc.get_heads(), heads);
        assert_eq!(scalar(&doc, &["n"]), counter(3));
    }

    #[test]
    fn equal_writes_add_no_operations() {
        let mut doc = empty_doc(Timestamp(1), 0);
        let v = obj(json!({"a": 1, "l": [1, 2], "m": {"x": "y"}}));
        apply(&mut doc, 1, &Op::Replace(v.clone())).unwrap();
        let heads = doc.get_heads();
        apply(&mut doc, 2, &Op::Replace(v)).unwrap();
        assert_eq!(
            doc.get_heads(),
            heads,
            "an empty transaction makes no change"
        );
    }

    #[test]
    fn rebase_keeps_values_and_types() {
        let mut doc = empty_doc(Timestamp(1), 0);
        apply(
            &mut doc,
            1,
            &Op::Replace(obj(json!({"a": [1, {"b": 2}], "t": "x"}))),
        )
        .unwrap();
        let add = inc(&["c"], 3);
        for ts in 2..20 {
            apply(&mut doc, ts, &add).unwrap();
        }
        let fresh = rebase(&doc, Timestamp(20), 99);
        assert_eq!(materialize(&fresh), materialize(&doc));
        assert_eq!(fresh.get_changes(&[]).len(), 1);
        assert_eq!(scalar(&fresh, &["c"]), counter(54), "still a counter");
        let mut fresh = fresh;
        apply(&mut fresh, 21, &add).unwrap();
        assert_eq!(scalar(&fresh, &["c"]), counter(57), "and it increments");
        assert_eq!(
            rebase(&doc, Timestamp(20), 99).save(),
            rebase(&doc, Timestamp(20), 99).save()
        );
    }

    #[test]
    fn raw_changes_need_their_dependencies() {
        let mut client = empty_doc(Timestamp(1), 7);
        let mut tx = client.transaction();
        tx.put(ROOT, "k", "v").unwrap();
        tx.commit_with(commit_options(1));
        let first = client.get_changes(&[]);
        let mut tx = client.transaction();
        tx.put(ROOT, "k2", 2).unwrap();
        tx.commit_with(commit_options(2));
        let second = client.get_changes(
            &client.get_changes(&[])[..1]
                .iter()
                .map(Change::hash)
                .collect::<Vec<_>>(),
        );
        let mut doc = empty_doc(Timestamp(2), 0);
        assert_eq!(
            apply_changes(&mut doc, &second),
            Err(Rejection::MissingDependencies)
        );
        assert_eq!(apply_changes(&mut doc, &first), Ok(1));
        assert_eq!(apply_changes(&mut doc, &second), Ok(1));
        assert_eq!(Json::Object(materialize(&doc)), json!({"k": "v", "k2": 2}));
    }
}
