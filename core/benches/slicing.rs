//! Random Slicing benchmarks: lookup latency by interval count, and a comparison of keys moved
//! and balance after scale operations against jump consistent hash and a hash ring with 256
//! virtual nodes per partition. Run: `cargo bench -p causeway-core --bench slicing`.

use std::collections::BTreeMap;
use std::hint::black_box;

use causeway_core::{KeyHash, PartitionId, Slicing};
use criterion::{criterion_group, Criterion};

/// splitmix64, for reproducible keys.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("slicing_lookup");
    for intervals in [16u32, 256, 4096] {
        let slicing = Slicing::uniform(intervals).unwrap();
        assert_eq!(slicing.interval_count(), intervals as usize);
        let keys: Vec<KeyHash> = (0..1024).map(|i| KeyHash(mix(i))).collect();
        group.bench_function(format!("{intervals}_intervals"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(slicing.partition_of(black_box(keys[i])))
            })
        });
    }
    group.finish();
}

/// Jump consistent hash (Lamping and Veach).
fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// A hash ring with `vnodes` points per partition.
struct Ring(Vec<(u64, u32)>);

impl Ring {
    fn new(partitions: u32, vnodes: u64) -> Ring {
        let mut points: Vec<(u64, u32)> = (0..partitions)
            .flat_map(|p| (0..vnodes).map(move |v| (mix((u64::from(p) << 20) ^ v ^ 0xABCD), p)))
            .collect();
        points.sort_unstable();
        Ring(points)
    }

    fn owner(&self, key: u64) -> u32 {
        let i = self.0.partition_point(|&(h, _)| h < key);
        self.0[i % self.0.len()].1
    }
}

struct Outcome {
    moved: f64,
    balance: f64,
}

fn measure(
    keys: &[u64],
    before: impl Fn(u64) -> u32,
    after: impl Fn(u64) -> u32,
    parts: u32,
) -> Outcome {
    let mut load = vec![0u64; parts as usize];
    let mut moved = 0;
    for &k in keys {
        let (a, b) = (before(k), after(k));
        moved += u64::from(a != b);
        load[b as usize] += 1;
    }
    let avg = keys.len() as f64 / f64::from(parts);
    Outcome {
        moved: moved as f64 / keys.len() as f64,
        balance: *load.iter().max().unwrap() as f64 / avg,
    }
}

fn comparison() {
    let keys: Vec<u64> = (0..400_000).map(|i| mix(i ^ 0x5555)).collect();
    println!();
    println!("| operation | optimal moved | slicing moved | slicing max/avg | jump moved | jump max/avg | ring-256 moved | ring-256 max/avg | slicing intervals |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (from, to) in [
        (4u32, 5u32),
        (8, 9),
        (16, 17),
        (32, 33),
        (5, 4),
        (17, 16),
        (33, 32),
        (16, 32),
    ] {
        let s_from = Slicing::uniform(from).unwrap();
        let weights: BTreeMap<PartitionId, u32> = (0..to).map(|p| (PartitionId(p), 1)).collect();
        let (s_to, movement) = s_from.rebalance(&weights).unwrap();
        let parts = from.max(to);
        let slicing = measure(
            &keys,
            |k| s_from.partition_of(KeyHash(k)).0,
            |k| s_to.partition_of(KeyHash(k)).0,
            parts,
        );
        let jumped = measure(&keys, |k| jump(k, from), |k| jump(k, to), parts);
        let (r_from, r_to) = (Ring::new(from, 256), Ring::new(to, 256));
        let ring = measure(&keys, |k| r_from.owner(k), |k| r_to.owner(k), parts);
        let optimal = f64::from(from.abs_diff(to)) / f64::from(from.max(to));
        // Balance over the partitions that exist after the operation.
        let fix = |o: Outcome| Outcome {
            moved: o.moved,
            balance: o.balance * f64::from(to) / f64::from(parts),
        };
        let (slicing, jumped, ring) = (fix(slicing), fix(jumped), fix(ring));
        println!(
            "| {from} → {to} | {optimal:.4} | {:.4} (exact {:.4}) | {:.3} | {:.4} | {:.3} | {:.4} | {:.3} | {} |",
            slicing.moved,
            movement.moved_fraction(),
            slicing.balance,
            jumped.moved,
            jumped.balance,
            ring.moved,
            ring.balance,
            s_to.interval_count()
        );
    }
    println!("(jump consistent hash can only add or remove the highest bucket; the ring uses 256 points per partition)");
}

criterion_group!(benches, lookup);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    comparison();
}
