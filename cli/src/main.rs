//! `causeway`: the command-line tool of Causeway (DESIGN.md §2, `cli`). It composes the libraries
//! that the production binaries run; nothing here reimplements a component.
//!
//! - `causeway dev`: a whole cluster in one process (config manager, P × R store nodes, the
//!   api-server and the cdc service) on one shared embedded transaction log, kept in a data dir
//!   across restarts.
//! - `causeway admin status`: the configuration, the frontiers, the replicas' health, phase and
//!   backfill progress, as a table or as JSON; `causeway admin bootstrap`: the first
//!   configuration of a cluster; `causeway admin scale|replace|abort`: transitions, followed to
//!   their end with `--wait`; `causeway admin feeds …`: the feeds of a cdc service;
//!   `causeway admin tokens create`: a new bearer token and its (hashed) tokens file entry.
//!   `causeway admin certs create`: a cluster CA and the processes' certificates.
//! - `causeway cdc tail`: an api-server's change stream (server-sent events) in the terminal.
//! - `causeway bench`: HTTP workloads against an api-server (closed or open loop) and a raw
//!   log-append baseline, reporting throughput, latency percentiles, errors and visibility lag.
//! - `causeway check`: a smoke test of a running cluster through its HTTP API (ready, write,
//!   read it back, delete, read the delete), for `helm test` and after a deploy.
//!
//! # Layout
//! - [`dev`]: `causeway dev`, its data-dir manifest, tokens and start-up/shutdown order.
//! - [`admin`]: `causeway admin …`: status, bootstrap, scale, replace, abort and feeds.
//! - [`cdc`]: `causeway cdc tail` and its server-sent events parser.
//! - [`bench`]: `causeway bench`: workloads, key generators, the runner and the report.
//! - [`check`]: `causeway check`: the smoke test's steps.
//! - [`problem`]: an HTTP error answer (problem+json) as one line.

mod admin;
mod bench;
mod cdc;
mod check;
mod dev;
mod problem;

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
    /// Change data capture.
    Cdc {
        #[command(subcommand)]
        command: CdcCommand,
    },
    /// Measures an api-server (or the raw log) under a workload.
    Bench(bench::Args),
    /// Smoke-tests a running cluster through its HTTP API: waits for /readyz, writes a
    /// document, reads it back, deletes it; exits non-zero on any failure.
    Check(check::Args),
}

#[derive(Debug, Subcommand)]
enum CdcCommand {
    /// Prints an api-server's change stream, one line per event, resuming where it left off
    /// when the server ends it.
    Tail(cdc::TailArgs),
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
    /// The change data capture feeds of a cdc service.
    Feeds(admin::FeedsArgs),
    /// Bearer tokens of the api-servers' tokens file.
    Tokens(admin::TokensArgs),
    /// A cluster CA and the certificates of mutual TLS between the cluster's processes.
    Certs(admin::CertsArgs),
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
                AdminCommand::Feeds(args) => admin::feeds(args).await,
                AdminCommand::Tokens(args) => admin::tokens(args).await,
                AdminCommand::Certs(args) => admin::certs(args).await,
            },
            Command::Cdc {
                command: CdcCommand::Tail(args),
            } => cdc::tail(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Check(args) => check::run(args).await,
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
        parse(&["admin", "tokens", "create"]).unwrap();
        parse(&[
            "admin",
            "tokens",
            "create",
            "--name",
            "shop",
            "--role",
            "read-write",
        ])
        .unwrap();
        parse(&[
            "admin",
            "tokens",
            "create",
            "--role",
            "read",
            "--collections",
            "a,b_*",
        ])
        .unwrap();
        assert!(parse(&["admin", "tokens", "create", "--role", "owner"]).is_err());
        parse(&["admin", "abort"]).unwrap();
    }

    fn feeds(args: &[&str]) -> admin::FeedsArgs {
        let all: Vec<&str> = ["admin", "feeds"].iter().chain(args).copied().collect();
        match parse(&all).unwrap().command {
            Command::Admin {
                command: AdminCommand::Feeds(feeds),
            } => feeds,
            other => panic!("not feeds: {other:?}"),
        }
    }

    fn tail(args: &[&str]) -> cdc::TailArgs {
        let all: Vec<&str> = ["cdc", "tail"].iter().chain(args).copied().collect();
        match parse(&all).unwrap().command {
            Command::Cdc {
                command: CdcCommand::Tail(tail),
            } => tail,
            other => panic!("not tail: {other:?}"),
        }
    }

    #[test]
    fn feeds_commands_parse_their_flags_before_or_after_the_subcommand() {
        use admin::feeds::FeedsCommand;
        let f = feeds(&["list", "--json", "--cdc", "h:1", "--token", "t0ken"]);
        assert_eq!(f.command, FeedsCommand::List { json: true });
        assert_eq!((f.cdc.as_str(), f.token.as_deref()), ("h:1", Some("t0ken")));
        let f = feeds(&["--cdc", "http://h:2", "show", "orders-hook"]);
        assert_eq!(
            f.command,
            FeedsCommand::Show {
                name: "orders-hook".into(),
                json: false
            }
        );
        assert_eq!(f.cdc, "http://h:2");
        assert_eq!(feeds(&["list"]).cdc, "127.0.0.1:7500");
        assert_eq!(
            feeds(&["create", "--spec", "-"]).command,
            FeedsCommand::Create { spec: "-".into() }
        );
        for (verb, command) in [
            ("pause", FeedsCommand::Pause { name: "f_1".into() }),
            ("resume", FeedsCommand::Resume { name: "f_1".into() }),
            ("delete", FeedsCommand::Delete { name: "f_1".into() }),
        ] {
            assert_eq!(feeds(&[verb, "f_1"]).command, command, "{verb}");
        }
    }

    #[test]
    fn tail_parses_its_flags() {
        let t = tail(&[
            "--api",
            "http://h:1",
            "--token",
            "t0ken",
            "--collection",
            "orders",
            "--collection",
            "catalog_*",
            "--after",
            "00000000000000000042.0000000003",
            "--before",
            "--json",
            "--resolved",
            "--limit",
            "5",
            "--no-reconnect",
        ]);
        assert_eq!(t.api, "http://h:1");
        assert_eq!(t.token.as_deref(), Some("t0ken"));
        assert_eq!(t.collections, ["orders", "catalog_*"]);
        assert_eq!(t.after.as_deref(), Some("00000000000000000042.0000000003"));
        assert!(t.before && t.json && t.resolved && t.no_reconnect);
        assert_eq!(t.limit, Some(5));
        let t = tail(&["--after", "42"]);
        assert_eq!(t.after.as_deref(), Some("42"));
        assert_eq!(t.api, "http://127.0.0.1:7300");
        assert!(t.collections.is_empty() && !t.json && !t.resolved && !t.before);
        assert_eq!((t.limit, t.no_reconnect, t.retries), (None, false, 10));
    }

    #[test]
    fn bad_feeds_and_tail_arguments_are_refused_with_a_clear_error() {
        let (kind, text) = refused(&["admin", "feeds", "show", "a b"]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("is not a feed name"), "{text}");
        let (kind, _) = refused(&["admin", "feeds", "pause", "../x"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        let (kind, text) = refused(&["admin", "feeds", "create"]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument, "{text}");
        assert!(text.contains("--spec"), "{text}");
        let (kind, _) = refused(&["admin", "feeds", "delete"]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument);
        let (kind, _) = refused(&["admin", "feeds", "start", "f"]);
        assert_eq!(kind, ErrorKind::InvalidSubcommand);
        for cursor in ["x", "1.2.3", "-1", "42.", ""] {
            let (kind, text) = refused(&["cdc", "tail", &format!("--after={cursor}")]);
            assert_eq!(kind, ErrorKind::ValueValidation, "{cursor:?}: {text}");
            assert!(text.contains("is not a cursor"), "{text}");
        }
        let (kind, text) = refused(&["cdc", "tail", "--collection", "a,b"]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("one per --collection"), "{text}");
        let (kind, text) = refused(&["cdc", "tail", "--limit", "0"]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{text}");
        let (kind, _) = refused(&["cdc", "tail", "--json", "extra"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        let (kind, _) = refused(&["dev", "--cdc-listen", "7500"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        parse(&["dev", "--cdc-listen", "127.0.0.1:0"]).unwrap();
    }

    #[test]
    fn tokens_come_from_the_environment_and_help_does_not_show_them() {
        // The only test that reads these variables.
        std::env::set_var("CAUSEWAY_CDC_ADMIN_TOKEN", "cdc-secret-from-env");
        std::env::set_var("CAUSEWAY_TOKEN", "api-secret-from-env");
        let from_env = (
            feeds(&["list"]).token,
            feeds(&["list", "--token", "flag"]).token,
            tail(&[]).token,
        );
        let helps = [
            refused(&["admin", "feeds", "list", "--help"]),
            refused(&["cdc", "tail", "--help"]),
        ];
        std::env::remove_var("CAUSEWAY_CDC_ADMIN_TOKEN");
        std::env::remove_var("CAUSEWAY_TOKEN");
        assert_eq!(
            from_env,
            (
                Some("cdc-secret-from-env".into()),
                Some("flag".into()),
                Some("api-secret-from-env".into())
            )
        );
        for (kind, help) in helps {
            assert_eq!(kind, ErrorKind::DisplayHelp);
            assert!(help.contains("CAUSEWAY_"), "{help}");
            assert!(!help.contains("secret-from-env"), "{help}");
        }
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
