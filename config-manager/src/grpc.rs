//! The tonic `ConfigManager` server: decodes requests, calls the [`Handle`], encodes answers.
//! Configurations go out as the JSON of `ClusterConfig` (see `cluster.proto`).

use std::pin::Pin;
use std::sync::Arc;

use causeway_core::{ClusterConfig, Epoch, NodeId, NodeInfo};
use causeway_proto::link::Caller;
use causeway_proto::v1 as pb;
use causeway_proto::v1::config_manager_server::ConfigManager;
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::WatchStream as PairStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::registry::NodeStatus;
use crate::service::Handle;
use crate::state::ConfigPair;

/// The gRPC face of a config manager.
#[derive(Debug, Clone)]
pub struct GrpcService {
    handle: Handle,
    /// One permit per open `Watch` stream, held by the stream.
    watchers: Arc<Semaphore>,
    max_watchers: usize,
}

impl GrpcService {
    pub fn new(handle: Handle, watchers: Arc<Semaphore>, max_watchers: usize) -> GrpcService {
        GrpcService {
            handle,
            watchers,
            max_watchers,
        }
    }
}

/// The JSON text of a configuration: the one serialization used everywhere.
pub fn config_to_json(config: &ClusterConfig) -> String {
    serde_json::to_string(config).expect("a configuration serializes to JSON")
}

/// A pair as it travels.
pub fn pair_to_proto(pair: &ConfigPair) -> pb::ConfigState {
    pb::ConfigState {
        revision: pair.revision,
        current: pair.current.as_ref().map(config_to_json),
        next: pair.next.as_ref().map(config_to_json),
    }
}

fn status_to_proto(s: NodeStatus) -> pb::RegisteredNode {
    pb::RegisteredNode {
        node_id: s.info.id.0,
        addr: s.info.addr,
        incarnation: s.incarnation,
        live: s.live,
        last_heartbeat_unix_ms: s.last_heartbeat_unix_ms,
        since_heartbeat_ms: s.since_heartbeat_ms,
    }
}

type WatchResponse = Pin<Box<dyn Stream<Item = Result<pb::ConfigState, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigManager for GrpcService {
    async fn register(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::NodeRegistration>, Status> {
        Caller::of(&request).check_store_node(request.get_ref().node_id)?;
        let r = request.into_inner();
        let info = NodeInfo {
            id: NodeId(r.node_id),
            addr: r.addr,
        };
        let reg = self.handle.register(info).await?;
        Ok(Response::new(pb::NodeRegistration {
            node_id: reg.node.0,
            incarnation: reg.incarnation,
            heartbeat_interval_ms: reg.heartbeat_interval_ms,
            heartbeat_timeout_ms: reg.heartbeat_timeout_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        Caller::of(&request).check_store_node(request.get_ref().node_id)?;
        let r = request.into_inner();
        let revision = self
            .handle
            .heartbeat(NodeId(r.node_id), r.incarnation)
            .await?;
        Ok(Response::new(pb::NodeHeartbeatResponse { revision }))
    }

    async fn get_config(
        &self,
        _request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Ok(Response::new(pair_to_proto(&self.handle.pair())))
    }

    type WatchStream = WatchResponse;

    async fn watch(
        &self,
        _request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| Error::TooManyWatchers(self.max_watchers))?;
        // Yields the pair as it is now, then each change (the latest one for a slow reader);
        // ends when the event loop stops and drops the sender.
        let stream = PairStream::new(self.handle.subscribe()).map(move |pair| {
            let _held_while_the_stream_lives = &permit;
            Ok(pair_to_proto(&pair))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Caller::of(&request).check_admin()?;
        let r = request.into_inner();
        let pair = self.handle.bootstrap(r.partitions, r.replicas).await?;
        Ok(Response::new(pair_to_proto(&pair)))
    }

    async fn propose_shape(
        &self,
        request: Request<pb::ProposeShapeRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Caller::of(&request).check_admin()?;
        let r = request.into_inner();
        let pair = self.handle.propose_shape(r.partitions, r.replicas).await?;
        Ok(Response::new(pair_to_proto(&pair)))
    }

    async fn mark_failed(
        &self,
        request: Request<pb::MarkFailedRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Caller::of(&request).check_admin()?;
        let r = request.into_inner();
        let pair = self.handle.mark_failed(NodeId(r.node_id)).await?;
        Ok(Response::new(pair_to_proto(&pair)))
    }

    async fn replace_node(
        &self,
        request: Request<pb::ReplaceNodeRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Caller::of(&request).check_admin()?;
        let r = request.into_inner();
        let failed = NodeId(r.failed_node_id);
        let pair = if r.any_free_node {
            self.handle.replace_node_with_free(failed).await?
        } else {
            self.handle
                .replace_node(failed, NodeId(r.with_node_id))
                .await?
        };
        Ok(Response::new(pair_to_proto(&pair)))
    }

    async fn complete_transition(
        &self,
        request: Request<pb::CompleteTransitionRequest>,
    ) -> Result<Response<pb::CompleteTransitionResponse>, Status> {
        // Only a node of the next configuration (or the admin) says it is complete.
        let next = self.handle.pair().next;
        Caller::of(&request).check_role(
            |role| match role {
                causeway_proto::link::Role::StoreNode(id) => {
                    next.as_ref().is_some_and(|n| n.contains(NodeId(id)))
                }
                _ => false,
            },
            "CompleteTransition",
        )?;
        let r = request.into_inner();
        let done = self.handle.complete_transition(Epoch(r.epoch)).await?;
        Ok(Response::new(pb::CompleteTransitionResponse {
            installed: done.installed,
            state: Some(pair_to_proto(&done.pair)),
        }))
    }

    async fn abort_transition(
        &self,
        request: Request<pb::AbortTransitionRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        Caller::of(&request).check_admin()?;
        let r = request.into_inner();
        let pair = self.handle.abort_transition(Epoch(r.epoch)).await?;
        Ok(Response::new(pair_to_proto(&pair)))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.handle.list_nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(status_to_proto).collect(),
        }))
    }
}
