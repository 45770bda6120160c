//! Aborting a transition and proposals that need spare nodes, over real gRPC on loopback with the
//! state in temp dirs. Store nodes' vetoes come from a scripted [`Veto`] (or, in one test, the
//! real gRPC call to an address where no node listens); spare nodes from a provider that
//! registers them the way a started store node would.

use causeway_proto::link::Link;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use causeway_config_manager::{
    Change, Client, ConfigPair, Error, Handle, Options, Service, SpareNodes, SpareNodesError, Veto,
    VetoAnswer,
};
use causeway_core::{Epoch, NodeId, NodeInfo};
use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

/// Every wait in these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// A config manager running in this process.
struct Running {
    handle: Handle,
    client: Client,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(
        options: impl FnOnce(&mut Options),
        setup: impl FnOnce(Service) -> Service,
    ) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Options {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Options::default()
        };
        options(&mut o);
        let service = setup(Service::bind(o).await.expect("bind"));
        let addr = service.local_addr();
        let handle = service.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.run(async {
            let _ = stopped.await;
        }));
        let client = within("connect", Client::connect(&addr.to_string(), &Link::open()))
            .await
            .expect("connect");
        Running {
            handle,
            client,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        within("shutdown", self.task)
            .await
            .expect("the service task does not panic")
            .expect("the service stops cleanly");
    }
}

fn node(id: u64) -> NodeInfo {
    NodeInfo {
        id: NodeId(id),
        addr: format!("127.0.0.1:{}", 20_000 + id),
    }
}

async fn register(client: &Client, ids: impl IntoIterator<Item = u64>) {
    for id in ids {
        within("register", client.register(&node(id)))
            .await
            .expect("register");
    }
}

fn code<T: std::fmt::Debug>(result: &Result<T, Error>) -> Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn message<T: std::fmt::Debug>(result: &Result<T, Error>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(Error::Rpc(status)) => status.message().to_string(),
        Err(e) => e.to_string(),
    }
}

/// Answers each node as scripted (`Failed` for a node without a script) and records whom it
/// was asked about, in order.
#[derive(Debug, Default)]
struct ScriptedVeto {
    answers: Mutex<BTreeMap<NodeId, VetoAnswer>>,
    asked: Mutex<Vec<(NodeId, Epoch)>>,
}

impl ScriptedVeto {
    fn script(&self, answers: &[(u64, VetoAnswer)]) {
        let mut a = self.answers.lock().unwrap();
        a.clear();
        a.extend(answers.iter().map(|(n, v)| (NodeId(*n), v.clone())));
        self.asked.lock().unwrap().clear();
    }

    fn asked(&self) -> Vec<(u64, u64)> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| (n.0, e.0))
            .collect()
    }
}

impl Veto for ScriptedVeto {
    fn veto(&self, node: &NodeInfo, epoch: Epoch) -> BoxFuture<'static, VetoAnswer> {
        self.asked.lock().unwrap().push((node.id, epoch));
        let answer = self
            .answers
            .lock()
            .unwrap()
            .get(&node.id)
            .cloned()
            .unwrap_or_else(|| VetoAnswer::Failed("not scripted".into()));
        Box::pin(async move { answer })
    }
}

/// A 1×2 cluster (nodes 1, 2) with spares 3, 4 and the proposal 2×2: nodes 3 and 4 gain the
/// intervals of the new partition; 1 and 2 only lose some.
async fn proposing_2x2(veto: Arc<ScriptedVeto>) -> (Running, ConfigPair) {
    let cm = Running::start(|_| {}, |s| s.with_veto(veto)).await;
    register(&cm.client, 1..=4).await;
    cm.client.bootstrap(1, 2).await.expect("bootstrap");
    let proposed = cm.client.propose_shape(2, 2).await.expect("propose");
    assert_eq!(proposed.next_epoch(), Some(Epoch(2)));
    (cm, proposed)
}

#[tokio::test]
async fn an_abort_without_a_transition_or_for_another_epoch_changes_nothing() {
    let veto = Arc::new(ScriptedVeto::default());
    let cm = Running::start(|_| {}, |s| s.with_veto(veto.clone())).await;
    register(&cm.client, [1, 2]).await;
    cm.client.bootstrap(1, 1).await.unwrap();

    let r = cm.client.abort_transition(Epoch::ZERO).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    assert!(
        message(&r).contains("no transition is running (current epoch 1)"),
        "{}",
        message(&r)
    );

    let proposed = cm.client.propose_shape(2, 1).await.unwrap();
    let r = cm.client.abort_transition(Epoch(5)).await;
    assert_eq!(code(&r), Code::Aborted);
    assert!(
        message(&r).contains("the transition running is to epoch 2"),
        "{}",
        message(&r)
    );
    assert!(
        veto.asked().is_empty(),
        "no node is asked for a refused abort"
    );
    assert_eq!(cm.client.get_config().await.unwrap(), proposed);
    cm.stop().await;
}

#[tokio::test]
async fn an_abort_asks_the_gaining_nodes_in_id_order_until_one_vetoes() {
    let veto = Arc::new(ScriptedVeto::default());
    let (cm, proposed) = proposing_2x2(veto.clone()).await;
    let mut watch = cm.handle.subscribe();
    watch.borrow_and_update();

    veto.script(&[(3, VetoAnswer::Backfilled), (4, VetoAnswer::Vetoed)]);
    let aborted = cm.client.abort_transition(Epoch(2)).await.expect("abort");
    assert_eq!(
        veto.asked(),
        [(3, 2), (4, 2)],
        "only gaining nodes, in id order"
    );
    assert_eq!(aborted.next, None);
    assert_eq!(aborted.current, proposed.current);
    assert_eq!(aborted.revision, proposed.revision + 1);
    // Published, and persisted with its history entry.
    within("the aborted pair is published", watch.changed())
        .await
        .unwrap();
    assert_eq!(*watch.borrow(), aborted);
    let history = cm.handle.history().await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.change, Change::Aborted);
    assert_eq!(Some(&last.config), proposed.next.as_ref());
    let r = cm.client.complete_transition(Epoch(2)).await;
    assert_eq!(
        code(&r),
        Code::Aborted,
        "an aborted epoch cannot be installed"
    );

    // Proposed again, under a new epoch (the aborted one is never used again); the first veto
    // ends the asking.
    let again = cm.client.propose_shape(2, 2).await.expect("propose again");
    assert_eq!(again.next_epoch(), Some(Epoch(3)));
    veto.script(&[(3, VetoAnswer::Vetoed), (4, VetoAnswer::Vetoed)]);
    let aborted = cm
        .client
        .abort_transition(Epoch::ZERO)
        .await
        .expect("abort");
    assert_eq!(veto.asked(), [(3, 3)]);
    assert_eq!(aborted.next, None);
    cm.stop().await;
}

#[tokio::test]
async fn without_a_veto_the_transition_goes_on() {
    let veto = Arc::new(ScriptedVeto::default());
    let (cm, proposed) = proposing_2x2(veto.clone()).await;

    veto.script(&[(3, VetoAnswer::Backfilled), (4, VetoAnswer::Backfilled)]);
    let r = cm.client.abort_transition(Epoch::ZERO).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    assert_eq!(
        message(&r),
        "every node of the next configuration has backfilled: routing may have switched; \
         the transition cannot be aborted"
    );
    assert_eq!(cm.client.get_config().await.unwrap(), proposed);

    veto.script(&[(3, VetoAnswer::Backfilled), (4, VetoAnswer::Declined)]);
    let r = cm.client.abort_transition(Epoch::ZERO).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    assert!(
        message(&r).contains("n3 has backfilled; n4 declined"),
        "{}",
        message(&r)
    );
    assert_eq!(cm.client.get_config().await.unwrap(), proposed);
    cm.stop().await;
}

#[tokio::test]
async fn over_grpc_a_node_that_does_not_answer_cannot_veto() {
    // The real VetoBackfill call, to addresses where no store node listens.
    let cm = Running::start(|o| o.veto_timeout_ms = 500, |s| s).await;
    register(&cm.client, 1..=4).await;
    cm.client.bootstrap(1, 2).await.unwrap();
    let proposed = cm.client.propose_shape(2, 2).await.unwrap();
    let r = within("abort", cm.client.abort_transition(Epoch::ZERO)).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    let m = message(&r);
    assert!(
        m.contains("no node of the next configuration (epoch 2) vetoed"),
        "{m}"
    );
    assert!(
        m.contains("n3 did not answer") && m.contains("n4 did not answer"),
        "{m}"
    );
    assert_eq!(cm.client.get_config().await.unwrap(), proposed);
    cm.stop().await;
}

#[tokio::test]
async fn a_gaining_node_without_heartbeats_is_not_asked() {
    let veto = Arc::new(ScriptedVeto::default());
    let cm = Running::start(
        |o| {
            o.heartbeat_interval_ms = 10;
            o.heartbeat_timeout_ms = 50;
        },
        |s| s.with_veto(veto.clone()),
    )
    .await;
    register(&cm.client, [1, 2]).await;
    cm.client.bootstrap(1, 1).await.unwrap();
    cm.client.propose_shape(2, 1).await.unwrap();
    // No heartbeats: both nodes fall silent.
    within("the nodes time out", async {
        while cm.client.list_nodes().await.unwrap().iter().any(|n| n.live) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    veto.script(&[(2, VetoAnswer::Vetoed)]);
    let r = cm.client.abort_transition(Epoch::ZERO).await;
    assert!(veto.asked().is_empty());
    let m = message(&r);
    assert!(m.contains("n2 did not answer (not live"), "{m}");
    assert!(cm.client.get_config().await.unwrap().next.is_some());
    cm.stop().await;
}

/// Starts nodes by registering them under the next ids from `first_id`, as store nodes started
/// by the provider would; or, with `register: false`, starts nothing that registers.
#[derive(Debug)]
struct RegisteringSpares {
    handle: Arc<OnceLock<Handle>>,
    next_id: Mutex<u64>,
    register: bool,
    calls: Mutex<Vec<usize>>,
}

impl RegisteringSpares {
    fn new(first_id: u64, register: bool) -> Arc<RegisteringSpares> {
        Arc::new(RegisteringSpares {
            handle: Arc::new(OnceLock::new()),
            next_id: Mutex::new(first_id),
            register,
            calls: Mutex::new(Vec::new()),
        })
    }
}

impl SpareNodes for RegisteringSpares {
    fn start(&self, count: usize) -> BoxFuture<'static, Result<(), SpareNodesError>> {
        self.calls.lock().unwrap().push(count);
        let mut ids = Vec::new();
        {
            let mut next = self.next_id.lock().unwrap();
            for _ in 0..count {
                ids.push(*next);
                *next += 1;
            }
        }
        let handle = self.handle.get().cloned();
        let register = self.register;
        Box::pin(async move {
            if register {
                let handle = handle.ok_or("no handle")?;
                for id in ids {
                    handle.register(node(id)).await?;
                }
            }
            Ok(())
        })
    }
}

async fn with_spares(spares: Arc<RegisteringSpares>, wait_ms: u64) -> Running {
    let cm = Running::start(
        |o| o.spare_nodes_wait_ms = wait_ms,
        |s| s.with_spare_nodes(spares.clone()),
    )
    .await;
    spares.handle.set(cm.handle.clone()).unwrap();
    cm
}

#[tokio::test]
async fn a_proposal_short_of_spare_nodes_has_the_provider_start_them() {
    let spares = RegisteringSpares::new(10, true);
    let cm = with_spares(spares.clone(), 5_000).await;
    register(&cm.client, [1, 2]).await;
    cm.client.bootstrap(1, 1).await.unwrap();
    // Node 2 is a spare already; 3 × 1 needs one more.
    let pair = cm.client.propose_shape(3, 1).await.expect("propose");
    assert_eq!(*spares.calls.lock().unwrap(), [1]);
    let next = pair.next.unwrap();
    assert_eq!(
        next.node_ids().into_iter().map(|n| n.0).collect::<Vec<_>>(),
        [1, 2, 10]
    );
    cm.stop().await;

    // Enough spares: the provider is not called.
    let spares = RegisteringSpares::new(10, true);
    let cm = with_spares(spares.clone(), 5_000).await;
    register(&cm.client, [1, 2, 3]).await;
    cm.client.bootstrap(1, 1).await.unwrap();
    cm.client.propose_shape(3, 1).await.expect("propose");
    assert!(spares.calls.lock().unwrap().is_empty());
    cm.stop().await;
}

#[tokio::test]
async fn spare_nodes_that_never_register_are_a_clear_error() {
    let spares = RegisteringSpares::new(10, false);
    let cm = with_spares(spares.clone(), 200).await;
    register(&cm.client, [1]).await;
    cm.client.bootstrap(1, 1).await.unwrap();
    let r = cm.client.propose_shape(2, 2).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    assert_eq!(
        message(&r),
        "3 spare nodes are needed but only 0 registered within 200 ms"
    );
    assert_eq!(*spares.calls.lock().unwrap(), [3]);
    assert_eq!(cm.client.get_config().await.unwrap().next, None);
    cm.stop().await;
}

#[tokio::test]
async fn a_replacement_is_the_lowest_free_node_or_a_started_one() {
    // Without a provider: the lowest-id free node, else a clear refusal.
    let cm = Running::start(|_| {}, |s| s).await;
    register(&cm.client, [1, 2]).await;
    cm.client.bootstrap(1, 2).await.unwrap();
    let r = cm.client.replace_node_with_free(NodeId(2)).await;
    assert_eq!(code(&r), Code::FailedPrecondition);
    assert_eq!(
        message(&r),
        "no registered live node is free to replace node n2: start another store node"
    );
    let r = cm.client.replace_node_with_free(NodeId(9)).await;
    assert_eq!(code(&r), Code::NotFound, "{}", message(&r));
    register(&cm.client, [7, 5]).await;
    let pair = cm.client.replace_node_with_free(NodeId(2)).await.unwrap();
    let next = pair.next.unwrap();
    assert!(next.contains(NodeId(5)) && !next.contains(NodeId(2)));
    assert!(!next.contains(NodeId(7)));
    cm.stop().await;

    // With a provider: one node is started for it.
    let spares = RegisteringSpares::new(3, true);
    let cm = with_spares(spares.clone(), 5_000).await;
    register(&cm.client, [1, 2]).await;
    cm.client.bootstrap(1, 2).await.unwrap();
    let pair = cm.client.replace_node_with_free(NodeId(1)).await.unwrap();
    assert_eq!(*spares.calls.lock().unwrap(), [1]);
    let next = pair.next.unwrap();
    assert!(next.contains(NodeId(3)) && !next.contains(NodeId(1)));
    cm.stop().await;
}
