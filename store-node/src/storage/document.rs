//! Documents as automerge objects: JSON in, JSON out, and the deterministic application of one
//! mutation.
//!
//! JSON maps to automerge as: object → map, array → list, string → string scalar, integer →
//! `Int` (or `Uint` above `i64::MAX`), other numbers → `F64`, booleans and null → their scalars.
//! Back to JSON: counters and timestamps → integers, text objects → strings, bytes → arrays of
//! integers, NaN and unknown scalars → null. Writes only touch the fields that change (a field
//! whose value is already equal is left alone), which keeps the history small.

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

/// The automerge actor of mutation `index` of the transaction at `ts`: the same on every replica
/// and unique per mutation, so two replicas make byte-identical changes.
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
        leaf => {
            let scalar = json_to_scalar(leaf).expect("a leaf");
            return match slot {
                Slot::Key(key) => tx.put(obj, key, scalar),
                Slot::Insert(index) => tx.insert(obj, index, scalar),
            };
        }
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

/// Sets `key` of map `obj` to `value`, leaving it alone when it is already equal and syncing
/// nested objects field by field.
fn sync_field(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    value: &Json,
) -> Result<(), AutomergeError> {
    let existing = tx.get(obj, key)?.map(|(v, id)| (v.to_owned(), id));
    match (existing, value) {
        (Some((Value::Object(ObjType::Map), child)), Json::Object(map)) => {
            sync_map(tx, &child, map)
        }
        (Some((Value::Scalar(scalar), _)), leaf)
            if json_to_scalar(leaf).as_ref() == Some(&*scalar) =>
        {
            Ok(())
        }
        (Some((Value::Object(kind), child)), Json::Array(_) | Json::String(_))
            if kind != ObjType::Map && object_to_json(tx, &child, kind) == *value =>
        {
            Ok(())
        }
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
                let existing = tx.get(obj, key.as_str())?.map(|(v, id)| (v.to_owned(), id));
                let child = match existing {
                    Some((Value::Object(ObjType::Map), child)) => child,
                    _ => tx.put_object(obj, key.as_str(), ObjType::Map)?,
                };
                merge_map(tx, &child, inner)?;
            }
            leaf => sync_field(tx, obj, key, leaf)?,
        }
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

/// Performs one JSON mutation (not `Delete` or `Changes`) inside `tx`. On `Err` the caller
/// rolls the transaction back.
pub fn apply_local(tx: &mut Transaction<'_>, op: &Op) -> Result<(), Rejection> {
    let automerge = |e: AutomergeError| Rejection::Automerge(e.to_string());
    match op {
        Op::Replace(map) => sync_map(tx, &ROOT, map).map_err(automerge),
        Op::MergePatch(patch) => merge_map(tx, &ROOT, patch).map_err(automerge),
        Op::Increment { path, delta } => {
            let (last, parents) = path.split_last().ok_or(Rejection::EmptyPath)?;
            let mut obj = ROOT;
            for key in parents {
                let existing = tx
                    .get(&obj, key.as_str())
                    .map_err(automerge)?
                    .map(|(v, id)| (v.to_owned(), id));
                obj = match existing {
                    Some((Value::Object(ObjType::Map), child)) => child,
                    Some(_) => return Err(Rejection::PathNotAnObject),
                    None => tx
                        .put_object(&obj, key.as_str(), ObjType::Map)
                        .map_err(automerge)?,
                };
            }
            let existing = tx.get(&obj, last.as_str()).map_err(automerge)?;
            match existing.map(|(v, _)| v.to_owned()) {
                None => tx
                    .put(&obj, last.as_str(), ScalarValue::counter(*delta))
                    .map_err(automerge),
                Some(Value::Scalar(scalar)) => match &*scalar {
                    ScalarValue::Counter(counter) => {
                        i64::from(counter)
                            .checked_add(*delta)
                            .ok_or(Rejection::CounterOverflow)?;
                        tx.increment(&obj, last.as_str(), *delta).map_err(automerge)
                    }
                    _ => Err(Rejection::NotACounter),
                },
                Some(Value::Object(_)) => Err(Rejection::NotACounter),
            }
        }
        Op::Delete | Op::Changes(_) => unreachable!("applied by the caller"),
    }
}

/// What [`materialize`] gives after `op`, a local JSON mutation that [`apply_local`] accepted,
/// computed from the JSON before it instead of read back from automerge (a read of every field
/// of the document). Values map to automerge and back unchanged, so the two agree; apply
/// checks that they do in debug builds.
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
                let child = obj
                    .entry(key.clone())
                    .or_insert_with(|| Json::Object(Map::new()));
                obj = match child {
                    Json::Object(map) => map,
                    _ => unreachable!("apply_local refuses a path through a non-object"),
                };
            }
            let current = obj.get(last).and_then(Json::as_i64).unwrap_or(0);
            obj.insert(last.clone(), Json::from(current + delta));
        }
        Op::Delete | Op::Changes(_) => unreachable!("not a local JSON mutation"),
    }
}

/// RFC 7396 on JSON, as [`merge_map`] does it on automerge.
fn merge_json(json: &mut Map<String, Json>, patch: &Map<String, Json>) {
    for (key, value) in patch {
        match value {
            Json::Null => {
                json.remove(key);
            }
            Json::Object(inner) => {
                let slot = json
                    .entry(key.clone())
                    .or_insert_with(|| Json::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Json::Object(Map::new());
                }
                if let Json::Object(map) = slot {
                    merge_json(map, inner);
                }
            }
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
                    Value::Scalar(scalar) => tx.put(dst, key.as_str(), copy_scalar(&scalar))?,
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
                    Value::Scalar(scalar) => tx.insert(dst, at, copy_scalar(&scalar))?,
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

fn copy_scalar(scalar: &ScalarValue) -> ScalarValue {
    match scalar {
        // A counter is copied at its current value (a put of the `Counter` keeps its start).
        ScalarValue::Counter(c) => ScalarValue::counter(i64::from(c)),
        other => other.clone(),
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

    fn apply(doc: &mut Automerge, ts: u64, op: &Op) -> Result<(), Rejection> {
        doc.set_actor(actor(Timestamp(ts), 0));
        let mut tx = doc.transaction();
        match apply_local(&mut tx, op) {
            Ok(()) => {
                tx.commit_with(commit_options(1000 + ts));
                Ok(())
            }
            Err(e) => {
                tx.rollback();
                Err(e)
            }
        }
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
        let inc = Op::Increment {
            path: vec!["n".into(), "k".into()],
            delta: 5,
        };
        apply(&mut doc, 3, &inc).unwrap();
        apply(&mut doc, 4, &inc).unwrap();
        assert_eq!(materialize(&doc)["n"], json!({"k": 10}));
        let bad = Op::Increment {
            path: vec!["u".into()],
            delta: 1,
        };
        assert_eq!(apply(&mut doc, 5, &bad), Err(Rejection::NotACounter));
        let through = Op::Increment {
            path: vec!["s".into(), "x".into()],
            delta: 1,
        };
        assert_eq!(
            apply(&mut doc, 5, &through),
            Err(Rejection::PathNotAnObject)
        );
        let overflow = Op::Increment {
            path: vec!["n".into(), "k".into()],
            delta: i64::MAX,
        };
        assert_eq!(
            apply(&mut doc, 5, &overflow),
            Err(Rejection::CounterOverflow)
        );
        assert_eq!(materialize(&doc)["n"], json!({"k": 10}), "rolled back");
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
        let inc = Op::Increment {
            path: vec!["c".into()],
            delta: 3,
        };
        for ts in 2..20 {
            apply(&mut doc, ts, &inc).unwrap();
        }
        let fresh = rebase(&doc, Timestamp(20), 99);
        assert_eq!(materialize(&fresh), materialize(&doc));
        assert_eq!(fresh.get_changes(&[]).len(), 1);
        let mut fresh = fresh;
        apply(&mut fresh, 21, &inc).unwrap();
        assert_eq!(materialize(&fresh)["c"], json!(57), "still a counter");
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
