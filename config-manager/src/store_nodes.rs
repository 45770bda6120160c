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
//!
//! A node that stops answering without failing (SIGSTOP, a VM freeze, a one-way partition: its
//! kernel still takes the connection and the request) is the slow case. Reads are idempotent,
//! so [`StoreNodes::call_hedged`] sends a read that has had no answer after the hedge delay to
//! the next candidate too, the first answer winning, when its node has answered nothing since
//! the read was sent (a busy node answers its other calls; a frozen one answers none). A node
//! hedged so goes to the back of the order for a while, like one that failed a call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::{Client as ConfigClient, ConfigPair};
use causeway_proto::link::{Channel, Link, Role};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use tokio::sync::watch;
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
/// The default hedge delay of [`StoreNodes::call_hedged`]: above a coordinated read's p99 on a
/// LAN, far below any timeout.
pub const DEFAULT_HEDGE_DELAY: Duration = Duration::from_millis(50);
/// The default of the largest answer a client takes from a store node
/// ([`StoreNodes::with_max_message_bytes`]), as between store nodes: a multi-get of the most
/// keys at the largest document size, a query page of 1,000 large documents, or a group of a
/// change feed, fits (tonic's default, 4 MiB, does not). Store nodes send answers up to this
/// size too.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

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
    /// Per node: since when it has had a call in flight without answering anything.
    waiting: Mutex<HashMap<String, Instant>>,
    /// How long a read waits for its node before it is hedged.
    hedge_delay: Duration,
    /// The largest answer taken from a store node.
    max_message_bytes: usize,
    pair: RwLock<Option<ConfigPair>>,
    channels: Mutex<HashMap<String, Channel>>,
    link: Link,
    /// Spreads coordination over the candidates.
    next: AtomicUsize,
    tries: usize,
    /// Calls retried on another node (a metric of the owner's).
    failovers: Arc<AtomicU64>,
}

impl StoreNodes {
    /// Calls go over `link`.
    pub fn new(tries: usize, failovers: Arc<AtomicU64>, link: Link) -> StoreNodes {
        StoreNodes {
            nodes: RwLock::new(Arc::new(Candidates::default())),
            penalized: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            hedge_delay: DEFAULT_HEDGE_DELAY,
            max_message_bytes: MAX_MESSAGE_BYTES,
            pair: RwLock::new(None),
            channels: Mutex::new(HashMap::new()),
            link,
            next: AtomicUsize::new(0),
            tries,
            failovers,
        }
    }

    /// Sets the hedge delay of [`StoreNodes::call_hedged`] (zero: never hedge).
    pub fn with_hedge_delay(mut self, delay: Duration) -> StoreNodes {
        self.hedge_delay = delay;
        self
    }

    /// Sets the largest answer taken from a store node, in bytes (default
    /// [`MAX_MESSAGE_BYTES`]); a larger one fails its call with `OutOfRange`.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> StoreNodes {
        self.max_message_bytes = bytes;
        self
    }

    fn client_of(&self, channel: Channel) -> StoreNodeClient<Channel> {
        StoreNodeClient::new(channel).max_decoding_message_size(self.max_message_bytes)
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
    /// load), and within each tier the nodes that recently failed a call or left one unanswered
    /// last. A penalized node of the preferred tier still comes before the others (nodes that
    /// are leaving in a transition, which may no longer serve).
    fn order(&self, start: usize) -> Vec<String> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let now = Instant::now();
        let mut penalized = self.penalized.lock().unwrap_or_else(|e| e.into_inner());
        penalized.retain(|_, until| *until > now);
        let ordered = |tier: &[String]| -> Vec<String> {
            let mut rotated: Vec<String> = (0..tier.len())
                .map(|i| tier[(start + i) % tier.len()].clone())
                .collect();
            // A stable sort: the rotation stays within each group.
            rotated.sort_by_key(|addr| penalized.contains_key(addr));
            rotated
        };
        let mut order = ordered(&nodes.preferred);
        order.extend(ordered(&nodes.others));
        order
    }

    /// Whether `addr` has answered nothing since `sent`.
    fn silent_since(&self, addr: &str, sent: Instant) -> bool {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.get(addr).is_some_and(|since| *since <= sent)
    }

    /// A call to `addr` goes out.
    fn sent(&self, addr: &str) -> Instant {
        let now = Instant::now();
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.entry(addr.to_owned()).or_insert(now);
        now
    }

    /// `addr` answered a call (with a result or a status of its own): it is not silent.
    fn answered(&self, addr: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
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
        self.channel(addr).map(|c| self.client_of(c))
    }

    /// Puts `addr` last in the order of calls for a while.
    pub fn penalize(&self, addr: &str) {
        self.penalized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr.to_owned(), Instant::now() + PENALTY);
    }

    /// The channel to `addr`, made (lazily connected) on first use. Under TLS it checks that
    /// the server is the node the configurations put at `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let node = self.node_at(addr);
        // Keyed by the node too: a node replaced at the same address is another server.
        let key = format!("{}@{addr}", node.map_or(String::new(), |n| n.to_string()));
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = match node {
            Some(id) => self.link.endpoint(addr, Role::StoreNode(id)),
            None => self.link.endpoint_any_store_node(addr),
        }
        .map_err(|_| Status::unavailable(format!("invalid store node address {addr:?}")))?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true)
            .connect_lazy();
        let channel = self.link.channel(channel);
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// The id of the node the configurations put at `addr`.
    fn node_at(&self, addr: &str) -> Option<u64> {
        let pair = self.pair.read().unwrap_or_else(|e| e.into_inner());
        let pair = pair.as_ref()?;
        pair.current
            .iter()
            .chain(&pair.next)
            .flat_map(|c| c.nodes.values())
            .find(|info| info.addr == addr)
            .map(|info| info.id.0)
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
                Ok(channel) => {
                    self.sent(addr);
                    call(self.client_of(channel)).await
                }
                Err(status) => Err(status),
            };
            if !matches!(&result, Err(s) if retryable(s.code())) {
                self.answered(addr);
            }
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

    /// Runs the idempotent `call` (a read) on a coordinating node like [`StoreNodes::call`],
    /// and hedges: when the node has answered nothing (to this call or any other) for the hedge
    /// delay since the call was sent, the call goes to the next candidate too, and the first
    /// answer wins (at most two nodes at once; a transport-level failure moves on at once, up
    /// to `tries` nodes in all). A busy node that answers other calls is not hedged, so a long
    /// query does not run twice under load.
    pub async fn call_hedged<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(StoreNodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        /// Calls in flight at once: one, and one hedge.
        const MAX_RUNNING: usize = 2;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let nodes = self.order(start);
        if nodes.is_empty() {
            return Err(StoreError::NoNodes);
        }
        let mut candidates = nodes.into_iter().take(self.tries);
        let mut running = futures::stream::FuturesUnordered::new();
        // The latest call sent: to whom and when.
        let mut newest: Option<(String, Instant)> = None;
        let mut last = Status::unavailable("no store node tried");
        let launch = |addr: String| {
            let channel = self.channel(&addr);
            let sent = channel.is_ok().then(|| self.sent(&addr));
            let call = channel.map(|c| call(self.client_of(c)));
            let fut = async move {
                let result = match call {
                    Ok(fut) => fut.await,
                    Err(status) => Err(status),
                };
                (addr, result)
            };
            (fut, sent)
        };
        loop {
            if running.is_empty() {
                match candidates.next() {
                    Some(addr) => {
                        let (fut, sent) = launch(addr.clone());
                        newest = sent.map(|at| (addr, at));
                        running.push(fut);
                    }
                    None => return Err(StoreError::Status(last)),
                }
            }
            let hedge_at = newest
                .as_ref()
                .filter(|_| running.len() < MAX_RUNNING && !self.hedge_delay.is_zero())
                .map(|(_, at)| *at + self.hedge_delay);
            let hedge = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((addr, result)) = futures::StreamExt::next(&mut running) => match result {
                    Ok(v) => {
                        self.answered(&addr);
                        return Ok(v);
                    }
                    Err(status) if retryable(status.code()) => {
                        self.failovers.fetch_add(1, Ordering::Relaxed);
                        self.penalize(&addr);
                        tracing::debug!(node = %addr, code = ?status.code(), "store node call failed, trying another");
                        last = status;
                        if let Some(next) = candidates.next() {
                            let (fut, sent) = launch(next.clone());
                            newest = sent.map(|at| (next, at));
                            running.push(fut);
                        }
                    }
                    // The other call may still answer (a hedged node's connection can break
                    // when the node resumes): a read is idempotent, so wait for it.
                    Err(status) if !running.is_empty() => {
                        self.answered(&addr);
                        last = status;
                    }
                    Err(status) => {
                        self.answered(&addr);
                        return Err(StoreError::Status(status));
                    }
                },
                () = hedge => {
                    let (addr, at) = newest.clone().expect("a hedge waits on a call");
                    if self.silent_since(&addr, at) {
                        // Last of its tier for a while, like a node that failed a call.
                        self.penalize(&addr);
                        if let Some(next) = candidates.next() {
                            self.failovers.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(node = %addr, "store node silent, hedging on another");
                            let (fut, sent) = launch(next.clone());
                            newest = sent.map(|at| (next, at));
                            running.push(fut);
                        } else {
                            newest = None;
                        }
                    } else {
                        // It answered something since: alive. Look again a delay later.
                        newest = Some((addr, Instant::now()));
                    }
                }
            }
        }
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
    // `ResourceExhausted`: the node shed the request (its places for clients are all taken).
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::ResourceExhausted
    )
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
        let store = StoreNodes::new(3, Arc::default(), Link::open());
        assert!(!store.has_nodes());
        let r = store.call(|_c| async { Ok::<u32, Status>(1) }).await;
        assert!(matches!(r, Err(StoreError::NoNodes)));
    }

    #[tokio::test]
    async fn calls_fail_over_on_unavailable_and_stop_on_other_errors() {
        let store = StoreNodes::new(2, Arc::default(), Link::open());
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

    #[tokio::test]
    async fn a_read_on_a_silent_node_is_hedged_and_the_node_goes_last() {
        let store = StoreNodes::new(3, Arc::default(), Link::open())
            .with_hedge_delay(Duration::from_millis(20));
        store.set_nodes_for_test(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        let tried = AtomicUsize::new(0);
        let started = Instant::now();
        let r = store
            .call_hedged(|_c| {
                let n = tried.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        // A frozen node: no answer, no failure.
                        std::future::pending::<()>().await;
                    }
                    Ok::<usize, Status>(n)
                }
            })
            .await;
        assert!(matches!(r, Ok(1)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The silent node is tried last now, whatever the rotation.
        let silent = store.order(0)[1].clone();
        assert_eq!(store.order(0).last(), Some(&silent));
        assert_eq!(store.order(1).last(), Some(&silent));
    }

    #[tokio::test]
    async fn a_busy_node_that_answers_other_calls_is_not_hedged() {
        let store = StoreNodes::new(3, Arc::default(), Link::open())
            .with_hedge_delay(Duration::from_millis(30));
        store.set_nodes_for_test(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        let tried = AtomicUsize::new(0);
        let slow = store.call_hedged(|_c| {
            tried.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<u32, Status>(1)
            }
        });
        let others = async {
            // Calls alternate between the nodes: each answers every 10 ms.
            for _ in 0..24 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                store
                    .call(|_c| async { Ok::<u32, Status>(2) })
                    .await
                    .unwrap();
            }
        };
        let (r, ()) = tokio::join!(slow, others);
        assert!(matches!(r, Ok(1)));
        assert_eq!(
            tried.load(Ordering::SeqCst),
            1,
            "one node: nothing to hedge on"
        );
    }

    #[test]
    fn nodes_of_both_configurations_come_first_and_failed_nodes_last_of_their_tier() {
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

        let store = StoreNodes::new(4, Arc::default(), Link::open());
        store.set_pair(pair);
        assert_eq!(store.order(1), ["n2", "n1", "n4", "n3"]);
        // A node that failed goes last of its tier: a node of both configurations still comes
        // before one that is leaving (which may no longer serve).
        store.penalize("n2");
        assert_eq!(store.order(1), ["n1", "n2", "n4", "n3"]);
        store.penalize("n4");
        assert_eq!(store.order(1), ["n1", "n2", "n3", "n4"]);
    }
}
