//! `causeway-store-node`: one store node. Settings come from a JSON file (`--config`, the
//! fields of `causeway_store_node::Options`); flags override the common ones.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use causeway_core::NodeId;
use causeway_store_node::{Options, Service};
use clap::Parser;

/// mimalloc rather than the system allocator: a node makes many large short-lived allocations
/// (decoded records, automerge saves) between long-lived small ones (cached documents), which
/// fragment glibc's heap into memory it cannot return.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "causeway-store-node", about = "A Causeway store node")]
struct Args {
    /// JSON file with the node's options.
    #[arg(long)]
    config: PathBuf,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<u64>,
    /// Overrides `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `admin_listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut options: Options = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    if let Some(id) = args.node_id {
        options.node_id = NodeId(id);
    }
    if let Some(listen) = args.listen {
        options.listen = listen;
    }
    if args.admin_listen.is_some() {
        options.admin_listen = args.admin_listen;
    }
    if let Some(dir) = args.data_dir {
        options.data_dir = dir;
    }
    let service = Service::bind(options)
        .await
        .context("starting the store node")?;
    println!("listening {}", service.local_addr());
    if let Some(admin) = service.admin_addr() {
        println!("admin {admin}");
    }
    service.run(shutdown_signal()).await.context("store node")?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
