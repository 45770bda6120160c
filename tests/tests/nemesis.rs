//! The fault and consistency suite, bounded for CI: one 2×2 cluster on three Kafka nodes, two
//! api-servers, and the load (`causeway_tests::load`: unique writes and their reads, bank
//! transfers with and without conditions, snapshot reads and queries of the banks, causal
//! sessions) recording every operation, while nemeses act one after the other, each undone
//! before the next:
//! - kill -9 and restart of a store node, of the config manager, of an api-server and of a
//!   Kafka node; a SIGSTOP pause of a store node;
//! - a transition to 3×2 and back (the highest node ids drained) with the load running;
//! - network partitions (iptables, `causeway_tests::network`): a store node cut off from every
//!   other process, and one cut off from its peers only;
//! - a store node's disk full (a small tmpfs) and its fsyncs failing (libfiu): the node stops
//!   rather than go on with a store it could not write, and starts again on it.
//!
//! The run ends with final reads through both api-servers, and the history is judged by
//! `causeway_tests::history::check`: any anomaly fails the test, and so does a replica that
//! differs from its partition's others. Requests that fail during a fault (unavailability, not
//! an anomaly) are counted per fault and printed with the time the cluster took to serve a
//! causal write and read again through every api-server, the figures of RELIABILITY.md. The
//! same faults, drawn at random from a seed for as long as asked, are the soak
//! (`scripts/soak.sh`).
//!
//! It needs root (group ids, iptables, tmpfs mounts), as `.ci/run` has.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_core::NodeId;
use causeway_store_node::storage::StoreOptions;
use causeway_tests::cdc::{webhook_feed, Cdc, Receiver};
use causeway_tests::history::{History, OpKind, OpResult};
use causeway_tests::load::{Load, LoadSpec, WRITES};
use causeway_tests::{until, ClusterSpec, LocalCluster, Member, API_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// In the bounded run's list, the Kafka node that leads the log when the fault starts.
const LOG_LEADER: usize = usize::MAX;
/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(5);
/// The longest the cluster may take to serve again after a fault is undone.
const RECOVERY: Duration = Duration::from_secs(60);
/// The longest a disk fault of the bounded run lasts while its node has not stopped: how soon a
/// node writes to its full disk depends on the load its partitions get after the faults before.
const DISK_FAULT_MAX: Duration = Duration::from_secs(30);
/// How long a store node that failed a write may take to exit.
const STOPPING: Duration = Duration::from_secs(5);
/// The longest a transition may take to install.
const TRANSITION: Duration = Duration::from_secs(120);

/// One fault: what it does and how it is undone.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    KillStoreNode(NodeId),
    PauseStoreNode(NodeId),
    KillConfigManager,
    KillApiServer(usize),
    /// A transition to `partitions × replicas`, running until it is installed.
    Scale(u32, u32),
    /// kill -9 of Kafka node `i` of three (replication factor 3, `min.insync.replicas` 2).
    KillBroker(usize),
    /// The store node cut off from the other store nodes, the config manager, the api-servers
    /// and Kafka (not from the cdc service, which runs with the test's own group).
    Isolate(NodeId),
    /// The store node cut off from the other store nodes only: the api-servers, the config
    /// manager and Kafka still reach it.
    CutFromPeers(NodeId),
    /// The store node's disk full.
    DiskFull(NodeId),
    /// Every fsync of the store node fails (EIO).
    FsyncFails(NodeId),
    /// kill -9 and restart of the cdc service.
    KillCdc,
}

impl Nemesis {
    /// The store node whose disk this fault fails.
    fn disk_of(self) -> Option<NodeId> {
        match self {
            Nemesis::DiskFull(n) | Nemesis::FsyncFails(n) => Some(n),
            _ => None,
        }
    }

    fn name(self) -> String {
        match self {
            Nemesis::KillStoreNode(n) => format!("kill -9 store node {n}"),
            Nemesis::PauseStoreNode(n) => format!("SIGSTOP store node {n}"),
            Nemesis::KillConfigManager => "kill -9 config manager".into(),
            Nemesis::KillApiServer(i) => format!("kill -9 api-server {}", i + 1),
            Nemesis::Scale(p, r) => format!("transition to {p}×{r}"),
            Nemesis::KillBroker(i) => format!("kill -9 Kafka node {}", i + 1),
            Nemesis::Isolate(n) => format!("store node {n} cut off from all"),
            Nemesis::CutFromPeers(n) => format!("store node {n} cut off from its peers"),
            Nemesis::DiskFull(n) => format!("disk full on store node {n}"),
            Nemesis::FsyncFails(n) => format!("fsync fails on store node {n}"),
            Nemesis::KillCdc => "kill -9 cdc service".into(),
        }
    }

    async fn inject(self, cluster: &mut LocalCluster, cdc: &mut Cdc) -> Result<()> {
        match self {
            Nemesis::KillCdc => cdc.kill(),
            Nemesis::KillStoreNode(n) => cluster.kill(n),
            Nemesis::PauseStoreNode(n) => cluster.pause(n),
            Nemesis::KillConfigManager => cluster.kill_config_manager(),
            Nemesis::KillApiServer(i) => cluster.kill_api_server(i),
            Nemesis::Scale(p, r) => {
                let cm = cluster.config_manager().await?;
                cm.propose_shape(p, r).await?;
                Ok(())
            }
            Nemesis::KillBroker(i) => cluster.kill_broker(i),
            Nemesis::Isolate(n) => {
                let others: Vec<Member> = cluster
                    .members()
                    .into_iter()
                    .filter(|m| *m != Member::Node(n))
                    .collect();
                cluster.partition(&[Member::Node(n)], &others)?;
                cut_off(cluster, n).await
            }
            Nemesis::CutFromPeers(n) => {
                let peers: Vec<Member> = cluster
                    .node_ids()
                    .into_iter()
                    .filter(|p| *p != n)
                    .map(Member::Node)
                    .collect();
                cluster.partition(&[Member::Node(n)], &peers)?;
                cut_off(cluster, n).await
            }
            Nemesis::DiskFull(n) => cluster.fill_disk(n),
            Nemesis::FsyncFails(n) => cluster.fail_syncs(n, true),
        }
    }

    /// Undoes the fault; a transition is waited for until it is installed. Answers whether a
    /// store node had stopped on the fault (and was started again).
    async fn undo(self, cluster: &mut LocalCluster, cdc: &mut Cdc) -> Result<bool> {
        match self {
            Nemesis::KillCdc => cdc.restart().await.map(|()| false),
            Nemesis::KillStoreNode(n) => cluster.restart(n).map(|()| false),
            Nemesis::PauseStoreNode(n) => cluster.resume(n).map(|()| false),
            Nemesis::KillConfigManager => cluster.restart_config_manager().map(|()| false),
            Nemesis::KillApiServer(i) => cluster.restart_api_server(i).await.map(|()| false),
            Nemesis::Scale(..) => cluster.wait_stable(TRANSITION).await.map(|_| false),
            Nemesis::KillBroker(i) => cluster.restart_broker(i).map(|()| false),
            Nemesis::Isolate(_) | Nemesis::CutFromPeers(_) => cluster.heal().map(|()| false),
            // A node that stopped on the fault starts again on its store.
            Nemesis::DiskFull(n) => {
                cluster.free_disk(n)?;
                restart_if_stopped(cluster, n).await
            }
            Nemesis::FsyncFails(n) => {
                if cluster.is_running(n) {
                    cluster.fail_syncs(n, false)?;
                }
                restart_if_stopped(cluster, n).await
            }
        }
    }
}

/// Waits until another store node of the configuration has stopped hearing from `n` (its
/// gossip counts it dead): the partition is real.
async fn cut_off(cluster: &LocalCluster, n: NodeId) -> Result<()> {
    let config = cluster.current_config().await?;
    let peers: Vec<NodeId> = config.node_ids().into_iter().filter(|p| *p != n).collect();
    until(&format!("a peer to count {n} dead"), RECOVERY, || {
        let peers = peers.clone();
        async move {
            for peer in peers {
                let status = cluster.status(peer).await.ok()?;
                if status.peers.iter().any(|p| p.node_id == n.0 && !p.alive) {
                    return Some(());
                }
            }
            None
        }
    })
    .await
}

/// Starts store node `n` again if it exited, as a node must rather than go on with a store it
/// could not write; answers whether it had. A node that failed a write just before the fault
/// ended may still be on its way out: it is given a few seconds.
async fn restart_if_stopped(cluster: &mut LocalCluster, n: NodeId) -> Result<bool> {
    let exited = until(&format!("{n} to stop"), STOPPING, || {
        let running = cluster.is_running(n);
        async move { (!running).then_some(()) }
    })
    .await
    .is_ok();
    if exited {
        cluster.restart(n)?;
    }
    Ok(exited)
}

/// How long until a write through each api-server is read back through every api-server at
/// `Causeway-After` its ts.
async fn recovery(cluster: &LocalCluster) -> Result<Duration> {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let urls = cluster.api_urls();
    until(
        "the cluster to serve causal writes and reads again",
        RECOVERY,
        || {
            let (http, urls) = (http.clone(), urls.clone());
            async move {
                for (i, url) in urls.iter().enumerate() {
                    let doc = format!("{url}/v1/collections/nemesis_probe/documents/p{i}");
                    let answer = http
                        .put(&doc)
                        .bearer_auth(API_TOKEN)
                        .json(&json!({"at": started.elapsed().as_millis() as u64}))
                        .send()
                        .await
                        .ok()?;
                    let ts: u64 = answer.json::<serde_json::Value>().await.ok()?["ts"].as_u64()?;
                    for reader in &urls {
                        let path = doc.replacen(url, reader, 1);
                        let read = http
                            .get(&path)
                            .bearer_auth(API_TOKEN)
                            .header("Causeway-After", ts.to_string())
                            .send()
                            .await
                            .ok()?;
                        read.status().is_success().then_some(())?;
                    }
                }
                Some(())
            }
        },
    )
    .await?;
    Ok(started.elapsed())
}

/// One fault as it went: when, for how long, and how long the cluster took to serve again.
#[derive(Debug)]
struct Fault {
    name: String,
    lasted: Duration,
    recovered_in: Duration,
    /// A store node stopped on the fault (a full disk, failing fsyncs) and was started again.
    node_stopped: bool,
}

/// A cluster under the recording load, and a change feed of the load's unique documents.
struct Run {
    cluster: LocalCluster,
    load: Load,
    cdc: Cdc,
    receiver: Receiver,
    faults: Vec<Fault>,
}

/// The change feed of the load's unique documents.
const FEED: &str = "writes";

impl Run {
    /// A cluster whose store nodes have disks of `disk_mb` MiB and memtables of
    /// `write_buffer_bytes`, under the load.
    async fn start(disk_mb: u64, write_buffer_bytes: usize) -> Run {
        // Two spare store nodes, for the transition to 3×2; three Kafka nodes; every process
        // in a group of its own, for partitions; store nodes on small disks of their own and
        // under libfiu.
        let spec = ClusterSpec {
            spares: 2,
            brokers: 3,
            isolated: true,
            node_disk_mb: Some(disk_mb),
            fsync_faults: true,
            store: StoreOptions {
                write_buffer_bytes,
                ..StoreOptions::default()
            },
            ..ClusterSpec::new(2, 2)
        };
        let mut cluster = LocalCluster::start(spec).await.unwrap();
        cluster.start_api_servers(2).await.unwrap();
        let spec = LoadSpec {
            request_timeout: Duration::from_secs(3),
            max_duration: Duration::from_secs(24 * 3600),
            ..LoadSpec::default()
        };
        let receiver = Receiver::start().await.unwrap();
        let feed = webhook_feed(FEED, &receiver.url(), &[WRITES], 100, json!({}));
        let cdc = cluster.start_cdc(vec![feed], 500).await.unwrap();
        let load = Load::start(cluster.api_urls(), spec).await.unwrap();
        until("the load to flow", Duration::from_secs(30), || async {
            (load.completed() > 100).then_some(())
        })
        .await
        .unwrap();
        Run {
            cluster,
            load,
            cdc,
            receiver,
            faults: Vec::new(),
        }
    }

    /// `nemesis` for `lasted`, undone, then the wait until the cluster serves again, then
    /// `quiet`, so that each phase of the load's report is one fault's alone. Answers whether
    /// a store node stopped on the fault.
    ///
    /// With `bite_within`, a disk fault lasts on until its node stops, at most that long.
    async fn fault(
        &mut self,
        nemesis: Nemesis,
        lasted: Duration,
        quiet: Duration,
        bite_within: Option<Duration>,
    ) -> bool {
        // Numbered, so that each is a phase of its own in the load's report.
        let name = format!("{}. {}", self.faults.len() + 1, nemesis.name());
        println!("{:?}: {name} for {lasted:?}", self.load.elapsed());
        self.load.mark(&name);
        nemesis
            .inject(&mut self.cluster, &mut self.cdc)
            .await
            .unwrap();
        tokio::time::sleep(lasted).await;
        if let (Some(n), Some(longest)) = (nemesis.disk_of(), bite_within) {
            let deadline = tokio::time::Instant::now() + longest.saturating_sub(lasted);
            while self.cluster.is_running(n) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut node_stopped = nemesis
            .undo(&mut self.cluster, &mut self.cdc)
            .await
            .unwrap();
        // No other store node may have stopped: only the one a disk fault hit, which may stop
        // later than the undo looked (a write that failed at the very end of the fault), and
        // starts again then.
        for n in self.cluster.node_ids() {
            if self.cluster.is_running(n) {
                continue;
            }
            if nemesis.disk_of() != Some(n) {
                panic!("{n} stopped during {name}\n{}", self.cluster.logs());
            }
            self.cluster.restart(n).unwrap();
            node_stopped = true;
        }
        self.load.mark(&format!("after {name}"));
        let recovered_in = match recovery(&self.cluster).await {
            Ok(d) => d,
            Err(e) => panic!("{name}: {e}\n{}", self.cluster.logs()),
        };
        self.faults.push(Fault {
            name,
            lasted,
            recovered_in,
            node_stopped,
        });
        tokio::time::sleep(quiet).await;
        node_stopped
    }

    /// Stops the load, judges the history (any anomaly fails) and checks the replicas agree;
    /// the report, as text (markdown), is written first to `report_to` (a path and a header)
    /// when given, so that a failed run keeps it.
    async fn finish(self, report_to: Option<(String, String)>) {
        let report = self.load.stop().await;
        let mut text = format!(
            "```\n{report}```\n\n| fault | lasted | reads failed / sent | writes failed / sent | \
             served again after | a node stopped |\n|---|---|---|---|---|---|\n"
        );
        for fault in &self.faults {
            let phase = report.phases.iter().find(|p| p.label == fault.name);
            let [reads, read_failures, writes, write_failures] = phase.map_or([0; 4], |p| {
                [
                    p.requests - p.writes,
                    p.failures - p.write_failures,
                    p.writes,
                    p.write_failures,
                ]
            });
            text.push_str(&format!(
                "| {} | {:?} | {read_failures} / {reads} | {write_failures} / {writes} | {:?} | {} |\n",
                fault.name,
                fault.lasted,
                fault.recovered_in,
                if fault.node_stopped { "yes" } else { "" }
            ));
        }
        println!("{text}");
        if let Some((path, header)) = report_to {
            std::fs::write(path, header + &text).unwrap();
        }
        assert!(
            report.consistency.is_clean(),
            "anomalies:\n{}",
            report.consistency
        );
        assert_eq!(report.violation_count, 0, "{report}");
        assert!(report.consistency.ops > 500, "{report}");
        if let Ok(path) = std::env::var("CAUSEWAY_HISTORY_FILE") {
            std::fs::write(&path, report.ops.to_json_lines()).unwrap();
        }
        if let Err(e) = check_final_state(&self.cluster).await {
            panic!("{e}");
        }
        let changes = check_changes(&report.ops, &self.receiver, &self.cdc).await;
        assert!(changes.is_empty(), "the change feed: {changes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nemesis_under_load_leaves_no_anomaly() {
    // Small memtables, so that a full disk bites within a fault: a flush and a new write-ahead
    // log need space every second or so.
    let mut run = Run::start(512, 64 << 10).await;
    let nodes = run.cluster.node_ids();
    for nemesis in [
        Nemesis::KillStoreNode(nodes[0]),
        Nemesis::PauseStoreNode(nodes[3]),
        Nemesis::KillConfigManager,
        Nemesis::KillApiServer(1),
        Nemesis::Scale(3, 2),
        Nemesis::Scale(2, 2),
        Nemesis::KillBroker(LOG_LEADER),
        Nemesis::Isolate(nodes[1]),
        Nemesis::CutFromPeers(nodes[2]),
        Nemesis::DiskFull(nodes[0]),
        Nemesis::FsyncFails(nodes[3]),
        Nemesis::KillCdc,
    ] {
        // The Kafka node that leads the log when the fault starts: its loss moves the
        // leadership.
        let nemesis = match nemesis {
            Nemesis::KillBroker(LOG_LEADER) => {
                Nemesis::KillBroker(run.cluster.log_leader().unwrap())
            }
            other => other,
        };
        let stopped = run
            .fault(nemesis, FAULT, Duration::from_secs(2), Some(DISK_FAULT_MAX))
            .await;
        // The disk faults bit: the node stopped rather than go on with a store it could not
        // write (and the history shows it started again on that store without an anomaly).
        if matches!(nemesis, Nemesis::DiskFull(_) | Nemesis::FsyncFails(_)) {
            assert!(
                stopped,
                "{} did not stop the node within {DISK_FAULT_MAX:?}\n{}",
                nemesis.name(),
                run.cluster.logs()
            );
        }
    }
    run.finish(None).await;
}

/// Randomly scheduled faults for `CAUSEWAY_SOAK_SECONDS` (default 600), the schedule drawn from
/// `CAUSEWAY_SOAK_SEED` (default: a random one, printed) so that a run can be replayed; the
/// report goes to `CAUSEWAY_SOAK_REPORT` when set. `scripts/soak.sh` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of many minutes: scripts/soak.sh runs it"]
async fn soak() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seconds = env("CAUSEWAY_SOAK_SECONDS").unwrap_or(600);
    let seed = env("CAUSEWAY_SOAK_SEED").unwrap_or_else(rand::random);
    println!("soak: {seconds} s, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Room for an hour of the load's data, and memtables that still flush every few seconds.
    let mut run = Run::start(2048, 1 << 20).await;
    let apis = run.cluster.api_urls().len();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        // Store nodes of the current shape, and now and then a transition between 2×2 and 3×2.
        let shape = run.cluster.current_config().await.unwrap();
        let nodes: Vec<NodeId> = shape.node_ids().into_iter().collect();
        let node = nodes[rng.random_range(0..nodes.len())];
        let nemesis = match rng.random_range(0..13) {
            0 => Nemesis::KillStoreNode(node),
            1 => Nemesis::PauseStoreNode(node),
            2 => Nemesis::KillConfigManager,
            3 => Nemesis::KillApiServer(rng.random_range(0..apis)),
            4 => Nemesis::KillBroker(rng.random_range(0..3)),
            5 => Nemesis::Isolate(node),
            6 => Nemesis::CutFromPeers(node),
            7 => Nemesis::DiskFull(node),
            8 => Nemesis::FsyncFails(node),
            9 => Nemesis::KillCdc,
            _ if shape.replicas.len() == 2 => Nemesis::Scale(3, 2),
            _ => Nemesis::Scale(2, 2),
        };
        let lasted = Duration::from_millis(rng.random_range(1_000..10_000));
        let quiet = Duration::from_millis(rng.random_range(1_000..8_000));
        run.fault(nemesis, lasted, quiet, None).await;
    }
    let report_to = std::env::var("CAUSEWAY_SOAK_REPORT")
        .ok()
        .map(|path| (path, format!("Soak: {seconds} s, seed {seed}.\n\n")));
    run.finish(report_to).await;
}

/// Every replica of every partition agrees once the faults are over.
async fn check_final_state(cluster: &LocalCluster) -> Result<()> {
    if cluster
        .verify_replicas_agree(Duration::from_secs(60))
        .await
        .is_err()
    {
        bail!("the replicas disagree after the faults\n{}", cluster.logs());
    }
    Ok(())
}

/// Every acknowledged write of the load's unique documents reached the feed's webhook as an
/// event at its commit ts, whatever the faults (the cdc service killed among them), and no
/// event shows a document that no write wrote or at another ts than the write's. Waits first
/// until the feed has resolved the last acknowledged write. Answers what is wrong.
async fn check_changes(history: &History, receiver: &Receiver, cdc: &Cdc) -> Vec<String> {
    let prefix = format!("{WRITES}/");
    // Each unique document's write: its commit ts when acknowledged, `None` when unknown.
    let mut writes: std::collections::HashMap<&str, (OpResult, Option<u64>)> = Default::default();
    for op in &history.ops {
        if let OpKind::Write {
            writes: items,
            commit_ts,
        } = &op.kind
        {
            for (key, _) in items {
                if let Some(id) = key.strip_prefix(&prefix) {
                    writes.insert(id, (op.result, *commit_ts));
                }
            }
        }
    }
    let last = writes.values().filter_map(|w| w.1).max().unwrap_or(0);
    let resolved = until("the feed to resolve the last write", RECOVERY, || async {
        (receiver.resolved() >= last).then_some(())
    })
    .await;
    if let Err(e) = resolved {
        return vec![format!(
            "{e} (resolved {})\n{}",
            receiver.resolved(),
            cdc.tail()
        )];
    }
    let mut problems = receiver.bad();
    let mut seen: std::collections::HashMap<String, u64> = Default::default();
    for event in receiver.deliveries().iter().flat_map(|d| &d.events) {
        let data = &event["data"];
        let (Some(id), Some(ts)) = (data["key"]["id"].as_str(), data["ts"].as_u64()) else {
            continue; // a resolved event
        };
        match writes.get(id) {
            Some((OpResult::Ok, Some(at))) if *at != ts => problems.push(format!(
                "{id}: an event at ts {ts}, the write committed at {at}"
            )),
            Some((OpResult::Ok | OpResult::Unknown, _)) => {}
            _ => problems.push(format!("{id}: an event at ts {ts}, but no write wrote it")),
        }
        seen.insert(id.to_owned(), ts);
    }
    let missing: Vec<_> = writes
        .iter()
        .filter(|(id, w)| w.0 == OpResult::Ok && !seen.contains_key(**id))
        .map(|(id, w)| format!("{id} (ts {:?})", w.1))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} acknowledged writes never reached the feed, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    problems.truncate(20);
    problems
}
