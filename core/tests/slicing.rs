//! Property tests of Random Slicing with Cut-Shift: long random sequences of add, remove and
//! reweight operations keep the slicing exact, minimal in movement, and small.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use causeway_core::slicing::{Interval, Slicing, KEYSPACE};
use causeway_core::{KeyHash, PartitionId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add { count: u32, weight: u32 },
    Remove { pick: usize },
    Reweight { pick: usize, weight: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u32..4, 1u32..8).prop_map(|(count, weight)| Op::Add { count, weight }),
        any::<usize>().prop_map(|pick| Op::Remove { pick }),
        (any::<usize>(), 1u32..8).prop_map(|(pick, weight)| Op::Reweight { pick, weight }),
    ]
}

/// The worst interval count seen for any partition count, over every case of the run.
static WORST: [AtomicUsize; 65] = [const { AtomicUsize::new(0) }; 65];

/// The owner of `hash` by a linear walk, to check the binary search against.
fn owner_by_scan(s: &Slicing, hash: u64) -> PartitionId {
    let owners: Vec<(Interval, PartitionId)> = s
        .intervals()
        .filter(|(i, _)| i.contains(KeyHash(hash)))
        .collect();
    assert_eq!(owners.len(), 1, "hash {hash:x} has {} owners", owners.len());
    owners[0].1
}

fn apply(s: &Slicing, op: &Op, next_id: &mut u32) -> Option<Slicing> {
    let parts: Vec<PartitionId> = s.partitions().collect();
    let (next, movement) = match *op {
        Op::Add { count, weight } => {
            if parts.len() + count as usize > 64 {
                return None;
            }
            let added: BTreeMap<_, _> = (0..count)
                .map(|i| (PartitionId(*next_id + i), weight))
                .collect();
            *next_id += count;
            s.add(&added).expect("add")
        }
        Op::Remove { pick } => {
            if parts.len() < 2 {
                return None;
            }
            s.remove(&[parts[pick % parts.len()]]).expect("remove")
        }
        Op::Reweight { pick, weight } => {
            let p = parts[pick % parts.len()];
            s.reweight(&[(p, weight)].into()).expect("reweight")
        }
    };
    // Exactness and cover (every share equals its exact target, one owner per key).
    next.validate().expect("valid after every operation");
    // Minimal movement: what moved is exactly Σ max(0, old − new), and the diff agrees.
    let (before, after) = (s.shares(), next.shares());
    let share = |m: &BTreeMap<PartitionId, u128>, p| m.get(&p).copied().unwrap_or(0);
    let minimum: u128 = before
        .keys()
        .map(|&p| share(&before, p).saturating_sub(share(&after, p)))
        .sum();
    assert_eq!(movement.moved_keys, minimum);
    let diffed: u128 = s.diff(&next).iter().map(|d| d.interval.len()).sum();
    assert_eq!(diffed, minimum);
    // Fragmentation is bounded per operation: at most one new interval for each partition whose
    // share changed (a shrinking partition cuts at most one interval, a growing one takes at most
    // one piece of a gap; everything else moves whole intervals).
    let changed = s
        .partitions()
        .chain(next.partitions())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|&p| share(&before, p) != share(&after, p))
        .count();
    assert!(
        next.interval_count() <= s.interval_count() + changed,
        "{} -> {} intervals with {changed} partitions changed",
        s.interval_count(),
        next.interval_count()
    );
    Some(next)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn cut_shift_stays_exact_minimal_and_small(
        initial in 1u32..16,
        ops in prop::collection::vec(op(), 100..160),
        probes in prop::collection::vec(any::<u64>(), 16),
    ) {
        let mut s = Slicing::uniform(initial).unwrap();
        let mut next_id = initial;
        for op in &ops {
            if let Some(next) = apply(&s, op, &mut next_id) {
                s = next;
            }
            let p = s.weights().len();
            WORST[p].fetch_max(s.interval_count(), Ordering::Relaxed);
            for &h in probes.iter().chain([0, u64::MAX].iter()) {
                prop_assert_eq!(s.partition_of(KeyHash(h)), owner_by_scan(&s, h));
            }
            // Every share equals its weight share to within one key.
            let total: u128 = s.weights().values().map(|&w| u128::from(w)).sum();
            let shares = s.shares();
            for (&p, &w) in s.weights() {
                let exact_floor = KEYSPACE * u128::from(w) / total;
                let share = shares[&p];
                prop_assert!(share == exact_floor || share == exact_floor + 1);
            }
        }
    }
}

/// Prints the worst interval counts seen (run with `--nocapture` to read them); they are recorded
/// in BENCHMARKS.md. Runs after the property test in the same binary only by chance, so it also
/// runs its own fixed workload.
#[test]
fn report_interval_counts() {
    let mut s = Slicing::uniform(1).unwrap();
    let mut next_id = 1;
    // Grow one partition at a time to 64, reweight, then shrink back to 1.
    for _ in 0..63 {
        s = apply(
            &s,
            &Op::Add {
                count: 1,
                weight: 1,
            },
            &mut next_id,
        )
        .unwrap();
        WORST[s.weights().len()].fetch_max(s.interval_count(), Ordering::Relaxed);
    }
    for pick in 0..64 {
        s = apply(
            &s,
            &Op::Reweight {
                pick,
                weight: 1 + (pick as u32 % 5),
            },
            &mut next_id,
        )
        .unwrap();
    }
    while s.weights().len() > 1 {
        s = apply(&s, &Op::Remove { pick: 7 }, &mut next_id).unwrap();
        WORST[s.weights().len()].fetch_max(s.interval_count(), Ordering::Relaxed);
    }
    assert_eq!(s.interval_count(), 1);
    let table: Vec<String> = [1, 2, 4, 8, 16, 32, 64]
        .iter()
        .map(|&p| format!("P={p}: {}", WORST[p].load(Ordering::Relaxed)))
        .collect();
    println!("worst interval count seen: {}", table.join(", "));
}
