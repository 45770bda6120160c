//! The memory a node holds for the documents it applies stays near the apply cache's bound.
//! (One test in its own binary: it reads the process's resident size.)

mod common;

use causeway_core::Timestamp;
use causeway_store_node::{Store, StoreOptions};
use common::*;
use serde_json::json;

fn resident_mb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096 / (1 << 20)
}

/// 6,000 documents of 1 KB, 200 per transaction, with a 64 MiB apply cache: the process grows by
/// well under 400 MB (it grew by some 300 KB per document when each snapshot was deflated).
#[test]
fn applying_many_documents_keeps_memory_near_the_cache_bound() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        cache_bytes: 64 << 20,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), options).unwrap();
    let before = resident_mb();
    let pad = "x".repeat(1000);
    for t in 0..30u64 {
        let mutations = (0..200u64)
            .map(|i| {
                let id = format!("k{:09}", t * 200 + i);
                replace("bench", &id, &json!({"n": i, "pad": pad}))
            })
            .collect();
        store
            .apply(&[(Timestamp(t + 1), tx(mutations, 1))], &full())
            .unwrap();
    }
    let grown = resident_mb().saturating_sub(before);
    println!(
        "6000 documents: {grown} MB more resident, {} cached",
        store.cached_documents()
    );
    assert!(grown < 400, "the process grew by {grown} MB");
}
