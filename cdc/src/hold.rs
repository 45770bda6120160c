//! A feed's hold on the GC timestamp: the store nodes keep every version the feed still needs
//! (DESIGN.md §11).
//!
//! The hold is a `HoldSnapshot` stream opened on one store node at the feed's hold ts (the ts
//! before the first one it must still read): that node gossips it as an active read, so no
//! node's GC timestamp passes it. When the checkpoint moves, a new hold is opened before the old
//! one is dropped, so the held ts only rises. A store node ends a hold after the time its first
//! message names (`max_hold_ms` as the node's `tuning.max_hold_ms` clamps it): its successor at
//! the same ts is opened before that. A hold whose node went
//! away is opened again. The hold is named (`causeway-cdc/<feed>`, or a change stream's) and kept
//! on one node while it can be, and that node keeps it for `linger` after this process went away
//! (store-node `hold`): a feed killed and restarted finds the history after its checkpoint. A
//! checkpoint that has not moved for `protect_max_age` (a sink down for that long) is let go:
//! the cluster's history is not held forever, and the feed finds out when it reads
//! (`causeway.history_lost`).

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
    /// How long the store node keeps the hold after this process went away (killed, crashed,
    /// restarting): a feed restarted within it resumes from its checkpoint instead of finding
    /// its history pruned. Never more than what is left of `protect_max_age`.
    pub linger: Duration,
}

/// How long a hold lasts when its node does not say (an older build): the default of the store
/// node's `tuning.max_hold_ms`.
const NODE_MAX_HOLD: Duration = Duration::from_secs(3600);

/// How long before a hold ends its successor is opened, at least: room for a refresh's wait
/// and an open that tries every node.
const RENEW_MARGIN: Duration = Duration::from_secs(2);
/// How soon a successor that could not be opened is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// When to open the successor of a hold that lasts `lasts`: a tenth of it, at least
/// [`RENEW_MARGIN`], before its end, but not before half of it (nor within 100 ms: a node
/// whose holds are that short is misconfigured, and the feed must not hammer it).
fn renew_after(lasts: Duration) -> Duration {
    lasts
        .saturating_sub(RENEW_MARGIN.max(lasts / 10))
        .max(lasts / 2)
        .max(Duration::from_millis(100))
}

/// Holds the GC timestamp at a target the feed moves.
#[derive(Debug)]
pub struct Hold {
    target: watch::Sender<Option<Timestamp>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hold {
    /// `owner` names the holder on the store nodes (`causeway-cdc/<feed>`), so that a node
    /// keeps the feed's newest hold (and only that one) while the feed's process is away.
    pub fn start(nodes: Arc<StoreNodes>, owner: String, options: HoldOptions) -> Hold {
        let (target, rx) = watch::channel(None);
        let task = tokio::spawn(run(nodes, owner, options, rx));
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
    owner: String,
    options: HoldOptions,
    mut target: watch::Receiver<Option<Timestamp>>,
) {
    // The ts held, its stream, and when to open its successor (before the node ends it).
    let mut held: Option<(Timestamp, tonic::Streaming<pb::HoldSnapshotEvent>, Instant)> = None;
    let mut moved_at = Instant::now();
    let mut last_target = None;
    // The node of the last hold, tried first for the next.
    let mut at_node: Option<String> = None;
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
            Some(ts)
                if !expired
                    && held
                        .as_ref()
                        .is_none_or(|(h, _, renew)| *h != ts || Instant::now() >= *renew) =>
            {
                let left = options.protect_max_age.saturating_sub(moved_at.elapsed());
                let request = pb::HoldSnapshotRequest {
                    min_ts: 0,
                    timeout_ms: 5_000,
                    max_hold_ms: left.as_millis().max(1) as u64,
                    at: Some(ts.get()),
                    owner: owner.clone(),
                    linger_ms: options.linger.min(left).as_millis() as u64,
                };
                match open(&nodes, at_node.as_deref(), request).await {
                    // The new hold is in place before the old one goes.
                    Ok(opened) => {
                        // Its successor at the same ts is opened before the node ends it, so
                        // the ts is held throughout.
                        let renew = Instant::now() + renew_after(opened.lasts.min(left));
                        held = Some((ts, opened.stream, renew));
                        at_node = Some(opened.node);
                    }
                    Err(status) => {
                        tracing::warn!(
                            ts = ts.get(),
                            message = status.message(),
                            "cannot hold the GC timestamp at the feed's checkpoint"
                        );
                        // The hold still in place is due again after a pause, not at once.
                        if let Some((_, _, renew)) = held.as_mut() {
                            *renew = Instant::now() + options.refresh.max(RETRY_AFTER);
                        }
                    }
                }
            }
            _ => {}
        }
        // A hold due for its successor wakes the loop.
        let renew_at = held.as_ref().map(|(_, _, renew)| *renew);
        let renew = async move {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        let ended = async {
            match held.as_mut() {
                Some((_, stream, _)) => while let Ok(Some(_)) = stream.message().await {},
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
            () = renew => {}
        }
    }
}

/// A snapshot held at a store node's UST view (an initial scan's), while the stream lives:
/// reading the UST first and holding it next would let the GC timestamp pass it between.
pub async fn snapshot(
    nodes: &StoreNodes,
    max_hold: Duration,
) -> Result<(Timestamp, tonic::Streaming<pb::HoldSnapshotEvent>), tonic::Status> {
    let request = pb::HoldSnapshotRequest {
        min_ts: 0,
        timeout_ms: 5_000,
        max_hold_ms: max_hold.as_millis().max(1) as u64,
        at: None,
        owner: String::new(),
        linger_ms: 0,
    };
    open(nodes, None, request)
        .await
        .map(|opened| (opened.ts, opened.stream))
}

/// A hold opened on a store node.
struct Opened {
    /// The node's address.
    node: String,
    ts: Timestamp,
    /// How long the node keeps it.
    lasts: Duration,
    stream: tonic::Streaming<pb::HoldSnapshotEvent>,
}

/// Opens a hold, on the node `prefer` when it can (a feed keeps its hold on one node, so that
/// its moves replace its lingering hold there), else on another node of the routing
/// configuration.
async fn open(
    nodes: &StoreNodes,
    prefer: Option<&str>,
    request: pb::HoldSnapshotRequest,
) -> Result<Opened, tonic::Status> {
    let mut order = nodes.routing_nodes();
    if order.is_empty() {
        return Err(tonic::Status::unavailable("no store node is known"));
    }
    let rotate = rand::random::<u32>() as usize % order.len();
    order.rotate_left(rotate);
    if let Some(p) = prefer {
        if let Some(i) = order.iter().position(|a| a == p) {
            let a = order.remove(i);
            order.insert(0, a);
        }
    }
    let mut last = tonic::Status::unavailable("no store node tried");
    for addr in order {
        let mut client = match nodes.client(&addr) {
            Ok(c) => c,
            Err(status) => {
                last = status;
                continue;
            }
        };
        let opened = async {
            let mut stream = client.hold_snapshot(request.clone()).await?.into_inner();
            // The first message says the hold is registered.
            match stream.message().await? {
                Some(event) => {
                    let lasts = match event.hold_ms {
                        0 => NODE_MAX_HOLD,
                        ms => Duration::from_millis(ms),
                    };
                    Ok((Timestamp(event.at.map_or(0, |at| at.ts)), lasts, stream))
                }
                None => Err(tonic::Status::unavailable("the hold ended at once")),
            }
        };
        match opened.await {
            Ok((ts, lasts, stream)) => {
                return Ok(Opened {
                    node: addr,
                    ts,
                    lasts,
                    stream,
                })
            }
            // "snapshot too old" is the same answer everywhere.
            Err(status) if status.code() == tonic::Code::FailedPrecondition => return Err(status),
            Err(status) => {
                nodes.penalize(&addr);
                last = status;
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_is_opened_in_time_and_never_in_a_hot_loop() {
        let s = Duration::from_secs;
        assert_eq!(renew_after(s(3600)), s(3240));
        assert_eq!(renew_after(s(10)), s(8));
        assert_eq!(renew_after(s(4)), s(2));
        assert_eq!(renew_after(s(1)), Duration::from_millis(500));
        assert_eq!(
            renew_after(Duration::from_millis(1)),
            Duration::from_millis(100)
        );
    }
}
