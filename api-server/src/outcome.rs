//! Transaction outcomes for clients: the wait of a write that answers only once its outcome is
//! known (a conditional write, `?wait=outcome`, `?wait=visible`), and the lookup behind
//! `GET /v1/transactions/{ts}`.
//!
//! Every store node that writes a document of a transaction decides it (ARCHITECTURE.md,
//! "Transaction outcomes") and keeps the outcome for a window, so the outcome of a write is
//! asked of the replicas of one document it writes, in the current and the next configuration;
//! the first that has applied its ts answers. A lookup by ts alone asks every live node.

use std::time::Duration;

use causeway_core::{KeyHash, Timestamp};
use causeway_proto::v1::{self as pb, outcome_response::Known};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::problem::{FailureBody, Kind, Problem};
use causeway_config_manager::StoreNodes as Store;

/// One round of asking waits at most this long on a node.
const ROUND_MS: u32 = 2_000;

/// What the nodes said of a ts.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Decided(pb::TxOutcome),
    /// Some node that may know has not applied the ts yet.
    Pending,
    /// Every node asked has applied the ts and none recorded an outcome: the ts holds no
    /// transaction that wrote documents, or its outcome is no longer retained.
    Unknown {
        pruned: bool,
    },
}

/// Asks the nodes at `addrs` what they know of `ts`, each waiting up to `wait_ms` to reach it;
/// the first decision wins.
async fn ask(store: &Store, addrs: &[String], ts: Timestamp, wait_ms: u32) -> Lookup {
    let mut asks: FuturesUnordered<_> = addrs
        .iter()
        .filter_map(|addr| store.client(addr).ok())
        .map(|mut client| async move {
            let mut request = tonic::Request::new(pb::OutcomeRequest {
                ts: ts.0,
                wait_ms,
                following: 0,
            });
            request.set_timeout(Duration::from_millis(u64::from(wait_ms) + 2_000));
            client
                .outcome(request)
                .await
                .map(tonic::Response::into_inner)
        })
        .collect();
    let mut everyone_applied = !asks.is_empty();
    let mut pruned = false;
    while let Some(answer) = asks.next().await {
        match answer {
            Ok(pb::OutcomeResponse {
                known: Some(Known::Decided(outcome)),
                ..
            }) => return Lookup::Decided(outcome),
            Ok(answer) => {
                everyone_applied &= answer.applied >= ts.0;
                pruned |= answer.pruned;
            }
            Err(status) => {
                tracing::debug!(%ts, %status, "asking for an outcome failed");
                everyone_applied = false;
            }
        }
    }
    // Past the retention window of a node that answered, no node may know any more.
    if everyone_applied || pruned {
        Lookup::Unknown { pruned }
    } else {
        Lookup::Pending
    }
}

/// Waits (until `timeout`) for the outcome of the transaction at `ts` that writes the document
/// at `hash`. `None` when no replica told it in time.
///
/// Each replica is asked again as soon as it answers without the decision (it has not applied
/// the ts yet, or it waits at it for votes), so that the answer of a live replica is never held
/// back by a silent one: a paused node answers nothing until its call's deadline. The replicas
/// are looked up again every round, which follows a transition.
pub async fn wait(
    store: &Store,
    ts: Timestamp,
    hash: KeyHash,
    timeout: Duration,
) -> Option<pb::TxOutcome> {
    let deadline = Instant::now() + timeout;
    loop {
        let round_end = deadline.min(Instant::now() + Duration::from_millis(ROUND_MS.into()));
        let mut asks: FuturesUnordered<_> = store
            .holders(hash)
            .into_iter()
            .map(|addr| keep_asking(store, addr, ts, round_end))
            .collect();
        while let Some(answer) = asks.next().await {
            if answer.is_some() {
                return answer;
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        // A round that failed fast (nodes down) is not repeated at once.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks the node at `addr` for the outcome of `ts` until it tells it or `end` passes.
async fn keep_asking(
    store: &Store,
    addr: String,
    ts: Timestamp,
    end: Instant,
) -> Option<pb::TxOutcome> {
    let addrs = [addr];
    let asking = async {
        // An answer at once without the decision (the node waits at ts for votes, or the call
        // failed): ask again after a pause, longer each time (10 ms to 200 ms), not in a spin.
        let mut pause = Duration::from_millis(10);
        loop {
            let asked = Instant::now();
            let left = end.saturating_duration_since(asked);
            let wait_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX);
            match ask(store, &addrs, ts, wait_ms).await {
                Lookup::Decided(outcome) => return outcome,
                // Past this node's retention window: it will never tell.
                Lookup::Unknown { pruned: true } => std::future::pending::<()>().await,
                Lookup::Pending | Lookup::Unknown { .. } => {}
            }
            tokio::time::sleep(pause.saturating_sub(asked.elapsed())).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    };
    tokio::time::timeout_at(end, asking).await.ok()
}

/// What the live nodes know of `ts` now (each waits a moment to reach it).
pub async fn lookup(store: &Store, ts: Timestamp) -> Lookup {
    ask(store, &store.routing_nodes(), ts, 200).await
}

/// The failures of an outcome as the answer lists them.
pub fn failures(outcome: &pb::TxOutcome) -> Vec<FailureBody> {
    outcome
        .failures
        .iter()
        .map(|f| FailureBody {
            collection: f.collection.clone(),
            id: f.id.clone(),
            condition: f.condition,
            found_version_ts: f.condition.map(|_| f.found_version_ts),
            bytes: (f.max_bytes > 0).then_some(f.bytes),
            max_bytes: (f.max_bytes > 0).then_some(f.max_bytes),
            detail: (!f.detail.is_empty()).then(|| f.detail.clone()),
        })
        .collect()
}

/// The problem answer of an aborted transaction at `ts`: 412 when a condition failed, else
/// 413 (size limit) or 422 (raw changes refused).
pub fn aborted(ts: Timestamp, outcome: &pb::TxOutcome) -> Problem {
    let failures = failures(outcome);
    let kind = if failures.iter().any(|f| f.condition.is_some()) {
        Kind::ConditionFailed
    } else if failures.iter().any(|f| f.max_bytes.is_some()) {
        Kind::ResultTooLarge
    } else {
        Kind::ChangesRefused
    };
    let detail = match kind {
        Kind::ConditionFailed => format!(
            "{} condition(s) false at ts {}: the transaction aborted and changed nothing",
            failures.iter().filter(|f| f.condition.is_some()).count(),
            ts.0 - 1
        ),
        Kind::ResultTooLarge => "the transaction would have left a document over the size \
                                  limit: it aborted and changed nothing"
            .to_owned(),
        _ => "the document cannot take the automerge changes: the transaction aborted".to_owned(),
    };
    let mut problem = Problem::new(kind, detail).at_ts(ts.0);
    problem.failures = failures;
    problem
}
