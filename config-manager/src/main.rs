//! `causeway-config-manager`: runs one config manager until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use causeway_config_manager::{Options, Service};
use clap::Parser;

/// The authority for Causeway's cluster configurations and membership.
#[derive(Debug, Parser)]
#[command(name = "causeway-config-manager", version)]
struct Args {
    /// A JSON file of options (every field optional; see `causeway_config_manager::Options`).
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER_CONFIG")]
    config: Option<PathBuf>,
    /// The gRPC listen address (overrides the file). Default 127.0.0.1:7400.
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER_LISTEN")]
    listen: Option<SocketAddr>,
    /// The directory of the durable state (overrides the file). Default data/config-manager.
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str::<Options>(&text)
                .with_context(|| format!("invalid options in {}", path.display()))?
        }
        None => Options::default(),
    };
    if let Some(listen) = args.listen {
        options.listen_addr = listen;
    }
    if let Some(dir) = args.data_dir {
        options.data_dir = dir;
    }
    let service = Service::bind(options).await?;
    service.run(shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
