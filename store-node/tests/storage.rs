//! Storage engine tests: determinism, GC, ownership drops, backfill, bad mutations, raw
//! automerge changes, limits and bounded history.

mod common;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ReadDoc, ROOT};
use causeway_core::{Interval, KeyHash, Timestamp};
use causeway_store_node::storage::{Error, Ownership, Rejection};
use causeway_store_node::{Store, StoreOptions};
use common::*;
use serde_json::json;

/// Runs GC steps until a pass completes (bounded).
fn gc_all(store: &Store, gc_ts: Timestamp) {
    for _ in 0..10_000 {
        if store.gc(gc_ts, 50).unwrap().pass_complete {
            return;
        }
    }
    panic!("gc did not finish a pass");
}

/// Replays `interval`'s pending mutations, `step` at a time, until none are left; answers how
/// many there were.
fn replay_all(store: &Store, interval: &Interval, upto: Timestamp, step: usize) -> usize {
    let mut replayed = 0;
    for _ in 0..10_000 {
        let n = store.replay_pending(interval, upto, step).unwrap();
        if n == 0 {
            return replayed;
        }
        replayed += n;
    }
    panic!("pending mutations never ran out");
}

fn open(dir: &tempfile::TempDir, options: StoreOptions) -> Store {
    Store::open(dir.path(), options).unwrap()
}

#[test]
fn two_replicas_hold_byte_identical_versions_and_equal_digests() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // Documents applied on four threads here, on one in `b`, with another cache size and
    // group size: the bytes must not depend on any of them.
    let a = open(
        &da,
        StoreOptions {
            apply_threads: 4,
            ..small_options()
        },
    );
    let b = open(
        &db,
        StoreOptions {
            cache_documents: 0,
            apply_threads: 1,
            ..small_options()
        },
    );
    apply_stream(&a, 7, 1, 300, 10, 20);
    apply_stream(&b, 7, 1, 300, 1, 20);
    // A third replica re-opened (cold cache) half way.
    let mut c = open(&dc, small_options());
    apply_stream(&c, 7, 1, 150, 7, 20);
    drop(c);
    c = open(&dc, small_options());
    apply_stream(&c, 7, 151, 300, 7, 20);
    let raw_a = a.raw_versions(&Interval::FULL).unwrap();
    assert!(raw_a.len() > 200, "the stream wrote versions");
    assert_eq!(raw_a, b.raw_versions(&Interval::FULL).unwrap());
    assert_eq!(raw_a, c.raw_versions(&Interval::FULL).unwrap());
    for ts in [1, 50, 299, 300] {
        let d = a.digest(&Interval::FULL, Timestamp(ts)).unwrap();
        assert_eq!(d, b.digest(&Interval::FULL, Timestamp(ts)).unwrap());
        assert_eq!(d, c.digest(&Interval::FULL, Timestamp(ts)).unwrap());
    }
    assert_ne!(
        a.digest(&Interval::FULL, Timestamp(299)).unwrap(),
        a.digest(&Interval::FULL, Timestamp(300)).unwrap()
    );
    // Automerge bytes too.
    for id in 0..20 {
        let id = format!("d{id}");
        assert_eq!(
            a.get_automerge("items", &id, Timestamp(300)).unwrap(),
            c.get_automerge("items", &id, Timestamp(300)).unwrap()
        );
    }
}

/// GC keeps the delta chain the kept version rests on (down to its snapshot, every
/// `snapshot_every_versions` = 3 versions here) and drops every version older than that, without
/// rewriting any: the bytes of what stays are the bytes apply wrote.
#[test]
fn gc_drops_what_is_below_the_kept_versions_snapshot_and_rewrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    // One document, ten versions: snapshots at ts 1, 4, 7, 10, deltas between.
    for ts in 1..=10u64 {
        let records = [(
            Timestamp(ts),
            tx(vec![replace("items", "d", &json!({"v": ts}))], ts),
        )];
        store.apply(&records, &full()).unwrap();
    }
    let before = store.raw_versions(&Interval::FULL).unwrap();
    assert_eq!(before.len(), 10);
    // The newest version at or below ts 6 is the delta at 6, resting on 5 and the snapshot at 4.
    gc_all(&store, Timestamp(6));
    let after = store.raw_versions(&Interval::FULL).unwrap();
    assert_eq!(after.len(), 7, "the versions of ts 4..=10 stay");
    assert_eq!(
        after[..],
        before[..7],
        "what stays is byte for byte what apply wrote (versions are newest first)"
    );
    for ts in 6..=10u64 {
        let doc = store.get("items", "d", Timestamp(ts)).unwrap();
        assert_eq!(
            doc.map(|d| serde_json::Value::Object(d.json)),
            Some(json!({ "v": ts }))
        );
    }
    // At ts 7 the kept version is a snapshot: everything older goes.
    gc_all(&store, Timestamp(7));
    assert_eq!(store.raw_versions(&Interval::FULL).unwrap().len(), 4);
    assert!(
        store
            .get_automerge("items", "d", Timestamp(10))
            .unwrap()
            .is_some(),
        "the newest version still loads"
    );
}

#[test]
fn gc_keeps_every_version_visible_at_or_above_the_gc_ts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    apply_stream(&store, 3, 1, 200, 5, 10);
    let ids: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    let pairs: Vec<(&str, &str)> = ids.iter().map(|i| ("items", i.as_str())).collect();
    let before: Vec<_> = (120..=200)
        .map(|ts| store.multi_get(&pairs, Timestamp(ts)).unwrap())
        .collect();
    let automerge_before: Vec<_> = ids
        .iter()
        .map(|id| store.get_automerge("items", id, Timestamp(120)).unwrap())
        .collect();
    let digest = store.digest(&Interval::FULL, Timestamp(150)).unwrap();
    let total = store.raw_versions(&Interval::FULL).unwrap().len();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 1000);
        let progress = store.gc(Timestamp(120), 7).unwrap();
        assert!(progress.examined <= 7 + 200, "a step is bounded");
        if progress.pass_complete {
            break;
        }
    }
    assert!(steps > 2, "gc ran in several steps");
    let after = store.raw_versions(&Interval::FULL).unwrap().len();
    assert!(after < total, "gc pruned ({after} of {total} left)");
    for (i, ts) in (120..=200).enumerate() {
        assert_eq!(
            store.multi_get(&pairs, Timestamp(ts)).unwrap(),
            before[i],
            "ts {ts}"
        );
    }
    for (id, bytes) in ids.iter().zip(automerge_before) {
        let now = store.get_automerge("items", id, Timestamp(120)).unwrap();
        let json = |b: Option<Vec<u8>>| b.map(|b| Automerge::load(&b).unwrap().get_heads());
        assert_eq!(json(now), json(bytes), "same automerge state for {id}");
    }
    assert_eq!(
        store.digest(&Interval::FULL, Timestamp(150)).unwrap(),
        digest
    );
    assert!(matches!(
        store.get("items", "d1", Timestamp(119)),
        Err(Error::SnapshotTooOld {
            requested: Timestamp(119),
            gc: Timestamp(120)
        })
    ));
    // Every document keeps at most the chain of its newest version at or below the gc ts: that
    // version and the deltas and snapshot under it (`snapshot_every_versions` = 3).
    let raw = store.raw_versions(&Interval::FULL).unwrap();
    let mut old_per_doc = std::collections::HashMap::new();
    for r in &raw {
        let k = causeway_store_node::storage::parse_version_key(&r.key).unwrap();
        if k.ts <= Timestamp(120) {
            *old_per_doc.entry(k.prefix.to_vec()).or_insert(0) += 1;
        }
    }
    assert!(
        old_per_doc.values().all(|&n| (1..=3).contains(&n)),
        "{old_per_doc:?}"
    );
    // The watermark survives a restart; apply keeps going after gc.
    drop(store);
    let store = open(&dir, small_options());
    assert_eq!(store.gc_watermark(), Timestamp(120));
    apply_stream(&store, 3, 201, 220, 5, 10);
    assert_eq!(store.applied(), Timestamp(220));
}

#[test]
fn deleted_documents_disappear_from_the_index_after_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let recs = vec![
        (
            Timestamp(1),
            tx(
                vec![
                    replace("c", "x", &json!({"v": 1})),
                    replace("c", "y", &json!({"v": 2})),
                ],
                1,
            ),
        ),
        (Timestamp(2), tx(vec![delete("c", "x")], 2)),
        (Timestamp(3), tx(vec![delete("c", "nothing")], 3)),
    ];
    let outcome = store.apply(&recs, &full()).unwrap();
    assert_eq!(
        outcome.versions_written, 3,
        "no tombstone for an absent document"
    );
    let scan = |ts| {
        store
            .scan("c", Timestamp(ts), &|_| true, 10, None, 10)
            .unwrap()
    };
    assert_eq!(scan(3).scanned, 2);
    assert_eq!(scan(3).documents.len(), 1);
    assert_eq!(scan(1).documents.len(), 2);
    gc_all(&store, Timestamp(3));
    assert_eq!(
        scan(3).scanned,
        1,
        "tombstoned document gone from the index"
    );
    assert_eq!(store.raw_versions(&Interval::FULL).unwrap().len(), 1);
    assert_eq!(store.get("c", "x", Timestamp(3)).unwrap(), None);
}

#[test]
fn dropping_ownership_removes_exactly_the_dropped_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    apply_stream(&store, 11, 1, 120, 10, 40);
    let mut multi = Vec::new();
    for i in 0..30 {
        multi.push(replace("other", &format!("o{i}"), &json!({"i": i})));
    }
    store
        .apply(&[(Timestamp(121), tx(multi, 5))], &full())
        .unwrap();
    let dropped = [
        Interval::new(1 << 62, 1 << 63),
        Interval::new(3 << 62, 1 << 64),
    ];
    let kept = [Interval::new(0, 1 << 62), Interval::new(1 << 63, 3 << 62)];
    let kept_before: Vec<_> = kept
        .iter()
        .map(|i| store.raw_versions(i).unwrap())
        .collect();
    let kept_digests: Vec<_> = kept
        .iter()
        .map(|i| store.digest(i, Timestamp(121)).unwrap())
        .collect();
    assert!(dropped
        .iter()
        .all(|i| !store.raw_versions(i).unwrap().is_empty()));
    store.drop_intervals(&dropped).unwrap();
    for i in &dropped {
        assert!(store.raw_versions(i).unwrap().is_empty());
    }
    for (n, i) in kept.iter().enumerate() {
        assert_eq!(store.raw_versions(i).unwrap(), kept_before[n]);
        assert_eq!(store.digest(i, Timestamp(121)).unwrap(), kept_digests[n]);
    }
    // The collection index lost exactly the dropped documents.
    for collection in ["items", "other"] {
        let page = store
            .scan(collection, Timestamp(121), &|_| true, 1000, None, 1000)
            .unwrap();
        assert!(page.next.is_none());
        for doc in &page.documents {
            let h = KeyHash::of(collection, &doc.id);
            assert!(kept.iter().any(|i| i.contains(h)));
        }
        // Every document with a version in a kept interval (live or deleted) is indexed.
        let mut expected = std::collections::BTreeSet::new();
        for i in &kept {
            for r in store.raw_versions(i).unwrap() {
                let k = causeway_store_node::storage::parse_version_key(&r.key).unwrap();
                if k.collection == collection {
                    expected.insert(k.id.to_string());
                }
            }
        }
        let expected = expected.len();
        assert!(expected > 0);
        assert_eq!(page.scanned, expected, "index of {collection}");
    }
    // Writes to a dropped interval after re-owning start from nothing (the cache was evicted).
    let id = (0..100)
        .map(|i| format!("o{i}"))
        .find(|id| dropped[0].contains(KeyHash::of("other", id)))
        .unwrap();
    store
        .apply(
            &[(
                Timestamp(122),
                tx(vec![patch("other", &id, &json!({"new": true}))], 6),
            )],
            &full(),
        )
        .unwrap();
    assert_eq!(
        store
            .get("other", &id, Timestamp(122))
            .unwrap()
            .unwrap()
            .json,
        json!({"new": true}).as_object().unwrap().clone()
    );
}

#[test]
fn only_owned_mutations_are_stored_but_every_record_advances() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let lower = Interval::new(0, 1 << 63);
    let ids: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let records: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                Timestamp(i as u64 + 1),
                tx(vec![replace("c", id, &json!({"i": i}))], 1),
            )
        })
        .collect();
    let outcome = store
        .apply(&records, &Ownership::owned(vec![lower]))
        .unwrap();
    assert_eq!(outcome.applied, Timestamp(20));
    assert_eq!(store.committed(), Timestamp(20));
    let owned = ids
        .iter()
        .filter(|id| lower.contains(KeyHash::of("c", id)))
        .count();
    assert!(owned > 0 && owned < 20);
    assert_eq!(outcome.versions_written, owned);
    for id in &ids {
        let got = store.get("c", id, Timestamp(20)).unwrap();
        assert_eq!(got.is_some(), lower.contains(KeyHash::of("c", id)), "{id}");
    }
    // Repeated records are ignored: nothing applied twice.
    let again = store.apply(&records, &full()).unwrap();
    assert_eq!(again.repeated, 20);
    assert_eq!(again.versions_written, 0);
}

#[test]
fn records_invalid_on_their_own_are_skipped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let good = || replace("c", "good", &json!({"v": 1}));
    let records = vec![
        (
            Timestamp(1),
            tx(vec![good(), raw_patch("c", "x", b"{not json")], 1),
        ),
        (
            Timestamp(2),
            tx(vec![good(), raw_patch("c", "x", b"[1,2]")], 2),
        ),
        (Timestamp(3), tx(vec![increment("c", "x", &[], 1)], 3)),
        (
            Timestamp(4),
            tx(vec![changes("c", "x", vec![b"garbage".to_vec()])], 4),
        ),
        (
            Timestamp(5),
            tx_limited(
                vec![good(), replace("c", "x", &json!({"big": "y".repeat(300)}))],
                5,
                200,
                0,
            ),
        ),
        // A record of format 1 reads as format 2.
        (
            Timestamp(6),
            Transaction {
                format_version: 1,
                ..tx(vec![replace("c", "x", &json!({"n": 5}))], 6)
            },
        ),
    ];
    use causeway_proto::v1::Transaction;
    let outcome = store.apply(&records, &full()).unwrap();
    assert_eq!(outcome.applied, Timestamp(6));
    let reasons: Vec<_> = outcome
        .skipped
        .iter()
        .map(|s| (s.ts.0, s.mutation, s.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, None, Rejection::InvalidJson),
            (2, None, Rejection::NotAnObject),
            (3, None, Rejection::EmptyPath),
            (4, None, Rejection::UndecodableChange),
            (
                5,
                None,
                Rejection::DocumentTooLarge {
                    bytes: 310,
                    max: 200
                }
            ),
        ]
    );
    assert_eq!(
        store.get("c", "good", Timestamp(6)).unwrap(),
        None,
        "whole transactions skipped"
    );
    let x = store.get("c", "x", Timestamp(6)).unwrap().unwrap();
    assert_eq!(serde_json::Value::Object(x.json), json!({"n": 5}));
    // An unknown format stops the group before anything is written.
    let future = Transaction {
        format_version: 99,
        ..tx(vec![good()], 7)
    };
    assert!(matches!(
        store.apply(&[(Timestamp(7), future)], &full()),
        Err(Error::UnsupportedFormat(99))
    ));
    assert_eq!(store.applied(), Timestamp(6));
    assert!(causeway_store_node::storage::validate(&records[0].1).is_err());
    assert_eq!(
        causeway_store_node::storage::validate(&records[4].1),
        Err(Rejection::DocumentTooLarge {
            bytes: 310,
            max: 200
        })
    );
    assert!(causeway_store_node::storage::validate(&records[5].1).is_ok());
}

/// The outcome this store recorded for `ts`.
fn outcome(store: &Store, ts: u64) -> causeway_proto::v1::TxOutcome {
    match store.outcome(Timestamp(ts)).unwrap() {
        Some(causeway_proto::v1::outcome_response::Known::Decided(o)) => o,
        other => panic!("no outcome at {ts}: {other:?}"),
    }
}

#[test]
fn a_transaction_that_would_pass_the_size_limit_aborts_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let base = json!({"n": 1, "pad": "p".repeat(40)});
    store
        .apply(
            &[(Timestamp(1), tx(vec![replace("c", "x", &base)], 1))],
            &full(),
        )
        .unwrap();
    // The patch is under the limit, the document it makes is not; the increment of another
    // document in the same transaction goes with it.
    let big = tx_limited(
        vec![
            increment("c", "other", &["n"], 1),
            patch("c", "x", &json!({"big": "y".repeat(150)})),
        ],
        2,
        200,
        0,
    );
    let applied = store.apply(&[(Timestamp(2), big)], &full()).unwrap();
    assert_eq!(
        applied.aborted, 0,
        "a multi-document transaction decides by ballot"
    );
    let o = outcome(&store, 2);
    assert!(!o.committed);
    assert_eq!(o.failures.len(), 1);
    let f = &o.failures[0];
    assert_eq!((f.id.as_str(), f.max_bytes), ("x", 200));
    assert!(f.bytes > 200, "{f:?}");
    assert_eq!(store.get("c", "other", Timestamp(2)).unwrap(), None);
    let x = store.get("c", "x", Timestamp(2)).unwrap().unwrap();
    assert_eq!(
        (x.version, serde_json::Value::Object(x.json)),
        (Timestamp(1), base)
    );
    // Alone on its document, decided in its share: the same.
    let alone = tx_limited(
        vec![patch("c", "x", &json!({"big": "y".repeat(150)}))],
        3,
        200,
        0,
    );
    let applied = store.apply(&[(Timestamp(3), alone)], &full()).unwrap();
    assert_eq!(applied.aborted, 1);
    assert!(!outcome(&store, 3).committed);
    assert_eq!(
        store.get("c", "x", Timestamp(3)).unwrap().unwrap().version,
        Timestamp(1)
    );
    // Under the limit, both commit.
    let small = tx(
        vec![
            patch("c", "x", &json!({"t": 1})),
            increment("c", "other", &["n"], 1),
        ],
        4,
    );
    store.apply(&[(Timestamp(4), small)], &full()).unwrap();
    assert!(outcome(&store, 4).committed);
    assert_eq!(
        store.get("c", "other", Timestamp(4)).unwrap().unwrap().json["n"],
        json!(1)
    );
}

#[test]
fn counters_are_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let records = vec![
        (
            Timestamp(1),
            tx(vec![replace("c", "x", &json!({"n": 5, "s": "a"}))], 1),
        ),
        // A plain integer becomes a counter; the patch in the same transaction applies too.
        (
            Timestamp(2),
            tx(
                vec![
                    increment("c", "x", &["n"], 1),
                    patch("c", "x", &json!({"t": 1})),
                ],
                2,
            ),
        ),
        // A path through a string replaces it with an object.
        (
            Timestamp(3),
            tx(vec![increment("c", "x", &["s", "deep"], 1)], 3),
        ),
        // Counters saturate.
        (
            Timestamp(4),
            tx(
                vec![
                    increment("c", "x", &["ctr"], i64::MAX),
                    increment("c", "x", &["ctr"], 1),
                ],
                4,
            ),
        ),
        (Timestamp(5), tx(vec![increment("c", "x", &["n"], 10)], 5)),
    ];
    let outcome_ = store.apply(&records, &full()).unwrap();
    assert!(outcome_.skipped.is_empty());
    assert_eq!(outcome_.aborted, 0);
    let x = store.get("c", "x", Timestamp(5)).unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(x.json),
        json!({"n": 16, "s": {"deep": 1}, "t": 1, "ctr": i64::MAX})
    );
    // A read-modify-write PUT of what a read answered keeps the counters counting.
    let read = store.get("c", "x", Timestamp(5)).unwrap().unwrap().json;
    store
        .apply(
            &[
                (
                    Timestamp(6),
                    tx(vec![replace("c", "x", &serde_json::Value::Object(read))], 6),
                ),
                (Timestamp(7), tx(vec![increment("c", "x", &["n"], 1)], 7)),
                (Timestamp(8), tx(vec![increment("c", "x", &["ctr"], -1)], 8)),
            ],
            &full(),
        )
        .unwrap();
    let x = store.get("c", "x", Timestamp(8)).unwrap().unwrap();
    assert_eq!(x.json["n"], json!(17));
    assert_eq!(x.json["ctr"], json!(i64::MAX - 1));
}

fn client_change(
    doc: &mut Automerge,
    f: impl FnOnce(&mut automerge::transaction::Transaction<'_>),
) -> Vec<u8> {
    let heads = doc.get_heads();
    let mut tx = doc.transaction();
    f(&mut tx);
    tx.commit_with(CommitOptions::default().with_time(1));
    doc.save_after(&heads)
}

#[test]
fn raw_automerge_changes_apply_as_a_batch_and_merge_with_json_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let mut client = Automerge::new().with_actor(ActorId::from(&b"client-one"[..]));
    let c1 = client_change(&mut client, |tx| {
        tx.put(ROOT, "title", "hello").unwrap();
    });
    let c2 = client_change(&mut client, |tx| {
        tx.put(ROOT, "n", 2).unwrap();
    });
    // save_after gives concatenated changes; split them through automerge.
    let split = |bytes: &[u8]| {
        let mut d = Automerge::new();
        d.load_incremental(bytes).unwrap();
        d.get_changes(&[])
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    let mut both = split(&c1);
    both.extend(
        split(&[c1.clone(), c2.clone()].concat())
            .into_iter()
            .skip(1),
    );
    store
        .apply(
            &[(Timestamp(1), tx(vec![changes("notes", "n1", both)], 1))],
            &full(),
        )
        .unwrap();
    store
        .apply(
            &[(
                Timestamp(2),
                tx(vec![patch("notes", "n1", &json!({"server": true}))], 2),
            )],
            &full(),
        )
        .unwrap();
    let doc = store.get("notes", "n1", Timestamp(2)).unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(doc.json),
        json!({"title": "hello", "n": 2, "server": true})
    );
    // The client merges the server's bytes and keeps editing.
    let bytes = store
        .get_automerge("notes", "n1", Timestamp(2))
        .unwrap()
        .unwrap();
    let server = Automerge::load(&bytes).unwrap();
    client.merge(&mut server.clone()).unwrap();
    let c3 = client_change(&mut client, |tx| {
        tx.put(ROOT, "title", "edited").unwrap();
    });
    let outcome = store
        .apply(
            &[(
                Timestamp(3),
                tx(
                    vec![changes("notes", "n1", split_after(&client, &server))],
                    3,
                ),
            )],
            &full(),
        )
        .unwrap();
    assert!(outcome.skipped.is_empty(), "{:?}", outcome.skipped);
    let _ = c3;
    let doc = store.get("notes", "n1", Timestamp(3)).unwrap().unwrap();
    assert_eq!(doc.json["title"], json!("edited"));
    // A change whose dependencies the document lacks is refused, not queued.
    let mut stranger = Automerge::new().with_actor(ActorId::from(&b"stranger"[..]));
    client_change(&mut stranger, |tx| {
        tx.put(ROOT, "a", 1).unwrap();
    });
    let second = client_change(&mut stranger, |tx| {
        tx.put(ROOT, "b", 1).unwrap();
    });
    let outcome = store
        .apply(
            &[(
                Timestamp(4),
                tx(vec![changes("notes", "n1", vec![second])], 4),
            )],
            &full(),
        )
        .unwrap();
    assert_eq!(outcome.aborted, 1, "the transaction aborts");
    let refused = self::outcome(&store, 4);
    assert_eq!(
        refused.failures[0].detail,
        Rejection::MissingDependencies.to_string()
    );
    assert_eq!(
        store
            .get("notes", "n1", Timestamp(4))
            .unwrap()
            .unwrap()
            .version,
        Timestamp(3)
    );
    assert!(server.get(ROOT, "title").unwrap().is_some());
}

/// A local write and a client's raw change to the same field in one transaction are concurrent:
/// automerge picks the winner by actor. The JSON a version stores is computed before the change
/// is made, and must pick the same winner, with the document cached or reloaded, whichever side
/// of the store's actor the client's falls.
#[test]
fn a_local_write_and_a_concurrent_raw_change_in_one_transaction_agree_on_the_winner() {
    // Below the store's actors (a ts first), between them and a random one, above all.
    let mut between = [0u8; 16];
    between[0] = 1;
    for client_actor in [[0u8; 16], between, [0xff; 16]] {
        for cache_documents in [0, 1024] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(
                &dir,
                StoreOptions {
                    cache_documents,
                    ..small_options()
                },
            );
            let first = tx(vec![patch("notes", "n", &json!({"title": "first"}))], 1);
            store.apply(&[(Timestamp(1), first)], &full()).unwrap();
            let bytes = store
                .get_automerge("notes", "n", Timestamp(1))
                .unwrap()
                .unwrap();
            let mut client = Automerge::load(&bytes)
                .unwrap()
                .with_actor(ActorId::from(&client_actor[..]));
            let change = client_change(&mut client, |tx| {
                tx.put(ROOT, "title", "client").unwrap();
            });
            let both = tx(
                vec![
                    patch("notes", "n", &json!({"title": "server"})),
                    changes("notes", "n", vec![change]),
                ],
                2,
            );
            let outcome = store.apply(&[(Timestamp(2), both)], &full()).unwrap();
            assert!(outcome.skipped.is_empty() && outcome.aborted == 0);
            let stored = store.get("notes", "n", Timestamp(2)).unwrap().unwrap();
            let bytes = store
                .get_automerge("notes", "n", Timestamp(2))
                .unwrap()
                .unwrap();
            let doc = Automerge::load(&bytes).unwrap();
            let (winner, _) = doc.get(ROOT, "title").unwrap().unwrap();
            assert_eq!(
                json!(winner.into_string().unwrap()),
                stored.json["title"],
                "client actor {client_actor:02x?}, cache {cache_documents}"
            );
        }
    }
}

fn split_after(client: &Automerge, server: &Automerge) -> Vec<Vec<u8>> {
    client
        .get_changes(&server.get_heads())
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

#[test]
fn history_is_rebased_past_the_bound_and_counters_survive() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        snapshot_every_versions: 8,
        ..StoreOptions::default()
    };
    let tx = |m, ts| tx_limited(m, ts, 0, 20);
    let store = open(&dir, options.clone());
    let mut ts = 0;
    for i in 0..100 {
        ts += 1;
        let m = if i % 2 == 0 {
            increment("c", "x", &["hits"], 1)
        } else {
            patch("c", "x", &json!({"i": i}))
        };
        store
            .apply(&[(Timestamp(ts), tx(vec![m], ts))], &full())
            .unwrap();
    }
    let bytes = store
        .get_automerge("c", "x", Timestamp(ts))
        .unwrap()
        .unwrap();
    let doc = Automerge::load(&bytes).unwrap();
    let changes = doc.get_changes(&[]).len();
    assert!(changes <= 21, "history bounded: {changes} changes");
    assert_eq!(
        store.get("c", "x", Timestamp(ts)).unwrap().unwrap().json["hits"],
        json!(50)
    );
    // Reads of old versions still work, and a cold restart keeps counting.
    assert_eq!(
        store.get("c", "x", Timestamp(10)).unwrap().unwrap().json["hits"],
        json!(5)
    );
    drop(store);
    let store = open(&dir, options);
    store
        .apply(
            &[(
                Timestamp(ts + 1),
                tx(vec![increment("c", "x", &["hits"], 1)], 1),
            )],
            &full(),
        )
        .unwrap();
    assert_eq!(
        store
            .get("c", "x", Timestamp(ts + 1))
            .unwrap()
            .unwrap()
            .json["hits"],
        json!(51)
    );
}

/// The actors of a document's changes at `ts`, in change order, with how many changes each made.
fn change_actors(store: &Store, id: &str, ts: u64) -> Vec<(ActorId, usize)> {
    let bytes = store
        .get_automerge("c", id, Timestamp(ts))
        .unwrap()
        .unwrap();
    let mut actors: Vec<(ActorId, usize)> = Vec::new();
    for change in Automerge::load(&bytes).unwrap().get_changes(&[]) {
        match actors.iter_mut().find(|(a, _)| a == change.actor_id()) {
            Some((_, n)) => *n += 1,
            None => actors.push((change.actor_id().clone(), 1)),
        }
    }
    actors
}

/// The store's own changes to a document share one actor per history (from its creation or
/// re-base to the next), across snapshots, a cold restart and a re-creation; a history stored
/// before actors were kept (its snapshot names none) keeps one actor per mutation.
#[test]
fn a_documents_store_changes_share_one_actor_per_history() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        snapshot_every_versions: 4,
        ..small_options()
    };
    let unbounded = |m, ts| tx_limited(m, ts, 0, 1000);
    let mut store = open(&dir, options.clone());
    let write = |store: &Store, ts: u64, m| {
        let outcome = store
            .apply(&[(Timestamp(ts), unbounded(vec![m], ts))], &full())
            .unwrap();
        assert!(outcome.skipped.is_empty() && outcome.aborted == 0);
    };
    for ts in 1..=6 {
        write(&store, ts, patch("c", "x", &json!({"v": ts})));
    }
    // Snapshots at 1 and 5, a cold cache, then more writes: still the one actor.
    drop(store);
    store = open(&dir, options.clone());
    for ts in 7..=10 {
        write(&store, ts, patch("c", "x", &json!({"v": ts})));
    }
    let first = change_actors(&store, "x", 10);
    assert_eq!(first.len(), 1, "one actor for ten writes: {first:?}");
    assert_eq!(first[0].1, 10);
    // Re-created: a new history, a new actor.
    write(&store, 11, delete("c", "x"));
    write(&store, 12, patch("c", "x", &json!({"v": 12})));
    write(&store, 13, patch("c", "x", &json!({"v": 13})));
    let second = change_actors(&store, "x", 13);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].1, 2);
    assert_ne!(second[0].0, first[0].0);
    // Re-based past the bound: the re-base's actor makes the changes after it.
    // A history bound of 5: past it, a re-base.
    let bounded_writes = |store: &Store| {
        for ts in 14..=20 {
            let records = [(
                Timestamp(ts),
                tx_limited(vec![patch("c", "x", &json!({"v": ts}))], ts, 0, 5),
            )];
            assert!(store.apply(&records, &full()).unwrap().skipped.is_empty());
        }
    };
    bounded_writes(&store);
    let rebased = change_actors(&store, "x", 20);
    assert_eq!(rebased.len(), 1, "{rebased:?}");
    assert!(![first[0].0.clone(), second[0].0.clone()].contains(&rebased[0].0));
    let two_replicas_agree = store.raw_versions(&Interval::FULL).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(
        &other_dir,
        StoreOptions {
            cache_documents: 0,
            ..options.clone()
        },
    );
    for ts in 1..=13 {
        let m = match ts {
            11 => delete("c", "x"),
            _ => patch("c", "x", &json!({"v": ts})),
        };
        write(&other, ts, m);
    }
    bounded_writes(&other);
    assert_eq!(
        two_replicas_agree,
        other.raw_versions(&Interval::FULL).unwrap()
    );

    // A snapshot in the format before actors were kept: kind 1, no actor after the header.
    let legacy_dir = tempfile::tempdir().unwrap();
    let legacy = open(&legacy_dir, options.clone());
    write(&legacy, 1, patch("c", "old", &json!({"v": 1})));
    let mut records = legacy.raw_versions(&Interval::FULL).unwrap();
    drop(legacy);
    assert_eq!(records.len(), 1);
    let value = &mut records[0].value;
    assert_eq!(value[1], 3, "a snapshot that names its actor");
    let actor_len = usize::from(value[14]);
    value.drain(14..15 + actor_len);
    value[1] = 1;
    store.ingest(&records).unwrap();
    for ts in 21..=23 {
        write(&store, ts, patch("c", "old", &json!({"v": ts})));
    }
    let actors = change_actors(&store, "old", 23);
    assert_eq!(actors.len(), 4, "one actor per mutation: {actors:?}");
    assert!(actors.iter().all(|(_, n)| *n == 1));

    // A history begun by a record of format 2 (a build that gives each mutation its actor
    // applies those alike) keeps one actor per mutation, whatever the records after it.
    let mut created = unbounded(vec![patch("c", "two", &json!({"v": 24}))], 24);
    created.format_version = 2;
    store.apply(&[(Timestamp(24), created)], &full()).unwrap();
    for ts in 25..=26 {
        write(&store, ts, patch("c", "two", &json!({"v": ts})));
    }
    let actors = change_actors(&store, "two", 26);
    assert_eq!(actors.len(), 3, "one actor per mutation: {actors:?}");
}

#[test]
fn backfill_moves_an_interval_to_a_new_replica_with_pending_mutations() {
    let (ds, dt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = open(&ds, small_options());
    apply_stream(&source, 5, 1, 200, 10, 30);
    gc_all(&source, Timestamp(150));
    let interval = Interval::new(1 << 62, 3 << 62);
    // The target logs 201..=230 while the interval is still being backfilled.
    let target = open(&dt, small_options());
    let pending_only = Ownership {
        owned: vec![],
        pending: vec![interval],
    };
    let first: Vec<_> = (1..=200).map(|t| stream_record(5, t, 30)).collect();
    target.apply(&first, &Ownership::default()).unwrap();
    let later: Vec<_> = (201..=230).map(|t| stream_record(5, t, 30)).collect();
    let outcome = target
        .apply_with_votes(&later, &pending_only, &all_committed(&later))
        .unwrap();
    assert!(outcome.pending_written > 0 && outcome.versions_written == 0);
    // Backfill the versions readable in [150, 200], in small batches.
    let mut from: Option<Vec<u8>> = None;
    let mut batches = 0;
    loop {
        batches += 1;
        assert!(batches < 1000);
        let batch = source
            .backfill_batch(
                &interval,
                Timestamp(150),
                Timestamp(200),
                from.as_deref(),
                5,
                usize::MAX,
            )
            .unwrap();
        target.ingest(&batch.records).unwrap();
        match batch.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    assert!(batches > 2);
    assert_eq!(
        target.digest(&interval, Timestamp(200)).unwrap(),
        source.digest(&interval, Timestamp(200)).unwrap()
    );
    assert_eq!(
        target.digest(&interval, Timestamp(150)).unwrap(),
        source.digest(&interval, Timestamp(150)).unwrap()
    );
    assert_eq!(
        replay_all(&target, &interval, Timestamp(200), 4),
        outcome.pending_written
    );
    source.apply(&later, &full()).unwrap();
    assert_eq!(
        target.digest(&interval, Timestamp(230)).unwrap(),
        source.digest(&interval, Timestamp(230)).unwrap()
    );
    for id in 0..30 {
        let id = format!("d{id}");
        if interval.contains(KeyHash::of("items", &id)) {
            assert_eq!(
                target.get("items", &id, Timestamp(230)).unwrap(),
                source.get("items", &id, Timestamp(230)).unwrap()
            );
            // The automerge state too: the replayed mutations used the source's actors.
            assert_eq!(
                target.get_automerge("items", &id, Timestamp(230)).unwrap(),
                source.get_automerge("items", &id, Timestamp(230)).unwrap()
            );
        }
    }
    // Malformed records are refused.
    let bad = causeway_store_node::storage::BackfillRecord {
        key: b"nope".to_vec(),
        value: vec![1, 0],
    };
    assert!(matches!(
        target.ingest(&[bad]),
        Err(Error::InvalidBackfillRecord)
    ));
}

#[test]
fn meta_keeps_configurations_and_named_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    store.put_config(causeway_core::Epoch(2), b"two").unwrap();
    store.put_config(causeway_core::Epoch(1), b"one").unwrap();
    store.put_meta("plan", Some(b"half")).unwrap();
    drop(store);
    let store = open(&dir, small_options());
    assert_eq!(
        store.configs().unwrap(),
        vec![
            (causeway_core::Epoch(1), b"one".to_vec()),
            (causeway_core::Epoch(2), b"two".to_vec())
        ]
    );
    assert_eq!(store.meta("plan").unwrap(), Some(b"half".to_vec()));
    assert_eq!(store.meta("other").unwrap(), None);
    store.put_meta("plan", None).unwrap();
    assert_eq!(store.meta("plan").unwrap(), None);
}

#[test]
fn scans_are_bounded_and_resume_from_their_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let mutations = (0..25)
        .map(|i| {
            replace(
                "s",
                &format!("k{i:02}"),
                &json!({"i": i, "even": i % 2 == 0}),
            )
        })
        .collect();
    store
        .apply(&[(Timestamp(1), tx(mutations, 1))], &full())
        .unwrap();
    let even = |v: &serde_json::Value| v["even"] == json!(true);
    let mut cursor = None;
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 25);
        let page = store
            .scan("s", Timestamp(1), &even, 3, cursor.as_ref(), 4)
            .unwrap();
        assert!(page.scanned <= 4 && page.documents.len() <= 3);
        ids.extend(page.documents.into_iter().map(|d| d.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert!(pages >= 7, "25 documents at most 4 per page");
    ids.sort();
    let want: Vec<String> = (0..25)
        .filter(|i| i % 2 == 0)
        .map(|i| format!("k{i:02}"))
        .collect();
    assert_eq!(ids, want);
    // A cursor of another collection is refused.
    let other = store
        .scan("s", Timestamp(1), &even, 1, None, 1)
        .unwrap()
        .next
        .unwrap();
    assert!(matches!(
        store.scan("t", Timestamp(1), &even, 1, Some(&other), 1),
        Err(Error::InvalidCursor(_))
    ));
    // Collections are listed from the index.
    assert_eq!(store.collections().unwrap(), vec!["s".to_string()]);
}

#[test]
fn backfill_chunks_keep_to_their_byte_bound_and_cover_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    apply_stream(&store, 9, 1, 120, 10, 40);
    let all = store.raw_versions(&Interval::FULL).unwrap();
    let (mut from, mut records, mut chunks): (Option<Vec<u8>>, usize, usize) = (None, 0, 0);
    let bound = 2_000;
    loop {
        chunks += 1;
        assert!(chunks < 10_000);
        let batch = store
            .backfill_batch(
                &Interval::FULL,
                Timestamp::ZERO,
                Timestamp(120),
                from.as_deref(),
                usize::MAX,
                bound,
            )
            .unwrap();
        let bytes: usize = batch
            .records
            .iter()
            .map(|r| r.key.len() + r.value.len())
            .sum();
        // Whole documents: a chunk passes the bound by at most its last document.
        let prefix = |key: &[u8]| {
            causeway_store_node::storage::parse_version_key(key)
                .expect("a version key")
                .prefix
                .to_vec()
        };
        let last = prefix(&batch.records.last().expect("a record").key);
        let last_doc: usize = batch
            .records
            .iter()
            .filter(|r| prefix(&r.key) == last)
            .map(|r| r.key.len() + r.value.len())
            .sum();
        assert!(bytes < bound + last_doc, "{bytes} bytes in one chunk");
        records += batch.records.len();
        match batch.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    assert!(chunks > 3, "the bound split the interval ({chunks} chunks)");
    // Nothing was pruned: every version is needed at ts 0.
    assert_eq!(records, all.len());
}

#[test]
fn dropping_documents_keeps_the_pending_mutations_and_skip_moves_only_forward() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let half = Interval::new(0, 1 << 63);
    let pending = Ownership {
        owned: vec![Interval::new(1 << 63, 1 << 64)],
        pending: vec![half],
    };
    let records: Vec<_> = (1..=40).map(|t| stream_record(3, t, 20)).collect();
    let outcome = store
        .apply_with_votes(&records, &pending, &all_committed(&records))
        .unwrap();
    assert!(outcome.pending_written > 0);
    let ingested: Vec<_> = (1..=40).map(|t| stream_record(3, t, 20)).collect();
    let other = tempfile::tempdir().unwrap();
    let source = open(&other, small_options());
    source.apply(&ingested, &full()).unwrap();
    let batch = source
        .backfill_batch(
            &half,
            Timestamp::ZERO,
            Timestamp(40),
            None,
            usize::MAX,
            usize::MAX,
        )
        .unwrap();
    store.ingest(&batch.records).unwrap();
    assert!(!store.raw_versions(&half).unwrap().is_empty());
    store.drop_documents(&[half]).unwrap();
    assert!(store.raw_versions(&half).unwrap().is_empty());
    // The pending mutations are still there to replay.
    assert_eq!(
        replay_all(&store, &half, Timestamp(40), 1000),
        outcome.pending_written
    );
    // They were all at or below the snapshot: none is applied, so none brings back a document
    // the snapshot does not hold (say, one deleted and pruned at the source).
    assert!(store.raw_versions(&half).unwrap().is_empty());

    assert_eq!(store.applied(), Timestamp(40));
    store.skip_to(Timestamp(30)).unwrap();
    assert_eq!(store.applied(), Timestamp(40), "never back");
    store.skip_to(Timestamp(1_000)).unwrap();
    assert_eq!(
        (store.applied(), store.committed()),
        (Timestamp(1_000), Timestamp(1_000))
    );
    drop(store);
    let store = open(&dir, small_options());
    assert_eq!(store.applied(), Timestamp(1_000), "durable");
}

/// A record with an idempotency key of scope "tester".
fn keyed(
    mutations: Vec<causeway_proto::v1::Mutation>,
    wall_clock_ms: u64,
    key: &str,
) -> causeway_proto::v1::Transaction {
    causeway_proto::v1::Transaction {
        idempotency_key: key.into(),
        idempotency_scope: "tester".into(),
        ..tx_limited(mutations, wall_clock_ms, 0, 0)
    }
}

#[test]
fn a_committed_idempotency_key_makes_a_retry_a_duplicate_within_its_window() {
    use causeway_store_node::storage::{DEFAULT_IDEMPOTENCY_WINDOW_MS, IDEMPOTENCY_MAX_DISTANCE};
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, small_options());
    let inc = || {
        vec![
            increment("c", "x", &["n"], 1),
            increment("c", "y", &["n"], 1),
        ]
    };
    let alone = || vec![increment("c", "x", &["n"], 10)];
    let hour = 3_600_000;
    let far = 5 + IDEMPOTENCY_MAX_DISTANCE + 1;
    let records = vec![
        (Timestamp(1), keyed(inc(), hour, "k")),
        // The same key: a duplicate, in the same group and in a later one.
        (Timestamp(2), keyed(inc(), hour + 5, "k")),
        // Another scope, another key: new transactions.
        (
            Timestamp(3),
            causeway_proto::v1::Transaction {
                idempotency_scope: "other".into(),
                ..keyed(inc(), hour, "k")
            },
        ),
        (Timestamp(4), keyed(inc(), hour, "k2")),
        // A single-document transaction is decided in its share: the same rule.
        (Timestamp(5), keyed(alone(), hour, "solo")),
        (Timestamp(6), keyed(alone(), hour, "solo")),
    ];
    store.apply(&records, &full()).unwrap();
    store
        .apply(&[(Timestamp(7), keyed(inc(), hour + 10, "k"))], &full())
        .unwrap();
    let duplicate = |ts: u64| outcome(&store, ts).duplicate_of;
    assert_eq!([duplicate(2), duplicate(6), duplicate(7)], [1, 5, 1]);
    assert_eq!(
        [duplicate(1), duplicate(3), duplicate(4), duplicate(5)],
        [0; 4]
    );
    let n =
        |id: &str, ts: u64| store.get("c", id, Timestamp(ts)).unwrap().unwrap().json["n"].clone();
    assert_eq!(
        (n("x", 7), n("y", 7)),
        (json!(13), json!(3)),
        "each key once"
    );
    // Past the window of wall clock, or the bound on log positions, the key is forgotten.
    let late = hour + DEFAULT_IDEMPOTENCY_WINDOW_MS + 1;
    store
        .apply(&[(Timestamp(8), keyed(inc(), late, "k2"))], &full())
        .unwrap();
    assert_eq!(duplicate(8), 0);
    store
        .apply(&[(Timestamp(far), keyed(alone(), hour, "solo"))], &full())
        .unwrap();
    assert_eq!(duplicate(far), 0);
    // An aborted transaction's key is not remembered: its retry runs again.
    let refused = causeway_proto::v1::Transaction {
        conditions: vec![causeway_proto::v1::Condition {
            collection: "c".into(),
            id: "x".into(),
            exists: Some(false),
            ..Default::default()
        }],
        ..keyed(alone(), hour, "fail")
    };
    store
        .apply(&[(Timestamp(far + 1), refused.clone())], &full())
        .unwrap();
    assert!(!outcome(&store, far + 1).committed);
    store
        .apply(&[(Timestamp(far + 2), refused)], &full())
        .unwrap();
    assert_eq!(outcome(&store, far + 2).duplicate_of, 0);
}

#[test]
fn idempotency_rows_move_with_their_document_and_go_after_the_bound() {
    use causeway_store_node::storage::IDEMPOTENCY_MAX_DISTANCE;
    let (ds, dt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = open(&ds, small_options());
    let target = open(&dt, small_options());
    let write = || vec![increment("c", "x", &["n"], 1)];
    source
        .apply(&[(Timestamp(1), keyed(write(), 1, "k"))], &full())
        .unwrap();
    // The target logs ts 2 while the interval is pending: the row goes to pending with it.
    let second = vec![(
        Timestamp(2),
        keyed(vec![increment("c", "x", &["n"], 1)], 2, "k2"),
    )];
    source.apply(&second, &full()).unwrap();
    let pending = Ownership {
        owned: vec![],
        pending: vec![Interval::FULL],
    };
    target.skip_to(Timestamp(1)).unwrap();
    target
        .apply_with_votes(&second, &pending, &all_committed(&second))
        .unwrap();
    let batch = source
        .backfill_batch(
            &Interval::FULL,
            Timestamp::ZERO,
            Timestamp(1),
            None,
            usize::MAX,
            usize::MAX,
        )
        .unwrap();
    target.ingest(&batch.records).unwrap();
    replay_all(&target, &Interval::FULL, Timestamp(1), 100);
    assert_eq!(
        target.digest(&Interval::FULL, Timestamp(2)).unwrap(),
        source.digest(&Interval::FULL, Timestamp(2)).unwrap()
    );
    // Both keys moved: retries on the target are duplicates.
    for (ts, key) in [(3, "k"), (4, "k2")] {
        let retry = vec![(Timestamp(ts), keyed(write(), 3, key))];
        target.apply(&retry, &full()).unwrap();
        assert_eq!(outcome(&target, ts).duplicate_of, ts - 2, "{key}");
    }
    // GC drops a row no later transaction can see; the digests never counted it.
    let far = Timestamp(2 + IDEMPOTENCY_MAX_DISTANCE + 10);
    target.skip_to(far).unwrap();
    let before = target.raw_versions(&Interval::FULL).unwrap().len();
    gc_all(&target, far);
    let after = target.raw_versions(&Interval::FULL).unwrap().len();
    assert!(after < before, "rows dropped: {before} → {after}");
}

/// A read at a ts that becomes applied while the read starts sees that ts's writes, or is told
/// the ts is not applied yet: never a snapshot from before it. (The snapshot was once taken
/// before the applied position was read, so a ts applied in between read as if it were not.)
#[test]
fn a_read_at_a_ts_applied_while_it_starts_sees_that_ts() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(&dir, small_options()));
    const LAST: u64 = 3_000;
    let writer = {
        let store = std::sync::Arc::clone(&store);
        std::thread::spawn(move || {
            for ts in 1..=LAST {
                let record = tx(vec![replace("c", "k", &json!({ "ts": ts }))], ts);
                store.apply(&[(Timestamp(ts), record)], &full()).unwrap();
            }
        })
    };
    let mut seen = 0;
    // Bounded: the writer applies LAST records and stops.
    while store.applied().get() < LAST {
        let ts = Timestamp(store.applied().get() + 1);
        match store.get("c", "k", ts) {
            Ok(doc) => {
                let found = doc.map(|d| d.json["ts"].clone());
                assert_eq!(found, Some(json!(ts.get())), "the read at {ts}");
                seen += 1;
            }
            Err(Error::NotYetApplied { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    writer.join().unwrap();
    eprintln!("{seen} reads found their ts applied as they started");
    assert!(
        seen > 0,
        "no read started as its ts was applied: the race was not run"
    );
}
