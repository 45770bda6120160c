//! The config manager's [`Service`], its event loop, and the clonable [`Handle`].
//!
//! One event loop owns the state and the registry. Every call is a command on a bounded queue,
//! answered on a oneshot channel, so changes are applied one at a time, in order. A change is
//! written to disk (on the blocking pool) before it is acknowledged or published; the published
//! (current, next) pair sits in a `tokio::sync::watch` channel, so a watcher always sees the
//! latest pair and a slow one skips intermediate pairs instead of queueing them.
//!
//! Two calls also reach outside the process, and they do it in the [`Handle`], outside the event
//! loop, so heartbeats and registrations are served meanwhile:
//! - `abort_transition` asks the nodes of next that gain intervals for a veto (the loop answers
//!   whom to ask), then commits the abort with a compare-and-set on the proposal's revision;
//! - with a [`SpareNodes`] provider, a proposal short of spare nodes has it start the missing
//!   ones, waits until they register, and is made again.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use causeway_core::{ConfigError, Epoch, NodeId, NodeInfo};
use causeway_proto::link::{Link, Role};
use causeway_proto::v1::config_manager_server::ConfigManagerServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use crate::disk;
use crate::error::Error;
use crate::grpc::GrpcService;
use crate::options::Options;
use crate::peers::{GrpcVeto, SpareNodes, Veto, VetoAnswer};
use crate::registry::{NodeStatus, Registration, Registry};
use crate::state::{Completion, ConfigPair, HistoryEntry, State};

/// A bound, not yet running config manager: its state is loaded and validated and its listener
/// is bound, so [`Service::local_addr`] is known before [`Service::run`].
#[derive(Debug)]
pub struct Service {
    options: Options,
    link: Link,
    listener: TcpListener,
    local_addr: SocketAddr,
    state: State,
    commands: mpsc::Receiver<Command>,
    published: watch::Sender<ConfigPair>,
    handle: Handle,
}

/// A cheap clonable handle on a config manager: the published pair, subscriptions, and every
/// call the gRPC service offers, in process. Calls made before [`Service::run`] wait for it;
/// calls after the service stopped fail with [`Error::Stopped`].
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    published: watch::Receiver<ConfigPair>,
    peers: Arc<Peers>,
}

/// Who the handle asks outside the process.
#[derive(Debug, Clone)]
struct Peers {
    veto: Arc<dyn Veto>,
    spares: Option<Arc<dyn SpareNodes>>,
    spare_nodes_wait: Duration,
}

/// Whom to ask for a veto to abort one proposal.
#[derive(Debug, Clone)]
struct AbortPlan {
    epoch: Epoch,
    /// The revision of the pair when the nodes were chosen: the abort is made only if nothing
    /// changed since (a node marked failed meanwhile could let the others switch routing).
    revision: u64,
    /// Live, not failed nodes of next that gain intervals, in node-id order.
    ask: Vec<NodeInfo>,
    /// Nodes that gain intervals but cannot be asked (not live), with why.
    unasked: Vec<(NodeId, VetoAnswer)>,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

#[derive(Debug)]
enum Command {
    Register(NodeInfo, Reply<Registration>),
    Heartbeat(NodeId, u64, Reply<u64>),
    Bootstrap(u32, u32, Reply<ConfigPair>),
    ProposeShape(u32, u32, Reply<ConfigPair>),
    MarkFailed(NodeId, Reply<ConfigPair>),
    /// `None`: the lowest-id free live node.
    ReplaceNode(NodeId, Option<NodeId>, Reply<ConfigPair>),
    CompleteTransition(Epoch, Reply<Completion>),
    PrepareAbort(Epoch, Reply<AbortPlan>),
    CommitAbort(AbortPlan, Reply<ConfigPair>),
    /// How many registered live nodes are in no configuration.
    FreeNodes(Reply<usize>),
    ListNodes(Reply<Vec<NodeStatus>>),
    History(Reply<Vec<HistoryEntry>>),
}

impl Service {
    /// Loads and validates the state in `options.data_dir` and binds `options.listen_addr`.
    pub async fn bind(options: Options) -> Result<Service, Error> {
        options.validate()?;
        let link = Link::load(&options.security)?;
        let dir = options.data_dir.clone();
        let state = tokio::task::spawn_blocking(move || disk::load(&dir))
            .await
            .expect("loading the state does not panic")?;
        let listener = TcpListener::bind(options.listen_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: options.listen_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: options.listen_addr,
            source,
        })?;
        link.check_listen(local_addr)?;
        link.check_own_role(Role::ConfigManager)?;
        let (commands_tx, commands) = mpsc::channel(options.command_queue_capacity);
        let (published, published_rx) = watch::channel(state.pair());
        tracing::info!(
            addr = %local_addr,
            data_dir = %options.data_dir.display(),
            revision = state.revision,
            epoch = %state.pair().current_epoch(),
            next_epoch = ?state.pair().next_epoch(),
            "config manager bound"
        );
        let peers = Arc::new(Peers {
            veto: Arc::new(GrpcVeto {
                timeout: Duration::from_millis(options.veto_timeout_ms),
                link: link.without_admin_token(),
            }),
            spares: None,
            spare_nodes_wait: Duration::from_millis(options.spare_nodes_wait_ms),
        });
        Ok(Service {
            options,
            link,
            listener,
            local_addr,
            state,
            commands,
            published,
            handle: Handle {
                commands: commands_tx,
                published: published_rx,
                peers,
            },
        })
    }

    /// Lets proposals short of spare nodes have `provider` start them. Handles taken before
    /// this call do not use it: set it up before taking any.
    pub fn with_spare_nodes(mut self, provider: Arc<dyn SpareNodes>) -> Service {
        let mut peers = (*self.handle.peers).clone();
        peers.spares = Some(provider);
        self.handle.peers = Arc::new(peers);
        self
    }

    /// Asks store nodes for vetoes with `veto` instead of over gRPC (for tests). Handles taken
    /// before this call do not use it.
    pub fn with_veto(mut self, veto: Arc<dyn Veto>) -> Service {
        let mut peers = (*self.handle.peers).clone();
        peers.veto = veto;
        self.handle.peers = Arc::new(peers);
        self
    }

    /// The address the gRPC server listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle on this config manager.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves gRPC until `shutdown` completes, then stops: the event loop ends, open `Watch`
    /// streams end, and in-flight calls finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Service {
            options,
            link,
            listener,
            local_addr,
            state,
            commands,
            published,
            handle,
        } = self;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let event_loop = EventLoop {
            registry: Registry::new(
                Duration::from_millis(options.heartbeat_timeout_ms),
                options.max_nodes,
            ),
            data_dir: options.data_dir.clone(),
            options: options.clone(),
            state,
            published,
        };
        let loop_task = tokio::spawn(event_loop.run(commands, stop_rx));

        let grpc = GrpcService::new(
            handle,
            Arc::new(Semaphore::new(options.max_watchers)),
            options.max_watchers,
        );
        let incoming = causeway_proto::incoming(
            listener,
            options.max_connections,
            Duration::from_millis(options.http2_keepalive_interval_ms),
        );
        let served = link
            .server()?
            .http2_keepalive_interval(Some(Duration::from_millis(
                options.http2_keepalive_interval_ms,
            )))
            .http2_keepalive_timeout(Some(Duration::from_millis(
                options.http2_keepalive_interval_ms,
            )))
            .concurrency_limit_per_connection(options.max_concurrent_requests_per_connection)
            .add_service(ConfigManagerServer::with_interceptor(
                grpc,
                link.interceptor(),
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!(addr = %local_addr, "config manager shutting down");
                // Ends the event loop, which drops the watch sender and so ends every Watch
                // stream: the server's graceful shutdown would otherwise wait for them forever.
                let _ = stop_tx.send(());
            })
            .await;
        // If the server failed, `stop_tx` is dropped, which also ends the loop.
        loop_task.await.expect("the event loop does not panic");
        tracing::info!(addr = %local_addr, "config manager stopped");
        served.map_err(Error::Serve)
    }
}

impl Handle {
    /// The (current, next) pair as published now.
    pub fn pair(&self) -> ConfigPair {
        self.published.borrow().clone()
    }

    /// A receiver of the published pair: it holds the pair as it is now and sees each change;
    /// one that falls behind sees only the latest. It starts marked changed, so a first
    /// `changed()` returns at once. It closes when the service stops.
    pub fn subscribe(&self) -> watch::Receiver<ConfigPair> {
        let mut rx = self.published.clone();
        rx.mark_changed();
        rx
    }

    /// Registers a node (see the `Register` rpc).
    pub async fn register(&self, node: NodeInfo) -> Result<Registration, Error> {
        self.call(|r| Command::Register(node, r)).await
    }

    /// Records a heartbeat; answers the revision of the pair.
    pub async fn heartbeat(&self, node: NodeId, incarnation: u64) -> Result<u64, Error> {
        self.call(|r| Command::Heartbeat(node, incarnation, r))
            .await
    }

    /// Bootstraps `partitions × replicas` from the registered live nodes, in node-id order.
    pub async fn bootstrap(&self, partitions: u32, replicas: u32) -> Result<ConfigPair, Error> {
        self.call(|r| Command::Bootstrap(partitions, replicas, r))
            .await
    }

    /// Proposes the next configuration for a new shape, with registered live spare nodes. With
    /// a spare-node provider, missing spare nodes are started first.
    pub async fn propose_shape(&self, partitions: u32, replicas: u32) -> Result<ConfigPair, Error> {
        let first = self
            .call(|r| Command::ProposeShape(partitions, replicas, r))
            .await;
        let Some(spares) = &self.peers.spares else {
            return first;
        };
        match first {
            Err(Error::Config(ConfigError::NotEnoughNodes { needed, available })) => {
                self.start_free_nodes(spares.as_ref(), available, needed)
                    .await?;
                self.call(|r| Command::ProposeShape(partitions, replicas, r))
                    .await
            }
            other => other,
        }
    }

    /// Marks `node` failed in the current (and next) configuration.
    pub async fn mark_failed(&self, node: NodeId) -> Result<ConfigPair, Error> {
        self.call(|r| Command::MarkFailed(node, r)).await
    }

    /// Proposes the next configuration with `failed` replaced by the registered live node `with`.
    pub async fn replace_node(&self, failed: NodeId, with: NodeId) -> Result<ConfigPair, Error> {
        self.call(|r| Command::ReplaceNode(failed, Some(with), r))
            .await
    }

    /// Proposes the next configuration with `failed` replaced by the lowest-id registered live
    /// node in no configuration. With a spare-node provider, one is started when none is free.
    pub async fn replace_node_with_free(&self, failed: NodeId) -> Result<ConfigPair, Error> {
        let first = self.call(|r| Command::ReplaceNode(failed, None, r)).await;
        let Some(spares) = &self.peers.spares else {
            return first;
        };
        match first {
            Err(Error::NoFreeNode(_)) => {
                self.start_free_nodes(spares.as_ref(), 0, 1).await?;
                self.call(|r| Command::ReplaceNode(failed, None, r)).await
            }
            other => other,
        }
    }

    /// Abandons the transition to `epoch` ([`Epoch::ZERO`]: whatever next is): asks the live,
    /// not failed nodes of next that gain intervals, in node-id order, to veto their backfill,
    /// and once one has, drops next. Without a veto nothing changes ([`Error::NoVeto`]): every
    /// node may have backfilled, so routing may have switched to next.
    pub async fn abort_transition(&self, epoch: Epoch) -> Result<ConfigPair, Error> {
        let plan = self.call(|r| Command::PrepareAbort(epoch, r)).await?;
        let mut answers = plan.unasked.clone();
        for node in &plan.ask {
            let answer = self.peers.veto.veto(node, plan.epoch).await;
            tracing::info!(node = %node.id, epoch = %plan.epoch, answer = %answer, "veto asked");
            if answer == VetoAnswer::Vetoed {
                let plan = plan.clone();
                return self.call(|r| Command::CommitAbort(plan, r)).await;
            }
            answers.push((node.id, answer));
        }
        answers.sort_by_key(|(n, _)| *n);
        Err(Error::NoVeto {
            epoch: plan.epoch,
            answers,
        })
    }

    /// Installs next as current iff its epoch is `epoch` (idempotent for an installed epoch).
    pub async fn complete_transition(&self, epoch: Epoch) -> Result<Completion, Error> {
        self.call(|r| Command::CompleteTransition(epoch, r)).await
    }

    /// The registered nodes with their liveness, in node-id order.
    pub async fn list_nodes(&self) -> Result<Vec<NodeStatus>, Error> {
        self.call(Command::ListNodes).await
    }

    /// Every configuration ever bootstrapped, proposed, amended or installed, in order.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>, Error> {
        self.call(Command::History).await
    }

    /// Has `spares` start the nodes missing for `needed` free nodes (`available` now), and waits
    /// until that many are registered and live.
    async fn start_free_nodes(
        &self,
        spares: &dyn SpareNodes,
        available: usize,
        needed: usize,
    ) -> Result<(), Error> {
        let missing = needed.saturating_sub(available).max(1);
        tracing::info!(missing, "starting spare store nodes");
        spares.start(missing).await.map_err(Error::SpareNodes)?;
        let wait = self.peers.spare_nodes_wait;
        let deadline = Instant::now() + wait;
        loop {
            let free = self.call(Command::FreeNodes).await?;
            if free >= needed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::SpareNodesTimeout {
                    wanted: needed,
                    registered: free,
                    waited_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}

/// The owner of the state and the registry.
struct EventLoop {
    options: Options,
    data_dir: PathBuf,
    state: State,
    registry: Registry,
    published: watch::Sender<ConfigPair>,
}

impl EventLoop {
    #[tracing::instrument(name = "config_manager", skip_all)]
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut stop: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
            }
        }
        // Calls still queued are answered with `Stopped` as the receiver drops them.
        commands.close();
    }

    async fn handle(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Register(node, reply) => {
                let _ = reply.send(self.register(node, now).await);
            }
            Command::Heartbeat(node, incarnation, reply) => {
                let result = self
                    .registry
                    .heartbeat(node, incarnation, now, SystemTime::now())
                    .map(|()| self.state.revision);
                let _ = reply.send(result);
            }
            Command::Bootstrap(partitions, replicas, reply) => {
                let result = match self.check_shape(partitions, replicas) {
                    Ok(()) => {
                        let live = self.registry.live(now);
                        self.state.bootstrap(partitions, replicas, &live).map(Some)
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(self.apply("bootstrap", result).await);
            }
            Command::ProposeShape(partitions, replicas, reply) => {
                let result = match self.check_shape(partitions, replicas) {
                    Ok(()) => {
                        let spare = self.spare(now);
                        self.state
                            .propose_shape(partitions, replicas, &spare)
                            .map(Some)
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(self.apply("propose shape", result).await);
            }
            Command::MarkFailed(node, reply) => {
                let result = self.state.mark_failed(node);
                let _ = reply.send(self.apply("mark failed", result).await);
            }
            Command::ReplaceNode(failed, with, reply) => {
                let result = match self.replacement(failed, with, now) {
                    Ok(info) => self.state.replace_node(failed, info).map(Some),
                    Err(e) => Err(e),
                };
                let _ = reply.send(self.apply("replace node", result).await);
            }
            Command::PrepareAbort(epoch, reply) => {
                let _ = reply.send(self.abort_plan(epoch, now));
            }
            Command::CommitAbort(plan, reply) => {
                let result = if self.state.next_epoch_is(plan.epoch)
                    && self.state.revision == plan.revision
                {
                    self.state.abort(plan.epoch).map(Some)
                } else if self.state.next.is_none() {
                    Err(Error::NoTransition {
                        current: self.state.pair().current_epoch(),
                    })
                } else {
                    Err(Error::TransitionChanged(plan.epoch))
                };
                let _ = reply.send(self.apply("abort transition", result).await);
            }
            Command::FreeNodes(reply) => {
                let _ = reply.send(Ok(self.free(now).len()));
            }
            Command::CompleteTransition(epoch, reply) => {
                let result = match self.state.complete_transition(epoch) {
                    Ok(change) => {
                        let installed = change.is_some();
                        self.apply("complete transition", Ok(change))
                            .await
                            .map(|pair| Completion { installed, pair })
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::ListNodes(reply) => {
                let _ = reply.send(Ok(self.registry.statuses(now)));
            }
            Command::History(reply) => {
                let _ = reply.send(Ok(self.state.history.clone()));
            }
        }
    }

    async fn register(&mut self, node: NodeInfo, now: Instant) -> Result<Registration, Error> {
        let addr = node.addr.as_str();
        if addr.len() > self.options.max_addr_len
            || addr.chars().any(char::is_whitespace)
            || !is_host_port(addr)
            || Link::open()
                .endpoint(addr, Role::StoreNode(node.id.0))
                .is_err()
        {
            return Err(Error::InvalidAddr(node.addr));
        }
        for config in self.state.current.iter().chain(&self.state.next) {
            if let Some(known) = config.nodes.get(&node.id) {
                if known.addr != node.addr {
                    return Err(Error::AddressConflict {
                        node: node.id,
                        configured: known.addr.clone(),
                        given: node.addr,
                    });
                }
            }
        }
        self.registry.check_room(node.id)?;
        let (state, incarnation) = self.state.with_incarnation();
        self.persist(state).await?;
        tracing::info!(node = %node.id, addr = %node.addr, incarnation, "node registered");
        self.registry
            .register(node.clone(), incarnation, now, SystemTime::now());
        Ok(Registration {
            node: node.id,
            incarnation,
            heartbeat_interval_ms: self.options.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.options.heartbeat_timeout_ms,
        })
    }

    fn check_shape(&self, partitions: u32, replicas: u32) -> Result<(), Error> {
        if partitions > self.options.max_partitions || replicas > self.options.max_replicas {
            return Err(Error::ShapeTooLarge {
                partitions,
                replicas,
                max_partitions: self.options.max_partitions,
                max_replicas: self.options.max_replicas,
            });
        }
        Ok(())
    }

    /// Registered live nodes that are not in the current configuration, in node-id order.
    fn spare(&self, now: Instant) -> Vec<NodeInfo> {
        let current = self.state.current.as_ref();
        self.registry
            .live(now)
            .into_iter()
            .filter(|n| current.is_none_or(|c| !c.contains(n.id)))
            .collect()
    }

    /// Registered live nodes in neither the current nor the next configuration, in node-id order.
    fn free(&self, now: Instant) -> Vec<NodeInfo> {
        self.registry
            .live(now)
            .into_iter()
            .filter(|n| {
                !self
                    .state
                    .current
                    .iter()
                    .chain(&self.state.next)
                    .any(|c| c.contains(n.id))
            })
            .collect()
    }

    /// The node to replace `failed` with: `with`, or the lowest-id free node.
    fn replacement(
        &self,
        failed: NodeId,
        with: Option<NodeId>,
        now: Instant,
    ) -> Result<NodeInfo, Error> {
        if let Some(with) = with {
            return self.live_node(with, now);
        }
        // The refusals a replacement would meet, before saying that no node is free.
        let current = self.state.idle_current()?;
        if !current.contains(failed) {
            return Err(ConfigError::UnknownNode(failed).into());
        }
        self.free(now)
            .into_iter()
            .next()
            .ok_or(Error::NoFreeNode(failed))
    }

    /// Whom to ask for a veto to abort the transition to `epoch`.
    fn abort_plan(&self, epoch: Epoch, now: Instant) -> Result<AbortPlan, Error> {
        // The pure change says whether an abort can be made at all; it is made on commit.
        self.state.abort(epoch)?;
        let (Some(current), Some(next)) = (&self.state.current, &self.state.next) else {
            unreachable!("an abort succeeds only with a current and a next configuration");
        };
        let mut ask = Vec::new();
        let mut unasked = Vec::new();
        for (id, info) in &next.nodes {
            if next.failed.contains(id) || current.gains(next, *id).is_empty() {
                continue;
            }
            if self.registry.is_live(*id, now) {
                ask.push(info.clone());
            } else {
                unasked.push((
                    *id,
                    VetoAnswer::Failed("not live: no heartbeat within the timeout".into()),
                ));
            }
        }
        Ok(AbortPlan {
            epoch: next.epoch,
            revision: self.state.revision,
            ask,
            unasked,
        })
    }

    fn live_node(&self, node: NodeId, now: Instant) -> Result<NodeInfo, Error> {
        let info = self.registry.get(node).ok_or(Error::UnknownNode(node))?;
        if !self.registry.is_live(node, now) {
            return Err(Error::NodeNotLive(node));
        }
        Ok(info.clone())
    }

    /// Persists and publishes a change (`Some`), or answers the unchanged pair (`None`).
    async fn apply(
        &mut self,
        what: &'static str,
        change: Result<Option<State>, Error>,
    ) -> Result<ConfigPair, Error> {
        match change {
            Ok(Some(state)) => {
                self.persist(state).await?;
                let pair = self.state.pair();
                tracing::info!(
                    change = what,
                    revision = pair.revision,
                    epoch = %pair.current_epoch(),
                    next_epoch = ?pair.next_epoch(),
                    "configuration changed"
                );
                self.published.send_replace(pair.clone());
                Ok(pair)
            }
            Ok(None) => Ok(self.state.pair()),
            Err(e) => {
                tracing::info!(change = what, error = %e.chain(), "change refused");
                Err(e)
            }
        }
    }

    /// Writes `state` to disk, then makes it the state held. On failure nothing changes.
    async fn persist(&mut self, state: State) -> Result<(), Error> {
        let dir = self.data_dir.clone();
        let written = state.clone();
        let result = tokio::task::spawn_blocking(move || disk::store(&dir, &written))
            .await
            .expect("writing the state does not panic");
        if let Err(e) = &result {
            tracing::error!(error = %e.chain(), "cannot write the state; the change is refused");
        }
        result?;
        self.state = state;
        Ok(())
    }
}

/// Whether `addr` is `host:port` (after an optional `http://` or `https://`): a host, and a port
/// that is a number. Every node dials every other at it, so an address that is not one must not
/// enter a configuration.
fn is_host_port(addr: &str) -> bool {
    let rest = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    rest.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}
