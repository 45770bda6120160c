//! Through the whole read path, with a config manager, one store node and an api-server in
//! this process: large answers, and change streams whose token is revoked. They share one
//! embedded transaction log on a temp dir (no Kafka), with RocksDB on a temp dir and tonic over
//! loopback.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_api_server as api;
use causeway_config_manager as cm;
use causeway_store_node as store_node;
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use serde_json::{json, Value};

const TOKEN: &str = "pages-test-admin-token-0123456789";
/// Every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(60);

/// A config manager, one store node (1×1, bootstrapped) and an api-server in this process, on
/// one embedded log; `tokens` is the api-server's tokens file.
struct Cluster {
    base: String,
    tokens: std::path::PathBuf,
    log: TxLog,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(tokens_reload_ms: u64) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let log_options = LogOptions::Embedded(EmbeddedOptions::new(dir.path().join("log")));
        let log = TxLog::open(log_options.clone()).await?;

        let cm_service = cm::Service::bind(cm::Options {
            listen_addr: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join("config-manager"),
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 2000,
            ..cm::Options::default()
        })
        .await?;
        let cm_addr = cm_service.local_addr().to_string();
        let (cm_stop, cm_stopped) = tokio::sync::oneshot::channel::<()>();
        let cm_task = tokio::spawn(async move {
            let stopped = async move {
                let _ = cm_stopped.await;
            };
            Ok(cm_service.run(stopped).await?)
        });

        let node_options: store_node::Options = serde_json::from_value(json!({
            "node_id": 1,
            "listen": "127.0.0.1:0",
            "data_dir": dir.path().join("node-1"),
            "config_manager": cm_addr,
            "log": log_options,
        }))?;
        let node = store_node::Service::bind_with_log(node_options, log.clone()).await?;
        let (node_stop, node_stopped) = tokio::sync::oneshot::channel::<()>();
        let node_task = tokio::spawn(async move {
            let stopped = async move {
                let _ = node_stopped.await;
            };
            Ok(node.run(stopped).await?)
        });
        let client = cm::Client::connect(&cm_addr, &causeway_proto::link::Link::open()).await?;
        tokio::time::timeout(DEADLINE, async {
            while !client.list_nodes().await?.iter().any(|n| n.live) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("the store node never registered")??;
        client.bootstrap(1, 1).await?;

        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            serde_json::to_vec(&json!({"tokens": [{"name": "t", "token": TOKEN, "admin": true}]}))?,
        )?;
        let api_service = api::Service::bind_with_log(
            api::Options {
                listen_addr: "127.0.0.1:0".parse()?,
                config_manager_addr: cm_addr.clone(),
                tokens_file: Some(tokens),
                tokens_reload_ms,
                ..api::Options::default()
            },
            log.clone(),
        )
        .await?;
        let base = format!("http://{}", api_service.local_addr());
        let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let api_task = tokio::spawn(async move {
            let stopped = async move {
                let _ = api_stopped.await;
            };
            Ok(api_service.run(stopped).await?)
        });
        Ok(Cluster {
            base,
            tokens: dir.path().join("tokens.json"),
            log,
            stops: vec![api_stop, node_stop, cm_stop],
            tasks: vec![api_task, node_task, cm_task],
            _dir: dir,
        })
    }

    async fn stop(self) -> Result<()> {
        for (stop, task) in self.stops.into_iter().zip(self.tasks) {
            let _ = stop.send(());
            tokio::time::timeout(DEADLINE, task).await???;
        }
        self.log.close().await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_page_of_1000_documents_of_5_kb_is_served() -> Result<()> {
    let cluster = Cluster::start(2000).await?;
    let base = cluster.base.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

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
            .post(format!("{base}/v1/transactions"))
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
    let page = tokio::time::timeout(DEADLINE, async {
        loop {
            let r = http
                .post(format!("{base}/v1/collections/big/query"))
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
    .await
    .context("the query was never served")??;
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
    let cluster = Cluster::start(100).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let stream = tokio::time::timeout(DEADLINE, async {
        loop {
            let r = http
                .get(format!("{}/v1/changes", cluster.base))
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
    .await
    .context("the stream never opened")??;
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
