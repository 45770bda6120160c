//! The config manager over real gRPC on loopback, with its state in real temp dirs.

use causeway_proto::link::Link;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use causeway_config_manager::{disk, Client, ConfigPair, Error, Handle, Options, Service};
use causeway_core::{Epoch, NodeId, NodeInfo, PartitionId};
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
    addr: SocketAddr,
    handle: Handle,
    client: Client,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        within("shutdown", self.task)
            .await
            .expect("the service task does not panic")
            .expect("the service stops cleanly");
    }
}

fn options(dir: &Path) -> Options {
    Options {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..Options::default()
    }
}

async fn start_with(options: Options) -> Running {
    let service = Service::bind(options).await.expect("bind");
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
        addr,
        handle,
        client,
        stop,
        task,
    }
}

async fn start(dir: &Path) -> Running {
    start_with(options(dir)).await
}

fn node(id: u64) -> NodeInfo {
    NodeInfo {
        id: NodeId(id),
        addr: format!("127.0.0.1:{}", 20_000 + id),
    }
}

async fn register(client: &Client, ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut incarnations = Vec::new();
    for id in ids {
        let r = within("register", client.register(&node(id)))
            .await
            .expect("register");
        assert_eq!(r.node, NodeId(id));
        incarnations.push(r.incarnation);
    }
    incarnations
}

fn code<T: std::fmt::Debug>(result: Result<T, Error>) -> Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn replicas(pair: &ConfigPair, which: Which, p: u32) -> Vec<u64> {
    let config = match which {
        Which::Current => pair.current.as_ref().expect("current"),
        Which::Next => pair.next.as_ref().expect("next"),
    };
    config
        .replicas_of(PartitionId(p))
        .iter()
        .map(|n| n.0)
        .collect()
}

#[derive(Clone, Copy)]
enum Which {
    Current,
    Next,
}

#[tokio::test]
async fn bootstrap_places_registered_live_nodes_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;

    let pair = c.get_config().await.unwrap();
    assert_eq!(pair, ConfigPair::default(), "nothing before bootstrap");
    assert_eq!(code(c.propose_shape(1, 1).await), Code::FailedPrecondition);

    let incarnations = register(c, [4, 2, 3]).await;
    assert!(
        incarnations.windows(2).all(|w| w[0] < w[1]),
        "{incarnations:?}"
    );
    let err = c.bootstrap(2, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "too few nodes: {err}");
    assert!(err.to_string().contains("nodes"), "{err}");
    assert_eq!(code(c.bootstrap(0, 2).await), Code::InvalidArgument);
    assert_eq!(code(c.bootstrap(2000, 1).await), Code::InvalidArgument);

    register(c, [1]).await;
    let pair = c.bootstrap(2, 2).await.unwrap();
    assert_eq!(pair.current_epoch(), Epoch(1));
    assert_eq!(pair.revision, 1);
    assert!(pair.next.is_none());
    assert_eq!(replicas(&pair, Which::Current, 0), [1, 2]);
    assert_eq!(replicas(&pair, Which::Current, 1), [3, 4]);
    assert_eq!(pair.current.as_ref().unwrap().nodes[&NodeId(3)], node(3));
    assert_eq!(c.get_config().await.unwrap(), pair);
    assert_eq!(cm.handle.pair(), pair);
    assert_eq!(code(c.bootstrap(2, 2).await), Code::FailedPrecondition);

    let nodes = c.list_nodes().await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.info.id.0).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(nodes.iter().all(|n| n.live && n.last_heartbeat_unix_ms > 0));
    cm.stop().await;
}

#[tokio::test]
async fn watch_gives_the_state_then_every_change_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;
    register(c, 1..=4).await;

    let mut watch = c.watch().await.unwrap();
    let first = within("first", watch.next()).await.unwrap().unwrap();
    assert_eq!(first, ConfigPair::default());

    let bootstrapped = c.bootstrap(1, 2).await.unwrap();
    assert_eq!(
        within("1", watch.next()).await.unwrap().unwrap(),
        bootstrapped
    );

    // A watcher that starts now gets the state as it is.
    let mut late = c.watch().await.unwrap();
    assert_eq!(
        within("late", late.next()).await.unwrap().unwrap(),
        bootstrapped
    );

    let proposed = c.propose_shape(2, 2).await.unwrap();
    let seen = within("2", watch.next()).await.unwrap().unwrap();
    assert_eq!(seen, proposed);
    assert_eq!((seen.revision, seen.next_epoch()), (2, Some(Epoch(2))));

    let done = c.complete_transition(Epoch(2)).await.unwrap();
    assert!(done.installed);
    let seen = within("3", watch.next()).await.unwrap().unwrap();
    assert_eq!(seen, done.pair);
    assert_eq!(
        (seen.revision, seen.current_epoch(), seen.next_epoch()),
        (3, Epoch(2), None)
    );

    // The late watcher sees the same changes, in the same order.
    let mut revisions = Vec::new();
    while revisions.last() != Some(&3) {
        revisions.push(within("late", late.next()).await.unwrap().unwrap().revision);
    }
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");

    // An in-process subscriber sees the same.
    let mut rx = cm.handle.subscribe();
    within("subscribe", rx.changed()).await.unwrap();
    assert_eq!(*rx.borrow_and_update(), done.pair);

    // Shutting down ends the streams (and does not wait for them forever).
    cm.stop().await;
    let end = within("end of stream", watch.next()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

#[tokio::test]
async fn propose_shape_scales_1x2_to_2x2_with_registered_spares() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;
    register(c, [1, 2]).await;
    let boot = c.bootstrap(1, 2).await.unwrap();

    let err = c.propose_shape(2, 2).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "no spare nodes: {err}"
    );
    assert_eq!(
        c.get_config().await.unwrap(),
        boot,
        "a refusal changes nothing"
    );
    assert_eq!(code(c.propose_shape(0, 2).await), Code::InvalidArgument);
    assert_eq!(code(c.propose_shape(2, 100).await), Code::InvalidArgument);

    register(c, [4, 3]).await;
    let pair = c.propose_shape(2, 2).await.unwrap();
    assert_eq!(
        pair.current.as_ref(),
        boot.current.as_ref(),
        "current unchanged"
    );
    assert_eq!(pair.next_epoch(), Some(Epoch(2)));
    assert_eq!(replicas(&pair, Which::Next, 0), [1, 2]);
    assert_eq!(replicas(&pair, Which::Next, 1), [3, 4]);
    let current = pair.current.as_ref().unwrap();
    let next = pair.next.as_ref().unwrap();
    assert!(
        !current.gains(next, NodeId(3)).is_empty(),
        "the new nodes gain intervals"
    );

    // One transition at a time.
    register(c, [5, 6]).await;
    let err = c.propose_shape(3, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("already running"), "{err}");
    assert_eq!(
        code(c.replace_node(NodeId(1), NodeId(5)).await),
        Code::FailedPrecondition
    );
    assert_eq!(c.get_config().await.unwrap(), pair);
    cm.stop().await;
}

#[tokio::test]
async fn complete_transition_is_a_compare_and_set_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;
    assert_eq!(code(c.complete_transition(Epoch(1)).await), Code::Aborted);
    register(c, 1..=4).await;
    c.bootstrap(1, 2).await.unwrap();
    let proposed = c.propose_shape(2, 2).await.unwrap();

    for wrong in [3, 7, 0] {
        let err = c.complete_transition(Epoch(wrong)).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "epoch {wrong}: {err}");
    }
    assert_eq!(
        c.get_config().await.unwrap(),
        proposed,
        "a refused CAS changes nothing"
    );

    let done = c.complete_transition(Epoch(2)).await.unwrap();
    assert!(done.installed);
    assert_eq!(done.pair.current, proposed.next);
    assert_eq!(done.pair.next, None);

    for repeat in [2, 1] {
        let again = c.complete_transition(Epoch(repeat)).await.unwrap();
        assert!(!again.installed, "epoch {repeat} was installed already");
        assert_eq!(again.pair, done.pair, "a repeat changes nothing");
    }
    assert_eq!(code(c.complete_transition(Epoch(3)).await), Code::Aborted);
    cm.stop().await;
}

#[tokio::test]
async fn mark_failed_then_replace_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;
    register(c, 1..=4).await;
    let boot = c.bootstrap(2, 2).await.unwrap();

    assert_eq!(code(c.mark_failed(NodeId(9)).await), Code::NotFound);
    let marked = c.mark_failed(NodeId(2)).await.unwrap();
    assert_eq!(
        marked.current_epoch(),
        Epoch(1),
        "marking failed is no transition"
    );
    assert_eq!(marked.revision, boot.revision + 1);
    let current = marked.current.as_ref().unwrap();
    assert!(current.failed.contains(&NodeId(2)));
    assert!(!current.live_node_ids().contains(&NodeId(2)));
    let again = c.mark_failed(NodeId(2)).await.unwrap();
    assert_eq!(again, marked, "marking twice changes nothing");

    assert_eq!(
        code(c.replace_node(NodeId(2), NodeId(5)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.replace_node(NodeId(2), NodeId(3)).await),
        Code::FailedPrecondition
    );
    register(c, [5]).await;
    assert_eq!(
        code(c.replace_node(NodeId(9), NodeId(5)).await),
        Code::NotFound
    );
    let replacing = c.replace_node(NodeId(2), NodeId(5)).await.unwrap();
    assert_eq!(replacing.next_epoch(), Some(Epoch(2)));
    assert_eq!(replicas(&replacing, Which::Next, 0), [1, 5]);
    assert_eq!(replicas(&replacing, Which::Next, 1), [3, 4]);

    let done = c.complete_transition(Epoch(2)).await.unwrap();
    let current = done.pair.current.as_ref().unwrap();
    assert!(!current.contains(NodeId(2)) && current.contains(NodeId(5)));
    assert!(current.failed.is_empty());
    cm.stop().await;
}

#[tokio::test]
async fn registrations_heartbeats_and_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start_with(Options {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1000,
        ..options(dir.path())
    })
    .await;
    let c = &cm.client;

    assert_eq!(code(c.heartbeat(NodeId(1), 1).await), Code::NotFound);
    // No port; characters no URI takes (they once panicked the nodes' gossip loops); a port
    // that is not a number.
    for addr in ["no port", "127.0.0.1:80|x", "node-1:port", "[::1:80"] {
        let bad = NodeInfo {
            id: NodeId(1),
            addr: addr.into(),
        };
        assert_eq!(
            code(c.register(&bad).await),
            Code::InvalidArgument,
            "{addr}"
        );
    }

    let first = c.register(&node(1)).await.unwrap();
    assert_eq!(
        (first.heartbeat_interval_ms, first.heartbeat_timeout_ms),
        (100, 1000)
    );
    c.heartbeat(NodeId(1), first.incarnation).await.unwrap();
    let second = c.register(&node(1)).await.unwrap();
    assert!(second.incarnation > first.incarnation);
    assert_eq!(
        code(c.heartbeat(NodeId(1), first.incarnation).await),
        Code::FailedPrecondition,
        "an older incarnation is refused"
    );
    register(c, [2]).await;

    // Without heartbeats both nodes stop being live; wait for it, with a deadline.
    within("liveness to expire", async {
        while c.list_nodes().await.unwrap().iter().any(|n| n.live) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let reg = c.register(&node(1)).await.unwrap();
    c.heartbeat(NodeId(1), reg.incarnation).await.unwrap();
    assert_eq!(
        code(c.bootstrap(1, 2).await),
        Code::FailedPrecondition,
        "node 2 is not live"
    );
    let pair = c.bootstrap(1, 1).await.unwrap();
    assert_eq!(replicas(&pair, Which::Current, 0), [1]);

    // A node of the configuration may not come back under another address.
    let moved = NodeInfo {
        id: NodeId(1),
        addr: "127.0.0.1:1".into(),
    };
    let err = c.register(&moved).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // A dead node is no candidate for a replacement.
    assert_eq!(
        code(c.replace_node(NodeId(1), NodeId(2)).await),
        Code::FailedPrecondition
    );
    cm.stop().await;
}

#[tokio::test]
async fn everything_survives_a_restart_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    let c = &cm.client;
    let incarnations = register(c, 1..=5).await;
    c.bootstrap(1, 2).await.unwrap();
    c.mark_failed(NodeId(2)).await.unwrap();
    let before = c.propose_shape(2, 2).await.unwrap();
    let history = cm.handle.history().await.unwrap();
    assert_eq!(history.len(), 3);
    cm.stop().await;

    let cm = start(dir.path()).await;
    assert_ne!(cm.addr.port(), 0);
    let c = &cm.client;
    assert_eq!(c.get_config().await.unwrap(), before);
    assert_eq!(cm.handle.history().await.unwrap(), history);
    let mut watch = c.watch().await.unwrap();
    assert_eq!(
        within("watch", watch.next()).await.unwrap().unwrap(),
        before
    );

    // Registrations are not kept, but incarnations keep rising.
    assert!(c.list_nodes().await.unwrap().is_empty());
    assert_eq!(
        code(c.heartbeat(NodeId(1), incarnations[0]).await),
        Code::NotFound
    );
    let again = register(c, [1]).await;
    assert!(
        again[0] > *incarnations.iter().max().unwrap(),
        "{again:?} after {incarnations:?}"
    );

    // The transition that was running completes after the restart.
    assert_eq!(code(c.propose_shape(3, 1).await), Code::FailedPrecondition);
    let done = c.complete_transition(Epoch(2)).await.unwrap();
    assert!(done.installed);
    assert_eq!(
        within("watch", watch.next()).await.unwrap().unwrap(),
        done.pair
    );
    cm.stop().await;

    let cm = start(dir.path()).await;
    assert_eq!(cm.client.get_config().await.unwrap(), done.pair);
    assert_eq!(cm.handle.history().await.unwrap().len(), 4);
    cm.stop().await;
}

#[tokio::test]
async fn a_corrupt_state_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start(dir.path()).await;
    register(&cm.client, [1]).await;
    cm.client.bootstrap(1, 1).await.unwrap();
    cm.stop().await;

    let path = disk::state_path(dir.path());
    let good = std::fs::read_to_string(&path).unwrap();

    // Truncated: not JSON.
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = Service::bind(options(dir.path())).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let message = err.chain();
    assert!(
        message.contains("state.json") && message.contains("corrupt"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        &good[..good.len() / 2],
        "left as it was"
    );

    // Valid JSON, but the configuration it holds is not valid.
    // (Edited as text: the slicing holds u128 bounds that `serde_json::Value` cannot carry.)
    assert!(good.contains("\"current\": {\n    \"epoch\": 1,"), "{good}");
    let zero_epoch = good.replacen("\"epoch\": 1,", "\"epoch\": 0,", 1);
    std::fs::write(&path, zero_epoch).unwrap();
    let err = Service::bind(options(dir.path())).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        err.chain().contains("current configuration is invalid"),
        "{}",
        err.chain()
    );

    // And the good file starts again.
    std::fs::write(&path, &good).unwrap();
    let cm = start(dir.path()).await;
    assert_eq!(
        cm.client.get_config().await.unwrap().current_epoch(),
        Epoch(1)
    );
    cm.stop().await;
}

#[tokio::test]
async fn keep_registered_heartbeats_and_registers_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fast = |listen_addr| Options {
        listen_addr,
        heartbeat_interval_ms: 50,
        heartbeat_timeout_ms: 1000,
        ..options(dir.path())
    };
    let cm = start_with(fast("127.0.0.1:0".parse().unwrap())).await;
    let addr = cm.addr;
    let client = Client::connect_lazy(&addr.to_string(), &Link::open()).unwrap();
    let (incarnations, mut seen) = tokio::sync::watch::channel(None);
    let (stop_keeper, keeper_stopped) = oneshot::channel::<()>();
    let keeper = tokio::spawn(async move {
        client
            .keep_registered(node(3), incarnations, async {
                let _ = keeper_stopped.await;
            })
            .await
    });
    let first = *within("registration", seen.wait_for(Option::is_some))
        .await
        .unwrap();
    let first = first.unwrap();
    let nodes = cm.client.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].live && nodes[0].incarnation == first);
    cm.stop().await;

    // The config manager comes back on the same address without the registration; the node
    // registers again with a higher incarnation.
    let cm = start_with(fast(addr)).await;
    let second = *within("registration again", seen.wait_for(|i| *i != Some(first)))
        .await
        .unwrap();
    assert!(second.unwrap() > first);
    within("the node to be listed", async {
        while !cm.client.list_nodes().await.unwrap().iter().any(|n| n.live) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let _ = stop_keeper.send(());
    within("the keeper to stop", keeper)
        .await
        .unwrap()
        .expect("the keeper ends cleanly");
    cm.stop().await;
}

#[tokio::test]
async fn watchers_are_limited_and_a_slow_subscriber_sees_the_latest_pair() {
    let dir = tempfile::tempdir().unwrap();
    let cm = start_with(Options {
        max_watchers: 1,
        ..options(dir.path())
    })
    .await;
    let c = &cm.client;
    let _first = c.watch().await.unwrap();
    assert_eq!(code(c.watch().await), Code::ResourceExhausted);

    let mut slow = cm.handle.subscribe();
    register(c, 1..=4).await;
    c.bootstrap(1, 2).await.unwrap();
    c.propose_shape(2, 2).await.unwrap();
    let last = c.complete_transition(Epoch(2)).await.unwrap().pair;
    within("changed", slow.changed()).await.unwrap();
    assert_eq!(*slow.borrow_and_update(), last, "skips to the latest pair");
    cm.stop().await;
}

#[tokio::test]
async fn admin_calls_need_the_admin_token_and_every_call_the_cluster_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, admin) = ("c".repeat(32), "a".repeat(32));
    std::fs::write(dir.path().join("secret"), &secret).unwrap();
    std::fs::write(dir.path().join("admin"), &admin).unwrap();
    let mut o = options(&dir.path().join("state"));
    o.security = causeway_proto::link::Security {
        cluster_secret_file: Some(dir.path().join("secret")),
        admin_token_file: Some(dir.path().join("admin")),
        ..Default::default()
    };
    // Its own client (open, no credentials) is not used.
    let running = start_with(o).await;
    let addr = running.addr.to_string();
    let connect = |link: Link| {
        let addr = addr.clone();
        async move {
            within("connect", Client::connect(&addr, &link))
                .await
                .unwrap()
        }
    };

    // No secret: even reads are refused.
    let open = connect(Link::open()).await;
    assert_eq!(code(open.get_config().await), Code::Unauthenticated);
    assert_eq!(code(open.register(&node(1)).await), Code::Unauthenticated);

    // The secret: nodes register and read; the admin calls are refused, and change nothing.
    let member = connect(Link::with_secrets(Some(secret.clone()), None)).await;
    register(&member, [1, 2]).await;
    assert_eq!(code(member.bootstrap(1, 2).await), Code::Unauthenticated);
    assert_eq!(
        code(member.propose_shape(2, 1).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(member.mark_failed(NodeId(1)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(member.abort_transition(Epoch(2)).await),
        Code::Unauthenticated
    );
    assert!(member.get_config().await.unwrap().current.is_none());
    // A wrong admin token is no admin token.
    let forger = connect(Link::with_secrets(
        Some(secret.clone()),
        Some("b".repeat(32)),
    ))
    .await;
    assert_eq!(code(forger.bootstrap(1, 2).await), Code::Unauthenticated);

    // The admin token: served.
    let operator = connect(Link::with_secrets(None, Some(admin))).await;
    let pair = operator.bootstrap(1, 2).await.expect("an admin bootstraps");
    assert_eq!(pair.current.map(|c| c.epoch), Some(Epoch(1)));

    running.stop().await;
}

#[tokio::test]
async fn under_mutual_tls_a_node_registers_as_itself_and_admin_calls_need_an_admin_certificate() {
    use causeway_proto::link::certs::Authority;
    use causeway_proto::link::{Role, Security, TlsFiles};
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new().unwrap();
    let files = |role: Role| {
        let issued = ca.issue(role, &[]).unwrap();
        let name = role.uri().replace(['/', ':'], "_");
        let (cert, key) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        (cert, key)
    };
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let (cert, key) = files(Role::ConfigManager);
    let mut o = options(&dir.path().join("state"));
    o.security = Security {
        tls: Some(TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert,
            key,
        }),
        ..Default::default()
    };
    // Its own client (open, no credentials) is not used.
    let running = start_with(o).await;
    let addr = running.addr.to_string();
    let as_role = |role: Role| {
        let (cert, key) = files(role);
        let link = Link::load(&Security {
            tls: Some(TlsFiles {
                ca: dir.path().join("ca.pem"),
                cert,
                key,
            }),
            ..Default::default()
        })
        .unwrap();
        let addr = addr.clone();
        async move {
            within("connect", Client::connect(&addr, &link))
                .await
                .unwrap()
        }
    };

    // Node 1's certificate registers node 1, not node 2.
    let node1 = as_role(Role::StoreNode(1)).await;
    node1
        .register(&node(1))
        .await
        .expect("node 1 registers as itself");
    assert_eq!(code(node1.register(&node(2)).await), Code::PermissionDenied);
    let node2 = as_role(Role::StoreNode(2)).await;
    node2.register(&node(2)).await.unwrap();
    // An api-server reads, and may not bootstrap; the admin may.
    let api = as_role(Role::ApiServer).await;
    assert!(api.get_config().await.unwrap().current.is_none());
    assert_eq!(code(api.bootstrap(1, 2).await), Code::PermissionDenied);
    // Only a node of the next configuration completes a transition: there is none.
    assert_eq!(
        code(api.complete_transition(Epoch(2)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node1.complete_transition(Epoch(2)).await),
        Code::PermissionDenied
    );
    let admin = as_role(Role::Admin).await;
    admin.bootstrap(1, 2).await.expect("the admin bootstraps");

    running.stop().await;
}
