//! A feed's hold on the GC timestamp: the store nodes keep every version the feed still needs
//! (DESIGN.md §11).
//!
//! The hold is a `HoldSnapshot` stream opened on one store node at the feed's hold ts (the ts
//! before the first one it must still read): that node gossips it as an active read, so no
//! node's GC timestamp passes it. When the checkpoint moves, a new hold is opened before the old
//! one is dropped, so the held ts only rises. A hold that ends (its node went away, or its
//! `max_hold_ms`) is opened again. A checkpoint that has not moved for `protect_max_age` (a sink
//! down for that long) is let go: the cluster's history is not held forever, and the feed finds
//! out when it reads (`causeway.history_lost`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_config_manager::StoreNodes;
use causeway_core::Timestamp;
use causeway_proto::v1 as pb;
use tokio::sync::watch;

/// The settings of a hold.
#[derive(Debug, Clone, Copy)]
pub struct HoldOptions {
    pub protect_max_age: Duration,
    /// How often the hold follows a moving target, at most.
    pub refresh: Duration,
}

/// Holds the GC timestamp at a target the feed moves.
#[derive(Debug)]
pub struct Hold {
    target: watch::Sender<Option<Timestamp>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hold {
    pub fn start(nodes: Arc<StoreNodes>, options: HoldOptions) -> Hold {
        let (target, rx) = watch::channel(None);
        let task = tokio::spawn(run(nodes, options, rx));
        Hold { target, task }
    }

    /// Hold at `ts` from now on (never below the ts already held: the target only rises).
    pub fn set(&self, ts: Timestamp) {
        self.target.send_if_modified(|t| {
            if t.is_none_or(|old| ts > old) {
                *t = Some(ts);
                true
            } else {
                false
            }
        });
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    nodes: Arc<StoreNodes>,
    options: HoldOptions,
    mut target: watch::Receiver<Option<Timestamp>>,
) {
    let mut held: Option<(Timestamp, tonic::Streaming<pb::HoldSnapshotEvent>)> = None;
    let mut moved_at = Instant::now();
    let mut last_target = None;
    loop {
        let want = *target.borrow_and_update();
        if want != last_target {
            last_target = want;
            moved_at = Instant::now();
        }
        let expired = moved_at.elapsed() >= options.protect_max_age;
        if expired && held.is_some() {
            tracing::warn!(
                max_age_ms = options.protect_max_age.as_millis() as u64,
                "the feed's checkpoint has not moved within protect_max_age; releasing its GC hold"
            );
            held = None;
        }
        match want {
            Some(ts) if !expired && held.as_ref().is_none_or(|(h, _)| *h != ts) => {
                let left = options.protect_max_age.saturating_sub(moved_at.elapsed());
                match open(&nodes, ts, left).await {
                    // The new hold is in place before the old one goes.
                    Ok(stream) => held = Some((ts, stream)),
                    Err(status) => {
                        tracing::warn!(
                            ts = ts.get(),
                            message = status.message(),
                            "cannot hold the GC timestamp at the feed's checkpoint"
                        );
                    }
                }
            }
            _ => {}
        }
        let ended = async {
            match held.as_mut() {
                Some((_, stream)) => while let Ok(Some(_)) = stream.message().await {},
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    return;
                }
                // Follow a moving target at most once per refresh.
                tokio::time::sleep(options.refresh).await;
            }
            () = ended => {
                held = None;
                tokio::time::sleep(options.refresh).await;
            }
            () = tokio::time::sleep(options.refresh.max(Duration::from_millis(100)) * 10) => {}
        }
    }
}

async fn open(
    nodes: &StoreNodes,
    ts: Timestamp,
    max_hold: Duration,
) -> Result<tonic::Streaming<pb::HoldSnapshotEvent>, tonic::Status> {
    let request = pb::HoldSnapshotRequest {
        min_ts: 0,
        timeout_ms: 5_000,
        max_hold_ms: max_hold.as_millis().max(1) as u64,
        at: Some(ts.get()),
    };
    let mut stream = nodes
        .call(|mut c| async move { c.hold_snapshot(request).await })
        .await
        .map_err(|e| match e {
            causeway_config_manager::StoreError::NoNodes => {
                tonic::Status::unavailable("no store node is known")
            }
            causeway_config_manager::StoreError::Status(s) => s,
        })?
        .into_inner();
    // The first message says the hold is registered.
    match stream.message().await? {
        Some(_) => Ok(stream),
        None => Err(tonic::Status::unavailable("the hold ended at once")),
    }
}
