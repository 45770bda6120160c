//! `?wait=visible`: a write answers `"visible": true` only when a read coordinated by any store
//! node of the routing configuration will see it.
//!
//! A coordinator reads at its own UST view, and the views of the nodes differ by a few gossip
//! intervals: one node having reached a ts says nothing about the others. So every store node
//! of the configurations this api-server routes to (current and, during a transition, next; the
//! ones not marked failed) is asked `WaitForUst(ts)` at once, within one deadline, and the
//! answer is true only if every node that answered reached ts. A node's UST view never goes
//! back, so once it has reached ts every read it coordinates later sees the write.
//!
//! - A node that answered "not reached", timed out or failed otherwise makes it false.
//! - A node whose connection is refused is not listening, so it coordinates no read: it is left
//!   out. It may be starting again, though: a restarted node coordinates only once it has heard
//!   from every node of the configurations, and its UST view is then at least the highest view
//!   they gossiped (`core::Frontiers`), so it sees ts provided they had reached it when they
//!   gossiped. That is why a refused node is asked once more after every other node has reached
//!   ts: if it refuses again, whatever it hears once it listens was gossiped after they reached
//!   ts; if it answers, its answer counts.
//! - A transport error after the connection was made (a node killed mid-call) is retried while
//!   the wait lasts: the retry then answers, or is refused.
//! - Nodes that joined the routing configurations during the wait are asked too.
//! - With no node to ask, or none that answered, it is false.
//!
//! `visible_wait_ms` bounds the wait for the UST (the `timeout_ms` each node is given), and each
//! call gets `store_rpc_ms` on top, as one call did before.

use std::collections::HashMap;
use std::time::Duration;

use causeway_core::Timestamp;
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tonic::Status;

use causeway_config_manager::store_nodes::{retryable, StoreNodes as Store};

/// Pause before asking a node again after a transport error.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Rounds of asking at most: the first asks every node; the later ones ask the nodes that
/// refused once (a second time) and the nodes that joined the routing configurations meanwhile.
const MAX_ROUNDS: usize = 4;

/// The bounds of one wait.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// Until when the nodes wait for their UST (`visible_wait_ms` from the start).
    wait: Instant,
    /// Until when a call may take (the wait plus `store_rpc_ms`).
    call: Instant,
}

/// What one node said.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Reached,
    /// It answered, below ts (its UST view), or failed: the write may not be visible there.
    NotReached(String),
    /// Connection refused: it is not listening.
    Refused,
}

/// Where a node stands in this wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reached,
    /// Refused this many times.
    Refused(u8),
}

/// Waits (bounded) until every store node of the routing configurations that can be reached
/// has a UST view at or past `ts`. True only then; false when one did not in time, failed, or
/// no node could say.
pub(crate) async fn wait_visible(
    store: &Store,
    ts: Timestamp,
    visible_wait_ms: u32,
    store_rpc_ms: u64,
) -> bool {
    let start = Instant::now();
    let wait = start + Duration::from_millis(u64::from(visible_wait_ms));
    let deadlines = Deadlines {
        wait,
        call: wait + Duration::from_millis(store_rpc_ms),
    };
    let mut states: HashMap<String, State> = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let ask: Vec<String> = store
            .routing_nodes()
            .into_iter()
            .filter(|addr| match states.get(addr) {
                None | Some(State::Refused(1)) => true,
                Some(State::Reached | State::Refused(_)) => false,
            })
            .collect();
        if ask.is_empty() {
            let reached = states.values().filter(|s| **s == State::Reached).count();
            if reached == 0 {
                tracing::warn!(
                    ts = ts.get(),
                    "waiting for visibility: no store node could be reached"
                );
            }
            return reached > 0;
        }
        // At once; the first node that did not reach ts decides.
        let mut answers: FuturesUnordered<_> = ask
            .into_iter()
            .map(|addr| async move {
                let answer = ask_node(store, &addr, ts, deadlines).await;
                (addr, answer)
            })
            .collect();
        while let Some((addr, answer)) = answers.next().await {
            match answer {
                Answer::Reached => {
                    states.insert(addr, State::Reached);
                }
                Answer::Refused => {
                    let s = states.entry(addr).or_insert(State::Refused(0));
                    if let State::Refused(n) = s {
                        *n += 1;
                    }
                }
                Answer::NotReached(why) => {
                    tracing::warn!(
                        ts = ts.get(),
                        node = %addr,
                        why = %why,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "a write is not visible on every store node in time"
                    );
                    return false;
                }
            }
        }
    }
    tracing::warn!(
        ts = ts.get(),
        "waiting for visibility: the routing configurations kept changing"
    );
    false
}

/// Asks one node `WaitForUst(ts)`, again after transport errors while the wait lasts.
async fn ask_node(store: &Store, addr: &str, ts: Timestamp, deadlines: Deadlines) -> Answer {
    loop {
        let now = Instant::now();
        // At least 1 ms: 0 would mean the node's own ceiling.
        let timeout_ms = u32::try_from(
            deadlines
                .wait
                .saturating_duration_since(now)
                .as_millis()
                .max(1),
        )
        .unwrap_or(u32::MAX);
        let call_timeout = deadlines.call.saturating_duration_since(now);
        let result = match store.channel(addr) {
            Ok(channel) => {
                let mut request = tonic::Request::new(pb::WaitForUstRequest {
                    ts: ts.get(),
                    timeout_ms,
                });
                request.set_timeout(call_timeout);
                let mut client = StoreNodeClient::new(channel);
                match tokio::time::timeout_at(deadlines.call, client.wait_for_ust(request)).await {
                    Ok(r) => r.map(tonic::Response::into_inner),
                    Err(_) => Err(Status::deadline_exceeded("no answer in time")),
                }
            }
            Err(status) => Err(status),
        };
        match result {
            Ok(r) if r.reached => return Answer::Reached,
            Ok(r) => {
                let ust = r.ust.map_or(0, |u| u.ts);
                return Answer::NotReached(format!("its UST is {ust}"));
            }
            Err(status) if refused(&status) => {
                store.penalize(addr);
                return Answer::Refused;
            }
            Err(status)
                if retryable(status.code()) && Instant::now() + RETRY_PAUSE < deadlines.wait =>
            {
                tracing::debug!(node = %addr, error = %status, "WaitForUst failed, asking again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(status) => {
                return Answer::NotReached(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }
}

/// Whether the call failed because the node refused the connection: nothing listens there.
fn refused(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A loopback port nothing listens on.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr.to_string()
    }

    #[tokio::test]
    async fn a_refused_connection_is_recognised() {
        let store = Store::new(3, Arc::default(), causeway_proto::link::Link::open());
        let addr = closed_port();
        let deadlines = Deadlines {
            wait: Instant::now() + Duration::from_secs(2),
            call: Instant::now() + Duration::from_secs(3),
        };
        // Twice: the lazy channel connects again on every call.
        for _ in 0..2 {
            assert_eq!(
                ask_node(&store, &addr, Timestamp(1), deadlines).await,
                Answer::Refused
            );
        }
        assert!(!refused(&Status::unavailable("down")));
        assert!(!refused(&Status::deadline_exceeded("slow")));
    }

    #[tokio::test]
    async fn without_reachable_nodes_nothing_is_visible() {
        let store = Store::new(3, Arc::default(), causeway_proto::link::Link::open());
        assert!(!wait_visible(&store, Timestamp(1), 100, 100).await);
        store.set_nodes_for_test(vec![closed_port(), closed_port()]);
        let started = Instant::now();
        assert!(!wait_visible(&store, Timestamp(1), 2_000, 1_000).await);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused nodes answer at once"
        );
    }
}
