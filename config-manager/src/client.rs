//! [`Client`]: the typed gRPC client of the config manager, for store nodes and the CLI. It parses
//! the configurations' JSON, so no caller handles it.

use std::future::Future;
use std::time::Duration;

use causeway_core::{ClusterConfig, Epoch, NodeId, NodeInfo};
use causeway_proto::link::{Channel, Link, Role};
use causeway_proto::v1 as pb;
use causeway_proto::v1::config_manager_client::ConfigManagerClient;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::error::Error;
use crate::registry::{NodeStatus, Registration};
use crate::state::{Completion, ConfigPair};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive pings, so a dead config manager breaks a `Watch` stream instead of hanging it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long [`Client::keep_registered`] waits before retrying an unreachable config manager.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// A client of one config manager. Cheap to clone (clones share the connection).
///
/// Every method answers [`Error::Rpc`] for a refusal of the server; [`Error::code`] gives its
/// gRPC code (`FailedPrecondition`, `NotFound`, `Aborted`, ...).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ConfigManagerClient<Channel>,
}

/// A `Watch` stream: the pair as it was when the watch began, then every change (the latest one
/// when the reader falls behind).
#[derive(Debug)]
pub struct ConfigWatch {
    inner: tonic::Streaming<pb::ConfigState>,
}

impl Client {
    /// Connects to `addr` (`host:port` or `http://host:port`) over `link`.
    pub async fn connect(addr: &str, link: &Link) -> Result<Client, Error> {
        let endpoint = endpoint(addr, link)?;
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Client::from_channel(link.channel(channel)))
    }

    /// A client that connects on first use (and reconnects after failures), for a node that
    /// may start before the config manager.
    pub fn connect_lazy(addr: &str, link: &Link) -> Result<Client, Error> {
        Ok(Client::from_channel(
            link.channel(endpoint(addr, link)?.connect_lazy()),
        ))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            inner: ConfigManagerClient::new(channel),
        }
    }

    /// Registers `node`; the answer carries its new incarnation and the heartbeat cadence.
    pub async fn register(&self, node: &NodeInfo) -> Result<Registration, Error> {
        let r = self
            .inner
            .clone()
            .register(pb::RegisterNodeRequest {
                node_id: node.id.0,
                addr: node.addr.clone(),
            })
            .await?
            .into_inner();
        Ok(Registration {
            node: NodeId(r.node_id),
            incarnation: r.incarnation,
            heartbeat_interval_ms: r.heartbeat_interval_ms,
            heartbeat_timeout_ms: r.heartbeat_timeout_ms,
        })
    }

    /// Heartbeats; answers the revision of the (current, next) pair. A `NotFound` error means
    /// the config manager does not know the node (it restarted): register again.
    pub async fn heartbeat(&self, node: NodeId, incarnation: u64) -> Result<u64, Error> {
        let r = self
            .inner
            .clone()
            .heartbeat(pb::NodeHeartbeatRequest {
                node_id: node.0,
                incarnation,
            })
            .await?
            .into_inner();
        Ok(r.revision)
    }

    /// The (current, next) pair now.
    pub async fn get_config(&self) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .get_config(pb::GetConfigRequest {})
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Watches the (current, next) pair.
    pub async fn watch(&self) -> Result<ConfigWatch, Error> {
        let inner = self
            .inner
            .clone()
            .watch(pb::WatchConfigRequest {})
            .await?
            .into_inner();
        Ok(ConfigWatch { inner })
    }

    /// Admin: bootstraps `partitions × replicas` from the registered live nodes.
    pub async fn bootstrap(&self, partitions: u32, replicas: u32) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .bootstrap(pb::BootstrapRequest {
                partitions,
                replicas,
            })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Admin: proposes the next configuration for the shape `partitions × replicas`.
    pub async fn propose_shape(&self, partitions: u32, replicas: u32) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .propose_shape(pb::ProposeShapeRequest {
                partitions,
                replicas,
            })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Admin: marks `node` failed.
    pub async fn mark_failed(&self, node: NodeId) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .mark_failed(pb::MarkFailedRequest { node_id: node.0 })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Admin: proposes the next configuration with `failed` replaced by `with`.
    pub async fn replace_node(&self, failed: NodeId, with: NodeId) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .replace_node(pb::ReplaceNodeRequest {
                failed_node_id: failed.0,
                with_node_id: with.0,
                any_free_node: false,
            })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Admin: proposes the next configuration with `failed` replaced by the lowest-id registered
    /// live node in no configuration (the config manager picks it).
    pub async fn replace_node_with_free(&self, failed: NodeId) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .replace_node(pb::ReplaceNodeRequest {
                failed_node_id: failed.0,
                with_node_id: 0,
                any_free_node: true,
            })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Admin: abandons the transition to `epoch` ([`Epoch::ZERO`]: whatever next is) once a
    /// node of next has vetoed its backfill. `FailedPrecondition` when no transition runs or no
    /// node vetoed; `Aborted` when next has another epoch.
    pub async fn abort_transition(&self, epoch: Epoch) -> Result<ConfigPair, Error> {
        let r = self
            .inner
            .clone()
            .abort_transition(pb::AbortTransitionRequest { epoch: epoch.0 })
            .await?
            .into_inner();
        pair_from_proto(r)
    }

    /// Installs next as current iff its epoch is `epoch`; a repeat for an installed epoch
    /// succeeds with `installed == false`; any other epoch is `Aborted`.
    pub async fn complete_transition(&self, epoch: Epoch) -> Result<Completion, Error> {
        let r = self
            .inner
            .clone()
            .complete_transition(pb::CompleteTransitionRequest { epoch: epoch.0 })
            .await?
            .into_inner();
        Ok(Completion {
            installed: r.installed,
            pair: pair_from_proto(r.state.unwrap_or_default())?,
        })
    }

    /// Admin: the registered nodes with their liveness, in node-id order.
    pub async fn list_nodes(&self) -> Result<Vec<NodeStatus>, Error> {
        let r = self
            .inner
            .clone()
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner();
        Ok(r.nodes
            .into_iter()
            .map(|n| NodeStatus {
                info: NodeInfo {
                    id: NodeId(n.node_id),
                    addr: n.addr,
                },
                incarnation: n.incarnation,
                live: n.live,
                last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
                since_heartbeat_ms: n.since_heartbeat_ms,
            })
            .collect())
    }
}

impl Client {
    /// Keeps `node` registered until `shutdown` completes: registers, heartbeats at the cadence
    /// the config manager asks for, registers again when the config manager no longer knows the
    /// node (it restarted), and retries while it is unreachable. Each incarnation obtained is
    /// sent on `incarnations`.
    ///
    /// Ends with an error only when the node must not go on: the config manager knows it under
    /// another address, or a newer incarnation of it has registered (another process with the
    /// same id).
    pub async fn keep_registered(
        &self,
        node: NodeInfo,
        incarnations: watch::Sender<Option<u64>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut registered: Option<Registration> = None;
        loop {
            let wait = match registered {
                None => match self.register(&node).await {
                    Ok(r) => {
                        tracing::info!(node = %node.id, incarnation = r.incarnation, "registered");
                        incarnations.send_replace(Some(r.incarnation));
                        registered = Some(r);
                        Duration::from_millis(r.heartbeat_interval_ms)
                    }
                    Err(e) if fatal(&e) => return Err(e),
                    Err(e) => {
                        tracing::warn!(node = %node.id, error = %e.chain(), "cannot register; retrying");
                        RETRY_INTERVAL
                    }
                },
                Some(r) => match self.heartbeat(node.id, r.incarnation).await {
                    Ok(_) => Duration::from_millis(r.heartbeat_interval_ms),
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        tracing::info!(node = %node.id, "the config manager forgot this node; registering again");
                        registered = None;
                        Duration::ZERO
                    }
                    Err(e) if fatal(&e) => return Err(e),
                    Err(e) => {
                        tracing::warn!(node = %node.id, error = %e.chain(), "heartbeat failed; retrying");
                        RETRY_INTERVAL.min(Duration::from_millis(r.heartbeat_interval_ms))
                    }
                },
            };
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A refusal that retrying cannot cure.
fn fatal(e: &Error) -> bool {
    matches!(
        e.code(),
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
    )
}

impl ConfigWatch {
    /// The next pair; `Ok(None)` when the config manager ended the stream (it shut down).
    pub async fn next(&mut self) -> Result<Option<ConfigPair>, Error> {
        match self.inner.message().await? {
            Some(state) => pair_from_proto(state).map(Some),
            None => Ok(None),
        }
    }
}

fn endpoint(addr: &str, link: &Link) -> Result<Endpoint, Error> {
    Ok(link
        .endpoint(addr, Role::ConfigManager)
        .map_err(Error::InvalidEndpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true))
}

/// Parses a pair as it travels. A configuration that does not parse or validate is refused.
pub fn pair_from_proto(state: pb::ConfigState) -> Result<ConfigPair, Error> {
    let parse = |json: Option<String>| -> Result<Option<ClusterConfig>, Error> {
        json.map(|j| serde_json::from_str::<ClusterConfig>(&j).map_err(Error::BadConfigJson))
            .transpose()
    };
    let current = parse(state.current)?;
    let next = parse(state.next)?;
    if let Some(c) = &current {
        c.validate()?;
    }
    if let (Some(c), Some(n)) = (&current, &next) {
        c.validate_successor(n)?;
    }
    Ok(ConfigPair {
        revision: state.revision,
        current,
        next,
    })
}
