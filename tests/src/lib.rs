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
//! - `network`: partitions between processes ([`LocalCluster::partition`]).
//! - `disk`: a store node's disk filling up and its fsyncs failing ([`LocalCluster::fill_disk`],
//!   [`LocalCluster::fail_syncs`]).
//! - [`history`]: recorded histories of client operations and the checkers of every anomaly
//!   class (the fault and consistency suite's).
//! - [`load`]: a steady mixed load through the HTTP API that records every request, and the
//!   checkers of its history.
//! - [`tx`]: small builders of `Transaction` records for tests.

mod api;
pub mod cdc;
mod disk;
pub mod history;
pub mod load;
mod network;
mod process;

pub use api::API_TOKEN;
pub use process::binary;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use causeway_config_manager::{Client as ConfigClient, ConfigPair};
use causeway_core::{ClusterConfig, Interval, NodeId, Timestamp};
use causeway_proto::link::{Channel, Link, Security};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{self as pb, Transaction};
use causeway_store_node::storage::StoreOptions;
use causeway_store_node::{Options as NodeOptions, Tuning};
use causeway_txlog::testing::Broker;
use causeway_txlog::{LogOptions, TxLog};

use crate::api::ApiServer;
use crate::disk::SmallDisk;
use crate::network::Firewall;
use crate::process::{free_addr, Proc};

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
    /// Every store node's storage options.
    pub store: StoreOptions,
    /// Kafka: 0 for the single-node broker this test process shares; `n` for a KRaft cluster of
    /// `n` nodes of this cluster's own (replication factor `min(n, 3)`), which a test may kill
    /// and restart ([`LocalCluster::kill_broker`]).
    pub brokers: usize,
    /// Every process with a group id of its own, so that [`LocalCluster::partition`] can cut
    /// the network between them (needs root and iptables).
    pub isolated: bool,
    /// Each store node's data on a tmpfs of this many MiB, which [`LocalCluster::fill_disk`]
    /// fills (needs root).
    pub node_disk_mb: Option<u64>,
    /// Store nodes run under libfiu's `fiu-run`, so that [`LocalCluster::fail_syncs`] can make
    /// their fsyncs fail.
    pub fsync_faults: bool,
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
            store: StoreOptions::default(),
            brokers: 0,
            isolated: false,
            node_disk_mb: None,
            fsync_faults: false,
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

/// A process of a cluster, as a side of a network partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Member {
    ConfigManager,
    Node(NodeId),
    /// The `i`-th api-server, in start order.
    ApiServer(usize),
    /// Kafka node `i` (0-based). Only a destination: nothing partitions a broker's own sends.
    Broker(usize),
}

/// The Kafka of a cluster: the shared broker, or a KRaft cluster of its own.
#[derive(Debug)]
enum Kafka {
    Shared(&'static Broker),
    Own(Broker),
}

/// A cluster of real processes. Dropping it kills them all.
#[derive(Debug)]
pub struct LocalCluster {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    kafka: Kafka,
    /// With `ClusterSpec::isolated`: the first of the group ids of this cluster's processes.
    gid_base: Option<u32>,
    firewall: Firewall,
    node_disk_mb: Option<u64>,
    disks: BTreeMap<NodeId, SmallDisk>,
    fsync_faults: bool,
    log: TxLog,
    cm: Proc,
    cm_addr: SocketAddr,
    /// What every store node and api-server is given: the log topic, the node tuning.
    log_options: LogOptions,
    tuning: Tuning,
    store: StoreOptions,
    nodes: BTreeMap<NodeId, Node>,
    api_servers: Vec<ApiServer>,
    /// What every process is given: the cluster secret and the config manager's admin token,
    /// in files of the cluster directory.
    pub(crate) security: Security,
    /// The test's own credentials: the secret and the admin token.
    link: Link,
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
        let kafka = tokio::task::block_in_place(|| match spec.brokers {
            0 => Broker::shared().map(Kafka::Shared),
            n => Broker::start_cluster(n).map(Kafka::Own),
        })
        .context("starting Kafka")?;
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let broker = match &kafka {
            Kafka::Shared(b) => *b,
            Kafka::Own(b) => b,
        };
        let log_options = LogOptions::Kafka(broker.log_options(&format!("causeway-tx-{n}")));
        let log = TxLog::open(log_options.clone()).await?;
        // Group ids of this cluster's processes: 1024 per cluster, 16 clusters per test process,
        // spread by the process id.
        let gid_base = spec.isolated.then(|| {
            100_000_000 + (std::process::id() % 100_000) * 16_384 + (n as u32 % 16) * 1024
        });

        let (security, link) = cluster_security(&root)?;
        let cm_addr = free_addr()?;
        let cm_gid = gid_base.map(|base| base + Member::ConfigManager.gid_offset());
        let cm = spawn_config_manager(&root, cm_addr, cm_gid, &security)?;

        let mut cluster = LocalCluster {
            root,
            _tmp: tmp,
            kafka,
            gid_base,
            firewall: Firewall::new(n),
            node_disk_mb: spec.node_disk_mb,
            disks: BTreeMap::new(),
            fsync_faults: spec.fsync_faults,
            log,
            cm,
            cm_addr,
            log_options,
            tuning: spec.tuning.clone(),
            store: spec.store.clone(),
            nodes: BTreeMap::new(),
            api_servers: Vec::new(),
            security,
            link,
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
        if let Some(mb) = self.node_disk_mb {
            self.disks
                .insert(id, SmallDisk::mount(&dir.join("data"), mb)?);
        }
        let options = NodeOptions {
            node_id: id,
            listen: addr,
            advertise: None,
            admin_listen: Some(admin),
            data_dir: dir.join("data"),
            config_manager: self.cm_addr.to_string(),
            log: self.log_options.clone(),
            store: self.store.clone(),
            tuning: self.tuning.clone(),
            security: self.member_security(),
        };
        let config = dir.join("options.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&options)?)?;
        let proc = self.spawn_node(&config, id)?;
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

    /// What the cluster's processes other than the config manager are given: the secret, not
    /// the admin token.
    pub(crate) fn member_security(&self) -> Security {
        Security {
            admin_token_file: None,
            ..self.security.clone()
        }
    }

    /// A client of the config manager.
    pub async fn config_manager(&self) -> Result<ConfigClient> {
        let addr = self.cm_addr.to_string();
        until("the config manager", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { ConfigClient::connect(&addr, &self.link).await.ok() }
        })
        .await
    }

    /// The log, for tests that append transactions directly.
    pub fn log(&self) -> &TxLog {
        &self.log
    }

    pub fn broker(&self) -> &Broker {
        match &self.kafka {
            Kafka::Shared(b) => b,
            Kafka::Own(b) => b,
        }
    }

    fn own_broker(&mut self) -> Result<&mut Broker> {
        match &mut self.kafka {
            Kafka::Own(b) => Ok(b),
            Kafka::Shared(_) => bail!("the cluster shares its broker: start it with `brokers`"),
        }
    }

    /// The Kafka node (0-based) that leads the partition of the cluster's log.
    pub fn log_leader(&self) -> Result<usize> {
        let LogOptions::Kafka(kafka) = &self.log_options else {
            bail!("the cluster's log is not on Kafka");
        };
        let broker = self.broker();
        tokio::task::block_in_place(|| broker.leader(&kafka.topic, 0))?
            .ok_or_else(|| anyhow!("the log's partition has no leader"))
    }

    /// kill -9 of Kafka node `i` (0-based) of the cluster's own brokers.
    pub fn kill_broker(&mut self, i: usize) -> Result<()> {
        Ok(self.own_broker()?.kill(i)?)
    }

    /// Starts Kafka node `i` again on its data, and waits until it answers.
    pub fn restart_broker(&mut self, i: usize) -> Result<()> {
        let broker = self.own_broker()?;
        Ok(tokio::task::block_in_place(|| broker.restart_node(i))?)
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
            StoreNodeClient::new(causeway_store_node::grpc::lazy_channel(
                &self.link.without_admin_token(),
                node,
                &addr.to_string(),
            )?)
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
        self.cm = spawn_config_manager(
            &self.root,
            self.cm_addr,
            self.gid(Member::ConfigManager),
            &self.security,
        )?;
        Ok(())
    }

    /// Starts a killed node again on the same directory and ports.
    pub fn restart(&mut self, node: NodeId) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| anyhow!("no {node}"))?;
        if n.proc.reap_running() {
            bail!("{node} is running");
        }
        let config = n.config.clone();
        let proc = self.spawn_node(&config, node)?;
        self.nodes.get_mut(&node).expect("the node").proc = proc;
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
        out.push_str(&self.broker().log_tail(2048));
        out
    }

    /// A store node process on its options file: under `fiu-run` with `fsync_faults`.
    fn spawn_node(&self, config: &Path, id: NodeId) -> Result<Proc> {
        let program = binary("causeway-store-node")?;
        let mut command = if self.fsync_faults {
            disk::under_fiu(&program, &disk::fiu_control(&self.root))
        } else {
            Command::new(program)
        };
        command.arg("--config").arg(config);
        with_gid(&mut command, self.gid(Member::Node(id)));
        Proc::spawn(command, self.root.join(format!("{id}.log")))
    }

    /// The group id of `member`'s process, with `isolated`.
    fn gid(&self, member: Member) -> Option<u32> {
        self.gid_base.map(|base| base + member.gid_offset())
    }

    /// The ports `member` listens on.
    fn ports(&self, member: Member) -> Vec<u16> {
        match member {
            Member::ConfigManager => vec![self.cm_addr.port()],
            Member::Node(id) => self
                .nodes
                .get(&id)
                .map_or(Vec::new(), |n| vec![n.addr.port(), n.admin.port()]),
            Member::ApiServer(i) => self
                .api_servers
                .get(i)
                .map_or(Vec::new(), |a| vec![a.addr.port()]),
            Member::Broker(i) => vec![self.broker().port(i)],
        }
    }

    /// Cuts the network between every process of `a` and every process of `b`, both ways,
    /// until [`LocalCluster::heal`]. Needs `ClusterSpec::isolated`.
    pub fn partition(&mut self, a: &[Member], b: &[Member]) -> Result<()> {
        if self.gid_base.is_none() {
            bail!("partitions need a cluster started with `isolated`");
        }
        for (from, to) in [(a, b), (b, a)] {
            let ports: Vec<u16> = to.iter().flat_map(|m| self.ports(*m)).collect();
            for member in from {
                if let Some(gid) = self
                    .gid(*member)
                    .filter(|_| !matches!(member, Member::Broker(_)))
                {
                    self.firewall.cut(gid, &ports)?;
                }
            }
        }
        Ok(())
    }

    /// Ends every partition.
    pub fn heal(&mut self) -> Result<()> {
        self.firewall.heal()
    }

    /// Every process of the cluster, the Kafka nodes too, as partition sides.
    pub fn members(&self) -> Vec<Member> {
        let mut all = vec![Member::ConfigManager];
        all.extend(self.nodes.keys().map(|&id| Member::Node(id)));
        all.extend((0..self.api_servers.len()).map(Member::ApiServer));
        all.extend((0..self.broker().node_count()).map(Member::Broker));
        all
    }

    /// Fills store node `node`'s disk (`ClusterSpec::node_disk_mb`) to the last byte.
    pub fn fill_disk(&self, node: NodeId) -> Result<()> {
        let disk = self
            .disks
            .get(&node)
            .ok_or_else(|| anyhow!("{node} has no disk of its own: `node_disk_mb`"))?;
        tokio::task::block_in_place(|| disk.fill())
    }

    /// Frees what [`LocalCluster::fill_disk`] took.
    pub fn free_disk(&self, node: NodeId) -> Result<()> {
        self.disks
            .get(&node)
            .ok_or_else(|| anyhow!("{node} has no disk of its own: `node_disk_mb`"))?
            .free()
    }

    /// Makes every fsync of store node `node` fail with EIO (`fail`), or succeed again; needs
    /// `ClusterSpec::fsync_faults`.
    pub fn fail_syncs(&self, node: NodeId, fail: bool) -> Result<()> {
        if !self.fsync_faults {
            bail!("fsync faults need a cluster started with `fsync_faults`");
        }
        let pid = self
            .nodes
            .get(&node)
            .and_then(|n| n.proc.pid())
            .ok_or_else(|| anyhow!("{node} is not running"))?;
        disk::fail_syncs(&disk::fiu_control(&self.root), pid, fail)
    }

    /// Whether store node `node` runs (a node that exited by itself is reaped).
    pub fn is_running(&mut self, node: NodeId) -> bool {
        self.nodes
            .get_mut(&node)
            .is_some_and(|n| n.proc.reap_running())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // The processes first, then their disks and the partitions.
        self.api_servers.clear();
        self.nodes.clear();
        self.cm.kill();
        self.disks.clear();
        let _ = self.firewall.heal();
    }
}

impl Member {
    /// Where `member`'s group id is, from the cluster's first.
    fn gid_offset(self) -> u32 {
        match self {
            Member::ConfigManager => 0,
            Member::Node(id) => 1 + (id.0 as u32 % 511),
            Member::ApiServer(i) => 512 + i as u32 % 256,
            Member::Broker(i) => 768 + i as u32 % 256,
        }
    }
}

/// Runs `command` with group id `gid`, when given.
pub(crate) fn with_gid(command: &mut Command, gid: Option<u32>) {
    if let Some(gid) = gid {
        std::os::unix::process::CommandExt::gid(command, gid);
    }
}

fn spawn_config_manager(
    root: &Path,
    addr: SocketAddr,
    gid: Option<u32>,
    security: &Security,
) -> Result<Proc> {
    let config = root.join("config-manager.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&serde_json::json!({ "security": security }))?,
    )?;
    let mut command = Command::new(binary("causeway-config-manager")?);
    command
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(root.join("config-manager"));
    with_gid(&mut command, gid);
    Proc::spawn(command, root.join("config-manager.log"))
}

/// The cluster secret and the admin token of a test cluster, written into `root`: every
/// process is given both files (so every test runs with authenticated internal calls), and the
/// test's own clients carry both.
fn cluster_security(root: &Path) -> Result<(Security, Link)> {
    let secret = root.join("cluster-secret");
    let admin = root.join("admin-token");
    for path in [&secret, &admin] {
        let bytes: [u8; 24] = rand::random();
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(path, text)?;
    }
    let security = Security {
        cluster_secret_file: Some(secret),
        admin_token_file: Some(admin),
        ..Security::default()
    };
    let link = Link::load(&security)?;
    Ok((security, link))
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
