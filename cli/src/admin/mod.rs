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
pub mod change;
pub mod feeds;
pub mod progress;
pub mod status;
pub mod tokens;

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use causeway_config_manager as cm;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::{NodeStatus as ProtoNodeStatus, StatusRequest};

pub use bootstrap::{bootstrap, BootstrapArgs};
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

/// A client of the config manager at `addr`.
async fn connect(addr: &str) -> Result<cm::Client> {
    bounded("connecting to the config manager", async {
        cm::Client::connect(addr).await
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
async fn node_status(addr: &str) -> Result<ProtoNodeStatus> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let channel = bounded("connecting", endpoint.connect()).await?;
    let mut client = StoreNodeClient::new(channel);
    let answer = bounded("Status", client.status(StatusRequest {})).await?;
    Ok(answer.into_inner())
}
