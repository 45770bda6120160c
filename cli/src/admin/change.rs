//! `causeway admin scale|replace|abort`: propose a new shape, replace a node, abandon a
//! transition. With `--wait`, scale and replace follow the transition to its end: a live
//! progress bar (plain lines without a TTY) from the config manager and every node's `Status`,
//! the final configuration once installed, and a non-zero exit when it is aborted, replaced by
//! another proposal, or not installed within `--timeout`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_config_manager as cm;
use causeway_core::{ClusterConfig, Epoch, NodeId};
use causeway_proto::link::Link;
use indicatif::{ProgressBar, ProgressStyle};

use super::progress::{self, Outcome};
use super::status::Snapshot;
use super::{bounded, connect, wait_for_live_nodes};

/// How often `--wait` looks at the cluster.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often `--wait` prints a plain line without a TTY (and at every change of phase).
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(2);
/// Proposals may wait for spare nodes to start and register (`causeway dev`), and an abort
/// asks nodes one after the other: longer than a plain RPC.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The config manager flag shared by the commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The config manager (`host:port`).
    #[arg(
        long,
        env = "CAUSEWAY_CONFIG_MANAGER",
        default_value = "127.0.0.1:7400"
    )]
    pub config_manager: String,
    #[command(flatten)]
    pub credentials: super::Credentials,
}

/// How `--wait` behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct Wait {
    /// Follow the transition until it is installed (non-zero exit if it is aborted or times
    /// out).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to wait for the install, e.g. `90s`, `10m`, `1h`.
    #[arg(long, default_value = "10m", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

/// Flags of `causeway admin scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    target: Target,
    /// Partitions of the new shape (default: the current number).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    partitions: Option<u32>,
    /// Replicas per partition of the new shape (default: the current number).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    replicas: Option<u32>,
    /// Converge on the shape instead of changing it: exit 0 when the cluster has it already,
    /// follow a running transition to it, and with --wait first wait (within --timeout) for
    /// enough live store nodes. For jobs that run on every deploy, such as Helm's hooks.
    #[arg(long)]
    ensure: bool,
    /// With --ensure: act only when the new shape needs fewer store nodes than the current
    /// one, or only when it does not; otherwise exit 0 without a change.
    #[arg(long, value_enum, requires = "ensure")]
    only: Option<NodeCount>,
    #[command(flatten)]
    wait: Wait,
}

/// Which changes of shape `--only` acts on: a StatefulSet's scale-down must drain its highest
/// ordinals before it removes them (`fewer-nodes`), and its scale-up must have started the new
/// pods before they are used (`not-fewer-nodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeCount {
    FewerNodes,
    NotFewerNodes,
}

/// What `causeway admin scale --ensure` does.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing; the reason is printed.
    Nothing(String),
    /// Follow the transition running to the wanted shape.
    Follow(ClusterConfig),
    /// Propose the shape.
    Propose((u32, u32)),
}

/// The step that converges the cluster in `pair` on the shape the flags ask for.
pub fn ensure_step(
    pair: &cm::ConfigPair,
    partitions: Option<u32>,
    replicas: Option<u32>,
    only: Option<NodeCount>,
) -> Result<Step> {
    let current = shape_of(
        pair.current
            .as_ref()
            .context("the cluster is not bootstrapped yet (causeway admin bootstrap)")?,
    );
    let wanted = requested_shape(current, partitions, replicas)?;
    let (p, r) = wanted;
    if let Some(next) = &pair.next {
        ensure!(
            shape_of(next) == wanted,
            "a transition to epoch {} ({}×{}) is running, not to {p}×{r}: wait for it, or abort \
             it (causeway admin abort)",
            next.epoch,
            shape_of(next).0,
            shape_of(next).1
        );
        return Ok(Step::Follow(next.clone()));
    }
    if wanted == current {
        return Ok(Step::Nothing(format!("the cluster has {p}×{r} already")));
    }
    let fewer = u64::from(p) * u64::from(r) < u64::from(current.0) * u64::from(current.1);
    let skip = match only {
        Some(NodeCount::FewerNodes) => !fewer,
        Some(NodeCount::NotFewerNodes) => fewer,
        None => false,
    };
    if skip {
        let (cp, cr) = current;
        let which = if fewer { "fewer" } else { "no fewer" };
        return Ok(Step::Nothing(format!(
            "left for later: {p}×{r} needs {which} store nodes than {cp}×{cr}"
        )));
    }
    Ok(Step::Propose(wanted))
}

/// Flags of `causeway admin replace`.
#[derive(Debug, clap::Args)]
pub struct ReplaceArgs {
    #[command(flatten)]
    target: Target,
    /// The node to replace (`3` or `n3`), a node of the current configuration.
    #[arg(value_parser = parse_node)]
    node: NodeId,
    /// The registered live node to put in its place (default: the lowest-id one in no
    /// configuration).
    #[arg(long = "with", value_parser = parse_node)]
    with: Option<NodeId>,
    #[command(flatten)]
    wait: Wait,
}

/// Flags of `causeway admin abort`.
#[derive(Debug, clap::Args)]
pub struct AbortArgs {
    #[command(flatten)]
    target: Target,
    /// Abort only if the transition running is to this epoch (default: whichever runs).
    #[arg(long)]
    epoch: Option<u64>,
}

/// `3` or `n3`.
pub fn parse_node(s: &str) -> Result<NodeId, String> {
    let digits = s.strip_prefix('n').unwrap_or(s);
    digits
        .parse::<u64>()
        .map(NodeId)
        .map_err(|_| format!("{s:?} is not a node id (a number such as 3, or n3)"))
}

/// `90s`, `10m`, `1h`, `500ms`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as 500ms, 90s, 10m or 1h)");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(d)
}

/// The shape of a configuration: (partitions, replicas of the largest partition).
pub fn shape_of(config: &ClusterConfig) -> (u32, u32) {
    let partitions = u32::try_from(config.replicas.len()).unwrap_or(u32::MAX);
    let replicas = config.replicas.values().map(Vec::len).max().unwrap_or(0);
    (partitions, u32::try_from(replicas).unwrap_or(u32::MAX))
}

/// The shape the flags ask for: the current values where a flag is absent. Refused when neither
/// flag is given.
fn requested_shape(
    current: (u32, u32),
    partitions: Option<u32>,
    replicas: Option<u32>,
) -> Result<(u32, u32)> {
    ensure!(
        partitions.is_some() || replicas.is_some(),
        "nothing to scale: give --partitions, --replicas or both"
    );
    Ok((
        partitions.unwrap_or(current.0),
        replicas.unwrap_or(current.1),
    ))
}

/// The shape to propose: [`requested_shape`], refused when the shape would not change.
pub fn wanted_shape(
    current: (u32, u32),
    partitions: Option<u32>,
    replicas: Option<u32>,
) -> Result<(u32, u32)> {
    let wanted = requested_shape(current, partitions, replicas)?;
    ensure!(
        wanted != current,
        "the cluster already has {} partition(s) × {} replica(s): nothing to do",
        current.0,
        current.1
    );
    Ok(wanted)
}

/// The current configuration, when no transition runs; else a clear refusal.
fn idle_current(pair: &cm::ConfigPair) -> Result<&ClusterConfig> {
    let current = pair
        .current
        .as_ref()
        .context("the cluster is not bootstrapped yet (causeway admin bootstrap)")?;
    if let Some(next) = &pair.next {
        bail!(
            "a transition to epoch {} is running: wait for it, or abort it (causeway admin abort)",
            next.epoch
        );
    }
    Ok(current)
}

/// An admin call, bounded by [`ADMIN_CALL_TIMEOUT`], its refusal in the config manager's words.
async fn admin_call<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, cm::Error>>,
) -> Result<T> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, fut).await {
        Err(_) => bail!("{what}: no answer within {ADMIN_CALL_TIMEOUT:?}"),
        Ok(Err(cm::Error::Rpc(status))) => bail!("{what} refused: {}", status.message()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(what.to_string())),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Runs `causeway admin scale`.
pub async fn scale(args: ScaleArgs) -> Result<()> {
    let link = args.target.credentials.link(None)?;
    let client = connect(&args.target.config_manager, &link).await?;
    let pair = bounded("GetConfig", client.get_config()).await?;
    let (partitions, replicas) = if args.ensure {
        match ensure_step(&pair, args.partitions, args.replicas, args.only)? {
            Step::Nothing(why) => {
                println!("{why}");
                return Ok(());
            }
            Step::Follow(next) => {
                println!("following the running transition to epoch {}", next.epoch);
                return follow(&client, &link, next, &args.wait).await;
            }
            Step::Propose((p, r)) => {
                if args.wait.wait {
                    let needed = u64::from(p) * u64::from(r);
                    wait_for_live_nodes(&client, needed, args.wait.timeout).await?;
                }
                (p, r)
            }
        }
    } else {
        let current = idle_current(&pair)?;
        wanted_shape(shape_of(current), args.partitions, args.replicas)?
    };
    let pair = admin_call("ProposeShape", client.propose_shape(partitions, replicas)).await?;
    let next = pair
        .next
        .context("the config manager answered no next configuration")?;
    println!(
        "proposed epoch {}: {partitions} partition(s) × {replicas} replica(s)",
        next.epoch
    );
    follow(&client, &link, next, &args.wait).await
}

/// Runs `causeway admin replace`.
pub async fn replace(args: ReplaceArgs) -> Result<()> {
    let link = args.target.credentials.link(None)?;
    let client = connect(&args.target.config_manager, &link).await?;
    let pair = bounded("GetConfig", client.get_config()).await?;
    let current = idle_current(&pair)?;
    if !current.contains(args.node) {
        let nodes: Vec<String> = current.nodes.keys().map(ToString::to_string).collect();
        bail!(
            "{} is not in the current configuration (epoch {}: {})",
            args.node,
            current.epoch,
            nodes.join(" ")
        );
    }
    if let Some(with) = args.with {
        ensure!(
            !current.contains(with),
            "{with} is already in the current configuration: replace with a node outside it"
        );
    }
    let pair = match args.with {
        Some(with) => admin_call("ReplaceNode", client.replace_node(args.node, with)).await?,
        None => admin_call("ReplaceNode", client.replace_node_with_free(args.node)).await?,
    };
    let next = pair
        .next
        .context("the config manager answered no next configuration")?;
    let with = next
        .nodes
        .keys()
        .find(|n| !current.contains(**n))
        .map_or_else(|| "?".into(), ToString::to_string);
    println!(
        "proposed epoch {}: {} replaced by {with}",
        next.epoch, args.node
    );
    follow(&client, &link, next, &args.wait).await
}

/// Runs `causeway admin abort`.
pub async fn abort(args: AbortArgs) -> Result<()> {
    let link = args.target.credentials.link(None)?;
    let client = connect(&args.target.config_manager, &link).await?;
    let epoch = Epoch(args.epoch.unwrap_or(0));
    let pair = admin_call("AbortTransition", client.abort_transition(epoch)).await?;
    println!(
        "transition aborted; the configuration stays at epoch {}",
        pair.current_epoch()
    );
    Ok(())
}

/// Prints the proposal, or with `--wait` follows it to its end.
async fn follow(
    client: &cm::Client,
    link: &Link,
    proposed: ClusterConfig,
    wait: &Wait,
) -> Result<()> {
    if !wait.wait {
        print!("{}", progress::render_config(&proposed));
        println!("follow it with: causeway admin status");
        return Ok(());
    }
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} epoch {prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(proposed.epoch.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let started = Instant::now();
    let deadline = started + wait.timeout;
    let mut last_line: Option<(Instant, String)> = None;
    let mut previous: Option<(Instant, progress::Totals)> = None;
    let result = loop {
        let snapshot = match Snapshot::take(client, link).await {
            Ok(s) => s,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %format!("{e:#}"), "cannot look at the cluster; retrying");
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        match progress::outcome(&proposed, &snapshot.pair) {
            Outcome::Installed => break Ok(snapshot.pair),
            Outcome::Aborted => {
                break Err(anyhow::anyhow!(
                    "the transition to epoch {} was aborted: the configuration stays at epoch {}",
                    proposed.epoch,
                    snapshot.pair.current_epoch()
                ))
            }
            Outcome::Replaced => {
                break Err(anyhow::anyhow!(
                    "the transition to epoch {} was abandoned for another proposal",
                    proposed.epoch
                ))
            }
            Outcome::Running => {}
        }
        let totals = snapshot.backfill_totals().unwrap_or_default();
        let phase = progress::phases(&snapshot.phases());
        let now = Instant::now();
        // The rate over the whole wait so far: steadier than between two polls 200 ms apart.
        let first = *previous.get_or_insert((now, totals));
        let left = progress::time_left(&first.1, &totals, now - first.0);
        match &bar {
            Some(bar) => {
                bar.set_length(totals.bytes_estimated);
                bar.set_position(totals.bytes_done.min(totals.bytes_estimated));
                let left = left.map_or_else(String::new, |d| {
                    format!(", about {} left", progress::duration(d))
                });
                bar.set_message(format!(
                    "{phase}, {}/{} intervals{left}",
                    totals.intervals_done, totals.intervals_total
                ));
            }
            None => {
                let line = progress::progress_line(proposed.epoch.0, &phase, &totals, left);
                let due = last_line.as_ref().is_none_or(|(at, text)| {
                    now - *at >= PLAIN_LINE_INTERVAL || !same_phase(text, &line)
                });
                if due {
                    eprintln!("{line}");
                    last_line = Some((now, line));
                }
            }
        }
        if now >= deadline {
            break Err(anyhow::anyhow!(
                "the transition to epoch {} was not installed within {}; it goes on (causeway \
                 admin status follows it, causeway admin abort abandons it)",
                proposed.epoch,
                progress::duration(wait.timeout)
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let pair = result?;
    let installed = pair
        .current
        .as_ref()
        .context("the config manager answered no current configuration")?;
    println!("installed in {}:", progress::duration(started.elapsed()));
    print!("{}", progress::render_config(installed));
    Ok(())
}

/// Whether two progress lines name the same phase (`epoch E: PHASE, …`).
fn same_phase(a: &str, b: &str) -> bool {
    let phase = |l: &str| l.split(',').next().map(str::to_owned);
    phase(a) == phase(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_keeps_what_is_not_given_and_refuses_no_change() {
        assert_eq!(wanted_shape((2, 2), Some(3), None).unwrap(), (3, 2));
        assert_eq!(wanted_shape((2, 2), None, Some(3)).unwrap(), (2, 3));
        assert_eq!(wanted_shape((2, 2), Some(1), Some(1)).unwrap(), (1, 1));
        let e = wanted_shape((2, 2), None, None).unwrap_err();
        assert!(e.to_string().contains("nothing to scale"), "{e}");
        let e = wanted_shape((2, 2), Some(2), Some(2)).unwrap_err();
        assert!(
            e.to_string()
                .contains("already has 2 partition(s) × 2 replica(s)"),
            "{e}"
        );
    }

    #[test]
    fn ensure_converges_and_acts_only_on_the_asked_direction() {
        let at = |shape: (u32, u32), epoch: u64| {
            let nodes: Vec<causeway_core::NodeInfo> = (0..u64::from(shape.0 * shape.1))
                .map(|i| causeway_core::NodeInfo {
                    id: NodeId(i),
                    addr: format!("h:{i}"),
                })
                .collect();
            let mut c = ClusterConfig::bootstrap(shape.0, shape.1, &nodes).unwrap();
            c.epoch = Epoch(epoch);
            c
        };
        let idle = cm::ConfigPair {
            revision: 1,
            current: Some(at((2, 2), 3)),
            next: None,
        };
        let step = |pair: &cm::ConfigPair, p, r, only| ensure_step(pair, p, r, only).unwrap();
        use NodeCount::*;
        assert!(matches!(step(&idle, Some(2), None, None), Step::Nothing(_)));
        assert_eq!(step(&idle, Some(3), None, None), Step::Propose((3, 2)));
        assert_eq!(
            step(&idle, Some(1), None, Some(FewerNodes)),
            Step::Propose((1, 2))
        );
        assert!(matches!(
            step(&idle, Some(3), None, Some(FewerNodes)),
            Step::Nothing(_)
        ));
        assert!(matches!(
            step(&idle, None, Some(1), Some(NotFewerNodes)),
            Step::Nothing(_)
        ));
        // As many nodes in another shape is not fewer: done once the pods exist.
        assert_eq!(
            step(&idle, Some(4), Some(1), Some(NotFewerNodes)),
            Step::Propose((4, 1))
        );

        let running = cm::ConfigPair {
            revision: 2,
            current: idle.current.clone(),
            next: Some(at((3, 2), 4)),
        };
        assert_eq!(
            step(&running, Some(3), None, Some(NotFewerNodes)),
            Step::Follow(at((3, 2), 4))
        );
        let e = ensure_step(&running, Some(1), None, None).unwrap_err();
        assert!(e.to_string().contains("is running, not to 1×2"), "{e}");
        let none = cm::ConfigPair {
            revision: 0,
            current: None,
            next: None,
        };
        assert!(ensure_step(&none, Some(1), None, None).is_err());
        assert!(ensure_step(&idle, None, None, None).is_err());
    }

    #[test]
    fn nodes_and_durations_parse_as_documented() {
        assert_eq!(parse_node("3"), Ok(NodeId(3)));
        assert_eq!(parse_node("n12"), Ok(NodeId(12)));
        assert!(parse_node("x").unwrap_err().contains("is not a node id"));
        assert!(parse_node("-1").is_err());
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
        assert!(parse_duration("5 weeks").is_err());
    }

    #[test]
    fn a_running_transition_is_refused_before_any_change() {
        let nodes: Vec<causeway_core::NodeInfo> = (1..4)
            .map(|i| causeway_core::NodeInfo {
                id: NodeId(i),
                addr: format!("h:{i}"),
            })
            .collect();
        let current = ClusterConfig::bootstrap(1, 2, &nodes).unwrap();
        let next = current.next_for_shape(1, 3, &nodes).unwrap();
        let mut pair = cm::ConfigPair {
            revision: 2,
            current: Some(current.clone()),
            next: Some(next),
        };
        let e = idle_current(&pair).unwrap_err();
        assert!(
            e.to_string().contains("a transition to epoch 2 is running"),
            "{e}"
        );
        pair.next = None;
        assert_eq!(shape_of(idle_current(&pair).unwrap()), (1, 2));
        pair.current = None;
        let e = idle_current(&pair).unwrap_err();
        assert!(e.to_string().contains("not bootstrapped"), "{e}");
    }

    #[test]
    fn a_plain_line_is_printed_again_when_the_phase_changes() {
        assert!(same_phase(
            "epoch 2: backfilling, 1/2 intervals",
            "epoch 2: backfilling, 2/2 intervals"
        ));
        assert!(!same_phase(
            "epoch 2: backfilling, 1/2 intervals",
            "epoch 2: switching, 2/2 intervals"
        ));
    }
}
