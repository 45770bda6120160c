//! `causeway admin status`: the configuration from the config manager (`GetConfig`,
//! `ListNodes`) and each replica's own view from its `Status` RPC, as a table or as JSON.
//!
//! The UST and GC timestamp are views: each node computes them from gossip, so they differ by a
//! gossip round between nodes. The summary shows the highest view (frontiers only move forward,
//! so it is the most recent); `--json` has every node's.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use causeway_config_manager as cm;
use causeway_core::{ClusterConfig, NodeId, KEYSPACE};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{NodeStatus as ProtoNodeStatus, StatusRequest};
use serde::Serialize;

use crate::dev::Manifest;

/// Every RPC of the command is bounded by this.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Flags of `causeway admin status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config manager (`host:port`).
    #[arg(
        long,
        env = "CAUSEWAY_CONFIG_MANAGER",
        default_value = "127.0.0.1:7400",
        conflicts_with = "data_dir"
    )]
    config_manager: String,
    /// Instead of --config-manager: the data dir of a running `causeway dev`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Status {
    pub config_manager: String,
    /// Changes of the configuration pair so far.
    pub revision: u64,
    /// The current configuration's epoch (0 before bootstrap).
    pub epoch: u64,
    /// The next configuration's epoch while a transition runs.
    pub next_epoch: Option<u64>,
    /// The transition phases the nodes report (one entry when they agree).
    pub phases: Vec<String>,
    /// The highest UST view of the nodes.
    pub ust: Option<u64>,
    /// The highest GC timestamp view of the nodes.
    pub gc: Option<u64>,
    /// The log's end as the nodes last saw it (its next ts).
    pub log_next: Option<u64>,
    pub partitions: Vec<PartitionStatus>,
    /// Partitions of the next configuration, while a transition runs.
    pub next_partitions: Vec<PartitionStatus>,
    /// Registered nodes in no configuration.
    pub spares: Vec<u64>,
}

/// One partition of a configuration.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// Its fraction of the keyspace.
    pub share: f64,
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica, as the config manager and the node itself see it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub node: u64,
    pub addr: String,
    /// `ok`, `failed` (marked in the configuration), `no-heartbeat` (the config manager has not
    /// heard from it within its timeout) or `unreachable` (its `Status` failed).
    pub health: String,
    pub committed: Option<u64>,
    /// Records behind the end of the log the node last saw.
    pub lag: Option<u64>,
    pub ust: Option<u64>,
    pub gc: Option<u64>,
    pub routing_epoch: Option<u64>,
    pub phase: Option<String>,
    pub error: Option<String>,
}

async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    tokio::time::timeout(RPC_TIMEOUT, fut)
        .await
        .with_context(|| format!("{what}: no answer within {RPC_TIMEOUT:?}"))?
        .with_context(|| what.to_string())
}

/// A node's `Status`.
async fn node_status(addr: &str) -> Result<ProtoNodeStatus> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let channel = bounded("connecting", endpoint.connect()).await?;
    let mut client = StoreNodeClient::new(channel);
    let answer = bounded("Status", client.status(StatusRequest {})).await?;
    Ok(answer.into_inner())
}

/// Gathers the status of the cluster behind `config_manager`.
pub async fn gather(config_manager: &str) -> Result<Status> {
    let client = bounded("connecting to the config manager", async {
        cm::Client::connect(config_manager).await
    })
    .await
    .with_context(|| format!("config manager at {config_manager}"))?;
    let pair = bounded("GetConfig", client.get_config()).await?;
    let registered = bounded("ListNodes", client.list_nodes()).await?;
    let live: BTreeMap<NodeId, bool> = registered.iter().map(|n| (n.info.id, n.live)).collect();

    let mut in_config: BTreeMap<NodeId, String> = BTreeMap::new();
    for config in pair.current.iter().chain(&pair.next) {
        for (id, info) in &config.nodes {
            in_config.insert(*id, info.addr.clone());
        }
    }
    let mut statuses: BTreeMap<NodeId, Result<ProtoNodeStatus>> = BTreeMap::new();
    let queries: Vec<_> = in_config
        .iter()
        .map(|(id, addr)| {
            let addr = addr.clone();
            let id = *id;
            tokio::spawn(async move { (id, node_status(&addr).await) })
        })
        .collect();
    for q in queries {
        let (id, status) = q.await?;
        statuses.insert(id, status);
    }

    let replica = |config: &ClusterConfig, id: NodeId| -> ReplicaStatus {
        let addr = config
            .nodes
            .get(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let status = statuses.get(&id);
        let ok = status.and_then(|s| s.as_ref().ok());
        let health = if config.failed.contains(&id) {
            "failed"
        } else if matches!(status, Some(Err(_)) | None) {
            "unreachable"
        } else if !live.get(&id).copied().unwrap_or(false) {
            "no-heartbeat"
        } else {
            "ok"
        };
        ReplicaStatus {
            node: id.0,
            addr,
            health: health.into(),
            committed: ok.map(|s| s.committed),
            lag: ok.map(|s| s.log_next.saturating_sub(s.committed.saturating_add(1))),
            ust: ok.map(|s| s.ust),
            gc: ok.map(|s| s.gc),
            routing_epoch: ok.map(|s| s.routing_epoch),
            phase: ok.map(|s| s.phase.clone()),
            error: match status {
                Some(Err(e)) => Some(format!("{e:#}")),
                _ => None,
            },
        }
    };
    let partitions_of = |config: &ClusterConfig| -> Vec<PartitionStatus> {
        let shares = config.slicing.shares();
        config
            .replicas
            .iter()
            .map(|(p, nodes)| PartitionStatus {
                partition: p.0,
                share: shares.get(p).copied().unwrap_or(0) as f64 / KEYSPACE as f64,
                replicas: nodes.iter().map(|&n| replica(config, n)).collect(),
            })
            .collect()
    };

    let reachable: Vec<&ProtoNodeStatus> =
        statuses.values().filter_map(|s| s.as_ref().ok()).collect();
    let phases: BTreeSet<String> = reachable.iter().map(|s| s.phase.clone()).collect();
    Ok(Status {
        config_manager: config_manager.to_string(),
        revision: pair.revision,
        epoch: pair.current_epoch().0,
        next_epoch: pair.next.as_ref().map(|c| c.epoch.0),
        phases: phases.into_iter().collect(),
        ust: reachable.iter().map(|s| s.ust).max(),
        gc: reachable.iter().map(|s| s.gc).max(),
        log_next: reachable.iter().map(|s| s.log_next).max(),
        partitions: pair
            .current
            .as_ref()
            .map(&partitions_of)
            .unwrap_or_default(),
        next_partitions: pair.next.as_ref().map(&partitions_of).unwrap_or_default(),
        spares: registered
            .iter()
            .map(|n| n.info.id)
            .filter(|id| !in_config.contains_key(id))
            .map(|id| id.0)
            .collect(),
    })
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The human-readable table.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let next = s
        .next_epoch
        .map_or_else(String::new, |e| format!(" → {e} (transition)"));
    let phase = if s.phases.is_empty() {
        "-".into()
    } else {
        s.phases.join(", ")
    };
    out.push_str(&format!(
        "config manager {}   revision {}\nepoch {}{}   phase {}\nUST {}   GC ts {}   log end {}\n",
        s.config_manager,
        s.revision,
        s.epoch,
        next,
        phase,
        opt(s.ust),
        opt(s.gc),
        opt(s.log_next.map(|n| n.saturating_sub(1))),
    ));
    if s.partitions.is_empty() {
        out.push_str("\nnot bootstrapped: no configuration yet\n");
    }
    let mut table = |title: &str, partitions: &[PartitionStatus]| {
        if partitions.is_empty() {
            return;
        }
        out.push_str(&format!(
            "\n{title}\n{:<10} {:>7}  {:<6} {:<22} {:>10} {:>6} {:>10}  {}\n",
            "partition", "share", "node", "addr", "committed", "lag", "UST", "health"
        ));
        for p in partitions {
            for (i, r) in p.replicas.iter().enumerate() {
                let (name, share) = if i == 0 {
                    (
                        format!("p{}", p.partition),
                        format!("{:.1}%", p.share * 100.0),
                    )
                } else {
                    (String::new(), String::new())
                };
                out.push_str(&format!(
                    "{:<10} {:>7}  {:<6} {:<22} {:>10} {:>6} {:>10}  {}\n",
                    name,
                    share,
                    format!("n{}", r.node),
                    r.addr,
                    opt(r.committed),
                    opt(r.lag),
                    opt(r.ust),
                    r.health,
                ));
            }
        }
    };
    table("current configuration", &s.partitions);
    table("next configuration", &s.next_partitions);
    if !s.spares.is_empty() {
        let spares: Vec<String> = s.spares.iter().map(|n| format!("n{n}")).collect();
        out.push_str(&format!("\nspare nodes: {}\n", spares.join(" ")));
    }
    for p in s.partitions.iter().chain(&s.next_partitions) {
        for r in &p.replicas {
            if let Some(e) = &r.error {
                out.push_str(&format!("\nn{}: {e}", r.node));
            }
        }
    }
    out
}

/// Flags of `causeway admin bootstrap`.
#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// The config manager (`host:port`).
    #[arg(
        long,
        env = "CAUSEWAY_CONFIG_MANAGER",
        default_value = "127.0.0.1:7400"
    )]
    config_manager: String,
    #[arg(long)]
    partitions: u32,
    #[arg(long)]
    replicas: u32,
    /// How long to wait for partitions × replicas live registered nodes, in seconds.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

/// Runs `causeway admin bootstrap`: waits until enough store nodes are registered and live, then
/// installs the first configuration. A cluster already bootstrapped with this shape is left as
/// it is (so scripts may run it on every start); another shape is an error.
pub async fn bootstrap(args: BootstrapArgs) -> Result<()> {
    let client = bounded("connecting to the config manager", async {
        cm::Client::connect(&args.config_manager).await
    })
    .await
    .with_context(|| format!("config manager at {}", args.config_manager))?;
    let needed = u64::from(args.partitions) * u64::from(args.replicas);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    loop {
        let pair = bounded("GetConfig", client.get_config()).await?;
        if let Some(current) = &pair.current {
            let shape = (
                current.replicas.len(),
                current.replicas.values().map(Vec::len).max().unwrap_or(0),
            );
            anyhow::ensure!(
                shape == (args.partitions as usize, args.replicas as usize),
                "the cluster is already bootstrapped as {}×{}",
                shape.0,
                shape.1
            );
            println!("already bootstrapped: epoch {}", current.epoch);
            return Ok(());
        }
        let live = bounded("ListNodes", client.list_nodes())
            .await?
            .iter()
            .filter(|n| n.live)
            .count() as u64;
        if live >= needed {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {live} of {needed} store nodes registered within {} s",
            args.wait
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pair = bounded(
        "Bootstrap",
        client.bootstrap(args.partitions, args.replicas),
    )
    .await?;
    println!(
        "bootstrapped {}×{}: epoch {}",
        args.partitions,
        args.replicas,
        pair.current_epoch()
    );
    Ok(())
}

/// Runs `causeway admin status`.
pub async fn status(args: Args) -> Result<()> {
    let addr = match &args.data_dir {
        Some(dir) => Manifest::load(dir)?
            .with_context(|| format!("{} has no causeway dev manifest (dev.json)", dir.display()))?
            .config_manager
            .to_string(),
        None => args.config_manager.clone(),
    };
    let status = gather(&addr).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_replica_and_the_frontiers() {
        let r = |node, health: &str| ReplicaStatus {
            node,
            addr: format!("127.0.0.1:{}", 4000 + node),
            health: health.into(),
            committed: Some(41),
            lag: Some(2),
            ust: Some(40),
            gc: Some(30),
            routing_epoch: Some(1),
            phase: Some("stable".into()),
            error: None,
        };
        let status = Status {
            config_manager: "127.0.0.1:7400".into(),
            revision: 2,
            epoch: 1,
            next_epoch: None,
            phases: vec!["stable".into()],
            ust: Some(40),
            gc: Some(30),
            log_next: Some(44),
            partitions: vec![
                PartitionStatus {
                    partition: 0,
                    share: 0.5,
                    replicas: vec![r(1, "ok"), r(2, "unreachable")],
                },
                PartitionStatus {
                    partition: 1,
                    share: 0.5,
                    replicas: vec![r(3, "ok"), r(4, "ok")],
                },
            ],
            next_partitions: vec![],
            spares: vec![5],
        };
        let text = render(&status);
        assert!(text.contains("epoch 1   phase stable"), "{text}");
        assert!(text.contains("UST 40   GC ts 30   log end 43"), "{text}");
        assert!(text.contains("50.0%"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
        assert!(text.contains("spare nodes: n5"), "{text}");
        assert_eq!(text.matches("127.0.0.1:400").count(), 4, "{text}");
    }
}
