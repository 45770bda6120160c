//! `causeway`: the command-line tool of Causeway (DESIGN.md §2, `cli`). It composes the libraries
//! that the production binaries run; nothing here reimplements a component.
//!
//! - `causeway dev`: a whole cluster in one process (config manager, P × R store nodes and the
//!   api-server) on one shared embedded transaction log, kept in a data dir across restarts.
//! - `causeway admin status`: the configuration, the frontiers, the replicas' health, phase and
//!   backfill progress, as a table or as JSON; `causeway admin bootstrap`: the first
//!   configuration of a cluster; `causeway admin scale|replace|abort`: transitions, followed to
//!   their end with `--wait`.
//! - `causeway bench`: HTTP workloads against an api-server (closed or open loop) and a raw
//!   log-append baseline, reporting throughput, latency percentiles, errors and visibility lag.
//!
//! # Layout
//! - [`dev`]: `causeway dev`, its data-dir manifest, tokens and start-up/shutdown order.
//! - [`admin`]: `causeway admin …`: status, bootstrap, scale, replace and abort.
//! - [`bench`]: `causeway bench`: workloads, key generators, the runner and the report.

mod admin;
mod bench;
mod dev;

use clap::{Parser, Subcommand};

/// mimalloc, as in `causeway-store-node`: `causeway dev` runs store nodes in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Proposes a new shape (partitions × replicas), moving the fewest keys.
    Scale(admin::ScaleArgs),
    /// Proposes replacing a node of the current configuration with a registered spare node.
    Replace(admin::ReplaceArgs),
    /// Abandons the running transition before routing can switch to it.
    Abort(admin::AbortArgs),
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
            Command::Admin { command } => match command {
                AdminCommand::Status(args) => admin::status(args).await,
                AdminCommand::Bootstrap(args) => admin::bootstrap(args).await,
                AdminCommand::Scale(args) => admin::scale(args).await,
                AdminCommand::Replace(args) => admin::replace(args).await,
                AdminCommand::Abort(args) => admin::abort(args).await,
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("causeway").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) -> (ErrorKind, String) {
        let e = parse(args).expect_err("the arguments are refused");
        (e.kind(), e.to_string())
    }

    #[test]
    fn admin_commands_parse_their_flags() {
        let cli = parse(&[
            "admin",
            "scale",
            "--partitions",
            "3",
            "--wait",
            "--timeout",
            "90s",
        ])
        .unwrap();
        let Command::Admin {
            command: AdminCommand::Scale(_),
        } = cli.command
        else {
            panic!("not scale: {cli:?}");
        };
        parse(&[
            "admin",
            "scale",
            "--replicas",
            "2",
            "--config-manager",
            "h:1",
        ])
        .unwrap();
        parse(&["admin", "replace", "n3", "--with", "7"]).unwrap();
        parse(&["admin", "replace", "3", "--wait"]).unwrap();
        parse(&["admin", "abort", "--epoch", "4"]).unwrap();
        parse(&["admin", "abort"]).unwrap();
    }

    #[test]
    fn bad_admin_arguments_are_refused_with_a_clear_error() {
        let (kind, text) = refused(&["admin", "scale", "--partitions", "0"]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("--partitions"), "{text}");
        assert!(text.contains("not in 1.."), "{text}");
        let (kind, _) = refused(&["admin", "scale", "--replicas", "0"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        let (kind, text) = refused(&["admin", "replace", "node-three"]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("is not a node id"), "{text}");
        let (kind, _) = refused(&["admin", "replace"]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument);
        let (kind, text) = refused(&["admin", "scale", "--partitions", "2", "--timeout", "1m"]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument, "{text}");
        assert!(text.contains("--wait"), "{text}");
        let (kind, text) = refused(&[
            "admin",
            "scale",
            "--partitions",
            "2",
            "--wait",
            "--timeout",
            "soon",
        ]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("is not a duration"), "{text}");
    }
}
