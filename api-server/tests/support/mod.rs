//! The cluster of the full-cluster tests of the HTTP API: a config manager, store nodes and
//! api-servers composed in one process from their real libraries, over a real Apache Kafka (the
//! shared `causeway_txlog::testing::Broker`) as the transaction log, or an embedded log on a temp
//! dir where Kafka plays no part, with RocksDB on temp dirs and tonic over loopback. Every wait is
//! bounded. Shared by the test binaries of this directory, so each uses only part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_api_server as api;
use causeway_config_manager as cm;
use causeway_store_node as store_node;
use causeway_txlog::testing::Broker;
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The admin token of every api-server.
pub const TOKEN: &str = "cluster-test-admin-token-0123456789";
/// A token that may read the collections starting with `seen` and nothing else.
pub const READER_TOKEN: &str = "cluster-test-reader-token-0123456789";
/// A token that may only write, to `seen`.
pub const WRITER_TOKEN: &str = "cluster-test-writer-token-0123456789";
/// Every wait for the cluster is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(40);

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .with_context(|| format!("{what} did not finish within {DEADLINE:?}"))
}

/// A running service: how to stop it and its task.
struct Running<E> {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), E>>,
}

fn spawn<E: Send + 'static, F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running<E>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel();
    Running {
        stop,
        task: tokio::spawn(run(stopped)),
    }
}

/// Where a cluster's transaction log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// A topic of this test binary's shared Kafka broker.
    Kafka,
    /// An embedded log on the cluster's temp dir, one instance shared by every service.
    Embedded,
}

pub struct Cluster {
    pub apis: Vec<SocketAddr>,
    /// The api-servers' tokens file: `TOKEN`, `READER_TOKEN` and `WRITER_TOKEN`.
    pub tokens: std::path::PathBuf,
    api_tasks: Vec<Running<api::Error>>,
    nodes: Vec<Running<store_node::ServiceError>>,
    config_manager: Running<cm::Error>,
    /// The embedded log, closed at the stop.
    embedded: Option<TxLog>,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `nodes` store nodes as `partitions × replicas`, and `apis` api-servers.
    pub async fn start(nodes: u64, partitions: u32, replicas: u32, apis: usize) -> Result<Cluster> {
        Cluster::start_with(nodes, partitions, replicas, apis, api::Options::default()).await
    }

    /// As `start`, with the api-servers' other settings (limits, timeouts, admission) taken
    /// from `base`.
    pub async fn start_with(
        nodes: u64,
        partitions: u32,
        replicas: u32,
        apis: usize,
        base: api::Options,
    ) -> Result<Cluster> {
        Cluster::start_on(Log::Kafka, nodes, partitions, replicas, apis, base).await
    }

    /// As `start_with`, on the log `on`.
    pub async fn start_on(
        on: Log,
        nodes: u64,
        partitions: u32,
        replicas: u32,
        apis: usize,
        base: api::Options,
    ) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let (log, embedded) = match on {
            Log::Kafka => {
                let broker =
                    tokio::task::block_in_place(Broker::shared).context("starting Kafka")?;
                static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
                let topic = format!("causeway-tx-{}", CLUSTERS.fetch_add(1, Ordering::Relaxed));
                (LogOptions::Kafka(broker.log_options(&topic)), None)
            }
            Log::Embedded => {
                let log = LogOptions::Embedded(EmbeddedOptions::new(dir.path().join("log")));
                let opened = TxLog::open(log.clone()).await?;
                (log, Some(opened))
            }
        };

        let cm_service = cm::Service::bind(cm::Options {
            listen_addr: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join("config-manager"),
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 2000,
            ..cm::Options::default()
        })
        .await?;
        let cm_addr = cm_service.local_addr().to_string();
        let config_manager = spawn(|stopped| {
            cm_service.run(async move {
                let _ = stopped.await;
            })
        });

        let mut node_tasks = Vec::new();
        for i in 1..=nodes {
            let options: store_node::Options = serde_json::from_value(json!({
                "node_id": i,
                "listen": "127.0.0.1:0",
                "data_dir": dir.path().join(format!("node-{i}")),
                "config_manager": cm_addr,
                "log": log,
            }))?;
            let service = match &embedded {
                Some(log) => store_node::Service::bind_with_log(options, log.clone()).await?,
                None => store_node::Service::bind(options).await?,
            };
            node_tasks.push(spawn(|stopped| {
                service.run(async move {
                    let _ = stopped.await;
                })
            }));
        }

        // Bootstrap once every node has registered.
        let client = cm::Client::connect(&cm_addr, &causeway_proto::link::Link::open()).await?;
        within("store nodes registering", async {
            loop {
                let live = client.list_nodes().await?.iter().filter(|n| n.live).count();
                if live as u64 == nodes {
                    return Ok::<_, anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await??;
        client.bootstrap(partitions, replicas).await?;

        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            serde_json::to_vec(&json!({"tokens": [
                {"name": "t", "token": TOKEN, "admin": true},
                {"name": "reader", "token": READER_TOKEN, "read": ["seen*"]},
                {"name": "writer", "token": WRITER_TOKEN, "write": ["seen"]},
            ]}))?,
        )?;
        let mut addrs = Vec::new();
        let mut api_tasks = Vec::new();
        for _ in 0..apis {
            let options = api::Options {
                listen_addr: "127.0.0.1:0".parse()?,
                config_manager_addr: cm_addr.clone(),
                log: log.clone(),
                tokens_file: Some(tokens.clone()),
                ..base.clone()
            };
            let service = match &embedded {
                Some(log) => api::Service::bind_with_log(options, log.clone()).await?,
                None => api::Service::bind(options).await?,
            };
            addrs.push(service.local_addr());
            api_tasks.push(spawn(|stopped| {
                service.run(async move {
                    let _ = stopped.await;
                })
            }));
        }
        let cluster = Cluster {
            apis: addrs,
            tokens,
            api_tasks,
            nodes: node_tasks,
            config_manager,
            embedded,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            _dir: dir,
        };
        cluster.wait_serving().await?;
        Ok(cluster)
    }

    /// Waits until every api-server answers reads (a missing document: 404, not 503).
    pub async fn wait_serving(&self) -> Result<()> {
        for i in 0..self.apis.len() {
            within("the cluster serving reads", async {
                loop {
                    let r = self.get(i, "probe", "none", None).await?;
                    if r.0 == 404 {
                        return Ok::<_, anyhow::Error>(());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await??;
        }
        Ok(())
    }

    pub fn url(&self, api: usize, path: &str) -> String {
        format!("http://{}{}", self.apis[api], path)
    }

    /// GET a document: (status, read ts header, body).
    pub async fn get(
        &self,
        api: usize,
        collection: &str,
        id: &str,
        after: Option<u64>,
    ) -> Result<(u16, String, Value)> {
        let mut req = self
            .http
            .get(self.url(api, &format!("/v1/collections/{collection}/documents/{id}")))
            .bearer_auth(TOKEN);
        if let Some(ts) = after {
            req = req.header("causeway-after", ts.to_string());
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let read_ts = r
            .headers()
            .get("causeway-read-timestamp")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = r.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, read_ts, body))
    }

    /// A write (PUT, PATCH, DELETE, POST) answering its commit ts.
    pub async fn write(
        &self,
        api: usize,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> Result<u64> {
        let mut req = self
            .http
            .request(method.parse()?, self.url(api, path))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req
                .header("content-type", content_type)
                .body(serde_json::to_vec(&b)?);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let header: Option<u64> = r
            .headers()
            .get("causeway-timestamp")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body: Value = r.json().await?;
        ensure!(status == 200, "{method} {path}: {status} {body}");
        let ts = body["ts"].as_u64().context("no ts")?;
        ensure!(header == Some(ts), "header and body ts differ");
        Ok(ts)
    }

    pub async fn post_json(
        &self,
        api: usize,
        path: &str,
        body: Value,
        after: u64,
    ) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(self.url(api, path))
            .bearer_auth(TOKEN)
            .header("causeway-after", after.to_string())
            .json(&body)
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    pub async fn stop(self) -> Result<()> {
        for r in self.api_tasks {
            let _ = r.stop.send(());
            within("api-server stopping", r.task).await???;
        }
        for r in self.nodes {
            let _ = r.stop.send(());
            within("store node stopping", r.task).await???;
        }
        let _ = self.config_manager.stop.send(());
        within("config manager stopping", self.config_manager.task).await???;
        if let Some(log) = self.embedded {
            log.close().await?;
        }
        Ok(())
    }
}

pub fn read_ts(header: &str) -> Result<u64> {
    let (_, ts) = header
        .split_once('.')
        .context("read timestamp <epoch>.<ts>")?;
    Ok(ts.parse()?)
}
