//! Transactions you can trust, on a 2×2 cluster on Kafka through two api-servers: transfers
//! between accounts, each conditional on the payer's balance (`{"balance": {"$gte": amount}}`),
//! from many concurrent clients. Every snapshot a reader sees has no negative balance and the
//! total it started with; the transfers that committed are exactly those answered committed
//! (checked one by one with `GET /v1/transactions/{ts}`), and the final balances are the initial
//! ones moved by exactly those. Then the same while one replica of each partition is killed and
//! restarted. And a retry with the same `Idempotency-Key` after an answer lost with its
//! api-server applies once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_core::{NodeId, Timestamp};
use causeway_tests::{until, ClusterSpec, LocalCluster, API_TOKEN};
use rand::Rng;
use serde_json::{json, Value};

const ACCOUNTS: usize = 8;
const OPENING: i64 = 100;
const BANK: &str = "bank";
const DEADLINE: Duration = Duration::from_secs(120);

fn account(i: usize) -> String {
    format!("acct-{i}")
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// What a transfer's answer said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Committed,
    Aborted,
    /// In the log, outcome not told (503 outcome unknown): resolved afterwards.
    Unknown,
}

#[derive(Debug, Clone)]
struct Transfer {
    ts: u64,
    from: usize,
    to: usize,
    amount: i64,
    answer: Answer,
}

/// One conditional transfer through `api`; `None` when it never reached the log (a 503 before
/// the append, a 429 of admission control, a connection error).
async fn transfer(
    http: &reqwest::Client,
    api: &str,
    from: usize,
    to: usize,
    amount: i64,
) -> Result<Option<Transfer>> {
    let body = json!({
        "mutations": [
            {"op": "increment", "collection": BANK, "id": account(from), "path": "balance", "delta": -amount},
            {"op": "increment", "collection": BANK, "id": account(to), "path": "balance", "delta": amount},
        ],
        "conditions": [
            {"collection": BANK, "id": account(from), "filter": {"balance": {"$gte": amount}}},
        ],
    });
    let Ok(r) = http
        .post(format!("{api}/v1/transactions"))
        .bearer_auth(API_TOKEN)
        .json(&body)
        .send()
        .await
    else {
        return Ok(None);
    };
    let status = r.status().as_u16();
    let ts = r
        .headers()
        .get("causeway-timestamp")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let answer: Value = r.json().await.unwrap_or(Value::Null);
    let answer = match (status, ts) {
        (200, Some(_)) => {
            ensure!(
                answer["outcome"] == "committed",
                "200 without committed: {answer}"
            );
            Answer::Committed
        }
        (412, Some(_)) => {
            let failure = &answer["failures"][0];
            ensure!(
                failure["id"] == account(from).as_str() && failure["condition"] == 0,
                "a 412 that does not name the payer's condition: {answer}"
            );
            ensure!(failure["found_version_ts"].as_u64().is_some(), "{answer}");
            Answer::Aborted
        }
        (503, Some(_)) => Answer::Unknown,
        (503 | 429, None) => return Ok(None),
        _ => bail!("transfer answered {status}: {answer}"),
    };
    let ts = ts.context("a ts")?;
    Ok(Some(Transfer {
        ts,
        from,
        to,
        amount,
        answer,
    }))
}

/// The balances at one read timestamp, through `api`; `None` on a 503 (a replica down).
async fn snapshot(http: &reqwest::Client, api: &str) -> Result<Option<(String, Vec<i64>)>> {
    let keys: Vec<Value> = (0..ACCOUNTS)
        .map(|i| json!({"collection": BANK, "id": account(i)}))
        .collect();
    let Ok(r) = http
        .post(format!("{api}/v1/documents:get"))
        .bearer_auth(API_TOKEN)
        .json(&json!({ "keys": keys }))
        .send()
        .await
    else {
        return Ok(None);
    };
    if r.status() == 503 {
        return Ok(None);
    }
    ensure!(r.status() == 200, "read answered {}", r.status());
    let body: Value = r.json().await?;
    let balances = body["documents"]
        .as_array()
        .context("documents")?
        .iter()
        .map(|d| d["document"]["balance"].as_i64().context("a balance"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((
        body["read_timestamp"].as_str().unwrap_or("?").to_owned(),
        balances,
    )))
}

/// The outcome `GET /v1/transactions/{ts}` tells, waiting while it is pending.
async fn outcome_of(http: &reqwest::Client, api: &str, ts: u64) -> Result<String> {
    until(&format!("the outcome of ts {ts}"), DEADLINE, || async {
        let r = http
            .get(format!("{api}/v1/transactions/{ts}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.ok()?;
        (status == 200).then(|| body["outcome"].as_str().unwrap_or("?").to_owned())
    })
    .await
}

/// Runs `clients` concurrent clients of `per_client` transfers, and a reader checking every
/// snapshot, while `during` runs; returns the transfers and the snapshots checked.
async fn run_bank(
    apis: &[String],
    clients: usize,
    per_client: usize,
    during: impl std::future::Future<Output = Result<()>>,
) -> Result<(Vec<Transfer>, usize)> {
    let done = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (apis, done, snapshots) = (apis.to_vec(), done.clone(), snapshots.clone());
        tokio::spawn(async move {
            let http = http()?;
            let started = Instant::now();
            let mut i = 0;
            while !done.load(Ordering::SeqCst) && started.elapsed() < DEADLINE {
                i += 1;
                if let Some((at, balances)) = snapshot(&http, &apis[i % apis.len()]).await? {
                    let total: i64 = balances.iter().sum();
                    ensure!(
                        total == OPENING * ACCOUNTS as i64,
                        "the total moved at {at}: {balances:?}"
                    );
                    ensure!(
                        balances.iter().all(|b| *b >= 0),
                        "a negative balance at {at}: {balances:?}"
                    );
                    snapshots.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let apis = apis.to_vec();
            tokio::spawn(async move {
                let http = http()?;
                let mut out = Vec::new();
                for i in 0..per_client {
                    let (from, to, amount) = {
                        let mut rng = rand::rng();
                        let from = rng.random_range(0..ACCOUNTS);
                        let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                        (from, to, rng.random_range(1..=60i64))
                    };
                    let api = &apis[(c + i) % apis.len()];
                    if let Some(t) = transfer(&http, api, from, to, amount).await? {
                        out.push(t);
                    }
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    during.await?;
    let mut transfers = Vec::new();
    for w in workers {
        transfers.extend(tokio::time::timeout(DEADLINE, w).await???);
    }
    done.store(true, Ordering::SeqCst);
    tokio::time::timeout(DEADLINE, reader).await???;
    Ok((transfers, snapshots.load(Ordering::SeqCst)))
}

/// Checks the transfers against the nodes' outcomes and the final balances; prints the counts.
async fn reconcile(
    apis: &[String],
    opening: &[i64],
    transfers: &[Transfer],
    snapshots: usize,
    label: &str,
) -> Result<Vec<i64>> {
    let http = http()?;
    let mut expected = opening.to_vec();
    let (mut committed, mut aborted, mut unknown) = (0, 0, 0);
    for t in transfers {
        let told = outcome_of(&http, &apis[t.ts as usize % apis.len()], t.ts).await?;
        match t.answer {
            Answer::Committed => ensure!(
                told == "committed",
                "ts {} answered committed, is {told}",
                t.ts
            ),
            Answer::Aborted => ensure!(told == "aborted", "ts {} answered 412, is {told}", t.ts),
            Answer::Unknown => unknown += 1,
        }
        if told == "committed" {
            committed += 1;
            expected[t.from] -= t.amount;
            expected[t.to] += t.amount;
        } else {
            aborted += 1;
        }
    }
    // Every write is visible once every node has applied the last ts.
    let last = transfers.iter().map(|t| t.ts).max().unwrap_or(0);
    let balances = until("the final balances", DEADLINE, || async {
        let keys: Vec<Value> = (0..ACCOUNTS)
            .map(|i| json!({"collection": BANK, "id": account(i)}))
            .collect();
        let r = http
            .post(format!("{}/v1/documents:get", apis[0]))
            .bearer_auth(API_TOKEN)
            .header("causeway-after", last.to_string())
            .json(&json!({ "keys": keys }))
            .send()
            .await
            .ok()?;
        let body: Value = r.json().await.ok()?;
        body["documents"]
            .as_array()?
            .iter()
            .map(|d| d["document"]["balance"].as_i64())
            .collect::<Option<Vec<_>>>()
    })
    .await?;
    ensure!(
        balances == expected,
        "the balances are not the opening ones moved by the committed transfers: {balances:?} != {expected:?}"
    );
    println!(
        "{label}: {} transfers, {committed} committed, {aborted} aborted ({unknown} answered \
         outcome-unknown, resolved by GET), {snapshots} snapshots checked",
        transfers.len()
    );
    ensure!(
        committed > 10 && aborted > 0,
        "the run must both commit and abort"
    );
    ensure!(snapshots > 10, "too few snapshots checked: {snapshots}");
    Ok(balances)
}

async fn open_accounts(cluster: &LocalCluster) -> Result<Vec<i64>> {
    let http = http()?;
    let mutations: Vec<Value> = (0..ACCOUNTS)
        .map(|i| json!({"op": "replace", "collection": BANK, "id": account(i), "document": {"balance": OPENING}}))
        .collect();
    let r = http
        .post(format!(
            "{}/v1/transactions?wait=visible",
            cluster.api_urls()[0]
        ))
        .bearer_auth(API_TOKEN)
        .json(&json!({ "mutations": mutations }))
        .send()
        .await?;
    ensure!(r.status() == 200, "opening the accounts: {}", r.status());
    Ok(vec![OPENING; ACCOUNTS])
}

/// `result`, with, when it is an error, the outcomes the nodes recorded wherever they differ.
async fn with_outcomes<T>(cluster: &LocalCluster, result: Result<T>) -> Result<T> {
    let Err(e) = result else { return result };
    let mut differ = Vec::new();
    let end = cluster.log().bounds().await.map_or(0, |b| b.next.get());
    for ts in 1..end.min(2_000) {
        let mut seen = Vec::new();
        for node in cluster.node_ids() {
            let Ok(mut client) = cluster.client(node) else {
                continue;
            };
            let request = causeway_proto::v1::OutcomeRequest {
                ts,
                wait_ms: 0,
                following: 0,
            };
            if let Ok(answer) = client.outcome(request).await {
                if let Some(causeway_proto::v1::outcome_response::Known::Decided(o)) =
                    answer.into_inner().known
                {
                    seen.push((node, o.committed, o.duplicate_of));
                }
            }
        }
        if seen
            .windows(2)
            .any(|w| (w[0].1, w[0].2) != (w[1].1, w[1].2))
        {
            differ.push(format!("ts {ts}: {seen:?}"));
        }
    }
    bail!(
        "{e:#}\noutcomes that differ between nodes: {differ:?}\n{}",
        cluster.logs()
    )
}

/// One replica of each partition.
async fn one_replica_each(cluster: &LocalCluster) -> Result<Vec<NodeId>> {
    let config = cluster.current_config().await?;
    Ok(config
        .slicing
        .partitions()
        .filter_map(|p| config.replicas_of(p).first().copied())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_transfers_never_overdraw_and_commit_exactly_what_they_answer() -> Result<()> {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await?;
    cluster.start_api_servers(2).await?;
    let apis = cluster.api_urls();
    let opening = open_accounts(&cluster).await?;

    let steady = run_bank(&apis, 6, 40, async { Ok(()) }).await;
    let (transfers, snapshots) = with_outcomes(&cluster, steady).await?;
    let balances = reconcile(&apis, &opening, &transfers, snapshots, "steady").await?;

    // The same while one replica of each partition is killed and restarted.
    let victims = one_replica_each(&cluster).await?;
    let killed = {
        let cluster = &mut cluster;
        let during = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for node in &victims {
                cluster.kill(*node)?;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            for node in &victims {
                cluster.restart(*node)?;
            }
            Ok(())
        };
        run_bank(&apis, 6, 40, during).await
    };
    let (transfers, snapshots) = with_outcomes(&cluster, killed).await?;
    reconcile(
        &apis,
        &balances,
        &transfers,
        snapshots,
        "one replica of each partition killed",
    )
    .await?;
    cluster.verify_replicas_agree(DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_idempotency_key_applies_once() -> Result<()> {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await?;
    cluster.start_api_servers(2).await?;
    let apis = cluster.api_urls();
    let http = http()?;
    let increment = json!({"mutations": [
        {"op": "increment", "collection": "tally", "id": "t", "path": "n", "delta": 5},
        {"op": "increment", "collection": "tally", "id": "u", "path": "n", "delta": 1},
    ]});
    let send = |api: String, key: &'static str| {
        let (http, body) = (http.clone(), increment.clone());
        async move {
            http.post(format!("{api}/v1/transactions"))
                .bearer_auth(API_TOKEN)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
        }
    };
    // The store nodes stop deciding: the first api-server appends, then waits for the outcome.
    let nodes = cluster.node_ids();
    for node in &nodes {
        cluster.pause(*node)?;
    }
    let log_end = cluster.log().bounds().await?.next;
    let lost = tokio::spawn(send(apis[0].clone(), "transfer-1"));
    let appended = until("the append", DEADLINE, || async {
        let end = cluster.log().bounds().await.ok()?.next;
        (end > log_end).then_some(Timestamp(end.get() - 1))
    })
    .await?;
    // The answer is lost with its api-server.
    cluster.kill_api_server(0)?;
    ensure!(lost.await?.is_err(), "the first answer was not lost");
    for node in &nodes {
        cluster.resume(*node)?;
    }
    // The retry, through the other api-server, answers the original ts and outcome.
    let r = send(apis[1].clone(), "transfer-1").await?;
    ensure!(r.status() == 200, "retry answered {}", r.status());
    ensure!(
        r.headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok())
            == Some("true"),
        "the retry is not marked replayed: {:?}",
        r.headers()
    );
    let body: Value = r.json().await?;
    ensure!(
        body["ts"] == json!(appended.get()),
        "the retry's ts is not the original's: {body}"
    );
    ensure!(body["outcome"] == "committed", "{body}");
    // Another key is another transaction; the same key from the same token again is a duplicate.
    let r = send(apis[1].clone(), "transfer-2").await?;
    ensure!(r.status() == 200 && r.headers().get("idempotent-replayed").is_none());
    let second: Value = r.json().await?;
    let r = send(apis[1].clone(), "transfer-1").await?;
    ensure!(r.status() == 200);
    let third: Value = r.json().await?;
    ensure!(third["ts"] == json!(appended.get()), "{third}");
    let last = second["ts"].as_u64().context("ts")?;
    let read = |id: &'static str| {
        let http = http.clone();
        let api = apis[1].clone();
        async move {
            let r = http
                .get(format!("{api}/v1/collections/tally/documents/{id}"))
                .bearer_auth(API_TOKEN)
                .header("causeway-after", last.to_string())
                .send()
                .await?;
            let body: Value = r.json().await?;
            body["n"].as_i64().context("n")
        }
    };
    let (t, u) = (read("t").await?, read("u").await?);
    ensure!(
        (t, u) == (10, 2),
        "applied {t}/5 and {u}/1 times: each key once"
    );
    cluster.verify_replicas_agree(DEADLINE).await?;
    Ok(())
}
