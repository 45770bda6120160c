//! `?wait=visible` on real processes: a write answered `"visible": true` through one
//! api-server is seen by a plain read (no `Causeway-After`) through another one at once,
//! whichever store node coordinates that read; and a dead store node (connection refused) does
//! not make writes invisible, before or while it restarts.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use causeway_core::NodeId;
use causeway_tests::{ClusterSpec, LocalCluster, API_TOKEN};
use serde_json::{json, Value};

/// How many documents the writes go round: a later write of one replaces its value, so a read
/// that runs behind finds an older value (or none) rather than the one just written.
const DOCS: usize = 5;
/// Plain reads after each write.
const READS: usize = 4;
/// Every phase of writes ends within this time.
const PHASE: Duration = Duration::from_secs(120);

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// One plain read after a write.
#[derive(Debug)]
#[allow(dead_code)] // Read through `Debug`, in failure messages.
struct Read {
    status: u16,
    read_timestamp: Option<String>,
    body: String,
}

/// A write that did not answer `visible: true`, or whose value one of the reads after it did
/// not find.
#[derive(Debug)]
#[allow(dead_code)] // Read through `Debug`, in failure messages.
struct Miss {
    write: usize,
    ts: u64,
    visible: Value,
    /// The reads that missed it.
    reads: Vec<Read>,
}

/// Writes `count` values (`first..first + count`) with `?wait=visible` through `writer`, each
/// followed at once by `READS` concurrent plain GETs (no `Causeway-After`) through `reader`;
/// answers the writes that did not say `visible: true` or that a read did not find.
///
/// `reader` spreads the reads it coordinates over the store nodes in turn, so the `READS`
/// concurrent reads of one write are coordinated by `READS` different nodes (all of them in a
/// 2×2 cluster with every node up), whichever node answered the writer's wait.
async fn write_then_read(
    http: &reqwest::Client,
    writer: &str,
    reader: &str,
    first: usize,
    count: usize,
) -> Result<Vec<Miss>> {
    let end = Instant::now() + PHASE;
    let mut misses = Vec::new();
    for n in first..first + count {
        if Instant::now() >= end {
            bail!(
                "the writes took longer than {PHASE:?} (at write {n} of {first}..{})",
                first + count
            );
        }
        let path = format!("/v1/collections/visible/documents/d{}", n % DOCS);
        let write = http
            .put(format!("{writer}{path}?wait=visible"))
            .bearer_auth(API_TOKEN)
            .json(&json!({ "n": n }))
            .send()
            .await?;
        let status = write.status();
        let body: Value = write.json().await?;
        if !status.is_success() {
            bail!("write {n} answered {status}: {body}");
        }
        let ts = body["ts"]
            .as_u64()
            .ok_or_else(|| anyhow!("write {n} answered no ts: {body}"))?;
        let visible = body["visible"].clone();

        let reads = (0..READS).map(|_| async {
            let read = http
                .get(format!("{reader}{path}"))
                .bearer_auth(API_TOKEN)
                .send()
                .await?;
            let status = read.status().as_u16();
            let read_timestamp = read
                .headers()
                .get("causeway-read-timestamp")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = read.text().await?;
            Ok::<_, anyhow::Error>(Read {
                status,
                read_timestamp,
                body,
            })
        });
        let mut missed = Vec::new();
        for read in futures::future::join_all(reads).await {
            let read = read?;
            let found = read.status == 200
                && serde_json::from_str::<Value>(&read.body).is_ok_and(|v| v["n"] == json!(n));
            if !found {
                missed.push(read);
            }
        }
        if visible != json!(true) || !missed.is_empty() {
            misses.push(Miss {
                write: n,
                ts,
                visible,
                reads: missed,
            });
        }
    }
    Ok(misses)
}

fn check(what: &str, count: usize, misses: &[Miss], cluster: &LocalCluster) {
    let invisible = misses.iter().filter(|m| m.visible != json!(true)).count();
    let unseen = misses.iter().filter(|m| m.visible == json!(true)).count();
    let reads: usize = misses.iter().map(|m| m.reads.len()).sum();
    assert!(
        misses.is_empty(),
        "{what}: of {count} writes, {invisible} did not answer visible: true and {unseen} \
         answered it but a read through the other api-server missed them ({reads} of {} \
         reads missed):\n{misses:#?}\n{}",
        count * READS,
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visible_write_is_seen_through_another_api_server() {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    let urls = cluster.api_urls();
    let http = http().unwrap();
    const COUNT: usize = 30;
    let misses = write_then_read(&http, &urls[0], &urls[1], 0, COUNT)
        .await
        .unwrap();
    check("all nodes up", COUNT, &misses, &cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_node_does_not_make_writes_invisible() {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    let urls = cluster.api_urls();
    let http = http().unwrap();
    const COUNT: usize = 15;

    // Connection refused: the node cannot coordinate a read, so it is left out of the wait;
    // its partition's other replica keeps the UST going.
    let dead = NodeId(4);
    cluster.kill(dead).unwrap();
    let misses = write_then_read(&http, &urls[0], &urls[1], 0, COUNT)
        .await
        .unwrap();
    check("one node dead", COUNT, &misses, &cluster);

    // While it starts again: it is asked once it listens, and coordinates reads only at a UST
    // view at least as high as its peers'.
    cluster.restart(dead).unwrap();
    let misses = write_then_read(&http, &urls[0], &urls[1], COUNT, COUNT)
        .await
        .unwrap();
    check("the node restarting", COUNT, &misses, &cluster);

    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let misses = write_then_read(&http, &urls[0], &urls[1], 2 * COUNT, COUNT)
        .await
        .unwrap();
    check("the node back", COUNT, &misses, &cluster);
}
