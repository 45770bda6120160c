//! A steady mixed load through the HTTP API of one or more api-servers, recording every request,
//! for tests that change the cluster underneath it and must show that no client noticed.
//!
//! [`Load::start`] creates the bank accounts and then runs, open-loop at fixed rates: writes of
//! unique documents, reads of acknowledged ones at `Causeway-After` their ts, bank transfers
//! (one transaction of two increments) and snapshot reads of every account; and, closed-loop,
//! causal sessions that alternate between the api-servers carrying their token. Every request has
//! a client timeout. [`Load::stop`] waits for the requests in flight and judges the history
//! ([`check`]): the [`Report`] lists failed requests (any answer but 2xx, a timeout, a connection
//! error) and violations (a bank total off, an acknowledged write not readable, a session that
//! does not read its writes or reads back in time).
//!
//! ```no_run
//! # async fn example(cluster: &causeway_tests::LocalCluster) -> anyhow::Result<()> {
//! use causeway_tests::load::{Load, LoadSpec};
//! let load = Load::start(cluster.api_urls(), LoadSpec::default()).await?;
//! // ... change the cluster ...
//! let report = load.stop().await;
//! report.assert_clean();
//! report.verify_acknowledged(&cluster.api_urls()).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`check`]: the history and its checkers, pure.

pub mod check;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

pub use check::{
    Acknowledged, BankRead, History, Kind, KindStats, Outcome, PhaseStats, ReadObservation, Report,
    RequestRecord, SessionEvent,
};

use crate::history::{Op, OpKind, OpResult};

/// Collections of the load's documents: `WRITES` holds its unique documents, each written once.
pub const WRITES: &str = "load_writes";
const BANK: &str = "load_bank";
/// The bank of conditional transfers: no balance there may go below zero.
const CONDITIONAL_BANK: &str = "load_cbank";
const SESSIONS: &str = "load_sessions";
/// How many times a request refused with 429 is sent again before the 429 counts as a failure.
const MAX_THROTTLED_RETRIES: u32 = 10;
/// Keys per multi-get when reading acknowledged writes back.
const VERIFY_BATCH: usize = 200;

/// The rates and sizes of a load. The defaults are modest: two cores also run the broker and
/// the nodes.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Writes of new unique documents per second.
    pub writes_per_s: u32,
    /// Reads of acknowledged documents per second.
    pub reads_per_s: u32,
    /// Bank transfers per second.
    pub transfers_per_s: u32,
    /// Snapshot reads of every account per second.
    pub bank_reads_per_s: u32,
    /// Conditional transfers per second, in a bank of their own whose accounts start with a
    /// tenth of `initial_balance`, so that some conditions are false.
    pub conditional_transfers_per_s: u32,
    /// Queries of every account of the conditional bank per second.
    pub queries_per_s: u32,
    /// Causal sessions, each alternating between the api-servers.
    pub sessions: u32,
    /// Steps (a write, then two reads, ...) per second of each session.
    pub session_steps_per_s: u32,
    pub accounts: u32,
    /// Every account's balance at the start.
    pub initial_balance: i64,
    /// The client timeout of every request: past it, the request is a failure.
    pub request_timeout: Duration,
    /// The load stops by itself after this, should `stop` never be called.
    pub max_duration: Duration,
    /// Most requests in flight; a request due past it is not sent and counts as a failure.
    pub max_in_flight: usize,
    /// The bearer token.
    pub token: String,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            writes_per_s: 40,
            reads_per_s: 40,
            transfers_per_s: 10,
            bank_reads_per_s: 10,
            conditional_transfers_per_s: 10,
            queries_per_s: 5,
            sessions: 4,
            session_steps_per_s: 10,
            accounts: 8,
            initial_balance: 1000,
            request_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(600),
            max_in_flight: 256,
            token: crate::API_TOKEN.to_owned(),
        }
    }
}

impl LoadSpec {
    /// The requests sent open-loop, with their rates.
    fn open_loop_rates(&self) -> [(u32, Kind); 6] {
        [
            (self.writes_per_s, Kind::Write),
            (self.reads_per_s, Kind::Read),
            (self.transfers_per_s, Kind::Transfer),
            (self.bank_reads_per_s, Kind::BankRead),
            (self.conditional_transfers_per_s, Kind::ConditionalTransfer),
            (self.queries_per_s, Kind::Query),
        ]
    }

    /// The balance each account of the conditional bank starts with.
    fn conditional_balance(&self) -> i64 {
        self.initial_balance / 10
    }
}

/// A running load. Dropping it without [`Load::stop`] aborts it.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct Shared {
    http: reqwest::Client,
    urls: Vec<String>,
    spec: LoadSpec,
    /// Distinguishes this run's documents from another run's on the same cluster.
    run: String,
    started: Instant,
    /// The commit ts of the accounts' creation: every bank read asks at least it.
    bank_ts: u64,
    history: Mutex<History>,
    in_flight: Arc<Semaphore>,
    next_write: AtomicU64,
    /// Round robin over the api-servers.
    next_api: AtomicUsize,
    /// The client of each open-loop request in the recorded history: one of its own (sessions
    /// are clients 0, 1, ...).
    next_client: AtomicUsize,
    ok: AtomicU64,
}

/// The first client number of open-loop requests in the recorded history.
const OPEN_LOOP_CLIENTS: usize = 1 << 20;

/// A request sent: its answer when there is one (of any status), and what the recorded history
/// keeps of it.
struct Sent {
    answer: Option<Answer>,
    api: String,
    invoke: Duration,
    complete: Duration,
    result: OpResult,
}

/// An HTTP answer.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Load {
    /// Creates the accounts (one transaction through the first api-server) and starts the load.
    pub async fn start(urls: Vec<String>, spec: LoadSpec) -> Result<Load> {
        if urls.is_empty() {
            bail!("a load needs at least one api-server");
        }
        let http = reqwest::Client::builder()
            .timeout(spec.request_timeout)
            .build()?;
        let run = format!("r{:08x}", rand::rng().random::<u32>());
        let mut shared = Shared {
            http,
            urls,
            run,
            started: Instant::now(),
            bank_ts: 0,
            history: Mutex::new(History {
                bank_total: spec.initial_balance * i64::from(spec.accounts),
                sessions: vec![Vec::new(); spec.sessions as usize],
                ..History::default()
            }),
            in_flight: Arc::new(Semaphore::new(spec.max_in_flight)),
            next_write: AtomicU64::new(0),
            next_api: AtomicUsize::new(0),
            next_client: AtomicUsize::new(OPEN_LOOP_CLIENTS),
            ok: AtomicU64::new(0),
            spec,
        };
        shared.bank_ts = shared.create_accounts().await?;
        {
            let spec = &shared.spec;
            let mut h = shared.history.lock().expect("history lock");
            h.expected = spec
                .open_loop_rates()
                .iter()
                .filter(|(rate, _)| *rate > 0)
                .map(|&(_, kind)| kind)
                .collect();
            if spec.sessions > 0 && spec.session_steps_per_s > 0 {
                h.expected.extend([Kind::SessionWrite, Kind::SessionRead]);
            }
        }

        let shared = Arc::new(shared);
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let spec = shared.spec.clone();
        for (rate, kind) in spec.open_loop_rates() {
            if rate > 0 {
                tasks.spawn(open_loop(Arc::clone(&shared), rate, kind, stopped.clone()));
            }
        }
        if spec.session_steps_per_s > 0 {
            for session in 0..spec.sessions as usize {
                tasks.spawn(Arc::clone(&shared).session(session, stopped.clone()));
            }
        }
        let limit = spec.max_duration;
        let mut own_stop = stopped.clone();
        let stop_tx = stop.clone();
        tasks.spawn(async move {
            // Ends the load at `max_duration`, or when it is stopped.
            let _ = tokio::time::timeout(limit, own_stop.wait_for(|s| *s)).await;
            let _ = stop_tx.send(true);
        });
        Ok(Load {
            shared,
            stop,
            tasks,
        })
    }

    /// Requests completed with a 2xx answer so far (a test waits for it to grow to see the load
    /// flowing).
    pub fn completed(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Marks this moment with `label` (say, "scale 2x2 -> 3x2"): the report counts the requests
    /// and failures of each phase between marks, and names the phase of each failure.
    pub fn mark(&self, label: &str) {
        let at = self.shared.started.elapsed();
        let mut h = self.shared.history.lock().expect("history lock");
        h.marks.push((at, label.to_owned()));
    }

    /// Since the load started.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Requests sent so far, whatever their outcome.
    pub fn sent(&self) -> usize {
        self.shared
            .history
            .lock()
            .expect("history lock")
            .requests
            .len()
    }

    /// Stops sending, waits for the requests in flight (each bounded by the client timeout) and
    /// judges the history.
    pub async fn stop(mut self) -> Report {
        let _ = self.stop.send(true);
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        self.shared.final_reads().await;
        let history = self.shared.history.lock().expect("history lock").clone();
        Report::check(&history)
    }
}

/// Sends requests of `kind` at `rate` per second until stopped, whatever the answers take: each
/// is its own task, at most `max_in_flight` at once.
async fn open_loop(shared: Arc<Shared>, rate: u32, kind: Kind, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        while requests.try_join_next().is_some() {}
        match Arc::clone(&shared.in_flight).try_acquire_owned() {
            Ok(permit) => {
                let shared = Arc::clone(&shared);
                requests.spawn(async move {
                    match kind {
                        Kind::Write => shared.write().await,
                        Kind::Read => shared.read().await,
                        Kind::Transfer => shared.transfer().await,
                        Kind::BankRead => shared.bank_read().await,
                        Kind::ConditionalTransfer => shared.conditional_transfer().await,
                        Kind::Query => shared.query(shared.api()).await,
                        Kind::Setup | Kind::SessionWrite | Kind::SessionRead => {
                            unreachable!("{kind} is not an open-loop request")
                        }
                    }
                    drop(permit);
                });
            }
            Err(_) => shared.record(
                kind,
                String::new(),
                Outcome::Saturated,
                Duration::ZERO,
                shared.started.elapsed(),
                format!("{} requests in flight", shared.spec.max_in_flight),
            ),
        }
    }
    while requests.join_next().await.is_some() {}
}

impl Shared {
    fn api(&self) -> usize {
        self.next_api.fetch_add(1, Ordering::Relaxed) % self.urls.len()
    }

    fn record(
        &self,
        kind: Kind,
        api: String,
        outcome: Outcome,
        latency: Duration,
        sent_at: Duration,
        detail: String,
    ) {
        if outcome.is_ok() {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        self.history
            .lock()
            .expect("history lock")
            .requests
            .push(RequestRecord {
                kind,
                api,
                outcome,
                latency,
                sent_at,
                detail,
            });
    }

    /// Sends one request to api-server `api` and records it (429s are sent again, up to a
    /// limit); the last answer, when there is one, and how the request ended.
    async fn send(
        &self,
        kind: Kind,
        api: usize,
        method: Method,
        path: &str,
        after: Option<u64>,
        body: Option<&Value>,
    ) -> Sent {
        let url = &self.urls[api];
        let what = format!("{method} {path}");
        let invoke = self.started.elapsed();
        let sent = |answer: Option<Answer>, result| Sent {
            answer,
            api: url.clone(),
            invoke,
            complete: self.started.elapsed(),
            result,
        };
        for attempt in 0.. {
            let mut request = self
                .http
                .request(method.clone(), format!("{url}{path}"))
                .bearer_auth(&self.spec.token);
            if let Some(after) = after {
                request = request.header("Causeway-After", after.to_string());
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let sent_at = self.started.elapsed();
            let start = Instant::now();
            let result = async {
                let response = request.send().await?;
                let status = response.status();
                let headers = response.headers().clone();
                let bytes = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, bytes))
            }
            .await;
            let latency = start.elapsed();
            let (status, headers, bytes) = match result {
                Ok(answer) => answer,
                Err(e) => {
                    let outcome = if e.is_timeout() {
                        Outcome::Timeout
                    } else {
                        Outcome::Connection
                    };
                    let detail = format!("{what}: {e}");
                    self.record(kind, url.clone(), outcome, latency, sent_at, detail);
                    return sent(None, OpResult::Unknown);
                }
            };
            if status == StatusCode::TOO_MANY_REQUESTS && attempt < MAX_THROTTLED_RETRIES {
                // Admission control refused it and it changed nothing: again after the pause
                // the server asked for (at most a second).
                let pause = headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(Duration::from_secs(1), Duration::from_secs)
                    .min(Duration::from_secs(1));
                self.record(
                    kind,
                    url.clone(),
                    Outcome::Throttled,
                    latency,
                    sent_at,
                    what.clone(),
                );
                tokio::time::sleep(pause).await;
                continue;
            }
            let outcome = if status.is_success() {
                Outcome::Ok
            } else if status == StatusCode::PRECONDITION_FAILED && kind == Kind::ConditionalTransfer
            {
                Outcome::ConditionFailed
            } else if status.is_client_error() {
                Outcome::ClientError(status.as_u16())
            } else {
                Outcome::ServerError(status.as_u16())
            };
            let detail = if outcome.is_ok() {
                what
            } else {
                let text = String::from_utf8_lossy(&bytes);
                format!("{what}: {}", text.chars().take(300).collect::<String>())
            };
            self.record(kind, url.clone(), outcome, latency, sent_at, detail);
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            // A 4xx changed nothing; a 5xx does not say whether a write took effect.
            let result = if status.is_success() {
                OpResult::Ok
            } else if status.is_client_error() {
                OpResult::Fail
            } else {
                OpResult::Unknown
            };
            let answer = Answer {
                status,
                headers,
                body,
            };
            return sent(Some(answer), result);
        }
        unreachable!("the loop returns")
    }

    fn account(&self, i: u32) -> String {
        format!("{}-acct-{i}", self.run)
    }

    /// Creates every account with the initial balance in one transaction; its commit ts.
    async fn create_accounts(&self) -> Result<u64> {
        let banks = [
            (BANK, self.spec.initial_balance),
            (CONDITIONAL_BANK, self.spec.conditional_balance()),
        ];
        let mutations: Vec<Value> = banks
            .iter()
            .flat_map(|&(bank, balance)| {
                (0..self.spec.accounts).map(move |i| {
                    json!({"op": "replace", "collection": bank, "id": self.account(i),
                           "document": {"balance": balance, "run": self.run}})
                })
            })
            .collect();
        let body = json!({ "mutations": mutations });
        let sent = self
            .send(
                Kind::Setup,
                0,
                Method::POST,
                "/v1/transactions",
                None,
                Some(&body),
            )
            .await;
        let mut history = self.history.lock().expect("history lock");
        let failed = |history: &History| {
            anyhow!(
                "creating the accounts failed: {:?}",
                history.requests.last().map(|r| &r.detail)
            )
        };
        let Some(answer) = sent.answer.filter(|a| a.status.is_success()) else {
            return Err(failed(&history));
        };
        history.ops.bank = banks
            .iter()
            .flat_map(|&(bank, balance)| {
                (0..self.spec.accounts).map(move |i| (key(bank, &self.account(i)), balance))
            })
            .collect();
        commit_ts(&answer.body).context("the accounts' commit ts")
    }

    async fn write(&self) {
        let n = self.next_write.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-w-{n}", self.run);
        let document = json!({"n": n, "text": format!("value of write {n}")});
        let path = format!("/v1/collections/{WRITES}/documents/{id}");
        let api = self.api();
        let sent = self
            .send(Kind::Write, api, Method::PUT, &path, None, Some(&document))
            .await;
        self.op(
            self.open_loop_client(),
            &sent,
            OpKind::Write {
                writes: vec![(key(WRITES, &id), Some(document.clone()))],
                commit_ts: acknowledged_ts(&sent),
            },
        );
        let Some(answer) = sent.answer.filter(|a| a.status.is_success()) else {
            return;
        };
        match commit_ts(&answer.body) {
            Some(ts) => self
                .history
                .lock()
                .expect("history lock")
                .acknowledged
                .push(Acknowledged {
                    collection: WRITES.to_owned(),
                    id,
                    ts,
                    document,
                }),
            None => self.malformed(Kind::Write, api, "a write answered no ts"),
        }
    }

    async fn read(&self) {
        let write = {
            let h = self.history.lock().expect("history lock");
            if h.acknowledged.is_empty() {
                return;
            }
            let i = rand::rng().random_range(0..h.acknowledged.len());
            h.acknowledged[i].clone()
        };
        let path = format!(
            "/v1/collections/{}/documents/{}",
            write.collection, write.id
        );
        let api = self.api();
        let sent = self
            .send(Kind::Read, api, Method::GET, &path, Some(write.ts), None)
            .await;
        let Some((seen, read_ts)) = document_read(&sent) else {
            return;
        };
        self.op(
            self.open_loop_client(),
            &Sent {
                result: OpResult::Ok,
                ..sent
            },
            OpKind::Read {
                after: Some(write.ts),
                read_ts,
                results: vec![(key(&write.collection, &write.id), seen.clone())],
                is_final: false,
            },
        );
        self.history
            .lock()
            .expect("history lock")
            .reads
            .push(ReadObservation {
                api: self.urls[api].clone(),
                write,
                seen,
            });
    }

    async fn transfer(&self) {
        self.transfer_in(BANK, Kind::Transfer).await;
    }

    /// A transfer in the conditional bank, only if the source's balance covers it (else 412).
    async fn conditional_transfer(&self) {
        self.transfer_in(CONDITIONAL_BANK, Kind::ConditionalTransfer)
            .await;
    }

    async fn transfer_in(&self, bank: &str, kind: Kind) {
        let (from, to, amount) = {
            let mut rng = rand::rng();
            let from = rng.random_range(0..self.spec.accounts);
            let to = (from + rng.random_range(1..self.spec.accounts.max(2))) % self.spec.accounts;
            (from, to, rng.random_range(1..=100i64))
        };
        let (from, to) = (self.account(from), self.account(to));
        let conditional = kind == Kind::ConditionalTransfer;
        let mut body = json!({"mutations": [
            {"op": "increment", "collection": bank, "id": from, "path": "balance", "delta": -amount},
            {"op": "increment", "collection": bank, "id": to, "path": "balance", "delta": amount},
        ]});
        if conditional {
            body["conditions"] =
                json!([{"collection": bank, "id": from, "filter": {"balance": {"$gte": amount}}}]);
        }
        let api = self.api();
        let sent = self
            .send(
                kind,
                api,
                Method::POST,
                "/v1/transactions",
                None,
                Some(&body),
            )
            .await;
        self.op(
            self.open_loop_client(),
            &sent,
            OpKind::Transfer {
                from: key(bank, &from),
                to: key(bank, &to),
                amount,
                conditional,
                commit_ts: acknowledged_ts(&sent),
            },
        );
    }

    /// A query of every account of the conditional bank: one page at one read timestamp,
    /// judged as a snapshot read of the bank (the balances at its ts, their total, none below
    /// zero).
    async fn query(&self, api: usize) {
        let body = json!({"filter": {"run": self.run}, "limit": self.spec.accounts});
        let path = format!("/v1/collections/{CONDITIONAL_BANK}/query");
        let sent = self
            .send(
                Kind::Query,
                api,
                Method::POST,
                &path,
                Some(self.bank_ts),
                Some(&body),
            )
            .await;
        let Some(answer) = sent.answer.as_ref().filter(|a| a.status.is_success()) else {
            return;
        };
        let balances = balances(CONDITIONAL_BANK, &answer.body);
        if balances.len() != self.spec.accounts as usize || answer.body["partial"] == true {
            self.malformed(
                Kind::Query,
                api,
                &format!(
                    "a query of {} accounts answered {} of them: {}",
                    self.spec.accounts,
                    balances.len(),
                    answer
                        .body
                        .to_string()
                        .chars()
                        .take(300)
                        .collect::<String>()
                ),
            );
        }
        self.bank_read_op(&sent, balances);
    }

    /// Keeps a snapshot read of a bank, `balances` as it answered, in the recorded history.
    fn bank_read_op(&self, sent: &Sent, balances: Vec<(String, i64)>) {
        let read_ts = sent
            .answer
            .as_ref()
            .and_then(|a| a.body["read_timestamp"].as_str().and_then(ts_of));
        self.op(
            self.open_loop_client(),
            sent,
            OpKind::BankRead { read_ts, balances },
        );
    }

    async fn bank_read(&self) {
        self.bank_read_via(self.api()).await;
    }

    async fn bank_read_via(&self, api: usize) {
        let keys: Vec<Value> = (0..self.spec.accounts)
            .map(|i| json!({"collection": BANK, "id": self.account(i)}))
            .collect();
        let body = json!({ "keys": keys });
        let sent = self
            .send(
                Kind::BankRead,
                api,
                Method::POST,
                "/v1/documents:get",
                Some(self.bank_ts),
                Some(&body),
            )
            .await;
        let Some(answer) = sent.answer.as_ref().filter(|a| a.status.is_success()) else {
            return;
        };
        self.bank_read_op(&sent, balances(BANK, &answer.body));
        let answer = sent.answer.expect("a 2xx answer");
        let read_timestamp = answer.body["read_timestamp"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let documents = answer.body["documents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let found: Vec<i64> = documents
            .iter()
            .filter(|d| d["found"] == Value::Bool(true))
            .filter_map(|d| d["document"]["balance"].as_i64())
            .collect();
        let missing = (self.spec.accounts as usize).saturating_sub(found.len());
        self.history
            .lock()
            .expect("history lock")
            .bank_reads
            .push(BankRead {
                api: self.urls[api].clone(),
                read_timestamp,
                total: found.iter().sum(),
                missing,
            });
    }

    /// After the load: through every api-server, reads of every document the load wrote and of
    /// the accounts, at `Causeway-After` the highest commit ts acknowledged, recorded as final
    /// reads: every acknowledged write must show in them.
    async fn final_reads(&self) {
        let (keys, after) = {
            let h = self.history.lock().expect("history lock");
            let mut keys: Vec<String> = h
                .ops
                .ops
                .iter()
                .filter_map(|op| match &op.kind {
                    OpKind::Write { writes, .. } => Some(writes.iter().map(|(k, _)| k.clone())),
                    _ => None,
                })
                .flatten()
                .collect();
            keys.sort();
            keys.dedup();
            let after = h.ops.ops.iter().filter_map(Op::commit_ts).max();
            (keys, after.unwrap_or(self.bank_ts).max(self.bank_ts))
        };
        for api in 0..self.urls.len() {
            for batch in keys.chunks(VERIFY_BATCH) {
                let body = json!({ "keys": batch.iter().map(|k| {
                    let (collection, id) = k.split_once('/').expect("collection/id");
                    json!({"collection": collection, "id": id})
                }).collect::<Vec<_>>() });
                let sent = self
                    .send(
                        Kind::Read,
                        api,
                        Method::POST,
                        "/v1/documents:get",
                        Some(after),
                        Some(&body),
                    )
                    .await;
                let Some(answer) = sent.answer.as_ref().filter(|a| a.status.is_success()) else {
                    continue;
                };
                let results = answer.body["documents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| {
                        let key = key(d["collection"].as_str()?, d["id"].as_str()?);
                        let found = d["found"] == Value::Bool(true);
                        Some((key, found.then(|| d["document"].clone())))
                    })
                    .collect();
                self.op(
                    self.open_loop_client(),
                    &sent,
                    OpKind::Read {
                        after: Some(after),
                        read_ts: answer.body["read_timestamp"].as_str().and_then(ts_of),
                        results,
                        is_final: true,
                    },
                );
            }
            if self.spec.accounts > 0 {
                self.bank_read_via(api).await;
                self.query(api).await;
            }
        }
    }

    /// Keeps `kind` in the recorded history as an operation of `client`, as `sent` ended.
    fn op(&self, client: usize, sent: &Sent, kind: OpKind) {
        self.history.lock().expect("history lock").ops.push(Op {
            process: client,
            api: sent.api.clone(),
            invoke: sent.invoke,
            complete: sent.complete,
            result: sent.result,
            kind,
        });
    }

    /// A client of its own for an open-loop request.
    fn open_loop_client(&self) -> usize {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a 2xx answer that lacked what it must carry as a failed request of `kind`.
    fn malformed(&self, kind: Kind, api: usize, what: &str) {
        self.record(
            kind,
            self.urls[api].clone(),
            Outcome::Malformed,
            Duration::ZERO,
            self.started.elapsed(),
            what.to_owned(),
        );
    }

    /// One causal session until stopped: a write of `{"seq": n}` to its own document every third
    /// step and reads of it otherwise, each step through the next api-server, with the session's
    /// token (the highest ts it has written or read at) as `Causeway-After`.
    async fn session(self: Arc<Self>, session: usize, mut stopped: watch::Receiver<bool>) {
        let id = format!("{}-s-{session}", self.run);
        let path = format!("/v1/collections/{SESSIONS}/documents/{id}");
        let mut ticks =
            tokio::time::interval(Duration::from_secs(1) / self.spec.session_steps_per_s);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut token = 0u64;
        let mut seq = 0u64;
        let mut written = false;
        for step in 0usize.. {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopped.wait_for(|s| *s) => break,
            }
            let api = (step + session) % self.urls.len();
            let event = if step % 3 == 0 || !written {
                seq += 1;
                let body = json!({ "seq": seq });
                let sent = self
                    .send(
                        Kind::SessionWrite,
                        api,
                        Method::PUT,
                        &path,
                        None,
                        Some(&body),
                    )
                    .await;
                let ts = acknowledged_ts(&sent);
                if sent.result == OpResult::Ok && ts.is_none() {
                    self.malformed(Kind::SessionWrite, api, "a write answered no ts");
                }
                self.op(
                    session,
                    &sent,
                    OpKind::Write {
                        writes: vec![(key(SESSIONS, &id), Some(body))],
                        commit_ts: ts,
                    },
                );
                if let Some(ts) = ts {
                    token = token.max(ts);
                    written = true;
                }
                SessionEvent::Write { seq, ts }
            } else {
                let sent = self
                    .send(
                        Kind::SessionRead,
                        api,
                        Method::GET,
                        &path,
                        Some(token),
                        None,
                    )
                    .await;
                let Some((document, read_ts)) = document_read(&sent) else {
                    continue;
                };
                let seen = document.as_ref().and_then(|d| d["seq"].as_u64());
                self.op(
                    session,
                    &Sent {
                        result: OpResult::Ok,
                        ..sent
                    },
                    OpKind::Read {
                        after: Some(token),
                        read_ts,
                        results: vec![(key(SESSIONS, &id), document)],
                        is_final: false,
                    },
                );
                let Some(ts) = read_ts else {
                    self.malformed(
                        Kind::SessionRead,
                        api,
                        "a read answered no Causeway-Read-Timestamp",
                    );
                    continue;
                };
                let event = SessionEvent::Read {
                    api: self.urls[api].clone(),
                    after: token,
                    ts,
                    seq: seen,
                };
                token = token.max(ts);
                event
            };
            self.history.lock().expect("history lock").sessions[session].push(event);
        }
    }
}

/// The `ts` of a write's answer.
/// The balances of the accounts of `bank` that a multi-get or a query answered (`documents`;
/// a multi-get's missing accounts are left out).
fn balances(bank: &str, body: &Value) -> Vec<(String, i64)> {
    body["documents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["found"] != Value::Bool(false))
        .filter_map(|d| {
            Some((
                key(bank, d["id"].as_str()?),
                d["document"]["balance"].as_i64()?,
            ))
        })
        .collect()
}

fn commit_ts(body: &Value) -> Option<u64> {
    body["ts"].as_u64()
}

/// A key of the recorded history.
fn key(collection: &str, id: &str) -> crate::history::Key {
    format!("{collection}/{id}")
}

/// The commit ts of an acknowledged write.
fn acknowledged_ts(sent: &Sent) -> Option<u64> {
    sent.answer
        .as_ref()
        .filter(|a| a.status.is_success())
        .and_then(|a| commit_ts(&a.body))
}

/// The ts of a read timestamp `<epoch>.<ts>`.
fn ts_of(read_timestamp: &str) -> Option<u64> {
    read_timestamp.rsplit('.').next()?.parse().ok()
}

/// What a read of one document found (200: the document; 404: none) and the ts of its read
/// timestamp; `None` for any other answer.
fn document_read(sent: &Sent) -> Option<(Option<Value>, Option<u64>)> {
    let answer = sent.answer.as_ref()?;
    let document = match answer.status {
        StatusCode::OK => Some(answer.body.clone()),
        StatusCode::NOT_FOUND => None,
        _ => return None,
    };
    let read_ts = answer
        .headers
        .get("causeway-read-timestamp")
        .and_then(|v| v.to_str().ok())
        .and_then(ts_of);
    Some((document, read_ts))
}

impl Report {
    /// Reads back every acknowledged write of a new document through each api-server, in
    /// multi-gets at `Causeway-After` the highest acknowledged ts, and checks each is found with
    /// the content written. The number of documents checked, or every mismatch. (The accounts and
    /// the sessions' documents are rewritten all along; their own checkers judge them.)
    pub async fn verify_acknowledged(&self, urls: &[String]) -> Result<usize> {
        self.verify_acknowledged_with(urls, crate::API_TOKEN).await
    }

    /// [`Report::verify_acknowledged`] with another token.
    pub async fn verify_acknowledged_with(&self, urls: &[String], token: &str) -> Result<usize> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let after = self.acknowledged.iter().map(|a| a.ts).max().unwrap_or(0);
        let mut mismatches = Vec::new();
        let mut checked = 0;
        for url in urls {
            for batch in self.acknowledged.chunks(VERIFY_BATCH) {
                let keys: Vec<Value> = batch
                    .iter()
                    .map(|a| json!({"collection": a.collection, "id": a.id}))
                    .collect();
                let response = http
                    .post(format!("{url}/v1/documents:get"))
                    .bearer_auth(token)
                    .header("Causeway-After", after.to_string())
                    .json(&json!({ "keys": keys }))
                    .send()
                    .await
                    .with_context(|| format!("reading acknowledged writes back via {url}"))?;
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!("reading acknowledged writes back via {url}: {status}: {body}");
                }
                let documents = body["documents"].as_array().cloned().unwrap_or_default();
                if documents.len() != batch.len() {
                    bail!(
                        "via {url}: {} documents answered for {} keys",
                        documents.len(),
                        batch.len()
                    );
                }
                for (a, d) in batch.iter().zip(&documents) {
                    checked += 1;
                    if d["found"] != Value::Bool(true) {
                        mismatches.push(format!(
                            "{}/{} (ts {}) not found via {url}",
                            a.collection, a.id, a.ts
                        ));
                    } else if d["document"] != a.document {
                        mismatches.push(format!(
                            "{}/{} (ts {}) is {} via {url}, written as {}",
                            a.collection, a.id, a.ts, d["document"], a.document
                        ));
                    }
                }
            }
        }
        if !mismatches.is_empty() {
            let n = mismatches.len();
            mismatches.truncate(20);
            bail!(
                "{n} acknowledged writes not read back:\n  {}",
                mismatches.join("\n  ")
            );
        }
        Ok(checked)
    }
}
