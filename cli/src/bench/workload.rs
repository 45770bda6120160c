//! The workloads and the HTTP requests they send (api-server/API.md).
//!
//! | workload | mix |
//! |---|---|
//! | `write` | 100% replace (PUT) |
//! | `read` | 100% read (GET) |
//! | `mixed` | 50% read, 30% replace, 20% merge patch with a counter increment |
//! | `ycsb-a` | 50% read, 50% update (merge patch of one field) |
//! | `ycsb-b` | 95% read, 5% update |
//! | `ycsb-c` | 100% read |
//! | `transfer` | 100% two-account transactions (one decrement, one increment, atomically) |
//! | `withdraw` | 100% one-account conditional transactions: a decrement if the balance covers it |
//! | `transfer-if` | 100% transfers conditional on the payer's balance (two accounts: on 2×2 about half of them span both partitions) |

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rand::Rng;
use serde_json::{json, Value};

use super::zipf::KeyChooser;
use super::Args;

/// The deadline of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a visibility probe keeps trying.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Write,
    Read,
    Mixed,
    YcsbA,
    YcsbB,
    YcsbC,
    Transfer,
    Withdraw,
    TransferIf,
}

/// The opening balance of the accounts of the conditional workloads: large, so that the
/// conditions hold and the commit path is what is measured.
pub const OPENING_BALANCE: i64 = 1_000_000;

/// One request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Put(u64),
    /// A merge patch; `increment` adds a counter increment to it.
    Patch {
        key: u64,
        increment: bool,
    },
    Transfer {
        from: u64,
        to: u64,
        amount: i64,
        /// Only if the payer's balance covers it.
        conditional: bool,
    },
    /// A decrement of one account, only if its balance covers it.
    Withdraw {
        account: u64,
        amount: i64,
    },
    /// Accounts (or documents) `first..first + count` written in one transaction (the load
    /// phase).
    PutBatch {
        first: u64,
        count: u64,
        accounts: bool,
    },
}

/// The document a visibility probe reads: a document, or an account of `transfer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub account: bool,
    pub key: u64,
}

/// What a request came to: success (with a write's commit ts) or an error kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok {
        ts: Option<u64>,
    },
    /// 429: admission control refused the write; it changed nothing.
    Throttled,
    Error(String),
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Read => "read",
            Workload::Mixed => "mixed",
            Workload::YcsbA => "ycsb-a",
            Workload::YcsbB => "ycsb-b",
            Workload::YcsbC => "ycsb-c",
            Workload::Transfer => "transfer",
            Workload::Withdraw => "withdraw",
            Workload::TransferIf => "transfer-if",
        }
    }

    /// Whether the workload needs its documents written first: it reads them, or its
    /// conditions read the accounts.
    pub fn loads(self) -> bool {
        !matches!(self, Workload::Write | Workload::Transfer)
    }

    /// Whether the workload's documents are accounts.
    pub fn accounts(self) -> bool {
        matches!(
            self,
            Workload::Transfer | Workload::Withdraw | Workload::TransferIf
        )
    }

    /// The write that loads `count` keys from `first` before the run.
    pub fn load_op(self, first: u64, count: u64) -> Op {
        match (count, self.accounts()) {
            (1, false) => Op::Put(first),
            (_, accounts) => Op::PutBatch {
                first,
                count,
                accounts,
            },
        }
    }

    pub fn next_op(self, keys: &KeyChooser, rng: &mut impl Rng) -> Op {
        let key = keys.next(rng);
        let percent = rng.random_range(0..100u32);
        match self {
            Workload::Write => Op::Put(key),
            Workload::Read | Workload::YcsbC => Op::Read(key),
            Workload::Mixed => match percent {
                0..50 => Op::Read(key),
                50..80 => Op::Put(key),
                _ => Op::Patch {
                    key,
                    increment: true,
                },
            },
            Workload::YcsbA if percent < 50 => Op::Read(key),
            Workload::YcsbB if percent < 95 => Op::Read(key),
            Workload::YcsbA | Workload::YcsbB => Op::Patch {
                key,
                increment: false,
            },
            Workload::Transfer | Workload::TransferIf => {
                let mut to = keys.next(rng);
                if to == key {
                    to = (key + 1) % keys.key_count();
                }
                Op::Transfer {
                    from: key,
                    to,
                    amount: rng.random_range(1..=100),
                    conditional: self == Workload::TransferIf,
                }
            }
            Workload::Withdraw => Op::Withdraw {
                account: key,
                amount: rng.random_range(1..=100),
            },
        }
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read(_) => "read",
            Op::Put(_) => "put",
            Op::Patch { .. } => "patch",
            Op::Transfer {
                conditional: false, ..
            } => "transfer",
            Op::Transfer { .. } => "transfer_if",
            Op::Withdraw { .. } => "withdraw",
            Op::PutBatch { .. } => "put_batch",
        }
    }

    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Read(_))
    }

    /// The document a visibility probe of this write reads.
    pub fn probe_key(&self) -> Option<Probe> {
        match self {
            Op::Read(_) | Op::PutBatch { .. } => None,
            Op::Put(k) | Op::Patch { key: k, .. } => Some(Probe {
                account: false,
                key: *k,
            }),
            Op::Transfer { to, .. } => Some(Probe {
                account: true,
                key: *to,
            }),
            Op::Withdraw { account, .. } => Some(Probe {
                account: true,
                key: *account,
            }),
        }
    }
}

/// The id of key `k`.
pub fn doc_id(k: u64) -> String {
    format!("k{k:09}")
}

/// A document of about `bytes` bytes of JSON.
pub fn document(n: u64, bytes: usize) -> Value {
    let base = json!({"n": n, "field0": "", "pad": ""}).to_string().len();
    let room = bytes.saturating_sub(base);
    let field0 = "f".repeat(room.min(16));
    let pad = "x".repeat(room - field0.len());
    json!({"n": n, "field0": field0, "pad": pad})
}

/// The api-server client of a run.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
    token: String,
    collection: String,
    accounts: String,
    doc_bytes: usize,
    keys: u64,
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else if e.is_body() || e.is_decode() {
        "body".into()
    } else {
        "request".into()
    }
}

/// `<status> <problem type>` of an error answer.
async fn status_kind(r: reqwest::Response) -> String {
    let status = r.status().as_u16();
    let kind = r
        .json::<Value>()
        .await
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .map(|t| t.trim_start_matches("urn:causeway:problem:").to_owned())
        .unwrap_or_default();
    format!("{status} {kind}").trim_end().to_owned()
}

impl Http {
    pub fn new(base: &str, token: &str, args: &Args) -> Result<Http> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(args.concurrency + super::MAX_PROBES)
            .tcp_nodelay(true)
            .build()?;
        Ok(Http {
            client,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            collection: args.collection.clone(),
            accounts: format!("{}_accounts", args.collection),
            doc_bytes: args.doc_bytes,
            keys: args.keys,
        })
    }

    /// The api-server's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn keys(&self) -> u64 {
        self.keys
    }

    fn doc_url(&self, collection: &str, key: u64) -> String {
        format!(
            "{}/v1/collections/{collection}/documents/{}",
            self.base,
            doc_id(key)
        )
    }

    /// The server is ready and the token is accepted.
    pub async fn check(&self) -> Result<()> {
        let ready = self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .await?;
        ensure!(
            ready.status().is_success(),
            "/readyz answers {}",
            ready.status()
        );
        let r = self
            .client
            .get(self.doc_url(&self.collection, u64::MAX))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status().as_u16();
        ensure!(
            status == 404 || status == 200,
            "a probe read answers {}",
            status_kind(r).await
        );
        Ok(())
    }

    /// Sends one operation.
    pub async fn send(&self, op: &Op) -> Outcome {
        let request = match op {
            Op::Read(k) => self.client.get(self.doc_url(&self.collection, *k)),
            Op::Put(k) => self
                .client
                .put(self.doc_url(&self.collection, *k))
                .header("content-type", "application/json")
                .body(document(*k, self.doc_bytes).to_string()),
            Op::Patch { key, increment } => {
                let mut patch = json!({"field0": format!("v{}", rand::random::<u32>())});
                if *increment {
                    patch["$increment"] = json!({"updates": 1});
                }
                self.client
                    .patch(self.doc_url(&self.collection, *key))
                    .header("content-type", "application/merge-patch+json")
                    .body(patch.to_string())
            }
            Op::Transfer {
                from,
                to,
                amount,
                conditional,
            } => {
                let mut body = json!({"mutations": [
                    {"op": "increment", "collection": self.accounts, "id": doc_id(*from),
                     "path": "balance", "delta": -amount},
                    {"op": "increment", "collection": self.accounts, "id": doc_id(*to),
                     "path": "balance", "delta": amount},
                ]});
                if *conditional {
                    body["conditions"] = self.covers(*from, *amount);
                }
                self.client
                    .post(format!("{}/v1/transactions", self.base))
                    .json(&body)
            }
            Op::Withdraw { account, amount } => self
                .client
                .post(format!("{}/v1/transactions", self.base))
                .json(&json!({
                    "mutations": [
                        {"op": "increment", "collection": self.accounts, "id": doc_id(*account),
                         "path": "balance", "delta": -amount},
                    ],
                    "conditions": self.covers(*account, *amount),
                })),
            Op::PutBatch {
                first,
                count,
                accounts,
            } => {
                let mutations: Vec<Value> = (*first..first + count)
                    .map(|k| {
                        if *accounts {
                            json!({"op": "replace", "collection": self.accounts, "id": doc_id(k),
                                   "document": {"balance": OPENING_BALANCE}})
                        } else {
                            json!({"op": "replace", "collection": self.collection, "id": doc_id(k),
                                   "document": document(k, self.doc_bytes)})
                        }
                    })
                    .collect();
                self.client
                    .post(format!("{}/v1/transactions", self.base))
                    .json(&json!({ "mutations": mutations }))
            }
        };
        match request.bearer_auth(&self.token).send().await {
            Ok(r) if r.status().is_success() => {
                let ts = r
                    .headers()
                    .get("causeway-timestamp")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                // Read the body so the connection can be reused.
                match r.bytes().await {
                    Ok(_) => Outcome::Ok { ts },
                    Err(e) => Outcome::Error(error_kind(&e)),
                }
            }
            Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                let _ = r.bytes().await;
                Outcome::Throttled
            }
            Ok(r) => Outcome::Error(status_kind(r).await),
            Err(e) => Outcome::Error(error_kind(&e)),
        }
    }

    /// The condition that `account`'s balance covers `amount`.
    fn covers(&self, account: u64, amount: i64) -> Value {
        json!([{"collection": self.accounts, "id": doc_id(account),
                "filter": {"balance": {"$gte": amount}}}])
    }

    /// Reads `key` with `Causeway-After: ts` until a read at or above `ts` answers it.
    pub async fn probe_visible(&self, probe: &Probe, ts: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PROBE_DEADLINE;
        let collection = if probe.account {
            &self.accounts
        } else {
            &self.collection
        };
        let url = self.doc_url(collection, probe.key);
        let mut last = String::from("no answer");
        while tokio::time::Instant::now() < deadline {
            let r = self
                .client
                .get(&url)
                .bearer_auth(&self.token)
                .header("causeway-after", ts.to_string())
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    let read_ts = r
                        .headers()
                        .get("causeway-read-timestamp")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('.').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    let _ = r.bytes().await;
                    match read_ts {
                        Some(read) if read >= ts => return Ok(()),
                        other => last = format!("read at {other:?} below {ts}"),
                    }
                }
                Ok(r) => last = status_kind(r).await,
                Err(e) => last = error_kind(&e),
            }
        }
        Err(last)
    }

    /// The sum of every account's balance, read page by page at ONE read timestamp (a query's
    /// cursor keeps its read timestamp), the number of accounts, and the lowest balance.
    pub async fn bank_total(&self, max_accounts: u64) -> Result<(i64, u64, i64)> {
        let url = format!("{}/v1/collections/{}/query", self.base, self.accounts);
        let mut cursor: Option<String> = None;
        let mut sum = 0i64;
        let mut accounts = 0u64;
        let mut lowest = i64::MAX;
        // Every page returns at least one document or ends; bound the pages anyway.
        for _ in 0..=max_accounts + 1 {
            let mut body = json!({"limit": 1000});
            if let Some(c) = &cursor {
                body["cursor"] = json!(c);
            }
            let r = self
                .client
                .post(&url)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await?;
            ensure!(r.status().is_success(), "query: {}", status_kind(r).await);
            let page: Value = r.json().await?;
            for d in page["documents"].as_array().context("no documents")? {
                if d["found"].as_bool() == Some(false) {
                    continue;
                }
                accounts += 1;
                let balance = d["document"]["balance"]
                    .as_i64()
                    .with_context(|| format!("account {} has no integer balance", d["id"]))?;
                sum += balance;
                lowest = lowest.min(balance);
            }
            match page["cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok((sum, accounts, lowest)),
            }
        }
        anyhow::bail!("the query did not end within {max_accounts} pages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn documents_have_the_requested_size() {
        for bytes in [16, 64, 256, 1024, 4096] {
            let len = document(123, bytes).to_string().len();
            assert!(len.abs_diff(bytes) <= 32, "{bytes}: {len}");
        }
        assert_eq!(document(7, 256).to_string().len(), 256);
    }

    #[test]
    fn the_mixes_have_their_proportions() {
        let keys = KeyChooser::new(100, 0.0).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let share = |w: Workload, rng: &mut StdRng| {
            let reads = (0..10_000)
                .filter(|_| !w.next_op(&keys, rng).is_write())
                .count();
            reads as f64 / 10_000.0
        };
        assert_eq!(share(Workload::Write, &mut rng), 0.0);
        assert_eq!(share(Workload::YcsbC, &mut rng), 1.0);
        assert!((share(Workload::YcsbA, &mut rng) - 0.5).abs() < 0.03);
        assert!((share(Workload::YcsbB, &mut rng) - 0.95).abs() < 0.01);
        assert!((share(Workload::Mixed, &mut rng) - 0.5).abs() < 0.03);
        for workload in [Workload::Transfer, Workload::TransferIf] {
            for _ in 0..1000 {
                match workload.next_op(&keys, &mut rng) {
                    Op::Transfer {
                        from,
                        to,
                        amount,
                        conditional,
                    } => {
                        assert_ne!(from, to);
                        assert!(from < 100 && to < 100 && amount > 0);
                        assert_eq!(conditional, workload == Workload::TransferIf);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(matches!(
            Workload::Withdraw.next_op(&keys, &mut rng),
            Op::Withdraw { account, amount } if account < 100 && amount > 0
        ));
    }
}
