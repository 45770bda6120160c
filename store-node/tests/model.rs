//! Model-based property test: random transactions against an in-memory reference of versioned
//! JSON documents. Every read at every retained ts (get, multi_get and scan) equals the model,
//! across ownership changes, cache evictions, re-opens and GC.

mod common;

use std::collections::BTreeMap;

use causeway_core::{Interval, KeyHash, Timestamp};
use causeway_store_node::storage::{Error, Ownership};
use causeway_store_node::Store;
use common::*;
use proptest::prelude::*;
use serde_json::{json, Map, Value as Json};

const COLLECTIONS: [&str; 2] = ["a", "b"];
const IDS: usize = 5;

#[derive(Debug, Clone)]
enum MOp {
    Replace(Json),
    Patch(Json),
    Inc(i64),
    Delete,
}

#[derive(Debug, Clone)]
struct MMut {
    collection: usize,
    id: usize,
    op: MOp,
}

#[derive(Debug, Clone)]
enum Step {
    /// A group of transactions, applied with the lower half of the keyspace owned or all of it.
    Apply {
        txs: Vec<Vec<MMut>>,
        half: bool,
    },
    Reopen,
    /// GC to `applied - back` (clamped).
    Gc {
        back: u64,
    },
}

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        (-5i64..1000).prop_map(Json::from),
        "[a-z]{0,6}".prop_map(Json::String),
        // Binary fractions: serde_json (without float_roundtrip) parses other floats lossily.
        (0i64..1000).prop_map(|i| json!(i as f64 / 8.0 + 0.5)),
        prop::collection::vec(0i64..9, 0..3).prop_map(|v| json!(v)),
    ]
}

fn object(depth: u32) -> BoxedStrategy<Json> {
    let value = if depth == 0 {
        leaf().boxed()
    } else {
        prop_oneof![3 => leaf(), 1 => object(depth - 1)].boxed()
    };
    prop::collection::btree_map(prop::sample::select(vec!["x", "y", "z", "w"]), value, 0..4)
        .prop_map(|m| Json::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
        .boxed()
}

fn mutation() -> impl Strategy<Value = MMut> {
    let op = prop_oneof![
        3 => object(2).prop_map(MOp::Replace),
        3 => object(2).prop_map(MOp::Patch),
        2 => (-3i64..10).prop_map(MOp::Inc),
        1 => Just(MOp::Delete),
    ];
    (0..COLLECTIONS.len(), 0..IDS, op).prop_map(|(collection, id, op)| MMut { collection, id, op })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (prop::collection::vec(prop::collection::vec(mutation(), 1..4), 1..5), any::<bool>())
            .prop_map(|(txs, half)| Step::Apply { txs, half }),
        1 => Just(Step::Reopen),
        1 => (0u64..6).prop_map(|back| Step::Gc { back }),
    ]
}

fn merge_patch(target: &mut Map<String, Json>, patch: &Map<String, Json>) {
    for (k, v) in patch {
        match v {
            Json::Null => {
                target.remove(k);
            }
            Json::Object(inner) => {
                let entry = target.entry(k.clone()).or_insert_with(|| json!({}));
                if !entry.is_object() {
                    *entry = json!({});
                }
                merge_patch(entry.as_object_mut().unwrap(), inner);
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

type Key = (String, String);

/// The reference: for each document, its value after each ts that wrote it.
#[derive(Default)]
struct Model {
    versions: BTreeMap<Key, BTreeMap<u64, Option<Map<String, Json>>>>,
}

impl Model {
    fn at(&self, key: &Key, ts: u64) -> Option<(u64, Map<String, Json>)> {
        let (v, doc) = self.versions.get(key)?.range(..=ts).next_back()?;
        doc.clone().map(|d| (*v, d))
    }

    fn apply(&mut self, ts: u64, mutations: &[MMut], owned: &dyn Fn(&Key) -> bool) {
        let mut touched: BTreeMap<Key, Option<Map<String, Json>>> = BTreeMap::new();
        for m in mutations {
            let key = (COLLECTIONS[m.collection].to_string(), format!("id{}", m.id));
            if !owned(&key) {
                continue;
            }
            let current = touched
                .get(&key)
                .cloned()
                .unwrap_or_else(|| self.at(&key, ts).map(|(_, d)| d));
            let next = match &m.op {
                MOp::Replace(v) => Some(v.as_object().unwrap().clone()),
                MOp::Patch(p) => {
                    let mut d = current.clone().unwrap_or_default();
                    merge_patch(&mut d, p.as_object().unwrap());
                    Some(d)
                }
                MOp::Inc(delta) => {
                    let mut d = current.clone().unwrap_or_default();
                    let n = d.get("cnt").and_then(Json::as_i64).unwrap_or(0);
                    d.insert("cnt".into(), json!(n + delta));
                    Some(d)
                }
                MOp::Delete => None,
            };
            touched.insert(key, next);
        }
        for (key, doc) in touched {
            let existed = self.at(&key, ts).is_some();
            if doc.is_some() || existed {
                self.versions.entry(key).or_default().insert(ts, doc);
            }
        }
    }
}

fn to_mutation(m: &MMut) -> causeway_proto::v1::Mutation {
    let c = COLLECTIONS[m.collection];
    let id = format!("id{}", m.id);
    match &m.op {
        MOp::Replace(v) => replace(c, &id, v),
        MOp::Patch(v) => patch(c, &id, v),
        MOp::Inc(d) => increment(c, &id, &["cnt"], *d),
        MOp::Delete => delete(c, &id),
    }
}

fn all_keys() -> Vec<Key> {
    let mut keys = Vec::new();
    for c in COLLECTIONS {
        for i in 0..IDS {
            keys.push((c.to_string(), format!("id{i}")));
        }
    }
    keys
}

fn check_reads(store: &Store, model: &Model, gc: u64, applied: u64) {
    let keys = all_keys();
    for ts in gc..=applied {
        let ids: Vec<(&str, &str)> = keys.iter().map(|(c, i)| (c.as_str(), i.as_str())).collect();
        let got = store.multi_get(&ids, Timestamp(ts)).unwrap();
        for (key, doc) in keys.iter().zip(got) {
            let want = model.at(key, ts);
            let got = doc.map(|d| (d.version.0, d.json));
            assert_eq!(got, want, "{key:?} at ts {ts}");
        }
        for c in COLLECTIONS {
            // Page through with a small limit and scan bound; keep only documents with "x".
            let mut cursor = None;
            let mut seen = Vec::new();
            for _ in 0..=2 * IDS {
                let page = store
                    .scan(
                        c,
                        Timestamp(ts),
                        &|v| v.get("x").is_some(),
                        2,
                        cursor.as_ref(),
                        3,
                    )
                    .unwrap();
                assert!(page.scanned <= 3 && page.documents.len() <= 2);
                seen.extend(page.documents.into_iter().map(|d| (d.id, d.json)));
                cursor = page.next;
                if cursor.is_none() {
                    break;
                }
            }
            assert!(cursor.is_none(), "scan did not finish");
            let mut want: Vec<_> = keys
                .iter()
                .filter(|(kc, _)| kc == c)
                .filter_map(|k| model.at(k, ts).map(|(_, d)| (k.1.clone(), d)))
                .filter(|(_, d)| d.contains_key("x"))
                .collect();
            want.sort_by_key(|(id, _)| (KeyHash::of(c, id), id.clone()));
            assert_eq!(seen, want, "scan of {c} at ts {ts}");
        }
    }
    if gc > 0 {
        assert!(matches!(
            store.get("a", "id0", Timestamp(gc - 1)),
            Err(Error::SnapshotTooOld { .. })
        ));
    }
    assert!(matches!(
        store.get("a", "id0", Timestamp(applied + 1)),
        Err(Error::NotYetApplied { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn reads_match_the_model(steps in prop::collection::vec(step(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), small_options()).unwrap();
        let mut model = Model::default();
        let mut ts = 0u64;
        let mut gc = 0u64;
        let half = Interval::new(0, 1 << 63);
        for step in steps {
            match step {
                Step::Apply { txs, half: use_half } => {
                    let ownership = if use_half { Ownership::owned(vec![half]) } else { full() };
                    let mut records = Vec::new();
                    for mutations in &txs {
                        ts += 1;
                        let owned = |k: &Key| !use_half || half.contains(KeyHash::of(&k.0, &k.1));
                        model.apply(ts, mutations, &owned);
                        records.push((Timestamp(ts), tx(mutations.iter().map(to_mutation).collect(), 1000 + ts)));
                    }
                    // Nothing here can abort: the votes of the other half say "committed".
                    let outcome = store.apply_with_votes(&records, &ownership, &all_committed(&records)).unwrap();
                    prop_assert_eq!(outcome.blocked, None);
                    prop_assert_eq!(outcome.applied, Timestamp(ts));
                    prop_assert!(outcome.skipped.is_empty(), "{:?}", outcome.skipped);
                    prop_assert_eq!(store.committed(), Timestamp(ts));
                }
                Step::Reopen => {
                    drop(store);
                    store = Store::open(dir.path(), small_options()).unwrap();
                    prop_assert_eq!(store.applied(), Timestamp(ts));
                }
                Step::Gc { back } => {
                    let target = ts.saturating_sub(back).max(gc);
                    gc = target;
                    for _ in 0..1000 {
                        if store.gc(Timestamp(gc), 3).unwrap().pass_complete {
                            break;
                        }
                    }
                }
            }
            check_reads(&store, &model, gc, ts);
        }
    }
}
