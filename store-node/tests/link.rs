//! Who may call a store node: under mutual TLS only holders of a certificate of the cluster CA,
//! and a node gossips as itself only; under the cluster secret only calls that carry it; and
//! whatever gossip gets through, a node outside the configurations is never believed, nor a
//! committed ts beyond the log.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use causeway_core::{ClusterConfig, NodeId, NodeInfo};
use causeway_proto::link::certs::Authority;
use causeway_proto::link::{Link, Role, Security, TlsFiles};
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_store_node::state::Configs;
use causeway_store_node::{Options, Service, Store, Tuning};
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use common::*;
use prost::Message;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const DEADLINE: Duration = Duration::from_secs(10);

/// Node 1 of a 1×2 configuration (node 2 never runs), on its own embedded log with `records`
/// records, serving with `security`.
struct Node {
    addr: String,
    log: TxLog,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<Result<(), causeway_store_node::ServiceError>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Node {
    async fn start(security: Security, records: usize) -> Node {
        Node::start_tuned(security, records, Tuning::default()).await
    }

    async fn start_tuned(security: Security, records: usize, tuning: Tuning) -> Node {
        Node::try_start(security, records, tuning).await.unwrap()
    }

    /// The node, or why it did not start (the error with its causes).
    async fn try_start(security: Security, records: usize, tuning: Tuning) -> Result<Node, String> {
        let log_dir = tempfile::tempdir().unwrap();
        let log_options = LogOptions::Embedded(EmbeddedOptions::new(log_dir.path()));
        let log = TxLog::open(log_options.clone()).await.unwrap();
        let port = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        };
        let infos: Vec<NodeInfo> = (1..=2)
            .map(|n| NodeInfo {
                id: NodeId(n),
                addr: port(n),
            })
            .collect();
        let config = Arc::new(ClusterConfig::bootstrap(1, 2, &infos).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let store = Store::open(&data, small_options()).unwrap();
            Configs {
                revision: 1,
                current: Some(config),
                next: None,
            }
            .save(&store)
            .unwrap();
        }
        let options = Options {
            node_id: NodeId(1),
            listen: infos[0].addr.parse().unwrap(),
            advertise: None,
            admin_listen: None,
            data_dir: data,
            config_manager: "127.0.0.1:1".into(),
            log: log_options,
            store: small_options(),
            tuning,
            security,
        };
        let service = match Service::bind_with_log(options, log.clone()).await {
            Ok(service) => service,
            Err(e) => {
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                return Err(why);
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(service.run(async {
            let _ = stopped.await;
        }));
        let batch: Vec<_> = (0..records)
            .map(|i| {
                let json = serde_json::json!({ "i": i });
                tx(vec![replace("c", &format!("d{i}"), &json)], 1)
                    .encode_to_vec()
                    .into()
            })
            .collect();
        if records > 0 {
            log.append(batch).await.unwrap();
        }
        Ok(Node {
            addr: infos[0].addr.clone(),
            log,
            stop: Some(stop),
            running,
            _dirs: vec![log_dir, dir],
        })
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(DEADLINE, &mut self.running).await;
        let _ = self.log.close().await;
    }
}

/// A client of node 1 at `addr` over `link`, failing fast.
fn client(link: &Link, addr: &str) -> StoreNodeClient<causeway_proto::link::Channel> {
    client_of(link, 1, addr)
}

/// A client of node `node` at `addr` over `link`, failing fast.
fn client_of(link: &Link, node: u64, addr: &str) -> StoreNodeClient<causeway_proto::link::Channel> {
    let endpoint = link
        .endpoint(addr, Role::StoreNode(node))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    StoreNodeClient::new(link.channel(endpoint.connect_lazy()))
}

async fn status(
    mut client: StoreNodeClient<causeway_proto::link::Channel>,
) -> Result<pb::NodeStatus, tonic::Status> {
    client
        .status(pb::StatusRequest {})
        .await
        .map(tonic::Response::into_inner)
}

fn gossip(node: u64, seq: u64, committed: u64) -> pb::GossipMessage {
    pb::GossipMessage {
        node_id: node,
        incarnation: 1,
        seq,
        committed,
        current_epoch: 1,
        next_epoch: None,
        backfilled: true,
        routing_epoch: 1,
        ust: committed,
        lowest_read: None,
    }
}

/// Writes the CA and `role`'s certificate into `dir`; answers the TLS settings.
fn tls_files(dir: &Path, ca: &Authority, role: Role) -> TlsFiles {
    let issued = ca.issue(role, &[]).unwrap();
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    std::fs::write(&files.cert, issued.cert_pem).unwrap();
    std::fs::write(&files.key, issued.key_pem).unwrap();
    files
}

/// Mutual TLS with `ca`, as `role`: its files written into `dir`.
fn tls_security(dir: &Path, ca: &Authority, role: Role) -> Security {
    Security {
        tls: Some(tls_files(dir, ca, role)),
        ..Security::default()
    }
}

fn with_tls(ca: &Authority, role: Role) -> Link {
    let issued = ca.issue(role, &[]).unwrap();
    Link::with_tls(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mutual_tls_a_call_without_a_certificate_of_the_cluster_ca_is_refused() {
    let ca = Authority::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let security = tls_security(dir.path(), &ca, Role::StoreNode(1));
    // Node 1 with node 2's certificate does not start.
    let wrong = tempfile::tempdir().unwrap();
    let of_2 = tls_security(wrong.path(), &ca, Role::StoreNode(2));
    let refused = Node::try_start(of_2, 0, Tuning::default()).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("store-node/2")),
        "a node started with another node's certificate: {:?}",
        refused.err()
    );
    let node = Node::start(security, 0).await;
    let addr = node.addr.clone();

    // A certificate of the cluster CA: served.
    let api = with_tls(&ca, Role::ApiServer);
    let s = tokio::time::timeout(DEADLINE, status(client(&api, &addr)))
        .await
        .unwrap()
        .expect("a client with a certificate of the CA is served");
    assert_eq!(s.node_id, 1);
    // A client that expects node 2 at that address notices it reached another node.
    assert!(
        status(client_of(&api, 2, &addr)).await.is_err(),
        "a client expecting node 2 took node 1's certificate"
    );
    // One issued later by the same CA read back from its files (to add nodes): served.
    let again = Authority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    status(client(&with_tls(&again, Role::Cdc), &addr))
        .await
        .expect("a certificate of the CA read back from its files is served");

    // TLS without a client certificate: refused.
    let anonymous = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.cert_pem()))
                .domain_name(Role::StoreNode(1).dns_name()),
        )
        .unwrap()
        .timeout(Duration::from_secs(2));
    let refused = StoreNodeClient::new(anonymous.connect_lazy())
        .status(pb::StatusRequest {})
        .await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );

    // A certificate of another CA: refused (and the server's is not trusted by it either).
    let other = Authority::new().unwrap();
    let issued = other.issue(Role::ApiServer, &[]).unwrap();
    let foreign = Link::with_tls(ca.cert_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(
        status(client(&foreign, &addr)).await.is_err(),
        "a certificate of another CA was served"
    );

    // Plaintext: refused.
    assert!(
        status(client(&Link::open(), &addr)).await.is_err(),
        "a plaintext client was served"
    );

    // A store node gossips as itself only: node 2's certificate claiming node 1 is refused.
    let node2 = with_tls(&ca, Role::StoreNode(2));
    let forged = client(&node2, &addr).gossip(gossip(1, 99, 5)).await;
    assert_eq!(
        forged.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "gossip under another node's name"
    );
    client(&node2, &addr)
        .gossip(gossip(2, 1, 0))
        .await
        .expect("node 2 gossips as itself");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_is_ignored_and_the_cluster_secret_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-of-the-cluster-0123456789";
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let security = Security {
        cluster_secret_file: Some(secret_file),
        ..Security::default()
    };
    let node = Node::start(security, 5).await;
    let addr = node.addr.clone();

    // Without the secret, or with another: refused.
    let err = status(client(&Link::open(), &addr)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let wrong = Link::with_secrets(Some("x".repeat(32)), None);
    let err = status(client(&wrong, &addr)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");

    let link = Link::with_secrets(Some(secret.to_owned()), None);
    let c = || client(&link, &addr);
    // The node applies the log's 5 records.
    tokio::time::timeout(DEADLINE, async {
        while status(c()).await.map_or(true, |s| s.committed < 5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node applies the log");

    // A node in no configuration: acknowledged, never in the table. (Gossip in the node's own
    // name is ignored too: `grpc_fuzz.rs::gossip_in_the_nodes_own_name_is_ignored`.)
    c().gossip(gossip(99, 1, 3)).await.unwrap();
    // Node 2, a member: its committed ts believed up to the log's end (5) and no further, its
    // UST view beyond the log not at all.
    c().gossip(gossip(2, 1, 4)).await.unwrap();
    c().gossip(gossip(2, 2, u64::MAX)).await.unwrap();
    let s = status(c()).await.unwrap();
    let peers: Vec<(u64, u64, u64)> = s
        .peers
        .iter()
        .map(|p| (p.node_id, p.committed, p.ust))
        .collect();
    assert_eq!(
        peers,
        [(2, 5, 4)],
        "a stranger entered the table, or a committed ts beyond the log was believed"
    );
    assert!(s.ust <= 5, "UST {} beyond the log's end", s.ust);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_the_limit_are_shed_while_gossip_is_still_served() {
    let tuning = Tuning {
        max_concurrent_requests: 1,
        ..Tuning::default()
    };
    let node = Node::start_tuned(Security::default(), 0, tuning).await;
    let link = Link::open();
    // One client waits for a UST the log never reaches: the node's only place is taken.
    let mut waiting = client(&link, &node.addr);
    let wait = tokio::spawn(async move {
        waiting
            .wait_for_ust(pb::WaitForUstRequest {
                ts: 1_000_000,
                timeout_ms: 1_500,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = client(&link, &node.addr)
        .read(pb::ReadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    // Gossip and status are not clients' requests: served.
    client(&link, &node.addr)
        .gossip(gossip(2, 1, 0))
        .await
        .expect("gossip is served while clients are shed");
    status(client(&link, &node.addr)).await.unwrap();
    wait.await.unwrap().expect("the waiting client is answered");
    // The place is free again.
    let again = client(&link, &node.addr)
        .wait_for_ust(pb::WaitForUstRequest {
            ts: 0,
            timeout_ms: 100,
        })
        .await;
    assert!(again.is_ok(), "{again:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mutual_tls_a_connection_that_never_finishes_its_handshake_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Authority::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let security = tls_security(dir.path(), &ca, Role::StoreNode(1));
    let node = Node::start(security, 0).await;
    // One connection sends nothing; another the start of a ClientHello (a record of 512 bytes,
    // 40 of them sent: past the first bytes every connection must send, so only the handshake
    // timeout can close it) and no more.
    let silent = tokio::net::TcpStream::connect(&node.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(&node.addr).await.unwrap();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(45, 0);
    partial.write_all(&hello).await.unwrap();
    let started = std::time::Instant::now();
    let closed = |mut tcp: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        // The server answers nothing before the handshake; the read ends at its close.
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let silent = tokio::spawn(closed(silent));
    let partial = tokio::spawn(closed(partial));

    // Meanwhile a client with a certificate is served.
    let api = with_tls(&ca, Role::ApiServer);
    tokio::time::timeout(DEADLINE, status(client(&api, &node.addr)))
        .await
        .unwrap()
        .expect("a client is served while two handshakes hang");

    let bound = causeway_proto::link::HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    for (what, conn) in [("silent", silent), ("partial", partial)] {
        tokio::time::timeout(bound.saturating_sub(started.elapsed()), conn)
            .await
            .unwrap_or_else(|_| panic!("the {what} connection is still open after {bound:?}"))
            .unwrap();
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_or_half_a_preface_loses_its_place() {
    use tokio::io::AsyncWriteExt;
    let tuning = Tuning {
        max_connections: 1,
        http2_keepalive_ms: 300,
        ..Tuning::default()
    };
    let node = Node::start_tuned(Security::default(), 0, tuning).await;
    // A new client's status call, within `wait`.
    let new_client = |wait| tokio::time::timeout(wait, status(client(&Link::open(), &node.addr)));
    for opening in [&b""[..], b"PRI * HTTP/2"] {
        // The only place, taken by a connection that sends nothing, or the start of the
        // HTTP/2 preface, and stops.
        let mut silent = tokio::net::TcpStream::connect(&node.addr).await.unwrap();
        silent.write_all(opening).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Served once the silent connection has been closed.
        let served = new_client(Duration::from_secs(5)).await;
        assert!(
            matches!(served, Ok(Ok(_))),
            "a silent connection ({opening:?}) kept the only place: {served:?}"
        );
    }
    // The cap holds: while a client's connection is open, another waits; then it is served.
    let first = client(&Link::open(), &node.addr);
    status(first.clone()).await.unwrap();
    let waited = new_client(Duration::from_millis(500)).await;
    assert!(
        !matches!(waited, Ok(Ok(_))),
        "a connection past the cap was served"
    );
    drop(first);
    let served = new_client(Duration::from_secs(5)).await;
    assert!(
        matches!(served, Ok(Ok(_))),
        "the place was not freed: {served:?}"
    );
    node.stop().await;
}
