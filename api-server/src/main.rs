//! `causeway-api-server`: the HTTP document API as a process. Settings come from an optional
//! JSON file (`--config`, the library's `Options`), overridden by the flags given.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use causeway_api_server::{Options, Service};
use causeway_txlog::LogOptions;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "causeway-api-server", about = "Causeway's HTTP document API")]
struct Args {
    /// A JSON file of `Options` (every field optional).
    #[arg(long, env = "CAUSEWAY_API_CONFIG")]
    config: Option<PathBuf>,
    /// Where to listen (default 127.0.0.1:7300).
    #[arg(long, env = "CAUSEWAY_API_LISTEN")]
    listen: Option<SocketAddr>,
    /// The config manager, host:port (default 127.0.0.1:7400).
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER")]
    config_manager: Option<String>,
    /// The transaction log as JSON, e.g. '{"backend":"kafka","bootstrap_servers":"k:9092","topic":"causeway-tx"}'.
    #[arg(long, env = "CAUSEWAY_LOG")]
    log: Option<String>,
    /// The embedded log's directory (shorthand for --log '{"backend":"embedded","dir":...}').
    #[arg(long, conflicts_with = "log")]
    log_dir: Option<PathBuf>,
    /// The bearer tokens file (JSON).
    #[arg(long, env = "CAUSEWAY_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut options = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<Options>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => Options::default(),
    };
    if let Some(listen) = args.listen {
        options.listen_addr = listen;
    }
    if let Some(cm) = args.config_manager {
        options.config_manager_addr = cm;
    }
    if let Some(log) = args.log {
        options.log = serde_json::from_str::<LogOptions>(&log).context("parsing --log")?;
    }
    if let Some(dir) = args.log_dir {
        options.log =
            serde_json::from_value(serde_json::json!({"backend": "embedded", "dir": dir}))
                .context("building the embedded log options")?;
    }
    if let Some(tokens) = args.tokens_file {
        options.tokens_file = Some(tokens);
    }
    let service = Service::bind(options)
        .await
        .context("starting the api-server")?;
    service
        .run(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
        })
        .await
        .context("serving")?;
    Ok(())
}
