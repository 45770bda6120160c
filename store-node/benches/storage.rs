//! Storage engine benchmarks (a plain `main`: it reports rates, percentiles and ratios, which
//! criterion's per-iteration timings do not).
//!
//! `cargo bench -p causeway-store-node --bench storage`
//! Environment: `CAUSEWAY_BENCH_PREPOPULATE` (documents written before measuring, default
//! 100 000), `CAUSEWAY_BENCH_TXS` (transactions per measurement, default 20 000),
//! `CAUSEWAY_BENCH_HISTORY` (updates of history for the old document, default 100 000).

use std::time::{Duration, Instant};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ROOT};
use causeway_core::{Interval, Timestamp};
use causeway_proto::v1::{mutation, MergePatch, Mutation, Transaction, TRANSACTION_FORMAT_VERSION};
use causeway_store_node::storage::Ownership;
use causeway_store_node::{Store, StoreOptions};
use serde_json::{json, Map, Value as Json};

const KEYSPACE: u64 = 1_000_000;
const GROUP: usize = 100;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// YCSB's zipfian generator (Gray et al.), theta 0.99, scrambled over the keyspace.
struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            1
        } else {
            ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        // Scramble so hot keys are spread over the keyspace.
        (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555) % self.n
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Size {
    Small,
    Kb,
}

/// The document body an update writes: 10 fields, small or ~1 KB in total.
fn body(size: Size, rng: &mut Rng) -> Map<String, Json> {
    let mut map = Map::new();
    for f in 0..10 {
        let value = match size {
            Size::Small => json!(rng.next() % 1000),
            Size::Kb => json!(format!("{:0>90}", rng.next())),
        };
        map.insert(format!("field{f}"), value);
    }
    map
}

fn tx(id: u64, body: &Map<String, Json>, ts: u64) -> Transaction {
    Transaction {
        format_version: TRANSACTION_FORMAT_VERSION,
        wall_clock_ms: 1_700_000_000_000 + ts,
        idempotency_key: String::new(),
        mutations: vec![Mutation {
            collection: "bench".into(),
            id: format!("doc{id}"),
            op: Some(mutation::Op::MergePatch(MergePatch {
                json: serde_json::to_vec(body).unwrap(),
            })),
        }],
        ..Transaction::default()
    }
}

struct Bench {
    store: Store,
    ts: u64,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new(options: StoreOptions) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        Bench {
            store: Store::open(dir.path(), options).unwrap(),
            ts: 0,
            _dir: dir,
        }
    }

    /// Applies `ids` as one-mutation transactions in groups; returns tx/s.
    fn apply(&mut self, ids: &[u64], size: Size, rng: &mut Rng) -> f64 {
        let all = Ownership::owned(vec![Interval::FULL]);
        let mut groups = Vec::new();
        for chunk in ids.chunks(GROUP) {
            let group: Vec<_> = chunk
                .iter()
                .map(|&id| {
                    self.ts += 1;
                    (Timestamp(self.ts), tx(id, &body(size, rng), self.ts))
                })
                .collect();
            groups.push(group);
        }
        let start = Instant::now();
        for group in &groups {
            let outcome = self.store.apply(group, &all).unwrap();
            assert!(outcome.skipped.is_empty());
        }
        ids.len() as f64 / start.elapsed().as_secs_f64()
    }
}

/// Raw RocksDB: the same JSON bytes put under the same keys, one synced batch per group.
fn raw_rocksdb(ids: &[u64], size: Size, rng: &mut Rng) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db = rocksdb::DB::open(&opts, dir.path()).unwrap();
    let batches: Vec<Vec<(Vec<u8>, Vec<u8>)>> = ids
        .chunks(GROUP)
        .map(|c| {
            c.iter()
                .map(|id| {
                    (
                        format!("bench/doc{id}").into_bytes(),
                        serde_json::to_vec(&body(size, rng)).unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    let start = Instant::now();
    for batch in &batches {
        let mut wb = rocksdb::WriteBatch::default();
        for (k, v) in batch {
            wb.put(k, v);
        }
        db.write_opt(wb, &wo).unwrap();
    }
    ids.len() as f64 / start.elapsed().as_secs_f64()
}

/// Raw automerge: the same field writes as local transactions on in-memory documents.
fn raw_automerge(ids: &[u64], size: Size, rng: &mut Rng) -> f64 {
    let mut docs: std::collections::HashMap<u64, Automerge> = std::collections::HashMap::new();
    let bodies: Vec<_> = ids.iter().map(|_| body(size, rng)).collect();
    let start = Instant::now();
    for (n, (id, body)) in ids.iter().zip(&bodies).enumerate() {
        let doc = docs.entry(*id).or_default();
        doc.set_actor(ActorId::from(&(n as u64).to_be_bytes()[..]));
        let mut tx = doc.transaction();
        for (k, v) in body {
            match v {
                Json::String(s) => tx.put(ROOT, k.as_str(), s.as_str()).unwrap(),
                other => tx.put(ROOT, k.as_str(), other.as_i64().unwrap()).unwrap(),
            }
        }
        tx.commit_with(CommitOptions::default().with_time(n as i64));
    }
    ids.len() as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let prepopulate = env("CAUSEWAY_BENCH_PREPOPULATE", 100_000);
    let txs = env("CAUSEWAY_BENCH_TXS", 20_000) as usize;
    let history = env("CAUSEWAY_BENCH_HISTORY", 100_000);
    println!("storage bench: keyspace {KEYSPACE}, prepopulated {prepopulate}, {txs} tx per run, groups of {GROUP} (fsync per group)");
    let zipf = Zipf::new(KEYSPACE, 0.99);
    let mut rng = Rng(1);
    println!();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!("| documents | distribution | store tx/s, 1 thread | store tx/s, {threads} threads | raw RocksDB puts/s | raw automerge tx/s | store (1 thread) / RocksDB | store (1 thread) / automerge |");
    println!("|---|---|---|---|---|---|---|---|");
    for size in [Size::Small, Size::Kb] {
        let label = if size == Size::Small {
            "10 fields"
        } else {
            "~1 KB"
        };
        let populate: Vec<u64> = (0..prepopulate)
            .map(|i| i * (KEYSPACE / prepopulate.max(1)))
            .collect();
        // The same store twice: applying on one thread, and on one per core.
        let open = |apply_threads: usize, rng: &mut Rng| {
            let mut bench = Bench::new(StoreOptions {
                apply_threads,
                ..StoreOptions::default()
            });
            let start = Instant::now();
            let rate = bench.apply(&populate, size, rng);
            eprintln!(
                "prepopulated {prepopulate} {label} documents on {apply_threads} thread(s) in {:.1?} ({rate:.0} tx/s)",
                start.elapsed()
            );
            bench
        };
        let mut single = open(1, &mut rng);
        let mut bench = open(threads, &mut rng);
        for dist in ["uniform", "zipfian"] {
            let ids: Vec<u64> = (0..txs)
                .map(|_| {
                    if dist == "uniform" {
                        rng.next() % KEYSPACE
                    } else {
                        zipf.sample(&mut rng)
                    }
                })
                .collect();
            let store = single.apply(&ids, size, &mut rng);
            let parallel = bench.apply(&ids, size, &mut rng);
            let raw = raw_rocksdb(&ids, size, &mut rng);
            let am = raw_automerge(&ids, size, &mut rng);
            println!(
                "| {label} | {dist} | {store:.0} | {parallel:.0} | {raw:.0} | {am:.0} | {:.2} | {:.2} |",
                store / raw,
                store / am
            );
        }
        if size == Size::Small {
            // Reads at a random retained ts of random prepopulated or updated documents.
            let applied = bench.store.applied().0;
            let mut latencies = Vec::with_capacity(20_000);
            for _ in 0..20_000 {
                let id = format!(
                    "doc{}",
                    rng.next() % KEYSPACE / (KEYSPACE / prepopulate.max(1))
                        * (KEYSPACE / prepopulate.max(1))
                );
                let ts = Timestamp(applied - rng.next() % applied.min(10_000));
                let start = Instant::now();
                let doc = bench.store.get("bench", &id, ts).unwrap();
                latencies.push(start.elapsed());
                std::hint::black_box(doc);
            }
            latencies.sort();
            println!();
            println!(
                "read at ts (10-field documents, 20 000 gets): p50 {:.1} µs, p99 {:.1} µs",
                percentile(&latencies, 0.5).as_secs_f64() * 1e6,
                percentile(&latencies, 0.99).as_secs_f64() * 1e6
            );
            println!();
        }
    }
    // History: one document with `history` updates against a fresh one.
    let mut bench = Bench::new(StoreOptions::default());
    let old: Vec<u64> = vec![7; history as usize];
    let start = Instant::now();
    bench.apply(&old, Size::Small, &mut rng);
    eprintln!(
        "built {history} updates of history in {:.1?}",
        start.elapsed()
    );
    let measure = 5_000;
    let old_rate = bench.apply(&vec![7; measure], Size::Small, &mut rng);
    let fresh_rate = bench.apply(&vec![8; measure], Size::Small, &mut rng);
    println!();
    println!(
        "history: {measure} updates of a document with {history} updates of history {old_rate:.0} tx/s, of a fresh document {fresh_rate:.0} tx/s, ratio {:.2}",
        old_rate / fresh_rate
    );
}
