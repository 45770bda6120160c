//! Votes between partitions (ARCHITECTURE.md, "Transaction outcomes"): a node whose apply
//! stopped at a transaction for want of other documents' votes asks the nodes that hold them,
//! and every node answers what it knows of a ts: the outcome it recorded, or its votes while it
//! waits at that ts itself.
//!
//! Nothing here decides: `Store::apply_with_votes` does, from the answers gathered here. A
//! vote is the same on every replica of its partition, so any one answer stands for it. A
//! participant with no live replica stalls the nodes that wait for its votes (their committed
//! ts, and so the UST of their partitions, stays below the transaction) and nobody else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use causeway_core::{NodeId, Timestamp};
use causeway_proto::link::Channel;
use causeway_proto::v1::{self as pb, store_node_client::StoreNodeClient};

use crate::grpc::lazy_channel;
use crate::state::Shared;
use crate::storage::{Blocked, RemoteVotes};

/// How long one ask waits for a peer to reach the ts.
const ASK_WAIT_MS: u32 = 1_000;
/// The longest an `Outcome` call may wait on this node.
const MAX_SERVE_WAIT_MS: u32 = 5_000;
/// How many later outcomes one ask requests (and one answer carries at most).
const FOLLOWING: u32 = 256;

/// Where this node's apply is, for the `Outcome` answers: its applied position and the
/// transaction it waits at, with its own votes.
#[derive(Debug, Clone, Default)]
pub struct VoteState {
    pub applied: Timestamp,
    pub blocked: Option<Blocked>,
}

/// The clients of the peers asked for votes, by node.
#[derive(Debug, Default)]
pub struct Askers {
    clients: HashMap<NodeId, (String, StoreNodeClient<Channel>)>,
}

impl Askers {
    /// `None` for an address that is not a valid URI.
    fn client(
        &mut self,
        link: &causeway_proto::link::Link,
        node: NodeId,
        addr: &str,
    ) -> Option<StoreNodeClient<Channel>> {
        if self.clients.get(&node).is_none_or(|(a, _)| a != addr) {
            let channel = lazy_channel(link, node, addr).ok()?;
            self.clients
                .insert(node, (addr.to_owned(), StoreNodeClient::new(channel)));
        }
        Some(self.clients[&node].1.clone())
    }
}

/// The nodes (other than this one) that may hold the documents `blocked` misses: their
/// partitions' live replicas in the current and the next configuration.
fn holders(shared: &Shared, blocked: &Blocked) -> BTreeMap<NodeId, String> {
    let configs = shared.configs();
    let mut out = BTreeMap::new();
    for config in [&configs.current, &configs.next].into_iter().flatten() {
        for (_, hash) in &blocked.missing {
            let partition = config.partition_of(*hash);
            for node in config.replicas_of(partition) {
                if *node == shared.node || config.failed.contains(node) {
                    continue;
                }
                if let Some(info) = config.nodes.get(node) {
                    out.insert(*node, info.addr.clone());
                }
            }
        }
    }
    out
}

/// Asks every node that may hold a missing vote of `blocked` what it knows of its ts (each
/// waits up to a second to get there), and adds the answers to `remote`, until they decide it:
/// one decision, or votes for every missing document (the slower replicas are not waited for).
/// Returns whether an answer brought a missing vote; without one it pauses first, so that a
/// node whose votes cannot come yet (every holder down) does not spin. The caller applies again
/// either way.
pub async fn gather(
    shared: &Shared,
    askers: &mut Askers,
    blocked: &Blocked,
    remote: &mut RemoteVotes,
) -> bool {
    use futures::stream::{FuturesUnordered, StreamExt};
    use pb::outcome_response::Known;
    let peers = holders(shared, blocked);
    let ts = blocked.ts;
    let mut asks: FuturesUnordered<_> = peers
        .into_iter()
        .filter_map(|(node, addr)| Some((node, askers.client(&shared.link, node, &addr)?)))
        .map(|(node, mut client)| async move {
            let mut request = tonic::Request::new(pb::OutcomeRequest {
                ts: ts.0,
                wait_ms: ASK_WAIT_MS,
                following: FOLLOWING,
            });
            request.set_timeout(Duration::from_millis(u64::from(ASK_WAIT_MS) + 2_000));
            match client.outcome(request).await {
                Ok(answer) => Some(answer.into_inner()),
                Err(status) => {
                    tracing::debug!(%node, %ts, %status, "asking for votes failed");
                    None
                }
            }
        })
        .collect();
    let mut missing: HashSet<_> = blocked.missing.iter().map(|(key, _)| key.clone()).collect();
    let mut got = false;
    while let Some(answer) = asks.next().await {
        let Some(answer) = answer else { continue };
        // What a node ahead recorded after ts (a node catching up needs no ask for those), and
        // the votes it can already cast on later ts.
        let later = answer
            .later
            .into_iter()
            .filter_map(|l| Some((Timestamp(l.ts), Known::Decided(l.outcome?))));
        let early = answer
            .later_votes
            .into_iter()
            .filter_map(|l| Some((Timestamp(l.ts), Known::Votes(l.votes?))));
        for (at, known) in later.chain(early) {
            remember(remote, at, known);
        }
        let Some(known) = answer.known else { continue };
        // Only an answer that brings a missing vote (or the decision) is progress: a node that
        // holds the documents only as pending answers no votes on them.
        let before = missing.len();
        match &known {
            Known::Decided(_) => missing.clear(),
            Known::Votes(votes) => {
                for vote in &votes.votes {
                    missing.remove(&(vote.collection.clone(), vote.id.clone()));
                }
            }
        }
        got |= missing.len() < before;
        remember(remote, ts, known);
        if missing.is_empty() {
            break;
        }
    }
    if !got {
        // Nobody could say: do not spin on peers that are down.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

/// Adds what a node told of `ts` to `remote`, once.
fn remember(remote: &mut RemoteVotes, ts: Timestamp, known: pb::outcome_response::Known) {
    let told = remote.entry(ts).or_default();
    if !told.contains(&known) {
        told.push(known);
    }
}

/// This node's answer to `Outcome(ts)`: waits (bounded) until it has applied ts or waits at
/// it, then answers what it recorded, or its votes.
pub async fn answer(
    shared: &Arc<Shared>,
    request: pb::OutcomeRequest,
) -> Result<pb::OutcomeResponse, crate::storage::Error> {
    let ts = Timestamp(request.ts);
    let wait = Duration::from_millis(u64::from(request.wait_ms.min(MAX_SERVE_WAIT_MS)));
    let mut rx = shared.votes.subscribe();
    let early = |b: &Blocked| {
        b.early
            .iter()
            .find(|(t, _)| *t == ts)
            .map(|(_, v)| v.clone())
    };
    let reached = |s: &VoteState| {
        s.applied >= ts
            || s.blocked
                .as_ref()
                .is_some_and(|b| b.ts == ts || early(b).is_some())
    };
    if shared.store.applied() < ts {
        let _ = tokio::time::timeout(wait, rx.wait_for(reached)).await;
    }
    let state = shared.votes.borrow().clone();
    let applied = shared.store.applied();
    let pruned = ts < shared.store.outcomes_pruned();
    let blocked = state.blocked.as_ref().filter(|_| applied < ts);
    let known = if applied >= ts {
        shared.store.outcome(ts)?
    } else {
        blocked.as_ref().and_then(|b| {
            let votes = if b.ts == ts {
                Some(b.votes.clone())
            } else {
                early(b)
            };
            votes.map(|votes| pb::outcome_response::Known::Votes(pb::TxVotes { votes }))
        })
    };
    // Votes it can already cast on later ts: the asker will need them next.
    let later_votes = state
        .blocked
        .iter()
        .flat_map(|b| b.early.iter())
        .filter(|(t, _)| *t > ts)
        .map(|(t, votes)| pb::LaterVotes {
            ts: t.0,
            votes: Some(pb::TxVotes {
                votes: votes.clone(),
            }),
        })
        .collect();
    let following = u64::from(request.following.min(FOLLOWING));
    let upto = Timestamp(ts.0.saturating_add(following).min(applied.0));
    let later = shared
        .store
        .outcomes_after(ts, upto)?
        .into_iter()
        .map(|(ts, outcome)| pb::LaterOutcome {
            ts: ts.0,
            outcome: Some(outcome),
        })
        .collect();
    Ok(pb::OutcomeResponse {
        known,
        applied: applied.0,
        pruned,
        later,
        later_votes,
    })
}
