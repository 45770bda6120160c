//! The checkers of a [`History`]: pure functions from what the clients saw to the anomalies in
//! it, each class reported with its count and its smallest example.
//!
//! - **Snapshot isolation of reads**: every key a read returns is the state at its read ts,
//!   rebuilt from the acknowledged writes (the log orders them all, so it is exact): the latest
//!   acknowledged write at or below the read ts, or a write whose outcome is unknown. Its
//!   failures are named by what they show:
//!   - a value no write wrote: a **phantom** write;
//!   - a value of a refused write: an **aborted read**;
//!   - in a final read, an older value than an acknowledged write (or none): a **lost write**
//!     (with unique inserts, a final read of the set must hold every acknowledged one);
//!   - one transaction's value on one key and an older value on another of its keys in the same
//!     read: a **partial transaction**;
//!   - any other: a **snapshot** violation (a stale or a future value).
//! - **Bank** (each bank is the accounts of one collection): a read of every account of a bank
//!   whose total is not the bank's, a balance below zero in a bank whose every transfer is
//!   conditional, and a balance that is not the one its read ts gives (the
//!   transfers acknowledged at or below it, each unknown one counted or not).
//! - **Sessions** (per client, in its order): a read carrying `Causeway-After` reads at or after
//!   every ts the client saw before (**read-your-writes** for its writes, **monotonic reads**
//!   for its reads); its acknowledged writes commit in order (**monotonic writes**), each after
//!   every read before it (**writes-follow-reads**).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use super::{History, Key, Op, OpId, OpKind, OpResult};

/// The kinds of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    BankTotal,
    NegativeBalance,
    BankBalance,
    LostWrite,
    PhantomWrite,
    AbortedRead,
    PartialTransaction,
    Snapshot,
    ReadYourWrites,
    MonotonicReads,
    MonotonicWrites,
    WritesFollowReads,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::BankTotal => "bank total",
            Class::NegativeBalance => "negative balance",
            Class::BankBalance => "bank balance not the state at its read ts",
            Class::LostWrite => "lost write",
            Class::PhantomWrite => "phantom write",
            Class::AbortedRead => "aborted read",
            Class::PartialTransaction => "partial transaction",
            Class::Snapshot => "read not the state at its read ts",
            Class::ReadYourWrites => "read-your-writes",
            Class::MonotonicReads => "monotonic reads",
            Class::MonotonicWrites => "monotonic writes",
            Class::WritesFollowReads => "writes-follow-reads",
        })
    }
}

/// One anomaly: its class, the operations that show it, and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub class: Class,
    pub ops: Vec<OpId>,
    pub explanation: String,
}

/// What a history shows: per class, how many anomalies and the smallest one (fewest
/// operations, then earliest).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub ops: usize,
    /// Operations by kind: how many ended ok, refused and unknown.
    pub by_kind: BTreeMap<&'static str, [usize; 3]>,
    pub anomalies: BTreeMap<Class, (usize, Anomaly)>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.anomalies.is_empty()
    }

    /// How many anomalies of `class`.
    pub fn count(&self, class: Class) -> usize {
        self.anomalies.get(&class).map_or(0, |(n, _)| *n)
    }

    fn add(&mut self, anomaly: Anomaly) {
        let entry = self
            .anomalies
            .entry(anomaly.class)
            .or_insert((0, anomaly.clone()));
        entry.0 += 1;
        if (anomaly.ops.len(), &anomaly.ops) < (entry.1.ops.len(), &entry.1.ops) {
            entry.1 = anomaly;
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(kind, [ok, fail, unknown])| {
                format!("{kind} {ok} ok, {fail} refused, {unknown} unknown")
            })
            .collect();
        if self.is_clean() {
            return write!(
                f,
                "{} operations ({}), no anomaly",
                self.ops,
                kinds.join("; ")
            );
        }
        writeln!(f, "{} operations ({}):", self.ops, kinds.join("; "))?;
        for (class, (n, smallest)) in &self.anomalies {
            writeln!(
                f,
                "  {class}: {n}; smallest, ops {:?}: {}",
                smallest.ops, smallest.explanation
            )?;
        }
        Ok(())
    }
}

/// Judges `history` for every anomaly class.
pub fn check(history: &History) -> Report {
    let mut report = Report {
        ops: history.ops.len(),
        ..Report::default()
    };
    for op in &history.ops {
        let kind = match &op.kind {
            OpKind::Write { .. } => "write",
            OpKind::Transfer {
                conditional: true, ..
            } => "conditional transfer",
            OpKind::Transfer { .. } => "transfer",
            OpKind::Read { .. } => "read",
            OpKind::BankRead { .. } => "bank read",
        };
        let counts = report.by_kind.entry(kind).or_default();
        counts[match op.result {
            OpResult::Ok => 0,
            OpResult::Fail => 1,
            OpResult::Unknown => 2,
        }] += 1;
    }
    let writes = Writes::index(history);
    let banks = Banks::index(history);
    for (id, op) in history.ops.iter().enumerate() {
        if op.result != OpResult::Ok {
            continue;
        }
        match &op.kind {
            OpKind::Read {
                read_ts: Some(read_ts),
                results,
                is_final,
                ..
            } => {
                for anomaly in check_read(history, &writes, id, *read_ts, results, *is_final) {
                    report.add(anomaly);
                }
            }
            OpKind::BankRead {
                read_ts: Some(read_ts),
                balances,
            } => {
                for anomaly in check_bank_read(history, &banks, id, *read_ts, balances) {
                    report.add(anomaly);
                }
            }
            _ => {}
        }
    }
    for anomaly in check_sessions(history) {
        report.add(anomaly);
    }
    report
}

/// The register writes of a history, indexed.
struct Writes<'h> {
    /// Who wrote each (key, value): the value as JSON text.
    by_value: HashMap<(&'h str, String), OpId>,
    /// Each key's acknowledged writes, by commit ts: (ts, op, value).
    acknowledged: HashMap<&'h str, BTreeMap<u64, (OpId, Option<&'h Value>)>>,
    /// Keys that a write of unknown outcome deletes: a read may find nothing there whatever
    /// was acknowledged.
    unknown_deletes: HashSet<&'h str>,
}

impl<'h> Writes<'h> {
    fn index(history: &'h History) -> Writes<'h> {
        let mut writes = Writes {
            by_value: HashMap::new(),
            acknowledged: HashMap::new(),
            unknown_deletes: HashSet::new(),
        };
        for (id, op) in history.ops.iter().enumerate() {
            let OpKind::Write {
                writes: items,
                commit_ts,
            } = &op.kind
            else {
                continue;
            };
            for (key, value) in items {
                match value {
                    Some(value) => {
                        writes.by_value.insert((key, value.to_string()), id);
                    }
                    None if op.result == OpResult::Unknown => {
                        writes.unknown_deletes.insert(key);
                    }
                    None => {}
                }
                if let (OpResult::Ok, Some(ts)) = (op.result, commit_ts) {
                    writes
                        .acknowledged
                        .entry(key)
                        .or_default()
                        .insert(*ts, (id, value.as_ref()));
                }
            }
        }
        writes
    }

    /// The latest acknowledged write of `key` at or below `ts`.
    fn latest(&self, key: &str, ts: u64) -> Option<(u64, OpId, Option<&'h Value>)> {
        let (&at, &(op, value)) = self.acknowledged.get(key)?.range(..=ts).next_back()?;
        Some((at, op, value))
    }
}

/// What one key of one read shows.
enum Seen {
    /// Nothing: no document.
    Nothing,
    /// The value of write `op`, committed at `ts` if known.
    Write { op: OpId, ts: Option<u64> },
    /// A value no write wrote.
    Unwritten,
}

fn seen(history: &History, writes: &Writes<'_>, key: &str, value: &Option<Value>) -> Seen {
    let Some(value) = value else {
        return Seen::Nothing;
    };
    match writes.by_value.get(&(key, value.to_string())) {
        Some(&op) => Seen::Write {
            op,
            ts: (history.ops[op].result == OpResult::Ok)
                .then(|| history.ops[op].commit_ts())
                .flatten(),
        },
        None => Seen::Unwritten,
    }
}

fn check_read(
    history: &History,
    writes: &Writes<'_>,
    read: OpId,
    read_ts: u64,
    results: &[(Key, Option<Value>)],
    is_final: bool,
) -> Vec<Anomaly> {
    let mut found = Vec::new();
    let mut partial_keys = Vec::new();
    let seen: Vec<Seen> = results
        .iter()
        .map(|(key, value)| seen(history, writes, key, value))
        .collect();

    // A transaction seen on one key and something older than it on another of its keys.
    for (i, (key_a, _)) in results.iter().enumerate() {
        let Seen::Write { op: tx, ts: tx_ts } = seen[i] else {
            continue;
        };
        if tx_ts.is_some_and(|ts| ts > read_ts) {
            continue; // a future value: a snapshot violation, below
        }
        let OpKind::Write { writes: items, .. } = &history.ops[tx].kind else {
            continue;
        };
        for (j, (key_b, _)) in results.iter().enumerate() {
            if i == j || !items.iter().any(|(k, _)| k == key_b) {
                continue;
            }
            let older = match seen[j] {
                Seen::Write { op, .. } if op == tx => false,
                // Known older: committed before, or finished before the transaction began.
                Seen::Write { op, ts } => {
                    matches!((ts, tx_ts), (Some(a), Some(b)) if a < b)
                        || history.ops[op].complete < history.ops[tx].invoke
                }
                // Nothing where it wrote a value, and no later write that deletes it.
                Seen::Nothing => {
                    let wrote_a_value = items.iter().any(|(k, v)| k == key_b && v.is_some());
                    wrote_a_value
                        && !writes.unknown_deletes.contains(key_b.as_str())
                        && tx_ts.is_some_and(|tx_ts| {
                            writes
                                .latest(key_b, read_ts)
                                .is_some_and(|(ts, _, _)| ts <= tx_ts)
                        })
                }
                Seen::Unwritten => false,
            };
            if older {
                partial_keys.push(j);
                found.push(Anomaly {
                    class: Class::PartialTransaction,
                    ops: vec![tx, read],
                    explanation: format!(
                        "read {read} at ts {read_ts} sees transaction {tx} on {key_a} but not on \
                         {key_b}"
                    ),
                });
            }
        }
    }

    for (j, (key, value)) in results.iter().enumerate() {
        if partial_keys.contains(&j) {
            continue;
        }
        let expected = writes.latest(key, read_ts);
        let anomaly = |class, ops: Vec<OpId>, what: String| Anomaly {
            class,
            ops,
            explanation: format!("read {read} at ts {read_ts} of {key}: {what}"),
        };
        let stale = if is_final {
            Class::LostWrite
        } else {
            Class::Snapshot
        };
        match seen[j] {
            Seen::Unwritten => found.push(anomaly(
                Class::PhantomWrite,
                vec![read],
                format!("{} was never written", value.as_ref().expect("a value")),
            )),
            Seen::Write { op, .. } if history.ops[op].result == OpResult::Fail => {
                found.push(anomaly(
                    Class::AbortedRead,
                    vec![op, read],
                    format!("the value of write {op}, which was refused"),
                ))
            }
            Seen::Write { op, ts: Some(ts) } if ts > read_ts => found.push(anomaly(
                Class::Snapshot,
                vec![op, read],
                format!("the value of write {op}, committed later at ts {ts}"),
            )),
            Seen::Write { op, ts: Some(ts) } => {
                if let Some((expected_ts, expected_op, _)) = expected.filter(|e| e.0 > ts) {
                    found.push(anomaly(
                        stale,
                        vec![expected_op, op, read],
                        format!(
                            "the value of write {op} (ts {ts}), not of write {expected_op} (ts \
                             {expected_ts})"
                        ),
                    ));
                }
            }
            // A write whose outcome is unknown took effect, at some ts at or below the read's.
            Seen::Write { ts: None, .. } => {}
            Seen::Nothing if writes.unknown_deletes.contains(key.as_str()) => {}
            Seen::Nothing => {
                if let Some((expected_ts, expected_op, Some(_))) = expected {
                    found.push(anomaly(
                        stale,
                        vec![expected_op, read],
                        format!(
                            "no document, not the value of write {expected_op} (ts {expected_ts})"
                        ),
                    ));
                }
            }
        }
    }
    found
}

/// The bank of a history, indexed: each bank is the accounts of one collection (a workload may
/// run several, say one with conditional transfers and one without).
struct Banks<'h> {
    /// Each account's acknowledged transfers by commit ts, with the running balance after each.
    acknowledged: HashMap<&'h str, Vec<(u64, i64)>>,
    /// Each account's transfers of unknown outcome by when they were sent, with the running
    /// sums of their debits and credits after each.
    unknown: HashMap<&'h str, Vec<(std::time::Duration, i64, i64)>>,
    /// Collections with an unconditional transfer (a balance there may go below zero).
    unconditional: HashSet<&'h str>,
    /// Each bank's accounts and its total.
    banks: HashMap<&'h str, (usize, i64)>,
}

/// The collection of a key, `collection/id`.
fn collection(key: &str) -> &str {
    key.split_once('/').map_or(key, |(c, _)| c)
}

impl<'h> Banks<'h> {
    fn index(history: &'h History) -> Banks<'h> {
        let mut banks = Banks {
            acknowledged: HashMap::new(),
            unknown: HashMap::new(),
            unconditional: HashSet::new(),
            banks: HashMap::new(),
        };
        for (account, balance) in &history.bank {
            let bank = banks.banks.entry(collection(account)).or_default();
            bank.0 += 1;
            bank.1 += balance;
        }
        let mut effects: HashMap<&str, Vec<(u64, i64)>> = HashMap::new();
        for op in &history.ops {
            let OpKind::Transfer {
                from,
                to,
                amount,
                conditional,
                commit_ts,
            } = &op.kind
            else {
                continue;
            };
            if !conditional {
                banks.unconditional.insert(collection(from));
            }
            for (account, effect) in [(from, -amount), (to, *amount)] {
                match (op.result, commit_ts) {
                    (OpResult::Ok, Some(ts)) => {
                        effects.entry(account).or_default().push((*ts, effect))
                    }
                    (OpResult::Unknown, _) => banks.unknown.entry(account).or_default().push((
                        op.invoke,
                        effect.min(0),
                        effect.max(0),
                    )),
                    _ => {}
                }
            }
        }
        for (account, mut list) in effects {
            list.sort_unstable();
            let mut balance = history.bank.get(account).copied().unwrap_or(0);
            for entry in &mut list {
                balance += entry.1;
                entry.1 = balance;
            }
            banks.acknowledged.insert(account, list);
        }
        for list in banks.unknown.values_mut() {
            list.sort_unstable_by_key(|u| u.0);
            let (mut debits, mut credits) = (0, 0);
            for entry in list.iter_mut() {
                debits += entry.1;
                credits += entry.2;
                (entry.1, entry.2) = (debits, credits);
            }
        }
        banks
    }

    /// The debits and credits of `account`'s transfers of unknown outcome sent before `until`
    /// (a transfer sent after a read completed cannot show in it), and how many.
    fn unknown_before(&self, account: &str, until: std::time::Duration) -> (i64, i64, usize) {
        let Some(list) = self.unknown.get(account) else {
            return (0, 0, 0);
        };
        match list.partition_point(|u| u.0 < until) {
            0 => (0, 0, 0),
            n => (list[n - 1].1, list[n - 1].2, n),
        }
    }

    /// The balance of `account` after the acknowledged transfers at or below `ts`.
    fn acknowledged_at(&self, history: &History, account: &str, ts: u64) -> i64 {
        let start = history.bank.get(account).copied().unwrap_or(0);
        let Some(list) = self.acknowledged.get(account) else {
            return start;
        };
        match list.partition_point(|&(at, _)| at <= ts) {
            0 => start,
            n => list[n - 1].1,
        }
    }
}

fn check_bank_read(
    history: &History,
    banks: &Banks<'_>,
    read: OpId,
    read_ts: u64,
    balances: &[(Key, i64)],
) -> Vec<Anomaly> {
    let mut found = Vec::new();
    // A read of every account of one bank: their total is the bank's.
    if let Some((first, _)) = balances.first() {
        let bank = collection(first);
        let total: i64 = balances.iter().map(|(_, b)| b).sum();
        let one_bank = balances
            .iter()
            .all(|(k, _)| collection(k) == bank && history.bank.contains_key(k));
        if let Some(&(accounts, bank_total)) = banks.banks.get(bank) {
            // Every read of a bank is of all its accounts, which exist from the start.
            if one_bank && balances.len() < accounts {
                found.push(Anomaly {
                    class: Class::BankTotal,
                    ops: vec![read],
                    explanation: format!(
                        "read {read} at ts {read_ts}: {} of the {accounts} accounts of {bank}",
                        balances.len()
                    ),
                });
            } else if one_bank && total != bank_total {
                found.push(Anomaly {
                    class: Class::BankTotal,
                    ops: vec![read],
                    explanation: format!(
                        "read {read} at ts {read_ts}: the accounts of {bank} total {total}, not \
                         {bank_total}"
                    ),
                });
            }
        }
    }
    for (account, balance) in balances {
        if *balance < 0 && !banks.unconditional.contains(collection(account)) {
            found.push(Anomaly {
                class: Class::NegativeBalance,
                ops: vec![read],
                explanation: format!(
                    "read {read} at ts {read_ts}: {account} has {balance} though every transfer \
                     is conditional"
                ),
            });
        }
        // The balance at the read ts: the start, the acknowledged transfers at or below it, and
        // each transfer of unknown outcome either way.
        if !history.bank.contains_key(account) {
            continue;
        }
        let at = banks.acknowledged_at(history, account, read_ts);
        let (debits, credits, unknown) = banks.unknown_before(account, history.ops[read].complete);
        let (low, high) = (at + debits, at + credits);
        if !(low..=high).contains(balance) {
            found.push(Anomaly {
                class: Class::BankBalance,
                ops: vec![read],
                explanation: format!(
                    "read {read} at ts {read_ts}: {account} has {balance}, the transfers give \
                     {low}..={high} ({unknown} of unknown outcome)"
                ),
            });
        }
    }
    found
}

fn check_sessions(history: &History) -> Vec<Anomaly> {
    let mut found = Vec::new();
    let mut sessions: BTreeMap<usize, Vec<(OpId, &Op)>> = BTreeMap::new();
    for (id, op) in history.ops.iter().enumerate() {
        sessions.entry(op.process).or_default().push((id, op));
    }
    for ops in sessions.values_mut() {
        ops.sort_by_key(|(id, op)| (op.invoke, *id));
        // The latest acknowledged write and the latest read so far: (op, ts).
        let mut last_write: Option<(OpId, u64)> = None;
        let mut last_read: Option<(OpId, u64)> = None;
        for &(id, op) in ops.iter() {
            if op.result != OpResult::Ok {
                continue;
            }
            if let Some(ts) = op.commit_ts() {
                if let Some((w, wts)) = last_write.filter(|&(_, wts)| ts <= wts) {
                    found.push(Anomaly {
                        class: Class::MonotonicWrites,
                        ops: vec![w, id],
                        explanation: format!(
                            "write {id} committed at ts {ts}, not after the client's earlier \
                             write {w} at ts {wts}"
                        ),
                    });
                }
                if let Some((r, rts)) = last_read.filter(|&(_, rts)| ts <= rts) {
                    found.push(Anomaly {
                        class: Class::WritesFollowReads,
                        ops: vec![r, id],
                        explanation: format!(
                            "write {id} committed at ts {ts}, not after the client's earlier \
                             read {r} at ts {rts}"
                        ),
                    });
                }
                last_write = Some((id, ts.max(last_write.map_or(0, |w| w.1))));
            }
            let (after, read_ts) = match &op.kind {
                OpKind::Read { after, read_ts, .. } => (*after, *read_ts),
                OpKind::BankRead { read_ts, .. } => (None, *read_ts),
                _ => continue,
            };
            let Some(read_ts) = read_ts else { continue };
            if after.is_some() {
                if let Some((w, wts)) = last_write.filter(|&(_, wts)| read_ts < wts) {
                    found.push(Anomaly {
                        class: Class::ReadYourWrites,
                        ops: vec![w, id],
                        explanation: format!(
                            "read {id} at ts {read_ts} is before the client's write {w} at ts {wts}"
                        ),
                    });
                }
                if let Some((r, rts)) = last_read.filter(|&(_, rts)| read_ts < rts) {
                    found.push(Anomaly {
                        class: Class::MonotonicReads,
                        ops: vec![r, id],
                        explanation: format!(
                            "read {id} at ts {read_ts} is before the client's earlier read {r} \
                             at ts {rts}"
                        ),
                    });
                }
            }
            if last_read.is_none_or(|(_, rts)| read_ts > rts) {
                last_read = Some((id, read_ts));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    /// A hand-made history, one client per op unless said otherwise, each op 10 ms after the
    /// previous one.
    struct Make(History);

    impl Make {
        fn new() -> Make {
            Make(History::default())
        }

        fn op(&mut self, process: usize, result: OpResult, kind: OpKind) -> OpId {
            let at = Duration::from_millis(10 * self.0.ops.len() as u64);
            self.0.push(Op {
                process,
                api: "a".into(),
                invoke: at,
                complete: at + Duration::from_millis(5),
                result,
                kind,
            })
        }

        fn write(&mut self, p: usize, ts: u64, items: &[(&str, Option<Value>)]) -> OpId {
            self.op(
                p,
                OpResult::Ok,
                OpKind::Write {
                    writes: items
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                    commit_ts: Some(ts),
                },
            )
        }

        fn write_with(&mut self, p: usize, result: OpResult, items: &[(&str, Value)]) -> OpId {
            self.op(
                p,
                result,
                OpKind::Write {
                    writes: items
                        .iter()
                        .map(|(k, v)| (k.to_string(), Some(v.clone())))
                        .collect(),
                    commit_ts: None,
                },
            )
        }

        fn read(
            &mut self,
            p: usize,
            after: Option<u64>,
            ts: u64,
            seen: &[(&str, Option<Value>)],
        ) -> OpId {
            self.read_op(p, after, ts, seen, false)
        }

        fn read_op(
            &mut self,
            p: usize,
            after: Option<u64>,
            ts: u64,
            seen: &[(&str, Option<Value>)],
            is_final: bool,
        ) -> OpId {
            self.op(
                p,
                OpResult::Ok,
                OpKind::Read {
                    after,
                    read_ts: Some(ts),
                    results: seen
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                    is_final,
                },
            )
        }

        fn transfer(
            &mut self,
            result: OpResult,
            ts: Option<u64>,
            from: &str,
            to: &str,
            amount: i64,
        ) -> OpId {
            self.op(
                0,
                result,
                OpKind::Transfer {
                    from: from.into(),
                    to: to.into(),
                    amount,
                    conditional: true,
                    commit_ts: ts,
                },
            )
        }

        fn bank_read(&mut self, ts: u64, balances: &[(&str, i64)]) -> OpId {
            self.op(
                1,
                OpResult::Ok,
                OpKind::BankRead {
                    read_ts: Some(ts),
                    balances: balances.iter().map(|(k, b)| (k.to_string(), *b)).collect(),
                },
            )
        }

        /// The report, with exactly `classes` in it.
        fn only(&self, classes: &[Class]) -> Report {
            let report = check(&self.0);
            let found: Vec<Class> = report.anomalies.keys().copied().collect();
            assert_eq!(found, classes, "{report}");
            report
        }
    }

    fn v(n: u32) -> Option<Value> {
        Some(json!({"w": n}))
    }

    #[test]
    fn a_clean_history_has_no_anomaly() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1)), ("b", v(1))]);
        h.write(0, 3, &[("a", v(2))]);
        h.write_with(0, OpResult::Unknown, &[("b", json!({"w": 9}))]);
        h.read(1, None, 2, &[("a", v(1)), ("b", v(1))]);
        h.read(1, Some(2), 3, &[("a", v(2)), ("b", v(1))]);
        h.read(1, Some(3), 4, &[("a", v(2)), ("b", v(9))]);
        h.read_op(1, None, 5, &[("a", v(2)), ("c", None)], true);
        h.0.bank = [("bank/x".to_string(), 10), ("bank/y".to_string(), 10)].into();
        h.transfer(OpResult::Ok, Some(6), "bank/x", "bank/y", 3);
        h.transfer(OpResult::Unknown, None, "bank/y", "bank/x", 1);
        h.transfer(OpResult::Fail, None, "bank/x", "bank/y", 50);
        h.bank_read(7, &[("bank/x", 7), ("bank/y", 13)]);
        h.bank_read(8, &[("bank/x", 8), ("bank/y", 12)]);
        let report = h.only(&[]);
        assert!(report.to_string().contains("no anomaly"));
        let again = History::from_json_lines(&h.0.to_json_lines()).unwrap();
        assert_eq!(again, h.0);
    }

    #[test]
    fn bank_total_and_a_negative_balance() {
        let mut h = Make::new();
        h.0.bank = [("bank/x".to_string(), 10), ("bank/y".to_string(), 10)].into();
        h.transfer(OpResult::Ok, Some(1), "bank/x", "bank/y", 10);
        h.bank_read(2, &[("bank/x", 0), ("bank/y", 20)]);
        h.bank_read(3, &[("bank/x", -1), ("bank/y", 20)]);
        let report = h.only(&[Class::BankTotal, Class::NegativeBalance, Class::BankBalance]);
        assert_eq!(report.count(Class::BankTotal), 1);
        assert_eq!(report.anomalies[&Class::BankTotal].1.ops, vec![2]);
    }

    #[test]
    fn a_bank_read_missing_an_acknowledged_transfer_or_showing_a_refused_one() {
        let mut h = Make::new();
        h.0.bank = [("bank/x".to_string(), 10), ("bank/y".to_string(), 10)].into();
        h.transfer(OpResult::Ok, Some(1), "bank/x", "bank/y", 4);
        h.transfer(OpResult::Fail, None, "bank/y", "bank/x", 2);
        // The total holds, but the balances are those before the acknowledged transfer, then
        // after the refused one.
        h.bank_read(2, &[("bank/x", 10), ("bank/y", 10)]);
        h.bank_read(3, &[("bank/x", 8), ("bank/y", 12)]);
        let report = h.only(&[Class::BankBalance]);
        assert_eq!(report.count(Class::BankBalance), 4);
    }

    #[test]
    fn a_bank_read_missing_an_account_or_showing_a_later_unknown_transfer() {
        let mut h = Make::new();
        h.0.bank = [("bank/x".to_string(), 10), ("bank/y".to_string(), 10)].into();
        let short = h.bank_read(1, &[("bank/x", 10)]);
        // The read completes before the transfer of unknown outcome is even sent.
        let early = h.bank_read(2, &[("bank/x", 7), ("bank/y", 13)]);
        h.transfer(OpResult::Unknown, None, "bank/x", "bank/y", 3);
        let late = h.bank_read(3, &[("bank/x", 7), ("bank/y", 13)]);
        let report = h.only(&[Class::BankTotal, Class::BankBalance]);
        assert_eq!(report.count(Class::BankTotal), 1);
        assert_eq!(report.anomalies[&Class::BankTotal].1.ops, vec![short]);
        assert_eq!(report.count(Class::BankBalance), 2);
        assert_eq!(report.anomalies[&Class::BankBalance].1.ops, vec![early]);
        assert!(late > early);
    }

    #[test]
    fn a_negative_balance_counts_only_in_a_bank_of_conditional_transfers() {
        let mut h = Make::new();
        h.0.bank = [("c/x", 10), ("c/y", 10), ("u/x", 10), ("u/y", 10)]
            .map(|(k, b)| (k.to_string(), b))
            .into();
        h.transfer(OpResult::Ok, Some(1), "c/x", "c/y", 10);
        let unconditional = h.transfer(OpResult::Ok, Some(2), "u/x", "u/y", 15);
        if let OpKind::Transfer { conditional, .. } = &mut h.0.ops[unconditional].kind {
            *conditional = false;
        }
        let wrong = h.bank_read(3, &[("c/x", -5), ("c/y", 25)]);
        h.bank_read(4, &[("u/x", -5), ("u/y", 25)]);
        let report = h.only(&[Class::NegativeBalance, Class::BankBalance]);
        assert_eq!(report.count(Class::NegativeBalance), 1);
        assert_eq!(report.anomalies[&Class::NegativeBalance].1.ops, vec![wrong]);
        assert_eq!(report.count(Class::BankBalance), 2);
    }

    #[test]
    fn a_lost_write_in_the_final_read() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1))]);
        h.write(0, 2, &[("a", v(2))]);
        h.write(0, 3, &[("u", v(3))]);
        h.read_op(1, None, 5, &[("a", v(1)), ("u", None)], true);
        let report = h.only(&[Class::LostWrite]);
        assert_eq!(report.count(Class::LostWrite), 2);
        assert_eq!(report.anomalies[&Class::LostWrite].1.ops, vec![2, 3]);
    }

    #[test]
    fn a_phantom_write() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1))]);
        h.read(1, None, 2, &[("a", v(7))]);
        h.only(&[Class::PhantomWrite]);
    }

    #[test]
    fn an_aborted_read() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1))]);
        h.write_with(0, OpResult::Fail, &[("a", json!({"w": 2}))]);
        h.read(1, None, 3, &[("a", v(2))]);
        h.only(&[Class::AbortedRead]);
    }

    #[test]
    fn a_partial_transaction() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1)), ("b", v(1))]);
        h.write(0, 2, &[("a", v(2)), ("b", v(2))]);
        h.read(1, None, 3, &[("a", v(2)), ("b", v(1))]);
        // One of unknown outcome, seen half: the other half shows a write that finished before
        // it began, so older.
        let unknown = h.write_with(
            0,
            OpResult::Unknown,
            &[("a", json!({"w": 3})), ("b", json!({"w": 3}))],
        );
        let read = h.read(1, None, 9, &[("a", v(3)), ("b", v(2))]);
        let report = h.only(&[Class::PartialTransaction]);
        assert_eq!(report.count(Class::PartialTransaction), 2);
        assert_eq!(
            report.anomalies[&Class::PartialTransaction].1.ops,
            vec![1, 2]
        );
        assert!(unknown < read);
    }

    #[test]
    fn stale_and_future_reads_are_not_the_snapshot() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1))]);
        h.write(0, 5, &[("a", v(2))]);
        h.read(1, None, 6, &[("a", v(1))]);
        h.read(1, None, 3, &[("a", v(2))]);
        h.read(1, None, 7, &[("a", None)]);
        let report = h.only(&[Class::Snapshot]);
        assert_eq!(report.count(Class::Snapshot), 3);
    }

    #[test]
    fn session_guarantees() {
        let mut h = Make::new();
        // Client 0 writes at 5 then reads, with its token, at 4: not its own write.
        h.write(0, 5, &[("a", v(1))]);
        h.read(0, Some(5), 4, &[("a", None)]);
        // Client 1 reads at 8, then at 6.
        h.read(1, Some(0), 8, &[]);
        h.read(1, Some(8), 6, &[]);
        // Client 2 writes at 10, then at 9.
        h.write(2, 10, &[("b", v(1))]);
        h.write(2, 9, &[("c", v(1))]);
        // Client 3 reads at 20, then its write commits at 15.
        h.read(3, None, 20, &[]);
        h.write(3, 15, &[("d", v(1))]);
        let report = h.only(&[
            Class::ReadYourWrites,
            Class::MonotonicReads,
            Class::MonotonicWrites,
            Class::WritesFollowReads,
        ]);
        assert_eq!(report.anomalies[&Class::ReadYourWrites].1.ops, vec![0, 1]);
        assert_eq!(report.anomalies[&Class::MonotonicReads].1.ops, vec![2, 3]);
        assert_eq!(report.anomalies[&Class::MonotonicWrites].1.ops, vec![4, 5]);
        assert_eq!(
            report.anomalies[&Class::WritesFollowReads].1.ops,
            vec![6, 7]
        );
    }

    #[test]
    fn the_smallest_example_of_a_class_is_kept_with_the_count() {
        let mut h = Make::new();
        h.write(0, 1, &[("a", v(1))]);
        h.read(1, None, 2, &[("a", v(8))]);
        h.read(1, None, 2, &[("a", v(9))]);
        let report = h.only(&[Class::PhantomWrite]);
        assert_eq!(report.count(Class::PhantomWrite), 2);
        assert_eq!(report.anomalies[&Class::PhantomWrite].1.ops, vec![1]);
        assert!(report.to_string().contains("phantom write: 2"), "{report}");
    }
}
