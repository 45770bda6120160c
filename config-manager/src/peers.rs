//! What the config manager asks of others: store nodes' vetoes for `AbortTransition`, and, where
//! the process that runs it can start store nodes (`causeway dev`), more spare nodes for a
//! proposal that is short of them.
//!
//! Both are traits so that the service's decisions (whom to ask, in which order, when to stop,
//! how long to wait for new nodes) are tested with fakes, and the real implementations stay
//! thin: [`GrpcVeto`] calls `StoreNode.VetoBackfill`; the spare-node provider is whatever the
//! embedding process offers (none by default: a short proposal is refused).

use std::fmt;
use std::time::Duration;

use causeway_core::{Epoch, NodeInfo};
use causeway_proto::link::{Link, Role};
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use futures::future::BoxFuture;

/// A node's answer to `VetoBackfill(epoch)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VetoAnswer {
    /// The node promised never to report backfilled for the epoch: the abort is safe.
    Vetoed,
    /// The node has backfilled for the epoch already, so it cannot veto.
    Backfilled,
    /// The node answered neither (it does not know the epoch, or refused).
    Declined,
    /// No answer: unreachable, timed out, or an RPC error (the message says which).
    Failed(String),
}

impl fmt::Display for VetoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VetoAnswer::Vetoed => f.write_str("vetoed"),
            VetoAnswer::Backfilled => f.write_str("has backfilled"),
            VetoAnswer::Declined => f.write_str("declined"),
            VetoAnswer::Failed(why) => write!(f, "did not answer ({why})"),
        }
    }
}

/// Asks one store node to veto its backfill for an epoch.
pub trait Veto: Send + Sync + fmt::Debug {
    /// `node`'s answer to `VetoBackfill(epoch)`; never fails: a missing answer is
    /// [`VetoAnswer::Failed`].
    fn veto(&self, node: &NodeInfo, epoch: Epoch) -> BoxFuture<'static, VetoAnswer>;
}

/// [`Veto`] over gRPC: one connection per call, each bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct GrpcVeto {
    pub timeout: Duration,
    pub link: Link,
}

impl Veto for GrpcVeto {
    fn veto(&self, node: &NodeInfo, epoch: Epoch) -> BoxFuture<'static, VetoAnswer> {
        let addr = node.addr.clone();
        let node_id = node.id.0;
        let timeout = self.timeout;
        let link = self.link.clone();
        Box::pin(async move {
            let call = async {
                let endpoint = link
                    .endpoint(&addr, Role::StoreNode(node_id))
                    .map_err(|e| format!("invalid address {e}"))?
                    .connect_timeout(timeout)
                    .timeout(timeout);
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                StoreNodeClient::new(link.channel(channel))
                    .veto_backfill(pb::VetoBackfillRequest { epoch: epoch.0 })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))
            };
            match tokio::time::timeout(timeout, call).await {
                Err(_) => VetoAnswer::Failed(format!("no answer within {timeout:?}")),
                Ok(Err(why)) => VetoAnswer::Failed(why),
                Ok(Ok(r)) if r.vetoed => VetoAnswer::Vetoed,
                Ok(Ok(r)) if r.backfilled => VetoAnswer::Backfilled,
                Ok(Ok(_)) => VetoAnswer::Declined,
            }
        })
    }
}

/// Why a [`SpareNodes`] provider could not start nodes.
pub type SpareNodesError = Box<dyn std::error::Error + Send + Sync>;

/// Starts store nodes on demand, for a process that runs them itself (`causeway dev`). The
/// config manager calls it when a proposal needs more spare nodes than are registered; the nodes
/// it starts must register themselves (the config manager then waits for them, bounded by
/// `Options::spare_nodes_wait_ms`).
pub trait SpareNodes: Send + Sync + fmt::Debug {
    /// Starts `count` more store nodes, each under an id no node has registered with.
    fn start(&self, count: usize) -> BoxFuture<'static, Result<(), SpareNodesError>>;
}
