//! A seeded simulation of the vote exchange (ARCHITECTURE.md, "Transaction outcomes") on the
//! pure `Ballot`: partitions of replicas apply one log of transactions over toy documents (a
//! balance and a version), each transaction conditional on its payers' balances. A replica at a
//! transaction votes on the documents it holds and asks the other partitions; answers (the
//! outcome a replica recorded, or its votes while it waits at that ts) travel with random delays,
//! drops and duplicates; replicas crash (losing their ballots and inboxes, keeping what they
//! applied and recorded) and come back. Every replica must record the same decision for every
//! transaction, equal to the one a single node holding everything would make, and the replicas
//! of a partition must end equal. A failure prints the seed: `CAUSEWAY_VOTES_SEED=<seed>`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use causeway_core::{Ballot, Decision, Vote};
use common::Rng;

const DOCS: u64 = 8;
const PARTITIONS: u64 = 3;
const REPLICAS: usize = 2;
const TXS: u64 = 60;
const MAX_STEPS: u64 = 200_000;

/// A transfer of `amount` from `from` to `to`, conditional on `from` holding at least `amount`
/// (and, sometimes, on a third document existing).
#[derive(Debug, Clone)]
struct Tx {
    from: u64,
    to: u64,
    amount: i64,
    must_exist: Option<u64>,
}

impl Tx {
    fn docs(&self) -> BTreeSet<u64> {
        [self.from, self.to]
            .into_iter()
            .chain(self.must_exist)
            .collect()
    }
}

/// A failure: (document, reason).
type Failure = (u64, &'static str);

#[derive(Debug, Clone, Default, PartialEq)]
struct Doc {
    balance: i64,
    version: u64,
    exists: bool,
}

fn partition(doc: u64) -> u64 {
    doc % PARTITIONS
}

/// `doc`'s vote on `tx`, on its state just before it.
fn vote(tx: &Tx, doc: u64, state: &Doc) -> Vote<Failure> {
    let mut failures = Vec::new();
    if doc == tx.from && state.balance < tx.amount {
        failures.push((doc, "balance"));
    }
    if tx.must_exist == Some(doc) && !state.exists {
        failures.push((doc, "exists"));
    }
    Vote {
        failures,
        duplicate_of: None,
    }
}

fn apply(tx: &Tx, ts: u64, docs: &mut BTreeMap<u64, Doc>, held: impl Fn(u64) -> bool) {
    for (doc, delta) in [(tx.from, -tx.amount), (tx.to, tx.amount)] {
        if held(doc) {
            let d = docs.entry(doc).or_default();
            d.balance += delta;
            d.version = ts;
            d.exists = true;
        }
    }
}

struct Replica {
    partition: u64,
    /// Durable: the applied position, the documents, the recorded decisions.
    applied: u64,
    docs: BTreeMap<u64, Doc>,
    decided: BTreeMap<u64, Decision<Failure>>,
    /// Lost on a crash.
    ballot: Option<(u64, Ballot<u64, Failure>)>,
    down: bool,
}

impl Replica {
    fn holds(&self, doc: u64) -> bool {
        partition(doc) == self.partition
    }

    /// Applies `tx` at `ts` as decided, durably.
    fn decide(&mut self, tx: &Tx, ts: u64, decision: Decision<Failure>) {
        if decision.applies() {
            let mine = self.partition;
            apply(tx, ts, &mut self.docs, |doc| partition(doc) == mine);
        }
        self.decided.insert(ts, decision);
        self.applied = ts;
        self.ballot = None;
    }

    /// Its answer to "what do you know of ts": its recorded decision, or its votes while it
    /// waits at ts.
    fn answer(&self, ts: u64, log: &[Tx]) -> Option<Answer> {
        if let Some(d) = self.decided.get(&ts) {
            return Some(Answer::Decided(d.clone()));
        }
        let (at, _) = self.ballot.as_ref()?;
        (*at == ts).then(|| {
            let tx = &log[(ts - 1) as usize];
            Answer::Votes(
                tx.docs()
                    .into_iter()
                    .filter(|d| self.holds(*d))
                    .map(|d| {
                        (
                            d,
                            vote(tx, d, &self.docs.get(&d).cloned().unwrap_or_default()),
                        )
                    })
                    .collect(),
            )
        })
    }
}

#[derive(Debug, Clone)]
enum Answer {
    Decided(Decision<Failure>),
    Votes(Vec<(u64, Vote<Failure>)>),
}

/// (deliver at step, to replica, ts, answer)
type Message = (u64, usize, u64, Answer);

fn run(seed: u64) {
    let mut rng = Rng(seed);
    let log: Vec<Tx> = (0..TXS)
        .map(|_| {
            let from = rng.below(DOCS);
            let to = (from + 1 + rng.below(DOCS - 1)) % DOCS;
            Tx {
                from,
                to,
                amount: rng.below(40) as i64,
                must_exist: rng.chance(200).then(|| rng.below(DOCS)),
            }
        })
        .collect();
    // The reference: one node holding everything, deciding in order.
    let mut reference = BTreeMap::new();
    let mut all: BTreeMap<u64, Doc> = (0..DOCS)
        .filter(|d| d % 2 == 0)
        .map(|d| {
            (
                d,
                Doc {
                    balance: 50,
                    version: 0,
                    exists: true,
                },
            )
        })
        .collect();
    for (i, tx) in log.iter().enumerate() {
        let ts = i as u64 + 1;
        let mut ballot = Ballot::new(tx.docs());
        for d in tx.docs() {
            ballot
                .record(&d, vote(tx, d, &all.get(&d).cloned().unwrap_or_default()))
                .unwrap();
        }
        let decision = ballot.decision().expect("every vote is in");
        if decision.applies() {
            apply(tx, ts, &mut all, |_| true);
        }
        reference.insert(ts, decision);
    }
    let mut replicas: Vec<Replica> = (0..PARTITIONS)
        .flat_map(|p| (0..REPLICAS).map(move |_| p))
        .map(|p| Replica {
            partition: p,
            applied: 0,
            docs: (0..DOCS)
                .filter(|d| d % 2 == 0 && partition(*d) == p)
                .map(|d| {
                    (
                        d,
                        Doc {
                            balance: 50,
                            version: 0,
                            exists: true,
                        },
                    )
                })
                .collect(),
            decided: BTreeMap::new(),
            ballot: None,
            down: false,
        })
        .collect();
    let mut inbox: Vec<Message> = Vec::new();
    for step in 0..MAX_STEPS {
        if replicas.iter().all(|r| r.applied == TXS) {
            break;
        }
        let r = rng.below(replicas.len() as u64) as usize;
        // Crashes and restarts.
        if rng.chance(5) {
            replicas[r].down = !replicas[r].down;
            replicas[r].ballot = None;
            inbox.retain(|(_, to, _, _)| *to != r);
            continue;
        }
        // Deliver what is due to r (or drop it).
        let due: Vec<Message> = inbox
            .iter()
            .filter(|(at, to, _, _)| *to == r && *at <= step)
            .cloned()
            .collect();
        inbox.retain(|(at, to, _, _)| !(*to == r && *at <= step));
        let replica = &mut replicas[r];
        if replica.down {
            continue;
        }
        for (_, _, ts, answer) in due {
            if rng.chance(100) {
                continue;
            }
            let Some((at, ballot)) = replica.ballot.as_mut() else {
                continue;
            };
            if *at != ts {
                continue;
            }
            match answer {
                Answer::Decided(d) => {
                    assert!(
                        ballot.agrees_with(&d),
                        "seed {seed}: a decision against a vote"
                    );
                    replica.decide(&log[(ts - 1) as usize], ts, d);
                }
                Answer::Votes(votes) => {
                    for (doc, v) in votes {
                        ballot.record(&doc, v).expect("votes agree");
                    }
                }
            }
        }
        // Step: take the next ts, vote, decide if it can, else ask.
        let replica = &mut replicas[r];
        if replica.applied == TXS {
            continue;
        }
        let ts = replica.applied + 1;
        let tx = &log[(ts - 1) as usize];
        if replica.ballot.is_none() {
            let mut ballot = Ballot::new(tx.docs());
            for d in tx.docs().into_iter().filter(|d| replica.holds(*d)) {
                let state = replica.docs.get(&d).cloned().unwrap_or_default();
                ballot.record(&d, vote(tx, d, &state)).unwrap();
            }
            replica.ballot = Some((ts, ballot));
        }
        let decision = replica.ballot.as_ref().and_then(|(_, b)| b.decision());
        if let Some(d) = decision {
            replica.decide(tx, ts, d);
            continue;
        }
        // Ask every replica of the partitions whose votes are missing.
        let missing: BTreeSet<u64> = replica
            .ballot
            .as_ref()
            .map(|(_, b)| b.missing().map(|d| partition(*d)).collect())
            .unwrap_or_default();
        for (o, other) in replicas.iter().enumerate() {
            if o == r || !missing.contains(&other.partition) || other.down {
                continue;
            }
            if let Some(answer) = other.answer(ts, &log) {
                for _ in 0..=rng.below(2) {
                    inbox.push((step + 1 + rng.below(20), r, ts, answer.clone()));
                }
            }
        }
    }
    for (i, replica) in replicas.iter().enumerate() {
        assert_eq!(
            replica.applied, TXS,
            "seed {seed}: replica {i} did not finish"
        );
        for (ts, decision) in &replica.decided {
            assert_eq!(
                decision, &reference[ts],
                "seed {seed}: replica {i} at ts {ts}"
            );
        }
        let expected: BTreeMap<u64, Doc> = all
            .iter()
            .filter(|(d, _)| replica.holds(**d))
            .map(|(d, doc)| (*d, doc.clone()))
            .collect();
        assert_eq!(
            replica.docs, expected,
            "seed {seed}: replica {i}'s documents"
        );
    }
}

#[test]
fn every_replica_decides_what_one_node_would() {
    if let Ok(seed) = std::env::var("CAUSEWAY_VOTES_SEED") {
        run(seed.parse().expect("a seed"));
        return;
    }
    for seed in 0..300 {
        run(seed);
    }
}
