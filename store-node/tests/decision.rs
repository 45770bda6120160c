//! The decision on transactions, property-tested on real stores: random transactions over the
//! documents of two partitions, with random conditions and idempotency keys, applied by five
//! replicas (one holding everything, two per partition) in random groupings, exchanging votes
//! the way store nodes do (a replica answers the outcome it recorded, or its votes while it
//! waits at that ts). Every replica records the same outcome for every transaction; each
//! transaction applied all of its mutations or none; each outcome agrees with its conditions as
//! the documents were just before it; and the replicas of a partition hold equal documents.

mod common;

use std::collections::HashMap;

use causeway_core::query::{Filter, QueryLimits};
use causeway_core::{Interval, KeyHash, Timestamp};
use causeway_proto::v1::{self as pb, outcome_response::Known, Transaction};
use causeway_store_node::storage::{Blocked, Ownership, RemoteVotes};
use causeway_store_node::Store;
use common::*;
use proptest::prelude::*;
use serde_json::{json, Value as Json};

const IDS: usize = 6;
const COLLECTION: &str = "acct";

#[derive(Debug, Clone)]
enum MOp {
    Inc(i64),
    Patch(i64),
    Replace(i64),
    Delete,
}

#[derive(Debug, Clone)]
enum MCond {
    Exists(bool),
    /// The version ts of the document as of some earlier ts (may be stale: then it fails).
    VersionBack(u64),
    BalanceAtLeast(i64),
}

#[derive(Debug, Clone)]
struct MTx {
    mutations: Vec<(usize, MOp)>,
    conditions: Vec<(usize, MCond)>,
    /// One of a few idempotency keys, so that some repeat.
    key: Option<u8>,
}

fn tx_strategy() -> impl Strategy<Value = MTx> {
    let op = prop_oneof![
        4 => (-30i64..30).prop_map(MOp::Inc),
        2 => (0i64..100).prop_map(MOp::Patch),
        1 => (0i64..100).prop_map(MOp::Replace),
        1 => Just(MOp::Delete),
    ];
    let cond = prop_oneof![
        any::<bool>().prop_map(MCond::Exists),
        (0u64..4).prop_map(MCond::VersionBack),
        (0i64..60).prop_map(MCond::BalanceAtLeast),
    ];
    (
        prop::collection::vec((0..IDS, op), 1..4),
        prop::collection::vec((0..IDS, cond), 0..3),
        prop::option::weighted(0.3, 0u8..3),
    )
        .prop_map(|(mutations, conditions, key)| MTx {
            mutations,
            conditions,
            key,
        })
}

fn id(i: usize) -> String {
    format!("a{i}")
}

/// The record of `t`, with version conditions resolved against the reference store `full`
/// as of `ts - 1 - back` (so some are stale).
fn record(t: &MTx, ts: u64, full: &Store) -> Transaction {
    let mutations = t
        .mutations
        .iter()
        .map(|(i, op)| match op {
            MOp::Inc(d) => increment(COLLECTION, &id(*i), &["balance"], *d),
            MOp::Patch(v) => patch(COLLECTION, &id(*i), &json!({"note": v})),
            MOp::Replace(v) => replace(COLLECTION, &id(*i), &json!({"balance": v})),
            MOp::Delete => delete(COLLECTION, &id(*i)),
        })
        .collect();
    let conditions = t
        .conditions
        .iter()
        .map(|(i, c)| {
            let mut cond = pb::Condition {
                collection: COLLECTION.into(),
                id: id(*i),
                ..pb::Condition::default()
            };
            match c {
                MCond::Exists(e) => cond.exists = Some(*e),
                MCond::VersionBack(back) => {
                    let at = Timestamp((ts - 1).saturating_sub(*back));
                    let version = full.get(COLLECTION, &id(*i), at).unwrap();
                    cond.version_ts = Some(version.map_or(0, |d| d.version.0));
                }
                MCond::BalanceAtLeast(n) => {
                    cond.filter = serde_json::to_vec(&json!({"balance": {"$gte": n}})).unwrap();
                }
            }
            cond
        })
        .collect();
    Transaction {
        conditions,
        idempotency_key: t.key.map(|k| format!("key-{k}")).unwrap_or_default(),
        idempotency_scope: "tester".into(),
        ..tx(mutations, 1_700_000_000_000 + ts)
    }
}

struct Replica {
    store: Store,
    ownership: Ownership,
    _dir: tempfile::TempDir,
    blocked: Option<Blocked>,
    remote: RemoteVotes,
}

fn replica(intervals: Vec<Interval>) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    Replica {
        store: Store::open(dir.path(), small_options()).unwrap(),
        ownership: Ownership::owned(intervals),
        _dir: dir,
        blocked: None,
        remote: RemoteVotes::new(),
    }
}

/// What replica `r` would answer to `Outcome(ts)`: what it knows of ts, and the votes it can
/// already cast on later ts (as `votes::answer` does).
fn answer(r: &Replica, ts: Timestamp) -> Vec<(Timestamp, Known)> {
    let mut out = Vec::new();
    if r.store.applied() >= ts {
        out.extend(r.store.outcome(ts).unwrap().map(|k| (ts, k)));
    }
    if let Some(b) = r.blocked.as_ref().filter(|_| r.store.applied() < ts) {
        let votes = |v: &Vec<pb::DocVote>| Known::Votes(pb::TxVotes { votes: v.clone() });
        if b.ts == ts {
            out.push((ts, votes(&b.votes)));
        }
        for (t, v) in &b.early {
            if *t >= ts {
                out.push((*t, votes(v)));
            }
        }
    }
    out
}

/// Applies `records` on every replica, each in its own random groups, exchanging votes, until
/// all have applied the last one.
fn apply_all(replicas: &mut [Replica], records: &[(Timestamp, Transaction)], groups: &[usize]) {
    let last = records.last().map_or(Timestamp::ZERO, |(ts, _)| *ts);
    for round in 0..10_000 {
        let mut progressed = false;
        for r in 0..replicas.len() {
            let applied = replicas[r].store.applied();
            if applied >= last {
                continue;
            }
            let from = records.iter().position(|(ts, _)| *ts > applied).unwrap();
            let size = groups[(r + round) % groups.len()].max(1);
            let group = &records[from..(from + size).min(records.len())];
            let replica = &mut replicas[r];
            let outcome = replica
                .store
                .apply_with_votes(group, &replica.ownership, &replica.remote)
                .unwrap();
            progressed |= outcome.applied > applied;
            replica.blocked = outcome.blocked;
        }
        // Every blocked replica asks every other.
        for r in 0..replicas.len() {
            let Some(ts) = replicas[r].blocked.as_ref().map(|b| b.ts) else {
                continue;
            };
            let answers: Vec<(Timestamp, Known)> = (0..replicas.len())
                .filter(|o| *o != r)
                .flat_map(|o| answer(&replicas[o], ts))
                .collect();
            progressed |= !answers.is_empty();
            for (t, known) in answers {
                replicas[r].remote.entry(t).or_default().push(known);
            }
        }
        if replicas.iter().all(|r| r.store.applied() >= last) {
            return;
        }
        assert!(progressed || round < 3, "no replica can make progress");
    }
    panic!("the replicas did not converge");
}

fn decided(store: &Store, ts: Timestamp) -> Option<pb::TxOutcome> {
    match store.outcome(ts).unwrap() {
        Some(Known::Decided(o)) => Some(o),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, ..ProptestConfig::default() })]

    #[test]
    fn every_replica_decides_the_same_all_or_nothing(
        txs in prop::collection::vec(tx_strategy(), 1..40),
        groups in prop::collection::vec(1usize..6, 1..5),
    ) {
        // Split the keyspace between the documents, so that each partition holds some.
        let mut hashes: Vec<u64> = (0..IDS).map(|i| KeyHash::of(COLLECTION, &id(i)).0).collect();
        hashes.sort_unstable();
        let split = hashes[IDS / 2];
        let low = Interval::new(0, u128::from(split));
        let high = Interval::new(split, 1 << 64);
        let mut replicas = [
            replica(vec![Interval::FULL]),
            replica(vec![low]),
            replica(vec![low]),
            replica(vec![high]),
            replica(vec![high]),
        ];
        // The records, built against the reference as it goes (version conditions need it).
        let mut records = Vec::new();
        for (i, t) in txs.iter().enumerate() {
            let ts = i as u64 + 1;
            let record = record(t, ts, &replicas[0].store);
            let step = vec![(Timestamp(ts), record.clone())];
            let full = &mut replicas[..1];
            apply_all(full, &step, &[1]);
            records.push((Timestamp(ts), record));
        }
        apply_all(&mut replicas[1..], &records, &groups);
        let full = &replicas[0].store;
        let filter = |n: i64| Filter::parse(&json!({"balance": {"$gte": n}}), &QueryLimits::default()).unwrap();
        // A key is remembered beside the first document its transaction writes.
        let mut keys: HashMap<(u8, usize), u64> = HashMap::new();
        for (i, t) in txs.iter().enumerate() {
            let ts = Timestamp(i as u64 + 1);
            let reference = decided(full, ts).expect("the reference decides everything");
            // Every replica that wrote a document of it recorded the same outcome.
            for r in &replicas[1..] {
                if let Some(o) = decided(&r.store, ts) {
                    prop_assert_eq!(&o, &reference, "ts {}", ts);
                }
            }
            // The conditions, checked against the documents at ts - 1.
            let before = |i: usize| full.get(COLLECTION, &id(i), Timestamp(ts.0 - 1)).unwrap();
            let conditions = &records[i_of(ts)].1.conditions;
            let holds = t.conditions.iter().zip(conditions).all(|((i, c), pc)| {
                let doc = before(*i);
                match c {
                    MCond::Exists(e) => doc.is_some() == *e,
                    MCond::VersionBack(_) => {
                        Some(doc.as_ref().map_or(0, |d| d.version.0)) == pc.version_ts
                    }
                    MCond::BalanceAtLeast(n) => {
                        doc.is_some_and(|d| filter(*n).matches(&Json::Object(d.json)))
                    }
                }
            });
            let key = t.key.map(|k| (k, t.mutations[0].0));
            let repeated = key.and_then(|k| keys.get(&k).copied());
            if let Some(original) = repeated {
                prop_assert_eq!(reference.duplicate_of, original, "ts {}: a repeated key", ts);
            } else {
                prop_assert_eq!(reference.committed, holds, "ts {}: {:?}", ts, reference);
                if reference.committed {
                    if let Some(k) = key {
                        keys.insert(k, ts.0);
                    }
                }
            }
            // All or nothing: every written document has a version at ts, or none has.
            for (i, _) in &t.mutations {
                let at = full.get(COLLECTION, &id(*i), ts).unwrap();
                let wrote = match at {
                    Some(d) => d.version == ts,
                    None => before(*i).is_some(),
                };
                let last_deletes = t.mutations.iter().rev().find(|(j, _)| j == i).is_some_and(|(_, op)| matches!(op, MOp::Delete));
                // A committed delete of an absent document leaves no trace to check.
                if !(last_deletes && before(*i).is_none()) {
                    prop_assert_eq!(wrote, reference.committed, "ts {}: document {} of {:?}", ts, i, t);
                }
            }
        }
        let last = Timestamp(txs.len() as u64);
        for (interval, pair) in [(low, [1, 2]), (high, [3, 4])] {
            let want = full.digest(&interval, last).unwrap();
            for r in pair {
                prop_assert_eq!(replicas[r].store.digest(&interval, last).unwrap(), want);
            }
        }
    }
}

/// The index of the record of `ts` (records start at ts 1).
fn i_of(ts: Timestamp) -> usize {
    ts.0 as usize - 1
}
