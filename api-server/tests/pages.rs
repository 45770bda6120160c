//! Through the whole read path, with a config manager, one store node and an api-server in
//! this process (`support::Cluster` on an embedded log: no Kafka): large answers, and change
//! streams whose token is revoked.

mod support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_api_server as api;
use serde_json::{json, Value};
use support::{within, Cluster, Log, TOKEN};

/// One store node (1×1) and an api-server reading its tokens file every `tokens_reload_ms`.
async fn start(tokens_reload_ms: u64) -> Result<Cluster> {
    let base = api::Options {
        tokens_reload_ms,
        ..api::Options::default()
    };
    Cluster::start_on(Log::Embedded, 1, 1, 1, 1, base).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_page_of_1000_documents_of_5_kb_is_served() -> Result<()> {
    let cluster = start(2000).await?;
    let http = &cluster.http;

    // 1,000 documents of 5 KB, 100 to a transaction (a record stays under the log's 1 MiB).
    let pad = "p".repeat(5000);
    let mut last_ts = 0;
    for batch in 0..10 {
        let mutations: Vec<Value> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                json!({"op": "replace", "collection": "big", "id": format!("d{n:04}"),
                       "document": {"n": n, "pad": pad}})
            })
            .collect();
        let r = http
            .post(cluster.url(0, "/v1/transactions"))
            .bearer_auth(TOKEN)
            .json(&json!({ "mutations": mutations }))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        ensure!(status == 200, "batch {batch}: {status} {body}");
        last_ts = body["ts"].as_u64().context("no ts")?;
    }

    // One page of all of them, read after the last write.
    let page = within("the query", async {
        loop {
            let r = http
                .post(cluster.url(0, "/v1/collections/big/query"))
                .bearer_auth(TOKEN)
                .header("causeway-after", last_ts.to_string())
                .json(&json!({"limit": 1000}))
                .send()
                .await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            // 503: the store node is not serving yet (its configuration or the causal wait).
            if status == 503 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return Ok::<_, anyhow::Error>((status, body));
        }
    })
    .await??;
    let (status, body) = page;
    ensure!(status == 200, "the page: {status} {body}");
    let documents = body["documents"].as_array().context("no documents")?;
    ensure!(documents.len() == 1000, "{} documents", documents.len());
    ensure!(documents
        .iter()
        .all(|d| d["document"]["pad"].as_str().map(str::len) == Some(5000)));
    ensure!(body["partial"] == json!(false), "a partial page");

    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stream_ends_when_its_token_is_removed() -> Result<()> {
    let cluster = start(100).await?;
    let http = &cluster.http;
    let stream = within("the stream opening", async {
        loop {
            let r = http
                .get(cluster.url(0, "/v1/changes"))
                .bearer_auth(TOKEN)
                .send()
                .await?;
            if r.status() == 503 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return Ok::<_, anyhow::Error>(r);
        }
    })
    .await??;
    ensure!(stream.status() == 200, "the stream: {}", stream.status());
    // The token leaves the tokens file (another token stays): the open stream ends.
    std::fs::write(
        &cluster.tokens,
        serde_json::to_vec(&json!({"tokens": [
            {"name": "other", "token": "another-token-0123456789abcdef", "admin": true}
        ]}))?,
    )?;
    let read = tokio::time::timeout(Duration::from_secs(15), stream.bytes()).await;
    ensure!(read.is_ok(), "the stream of a removed token is still open");
    cluster.stop().await
}
