//! The store node service: registration and configuration watch, the apply loop, gossip, GC,
//! and the gRPC and admin servers, all stopped together by one shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use causeway_config_manager::Client as ConfigClient;
use causeway_core::{Epoch, NodeId, NodeInfo, Timestamp};
use causeway_proto::link::{Channel, Link};
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_proto::v1::store_node_server::StoreNodeServer;
use causeway_proto::v1::{Transaction, TRANSACTION_FORMAT_VERSION};
use causeway_txlog::TxLog;
use futures::StreamExt;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, instrument, warn};

use crate::metrics::{Gauges, Metrics};
use crate::options::Options;
use crate::state::{ActiveReads, Configs, Decided, Protocol, Shared};
use crate::storage::{RemoteVotes, Store};
use crate::votes::{self, VoteState};

/// Why the node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage")]
    Storage(#[from] crate::storage::Error),
    #[error("transaction log")]
    Log(#[from] causeway_txlog::Error),
    #[error("config manager")]
    ConfigManager(#[from] causeway_config_manager::Error),
    #[error("cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server")]
    Server(#[from] tonic::transport::Error),
    #[error("the node cannot apply the log: {0}")]
    Apply(String),
    #[error("security settings")]
    Link(#[from] causeway_proto::link::LinkError),
    #[error("{0}")]
    Options(&'static str),
}

/// A store node, bound and ready to run.
#[derive(Debug)]
pub struct Service {
    options: Options,
    shared: Arc<Shared>,
    log: TxLog,
    /// Whether the node opened the log itself (and so closes it when it stops).
    owns_log: bool,
    grpc: TcpListener,
    admin: Option<TcpListener>,
}

/// A cheap handle on a running node: its state, for tests, `causeway dev` and status.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Service {
    /// Opens the storage and the log and binds the servers; nothing runs until [`Service::run`].
    pub async fn bind(options: Options) -> Result<Service, Error> {
        let log = TxLog::open(options.log.clone()).await?;
        let mut service = Service::bind_with_log(options, log).await?;
        service.owns_log = true;
        Ok(service)
    }

    /// Like [`Service::bind`], with a log that is already open (`options.log` is not used):
    /// `causeway dev` shares one embedded log between all its components.
    pub async fn bind_with_log(options: Options, log: TxLog) -> Result<Service, Error> {
        options.tuning.check_server().map_err(Error::Options)?;
        let grpc = TcpListener::bind(options.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: options.listen,
                source,
            })?;
        let admin = match options.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let local = grpc.local_addr().map_err(|source| Error::Bind {
            addr: options.listen,
            source,
        })?;
        let link = Link::load(&options.security)?.without_admin_token();
        link.check_listen(local)?;
        link.check_own_role(causeway_proto::link::Role::StoreNode(options.node_id.0))?;
        let addr = options
            .advertise
            .clone()
            .unwrap_or_else(|| local.to_string());
        let store = {
            let dir = options.data_dir.clone();
            let store_options = options.store.clone();
            tokio::task::spawn_blocking(move || Store::open(dir, store_options))
                .await
                .expect("store open task")?
        };
        let shared = Arc::new(Shared {
            node: options.node_id,
            addr,
            link,
            tuning: options.tuning.clone(),
            store: Arc::new(store),
            started: Instant::now(),
            incarnation: AtomicU64::new(0),
            configs: watch::Sender::new(Configs::default()),
            protocol: Mutex::new(Protocol::default()),
            decided: watch::Sender::new(Decided::default()),
            reads: Arc::new(ActiveReads::default()),
            holds: Arc::new(crate::hold::Owners::with_per_caller(
                options.tuning.max_holds_per_caller,
            )),
            hold_callers: Arc::default(),
            log_next: AtomicU64::new(0),
            metrics: Metrics::default(),
            plan: Mutex::new(None),
            plan_writer: tokio::sync::Mutex::new(()),
            apply_gate: tokio::sync::Mutex::new(()),
            backfill_holds: Mutex::new(Vec::new()),
            drained: AtomicBool::new(false),
            backfill_streams: Arc::new(tokio::sync::Semaphore::new(
                options.tuning.backfill_max_streams.max(1),
            )),
            votes: watch::Sender::new(crate::votes::VoteState::default()),
            committed_moved: tokio::sync::Notify::new(),
            applied_moved: tokio::sync::Notify::new(),
            peers_moved: tokio::sync::Notify::new(),
            log_end_wanted: tokio::sync::Notify::new(),
        });
        if let Some(configs) = Configs::saved(&shared.store).map_err(Error::Apply)? {
            info!(
                revision = configs.revision,
                "serving from the saved configurations until the config manager answers"
            );
            shared.configs.send_replace(configs);
        }
        crate::backfill::load(&shared)?;
        info!(node = %options.node_id, addr = %shared.addr, committed = %shared.store.committed(), "store node bound");
        Ok(Service {
            options,
            shared,
            log,
            owns_log: false,
            grpc,
            admin,
        })
    }

    /// The gRPC server's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener")
    }

    /// The admin server's bound address, if it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs the node until `shutdown` completes, then stops every task and syncs the store.
    #[instrument(skip_all, fields(node = %self.options.node_id))]
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Service {
            options,
            shared,
            log,
            owns_log,
            grpc,
            admin,
        } = self;
        let (stop_tx, stop) = watch::channel(false);
        let cm = ConfigClient::connect_lazy(&options.config_manager, &shared.link)?;
        let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
        tasks.spawn(membership(Arc::clone(&shared), cm.clone(), stop.clone()));
        tasks.spawn(apply_loop(Arc::clone(&shared), log.clone(), stop.clone()));
        tasks.spawn(sync_loop(Arc::clone(&shared), stop.clone()));
        tasks.spawn(gossip_loop(Arc::clone(&shared), cm, stop.clone()));
        tasks.spawn(gc_loop(Arc::clone(&shared), stop.clone()));
        tasks.spawn(log_end_loop(Arc::clone(&shared), log.clone(), stop.clone()));
        tasks.spawn(crate::backfill::transition_loop(
            Arc::clone(&shared),
            log.clone(),
            stop.clone(),
        ));
        let server = crate::grpc::Server::new(Arc::clone(&shared));
        let incoming = causeway_proto::incoming(
            grpc,
            options.tuning.max_connections,
            Duration::from_millis(options.tuning.http2_keepalive_ms),
        );
        let mut grpc_stop = stop.clone();
        let tuning = &options.tuning;
        let mut builder = shared
            .link
            .server()?
            .concurrency_limit_per_connection(256)
            .http2_keepalive_interval(Some(Duration::from_millis(tuning.http2_keepalive_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(tuning.http2_keepalive_ms)));
        let service = StoreNodeServer::new(server)
            .max_decoding_message_size(tuning.max_message_bytes)
            .max_encoding_message_size(tuning.max_message_bytes);
        let service = tonic::service::interceptor::InterceptedService::new(
            service,
            shared.link.interceptor(),
        );
        tasks.spawn(async move {
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                })
                .await?;
            Ok(())
        });
        if let Some(admin) = admin {
            let mut admin_stop = stop.clone();
            let router = admin_router(Arc::clone(&shared));
            tasks.spawn(async move {
                axum::serve(
                    admin.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    }),
                    router,
                )
                .with_graceful_shutdown(async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| Error::Apply(format!("admin server: {e}")))?;
                Ok(())
            });
        }

        let mut failure = None;
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => info!("shutting down"),
            Some(done) = tasks.join_next() => {
                match done {
                    Ok(Err(e)) => { error!(error = %e, "a node task failed; stopping"); failure = Some(e); }
                    Ok(Ok(())) => warn!("a node task ended; stopping"),
                    Err(e) => { error!(error = %e, "a node task panicked; stopping"); failure = Some(Error::Apply(e.to_string())); }
                }
            }
        }
        let _ = stop_tx.send(true);
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => match next {
                    None => break,
                    Some(Ok(Err(e))) if failure.is_none() => failure = Some(e),
                    Some(_) => {}
                },
                () = &mut deadline => {
                    warn!("tasks did not stop in time; aborting them");
                    tasks.abort_all();
                    break;
                }
            }
        }
        let store = Arc::clone(&shared.store);
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .expect("sync task")?;
        if owns_log {
            let _ = log.close().await;
        }
        info!(committed = %shared.store.committed(), "store node stopped");
        failure.map_or(Ok(()), Err)
    }
}

impl Handle {
    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The highest ts applied and fsynced.
    pub fn committed(&self) -> Timestamp {
        self.shared.store.committed()
    }

    /// The node's latest decisions (UST, GC, routing epoch, phase).
    pub fn decided(&self) -> Decided {
        self.shared.decided()
    }

    /// Waits until `f` holds for the node's decisions.
    pub async fn wait_decided(&self, f: impl Fn(&Decided) -> bool) {
        let mut rx = self.shared.decided.subscribe();
        let _ = rx.wait_for(|d| f(d)).await;
    }

    /// The storage engine, for digests and inspection.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// The configurations as this node knows them.
    pub fn configs(&self) -> Configs {
        self.shared.configs()
    }

    /// Prometheus text of the node's metrics.
    pub fn metrics(&self) -> String {
        render_metrics(&self.shared)
    }
}

/// Registers with the config manager (retrying until it answers), heartbeats, and follows its
/// configuration watch, reconnecting when the stream breaks.
async fn membership(
    shared: Arc<Shared>,
    cm: ConfigClient,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let me = NodeInfo {
        id: shared.node,
        addr: shared.addr.clone(),
    };
    let mut backoff = Duration::from_millis(50);
    let registration = loop {
        match cm.register(&me).await {
            Ok(r) => break r,
            Err(e) => {
                debug!(error = %e, "registration failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    shared
        .incarnation
        .store(registration.incarnation, Ordering::Relaxed);
    info!(incarnation = registration.incarnation, "registered");
    let interval = Duration::from_millis(registration.heartbeat_interval_ms.max(10));
    let heartbeat = {
        let shared = Arc::clone(&shared);
        let cm = cm.clone();
        let mut stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let incarnation = shared.incarnation.load(Ordering::Relaxed);
                if let Err(e) = cm.heartbeat(shared.node, incarnation).await {
                    if e.code() == tonic::Code::NotFound {
                        // The config manager restarted and forgot us: register again.
                        if let Ok(r) = cm
                            .register(&NodeInfo {
                                id: shared.node,
                                addr: shared.addr.clone(),
                            })
                            .await
                        {
                            shared.incarnation.store(r.incarnation, Ordering::Relaxed);
                        }
                    } else {
                        debug!(error = %e, "heartbeat failed");
                    }
                }
            }
        }
    };
    let watcher = async {
        let mut backoff = Duration::from_millis(50);
        loop {
            match cm.watch().await {
                Ok(mut w) => loop {
                    match w.next().await {
                        Ok(Some(pair)) => {
                            backoff = Duration::from_millis(50);
                            let configs = Configs {
                                revision: pair.revision,
                                current: pair.current.map(Arc::new),
                                next: pair.next.map(Arc::new),
                            };
                            if shared.configs.borrow().revision > configs.revision {
                                // A config manager that lost its state must not move us back.
                                warn!(
                                    revision = configs.revision,
                                    "the config manager offers an older revision; ignored"
                                );
                                continue;
                            }
                            let store = Arc::clone(&shared.store);
                            let saved = configs.clone();
                            tokio::task::spawn_blocking(move || saved.save(&store))
                                .await
                                .expect("save configs task")?;
                            info!(revision = configs.revision,
                                current = ?configs.current.as_ref().map(|c| c.epoch),
                                next = ?configs.next.as_ref().map(|c| c.epoch), "configuration");
                            shared.configs.send_replace(configs);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            debug!(error = %e, "configuration watch broke");
                            break;
                        }
                    }
                },
                Err(e) => debug!(error = %e, "cannot watch configurations"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        #[allow(unreachable_code)]
        Ok::<(), Error>(())
    };
    tokio::select! {
        () = heartbeat => Ok(()),
        r = watcher => r,
        _ = stop.wait_for(|s| *s) => Ok(()),
    }
}

/// Consumes the log from the applied position and applies it in groups: each group is one
/// WriteBatch with the new applied position, fsynced before the committed ts advances.
async fn apply_loop(
    shared: Arc<Shared>,
    log: TxLog,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let tuning = shared.tuning.clone();
    let mut backoff = Duration::from_millis(20);
    let mut askers = votes::Askers::default();
    // Votes and outcomes obtained from peers, kept across groups: one ask brings those of the
    // ts after the one asked for too.
    let mut remote = RemoteVotes::new();
    loop {
        // Only a node with something to store applies: one of the current configuration, or
        // one of next once its plan is made (it starts at the log's end).
        while !storing(&shared) {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        if let Ok(bounds) = log.bounds().await {
            shared
                .log_next
                .fetch_max(bounds.next.get(), Ordering::Relaxed);
            let applied = shared.store.applied();
            if bounds.next <= applied {
                error!(%applied, log_next = %bounds.next, "the log ends below this node's applied position: it is not the log this node applied (was the topic recreated?)");
                return Err(Error::Apply(format!(
                    "the log ends at {} but this node has applied up to {applied}",
                    bounds.next.get().saturating_sub(1)
                )));
            }
        }
        let from = shared.store.applied();
        let mut stream = log.read_from(from);
        debug!(%from, "reading the log");
        loop {
            let first = tokio::select! {
                r = stream.next() => r,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            let Some(first) = first else { break };
            // The first record, then whatever else is ready, up to the batch limits.
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut failed = None;
            let mut item = Some(first);
            while let Some(r) = item.take() {
                match r {
                    Ok(record) => {
                        bytes += record.payload.len();
                        batch.push((record.ts, decode(&record.payload, record.ts)));
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                if batch.len() >= tuning.apply_batch_records || bytes >= tuning.apply_batch_bytes {
                    break;
                }
                item = futures::FutureExt::now_or_never(stream.next()).flatten();
            }
            if let Some((last, _)) = batch.last() {
                shared.log_next.fetch_max(last.get() + 1, Ordering::Relaxed);
            }
            if !batch.is_empty() {
                let batch = Arc::new(batch);
                let count = batch.len() as u64;
                let mut committed = shared.store.committed();
                loop {
                    let outcome = {
                        let _gate = shared.apply_gate.lock().await;
                        let ownership = shared.ownership();
                        let store = Arc::clone(&shared.store);
                        let (records, votes) = (Arc::clone(&batch), remote.clone());
                        let started = Instant::now();
                        let outcome = tokio::task::spawn_blocking(move || {
                            store.apply_with_votes(&records, &ownership, &votes)
                        })
                        .await
                        .expect("apply task");
                        shared
                            .metrics
                            .apply_batch_seconds
                            .observe(started.elapsed());
                        outcome
                    };
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(crate::storage::Error::UnsupportedFormat(v)) => {
                            error!(
                                format = v,
                                "the log holds a record format this build cannot apply"
                            );
                            return Err(Error::Apply(format!(
                                "unsupported transaction format {v}"
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let m = &shared.metrics;
                    m.apply_batches_total.fetch_add(1, Ordering::Relaxed);
                    m.skipped_mutations_total
                        .fetch_add(outcome.skipped.len() as u64, Ordering::Relaxed);
                    m.aborted_transactions_total
                        .fetch_add(outcome.aborted as u64, Ordering::Relaxed);
                    if shared.store.committed() > committed {
                        committed = shared.store.committed();
                        shared.committed_moved.notify_one();
                    }
                    let applied = shared.store.applied();
                    if applied > committed && !shared.store.options().sync_writes {
                        shared.applied_moved.notify_one();
                    }
                    remote.retain(|ts, _| *ts > applied);
                    shared.votes.send_replace(VoteState {
                        applied,
                        blocked: outcome.blocked.clone(),
                    });
                    let Some(blocked) = outcome.blocked else {
                        break;
                    };
                    m.vote_waits_total.fetch_add(1, Ordering::Relaxed);
                    let answered = tokio::select! {
                        got = votes::gather(&shared, &mut askers, &blocked, &mut remote) => got,
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    };
                    if !answered && shared.store.committed() < shared.store.applied() {
                        // The votes are slow to come: make what is applied count as committed.
                        let store = Arc::clone(&shared.store);
                        tokio::task::spawn_blocking(move || store.sync())
                            .await
                            .expect("sync task")?;
                        committed = shared.store.committed();
                        shared.committed_moved.notify_one();
                    }
                }
                shared
                    .metrics
                    .applied_records_total
                    .fetch_add(count, Ordering::Relaxed);
                backoff = Duration::from_millis(20);
            }
            if !storing(&shared) {
                info!("this node stores nothing any more: it stops applying the log");
                break;
            }
            if let Some(e) = failed {
                match e {
                    causeway_txlog::Error::Truncated { .. } => {
                        error!(error = %e, "the log was truncated below this node's applied position: it must be re-seeded by backfill");
                        return Err(e.into());
                    }
                    e => {
                        warn!(error = %e, "log read failed; reopening");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Makes what apply wrote durable when it does not fsync its groups itself
/// (`store.sync_writes` off; the apply loop wakes it only then): one fsync at a time, off the apply path, so the next group applies
/// while the previous one syncs; the committed ts (and with it the gossip) advances after each.
async fn sync_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
    loop {
        tokio::select! {
            () = shared.applied_moved.notified() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        if shared.store.committed() >= shared.store.applied() {
            continue;
        }
        let store = Arc::clone(&shared.store);
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .expect("sync task")?;
        shared.committed_moved.notify_one();
    }
}

/// Whether the node stores anything of the log now (see `apply_loop`).
fn storing(shared: &Shared) -> bool {
    let configs = shared.configs();
    let node = shared.node;
    if configs.current.as_ref().is_some_and(|c| c.contains(node)) {
        return true;
    }
    configs.transition().is_some_and(|next| {
        next.contains(node)
            && crate::state::lock(&shared.plan)
                .as_ref()
                .is_some_and(|p| p.epoch == next.epoch && !p.vetoed)
    })
}

/// A record that does not decode is the same bytes on every node, so every node treats it the
/// same way: as an empty transaction that only advances the applied position.
fn decode(payload: &[u8], ts: Timestamp) -> Transaction {
    Transaction::decode(payload).unwrap_or_else(|e| {
        error!(%ts, error = %e, "a log record does not decode; it is applied as empty");
        Transaction {
            format_version: TRANSACTION_FORMAT_VERSION,
            ..Transaction::default()
        }
    })
}

/// The least time between two steps of the frontiers: events closer than this share one
/// (at most five times the ticks' steps at the default interval).
const MIN_STEP: Duration = Duration::from_millis(2);

/// Every `gossip_interval_ms`, and when this node commits: steps the frontiers, sends this
/// node's gossip to every peer of current ∪ next, and declares install when the core says so.
async fn gossip_loop(
    shared: Arc<Shared>,
    cm: ConfigClient,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut peers = Peers::default();
    let mut tick = tokio::time::interval(Duration::from_millis(
        shared.tuning.gossip_interval_ms.max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let installing = Arc::new(AtomicBool::new(false));
    let mut last_step = Instant::now();
    loop {
        // Every tick, and whenever this node commits, it steps and sends; a peer's gossip makes
        // it step only (sending then would echo every message to every peer).
        let send = tokio::select! {
            _ = tick.tick() => true,
            () = shared.committed_moved.notified() => true,
            () = shared.peers_moved.notified() => false,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        // Events closer than MIN_STEP share one step.
        if let Some(wait) = MIN_STEP.checked_sub(last_step.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        last_step = Instant::now();
        let Some((gossip, decided)) = shared.step() else {
            continue;
        };
        let configs = shared.configs();
        let msg = crate::grpc::gossip_to_proto(&gossip);
        let peers_to_tell = if send {
            [&configs.current, &configs.next]
        } else {
            [&None, &None]
        };
        for config in peers_to_tell.into_iter().flatten() {
            for (&node, info) in &config.nodes {
                if node == shared.node {
                    continue;
                }
                let Some(peer) = peers.get(&shared.link, node, &info.addr) else {
                    continue;
                };
                if peer.in_flight.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let client = peer.client.clone();
                let in_flight = Arc::clone(&peer.in_flight);
                let shared = Arc::clone(&shared);
                let timeout = Duration::from_millis(shared.tuning.peer_rpc_timeout_ms);
                tokio::spawn(async move {
                    let mut client = client;
                    let sent = tokio::time::timeout(timeout, client.gossip(msg)).await;
                    let m = &shared.metrics;
                    match sent {
                        Ok(Ok(_)) => m.gossip_sent_total.fetch_add(1, Ordering::Relaxed),
                        _ => m.gossip_send_errors_total.fetch_add(1, Ordering::Relaxed),
                    };
                    in_flight.store(false, Ordering::Release);
                });
            }
        }
        if let Some(epoch) = decided.decisions.install {
            if !installing.swap(true, Ordering::AcqRel) {
                let cm = cm.clone();
                let installing = Arc::clone(&installing);
                tokio::spawn(async move {
                    match cm.complete_transition(epoch).await {
                        Ok(c) => info!(%epoch, installed = c.installed, "transition complete"),
                        Err(e) => warn!(%epoch, error = %e, "could not complete the transition"),
                    }
                    installing.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// gRPC clients of the peers, one lazily connected channel each, with a flag per peer so that
/// a slow peer has at most one gossip message in flight.
#[derive(Default)]
struct Peers {
    clients: std::collections::HashMap<NodeId, Peer>,
}

struct Peer {
    addr: String,
    client: StoreNodeClient<Channel>,
    in_flight: Arc<AtomicBool>,
}

impl Peers {
    /// The client of `node` and its in-flight flag, (re)connecting if its address changed;
    /// `None` (logged) for an address that is not a valid URI.
    fn get(&mut self, link: &Link, node: NodeId, addr: &str) -> Option<&Peer> {
        if self.clients.get(&node).is_none_or(|p| p.addr != addr) {
            let channel = match crate::grpc::lazy_channel(link, node, addr) {
                Ok(channel) => channel,
                Err(e) => {
                    warn!(%node, error = %e, "not gossiping to a peer");
                    return None;
                }
            };
            let peer = Peer {
                addr: addr.to_owned(),
                client: StoreNodeClient::new(channel),
                in_flight: Arc::new(AtomicBool::new(false)),
            };
            self.clients.insert(node, peer);
        }
        self.clients.get(&node)
    }
}

/// Looks at the log's end when a peer's gossip claimed more than this node had seen (see
/// [`Shared::observe`]), at most once a gossip interval: a peer ahead of this node is believed
/// within about one interval, so the UST does not fall further behind the log than gossip
/// makes it.
async fn log_end_loop(
    shared: Arc<Shared>,
    log: TxLog,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    loop {
        tokio::select! {
            () = shared.log_end_wanted.notified() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        match log.bounds().await {
            Ok(bounds) => {
                shared
                    .log_next
                    .fetch_max(bounds.next.get(), Ordering::Relaxed);
            }
            Err(e) => debug!(error = %e, "cannot read the log's end"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(shared.tuning.gossip_interval_ms)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Every `gc_interval_ms`: one bounded GC step up to the node's GC timestamp.
async fn gc_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
    let mut tick =
        tokio::time::interval(Duration::from_millis(shared.tuning.gc_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        // Never above what is durable here: reads and digests at the committed ts stay possible.
        let gc = shared.decided().decisions.gc.min(shared.store.committed());
        if gc == Timestamp::ZERO {
            continue;
        }
        let store = Arc::clone(&shared.store);
        let budget = shared.tuning.gc_step_budget;
        // Passes go on at the same target until complete; the watermark never goes back.
        let target = gc.max(store.gc_watermark());
        let below = Timestamp((store.applied().0).saturating_sub(shared.tuning.outcome_retention));
        let progress = tokio::task::spawn_blocking(move || {
            store.prune_outcomes(below)?;
            store.gc(target, budget)
        })
        .await
        .expect("gc task")?;
        shared
            .metrics
            .gc_pruned_versions_total
            .fetch_add(progress.pruned as u64, Ordering::Relaxed);
    }
}

fn render_metrics(shared: &Shared) -> String {
    let d = shared.decided();
    let peers = shared.peers();
    shared.metrics.render(&Gauges {
        committed_ts: shared.store.committed().get(),
        ust_ts: d.decisions.ust.get(),
        gc_ts: d.decisions.gc.get(),
        log_next_ts: shared.log_next.load(Ordering::Relaxed),
        current_epoch: d.current_epoch.get(),
        next_epoch: d.next_epoch.map_or(0, Epoch::get),
        routing_epoch: d.decisions.routing_epoch.get(),
        peers_alive: peers.iter().filter(|p| p.1).count() as u64,
        peers_known: peers.len() as u64,
        active_reads: shared.reads.count() as u64,
        cached_documents: shared.store.cached_documents() as u64,
    })
}

/// What `/readyz` answers.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    /// The node can coordinate reads.
    Ready,
    /// The node is in no configuration, current or next: nothing waits for it (a spare, or a
    /// node drained by a smaller shape). Ready too, so that an orchestrator counting unready
    /// nodes (a PodDisruptionBudget, a rolling update) is not held up by it.
    Spare,
    /// Not bootstrapped yet, or a node of a configuration that cannot coordinate reads yet
    /// (catching up, joining, not heard from every peer).
    NotReady,
}

fn readiness(decided: &Decided, configs: &Configs, node: NodeId) -> Readiness {
    if decided.decisions.can_coordinate && decided.current_epoch > Epoch::ZERO {
        return Readiness::Ready;
    }
    let Some(current) = &configs.current else {
        return Readiness::NotReady;
    };
    let in_next = configs.transition().is_some_and(|next| next.contains(node));
    if current.contains(node) || in_next {
        Readiness::NotReady
    } else {
        Readiness::Spare
    }
}

/// `/metrics`, `/healthz` (the process answers), `/readyz` (the node can coordinate reads, or
/// is a spare that nothing waits for).
fn admin_router(shared: Arc<Shared>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let metrics = Arc::clone(&shared);
    let ready = Arc::clone(&shared);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = Arc::clone(&metrics);
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        render_metrics(&shared),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let shared = Arc::clone(&ready);
                async move {
                    match readiness(&shared.decided(), &shared.configs(), shared.node) {
                        Readiness::Ready => (StatusCode::OK, "ready"),
                        Readiness::Spare => (StatusCode::OK, "spare"),
                        Readiness::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use causeway_core::ClusterConfig;

    use super::*;

    fn config(epoch: u64, ids: std::ops::Range<u64>) -> Arc<ClusterConfig> {
        let nodes: Vec<NodeInfo> = ids
            .map(|i| NodeInfo {
                id: NodeId(i),
                addr: format!("h:{i}"),
            })
            .collect();
        let mut c = ClusterConfig::bootstrap(1, nodes.len() as u32, &nodes).unwrap();
        c.epoch = Epoch(epoch);
        Arc::new(c)
    }

    #[test]
    fn ready_when_coordinating_and_a_spare_counts_as_ready() {
        let configs = |current: Option<Arc<ClusterConfig>>, next| Configs {
            revision: 1,
            current,
            next,
        };
        let waiting = Decided::default();
        let mut coordinating = Decided::default();
        coordinating.decisions.can_coordinate = true;
        coordinating.current_epoch = Epoch(1);
        let one = configs(Some(config(1, 0..2)), None);
        let n = |i| NodeId(i);

        assert_eq!(
            readiness(&waiting, &configs(None, None), n(0)),
            Readiness::NotReady
        );
        assert_eq!(readiness(&coordinating, &one, n(0)), Readiness::Ready);
        assert_eq!(
            readiness(&waiting, &one, n(1)),
            Readiness::NotReady,
            "catching up"
        );
        assert_eq!(readiness(&waiting, &one, n(5)), Readiness::Spare);
        let growing = configs(Some(config(1, 0..2)), Some(config(2, 0..3)));
        assert_eq!(
            readiness(&waiting, &growing, n(2)),
            Readiness::NotReady,
            "joining"
        );
        assert_eq!(readiness(&waiting, &growing, n(3)), Readiness::Spare);
        let shrinking = configs(Some(config(1, 0..3)), Some(config(2, 0..2)));
        assert_eq!(
            readiness(&waiting, &shrinking, n(2)),
            Readiness::NotReady,
            "draining"
        );
    }
}
