//! `causeway admin status`: the configuration from the config manager (`GetConfig`,
//! `ListNodes`) and each node's own view from its `Status` RPC, as a table or as JSON.
//!
//! The UST and GC timestamp are views: each node computes them from gossip, so they differ by a
//! gossip round between nodes. The summary shows the highest view (frontiers only move forward,
//! so it is the most recent); `--json` has every node's. While a transition runs, the status is
//! sampled twice (`--sample-ms` apart) and the rate of backfill between the samples gives the
//! estimate of the time left.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use causeway_config_manager as cm;
use causeway_core::{ClusterConfig, NodeId, KEYSPACE};
use causeway_proto::link::Link;
use causeway_proto::v1::{BackfillStatus, NodeStatus as ProtoNodeStatus};
use serde::Serialize;

use super::progress::{self, Totals};
use super::{bounded, connect, node_status};
use crate::dev::Manifest;

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
    #[command(flatten)]
    credentials: super::Credentials,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// While a transition runs: how far apart the two samples of the backfill are, for the
    /// estimate of the time left (0: one sample, no estimate).
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
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
    /// The backfill for the next configuration, over its nodes, while a transition runs.
    pub backfill: Option<BackfillSummary>,
    /// Registered nodes in no configuration that still hold no data and serve (candidates for
    /// a new shape or a replacement).
    pub spares: Vec<u64>,
    /// Registered nodes in no configuration that report they left it and dropped their data.
    pub drained: Vec<u64>,
}

/// The backfill of a transition, summed over the nodes of next.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillSummary {
    pub epoch: u64,
    #[serde(flatten)]
    pub totals: Totals,
    /// From the rate between two samples; absent while nothing moved (or with one sample).
    pub seconds_left: Option<f64>,
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
    /// Its backfill for the next configuration, while a transition runs.
    pub backfill: Option<NodeBackfill>,
    pub error: Option<String>,
}

/// One node's backfill, as its `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeBackfill {
    pub epoch: u64,
    pub intervals_done: u32,
    pub intervals_total: u32,
    pub bytes_done: u64,
    pub bytes_estimated: u64,
    pub backfilled: bool,
    pub vetoed: bool,
    pub restarts: u32,
}

impl From<&BackfillStatus> for NodeBackfill {
    fn from(b: &BackfillStatus) -> Self {
        NodeBackfill {
            epoch: b.epoch,
            intervals_done: b.intervals_done,
            intervals_total: b.intervals_total,
            bytes_done: b.bytes_done,
            bytes_estimated: b.bytes_estimated,
            backfilled: b.backfilled,
            vetoed: b.vetoed,
            restarts: b.restarts,
        }
    }
}

impl NodeBackfill {
    /// `2/4 int, 1.0 MiB/3.0 MiB` and what the node declared.
    fn cell(&self) -> String {
        let bytes = if self.bytes_estimated > 0 {
            format!(
                "{}/{}",
                progress::bytes(self.bytes_done),
                progress::bytes(self.bytes_estimated)
            )
        } else {
            progress::bytes(self.bytes_done)
        };
        let flag = if self.vetoed {
            " vetoed"
        } else if self.backfilled {
            " done"
        } else {
            ""
        };
        format!(
            "{}/{} int, {bytes}{flag}",
            self.intervals_done, self.intervals_total
        )
    }
}

/// One look at the cluster: the pair, the registered nodes and each node's `Status`.
#[derive(Debug)]
pub struct Snapshot {
    pub pair: cm::ConfigPair,
    pub registered: Vec<cm::NodeStatus>,
    /// Every node of current ∪ next and every other registered node.
    pub statuses: BTreeMap<NodeId, Result<ProtoNodeStatus>>,
}

impl Snapshot {
    /// Takes one.
    pub async fn take(client: &cm::Client, link: &Link) -> Result<Snapshot> {
        let pair = bounded("GetConfig", client.get_config()).await?;
        let registered = bounded("ListNodes", client.list_nodes()).await?;
        let mut addrs: BTreeMap<NodeId, String> = registered
            .iter()
            .map(|n| (n.info.id, n.info.addr.clone()))
            .collect();
        for config in pair.current.iter().chain(&pair.next) {
            for (id, info) in &config.nodes {
                addrs.insert(*id, info.addr.clone());
            }
        }
        let queries: Vec<_> = addrs
            .into_iter()
            .map(|(id, addr)| {
                let link = link.clone();
                tokio::spawn(async move { (id, node_status(id, &addr, &link).await) })
            })
            .collect();
        let mut statuses = BTreeMap::new();
        for q in queries {
            let (id, status) = q.await?;
            statuses.insert(id, status);
        }
        Ok(Snapshot {
            pair,
            registered,
            statuses,
        })
    }

    /// The backfill totals for the next configuration, over its nodes (`None`: no transition).
    pub fn backfill_totals(&self) -> Option<Totals> {
        let next = self.pair.next.as_ref()?;
        let reports = next
            .nodes
            .keys()
            .filter_map(|id| self.statuses.get(id)?.as_ref().ok()?.backfill.as_ref());
        Some(Totals::of(next.epoch.0, reports))
    }

    /// The phases the reachable nodes of current ∪ next report, each once.
    pub fn phases(&self) -> Vec<String> {
        let in_config = |id: &NodeId| {
            self.pair
                .current
                .iter()
                .chain(&self.pair.next)
                .any(|c| c.contains(*id))
        };
        let phases: BTreeSet<String> = self
            .statuses
            .iter()
            .filter(|(id, _)| in_config(id))
            .filter_map(|(_, s)| s.as_ref().ok())
            .map(|s| s.phase.clone())
            .collect();
        phases.into_iter().collect()
    }
}

/// Gathers the status of the cluster behind `config_manager`; while a transition runs, a second
/// sample `sample` later gives the time left.
pub async fn gather(config_manager: &str, link: &Link, sample: Duration) -> Result<Status> {
    let client = connect(config_manager, link).await?;
    let first = Snapshot::take(&client, link).await?;
    let taken = Instant::now();
    let mut seconds_left = None;
    let snapshot = match first.backfill_totals() {
        Some(before) if !sample.is_zero() => {
            tokio::time::sleep(sample).await;
            let second = Snapshot::take(&client, link).await?;
            let same_epoch = second.pair.next_epoch() == first.pair.next_epoch();
            if let (true, Some(after)) = (same_epoch, second.backfill_totals()) {
                seconds_left =
                    progress::time_left(&before, &after, taken.elapsed()).map(|d| d.as_secs_f64());
            }
            second
        }
        _ => first,
    };
    Ok(summarize(config_manager, &snapshot, seconds_left))
}

/// The status a snapshot shows.
pub fn summarize(config_manager: &str, snapshot: &Snapshot, seconds_left: Option<f64>) -> Status {
    let Snapshot {
        pair,
        registered,
        statuses,
    } = snapshot;
    let live: BTreeMap<NodeId, bool> = registered.iter().map(|n| (n.info.id, n.live)).collect();
    let mut in_config: BTreeSet<NodeId> = BTreeSet::new();
    for config in pair.current.iter().chain(&pair.next) {
        in_config.extend(config.nodes.keys().copied());
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
            backfill: ok.and_then(|s| s.backfill.as_ref()).map(NodeBackfill::from),
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

    let reachable: Vec<&ProtoNodeStatus> = statuses
        .iter()
        .filter(|(id, _)| in_config.contains(id))
        .filter_map(|(_, s)| s.as_ref().ok())
        .collect();
    let outside: Vec<NodeId> = registered
        .iter()
        .map(|n| n.info.id)
        .filter(|id| !in_config.contains(id))
        .collect();
    let drained = |id: &NodeId| matches!(statuses.get(id), Some(Ok(s)) if s.drained);
    Status {
        config_manager: config_manager.to_string(),
        revision: pair.revision,
        epoch: pair.current_epoch().0,
        next_epoch: pair.next.as_ref().map(|c| c.epoch.0),
        phases: snapshot.phases(),
        ust: reachable.iter().map(|s| s.ust).max(),
        gc: reachable.iter().map(|s| s.gc).max(),
        log_next: reachable.iter().map(|s| s.log_next).max(),
        partitions: pair
            .current
            .as_ref()
            .map(&partitions_of)
            .unwrap_or_default(),
        next_partitions: pair.next.as_ref().map(&partitions_of).unwrap_or_default(),
        backfill: pair.next.as_ref().and_then(|next| {
            Some(BackfillSummary {
                epoch: next.epoch.0,
                totals: snapshot.backfill_totals()?,
                seconds_left,
            })
        }),
        spares: outside
            .iter()
            .filter(|id| !drained(id))
            .map(|id| id.0)
            .collect(),
        drained: outside
            .iter()
            .filter(|id| drained(id))
            .map(|id| id.0)
            .collect(),
    }
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
    let phase = progress::phases(&s.phases);
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
            "\n{title}\n{:<10} {:>7}  {:<6} {:<22} {:>10} {:>6} {:>10}  {:<12} {:<12} {}\n",
            "partition",
            "share",
            "node",
            "addr",
            "committed",
            "lag",
            "UST",
            "health",
            "phase",
            "backfill"
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
                let backfill = r
                    .backfill
                    .as_ref()
                    .map_or_else(|| "-".into(), NodeBackfill::cell);
                let line = format!(
                    "{:<10} {:>7}  {:<6} {:<22} {:>10} {:>6} {:>10}  {:<12} {:<12} {}",
                    name,
                    share,
                    format!("n{}", r.node),
                    r.addr,
                    opt(r.committed),
                    opt(r.lag),
                    opt(r.ust),
                    r.health,
                    r.phase.as_deref().unwrap_or("-"),
                    backfill,
                );
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
    };
    table("current configuration", &s.partitions);
    table("next configuration", &s.next_partitions);
    if let Some(b) = &s.backfill {
        let left = b.seconds_left.map(Duration::from_secs_f64);
        out.push_str(&format!(
            "\nbackfill: {}\n",
            progress::progress_line(b.epoch, &phase, &b.totals, left)
        ));
    }
    let names = |ids: &[u64]| {
        ids.iter()
            .map(|n| format!("n{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !s.spares.is_empty() {
        out.push_str(&format!("\nspare nodes: {}\n", names(&s.spares)));
    }
    if !s.drained.is_empty() {
        out.push_str(&format!(
            "\ndrained nodes (left the configuration, may be stopped): {}\n",
            names(&s.drained)
        ));
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

/// Runs `causeway admin status`.
pub async fn status(args: Args) -> Result<()> {
    let addr = match &args.data_dir {
        Some(dir) => Manifest::load(dir)?
            .with_context(|| format!("{} has no causeway dev manifest (dev.json)", dir.display()))?
            .config_manager
            .to_string(),
        None => args.config_manager.clone(),
    };
    let link = args.credentials.link(args.data_dir.as_deref())?;
    let status = gather(&addr, &link, Duration::from_millis(args.sample_ms)).await?;
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
            backfill: None,
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
            backfill: None,
            spares: vec![5],
            drained: vec![],
        };
        let text = render(&status);
        assert!(text.contains("epoch 1   phase stable"), "{text}");
        assert!(text.contains("UST 40   GC ts 30   log end 43"), "{text}");
        assert!(text.contains("50.0%"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
        assert!(text.contains("spare nodes: n5"), "{text}");
        assert!(!text.contains("drained"), "{text}");
        assert!(!text.contains("backfill:"), "{text}");
        assert_eq!(text.matches("127.0.0.1:400").count(), 4, "{text}");
    }

    #[test]
    fn a_transition_shows_each_nodes_phase_and_backfill_and_the_time_left() {
        let r = |node, phase: &str, backfill: Option<NodeBackfill>| ReplicaStatus {
            node,
            addr: format!("127.0.0.1:{}", 4000 + node),
            health: "ok".into(),
            committed: Some(41),
            lag: Some(0),
            ust: Some(40),
            gc: Some(30),
            routing_epoch: Some(1),
            phase: Some(phase.into()),
            backfill,
            error: None,
        };
        let b = |done, total, bytes_done, est, backfilled| NodeBackfill {
            epoch: 2,
            intervals_done: done,
            intervals_total: total,
            bytes_done,
            bytes_estimated: est,
            backfilled,
            vetoed: false,
            restarts: 0,
        };
        let status = Status {
            config_manager: "cm:1".into(),
            revision: 3,
            epoch: 1,
            next_epoch: Some(2),
            phases: vec!["backfilling".into()],
            ust: Some(40),
            gc: Some(30),
            log_next: Some(42),
            partitions: vec![PartitionStatus {
                partition: 0,
                share: 1.0,
                replicas: vec![r(1, "backfilling", None)],
            }],
            next_partitions: vec![
                PartitionStatus {
                    partition: 0,
                    share: 0.5,
                    replicas: vec![r(1, "backfilling", Some(b(0, 0, 0, 0, true)))],
                },
                PartitionStatus {
                    partition: 1,
                    share: 0.5,
                    replicas: vec![r(2, "backfilling", Some(b(1, 3, 1 << 20, 3 << 20, false)))],
                },
            ],
            backfill: Some(BackfillSummary {
                epoch: 2,
                totals: Totals {
                    nodes: 2,
                    nodes_backfilled: 1,
                    intervals_done: 1,
                    intervals_total: 3,
                    bytes_done: 1 << 20,
                    bytes_estimated: 3 << 20,
                },
                seconds_left: Some(125.0),
            }),
            spares: vec![],
            drained: vec![7, 8],
        };
        let text = render(&status);
        assert!(
            text.contains("epoch 1 → 2 (transition)   phase backfilling"),
            "{text}"
        );
        assert!(
            text.contains("backfilling  1/3 int, 1.0 MiB/3.0 MiB\n"),
            "{text}"
        );
        assert!(text.contains("backfilling  0/0 int, 0 B done\n"), "{text}");
        assert!(
            text.contains(
                "backfill: epoch 2: backfilling, 1/3 intervals, 1.0 MiB of 3.0 MiB, \
                 1/2 nodes backfilled, about 2m 05s left"
            ),
            "{text}"
        );
        assert!(
            text.contains("drained nodes (left the configuration, may be stopped): n7 n8"),
            "{text}"
        );
        assert!(!text.contains("spare nodes"), "{text}");
    }
}
