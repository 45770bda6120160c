//! `causeway-store-node`: one store node. Settings come from a JSON file (`--config`, the
//! fields of `causeway_store_node::Options`) and from flags or their environment variables,
//! which override the file; without a file, the flags give every required field.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use causeway_store_node::{Options, Service};
use clap::Parser;
use serde_json::{json, Map, Value};

/// mimalloc rather than the system allocator: a node makes many large short-lived allocations
/// (decoded records, automerge saves) between long-lived small ones (cached documents), which
/// fragment glibc's heap into memory it cannot return.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "causeway-store-node", about = "A Causeway store node")]
struct Args {
    /// JSON file with the node's options (every field may come from the flags instead).
    #[arg(long, env = "CAUSEWAY_STORE_CONFIG")]
    config: Option<PathBuf>,
    /// `node_id`: a number, or the name of a StatefulSet's pod (`causeway-store-3`), whose
    /// ordinal is the id.
    #[arg(long, env = "CAUSEWAY_NODE_ID", value_parser = parse_node_id)]
    node_id: Option<u64>,
    /// `listen`: where the gRPC server listens.
    #[arg(long, env = "CAUSEWAY_STORE_LISTEN")]
    listen: Option<SocketAddr>,
    /// `advertise`: the `host:port` other nodes and the api-server reach the gRPC server at.
    #[arg(long, env = "CAUSEWAY_STORE_ADVERTISE")]
    advertise: Option<String>,
    /// `admin_listen`: where `/metrics`, `/healthz` and `/readyz` listen.
    #[arg(long, env = "CAUSEWAY_STORE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// `data_dir`: the node's RocksDB directory.
    #[arg(long, env = "CAUSEWAY_STORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `config_manager`: the config manager, `host:port`.
    #[arg(long, env = "CAUSEWAY_CONFIG_MANAGER")]
    config_manager: Option<String>,
    /// `log`: the transaction log as JSON (as for the api-server).
    #[arg(long, env = "CAUSEWAY_LOG")]
    log: Option<String>,
}

/// A node id: digits, or a name ending in `-<digits>` (a StatefulSet pod's name).
fn parse_node_id(s: &str) -> Result<u64, String> {
    let ordinal = s.rsplit_once('-').map_or(s, |(_, ordinal)| ordinal);
    ordinal.parse().map_err(|_| {
        format!("{s:?} is neither a node id (a number) nor a pod name ending in -<ordinal>")
    })
}

impl Args {
    /// The options: the file's fields, then the flags over them.
    fn options(self) -> anyhow::Result<Options> {
        let mut fields = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                match serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
                {
                    Value::Object(fields) => fields,
                    _ => bail!("{}: the options must be a JSON object", path.display()),
                }
            }
            None => Map::new(),
        };
        let log = match &self.log {
            Some(log) => Some(serde_json::from_str::<Value>(log).context("parsing --log")?),
            None => None,
        };
        let flags = [
            ("node_id", self.node_id.map(|id| json!(id))),
            ("listen", self.listen.map(|a| json!(a))),
            ("advertise", self.advertise.map(|a| json!(a))),
            ("admin_listen", self.admin_listen.map(|a| json!(a))),
            ("data_dir", self.data_dir.map(|d| json!(d))),
            ("config_manager", self.config_manager.map(|c| json!(c))),
            ("log", log),
        ];
        for (field, value) in flags {
            if let Some(value) = value {
                fields.insert(field.to_string(), value);
            }
        }
        serde_json::from_value(Value::Object(fields))
            .context("the store node's options (--config and the flags)")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let options = Args::parse().options()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_numbers_or_pod_ordinals() {
        assert_eq!(parse_node_id("7"), Ok(7));
        assert_eq!(parse_node_id("causeway-store-12"), Ok(12));
        assert!(parse_node_id("causeway-store").is_err());
        assert!(parse_node_id("-").is_err());
        assert!(parse_node_id("n-x3").is_err());
    }

    #[test]
    fn flags_alone_give_every_field_and_override_the_file() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["causeway-store-node"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap()
        };
        let flags = [
            "--node-id=causeway-store-2",
            "--listen=0.0.0.0:7600",
            "--advertise=causeway-store-2.causeway-store:7600",
            "--data-dir=/data",
            "--config-manager=cm:7400",
            r#"--log={"backend":"kafka","bootstrap_servers":"k:9092","topic":"t"}"#,
        ];
        let options = args(&flags).options().unwrap();
        assert_eq!(options.node_id.0, 2);
        assert_eq!(
            options.advertise.as_deref(),
            Some("causeway-store-2.causeway-store:7600")
        );
        assert_eq!(options.admin_listen, None);

        let e = args(&flags[1..]).options().unwrap_err();
        assert!(format!("{e:#}").contains("node_id"), "{e:#}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.json");
        std::fs::write(
            &file,
            r#"{"node_id": 9, "listen": "127.0.0.1:1", "tuning": {"gc_interval_ms": 7}}"#,
        )
        .unwrap();
        let mut with_file = vec!["--config", file.to_str().unwrap()];
        with_file.extend_from_slice(&flags[1..]);
        let options = args(&with_file).options().unwrap();
        assert_eq!(
            (
                options.node_id.0,
                options.listen.port(),
                options.tuning.gc_interval_ms
            ),
            (9, 7600, 7)
        );
    }
}
