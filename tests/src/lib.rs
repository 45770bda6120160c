//! Causeway's cross-component tests and the `LocalCluster` harness.
//!
//! A [`LocalCluster`] runs the real binaries as OS processes on loopback: one
//! `causeway-config-manager`, `P × R` `causeway-store-node`s (and spare ones outside the
//! configuration) and, on demand, `causeway-api-server`s, each with its own directory and log
//! file, against a real Apache Kafka (one broker per test process,
//! `causeway_txlog::testing::Broker::shared`, a topic per cluster).
//! It bootstraps the cluster, waits until every node can coordinate reads, and can kill -9,
//! restart, pause (SIGSTOP) and resume nodes and add new ones. Set `CAUSEWAY_KEEP_TEST_DIR=1` to
//! keep the directories (their path is printed), with every process's log.
//!
//! # Layout
//! - [`LocalCluster`], [`ClusterSpec`]: the harness.
//! - `api`: api-server processes of a cluster ([`LocalCluster::start_api_servers`], [`API_TOKEN`]).
//! - [`cdc`]: `causeway-cdc` processes of a cluster ([`LocalCluster::start_cdc`]) and a webhook
//!   endpoint that verifies signatures and records every event.
//! - `process`: child processes, their logs, free ports.
//! - [`history`]: recorded histories of client operations and the checkers of every anomaly
//!   class (the fault and consistency suite's).
//! - [`load`]: a steady mixed load through the HTTP API that records every request, and the
//!   checkers of its history.
//! - [`tx`]: small builders of `Transaction` records for tests.

mod api;
pub mod cdc;
pub mod history;
pub mod load;
mod process;

pub use api::API_TOKEN;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use causeway_config_manager::{Client as ConfigClient, ConfigPair};
use causeway_core::{ClusterConfig, Interval, NodeId, Timestamp};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{self as pb, Transaction};
use causeway_store_node::{Options as NodeOptions, Tuning};
use causeway_txlog::testing::Broker;
use causeway_txlog::{LogOptions, TxLog};
use tonic::transport::Channel;

use crate::api::ApiServer;
use crate::process::{binary, free_addr, Proc};

/// The shape of a cluster to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub partitions: u32,
    pub replicas: u32,
    /// Store nodes started and registered after the bootstrap, so outside the first
    /// configuration: the candidates of a scale-out or a replacement. Their ids follow the
    /// `P × R` bootstrapped ones.
    pub spares: u32,
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
            spares: 0,
            tuning,
        }
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
    /// What every store node and api-server is given: the log topic, the node tuning.
    log_options: LogOptions,
    tuning: Tuning,
    nodes: BTreeMap<NodeId, Node>,
    api_servers: Vec<ApiServer>,
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
    /// Starts a broker, a config manager and `P × R` store nodes, bootstraps the cluster, waits
    /// until every node can coordinate reads, and then starts the spare nodes.
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
        let cm = spawn_config_manager(&root, cm_addr)?;

        let mut cluster = LocalCluster {
            root,
            _tmp: tmp,
            broker,
            log,
            cm,
            cm_addr,
            log_options,
            tuning: spec.tuning.clone(),
            nodes: BTreeMap::new(),
            api_servers: Vec::new(),
        };
        let count = u64::from(spec.partitions * spec.replicas);
        for i in 1..=count {
            cluster.spawn_new_node(NodeId(i))?;
        }
        let ids: Vec<NodeId> = cluster.node_ids();
        cluster
            .wait_registered(&ids, Duration::from_secs(60))
            .await?;
        let cm = cluster.config_manager().await?;
        cm.bootstrap(spec.partitions, spec.replicas).await?;
        cluster.wait_ready(Duration::from_secs(60)).await?;
        for _ in 0..spec.spares {
            cluster.add_node().await?;
        }
        Ok(cluster)
    }

    /// Starts a new store node (the next free id) on its own directory and ports, and returns
    /// once the config manager lists it live. It is in no configuration until a transition puts
    /// it in one.
    pub async fn add_node(&mut self) -> Result<NodeId> {
        let id = NodeId(self.nodes.keys().last().map_or(0, |n| n.0) + 1);
        self.spawn_new_node(id)?;
        self.wait_registered(&[id], Duration::from_secs(60)).await?;
        Ok(id)
    }

    /// Writes the options of a new node `id` and starts it.
    fn spawn_new_node(&mut self, id: NodeId) -> Result<()> {
        let addr = free_addr()?;
        let admin = free_addr()?;
        let dir = self.root.join(format!("node-{}", id.0));
        std::fs::create_dir_all(&dir)?;
        let options = NodeOptions {
            node_id: id,
            listen: addr,
            advertise: None,
            admin_listen: Some(admin),
            data_dir: dir.join("data"),
            config_manager: self.cm_addr.to_string(),
            log: self.log_options.clone(),
            store: Default::default(),
            tuning: self.tuning.clone(),
        };
        let config = dir.join("options.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&options)?)?;
        let proc = spawn_node(&config, &self.root, id)?;
        self.nodes.insert(
            id,
            Node {
                proc,
                addr,
                admin,
                config,
            },
        );
        Ok(())
    }

    /// Waits until the config manager lists every node of `ids` live.
    async fn wait_registered(&self, ids: &[NodeId], deadline: Duration) -> Result<()> {
        let cm = self.config_manager().await?;
        let registered = until("the nodes to register", deadline, || {
            let cm = cm.clone();
            async move {
                let nodes = cm.list_nodes().await.ok()?;
                ids.iter()
                    .all(|id| nodes.iter().any(|n| n.info.id == *id && n.live))
                    .then_some(())
            }
        })
        .await;
        registered.map_err(|e| anyhow!("{e} ({ids:?})\n{}", self.logs()))
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

    /// The (current, next) configuration pair as the config manager has it.
    pub async fn config(&self) -> Result<ConfigPair> {
        let cm = self.config_manager().await?;
        Ok(cm.get_config().await?)
    }

    /// The current configuration (an error before the bootstrap).
    pub async fn current_config(&self) -> Result<ClusterConfig> {
        self.config()
            .await?
            .current
            .ok_or_else(|| anyhow!("the cluster is not bootstrapped"))
    }

    /// A node's digests of its documents in each of `intervals` as of `ts` (the `Digest` RPC),
    /// one 32-hex-digit string per interval: equal digests mean equal replicas. The node must have
    /// committed `ts`, and `ts` must not be below its GC timestamp.
    pub async fn digests(
        &self,
        node: NodeId,
        ts: Timestamp,
        intervals: &[Interval],
    ) -> Result<Vec<String>> {
        let mut client = self.client(node)?;
        let request = pb::DigestRequest {
            ts: ts.get(),
            intervals: intervals
                .iter()
                .map(|i| pb::KeyInterval {
                    start: i.start,
                    end: i.end_hash(),
                })
                .collect(),
        };
        let response = tokio::time::timeout(Duration::from_secs(10), client.digest(request))
            .await
            .map_err(|_| anyhow!("{node} digest timed out"))??;
        let digests = response.into_inner().digests;
        if digests.len() != intervals.len() {
            bail!(
                "{node} answered {} digests for {} intervals",
                digests.len(),
                intervals.len()
            );
        }
        Ok(digests)
    }

    /// Waits until the cluster is in a steady configuration: the config manager has no next
    /// configuration, and every running node of the current one has installed it, routes by it
    /// and can coordinate reads. Answers that configuration.
    pub async fn wait_stable(&self, deadline: Duration) -> Result<ClusterConfig> {
        let stable = until("a steady configuration", deadline, || async {
            let pair = self.config().await.ok()?;
            if pair.next.is_some() {
                return None;
            }
            let current = pair.current?;
            let epoch = current.epoch.get();
            for node in current.nodes.keys() {
                if !self.nodes.get(node).is_some_and(|n| n.proc.is_running()) {
                    continue;
                }
                let s = self.status(*node).await.ok()?;
                let installed = s.current_epoch == epoch && s.next_epoch.is_none();
                if !installed || s.routing_epoch != epoch || !s.can_coordinate {
                    return None;
                }
            }
            Some(current)
        })
        .await;
        stable.map_err(|e| anyhow!("{e}\n{}", self.logs()))
    }

    /// Checks that the running replicas of every partition of the current configuration hold
    /// the same documents: their digests of the partition's intervals at one ts (the UST of
    /// the first replica, which every replica is first waited to commit) are equal. Answers the
    /// ts.
    /// Run it while no writes arrive, so that the GC timestamp cannot pass the ts meanwhile.
    pub async fn verify_replicas_agree(&self, deadline: Duration) -> Result<Timestamp> {
        let config = self.current_config().await?;
        let running = |n: &NodeId| self.nodes.get(n).is_some_and(|n| n.proc.is_running());
        let first = config
            .replicas
            .values()
            .flatten()
            .find(|n| running(n))
            .ok_or_else(|| anyhow!("no replica is running"))?;
        let ts = Timestamp(self.status(*first).await?.ust);
        for (partition, replicas) in &config.replicas {
            let intervals = config.slicing.intervals_of(*partition);
            let mut digests: Vec<(NodeId, Vec<String>)> = Vec::new();
            for &node in replicas.iter().filter(|n| running(n)) {
                self.wait_committed(node, ts, deadline).await?;
                digests.push((node, self.digests(node, ts, &intervals).await?));
            }
            if let Some((_, reference)) = digests.first() {
                if digests.iter().any(|(_, d)| d != reference) {
                    bail!("the replicas of {partition:?} differ at {ts}: {digests:?}");
                }
            }
        }
        Ok(ts)
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

    /// Waits until every running node of the current configuration can coordinate reads.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<()> {
        let current = self.current_config().await?;
        let running: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| n.proc.is_running() && current.nodes.contains_key(id))
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

    /// Waits until `node` has itself committed `ts` (its UST may be past it: a partition's UST
    /// follows its most advanced replica).
    pub async fn wait_committed(
        &self,
        node: NodeId,
        ts: Timestamp,
        deadline: Duration,
    ) -> Result<()> {
        until(&format!("{node} to commit {ts}"), deadline, || async move {
            let s = self.status(node).await.ok()?;
            (s.committed >= ts.get()).then_some(())
        })
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

    /// kill -9 of the config manager.
    pub fn kill_config_manager(&mut self) -> Result<()> {
        self.cm.signal("KILL")?;
        self.cm.kill();
        Ok(())
    }

    /// Starts the config manager again on its directory and address.
    pub fn restart_config_manager(&mut self) -> Result<()> {
        if self.cm.is_running() {
            bail!("the config manager is running");
        }
        self.cm = spawn_config_manager(&self.root, self.cm_addr)?;
        Ok(())
    }

    /// Starts a killed node again on the same directory and ports.
    pub fn restart(&mut self, node: NodeId) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| anyhow!("no {node}"))?;
        if n.proc.is_running() {
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
        for (i, a) in self.api_servers.iter().enumerate() {
            out.push_str(&format!(
                "--- api-server {} ({}) ---\n{}\n",
                i + 1,
                a.addr,
                a.proc.tail()
            ));
        }
        out.push_str(&self.broker.log_tail(2048));
        out
    }
}

fn spawn_config_manager(root: &Path, addr: SocketAddr) -> Result<Proc> {
    let mut command = Command::new(binary("causeway-config-manager")?);
    command
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(root.join("config-manager"));
    Proc::spawn(command, root.join("config-manager.log"))
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
            idempotency_key: String::new(),
            mutations,
            ..Transaction::default()
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
