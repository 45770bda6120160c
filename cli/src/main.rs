//! `causeway`: the command-line tool of Causeway (DESIGN.md §2, `cli`). It composes the libraries
//! that the production binaries run; nothing here reimplements a component.
//!
//! - `causeway dev`: a whole cluster in one process (config manager, P × R store nodes and the
//!   api-server) on one shared embedded transaction log, kept in a data dir across restarts.
//! - `causeway admin status`: the configuration, the frontiers and the replicas' health, as a
//!   table or as JSON; `causeway admin bootstrap`: the first configuration of a cluster.
//! - `causeway bench`: HTTP workloads against an api-server (closed or open loop) and a raw
//!   log-append baseline, reporting throughput, latency percentiles, errors and visibility lag.
//!
//! # Layout
//! - [`dev`]: `causeway dev`, its data-dir manifest, tokens and start-up/shutdown order.
//! - [`admin`]: `causeway admin status`, gathered from the config manager and every node.
//! - [`bench`]: `causeway bench`: workloads, key generators, the runner and the report.

mod admin;
mod bench;
mod dev;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "causeway",
    version,
    about = "Causeway: a causally consistent document store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a whole cluster in this process on the embedded log, or on Kafka with --kafka (for
    /// development).
    Dev(dev::Args),
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Measures an api-server (or the raw log) under a workload.
    Bench(bench::Args),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// The configuration, frontiers and replica health.
    Status(admin::Args),
    /// Installs the first configuration once enough store nodes are registered.
    Bootstrap(admin::BootstrapArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Dev(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args, shutdown_signal()).await,
            Command::Admin {
                command: AdminCommand::Status(args),
            } => admin::status(args).await,
            Command::Admin {
                command: AdminCommand::Bootstrap(args),
            } => admin::bootstrap(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
