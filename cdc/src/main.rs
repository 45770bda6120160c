//! `causeway-cdc`: the change feeds as a process. Settings come from a JSON file (`--config`,
//! the library's `Options`), overridden by the flags given.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use causeway_cdc::{Options, Service};
use causeway_txlog::LogOptions;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "causeway-cdc",
    about = "Causeway's change feeds: Kafka topics and webhooks"
)]
struct Args {
    /// A JSON file of `Options` (every field optional), feeds included.
    #[arg(long, env = "CAUSEWAY_CDC_CONFIG")]
    config: Option<PathBuf>,
    /// Where the admin API listens (default 127.0.0.1:7500).
    #[arg(long, env = "CAUSEWAY_CDC_LISTEN")]
    listen: Option<SocketAddr>,
    /// The config manager, host:port.
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER")]
    config_manager: Option<String>,
    /// The transaction log as JSON (as for the api-server).
    #[arg(long, env = "CAUSEWAY_LOG")]
    log: Option<String>,
    /// The state directory (feeds, webhook checkpoints).
    #[arg(long, env = "CAUSEWAY_CDC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The admin API's bearer token.
    #[arg(long, env = "CAUSEWAY_CDC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
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
    if let Some(l) = args.listen {
        options.listen_addr = l;
    }
    if let Some(cm) = args.config_manager {
        options.config_manager_addr = cm;
    }
    if let Some(log) = args.log {
        options.log = serde_json::from_str::<LogOptions>(&log).context("parsing --log")?;
    }
    if let Some(d) = args.state_dir {
        options.state_dir = d;
    }
    if let Some(t) = args.admin_token {
        options.admin_token = Some(t);
    }
    let service = Service::bind(options).await?;
    println!("causeway-cdc listening on {}", service.local_addr());
    service
        .run(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
