//! [`Store`]: the api-server's view of the store nodes. It follows the config manager's
//! (current, next) pair through a `Watch` stream, keeps one lazily connected tonic channel per
//! node address, and runs coordinated reads on a node of the routing configuration: during a
//! transition either epoch's nodes may coordinate, so the candidates are the live nodes of
//! current, then of next. A call that fails with a transport-level status (UNAVAILABLE,
//! UNKNOWN, CANCELLED) is retried on the next candidate, up to `store_tries` nodes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use causeway_config_manager::{Client as ConfigClient, ConfigPair};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::metrics::Metrics;

/// Connecting to a store node may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keepalive, so a dead node breaks its channel instead of hanging calls.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Backoff of the config watch after a failure: from the first to the last, doubling.
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

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
pub struct Store {
    /// Node addresses in preference order: live nodes of current, then of next.
    nodes: RwLock<Arc<Vec<String>>>,
    pair: RwLock<Option<ConfigPair>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Spreads coordination over the candidates.
    next: AtomicUsize,
    tries: usize,
    metrics: Arc<Metrics>,
}

impl Store {
    pub fn new(tries: usize, metrics: Arc<Metrics>) -> Store {
        Store {
            nodes: RwLock::new(Arc::new(Vec::new())),
            pair: RwLock::new(None),
            channels: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            tries,
            metrics,
        }
    }

    /// Installs a new (current, next) pair.
    pub fn set_pair(&self, pair: ConfigPair) {
        let mut addrs: Vec<String> = Vec::new();
        for config in pair.current.iter().chain(pair.next.iter()) {
            for id in config.live_node_ids() {
                if let Some(info) = config.nodes.get(&id) {
                    if !addrs.contains(&info.addr) {
                        addrs.push(info.addr.clone());
                    }
                }
            }
        }
        tracing::info!(
            revision = pair.revision,
            epoch = %pair.current_epoch(),
            nodes = addrs.len(),
            "routing configuration changed"
        );
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(addrs);
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

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
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
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        if nodes.is_empty() {
            return Err(StoreError::NoNodes);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = Status::unavailable("no store node tried");
        for i in 0..self.tries.min(nodes.len()) {
            let addr = &nodes[(start + i) % nodes.len()];
            let result = match self.channel(addr) {
                Ok(channel) => call(StoreNodeClient::new(channel)).await,
                Err(status) => Err(status),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(status) if retryable(status.code()) => {
                    self.metrics.store_failover();
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
                Ok::<(), causeway_config_manager::Error>(())
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

/// Statuses after which another node may do better.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_nodes_calls_fail_fast() {
        let store = Store::new(3, Arc::new(Metrics::default()));
        assert!(!store.has_nodes());
        let r = store.call(|_c| async { Ok::<u32, Status>(1) }).await;
        assert!(matches!(r, Err(StoreError::NoNodes)));
    }

    #[tokio::test]
    async fn calls_fail_over_on_unavailable_and_stop_on_other_errors() {
        let store = Store::new(2, Arc::new(Metrics::default()));
        *store.nodes.write().unwrap() = Arc::new(vec![
            "127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
            "127.0.0.1:3".into(),
        ]);
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
}
