//! [`StoreNodes`]: a client's view of the store nodes (the api-server's, the change feeds'). It follows the config manager's
//! (current, next) pair through a `Watch` stream, keeps one lazily connected tonic channel per
//! node address, and runs coordinated reads on a node of the routing configuration.
//!
//! During a transition the routing epoch switches from current to next at a moment only the
//! store nodes know, so the first choice is a live node of both configurations (it coordinates
//! in either epoch); nodes of only one come after. A node that has just failed a call
//! (unreachable, or still starting and not yet coordinating) goes to the back of the order for a
//! while, so later requests do not wait on it. A call that fails with a transport-level status
//! (UNAVAILABLE, UNKNOWN, CANCELLED) is retried on the next candidate, up to `store_tries` nodes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::{Client as ConfigClient, ConfigPair};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Connecting to a store node may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keepalive, so a dead node breaks its channel instead of hanging calls.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Backoff of the config watch after a failure: from the first to the last, doubling.
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a node that failed a call is tried only after the others.
const PENALTY: Duration = Duration::from_secs(1);
/// The largest answer a client takes from a store node, as between store nodes: a multi-get of
/// the most keys at the largest document size, or a group of a change feed, fits (tonic's
/// default, 4 MiB, does not).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

fn client(channel: Channel) -> StoreNodeClient<Channel> {
    StoreNodeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Why a call to the store nodes failed.
#[derive(Debug)]
pub enum StoreError {
    /// No configuration with nodes is known yet.
    NoNodes,
    /// The last status after trying the candidates.
    Status(Status),
}

/// The store nodes and the channels to them. Shared by every request.
#[derive(Debug)]
pub struct StoreNodes {
    /// Node addresses: the preferred ones (live in both configurations during a transition,
    /// else every live node of current), then the others.
    nodes: RwLock<Arc<Candidates>>,
    /// Nodes that failed a call recently, until when they come last.
    penalized: Mutex<HashMap<String, Instant>>,
    pair: RwLock<Option<ConfigPair>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Spreads coordination over the candidates.
    next: AtomicUsize,
    tries: usize,
    /// Calls retried on another node (a metric of the owner's).
    failovers: Arc<AtomicU64>,
}

impl StoreNodes {
    pub fn new(tries: usize, failovers: Arc<AtomicU64>) -> StoreNodes {
        StoreNodes {
            nodes: RwLock::new(Arc::new(Candidates::default())),
            penalized: Mutex::new(HashMap::new()),
            pair: RwLock::new(None),
            channels: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            tries,
            failovers,
        }
    }

    /// Installs a new (current, next) pair.
    pub fn set_pair(&self, pair: ConfigPair) {
        let candidates = Candidates::of(&pair);
        tracing::info!(
            revision = pair.revision,
            epoch = %pair.current_epoch(),
            preferred = candidates.preferred.len(),
            others = candidates.others.len(),
            "routing configuration changed"
        );
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(candidates);
        *self.pair.write().unwrap_or_else(|e| e.into_inner()) = Some(pair);
    }

    /// Whether reads have somewhere to go.
    pub fn has_nodes(&self) -> bool {
        !self
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Every node of the configurations reads are routed to: the live nodes of current and,
    /// during a transition, of next (one entry per address). `?wait=visible` asks them all.
    pub fn routing_nodes(&self) -> Vec<String> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        nodes
            .preferred
            .iter()
            .chain(&nodes.others)
            .cloned()
            .collect()
    }

    /// The nodes to try for one call, best first: each tier rotated by `start` (to spread the
    /// load), recently failed nodes last.
    fn order(&self, start: usize) -> Vec<String> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let rotate = |tier: &[String]| -> Vec<String> {
            (0..tier.len())
                .map(|i| tier[(start + i) % tier.len()].clone())
                .collect()
        };
        let mut order = rotate(&nodes.preferred);
        order.extend(rotate(&nodes.others));
        let now = Instant::now();
        let mut penalized = self.penalized.lock().unwrap_or_else(|e| e.into_inner());
        penalized.retain(|_, until| *until > now);
        // A stable sort: the order within each group stays.
        order.sort_by_key(|addr| penalized.contains_key(addr));
        order
    }

    /// The addresses of the live nodes that may hold `hash`: the replicas of its partition in
    /// the current and the next configuration.
    pub fn holders(&self, hash: causeway_core::KeyHash) -> Vec<String> {
        let pair = self.pair.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for config in pair.iter().flat_map(|p| [&p.current, &p.next]).flatten() {
            let live = config.live_node_ids();
            for node in config.replicas_of(config.partition_of(hash)) {
                let Some(info) = config.nodes.get(node).filter(|_| live.contains(node)) else {
                    continue;
                };
                if !out.contains(&info.addr) {
                    out.push(info.addr.clone());
                }
            }
        }
        out
    }

    /// A client of the node at `addr`.
    pub fn client(&self, addr: &str) -> Result<StoreNodeClient<Channel>, Status> {
        self.channel(addr).map(client)
    }

    /// Puts `addr` last in the order of calls for a while.
    pub fn penalize(&self, addr: &str) {
        self.penalized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr.to_owned(), Instant::now() + PENALTY);
    }

    /// The channel to `addr`, made (lazily connected) on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|_| Status::unavailable(format!("invalid store node address {addr:?}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Runs `call` on a coordinating node, failing over to other candidates on transport-level
    /// errors, at most `tries` nodes.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(StoreNodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let nodes = self.order(start);
        if nodes.is_empty() {
            return Err(StoreError::NoNodes);
        }
        let mut last = Status::unavailable("no store node tried");
        for addr in nodes.iter().take(self.tries) {
            let result = match self.channel(addr) {
                Ok(channel) => call(client(channel)).await,
                Err(status) => Err(status),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(status) if retryable(status.code()) => {
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    self.penalize(addr);
                    tracing::debug!(node = %addr, code = ?status.code(), "store node call failed, trying another");
                    last = status;
                }
                Err(status) => return Err(StoreError::Status(status)),
            }
        }
        Err(StoreError::Status(last))
    }

    /// Follows the config manager's pair until `shutdown` says stop, reconnecting with a
    /// bounded backoff.
    pub async fn follow(
        self: Arc<Self>,
        config_manager: ConfigClient,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = WATCH_BACKOFF_FIRST;
        loop {
            let run = async {
                let mut watch = config_manager.watch().await?;
                while let Some(pair) = watch.next().await? {
                    self.set_pair(pair);
                    backoff = WATCH_BACKOFF_FIRST;
                }
                Ok::<(), crate::Error>(())
            };
            tokio::select! {
                r = run => match r {
                    Ok(()) => tracing::info!("config manager ended the watch"),
                    Err(e) => tracing::warn!(error = %e, "config watch failed"),
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Backoff before reconnecting (a pause between attempts, not synchronisation).
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    }
}

/// Where coordinated calls may go.
#[derive(Debug, Default, PartialEq)]
struct Candidates {
    preferred: Vec<String>,
    others: Vec<String>,
}

impl Candidates {
    fn of(pair: &ConfigPair) -> Candidates {
        let addr = |config: &causeway_core::ClusterConfig, id| {
            config.nodes.get(&id).map(|info| info.addr.clone())
        };
        let mut c = Candidates::default();
        let Some(current) = &pair.current else {
            return c;
        };
        let next = pair.next.as_ref().filter(|n| n.epoch > current.epoch);
        for id in current.live_node_ids() {
            let in_next = next.is_none_or(|n| n.live_node_ids().contains(&id));
            let tier = if in_next {
                &mut c.preferred
            } else {
                &mut c.others
            };
            tier.extend(addr(current, id));
        }
        if let Some(next) = next {
            for id in next.live_node_ids() {
                if !current.contains(id) {
                    c.others.extend(addr(next, id));
                }
            }
        }
        // One entry per address, in first-seen order.
        let mut seen = std::collections::HashSet::new();
        c.preferred.retain(|a| seen.insert(a.clone()));
        c.others.retain(|a| seen.insert(a.clone()));
        c
    }

    fn is_empty(&self) -> bool {
        self.preferred.is_empty() && self.others.is_empty()
    }
}

/// Statuses after which another node (or another try) may do better.
pub fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

#[doc(hidden)]
impl StoreNodes {
    /// Routes to `addrs` as if a configuration listed them.
    pub fn set_nodes_for_test(&self, addrs: Vec<String>) {
        *self.nodes.write().unwrap() = Arc::new(Candidates {
            preferred: addrs,
            others: Vec::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_nodes_calls_fail_fast() {
        let store = StoreNodes::new(3, Arc::default());
        assert!(!store.has_nodes());
        let r = store.call(|_c| async { Ok::<u32, Status>(1) }).await;
        assert!(matches!(r, Err(StoreError::NoNodes)));
    }

    #[tokio::test]
    async fn calls_fail_over_on_unavailable_and_stop_on_other_errors() {
        let store = StoreNodes::new(2, Arc::default());
        *store.nodes.write().unwrap() = Arc::new(Candidates {
            preferred: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            others: vec!["127.0.0.1:3".into()],
        });
        let tried = AtomicUsize::new(0);
        let r = store
            .call(|_c| {
                tried.fetch_add(1, Ordering::SeqCst);
                async { Err::<u32, _>(Status::unavailable("down")) }
            })
            .await;
        assert!(matches!(r, Err(StoreError::Status(s)) if s.code() == Code::Unavailable));
        assert_eq!(tried.load(Ordering::SeqCst), 2, "bounded by tries");
        tried.store(0, Ordering::SeqCst);
        let r = store
            .call(|_c| {
                tried.fetch_add(1, Ordering::SeqCst);
                async { Err::<u32, _>(Status::invalid_argument("bad")) }
            })
            .await;
        assert!(matches!(r, Err(StoreError::Status(s)) if s.code() == Code::InvalidArgument));
        assert_eq!(tried.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn nodes_of_both_configurations_come_first_and_failed_nodes_last() {
        use causeway_core::{ClusterConfig, NodeId, NodeInfo};
        let info = |i: u64| NodeInfo {
            id: NodeId(i),
            addr: format!("n{i}"),
        };
        let current = ClusterConfig::bootstrap(1, 2, &[info(1), info(2)]).unwrap();
        let next = current.next_for_shape(2, 2, &[info(3), info(4)]).unwrap();
        let pair = ConfigPair {
            revision: 2,
            current: Some(current.clone()),
            next: Some(next),
        };
        let c = Candidates::of(&pair);
        assert_eq!(c.preferred, vec!["n1".to_owned(), "n2".to_owned()]);
        assert_eq!(c.others, vec!["n3".to_owned(), "n4".to_owned()]);
        // Stable: every live node is preferred.
        let stable = Candidates::of(&ConfigPair {
            revision: 1,
            current: Some(current),
            next: None,
        });
        assert_eq!(stable.preferred.len(), 2);
        assert!(stable.others.is_empty());

        let store = StoreNodes::new(4, Arc::default());
        store.set_pair(pair);
        assert_eq!(store.order(1), ["n2", "n1", "n4", "n3"]);
        store.penalize("n2");
        assert_eq!(store.order(1), ["n1", "n4", "n3", "n2"]);
    }
}
