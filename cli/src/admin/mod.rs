//! `causeway admin …`: operator commands against a config manager and its store nodes, and
//! against a cdc service's feeds.
//!
//! # Layout
//! - [`status`]: `causeway admin status`: the configuration, frontiers, each node's phase and
//!   backfill progress, gathered from the config manager and every node.
//! - [`bootstrap`]: `causeway admin bootstrap`: the first configuration.
//! - [`change`]: `causeway admin scale|replace|abort`, and `--wait` for a transition to finish.
//! - [`feeds`]: `causeway admin feeds list|show|create|pause|resume|delete`: a cdc service's
//!   feeds through its admin API, as tables or JSON.
//! - [`tokens`]: `causeway admin tokens create`: a new bearer token, printed once, and its
//!   tokens file entry holding only its hash.
//! - [`progress`]: pure functions behind the output: backfill totals, the time-left estimate,
//!   progress lines, the outcome of a transition, a configuration as text.

pub mod bootstrap;
pub mod certs;
pub mod change;
pub mod feeds;
pub mod progress;
pub mod status;
pub mod tokens;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use causeway_config_manager as cm;
use causeway_proto::link::{Link, Role, Security, TlsFiles};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{NodeStatus as ProtoNodeStatus, StatusRequest};

pub use bootstrap::{bootstrap, BootstrapArgs};
pub use certs::{certs, CertsArgs};
pub use change::{abort, replace, scale, AbortArgs, ReplaceArgs, ScaleArgs};
pub use feeds::{feeds, FeedsArgs};
pub use status::{status, Args};
pub use tokens::{tokens, TokensArgs};

/// Every RPC of a command is bounded by this.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// `fut`, failing with `what` when it fails or takes longer than [`RPC_TIMEOUT`].
async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    tokio::time::timeout(RPC_TIMEOUT, fut)
        .await
        .with_context(|| format!("{what}: no answer within {RPC_TIMEOUT:?}"))?
        .with_context(|| what.to_string())
}

/// How an admin command authenticates its gRPC calls: mutual TLS with an `admin` certificate,
/// or the cluster secret and the admin token (what the cluster's processes are given; see
/// `causeway_proto::link`). A dev cluster's `--data-dir` provides the latter two.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Credentials {
    /// The cluster CA certificate (PEM), for mutual TLS.
    #[arg(long, env = "CAUSEWAY_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// An `admin` certificate of the cluster CA (PEM).
    #[arg(long, env = "CAUSEWAY_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "CAUSEWAY_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// A file holding the cluster secret (without TLS).
    #[arg(long, env = "CAUSEWAY_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// A file holding the config manager's admin token.
    #[arg(long, env = "CAUSEWAY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl Credentials {
    /// The link these flags give; the files of a dev cluster's `data_dir` fill in the secret
    /// and the admin token not given.
    pub fn link(&self, data_dir: Option<&Path>) -> Result<Link> {
        let from_dir = |name: &str| data_dir.map(|d| d.join(name)).filter(|p| p.exists());
        let security = Security {
            tls: match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            cluster_secret_file: self
                .cluster_secret_file
                .clone()
                .or_else(|| from_dir(crate::dev::CLUSTER_SECRET_FILE)),
            admin_token_file: self
                .admin_token_file
                .clone()
                .or_else(|| from_dir(crate::dev::ADMIN_TOKEN_FILE)),
            allow_open_non_loopback: false,
        };
        Link::load(&security).context("the admin command's credentials")
    }
}

/// A client of the config manager at `addr`.
async fn connect(addr: &str, link: &Link) -> Result<cm::Client> {
    bounded("connecting to the config manager", async {
        cm::Client::connect(addr, link).await
    })
    .await
    .with_context(|| format!("config manager at {addr}"))
}

/// Waits until at least `needed` store nodes are registered and live, for at most `timeout`.
async fn wait_for_live_nodes(client: &cm::Client, needed: u64, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let nodes = bounded("ListNodes", client.list_nodes()).await?;
        let live = nodes.iter().filter(|n| n.live).count() as u64;
        if live >= needed {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {live} of {needed} store nodes registered and live within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node's `Status`.
async fn node_status(
    node: causeway_core::NodeId,
    addr: &str,
    link: &Link,
) -> Result<ProtoNodeStatus> {
    let endpoint = link
        .endpoint(addr, Role::StoreNode(node.0))
        .map_err(|e| anyhow::anyhow!("invalid store node address {e}"))?
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let channel = bounded("connecting", endpoint.connect()).await?;
    let mut client = StoreNodeClient::new(link.without_admin_token().channel(channel));
    let answer = bounded("Status", client.status(StatusRequest {})).await?;
    Ok(answer.into_inner())
}
