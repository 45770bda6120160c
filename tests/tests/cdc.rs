//! Change data capture end to end (DESIGN.md §11): one `causeway-cdc` with four feeds on a 2×2
//! cluster against Kafka, under a write load through the api-server of single-document writes
//! and multi-document transactions, some of whose conditions fail (412).
//!
//! The feeds share the cluster, the load and the cdc process (each check is about its own feed,
//! so sharing weakens none), and each is judged against what the writer knows (every committed
//! transaction's documents in the order it names them, every aborted transaction) and against
//! the store's final state read through the API:
//! - `all`, a webhook of both collections: every committed change once (duplicates only after a
//!   restart, above the durable checkpoint, identical), in order, whole transactions, nothing
//!   of an aborted one, `resolved` kept, the receiver's final state equal to the store's; its
//!   receiver answers 503 for 10 s then refuses connections for 10 s (block mode).
//! - `open`, a webhook with the filter `status = "open"` and before-images: exactly the events
//!   the filter table of `causeway_core::cdc::classify` gives, `left` included.
//! - `scan`, a webhook created mid-load with an initial scan: the `op: r` snapshot equals the
//!   state at the snapshot, then `snapshot.complete`, then the changes after it.
//! - `kafka`, Kafka topics: a `read_committed` consumer sees each change event exactly once.
//!
//! `causeway-cdc` is killed -9 (after a SIGSTOP, so that the checkpoints read are the ones it
//! had durably stored) mid-stream and restarted while the load runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use causeway_core::cdc::Position;
use causeway_tests::cdc::{Cdc, Delivery, Receiver};
use causeway_tests::{until, ClusterSpec, LocalCluster, API_TOKEN};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value as Json};
use tokio::sync::watch;

const ORDERS: &str = "cdc_orders";
const ACCOUNTS: &str = "cdc_accounts";
/// Writer tasks, each with its own documents (so that each knows which of them exist).
const TASKS: usize = 3;
const ORDERS_PER_TASK: usize = 12;
const ACCOUNTS_PER_TASK: usize = 4;
/// Each writer task's pace and its most operations.
const OPS_PER_S: u64 = 25;
const MAX_OPS: usize = 5_000;
/// The webhook batches' most events: the receiver checks every batch against it.
const MAX_EVENTS: usize = 50;
const KAFKA_PREFIX: &str = "cdctest.";
const WAIT: Duration = Duration::from_secs(60);

type Key = (String, String);

/// What the writer knows.
#[derive(Debug, Default)]
struct History {
    /// ts → the documents the transaction wrote, in the order it first names them.
    committed: BTreeMap<u64, Vec<Key>>,
    /// Transactions whose condition failed.
    aborted: BTreeSet<u64>,
    /// Answers the writer did not expect: each makes the test fail.
    errors: Vec<String>,
}

impl History {
    fn last_ts(&self) -> u64 {
        let c = self.committed.keys().last().copied().unwrap_or(0);
        let a = self.aborted.last().copied().unwrap_or(0);
        c.max(a)
    }
}

/// A bounded writer through the api-server: `TASKS` tasks at `OPS_PER_S` each.
struct Writer {
    history: Arc<Mutex<History>>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Writer {
    fn start(api: &str) -> Writer {
        let history = Arc::new(Mutex::new(History::default()));
        let (stop, rx) = watch::channel(false);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let (api, http, history, rx) = (
                api.to_owned(),
                http.clone(),
                Arc::clone(&history),
                rx.clone(),
            );
            tasks.spawn(async move { write_task(t, api, http, history, rx).await });
        }
        Writer {
            history,
            stop,
            tasks,
        }
    }

    fn last_ts(&self) -> u64 {
        self.history.lock().unwrap().last_ts()
    }

    async fn stop(mut self) -> History {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(Some(r)) =
            tokio::time::timeout_at(deadline.into(), self.tasks.join_next()).await
        {
            r.unwrap();
        }
        assert!(self.tasks.is_empty(), "the writer did not stop within 30 s");
        std::mem::take(&mut *self.history.lock().unwrap())
    }
}

fn order(t: usize, i: usize) -> Key {
    (ORDERS.to_owned(), format!("o-{t}-{i}"))
}

fn account(t: usize, i: usize) -> Key {
    (ACCOUNTS.to_owned(), format!("a-{t}-{i}"))
}

/// Every document the writer may write.
fn universe() -> Vec<Key> {
    let mut keys = vec![(ORDERS.to_owned(), "leaver".to_owned())];
    for t in 0..TASKS {
        keys.extend((0..ORDERS_PER_TASK).map(|i| order(t, i)));
        keys.extend((0..ACCOUNTS_PER_TASK).map(|i| account(t, i)));
    }
    keys
}

const STATUSES: [&str; 3] = ["open", "closed", "paid"];

/// What one request did.
enum Outcome {
    Committed(u64),
    Aborted(u64),
}

/// Sends a request (again after a 429, which appends nothing) and reads its outcome.
async fn send(request: reqwest::RequestBuilder) -> Result<Outcome> {
    for _ in 0..20 {
        let r = request
            .try_clone()
            .expect("a request with a body in memory")
            .bearer_auth(API_TOKEN)
            .send()
            .await?;
        let status = r.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let body: Json = r.json().await.unwrap_or(Json::Null);
        let ts = body["ts"].as_u64();
        return match (status, ts) {
            (StatusCode::OK, Some(ts)) => Ok(Outcome::Committed(ts)),
            (StatusCode::PRECONDITION_FAILED, Some(ts)) => Ok(Outcome::Aborted(ts)),
            _ => Err(anyhow!("{status}: {body}")),
        };
    }
    bail!("throttled 20 times")
}

fn mutation_key(m: &Json) -> Key {
    (
        m["collection"].as_str().unwrap().to_owned(),
        m["id"].as_str().unwrap().to_owned(),
    )
}

async fn write_task(
    t: usize,
    api: String,
    http: reqwest::Client,
    history: Arc<Mutex<History>>,
    stop: watch::Receiver<bool>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xcdc0 + t as u64);
    let mut exists: BTreeSet<Key> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / OPS_PER_S));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let doc_url = |k: &Key| format!("{api}/v1/collections/{}/documents/{}", k.0, k.1);
    for n in 0..MAX_OPS {
        tick.tick().await;
        if *stop.borrow() {
            return;
        }
        let status = STATUSES[rng.random_range(0..STATUSES.len())];
        let ia = rng.random_range(0..ORDERS_PER_TASK);
        let a = order(t, ia);
        let existing: Vec<Key> = exists.iter().filter(|k| k.0 == ORDERS).cloned().collect();
        let choice = rng.random_range(0..100);
        // The request, the documents it writes in the order it names them, those it deletes,
        // and whether its condition is false.
        let (request, docs, deleted, must_abort) = if choice < 30 {
            let body = json!({"status": status, "n": n, "task": t});
            (http.put(doc_url(&a)).json(&body), vec![a], vec![], false)
        } else if choice < 45 {
            let body = json!({"status": status, "$increment": {"views": 1}});
            let req = http
                .patch(doc_url(&a))
                .header("content-type", "application/merge-patch+json")
                .body(body.to_string());
            (req, vec![a], vec![], false)
        } else if choice < 55 && !existing.is_empty() {
            // Only documents that exist: a delete of an absent one changes nothing.
            let k = existing[rng.random_range(0..existing.len())].clone();
            (http.delete(doc_url(&k)), vec![k.clone()], vec![k], false)
        } else {
            // A multi-document transaction: a replace, merge patches, a transfer, maybe a delete.
            let ib = (ia + 1 + rng.random_range(0..ORDERS_PER_TASK - 1)) % ORDERS_PER_TASK;
            let b = order(t, ib);
            let ix = rng.random_range(0..ACCOUNTS_PER_TASK);
            let iy = (ix + 1 + rng.random_range(0..ACCOUNTS_PER_TASK - 1)) % ACCOUNTS_PER_TASK;
            let (x, y) = (account(t, ix), account(t, iy));
            let delta = rng.random_range(1..50);
            let mut mutations = vec![
                json!({"op": "replace", "collection": a.0, "id": a.1,
                       "document": {"status": status, "n": n, "task": t, "tx": true}}),
                json!({"op": "merge_patch", "collection": b.0, "id": b.1,
                       "patch": {"status": STATUSES[rng.random_range(0..3)], "touched": n}}),
                json!({"op": "increment", "collection": x.0, "id": x.1, "path": "balance", "delta": -delta}),
                json!({"op": "increment", "collection": y.0, "id": y.1, "path": "balance", "delta": delta}),
                // A second write of a document already named: one event, at its first place.
                json!({"op": "merge_patch", "collection": a.0, "id": a.1, "patch": {"again": n}}),
            ];
            let deletable: Vec<&Key> = existing.iter().filter(|k| **k != a && **k != b).collect();
            let mut deleted = vec![];
            if rng.random_bool(0.3) && !deletable.is_empty() {
                let c = deletable[rng.random_range(0..deletable.len())].clone();
                mutations.push(json!({"op": "delete", "collection": c.0, "id": c.1}));
                deleted.push(c);
            }
            let must_abort = choice >= 85;
            let a_exists = exists.contains(&a);
            let conditions = if must_abort {
                vec![json!({"collection": a.0, "id": a.1, "exists": !a_exists})]
            } else if rng.random_bool(0.5) {
                vec![json!({"collection": a.0, "id": a.1, "exists": a_exists})]
            } else {
                vec![]
            };
            let mut docs: Vec<Key> = Vec::new();
            for m in &mutations {
                let k = mutation_key(m);
                if !docs.contains(&k) {
                    docs.push(k);
                }
            }
            let body = json!({"mutations": mutations, "conditions": conditions});
            let req = http.post(format!("{api}/v1/transactions")).json(&body);
            (req, docs, deleted, must_abort)
        };
        let outcome = send(request).await;
        let mut h = history.lock().unwrap();
        match outcome {
            Ok(Outcome::Committed(ts)) if !must_abort => {
                for k in &docs {
                    if deleted.contains(k) {
                        exists.remove(k);
                    } else {
                        exists.insert(k.clone());
                    }
                }
                h.committed.insert(ts, docs);
            }
            Ok(Outcome::Aborted(ts)) if must_abort => {
                h.aborted.insert(ts);
            }
            Ok(Outcome::Committed(ts) | Outcome::Aborted(ts)) => {
                h.errors.push(format!(
                    "task {t}: the transaction at {ts} (must abort: {must_abort}) had the other outcome"
                ));
                return;
            }
            Err(e) => {
                // Its outcome is unknown: the writer's knowledge would be wrong from here on.
                h.errors.push(format!("task {t}: {e}"));
                return;
            }
        }
    }
}

/// One change event as a feed delivered it.
#[derive(Debug, Clone)]
struct Change {
    pos: Position,
    kind: String,
    key: Key,
    op: String,
    count: u64,
    after: Json,
    before: Option<Json>,
    event: Json,
}

impl Change {
    fn parse(e: &Json) -> Result<Change, String> {
        let d = &e["data"];
        let id = e["id"].as_str().ok_or("no id")?;
        let pos: Position = id.parse().map_err(|_| format!("bad id {id}"))?;
        let key = (
            d["key"]["collection"].as_str().ok_or("no key")?.to_owned(),
            d["key"]["id"].as_str().ok_or("no key")?.to_owned(),
        );
        if e["subject"] != format!("{}/{}", key.0, key.1) {
            return Err(format!("{id}: subject {} is not the key", e["subject"]));
        }
        if d["ts"].as_u64() != Some(pos.ts.get()) || d["tx"]["ts"].as_u64() != Some(pos.ts.get()) {
            return Err(format!("{id}: data.ts or tx.ts is not the id's ts: {d}"));
        }
        if d["op"] != "r" && d["tx"]["index"].as_u64() != Some(u64::from(pos.index)) {
            return Err(format!("{id}: tx.index is not the id's index"));
        }
        Ok(Change {
            pos,
            kind: e["type"].as_str().unwrap_or_default().to_owned(),
            key,
            op: d["op"].as_str().unwrap_or_default().to_owned(),
            count: d["tx"]["count"].as_u64().ok_or("no tx.count")?,
            after: d["after"].clone(),
            before: d.get("before").cloned(),
            event: e.clone(),
        })
    }
}

/// A feed's deliveries, judged on their own: the first delivery of each change in order, and
/// where the feed's own events came.
#[derive(Debug, Default)]
struct Judged {
    changes: Vec<Change>,
    /// `(changes delivered before it, resolved ts)`.
    resolved: Vec<(usize, u64)>,
    /// `(changes delivered before it, snapshot)`.
    snapshot_complete: Option<(usize, u64)>,
    duplicates: usize,
}

/// Checks what holds of any feed's deliveries: envelopes, batch sizes, order (positions strictly
/// increasing within a run of the process; a position at or below one already delivered only
/// as a duplicate, after a restart, above `restart_checkpoint`, identical to its first
/// delivery), `resolved` never going back within a run, no `history_lost` or `gap`.
fn judge(
    feed: &str,
    deliveries: &[Delivery],
    restart_checkpoint: Option<Position>,
    v: &mut Vec<String>,
) -> Judged {
    let mut j = Judged::default();
    let mut first: HashMap<String, Json> = HashMap::new();
    let mut last_in_run: Option<(u32, Position)> = None;
    let mut resolved_in_run: Option<(u32, u64)> = None;
    let source = format!("/causeway/feeds/{feed}");
    for d in deliveries {
        if d.events.len() > MAX_EVENTS {
            v.push(format!(
                "{feed}: a batch of {} events (max_events {MAX_EVENTS})",
                d.events.len()
            ));
        }
        for e in &d.events {
            if e["specversion"] != "1.0" || e["source"] != source.as_str() || e["time"].is_null() {
                v.push(format!("{feed}: a bad envelope {e}"));
                continue;
            }
            let kind = e["type"].as_str().unwrap_or_default();
            if kind.starts_with("causeway.document.") {
                let c = match Change::parse(e) {
                    Ok(c) => c,
                    Err(why) => {
                        v.push(format!("{feed}: {why}"));
                        continue;
                    }
                };
                if let Some((run, last)) = last_in_run {
                    if run == d.run && c.pos <= last {
                        v.push(format!("{feed}: {} after {} in one run", c.pos, last));
                    }
                }
                last_in_run = Some((d.run, c.pos));
                let id = c.pos.id();
                match first.get(&id) {
                    Some(earlier) => {
                        j.duplicates += 1;
                        if d.run == 0 {
                            v.push(format!("{feed}: {id} delivered twice before any restart"));
                        }
                        if restart_checkpoint.is_some_and(|cp| c.pos <= cp) {
                            v.push(format!(
                                "{feed}: duplicate {id} at or below the durable checkpoint {}",
                                restart_checkpoint.unwrap()
                            ));
                        }
                        if earlier != e {
                            v.push(format!(
                                "{feed}: duplicate {id} differs: {earlier} then {e}"
                            ));
                        }
                    }
                    None => {
                        if let Some(prev) = j.changes.last() {
                            if c.pos <= prev.pos {
                                v.push(format!(
                                    "{feed}: {} first delivered after {}: out of order",
                                    c.pos, prev.pos
                                ));
                            }
                        }
                        first.insert(id, e.clone());
                        j.changes.push(c);
                    }
                }
            } else if kind == "causeway.resolved" {
                let ts = e["data"]["resolved"].as_u64().unwrap_or(0);
                if let Some((run, prev)) = resolved_in_run {
                    if run == d.run && ts < prev {
                        v.push(format!("{feed}: resolved went back from {prev} to {ts}"));
                    }
                }
                resolved_in_run = Some((d.run, ts));
                j.resolved.push((j.changes.len(), ts));
            } else if kind == "causeway.snapshot.complete" {
                let snapshot = e["data"]["snapshot"].as_u64().unwrap_or(0);
                if j.snapshot_complete.is_some() {
                    v.push(format!("{feed}: a second snapshot.complete"));
                }
                j.snapshot_complete = Some((j.changes.len(), snapshot));
            } else {
                v.push(format!("{feed}: unexpected event {e}"));
            }
        }
    }
    j
}

/// Each transaction whole: for each ts, `tx.count` events with the indexes `0..count`.
fn check_whole(feed: &str, changes: &[Change], v: &mut Vec<String>) {
    let mut by_ts: BTreeMap<u64, Vec<(u32, u64)>> = BTreeMap::new();
    for c in changes.iter().filter(|c| c.op != "r") {
        by_ts
            .entry(c.pos.ts.get())
            .or_default()
            .push((c.pos.index, c.count));
    }
    for (ts, events) in by_ts {
        let n = events.len() as u64;
        let whole = events
            .iter()
            .enumerate()
            .all(|(i, &(index, count))| index as usize == i && count == n);
        if !whole {
            v.push(format!(
                "{feed}: the transaction at {ts} is not whole: {events:?}"
            ));
        }
    }
}

/// The documents of the feed's change events applied in order.
fn apply(changes: &[Change]) -> BTreeMap<Key, Json> {
    let mut state = BTreeMap::new();
    for c in changes {
        match c.kind.as_str() {
            "causeway.document.created" | "causeway.document.updated" => {
                state.insert(c.key.clone(), c.after.clone());
            }
            "causeway.document.deleted" | "causeway.document.left" => {
                state.remove(&c.key);
            }
            _ => {}
        }
    }
    state
}

/// The first difference between two states, if any.
fn state_diff(what: &str, got: &BTreeMap<Key, Json>, want: &BTreeMap<Key, Json>) -> Option<String> {
    let keys: BTreeSet<&Key> = got.keys().chain(want.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .take(3)
        .map(|k| format!("{k:?}: feed {:?}, store {:?}", got.get(k), want.get(k)))
        .collect();
    (!differ.is_empty()).then(|| format!("{what}: the final states differ: {differ:?}"))
}

/// The `all` feed against the writer: every committed change after `start`, whole
/// transactions with their documents in order, nothing else (nothing of an aborted
/// transaction), `resolved` promises kept.
fn check_complete(feed: &str, j: &Judged, h: &History, start: Position, v: &mut Vec<String>) {
    let mut by_ts: BTreeMap<u64, Vec<&Change>> = BTreeMap::new();
    for c in &j.changes {
        by_ts.entry(c.pos.ts.get()).or_default().push(c);
    }
    for (ts, events) in &by_ts {
        if h.aborted.contains(ts) {
            v.push(format!("{feed}: events of the aborted transaction at {ts}"));
            continue;
        }
        let Some(docs) = h.committed.get(ts) else {
            v.push(format!(
                "{feed}: events at {ts}, which the writer did not commit"
            ));
            continue;
        };
        let got: Vec<(u32, u64, &Key)> = events
            .iter()
            .map(|c| (c.pos.index, c.count, &c.key))
            .collect();
        let want: Vec<(u32, u64, &Key)> = docs
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u32, docs.len() as u64, k))
            .collect();
        if got != want {
            v.push(format!(
                "{feed}: the transaction at {ts}: events {got:?}, wrote {want:?}"
            ));
        }
    }
    let missing: Vec<u64> = h
        .committed
        .keys()
        .filter(|ts| **ts > start.ts.get() && !by_ts.contains_key(ts))
        .copied()
        .collect();
    if !missing.is_empty() {
        v.push(format!(
            "{feed}: {} committed transactions never delivered (a gap), first {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    // Resolved: every change at or below it was delivered before it.
    for &(before, r) in &j.resolved {
        let delivered = j.changes[..before]
            .iter()
            .filter(|c| c.pos.ts.get() <= r)
            .count();
        let committed: usize = h
            .committed
            .iter()
            .filter(|(ts, _)| **ts > start.ts.get() && **ts <= r)
            .map(|(_, d)| d.len())
            .sum();
        if delivered != committed {
            v.push(format!(
                "{feed}: resolved {r} came after {delivered} of the {committed} changes at or below it"
            ));
            break;
        }
    }
}

fn side(doc: Option<&Json>) -> u8 {
    match doc {
        None => 0,
        Some(d) if d["status"] == "open" => 1,
        Some(_) => 2,
    }
}

/// The events a feed of `collection` with the filter `status = "open"` and before-images must
/// emit, from the complete feed's changes: `(position, type, key, op, after, before)`.
fn expected_filtered(all: &[Change]) -> Vec<(Position, String, Key, String, Json, Json)> {
    let mut state: BTreeMap<Key, Json> = BTreeMap::new();
    let mut out = Vec::new();
    let mut tx: Option<(u64, u32)> = None;
    for c in all.iter().filter(|c| c.key.0 == ORDERS) {
        let before = state.get(&c.key).cloned();
        let after = (!c.after.is_null()).then(|| c.after.clone());
        let kind = match (side(before.as_ref()), side(after.as_ref())) {
            (0, 1) => Some("created"),
            (1 | 2, 1) => Some("updated"),
            (1, 0) => Some("deleted"),
            (1, 2) => Some("left"),
            _ => None,
        };
        let op = match (&before, &after) {
            (None, _) => "c",
            (_, None) => "d",
            _ => "u",
        };
        match &after {
            Some(a) => state.insert(c.key.clone(), a.clone()),
            None => state.remove(&c.key),
        };
        let Some(kind) = kind else { continue };
        let index = match tx {
            Some((ts, i)) if ts == c.pos.ts.get() => i + 1,
            _ => 0,
        };
        tx = Some((c.pos.ts.get(), index));
        out.push((
            Position::new(c.pos.ts, index),
            format!("causeway.document.{kind}"),
            c.key.clone(),
            op.to_owned(),
            c.after.clone(),
            before.unwrap_or(Json::Null),
        ));
    }
    out
}

/// Reads every document of the universe through the API at or after `after`.
async fn store_state(api: &str, after: u64) -> Result<BTreeMap<Key, Json>> {
    let keys: Vec<Json> = universe()
        .iter()
        .map(|(c, i)| json!({"collection": c, "id": i}))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/documents:get"))
        .bearer_auth(API_TOKEN)
        .header("Causeway-After", after.to_string())
        .json(&json!({ "keys": keys }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("multi-get: {}", r.status());
    }
    let body: Json = r.json().await?;
    let mut state = BTreeMap::new();
    for d in body["documents"]
        .as_array()
        .ok_or_else(|| anyhow!("{body}"))?
    {
        if d["found"] == true {
            state.insert(
                (
                    d["collection"].as_str().unwrap().to_owned(),
                    d["id"].as_str().unwrap().to_owned(),
                ),
                d["document"].clone(),
            );
        }
    }
    Ok(state)
}

fn webhook_feed(name: &str, url: &str, collections: &[&str], extra: Json) -> Json {
    causeway_tests::cdc::webhook_feed(name, url, collections, MAX_EVENTS, extra)
}

/// The checkpoint (start position) of a running feed.
async fn running(cdc: &Cdc, feed: &str) -> Result<Position> {
    let f = cdc
        .wait_feed(feed, "running", WAIT, |f| f["status"]["state"] == "running")
        .await?;
    let cp = f["status"]["checkpoint"]
        .as_str()
        .ok_or_else(|| anyhow!("{feed} has no checkpoint: {f}"))?;
    Ok(cp.parse()?)
}

/// One record of a Kafka feed's topic.
#[derive(Debug)]
struct Record {
    topic: String,
    key: String,
    /// `ce_id`, `ce_type`.
    id: String,
    kind: String,
    data: Json,
}

/// Every record of `topics` (one partition each) that a `read_committed` consumer sees.
fn read_committed(bootstrap: &str, topics: &[String], deadline: Duration) -> Result<Vec<Record>> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "cdc-test-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut high = HashMap::new();
    for t in topics {
        let (_, h) = consumer.fetch_watermarks(t, 0, Duration::from_secs(10))?;
        high.insert(t.clone(), h);
        tpl.add_partition_offset(t, 0, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let end = Instant::now() + deadline;
    let mut out = Vec::new();
    loop {
        let positions = consumer.position()?;
        let done = topics.iter().all(|t| {
            matches!(
                positions.find_partition(t, 0).map(|p| p.offset()),
                Some(Offset::Offset(o)) if o >= high[t]
            )
        });
        if done {
            return Ok(out);
        }
        if Instant::now() > end {
            bail!("reading the feed's topics did not reach their end within {deadline:?}");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut id = String::new();
                let mut kind = String::new();
                if let Some(headers) = m.headers() {
                    for h in headers.iter() {
                        let value =
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                        match h.key {
                            "ce_id" => id = value,
                            "ce_type" => kind = value,
                            _ => {}
                        }
                    }
                }
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let data = m.payload().map_or(Json::Null, |p| {
                    serde_json::from_slice(p).unwrap_or(Json::Null)
                });
                out.push(Record {
                    topic: m.topic().to_owned(),
                    key,
                    id,
                    kind,
                    data,
                });
            }
            Some(Err(e)) => bail!("consuming: {e}"),
            None => {}
        }
    }
}

/// The Kafka feed: each change event id exactly once, all of them, each with the data and key
/// the complete feed shows, in order within each topic.
fn check_kafka(records: &[Record], all: &[Change], v: &mut Vec<String>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last: HashMap<&str, Position> = HashMap::new();
    let reference: HashMap<String, &Change> = all.iter().map(|c| (c.pos.id(), c)).collect();
    for Record {
        topic,
        key,
        id,
        kind,
        data,
    } in records
    {
        if !kind.starts_with("causeway.document.") {
            continue;
        }
        *counts.entry(id).or_default() += 1;
        let Ok(pos) = id.parse::<Position>() else {
            v.push(format!("kafka: bad ce_id {id:?}"));
            continue;
        };
        if let Some(prev) = last.insert(topic, pos) {
            if pos <= prev {
                v.push(format!("kafka: {topic}: {id} after {prev}"));
            }
        }
        match reference.get(id) {
            None => v.push(format!("kafka: {id} ({kind}) is no committed change")),
            Some(c) => {
                if *data != c.event["data"] || *kind != c.kind {
                    v.push(format!(
                        "kafka: {id}: {kind} {data}, the webhook had {}",
                        c.event
                    ));
                }
                if *key != format!("{}/{}", c.key.0, c.key.1)
                    || *topic != format!("{KAFKA_PREFIX}{}", c.key.0)
                {
                    v.push(format!("kafka: {id} keyed {key} in {topic}"));
                }
            }
        }
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    if !twice.is_empty() {
        v.push(format!("kafka: events read more than once: {twice:?}"));
    }
    let missing: Vec<_> = all
        .iter()
        .map(|c| c.pos.id())
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    if !missing.is_empty() {
        v.push(format!(
            "kafka: {} changes never read, first {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        ));
    }
}

/// Waits until `receiver` has a resolved event at or above `ts`; fails at once when the feed
/// stopped (`history_lost`, `failed`).
async fn drained(receiver: &Receiver, feed: &str, ts: u64, cdc: &Cdc) -> Result<()> {
    let waited = until(&format!("{feed} to resolve {ts}"), WAIT, || async move {
        if receiver.resolved() >= ts {
            return Some(None);
        }
        let state = cdc.feed(feed).await.ok()?["status"]["state"].clone();
        (state == "history_lost" || state == "failed").then_some(Some(state))
    })
    .await;
    match waited {
        Ok(None) => Ok(()),
        Ok(Some(state)) => bail!("{feed} stopped: {state}\n--- cdc ---\n{}", cdc.tail()),
        Err(e) => bail!(
            "{e} (at {})\n--- cdc ---\n{}",
            receiver.resolved(),
            cdc.tail()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feeds_deliver_every_committed_change_in_order_through_outages_and_crashes() {
    let began = Instant::now();
    let mut spec = ClusterSpec::new(2, 2);
    // Store nodes end a hold after 4 s: the feeds open each successor before that, many times
    // while the `all` receiver is down (20 s). A successor opened late lets the GC timestamp
    // pass that feed's checkpoint, and the feed loses history.
    spec.tuning.max_hold_ms = 4_000;
    let mut cluster = LocalCluster::start(spec).await.unwrap();
    cluster.start_api_servers(1).await.unwrap();
    let api = cluster.api_urls()[0].clone();
    let bootstrap = cluster.broker().bootstrap_servers();
    let mut all_hook = Receiver::start().await.unwrap();
    let open_hook = Receiver::start().await.unwrap();
    let scan_hook = Receiver::start().await.unwrap();
    let kafka_feed = json!({
        "name": "kafka",
        "collections": [ORDERS, ACCOUNTS],
        "sink": {
            "type": "kafka",
            "bootstrap_servers": bootstrap,
            "topic_prefix": KAFKA_PREFIX,
            "checkpoint_topic": "cdctest-checkpoints",
        },
    });
    let mut cdc = cluster
        .start_cdc(
            vec![
                webhook_feed("all", &all_hook.url(), &[ORDERS, ACCOUNTS], json!({})),
                webhook_feed(
                    "open",
                    &open_hook.url(),
                    &[ORDERS],
                    json!({"filter": {"status": {"$eq": "open"}}, "before": true}),
                ),
                kafka_feed,
            ],
            300,
        )
        .await
        .unwrap();
    let mut starts = BTreeMap::new();
    for feed in ["all", "open", "kafka"] {
        starts.insert(feed, running(&cdc, feed).await.unwrap());
    }
    eprintln!("feeds running at {starts:?} after {:?}", began.elapsed());

    let writer = Writer::start(&api);
    // A document that leaves the filter: open, then closed.
    let http = reqwest::Client::new();
    let leaver = format!("{api}/v1/collections/{ORDERS}/documents/leaver");
    let mut leaver_ts = Vec::new();
    for status in ["open", "closed"] {
        let outcome = send(http.put(&leaver).json(&json!({"status": status})))
            .await
            .unwrap();
        let Outcome::Committed(ts) = outcome else {
            panic!("the leaver's write aborted")
        };
        writer
            .history
            .lock()
            .unwrap()
            .committed
            .insert(ts, vec![(ORDERS.to_owned(), "leaver".to_owned())]);
        leaver_ts.push(ts);
    }

    // e. An initial scan, mid-load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cdc.create_feed(&webhook_feed(
        "scan",
        &scan_hook.url(),
        &[ORDERS],
        json!({"start": "initial_scan"}),
    ))
    .await
    .unwrap();
    let scan_ref = &scan_hook;
    until("the initial scan to complete", WAIT, || async move {
        scan_ref
            .deliveries()
            .iter()
            .flat_map(|d| &d.events)
            .any(|e| e["type"] == "causeway.snapshot.complete")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- cdc ---\n{}", cdc.tail()));

    // b. The `all` receiver down for 20 s: 503, then refused connections.
    let down_from = writer.last_ts();
    all_hook.unavailable();
    tokio::time::sleep(Duration::from_secs(10)).await;
    all_hook.refuse().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let down_until = writer.last_ts();
    let refused = all_hook.refused();
    all_hook.accept().await.unwrap();
    eprintln!("receiver down for ts {down_from}..{down_until}, {refused} requests answered 503");
    drained(&all_hook, "all", down_until, &cdc).await.unwrap();

    // c, f. kill -9 mid-stream: stopped first, so that the checkpoint read is the durable one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cdc.pause().unwrap();
    let checkpoints: BTreeMap<&str, Option<Position>> = ["all", "open", "scan"]
        .into_iter()
        .map(|f| (f, cdc.checkpoint(f).unwrap()))
        .collect();
    let killed_at = writer.last_ts();
    cdc.kill().unwrap();
    for r in [&all_hook, &open_hook, &scan_hook] {
        r.next_run();
    }
    eprintln!("cdc killed at ts {killed_at} with checkpoints {checkpoints:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cdc.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let history = writer.stop().await;
    let last = history.last_ts();
    eprintln!(
        "{} committed and {} aborted transactions up to ts {last}, {:?} in",
        history.committed.len(),
        history.aborted.len(),
        began.elapsed()
    );
    assert!(history.errors.is_empty(), "writer: {:?}", history.errors);
    assert!(!history.aborted.is_empty(), "no transaction aborted");
    assert!(
        down_until > down_from && killed_at > down_until,
        "the load stalled"
    );
    for (name, r) in [
        ("all", &all_hook),
        ("open", &open_hook),
        ("scan", &scan_hook),
    ] {
        drained(r, name, last, &cdc).await.unwrap();
    }
    cdc.wait_feed("kafka", &format!("resolved ≥ {last}"), WAIT, |f| {
        f["status"]["resolved"].as_u64().is_some_and(|r| r >= last)
    })
    .await
    .unwrap();
    let store = store_state(&api, last).await.unwrap();

    let mut v = Vec::new();
    for (name, r) in [
        ("all", &all_hook),
        ("open", &open_hook),
        ("scan", &scan_hook),
    ] {
        for bad in r.bad() {
            v.push(format!("{name}: the receiver refused a request: {bad}"));
        }
    }
    for (feed, start) in &starts {
        let first = history.committed.keys().next().copied().unwrap_or(0);
        if start.ts.get() >= first {
            v.push(format!(
                "{feed} started at {start}, after the first write at {first}"
            ));
        }
    }

    // a, b, c: the complete feed.
    let all = judge("all", &all_hook.deliveries(), checkpoints["all"], &mut v);
    check_complete("all", &all, &history, starts["all"], &mut v);
    if let Some(d) = state_diff("all", &apply(&all.changes), &store) {
        v.push(d);
    }
    if refused == 0 {
        v.push("all: no request came while the receiver answered 503".into());
    }
    let after_outage = all_hook
        .deliveries()
        .iter()
        .filter(|d| d.run == 0)
        .flat_map(|d| &d.events)
        .filter_map(|e| e["id"].as_str()?.parse::<Position>().ok())
        .filter(|p| p.ts.get() > down_from && p.ts.get() <= down_until)
        .count();
    if after_outage == 0 {
        v.push("all: nothing written during the outage was delivered after it".into());
    }

    // d: the filtered feed.
    let open = judge("open", &open_hook.deliveries(), checkpoints["open"], &mut v);
    check_whole("open", &open.changes, &mut v);
    let want = expected_filtered(&all.changes);
    let got: Vec<_> = open
        .changes
        .iter()
        .map(|c| {
            (
                c.pos,
                c.kind.clone(),
                c.key.clone(),
                c.op.clone(),
                c.after.clone(),
                c.before.clone().unwrap_or(Json::String("<absent>".into())),
            )
        })
        .collect();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        v.push(format!(
            "open: event {i} of {} is {:?}, the filter gives {:?} (of {})",
            got.len(),
            got.get(i),
            want.get(i),
            want.len()
        ));
    }
    let lefts = got
        .iter()
        .filter(|g| g.1 == "causeway.document.left")
        .count();
    let leaver_left = got.iter().any(|g| {
        g.1 == "causeway.document.left" && g.2 .1 == "leaver" && g.0.ts.get() == leaver_ts[1]
    });
    if !leaver_left {
        v.push(format!(
            "open: no causeway.document.left for the leaver at {}",
            leaver_ts[1]
        ));
    }
    let open_store: BTreeMap<Key, Json> = store
        .iter()
        .filter(|(k, d)| k.0 == ORDERS && d["status"] == "open")
        .map(|(k, d)| (k.clone(), d.clone()))
        .collect();
    if let Some(d) = state_diff("open", &apply(&open.changes), &open_store) {
        v.push(d);
    }

    // e: the initial scan.
    let scan = judge("scan", &scan_hook.deliveries(), checkpoints["scan"], &mut v);
    check_whole("scan", &scan.changes, &mut v);
    let orders_store: BTreeMap<Key, Json> = store
        .iter()
        .filter(|(k, _)| k.0 == ORDERS)
        .map(|(k, d)| (k.clone(), d.clone()))
        .collect();
    match scan.snapshot_complete {
        None => v.push("scan: no snapshot.complete".into()),
        Some((n, snapshot)) => {
            let (read, changes) = scan.changes.split_at(n);
            if read.is_empty()
                || read
                    .iter()
                    .any(|c| c.op != "r" || c.pos.ts.get() != snapshot)
            {
                v.push(format!(
                    "scan: {} events before snapshot.complete, not all op r at {snapshot}",
                    read.len()
                ));
            }
            if changes
                .iter()
                .any(|c| c.op == "r" || c.pos.ts.get() <= snapshot)
            {
                v.push("scan: a read or an old change after snapshot.complete".into());
            }
            let at_snapshot: Vec<Change> = all
                .changes
                .iter()
                .filter(|c| c.pos.ts.get() <= snapshot)
                .cloned()
                .collect();
            let want: BTreeMap<Key, Json> = apply(&at_snapshot)
                .into_iter()
                .filter(|(k, _)| k.0 == ORDERS)
                .collect();
            if let Some(d) = state_diff("scan: the snapshot", &apply(read), &want) {
                v.push(d);
            }
            let want_after: Vec<(u64, &Key, &str)> = all
                .changes
                .iter()
                .filter(|c| c.pos.ts.get() > snapshot && c.key.0 == ORDERS)
                .map(|c| (c.pos.ts.get(), &c.key, c.kind.as_str()))
                .collect();
            let got_after: Vec<(u64, &Key, &str)> = changes
                .iter()
                .map(|c| (c.pos.ts.get(), &c.key, c.kind.as_str()))
                .collect();
            if got_after != want_after {
                v.push(format!(
                    "scan: {} changes after the snapshot, the complete feed has {}",
                    got_after.len(),
                    want_after.len()
                ));
            }
            if let Some(d) = state_diff("scan", &apply(&scan.changes), &orders_store) {
                v.push(d);
            }
        }
    }

    // f: Kafka, exactly once.
    let topics: Vec<String> = [ORDERS, ACCOUNTS]
        .iter()
        .map(|c| format!("{KAFKA_PREFIX}{c}"))
        .collect();
    let records = tokio::task::spawn_blocking(move || {
        read_committed(&bootstrap, &topics, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .unwrap();
    check_kafka(&records, &all.changes, &mut v);

    eprintln!(
        "all: {} changes, {} duplicates; open: {} ({lefts} left); scan: {} ({:?}); kafka: {} records; {:?} in",
        all.changes.len(),
        all.duplicates,
        open.changes.len(),
        scan.changes.len(),
        scan.snapshot_complete,
        records.len(),
        began.elapsed()
    );
    assert!(
        v.is_empty(),
        "{} violations:\n{}\n--- cdc ---\n{}",
        v.len(),
        v.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
        cdc.tail()
    );
    assert!(lefts > 0);
    drop(cdc);
    drop(cluster);
}
