//! `causeway admin bootstrap`: waits for enough registered store nodes, then installs the first
//! configuration.

use std::time::Duration;

use anyhow::Result;

use super::change::shape_of;
use super::{bounded, connect, wait_for_live_nodes};

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
    #[command(flatten)]
    credentials: super::Credentials,
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
    let client = connect(&args.config_manager, &args.credentials.link(None)?).await?;
    let pair = bounded("GetConfig", client.get_config()).await?;
    if let Some(current) = &pair.current {
        let shape = shape_of(current);
        anyhow::ensure!(
            shape == (args.partitions, args.replicas),
            "the cluster is already bootstrapped as {}×{}",
            shape.0,
            shape.1
        );
        println!("already bootstrapped: epoch {}", current.epoch);
        return Ok(());
    }
    let needed = u64::from(args.partitions) * u64::from(args.replicas);
    wait_for_live_nodes(&client, needed, Duration::from_secs(args.wait)).await?;
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
