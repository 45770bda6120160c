//! Full-cluster tests of the HTTP API (`support::Cluster`: a config manager, store nodes and
//! api-servers in this process over a real Apache Kafka).

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use causeway_api_server as api;
use serde_json::{json, Value};

use support::{read_ts, within, Cluster, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crud_round_trips_keep_json_types() -> Result<()> {
    let c = Cluster::start(2, 2, 1, 1).await?;
    let doc = "/v1/collections/things/documents/t-1";
    let value = json!({
        "int": -42, "big": 9_007_199_254_740_993_u64, "float": 2.5, "s": "é ✓ \"q\"",
        "t": true, "f": false, "z": null, "arr": [1, "two", [3], {"four": 4}],
        "obj": {"nested": {"deep": [null]}}
    });
    let ts = c
        .write(0, "PUT", doc, "application/json", Some(value.clone()))
        .await?;
    let (status, at, body) = c.get(0, "things", "t-1", Some(ts)).await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(
        read_ts(&at)? >= ts,
        "read at {at} below the write's ts {ts}"
    );
    ensure!(
        body == value,
        "round trip changed the document:\n{body}\n{value}"
    );

    let ts = c
        .write(
            0,
            "PATCH",
            doc,
            "application/merge-patch+json",
            Some(json!({"s": null, "obj": {"added": 1}, "$increment": {"counters.hits": 3}})),
        )
        .await?;
    let (_, _, body) = c.get(0, "things", "t-1", Some(ts)).await?;
    ensure!(body.get("s").is_none(), "merge patch null removes: {body}");
    ensure!(
        body["obj"] == json!({"nested": {"deep": [null]}, "added": 1}),
        "{body}"
    );
    ensure!(body["counters"]["hits"] == json!(3), "{body}");
    ensure!(body["int"] == json!(-42));

    // Multi-get at one read timestamp, and a query.
    for i in 0..5 {
        c.write(
            0,
            "PUT",
            &format!("/v1/collections/things/documents/q-{i}"),
            "application/json",
            Some(json!({"rank": i, "even": i % 2 == 0})),
        )
        .await?;
    }
    let last = c
        .write(
            0,
            "PUT",
            "/v1/collections/things/documents/q-5",
            "application/json",
            Some(json!({"rank": 5, "even": false})),
        )
        .await?;
    let (status, body) = c
        .post_json(
            0,
            "/v1/documents:get",
            json!({"keys": [
            {"collection": "things", "id": "q-1"}, {"collection": "things", "id": "missing"}]}),
            last,
        )
        .await?;
    ensure!(status == 200, "{body}");
    ensure!(
        body["documents"][0]["document"] == json!({"rank": 1, "even": false}),
        "{body}"
    );
    ensure!(body["documents"][1]["found"] == json!(false), "{body}");

    let (status, body) = c
        .post_json(
            0,
            "/v1/collections/things/query",
            json!({"filter": {"even": true, "rank": {"$gte": 0}}, "order": {"path": "rank", "descending": true}}),
            last,
        )
        .await?;
    ensure!(status == 200, "{body}");
    let ranks: Vec<i64> = body["documents"]
        .as_array()
        .context("documents")?
        .iter()
        .filter_map(|d| d["document"]["rank"].as_i64())
        .collect();
    ensure!(ranks == vec![4, 2, 0], "query answered {ranks:?}: {body}");

    // Pages of 2 with a cursor cover all 6 q- documents once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = json!({"filter": {"rank": {"$exists": true}}, "limit": 2});
        if let Some(cur) = &cursor {
            q["cursor"] = json!(cur);
        }
        let (status, body) = c
            .post_json(0, "/v1/collections/things/query", q, last)
            .await?;
        ensure!(status == 200, "{body}");
        for d in body["documents"].as_array().context("documents")? {
            seen.push(d["id"].as_str().unwrap_or("").to_owned());
        }
        cursor = body["cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    seen.sort();
    ensure!(
        seen == (0..6).map(|i| format!("q-{i}")).collect::<Vec<_>>(),
        "pages: {seen:?}"
    );

    let ts = c.write(0, "DELETE", doc, "", None).await?;
    let (status, at, _) = c.get(0, "things", "t-1", Some(ts)).await?;
    ensure!(status == 404 && read_ts(&at)? >= ts, "{status} {at}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_counter_increments_add_up() -> Result<()> {
    let c = Arc::new(Cluster::start(2, 1, 2, 1).await?);
    let (writers, each) = (8, 10);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..each {
                let ts = c
                    .write(
                        0,
                        "PATCH",
                        "/v1/collections/counters/documents/c",
                        "application/json",
                        Some(json!({"$increment": {"n": 1, "by.writer": w + 1}})),
                    )
                    .await?;
                max = max.max(ts);
            }
            Ok::<u64, anyhow::Error>(max)
        }));
    }
    let mut max = 0;
    for t in tasks {
        max = max.max(within("writers", t).await???);
    }
    let (status, _, body) = c.get(0, "counters", "c", Some(max)).await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["n"] == json!(writers * each), "{body}");
    ensure!(
        body["by"]["writer"] == json!((1..=writers).sum::<u64>() * each),
        "{body}"
    );
    let Ok(c) = Arc::try_unwrap(c) else {
        bail!("cluster still shared")
    };
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_document_transactions_are_all_or_nothing_to_readers() -> Result<()> {
    let c = Arc::new(Cluster::start(2, 2, 1, 1).await?);
    // Keys that land in different partitions are likely among several accounts.
    let accounts: Vec<String> = (0..4).map(|i| format!("acct-{i}")).collect();
    let mut setup = Vec::new();
    for a in &accounts {
        setup.push(
            json!({"op": "replace", "collection": "bank", "id": a, "document": {"balance": 100}}),
        );
    }
    let ts0 = c
        .write(
            0,
            "POST",
            "/v1/transactions",
            "application/json",
            Some(json!({ "mutations": setup })),
        )
        .await?;
    let total = 100 * accounts.len() as i64;

    let writer = {
        let c = c.clone();
        let accounts = accounts.clone();
        tokio::spawn(async move {
            for i in 0..30usize {
                let (from, to) = (&accounts[i % 4], &accounts[(i + 1) % 4]);
                c.write(0, "POST", "/v1/transactions", "application/json", Some(json!({"mutations": [
                    {"op": "increment", "collection": "bank", "id": from, "path": "balance", "delta": -7},
                    {"op": "increment", "collection": "bank", "id": to, "path": "balance", "delta": 7},
                ]}))).await?;
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let keys: Vec<Value> = accounts
        .iter()
        .map(|a| json!({"collection": "bank", "id": a}))
        .collect();
    let mut reads = 0;
    while !writer.is_finished() || reads < 5 {
        let (status, body) = c
            .post_json(0, "/v1/documents:get", json!({ "keys": keys }), ts0)
            .await?;
        ensure!(status == 200, "{body}");
        let sum: i64 = body["documents"]
            .as_array()
            .context("documents")?
            .iter()
            .map(|d| d["document"]["balance"].as_i64().unwrap_or(0))
            .sum();
        ensure!(
            sum == total,
            "a reader saw a partial transaction: {sum} != {total}: {body}"
        );
        reads += 1;
        ensure!(reads < 10_000, "too many reads");
    }
    within("writer", writer).await???;
    // The transfers moved money: in a ring of 30 transfers of 7, acct-0 paid 8 and got 7,
    // acct-2 paid 7 and got 8 (balances that stayed put would pass the check above).
    let last = c
        .write(
            0,
            "POST",
            "/v1/transactions?wait=visible",
            "application/json",
            Some(json!({"mutations": [
                {"op": "merge_patch", "collection": "marks", "id": "done", "patch": {"ok": true}},
            ]})),
        )
        .await?;
    let (status, body) = c
        .post_json(0, "/v1/documents:get", json!({ "keys": keys }), last)
        .await?;
    ensure!(status == 200, "{body}");
    let balances: Vec<i64> = body["documents"]
        .as_array()
        .context("documents")?
        .iter()
        .map(|d| d["document"]["balance"].as_i64().unwrap_or(-1))
        .collect();
    ensure!(
        balances == [93, 100, 107, 100],
        "the transfers did not move the money they should: {balances:?}"
    );
    let Ok(c) = Arc::try_unwrap(c) else {
        bail!("cluster still shared")
    };
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_two_api_servers() -> Result<()> {
    let c = Cluster::start(2, 1, 2, 2).await?;
    for i in 0..20 {
        let ts = c
            .write(
                0,
                "PUT",
                "/v1/collections/sessions/documents/s",
                "application/json",
                Some(json!({ "v": i })),
            )
            .await?;
        // The other api-server, with the causal token: it sees the write (or a later one).
        let (status, at, body) = c.get(1, "sessions", "s", Some(ts)).await?;
        ensure!(status == 200, "{status} {body}");
        ensure!(read_ts(&at)? >= ts);
        ensure!(body["v"] == json!(i), "read {body} after writing v={i}");
    }
    c.stop().await
}

/// Fields of each document the admission test writes (every write changes them all).
const WIDE_FIELDS: usize = 20;

/// What an open-loop load of writes came to.
#[derive(Debug, Default)]
struct Shed {
    accepted: u64,
    throttled: u64,
    /// Visibility lags of sampled accepted writes (ack until a `Causeway-After` read saw them).
    lags_ms: Vec<u64>,
}

impl Shed {
    fn lag_p99(&mut self) -> u64 {
        self.lags_ms.sort_unstable();
        let n = self.lags_ms.len();
        self.lags_ms
            .get(n.saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or(0)
    }
}

/// Writes of a wide document (many fields, each changed by every write: costly to apply), at
/// `rate` per second for `length`, open loop, at most 256 in flight. Every 25th accepted write
/// is probed until a read with its causal token answers (each probe bounded by 30 s). A 429
/// must be a `throttled` problem with a `Retry-After`; anything else but 200 fails.
async fn open_loop(c: &Arc<Cluster>, rate: u64, length: Duration) -> Result<Shed> {
    let shed = Arc::new(std::sync::Mutex::new(Shed::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let total = (length.as_secs_f64() * rate as f64) as u64;
    for n in 0..total {
        tokio::time::sleep_until(start + every * n as u32).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let (c, shed) = (c.clone(), shed.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let doc: serde_json::Map<String, Value> = (0..WIDE_FIELDS)
                .map(|f| {
                    (
                        format!("field{f}"),
                        json!(format!("{n}-{f}-{}", "v".repeat(24))),
                    )
                })
                .collect();
            let r = c
                .http
                .put(c.url(0, &format!("/v1/collections/wide/documents/d{}", n % 500)))
                .bearer_auth(TOKEN)
                .json(&doc)
                .send()
                .await?;
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            let acked = tokio::time::Instant::now();
            let body: Value = r.json().await?;
            match status {
                200 => {}
                429 => {
                    ensure!(retry_after, "a 429 without Retry-After: {body}");
                    ensure!(
                        body["type"] == "urn:causeway:problem:throttled",
                        "429 of another type: {body}"
                    );
                    shed.lock().unwrap().throttled += 1;
                    return Ok(());
                }
                other => bail!("write {n}: {other} {body}"),
            }
            shed.lock().unwrap().accepted += 1;
            if n % 25 != 0 {
                return Ok(());
            }
            let ts = body["ts"].as_u64().context("no ts")?;
            let until = acked + Duration::from_secs(30);
            loop {
                let (status, _, body) =
                    c.get(0, "wide", &format!("d{}", n % 500), Some(ts)).await?;
                if status == 200 {
                    break;
                }
                ensure!(status == 503, "probe of ts {ts}: {status} {body}");
                ensure!(
                    tokio::time::Instant::now() < until,
                    "ts {ts} not visible in 30 s"
                );
            }
            let lag = u64::try_from(acked.elapsed().as_millis()).unwrap_or(u64::MAX);
            shed.lock().unwrap().lags_ms.push(lag);
            Ok::<_, anyhow::Error>(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = within("the open-loop writes", tasks.join_next()).await? {
        done??;
    }
    let shed = std::mem::take(&mut *shed.lock().unwrap());
    Ok(shed)
}

/// Admission control: writes offered far above what the one store node applies are shed with
/// 429 once the visibility lag passes half the bound, so the lag of the accepted ones stays
/// near the bound instead of growing with the backlog (without it, this load leaves the node
/// tens of seconds behind); once the load drops, nothing is refused and the lag is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_sheds_writes_past_the_lag_bound_and_recovers() -> Result<()> {
    const MAX_LAG_MS: u64 = 400;
    let base = api::Options {
        admission: causeway_core::admission::AdmissionOptions {
            max_lag_ms: MAX_LAG_MS,
            ..Default::default()
        },
        ..api::Options::default()
    };
    let c = Arc::new(Cluster::start_with(1, 1, 1, 1, base).await?);
    let mut overload = open_loop(&c, 1000, Duration::from_secs(8)).await?;
    let lag = overload.lag_p99();
    println!(
        "overload: {} accepted, {} throttled, lag p99 {lag} ms over {} probes",
        overload.accepted,
        overload.throttled,
        overload.lags_ms.len()
    );
    ensure!(overload.throttled > 0, "nothing was shed: {overload:?}");
    ensure!(overload.accepted > 0, "nothing was accepted");
    // The bound, plus what the samples cannot see past (gossip, sampling, the probe's own
    // reads) and the controller's overshoot.
    ensure!(
        lag <= 3 * MAX_LAG_MS,
        "visibility lag p99 {lag} ms under admission control (bound {MAX_LAG_MS} ms)"
    );
    // Recovery: the backlog drains, then a light load is never refused.
    tokio::time::sleep(Duration::from_millis(2 * MAX_LAG_MS)).await;
    let mut light = open_loop(&c, 40, Duration::from_secs(3)).await?;
    let lag = light.lag_p99();
    println!(
        "light load: {} accepted, {} throttled, lag p99 {lag} ms",
        light.accepted, light.throttled
    );
    ensure!(
        light.throttled == 0,
        "writes refused after the load dropped"
    );
    ensure!(lag <= MAX_LAG_MS, "lag p99 {lag} ms after the load dropped");
    let Ok(c) = Arc::try_unwrap(c) else {
        bail!("cluster still shared")
    };
    c.stop().await
}
