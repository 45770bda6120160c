//! Backfill between store nodes (DESIGN.md §10 step 2).

use causeway_core::Epoch;
use causeway_proto::v1 as pb;
use tonic::{Response, Status};

use crate::state::Shared;

/// The chunks of one interval, as the source streams them.
pub type ChunkStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackfillChunk, Status>> + Send>>;

pub async fn serve(
    _shared: &std::sync::Arc<Shared>,
    _req: pb::BackfillRequest,
) -> Result<Response<ChunkStream>, Status> {
    Err(Status::unimplemented("backfill"))
}

pub async fn veto(
    _shared: &std::sync::Arc<Shared>,
    _epoch: Epoch,
) -> Result<Response<pb::VetoBackfillResponse>, Status> {
    Err(Status::unimplemented("veto"))
}

pub fn status(_shared: &Shared) -> Option<pb::BackfillStatus> {
    None
}
