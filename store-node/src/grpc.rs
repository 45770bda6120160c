//! The `StoreNode` gRPC service: gossip in, replica sub-reads from local storage, and reads
//! coordinated across partitions at one read timestamp. Collection queries and replica scans
//! are in [`query`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_core::{
    ClusterConfig, DocKey, Epoch, Gossip, Heard, Interval, KeyHash, KeyLimits, NodeId, PartitionId,
    ReadTimestamp, Timestamp,
};
use causeway_proto::link::{Caller, Channel, Link, Role};
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use futures::StreamExt;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::state::{lock, Shared};
use crate::storage;

mod query;

/// A channel to peer `node` at `addr` over `link` that connects on first use and reconnects
/// after failures.
pub fn lazy_channel(link: &Link, node: NodeId, addr: &str) -> Result<Channel, InvalidAddr> {
    Ok(link.channel(endpoint(link, node, addr)?.connect_lazy()))
}

/// A peer's address that is not a valid URI. The config manager refuses such an address at
/// registration; a node still never trusts that it did.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid node address {0:?}")]
pub struct InvalidAddr(pub String);

/// The endpoint of peer `node`'s gRPC server at `addr` over `link`.
pub fn endpoint(link: &Link, node: NodeId, addr: &str) -> Result<Endpoint, InvalidAddr> {
    Ok(link
        .endpoint(addr, Role::StoreNode(node.0))
        .map_err(|_| InvalidAddr(addr.to_owned()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true))
}

pub fn gossip_to_proto(g: &Gossip) -> pb::GossipMessage {
    pb::GossipMessage {
        node_id: g.node.0,
        incarnation: g.incarnation,
        seq: g.seq,
        committed: g.committed.get(),
        current_epoch: g.current_epoch.get(),
        next_epoch: g.next_epoch.map(Epoch::get),
        backfilled: g.backfilled,
        routing_epoch: g.routing_epoch.get(),
        ust: g.ust.get(),
        lowest_read: g.lowest_read.map(read_ts_to_proto),
    }
}

fn gossip_from_proto(m: pb::GossipMessage) -> Gossip {
    Gossip {
        node: NodeId(m.node_id),
        incarnation: m.incarnation,
        seq: m.seq,
        committed: Timestamp(m.committed),
        current_epoch: Epoch(m.current_epoch),
        next_epoch: m.next_epoch.map(Epoch),
        backfilled: m.backfilled,
        routing_epoch: Epoch(m.routing_epoch),
        ust: Timestamp(m.ust),
        lowest_read: m.lowest_read.map(read_ts_from_proto),
    }
}

pub fn read_ts_to_proto(r: ReadTimestamp) -> pb::ReadTs {
    pb::ReadTs {
        epoch: r.epoch.get(),
        ts: r.ts.get(),
    }
}

pub fn read_ts_from_proto(r: pb::ReadTs) -> ReadTimestamp {
    ReadTimestamp::new(Epoch(r.epoch), Timestamp(r.ts))
}

const SNAPSHOT_TOO_OLD: &str = "snapshot too old";

pub(crate) fn storage_status(e: storage::Error) -> Status {
    match e {
        storage::Error::SnapshotTooOld { requested, gc } => Status::failed_precondition(format!(
            "{SNAPSHOT_TOO_OLD}: read at {requested} is below the GC timestamp {gc}"
        )),
        storage::Error::NotYetApplied { requested, applied } => Status::unavailable(format!(
            "not yet applied: read at {requested}, applied up to {applied}"
        )),
        storage::Error::InvalidCursor(c) => {
            Status::invalid_argument(format!("the scan position does not belong to {c:?}"))
        }
        e => Status::internal(format!("storage: {e}")),
    }
}

pub(crate) fn is_too_old(s: &Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with(SNAPSHOT_TOO_OLD)
}

/// When a sub-read to a slow peer is also sent to the partition's next replica.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hedge {
    /// After the hedge delay (point reads: cheap to run twice).
    Always,
    /// After the hedge delay, if the peer has sent no gossip since it was asked.
    WhenSilent,
}

/// Why one coordinated attempt did not complete.
pub(crate) enum Attempt {
    /// Some replica had already pruned the snapshot: retry at a fresh timestamp.
    TooOld,
    Failed(Status),
}

impl From<Status> for Attempt {
    fn from(s: Status) -> Attempt {
        if is_too_old(&s) {
            Attempt::TooOld
        } else {
            Attempt::Failed(s)
        }
    }
}

/// The gRPC server of one node.
/// A peer's gRPC client, with the address it was made for.
type PeerClients = HashMap<NodeId, (String, StoreNodeClient<Channel>)>;

#[derive(Debug, Clone)]
pub struct Server {
    pub(crate) shared: Arc<Shared>,
    clients: Arc<Mutex<PeerClients>>,
    /// Places for coordinated reads, queries and UST waits (`tuning.max_concurrent_requests`).
    /// Only requests of clients take one: gossip, sub-reads, votes and backfill never queue
    /// behind them, so a busy node neither looks dead nor deadlocks with its peers.
    coordinating: Arc<tokio::sync::Semaphore>,
}

impl Server {
    pub fn new(shared: Arc<Shared>) -> Server {
        Server {
            coordinating: Arc::new(tokio::sync::Semaphore::new(
                shared.tuning.max_concurrent_requests,
            )),
            shared,
            clients: Arc::default(),
        }
    }

    fn client(
        &self,
        node: NodeId,
        config: &ClusterConfig,
    ) -> Result<StoreNodeClient<Channel>, Status> {
        let addr = &config
            .nodes
            .get(&node)
            .ok_or_else(|| Status::internal(format!("{node} has no address")))?
            .addr;
        let mut clients = lock(&self.clients);
        if clients.get(&node).is_none_or(|(a, _)| a != addr) {
            let channel = lazy_channel(&self.shared.link, node, addr)
                .map_err(|e| Status::internal(e.to_string()))?;
            let client = StoreNodeClient::new(channel)
                .max_decoding_message_size(self.shared.tuning.max_message_bytes)
                .max_encoding_message_size(self.shared.tuning.max_message_bytes);
            clients.insert(node, (addr.clone(), client));
        }
        Ok(clients[&node].1.clone())
    }

    /// A place for a client's request, or `ResourceExhausted` at once when all are taken (load
    /// shedding: the caller tries another node or later).
    fn coordinate(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.coordinating)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{} requests in flight on this node (tuning.max_concurrent_requests)",
                    self.shared.tuning.max_concurrent_requests
                ))
            })
    }

    /// When (in the node's clock) `node`'s gossip last arrived.
    fn heard_at_ms(&self, node: NodeId) -> Option<u64> {
        lock(&self.shared.protocol).table.heard_at_ms(node)
    }

    pub(crate) fn timeout(&self, requested_ms: u32) -> Duration {
        let ceiling = self.shared.tuning.read_timeout_ms;
        let ms = if requested_ms == 0 {
            ceiling
        } else {
            u64::from(requested_ms).min(ceiling)
        };
        Duration::from_millis(ms)
    }

    /// Waits (until `deadline`) until this node can coordinate and its UST is at least
    /// `min_ts`; returns the read timestamp and its configuration.
    pub(crate) async fn read_timestamp(
        &self,
        min_ts: Timestamp,
        deadline: Instant,
    ) -> Result<(ReadTimestamp, Arc<ClusterConfig>), Status> {
        let mut rx = self.shared.decided.subscribe();
        let waited = tokio::time::timeout_at(
            deadline.into(),
            rx.wait_for(|d| d.decisions.can_coordinate && d.decisions.ust >= min_ts),
        )
        .await;
        let decided = match waited {
            Ok(Ok(d)) => *d,
            Ok(Err(_)) => return Err(Status::unavailable("the node is shutting down")),
            Err(_) => {
                let d = self.shared.decided();
                return Err(if d.decisions.can_coordinate {
                    Status::deadline_exceeded(format!(
                        "the UST ({}) did not reach {min_ts} in time",
                        d.decisions.ust
                    ))
                } else {
                    Status::unavailable("this node cannot coordinate reads yet")
                });
            }
        };
        let at = ReadTimestamp::new(decided.decisions.routing_epoch, decided.decisions.ust);
        let config = self.shared.configs().at(at.epoch).cloned().ok_or_else(|| {
            Status::unavailable(format!("configuration {} is not known here", at.epoch))
        })?;
        Ok((at, config))
    }

    /// Registers a read at `at` (it then holds the GC timestamp), and only then checks that the
    /// GC timestamp has not passed it: one chosen before could be passed before it registers.
    fn hold_read(&self, at: ReadTimestamp) -> Result<crate::state::ReadGuard, Status> {
        let held = self.shared.reads.register(at);
        let gc = self
            .shared
            .decided()
            .decisions
            .gc
            .max(self.shared.store.gc_watermark());
        if at.ts < gc {
            return Err(storage_status(storage::Error::SnapshotTooOld {
                requested: at.ts,
                gc,
            }));
        }
        Ok(held)
    }

    /// [`Self::read_timestamp`], registered as a read ([`Self::hold_read`]): chosen again, up
    /// to a few times, if the GC timestamp passed it before it was registered (the UST moved
    /// on meanwhile, and the GC timestamp never passes the UST).
    async fn held_read_timestamp(
        &self,
        min_ts: Timestamp,
        deadline: Instant,
    ) -> Result<(ReadTimestamp, Arc<ClusterConfig>, crate::state::ReadGuard), Status> {
        let mut attempts = 3;
        loop {
            let (at, config) = self.read_timestamp(min_ts, deadline).await?;
            match self.hold_read(at) {
                Ok(held) => return Ok((at, config, held)),
                Err(passed) if attempts == 1 => return Err(passed),
                Err(_) => attempts -= 1,
            }
        }
    }

    /// The replicas to try for each partition: this node first, peers whose gossip has gone
    /// quiet last.
    ///
    /// The read timestamp may come from a peer's UST view (views are shared so that no node
    /// lags its peers), computed from gossip this node has not received yet: then the replicas
    /// that committed it show up here within a few gossip intervals, and this waits for them
    /// (bounded) rather than failing the read.
    pub(crate) async fn replicas(
        &self,
        config: &ClusterConfig,
        at: ReadTimestamp,
    ) -> Result<BTreeMap<PartitionId, Vec<NodeId>>, Status> {
        let tuning = &self.shared.tuning;
        let patience = Duration::from_millis((tuning.gossip_interval_ms * 10).clamp(20, 250));
        let until = Instant::now() + patience;
        let mut readable = loop {
            match self.shared.readable(config, at) {
                Ok(r) => break r,
                Err(p) if Instant::now() >= until => {
                    return Err(Status::unavailable(format!(
                        "no live replica of {p} has committed {}",
                        at.ts
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let now = self.shared.now_ms();
        // A peer whose gossip stopped (paused, cut off, dying) is asked last: it still counts
        // until the liveness timeout, but a read should not wait for it meanwhile.
        let quiet_ms = (tuning.gossip_interval_ms * 4).max(tuning.sub_read_hedge_ms);
        let quiet = |n: NodeId| {
            n != self.shared.node
                && self
                    .heard_at_ms(n)
                    .is_none_or(|h| now.saturating_sub(h) > quiet_ms)
        };
        for nodes in readable.values_mut() {
            let len = nodes.len();
            nodes.rotate_left(now as usize % len);
            if let Some(i) = nodes.iter().position(|&n| n == self.shared.node) {
                nodes.swap(0, i);
            }
            // Stable: the spread over the others stays.
            nodes.sort_by_key(|&n| quiet(n));
        }
        Ok(readable)
    }

    /// Reads `keys` (all of one partition) at `at` from the first replica that can serve them;
    /// point reads are cheap, so a slow peer is hedged after the hedge delay whatever its gossip.
    async fn get_from(
        &self,
        config: &ClusterConfig,
        replicas: &[NodeId],
        at: ReadTimestamp,
        keys: Vec<pb::DocumentKey>,
        with_automerge: bool,
    ) -> Result<Vec<pb::Document>, Attempt> {
        self.hedged(
            config,
            replicas,
            Hedge::Always,
            Duration::from_millis(self.shared.tuning.peer_rpc_timeout_ms),
            || local_get(&self.shared, at.ts, &keys, with_automerge),
            |mut client| {
                let request = pb::GetAtRequest {
                    at: Some(read_ts_to_proto(at)),
                    keys: keys.clone(),
                    with_automerge,
                };
                async move {
                    client
                        .get_at(request)
                        .await
                        .map(|r| r.into_inner().documents)
                }
            },
        )
        .await
    }

    /// One sub-read on the first of `replicas` that serves it: this node's storage through
    /// `local`, a peer through `remote` (bounded by the peer RPC timeout). A peer that goes
    /// silent in gossip while it is asked is hedged (see [`Server::hedged`]).
    pub(crate) async fn first_replica<T, L, LF, R, RF>(
        &self,
        config: &ClusterConfig,
        replicas: &[NodeId],
        local: L,
        remote: R,
    ) -> Result<T, Attempt>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Result<T, Status>>,
        R: Fn(StoreNodeClient<Channel>) -> RF,
        RF: std::future::Future<Output = Result<T, Status>>,
    {
        let timeout = Duration::from_millis(self.shared.tuning.peer_rpc_timeout_ms);
        self.hedged(config, replicas, Hedge::WhenSilent, timeout, local, remote)
            .await
    }

    /// One sub-read on `replicas` in order: this node's storage through `local`, a peer through
    /// `remote` (each bounded by `timeout`), the first answer winning. A failure tries the next
    /// replica at once; a peer that has not answered after `sub_read_hedge_ms` is hedged: the
    /// next replica is asked too, at once under [`Hedge::Always`], under [`Hedge::WhenSilent`]
    /// only while the peer has sent no gossip since it was asked (a paused or cut-off node,
    /// not a busy one: a scan is not run twice because it is long). This node's own storage is
    /// never hedged. A replica that has pruned the snapshot, or refuses the request as
    /// invalid, ends the attempt.
    async fn hedged<T, L, LF, R, RF>(
        &self,
        config: &ClusterConfig,
        replicas: &[NodeId],
        hedge: Hedge,
        timeout: Duration,
        local: L,
        remote: R,
    ) -> Result<T, Attempt>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Result<T, Status>>,
        R: Fn(StoreNodeClient<Channel>) -> RF,
        RF: std::future::Future<Output = Result<T, Status>>,
    {
        let me = self.shared.node;
        let start = |node: NodeId| {
            let local = (node == me).then(&local);
            let remote = (node != me).then(|| self.client(node, config).map(&remote));
            async move {
                let started = Instant::now();
                let result = match (local, remote) {
                    (Some(read), _) => read.await,
                    (None, Some(Ok(call))) => match tokio::time::timeout(timeout, call).await {
                        Ok(r) => r,
                        Err(_) => Err(Status::unavailable(format!(
                            "{node} did not answer in time"
                        ))),
                    },
                    (None, Some(Err(s))) => Err(s),
                    (None, None) => unreachable!("a replica is local or remote"),
                };
                (node, started, result)
            }
        };
        let tuning = &self.shared.tuning;
        let delay = Duration::from_millis(tuning.sub_read_hedge_ms);
        // With no replica left to hedge on, peers silent this long since they were asked are
        // given up: the coordinator retries at once with the replicas it then knows (the one
        // that had committed the read timestamp may be the one paused, its peer a few ms
        // behind), instead of waiting out the RPC timeout.
        let give_up_ms = (tuning.gossip_interval_ms * 10).max(tuning.sub_read_hedge_ms * 5);
        // The peers asked and not answered yet, with when (in the node's clock).
        let mut waiting: Vec<(NodeId, u64)> = Vec::new();
        let mut asked = replicas.iter().copied();
        let mut running = futures::stream::FuturesUnordered::new();
        // The latest replica asked, when it is a peer: (who, when in the node's clock).
        let mut newest: Option<(NodeId, u64)> = None;
        let mut hedge_at: Option<tokio::time::Instant> = None;
        let mut last = Status::unavailable("no replica answered");
        let mut ask = |running: &mut futures::stream::FuturesUnordered<_>,
                       newest: &mut Option<(NodeId, u64)>,
                       hedge_at: &mut Option<tokio::time::Instant>,
                       waiting: &mut Vec<(NodeId, u64)>|
         -> bool {
            let Some(node) = asked.next() else {
                *hedge_at = None;
                return false;
            };
            running.push(start(node));
            *newest = (node != me).then(|| (node, self.shared.now_ms()));
            waiting.extend(*newest);
            *hedge_at =
                (newest.is_some() && !delay.is_zero()).then(|| tokio::time::Instant::now() + delay);
            true
        };
        ask(&mut running, &mut newest, &mut hedge_at, &mut waiting);
        loop {
            if running.is_empty() && !ask(&mut running, &mut newest, &mut hedge_at, &mut waiting) {
                return Err(Attempt::Failed(last));
            }
            let hedge_timer = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((node, started, result)) = running.next() => {
                    waiting.retain(|(n, _)| *n != node);
                    self.shared
                        .metrics
                        .sub_read_seconds
                        .observe(started.elapsed());
                    match result {
                        Ok(v) => return Ok(v),
                        Err(s) if is_too_old(&s) => return Err(Attempt::TooOld),
                        Err(s) if s.code() == tonic::Code::InvalidArgument => {
                            return Err(Attempt::Failed(s))
                        }
                        Err(s) => {
                            last = s;
                            ask(&mut running, &mut newest, &mut hedge_at, &mut waiting);
                        }
                    }
                }
                () = hedge_timer => {
                    let (node, asked_ms) = newest.expect("a hedge waits on a peer");
                    let silent = |(n, at): &(NodeId, u64)| self.heard_at_ms(*n).is_none_or(|h| h < *at);
                    if (matches!(hedge, Hedge::Always) || silent(&(node, asked_ms)))
                        && ask(&mut running, &mut newest, &mut hedge_at, &mut waiting)
                    {
                        continue;
                    }
                    let now = self.shared.now_ms();
                    if running.len() == waiting.len()
                        && waiting
                            .iter()
                            .all(|w| silent(w) && now.saturating_sub(w.1) >= give_up_ms)
                    {
                        return Err(Attempt::Failed(Status::unavailable(format!(
                            "{node} went silent during a sub-read"
                        ))));
                    }
                    // Alive and busy (or not silent long enough): look again later.
                    newest = Some((node, asked_ms));
                    hedge_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
    }

    /// One attempt of a coordinated multi-get at `at`.
    async fn read_at(
        &self,
        config: &ClusterConfig,
        at: ReadTimestamp,
        keys: &[pb::DocumentKey],
        with_automerge: bool,
    ) -> Result<Vec<pb::Document>, Attempt> {
        let replicas = self.replicas(config, at).await?;
        let by_partition = by_partition(
            config,
            keys.iter().map(|k| (k.collection.as_str(), k.id.as_str())),
        );
        let reads = by_partition.iter().map(|(p, indexes)| {
            let part_keys: Vec<pb::DocumentKey> =
                indexes.iter().map(|&i| keys[i].clone()).collect();
            self.get_from(config, &replicas[p], at, part_keys, with_automerge)
        });
        let results = futures::future::join_all(reads).await;
        let mut out: Vec<Option<pb::Document>> = vec![None; keys.len()];
        for ((_, indexes), result) in by_partition.iter().zip(results) {
            for (&i, doc) in indexes.iter().zip(result?) {
                out[i] = Some(doc);
            }
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every key read"))
            .collect())
    }
}

/// What a coordinated read does after an attempt that failed: a snapshot pruned under it is
/// tried again at a fresh timestamp, up to `read_attempts`; a partition none of whose readable
/// replicas answered (one just died, and the others had not committed the read ts yet) is tried
/// again after a pause, while the deadline allows (the dead one leaves the readable set within
/// the liveness timeout, a lagging one catches up within milliseconds).
pub(crate) struct Retries {
    too_old_left: u32,
    failures: u32,
    deadline: Instant,
}

impl Retries {
    const PAUSE: Duration = Duration::from_millis(20);
    const MAX_FAILURES: u32 = 50;

    pub(crate) fn new(attempts: u32, deadline: Instant) -> Retries {
        Retries {
            too_old_left: attempts.max(1),
            failures: 0,
            deadline,
        }
    }

    /// `Ok` to try again (after the pause, if any); `Err` with the answer otherwise.
    pub(crate) async fn after(
        &mut self,
        attempt: Attempt,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(), Status> {
        match attempt {
            Attempt::TooOld => {
                metrics
                    .snapshot_too_old_retries_total
                    .fetch_add(1, Ordering::Relaxed);
                self.too_old_left -= 1;
                if self.too_old_left == 0 {
                    return Err(Status::unavailable(
                        "the snapshot was pruned on every attempt; retry",
                    ));
                }
                Ok(())
            }
            Attempt::Failed(status) => {
                self.failures += 1;
                let transient = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                );
                if !transient
                    || self.failures > Self::MAX_FAILURES
                    || Instant::now() + Self::PAUSE >= self.deadline
                {
                    return Err(status);
                }
                tokio::time::sleep(Self::PAUSE).await;
                Ok(())
            }
        }
    }
}

/// The indexes of `keys` by the partition of `config` that holds each.
pub(crate) fn by_partition<'a>(
    config: &ClusterConfig,
    keys: impl Iterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<PartitionId, Vec<usize>> {
    let mut out: BTreeMap<PartitionId, Vec<usize>> = BTreeMap::new();
    for (i, (collection, id)) in keys.enumerate() {
        out.entry(config.partition_of(KeyHash::of(collection, id)))
            .or_default()
            .push(i);
    }
    out
}

pub(crate) fn interval_to_proto(i: &Interval) -> pb::KeyInterval {
    pb::KeyInterval {
        start: i.start,
        end: i.end_hash(),
    }
}

pub(crate) fn interval_from_proto(i: &pb::KeyInterval) -> Result<Interval, Status> {
    let end = i.end.map_or(causeway_core::KEYSPACE, u128::from);
    if u128::from(i.start) >= end {
        return Err(Status::invalid_argument("empty interval"));
    }
    Ok(Interval::new(i.start, end))
}

fn document(collection: &str, id: &str, doc: Option<storage::Document>) -> pb::Document {
    match doc {
        Some(d) => pb::Document {
            collection: collection.to_owned(),
            id: id.to_owned(),
            found: true,
            json: serde_json::to_vec(&d.json).expect("json serializes"),
            automerge: Vec::new(),
            version_ts: d.version.get(),
        },
        None => pb::Document {
            collection: collection.to_owned(),
            id: id.to_owned(),
            found: false,
            ..pb::Document::default()
        },
    }
}

/// A sub-read from this node's own storage.
async fn local_get(
    shared: &Arc<Shared>,
    ts: Timestamp,
    keys: &[pb::DocumentKey],
    with_automerge: bool,
) -> Result<Vec<pb::Document>, Status> {
    let store = Arc::clone(&shared.store);
    let keys: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.collection.clone(), k.id.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let ids: Vec<(&str, &str)> = keys.iter().map(|(c, i)| (c.as_str(), i.as_str())).collect();
        let docs = store.multi_get(&ids, ts).map_err(storage_status)?;
        let mut out = Vec::with_capacity(docs.len());
        for ((c, i), d) in keys.iter().zip(docs) {
            let mut doc = document(c, i, d);
            if with_automerge && doc.found {
                doc.automerge = store
                    .get_automerge(c, i, ts)
                    .map_err(storage_status)?
                    .unwrap_or_default();
            }
            out.push(doc);
        }
        Ok(out)
    })
    .await
    .map_err(|e| Status::internal(format!("read task: {e}")))?
}

fn validate_keys(keys: &[pb::DocumentKey]) -> Result<(), Status> {
    for k in keys {
        parse_key(&k.collection, &k.id)?;
    }
    Ok(())
}

/// `collection`/`id` as a key, or `InvalidArgument` naming the start of each: a status message
/// travels in a header, and a long input echoed whole would make it larger than a client takes
/// (it resets the stream instead of reading the status).
pub(crate) fn parse_key(collection: &str, id: &str) -> Result<DocKey, Status> {
    DocKey::new(collection, id, &KeyLimits::default()).map_err(|e| {
        let start = |s: &str| s.chars().take(64).collect::<String>();
        Status::invalid_argument(format!("{}/{}: {e}", start(collection), start(id)))
    })
}

/// The stream of a snapshot hold: the read timestamp, then nothing until the hold ends; the
/// registered read goes with the stream.
type HoldStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::HoldSnapshotEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::store_node_server::StoreNode for Server {
    type HoldSnapshotStream = HoldStream;
    type BackfillStream = crate::backfill::ChunkStream;

    async fn backfill(
        &self,
        request: Request<pb::BackfillRequest>,
    ) -> Result<Response<Self::BackfillStream>, Status> {
        Caller::of(&request).check_role(|r| matches!(r, Role::StoreNode(_)), "Backfill")?;
        crate::backfill::serve(&self.shared, request.into_inner()).await
    }

    async fn veto_backfill(
        &self,
        request: Request<pb::VetoBackfillRequest>,
    ) -> Result<Response<pb::VetoBackfillResponse>, Status> {
        Caller::of(&request).check_role(|r| r == Role::ConfigManager, "VetoBackfill")?;
        crate::backfill::veto(&self.shared, Epoch(request.into_inner().epoch)).await
    }

    async fn hold_snapshot(
        &self,
        request: Request<pb::HoldSnapshotRequest>,
    ) -> Result<Response<HoldStream>, Status> {
        let caller = match Caller::of(&request).role {
            Some(role) => role.uri(),
            None => request
                .remote_addr()
                .map_or_else(String::new, |a| a.ip().to_string()),
        };
        let max = self.shared.tuning.max_holds_per_caller;
        let slot = self
            .shared
            .hold_callers
            .enter(caller.clone(), max)
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "{caller} holds {max} snapshots already (tuning.max_holds_per_caller)"
                ))
            })?;
        let req = request.into_inner();
        let deadline = Instant::now() + self.timeout(req.timeout_ms);
        let (at, held) = match req.at {
            None => {
                let (at, _, held) = self
                    .held_read_timestamp(Timestamp(req.min_ts), deadline)
                    .await?;
                (at, held)
            }
            Some(ts) => {
                // A hold of the GC timestamp, not a read: it does not hold back an install.
                // Registered before the check, so that the GC timestamp cannot pass it between.
                let decided = self.shared.decided();
                let at = ReadTimestamp::new(decided.decisions.routing_epoch, Timestamp(ts));
                let held = self.shared.reads.register_gc_hold(at.ts);
                let gc = decided.decisions.gc.max(self.shared.store.gc_watermark());
                if at.ts < gc {
                    return Err(storage_status(storage::Error::SnapshotTooOld {
                        requested: at.ts,
                        gc,
                    }));
                }
                (at, held)
            }
        };
        let max_hold = Duration::from_millis(
            req.max_hold_ms
                .clamp(1, self.shared.tuning.max_hold_ms.max(1)),
        );
        // A named hold may outlive its stream (see `hold`): the guard decides when it ends.
        let linger = Duration::from_millis(req.linger_ms.min(crate::hold::MAX_LINGER_MS));
        let owner = req.owner.chars().take(256).collect::<String>();
        let owner = crate::hold::owner_key(&caller, &owner);
        let held = self.shared.holds.opened(&owner, held, linger);
        let first = pb::HoldSnapshotEvent {
            at: Some(read_ts_to_proto(at)),
            hold_ms: max_hold.as_millis() as u64,
        };
        let stream = futures::stream::once(async move { Ok(first) }).chain(futures::stream::once(
            async move {
                tokio::time::sleep(max_hold).await;
                held.release();
                drop(slot);
                Err(Status::deadline_exceeded(
                    "the snapshot hold reached its maximum duration",
                ))
            },
        ));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn gossip(
        &self,
        request: Request<pb::GossipMessage>,
    ) -> Result<Response<pb::GossipAck>, Status> {
        // Under mutual TLS, a node gossips as itself only.
        Caller::of(&request).check_store_node(request.get_ref().node_id)?;
        let heard = self.shared.observe(gossip_from_proto(request.into_inner()));
        if heard == Heard::Stranger {
            self.shared
                .metrics
                .gossip_strangers
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(pb::GossipAck {}))
    }

    async fn get_at(
        &self,
        request: Request<pb::GetAtRequest>,
    ) -> Result<Response<pb::GetAtResponse>, Status> {
        let req = request.into_inner();
        validate_keys(&req.keys)?;
        let at = req
            .at
            .ok_or_else(|| Status::invalid_argument("missing read timestamp"))?;
        let started = Instant::now();
        let documents = local_get(
            &self.shared,
            Timestamp(at.ts),
            &req.keys,
            req.with_automerge,
        )
        .await?;
        self.shared
            .metrics
            .sub_read_seconds
            .observe(started.elapsed());
        Ok(Response::new(pb::GetAtResponse { documents }))
    }

    async fn scan_at(
        &self,
        request: Request<pb::ScanAtRequest>,
    ) -> Result<Response<pb::ScanAtResponse>, Status> {
        let req = request.into_inner();
        if req.at.is_none() {
            return Err(Status::invalid_argument("missing read timestamp"));
        }
        Ok(Response::new(query::local_scan(&self.shared, req).await?))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let _place = self.coordinate()?;
        let req = request.into_inner();
        validate_keys(&req.keys)?;
        let started = Instant::now();
        let deadline = started + self.timeout(req.timeout_ms);
        let mut retries = Retries::new(self.shared.tuning.read_attempts, deadline);
        loop {
            let (at, config, _held) = self
                .held_read_timestamp(Timestamp(req.min_ts), deadline)
                .await?;
            match self
                .read_at(&config, at, &req.keys, req.with_automerge)
                .await
            {
                Ok(documents) => {
                    self.shared.metrics.read_seconds.observe(started.elapsed());
                    return Ok(Response::new(pb::ReadResponse {
                        at: Some(read_ts_to_proto(at)),
                        documents,
                    }));
                }
                Err(attempt) => retries.after(attempt, &self.shared.metrics).await?,
            }
        }
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let _place = self.coordinate()?;
        self.query_page(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn digest(
        &self,
        request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let req = request.into_inner();
        let intervals: Vec<Interval> = req
            .intervals
            .iter()
            .map(interval_from_proto)
            .collect::<Result<_, _>>()?;
        if intervals.len() > 4096 {
            return Err(Status::invalid_argument(
                "at most 4096 intervals per digest request",
            ));
        }
        let ts = Timestamp(req.ts);
        let store = Arc::clone(&self.shared.store);
        let committed = store.committed();
        if ts > committed {
            return Err(Status::unavailable(format!(
                "not yet applied: digest at {ts}, committed up to {committed}"
            )));
        }
        let digests = tokio::task::spawn_blocking(move || {
            intervals
                .iter()
                .map(|i| store.digest(i, ts).map(|d| format!("{d:032x}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| Status::internal(format!("digest task: {e}")))?
        .map_err(storage_status)?;
        Ok(Response::new(pb::DigestResponse { digests }))
    }

    async fn outcome(
        &self,
        request: Request<pb::OutcomeRequest>,
    ) -> Result<Response<pb::OutcomeResponse>, Status> {
        crate::votes::answer(&self.shared, request.into_inner())
            .await
            .map(Response::new)
            .map_err(storage_status)
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        crate::changes::coordinate(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn changes_at(
        &self,
        request: Request<pb::ChangesAtRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        let req = request.into_inner();
        let at = req
            .at
            .ok_or_else(|| Status::invalid_argument("missing read timestamp"))?;
        let changes =
            crate::changes::local(&self.shared, Timestamp(at.ts), req.keys, req.with_before)
                .await?;
        Ok(Response::new(pb::ChangesResponse { changes }))
    }

    async fn wait_for_ust(
        &self,
        request: Request<pb::WaitForUstRequest>,
    ) -> Result<Response<pb::WaitForUstResponse>, Status> {
        let _place = self.coordinate()?;
        let req = request.into_inner();
        let deadline = Instant::now() + self.timeout(req.timeout_ms);
        let mut rx = self.shared.decided.subscribe();
        let want = Timestamp(req.ts);
        let _ = tokio::time::timeout_at(deadline.into(), rx.wait_for(|d| d.decisions.ust >= want))
            .await;
        let d = self.shared.decided();
        Ok(Response::new(pb::WaitForUstResponse {
            ust: Some(read_ts_to_proto(ReadTimestamp::new(
                d.decisions.routing_epoch,
                d.decisions.ust,
            ))),
            reached: d.decisions.ust >= want,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let s = &self.shared;
        let d = s.decided();
        let peers = s
            .peers()
            .into_iter()
            .map(|(g, alive, since)| pb::PeerStatus {
                node_id: g.node.0,
                committed: g.committed.get(),
                alive,
                routing_epoch: g.routing_epoch.get(),
                ust: g.ust.get(),
                since_heard_ms: since,
            })
            .collect();
        let phase = serde_json::to_value(d.decisions.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Ok(Response::new(pb::NodeStatus {
            node_id: s.node.0,
            incarnation: s.incarnation.load(Ordering::Relaxed),
            addr: s.addr.clone(),
            committed: s.store.committed().get(),
            ust: d.decisions.ust.get(),
            gc: d.decisions.gc.get(),
            current_epoch: d.current_epoch.get(),
            next_epoch: d.next_epoch.map(Epoch::get),
            routing_epoch: d.decisions.routing_epoch.get(),
            phase,
            log_next: s.log_next.load(Ordering::Relaxed),
            can_coordinate: d.decisions.can_coordinate,
            peers,
            backfill: crate::backfill::status(s),
            drained: s.drained.load(Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_address_that_is_no_uri_is_an_error_not_a_panic() {
        let link = Link::open();
        let n = NodeId(1);
        assert!(endpoint(&link, n, "127.0.0.1:7401").is_ok());
        assert!(endpoint(&link, n, "https://node-0.store.svc:7401").is_ok());
        let bad = endpoint(&link, n, "127.0.0.1:80|x").unwrap_err();
        assert_eq!(bad.to_string(), "invalid node address \"127.0.0.1:80|x\"");
        assert!(lazy_channel(&link, n, "[::1:80").is_err());
    }
}
