//! Recorded histories of client operations, for the fault and consistency suite: every operation
//! a workload sends, with when it was invoked and completed, the api-server it went through, its
//! result as the client knows it, and the timestamps it saw. [`check`] judges a history for every
//! anomaly the store must never show; the same code judges a real run and a hand-made history.
//!
//! What the checkers rely on, which the workloads guarantee:
//! - a register write replaces whole documents, each with a value no other write writes (the
//!   workloads put the operation's id in it), so that a value read names the one write that wrote
//!   it;
//! - the log orders every write: an acknowledged write's commit ts places it among all the
//!   others, so the state at any ts is the latest acknowledged write at or below it;
//! - a bank's accounts change only by transfers that move an amount between two of them, so
//!   their total never changes.
//!
//! Histories are JSON lines ([`History::to_json_lines`]) so a run's history can be kept and
//! judged again.
//!
//! # Layout
//! - [`check`]: the checkers and the [`check::Anomaly`] they report.

pub mod check;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A document key, `collection/id`.
pub type Key = String;

/// The id of an operation: its index in the history.
pub type OpId = usize;

/// What the client knows of how an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// Acknowledged: a 2xx answer.
    Ok,
    /// Refused: it changed nothing (a 4xx such as `412 condition_failed`, a 429, or an answer
    /// that says the transaction aborted).
    Fail,
    /// No answer, or one that does not say (a timeout, a reset connection, a 5xx): the operation
    /// may or may not have taken effect.
    Unknown,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OpKind {
    /// One transaction replacing (`Some`) or deleting (`None`) whole documents.
    Write {
        writes: Vec<(Key, Option<Value>)>,
        /// Its commit ts, when acknowledged.
        commit_ts: Option<u64>,
    },
    /// One transaction moving `amount` from one account to another; with `conditional`, only
    /// if the source's balance covers it (so no balance may go below zero).
    Transfer {
        from: Key,
        to: Key,
        amount: i64,
        conditional: bool,
        commit_ts: Option<u64>,
    },
    /// A snapshot read of `keys` (a get, a multi-get or a query's page) at one read timestamp:
    /// what it found of each key (`None`: no document).
    Read {
        /// The `Causeway-After` it carried.
        after: Option<u64>,
        /// The ts part of the read timestamp it answered.
        read_ts: Option<u64>,
        results: Vec<(Key, Option<Value>)>,
        /// A final read: made after the faults ended, of every key the workload wrote, so
        /// every acknowledged write must show in it.
        #[serde(default)]
        is_final: bool,
    },
    /// A snapshot read of bank accounts: each one's balance.
    BankRead {
        read_ts: Option<u64>,
        balances: Vec<(Key, i64)>,
    },
}

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The client (a session: its operations are sequential, each after the previous one).
    pub process: usize,
    /// The api-server it went through.
    pub api: String,
    /// When it was sent and when its answer came (or the client gave up), since the run began.
    pub invoke: Duration,
    pub complete: Duration,
    pub result: OpResult,
    #[serde(flatten)]
    pub kind: OpKind,
}

impl Op {
    /// The commit ts of an acknowledged write or transfer.
    pub fn commit_ts(&self) -> Option<u64> {
        match &self.kind {
            OpKind::Write { commit_ts, .. } | OpKind::Transfer { commit_ts, .. } => *commit_ts,
            _ => None,
        }
    }
}

/// Everything a run's clients did, and what the bank started with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    /// Each bank account's balance before the first transfer.
    pub bank: BTreeMap<Key, i64>,
}

impl History {
    /// Appends `op`; answers its id.
    pub fn push(&mut self, op: Op) -> OpId {
        self.ops.push(op);
        self.ops.len() - 1
    }

    /// The history as JSON lines: the bank first, then one operation per line.
    pub fn to_json_lines(&self) -> String {
        let mut out = serde_json::to_string(&self.bank).expect("a map of strings and numbers");
        out.push('\n');
        for op in &self.ops {
            out.push_str(&serde_json::to_string(op).expect("plain data"));
            out.push('\n');
        }
        out
    }

    /// Reads what [`History::to_json_lines`] wrote.
    pub fn from_json_lines(text: &str) -> serde_json::Result<History> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let bank = match lines.next() {
            Some(line) => serde_json::from_str(line)?,
            None => BTreeMap::new(),
        };
        let ops = lines.map(serde_json::from_str).collect::<Result<_, _>>()?;
        Ok(History { ops, bank })
    }
}
