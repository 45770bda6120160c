//! A seeded simulation of admission control (`core::admission`): a cluster that applies at a
//! capacity it does not announce (jittered every millisecond), a UST that trails the applied
//! records by a gossip delay, and an api-server that notes the log end at each of its appends,
//! samples the UST at an interval and admits an open-loop load through its `Ratekeeper`.
//!
//! Each seed offers twice the capacity for 8 s, then half of it for 6 s, and checks:
//! - the visibility lag of every admitted write (from its append until the UST covers it) stays
//!   within the bound, plus the delays the samples cannot see past (gossip and sampling), plus a
//!   margin for the controller's overshoot;
//! - the cluster is not starved: the admitted rate under overload is at least 70 % of capacity;
//! - the excess is refused, and once the load drops (after a recovery of two bounds) nothing is
//!   refused and the lag is short again.
//!
//! The same load with admission disabled must break the lag bound (so the checks can fail).
//! A failure prints the seed: `CAUSEWAY_ADMISSION_SEED=<seed>`.

mod common;

use std::collections::VecDeque;

use causeway_core::admission::{AdmissionOptions, Admit, Ratekeeper, Sample};
use common::Rng;

const SEEDS: u64 = 60;
const OVERLOAD_MS: u64 = 8_000;
const UNDERLOAD_MS: u64 = 6_000;
const MAX_LAG_MS: u64 = 300;

struct Run {
    /// Lags of writes appended during the overload, sorted.
    overload_lags: Vec<u64>,
    /// Lags of writes appended after the load dropped and the recovery passed, sorted.
    recovered_lags: Vec<u64>,
    admitted_overload: u64,
    refused_overload: u64,
    refused_recovered: u64,
    capacity: u64,
}

fn p99(sorted: &[u64]) -> u64 {
    sorted
        .get(sorted.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0)
}

/// Arrivals in one ms at `per_s` on average (whole part, plus one with the fraction's chance).
fn arrivals(rng: &mut Rng, per_s: u64) -> u64 {
    let whole = per_s / 1000;
    whole + u64::from(rng.chance(per_s % 1000))
}

fn simulate(seed: u64, enabled: bool) -> Run {
    let mut rng = Rng(seed);
    let capacity = 500 + rng.below(4500);
    let gossip_ms = 5 + rng.below(25);
    let sample_every_ms = 5 + rng.below(20);
    let mut keeper = Ratekeeper::new(AdmissionOptions {
        enabled,
        max_lag_ms: MAX_LAG_MS,
        ..AdmissionOptions::default()
    });
    // Append times of the records not yet applied, and of those applied but not yet visible
    // (with the time they applied).
    let mut unapplied: VecDeque<u64> = VecDeque::new();
    let mut unseen: VecDeque<(u64, u64)> = VecDeque::new();
    // Writes admitted with a wait: the time they append.
    let mut queued: VecDeque<u64> = VecDeque::new();
    let (mut log_len, mut visible) = (0u64, 0u64);
    let mut apply_credit = 0u64; // records × 1000
    let mut run = Run {
        overload_lags: Vec::new(),
        recovered_lags: Vec::new(),
        admitted_overload: 0,
        refused_overload: 0,
        refused_recovered: 0,
        capacity,
    };
    let recovered_from = OVERLOAD_MS + 2 * MAX_LAG_MS;
    let end = OVERLOAD_MS + UNDERLOAD_MS;
    for now in 0..end + 5_000 {
        // Queued writes whose turn came append.
        while queued.front().is_some_and(|&at| at <= now) {
            queued.pop_front();
            unapplied.push_back(now);
            log_len += 1;
            keeper.log_end(now, log_len + 1);
        }
        // The offered load.
        if now < end {
            let offered = if now < OVERLOAD_MS {
                2 * capacity
            } else {
                capacity / 2
            };
            for _ in 0..arrivals(&mut rng, offered) {
                let decision = keeper.admit(now);
                let overload = now < OVERLOAD_MS;
                match decision {
                    Admit::Now => {
                        unapplied.push_back(now);
                        log_len += 1;
                        keeper.log_end(now, log_len + 1);
                    }
                    Admit::After { wait_ms } => {
                        assert!(wait_ms <= keeper.options().max_queue_ms);
                        queued.push_back(now + wait_ms);
                    }
                    Admit::Refused { retry_after_ms } => {
                        assert!(retry_after_ms > 0);
                        if overload {
                            run.refused_overload += 1;
                        } else if now >= recovered_from {
                            run.refused_recovered += 1;
                        }
                        continue;
                    }
                }
                if overload {
                    run.admitted_overload += 1;
                }
            }
        }
        // The cluster applies at its capacity, jittered.
        apply_credit += capacity * (500 + rng.below(1001)) / 1000;
        while apply_credit >= 1000 {
            let Some(appended) = unapplied.pop_front() else {
                apply_credit = 0;
                break;
            };
            apply_credit -= 1000;
            unseen.push_back((appended, now));
        }
        // The UST covers what applied a gossip delay ago.
        while unseen
            .front()
            .is_some_and(|&(_, applied)| applied + gossip_ms <= now)
        {
            let (appended, _) = unseen.pop_front().expect("front");
            visible += 1;
            let lag = now - appended;
            if appended < OVERLOAD_MS {
                run.overload_lags.push(lag);
            } else if appended >= recovered_from {
                run.recovered_lags.push(lag);
            }
        }
        if now % sample_every_ms == 0 {
            keeper.observe(Sample {
                at_ms: now,
                log_next: log_len + 1,
                ust: visible,
            });
        }
    }
    run.overload_lags.sort_unstable();
    run.recovered_lags.sort_unstable();
    run
}

fn seeds() -> Vec<u64> {
    match std::env::var("CAUSEWAY_ADMISSION_SEED") {
        Ok(s) => vec![s.parse().expect("a u64 seed")],
        Err(_) => (1..=SEEDS).collect(),
    }
}

#[test]
fn admission_keeps_the_lag_bounded_and_sheds_only_the_excess() {
    let mut worst_p99 = 0;
    for seed in seeds() {
        let run = simulate(seed, true);
        let lag_p99 = p99(&run.overload_lags);
        // The samples see a record only once it is in the log and the UST only a gossip delay
        // late: the controller can only answer to what it sees.
        let bound = MAX_LAG_MS + 30 + 25 + MAX_LAG_MS / 2;
        assert!(
            lag_p99 <= bound,
            "seed {seed}: lag p99 {lag_p99} ms over {bound} (capacity {}/s)",
            run.capacity
        );
        let admitted_per_s = run.admitted_overload * 1000 / OVERLOAD_MS;
        assert!(
            admitted_per_s * 10 >= run.capacity * 7,
            "seed {seed}: admitted {admitted_per_s}/s of a capacity of {}/s",
            run.capacity
        );
        assert!(
            run.refused_overload > 0,
            "seed {seed}: twice the capacity and nothing refused"
        );
        assert_eq!(
            run.refused_recovered, 0,
            "seed {seed}: refusals after the load dropped"
        );
        let recovered_p99 = p99(&run.recovered_lags);
        assert!(
            recovered_p99 <= MAX_LAG_MS / 2,
            "seed {seed}: lag p99 {recovered_p99} ms after the load dropped"
        );
        worst_p99 = worst_p99.max(lag_p99);
    }
    println!("admission: worst overload lag p99 {worst_p99} ms (bound {MAX_LAG_MS} ms)");
}

#[test]
fn without_admission_the_same_load_breaks_the_bound() {
    let run = simulate(7, false);
    assert_eq!(run.refused_overload, 0);
    let lag_p99 = p99(&run.overload_lags);
    assert!(
        lag_p99 > 3 * MAX_LAG_MS,
        "without admission the lag p99 is only {lag_p99} ms"
    );
}
