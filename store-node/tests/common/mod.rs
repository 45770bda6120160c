//! Helpers shared by the storage tests: transaction builders and a seeded generator.
#![allow(dead_code)]

use std::sync::Arc;

use causeway_core::{ClusterConfig, NodeId, NodeInfo, Timestamp};
use causeway_proto::v1::outcome_response::Known;
use causeway_proto::v1::{mutation, Mutation, Transaction, TRANSACTION_FORMAT_VERSION};
use causeway_store_node::state::Configs;
use causeway_store_node::storage::{Ownership, RemoteVotes};
use causeway_store_node::{Store, StoreOptions};
use serde_json::Value as Json;

/// A record whose documents are re-based past 6 changes of history (small, so that tests
/// reach it).
pub fn tx(mutations: Vec<Mutation>, wall_clock_ms: u64) -> Transaction {
    tx_limited(mutations, wall_clock_ms, 0, 6)
}

/// A record with its own limits (0: the format's default).
pub fn tx_limited(
    mutations: Vec<Mutation>,
    wall_clock_ms: u64,
    max_document_bytes: u64,
    max_history_changes: u32,
) -> Transaction {
    Transaction {
        format_version: TRANSACTION_FORMAT_VERSION,
        wall_clock_ms,
        mutations,
        limits: Some(causeway_proto::v1::ApplyLimits {
            max_document_bytes,
            max_history_changes,
            idempotency_window_ms: 0,
        }),
        ..Transaction::default()
    }
}

fn mutation(collection: &str, id: &str, op: mutation::Op) -> Mutation {
    Mutation {
        collection: collection.into(),
        id: id.into(),
        op: Some(op),
    }
}

pub fn replace(collection: &str, id: &str, json: &Json) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::Replace(causeway_proto::v1::Replace {
            json: serde_json::to_vec(json).unwrap(),
        }),
    )
}

pub fn patch(collection: &str, id: &str, json: &Json) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::MergePatch(causeway_proto::v1::MergePatch {
            json: serde_json::to_vec(json).unwrap(),
        }),
    )
}

pub fn raw_patch(collection: &str, id: &str, bytes: &[u8]) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::MergePatch(causeway_proto::v1::MergePatch {
            json: bytes.to_vec(),
        }),
    )
}

pub fn increment(collection: &str, id: &str, path: &[&str], delta: i64) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::Increment(causeway_proto::v1::Increment {
            path: path.iter().map(|s| s.to_string()).collect(),
            delta,
        }),
    )
}

pub fn delete(collection: &str, id: &str) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::Delete(causeway_proto::v1::Delete {}),
    )
}

pub fn changes(collection: &str, id: &str, changes: Vec<Vec<u8>>) -> Mutation {
    mutation(
        collection,
        id,
        mutation::Op::Changes(causeway_proto::v1::AutomergeChanges { changes }),
    )
}

/// splitmix64: a small seeded generator, so child processes can rebuild the same stream.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The record at `ts` of a deterministic stream over `docs` documents: a mix of every op.
pub fn stream_record(seed: u64, ts: u64, docs: u64) -> (Timestamp, Transaction) {
    let mut rng = Rng(seed ^ ts.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let n = 1 + rng.below(3);
    let mut mutations = Vec::new();
    for _ in 0..n {
        let id = format!("d{}", rng.below(docs));
        let m = match rng.below(10) {
            0..=2 => replace(
                "items",
                &id,
                &serde_json::json!({"a": rng.below(100), "s": format!("v{}", rng.below(1000)), "n": {"x": rng.below(5)}}),
            ),
            3..=5 => patch(
                "items",
                &id,
                &serde_json::json!({"b": rng.below(50), "n": {"y": ts}}),
            ),
            6..=8 => increment("items", &id, &["hits"], 1 + rng.below(5) as i64),
            _ => delete("items", &id),
        };
        mutations.push(m);
    }
    (Timestamp(ts), tx(mutations, 1_700_000_000_000 + ts))
}

pub fn small_options() -> StoreOptions {
    StoreOptions {
        cache_documents: 4,
        snapshot_every_versions: 3,
        block_cache_bytes: 1 << 20,
        ..StoreOptions::default()
    }
}

/// Votes from elsewhere that every one of `records` committed: for a store that holds only some
/// of their documents, in tests where nothing can abort.
pub fn all_committed(records: &[(Timestamp, Transaction)]) -> RemoteVotes {
    let committed = Known::Decided(causeway_proto::v1::TxOutcome {
        committed: true,
        ..Default::default()
    });
    records
        .iter()
        .map(|(ts, _)| (*ts, vec![committed.clone()]))
        .collect()
}

pub fn full() -> Ownership {
    Ownership::owned(vec![causeway_core::Interval::FULL])
}

pub fn apply_stream(store: &Store, seed: u64, from: u64, to: u64, group: u64, docs: u64) {
    let mut ts = from;
    while ts <= to {
        let end = (ts + group - 1).min(to);
        let records: Vec<_> = (ts..=end).map(|t| stream_record(seed, t, docs)).collect();
        store.apply(&records, &full()).unwrap();
        ts = end + 1;
    }
}

/// Saves the configuration of a one-node 1×1 cluster in `store`: the node serves from it while
/// the config manager is away.
pub fn save_one_node_config(store: &Store) {
    let config = ClusterConfig::bootstrap(
        1,
        1,
        &[NodeInfo {
            id: NodeId(1),
            addr: "127.0.0.1:1".into(),
        }],
    )
    .unwrap();
    Configs {
        revision: 1,
        current: Some(Arc::new(config)),
        next: None,
    }
    .save(store)
    .unwrap();
}
