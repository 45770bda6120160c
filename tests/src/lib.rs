//! Causeway's cross-component tests and the `LocalCluster` harness.
//!
//! A [`LocalCluster`] runs the real binaries as OS processes on loopback: one
//! `causeway-config-manager` and `P × R` `causeway-store-node`s, each with its own directory and
//! log file, against a real Apache Kafka (one broker per test process, `causeway_txlog::testing::Broker::shared`,
//! a topic per cluster).
//! It bootstraps the cluster, waits until every node can coordinate reads, and can kill -9,
//! restart, pause (SIGSTOP) and resume nodes. Set `CAUSEWAY_KEEP_TEST_DIR=1` to keep the
//! directories (their path is printed), with every process's log.
//!
//! # Layout
//! - [`LocalCluster`], [`ClusterSpec`]: the harness.
//! - [`tx`]: small builders of `Transaction` records for tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use causeway_config_manager::Client as ConfigClient;
use causeway_core::{NodeId, Timestamp};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{self as pb, Transaction};
use causeway_store_node::{Options as NodeOptions, Tuning};
use causeway_txlog::testing::Broker;
use causeway_txlog::{LogOptions, TxLog};
use tonic::transport::Channel;

/// The shape of a cluster to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub partitions: u32,
    pub replicas: u32,
    /// Node tuning (gossip interval, liveness timeout, GC cadence, ...).
    pub tuning: Tuning,
}

impl ClusterSpec {
    pub fn new(partitions: u32, replicas: u32) -> ClusterSpec {
        let tuning = Tuning {
            liveness_timeout_ms: 600,
            gc_interval_ms: 50,
            read_timeout_ms: 10_000,
            ..Tuning::default()
        };
        ClusterSpec {
            partitions,
            replicas,
            tuning,
        }
    }
}

/// One child process and where its output goes.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, log: PathBuf) -> Result<Proc> {
        let out = File::options().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`, ...) with the `kill` command.
    fn signal(&self, signal: &str) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("process not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", child.id());
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug)]
struct Node {
    proc: Proc,
    addr: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
}

/// A cluster of real processes. Dropping it kills them all.
#[derive(Debug)]
pub struct LocalCluster {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    broker: &'static Broker,
    log: TxLog,
    cm: Proc,
    cm_addr: SocketAddr,
    nodes: BTreeMap<NodeId, Node>,
}

/// Where the workspace's binaries are: next to the test executable's `deps` directory.
fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound and released: the process that takes it binds it again).
fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Retries `f` every 20 ms until it gives `Some` or `deadline` passes.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl LocalCluster {
    /// Starts a broker, a config manager and `P × R` store nodes, bootstraps the cluster and
    /// waits until every node can coordinate reads.
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster> {
        let tmp = tempfile::Builder::new()
            .prefix("causeway-cluster-")
            .tempdir()?;
        let (root, tmp) = if std::env::var_os("CAUSEWAY_KEEP_TEST_DIR").is_some() {
            let root = tmp.keep();
            eprintln!("cluster directory kept: {}", root.display());
            (root, None)
        } else {
            (tmp.path().to_path_buf(), Some(tmp))
        };
        let broker = tokio::task::block_in_place(Broker::shared).context("starting Kafka")?;
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_options = LogOptions::Kafka(broker.log_options(&format!("causeway-tx-{n}")));
        let log = TxLog::open(log_options.clone()).await?;

        let cm_addr = free_addr()?;
        let mut command = Command::new(binary("causeway-config-manager")?);
        command
            .arg("--listen")
            .arg(cm_addr.to_string())
            .arg("--data-dir")
            .arg(root.join("config-manager"));
        let cm = Proc::spawn(command, root.join("config-manager.log"))?;

        let mut cluster = LocalCluster {
            root,
            _tmp: tmp,
            broker,
            log,
            cm,
            cm_addr,
            nodes: BTreeMap::new(),
        };
        let count = u64::from(spec.partitions * spec.replicas);
        for i in 1..=count {
            let id = NodeId(i);
            let addr = free_addr()?;
            let admin = free_addr()?;
            let dir = cluster.root.join(format!("node-{i}"));
            std::fs::create_dir_all(&dir)?;
            let options = NodeOptions {
                node_id: id,
                listen: addr,
                advertise: None,
                admin_listen: Some(admin),
                data_dir: dir.join("data"),
                config_manager: cm_addr.to_string(),
                log: log_options.clone(),
                store: Default::default(),
                tuning: spec.tuning.clone(),
            };
            let config = dir.join("options.json");
            std::fs::write(&config, serde_json::to_vec_pretty(&options)?)?;
            let proc = spawn_node(&config, &cluster.root, id)?;
            cluster.nodes.insert(
                id,
                Node {
                    proc,
                    addr,
                    admin,
                    config,
                },
            );
        }

        let cm = cluster.config_manager().await?;
        let registered = until("every node to register", Duration::from_secs(60), || {
            let cm = cm.clone();
            async move {
                let nodes = cm.list_nodes().await.ok()?;
                (nodes.iter().filter(|n| n.live).count() as u64 == count).then_some(())
            }
        })
        .await;
        if let Err(e) = registered {
            bail!("{e}\n{}", cluster.logs());
        }
        cm.bootstrap(spec.partitions, spec.replicas).await?;
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// A client of the config manager.
    pub async fn config_manager(&self) -> Result<ConfigClient> {
        let addr = self.cm_addr.to_string();
        until("the config manager", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { ConfigClient::connect(&addr).await.ok() }
        })
        .await
    }

    /// The log, for tests that append transactions directly.
    pub fn log(&self) -> &TxLog {
        &self.log
    }

    pub fn broker(&self) -> &Broker {
        self.broker
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// A gRPC client of a store node.
    pub fn client(&self, node: NodeId) -> Result<StoreNodeClient<Channel>> {
        let addr = self
            .nodes
            .get(&node)
            .ok_or_else(|| anyhow!("no {node}"))?
            .addr;
        Ok(
            StoreNodeClient::new(causeway_store_node::grpc::lazy_channel(&addr.to_string()))
                .max_decoding_message_size(64 << 20),
        )
    }

    /// A node's status.
    pub async fn status(&self, node: NodeId) -> Result<pb::NodeStatus> {
        let mut client = self.client(node)?;
        let status =
            tokio::time::timeout(Duration::from_secs(5), client.status(pb::StatusRequest {}))
                .await
                .map_err(|_| anyhow!("{node} status timed out"))??;
        Ok(status.into_inner())
    }

    /// A node's Prometheus metrics.
    pub async fn metrics(&self, node: NodeId) -> Result<String> {
        let admin = self
            .nodes
            .get(&node)
            .ok_or_else(|| anyhow!("no {node}"))?
            .admin;
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await?
            .text()
            .await?;
        Ok(text)
    }

    /// Waits until every running node can coordinate reads.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<()> {
        let running: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.proc.child.is_some())
            .map(|(&id, _)| id)
            .collect();
        let ready = until("every node to be ready", deadline, || {
            let running = running.clone();
            async move {
                for node in running {
                    let s = self.status(node).await.ok()?;
                    if !s.can_coordinate {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        ready.map_err(|e| anyhow!("{e}\n{}", self.logs()))
    }

    /// Waits until `node`'s UST reaches `ts`.
    pub async fn wait_ust(&self, node: NodeId, ts: Timestamp, deadline: Duration) -> Result<()> {
        until(
            &format!("{node}'s UST to reach {ts}"),
            deadline,
            || async move {
                let s = self.status(node).await.ok()?;
                (s.ust >= ts.get()).then_some(())
            },
        )
        .await
    }

    /// Appends transactions; returns their timestamps.
    pub async fn append(&self, txs: &[Transaction]) -> Result<Vec<Timestamp>> {
        let records = txs.iter().map(causeway_txlog::codec::encode).collect();
        Ok(self.log.append(records).await?)
    }

    /// kill -9.
    pub fn kill(&mut self, node: NodeId) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| anyhow!("no {node}"))?;
        n.proc.signal("KILL")?;
        if let Some(mut child) = n.proc.child.take() {
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts a killed node again on the same directory and ports.
    pub fn restart(&mut self, node: NodeId) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| anyhow!("no {node}"))?;
        if n.proc.child.is_some() {
            bail!("{node} is running");
        }
        n.proc = spawn_node(&n.config, &self.root, node)?;
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&self, node: NodeId) -> Result<()> {
        self.nodes
            .get(&node)
            .ok_or_else(|| anyhow!("no {node}"))?
            .proc
            .signal("STOP")
    }

    /// SIGCONT.
    pub fn resume(&self, node: NodeId) -> Result<()> {
        self.nodes
            .get(&node)
            .ok_or_else(|| anyhow!("no {node}"))?
            .proc
            .signal("CONT")
    }

    /// The tail of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("--- config manager ---\n{}\n", self.cm.tail());
        for (id, n) in &self.nodes {
            out.push_str(&format!("--- {id} ---\n{}\n", n.proc.tail()));
        }
        out.push_str(&self.broker.log_tail(2048));
        out
    }
}

fn spawn_node(config: &Path, root: &Path, id: NodeId) -> Result<Proc> {
    let mut command = Command::new(binary("causeway-store-node")?);
    command.arg("--config").arg(config);
    Proc::spawn(command, root.join(format!("{id}.log")))
}

/// Builders of transaction records for tests.
pub mod tx {
    use causeway_proto::v1::{mutation, Increment, Mutation, Replace, Transaction};

    fn record(mutations: Vec<Mutation>) -> Transaction {
        Transaction {
            format_version: causeway_proto::v1::TRANSACTION_FORMAT_VERSION,
            wall_clock_ms: 1_700_000_000_000,
            request_id: String::new(),
            mutations,
        }
    }

    /// Replaces documents with JSON objects.
    pub fn replace(docs: &[(&str, &str, serde_json::Value)]) -> Transaction {
        record(
            docs.iter()
                .map(|(c, id, json)| Mutation {
                    collection: (*c).to_owned(),
                    id: (*id).to_owned(),
                    op: Some(mutation::Op::Replace(Replace {
                        json: serde_json::to_vec(json).expect("json"),
                    })),
                })
                .collect(),
        )
    }

    /// Adds to counters: `(collection, id, field, delta)`.
    pub fn increment(deltas: &[(&str, &str, &str, i64)]) -> Transaction {
        record(
            deltas
                .iter()
                .map(|(c, id, field, delta)| Mutation {
                    collection: (*c).to_owned(),
                    id: (*id).to_owned(),
                    op: Some(mutation::Op::Increment(Increment {
                        path: vec![(*field).to_owned()],
                        delta: *delta,
                    })),
                })
                .collect(),
        )
    }
}
