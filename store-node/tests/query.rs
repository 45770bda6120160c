//! Collection queries on two in-process store nodes (2×1: a partition each, one embedded
//! log): paging through ordered and unordered results, the work limits of a page, and
//! cursors that hold their read timestamp while writes and GC go on.

mod common;

use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_core::query::Order;
use causeway_core::{ClusterConfig, KeyHash, NodeId, NodeInfo, Timestamp};
use causeway_proto::v1 as pb;
use causeway_proto::v1::store_node_client::StoreNodeClient;
use causeway_store_node::state::Configs;
use causeway_store_node::{Handle, Options, Service, Store, Tuning};
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use common::*;
use prost::Message;
use serde_json::{json, Value as Json};
use tonic::transport::Channel;

/// A running cluster of two nodes, one partition each (2×1), sharing one embedded log; queries
/// go to the first node, which scans the second's partition over gRPC.
struct Node {
    client: StoreNodeClient<Channel>,
    handle: Handle,
    log: TxLog,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    running: Vec<tokio::task::JoinHandle<Result<(), causeway_store_node::ServiceError>>>,
    _dirs: Vec<tempfile::TempDir>,
}

/// A free loopback port (bound, then released for the node to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    async fn start(tuning: Tuning) -> Node {
        let log_dir = tempfile::tempdir().unwrap();
        let log_options = LogOptions::Embedded(EmbeddedOptions::new(log_dir.path()));
        let log = TxLog::open(log_options.clone()).await.unwrap();
        let infos: Vec<NodeInfo> = (1..=2)
            .map(|n| NodeInfo {
                id: NodeId(n),
                addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let config = Arc::new(ClusterConfig::bootstrap(2, 1, &infos).unwrap());
        let mut dirs = vec![log_dir];
        let (mut stops, mut running, mut handles) = (Vec::new(), Vec::new(), Vec::new());
        for info in &infos {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            {
                let store = Store::open(&data, small_options()).unwrap();
                Configs {
                    revision: 1,
                    current: Some(Arc::clone(&config)),
                    next: None,
                }
                .save(&store)
                .unwrap();
            }
            let options = Options {
                node_id: info.id,
                listen: info.addr.parse().unwrap(),
                advertise: None,
                admin_listen: None,
                data_dir: data,
                config_manager: "127.0.0.1:1".into(),
                log: log_options.clone(),
                store: small_options(),
                tuning: tuning.clone(),
                security: Default::default(),
            };
            let service = Service::bind_with_log(options, log.clone()).await.unwrap();
            handles.push(service.handle());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            running.push(tokio::spawn(service.run(async {
                let _ = stopped.await;
            })));
            stops.push(stop);
            dirs.push(dir);
        }
        let client = StoreNodeClient::connect(format!("http://{}", infos[0].addr))
            .await
            .unwrap();
        Node {
            client,
            handle: handles.swap_remove(0),
            log,
            stops,
            running,
            _dirs: dirs,
        }
    }

    /// Writes `docs` (replacing them), 50 to a record; returns the last record's ts.
    async fn put(&self, collection: &str, docs: &[(String, Json)]) -> Timestamp {
        let records = docs
            .chunks(50)
            .map(|chunk| {
                let mutations = chunk
                    .iter()
                    .map(|(id, json)| replace(collection, id, json))
                    .collect();
                tx(mutations, 1_700_000_000_000).encode_to_vec().into()
            })
            .collect();
        *self.log.append(records).await.unwrap().last().unwrap()
    }

    async fn page(
        &self,
        collection: &str,
        query: &Json,
        cursor: Option<&str>,
        min_ts: Timestamp,
        max_scanned: u32,
    ) -> Result<pb::QueryResponse, tonic::Status> {
        self.client
            .clone()
            .query(pb::QueryRequest {
                collection: collection.into(),
                query: query.to_string(),
                cursor: cursor.unwrap_or_default().into(),
                min_ts: min_ts.get(),
                timeout_ms: 10_000,
                max_scanned,
                at_ts: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every page of `query` (at most `max_pages`), with how many were partial and empty.
    async fn all_pages(
        &self,
        collection: &str,
        query: &Json,
        min_ts: Timestamp,
        max_scanned: u32,
        max_pages: usize,
    ) -> (Vec<pb::Document>, usize) {
        let mut docs = Vec::new();
        let mut empty_partial = 0;
        let mut cursor: Option<String> = None;
        for _ in 0..max_pages {
            let page = self
                .page(collection, query, cursor.as_deref(), min_ts, max_scanned)
                .await
                .unwrap();
            if let Some(limit) = query["limit"].as_u64() {
                assert!(page.documents.len() as u64 <= limit);
            }
            if page.documents.is_empty() && page.cursor.is_some() {
                assert!(page.partial, "an empty page with a cursor is partial");
                empty_partial += 1;
            }
            docs.extend(page.documents);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return (docs, empty_partial),
            }
        }
        panic!("no end after {max_pages} pages ({} documents)", docs.len());
    }

    async fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for running in self.running {
            tokio::time::timeout(Duration::from_secs(30), running)
                .await
                .expect("the node stops")
                .unwrap()
                .unwrap();
        }
    }
}

fn json_of(d: &pb::Document) -> Json {
    serde_json::from_slice(&d.json).unwrap()
}

/// The ids of `docs` in `order`, ties by key: what the pages must return, in this order.
fn expected(collection: &str, docs: &[(String, Json)], order: &Order) -> Vec<String> {
    let path = order.field_path();
    let mut sorted: Vec<&(String, Json)> = docs.iter().collect();
    sorted.sort_by(|a, b| {
        order
            .compare_keys(path.lookup(&a.1), path.lookup(&b.1))
            .then_with(|| {
                let ka = (KeyHash::of(collection, &a.0).get(), &a.0);
                let kb = (KeyHash::of(collection, &b.0).get(), &b.0);
                ka.cmp(&kb)
            })
    });
    sorted.into_iter().map(|(id, _)| id.clone()).collect()
}

fn ids(docs: &[pb::Document]) -> Vec<String> {
    docs.iter().map(|d| d.id.clone()).collect()
}

/// Documents whose sort keys are missing, null, inside arrays (present or not), of every JSON
/// type, tied, and floats that do not survive a text round trip in every parser.
fn mixed_documents() -> Vec<(String, Json)> {
    let values = [
        json!(null),
        json!(true),
        json!(false),
        json!(3),
        json!(-7),
        json!(0.1 + 0.2),
        json!(1e300),
        json!(2.5),
        json!(u64::MAX),
        json!("b"),
        json!(""),
        json!([1, 2]),
        json!({"k": 1}),
        json!(3),
    ];
    let mut docs = Vec::new();
    for (i, v) in values.iter().enumerate() {
        docs.push((
            format!("a{i}"),
            json!({"v": [{"k": v.clone()}], "m": v.clone()}),
        ));
        docs.push((format!("b{i}"), json!({"v": [{"k": v.clone()}, 0]})));
    }
    for i in 0..6 {
        // No `v` and no `m`; an empty array; an element without `k`; `v` not an array.
        docs.push((format!("c{i}"), json!({"other": i})));
        docs.push((format!("d{i}"), json!({"v": [], "m": null})));
        docs.push((format!("e{i}"), json!({"v": [{"j": i}]})));
        docs.push((format!("f{i}"), json!({"v": {"0": {"k": i}}})));
    }
    docs
}

/// Paging with a small limit through an ordered query visits every document once, in order,
/// whatever the sort key is: missing (before null ascending, after everything descending),
/// null, reached through an array index, of any type, tied. Before, a missing key was taken
/// as null in the cursor (the documents without it after the first page were skipped), and a
/// path through an array could not be looked up (the first page came back forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_pages_visit_every_document_once_in_order() {
    let node = Node::start(Tuning::default()).await;
    let docs = mixed_documents();
    let ts = node.put("mixed", &docs).await;
    for (path, descending, limit) in [
        ("v.0.k", false, 3),
        ("v.0.k", true, 4),
        ("m", false, 5),
        ("m", true, 1),
    ] {
        let order = Order {
            path: path.into(),
            descending,
        };
        let query = json!({"order": {"path": path, "descending": descending}, "limit": limit});
        let (got, _) = node.all_pages("mixed", &query, ts, 0, 200).await;
        assert_eq!(
            ids(&got),
            expected("mixed", &docs, &order),
            "order {path} descending {descending}"
        );
    }
    // A filter with the order: still once each, in order.
    let query = json!({"filter": {"m": {"$exists": true}}, "order": {"path": "m"}, "limit": 2});
    let (got, _) = node.all_pages("mixed", &query, ts, 0, 100).await;
    let with_m: Vec<(String, Json)> = docs
        .iter()
        .filter(|(_, j)| j.get("m").is_some())
        .cloned()
        .collect();
    let order = Order {
        path: "m".into(),
        descending: false,
    };
    assert_eq!(ids(&got), expected("mixed", &with_m, &order));
    node.stop().await;
}

/// An ordered query over more documents than a page may examine answers partial pages with a
/// cursor, and following the cursors returns every match once, in order (it answered
/// RESOURCE_EXHAUSTED, a 503 at the api-server). The small cursor budget makes a pass carry
/// fewer candidates than the limit, so the pages also stop short of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_query_beyond_the_scan_budget_pages_partially_and_completely() {
    let node = Node::start(Tuning {
        query_max_cursor_bytes: 300,
        ..Tuning::default()
    })
    .await;
    let docs: Vec<(String, Json)> = (0..300)
        .map(|i| {
            let n = if i % 7 == 0 {
                json!(null)
            } else {
                json!(i % 37)
            };
            (format!("doc-{i:03}"), json!({"n": n, "odd": i % 2 == 1}))
        })
        .collect();
    let ts = node.put("big", &docs).await;
    let order = Order {
        path: "n".into(),
        descending: true,
    };
    // 40 documents examined per page over two partitions: a pass takes about eight pages.
    let query = json!({"order": {"path": "n", "descending": true}, "limit": 10});
    let (got, empty) = node.all_pages("big", &query, ts, 40, 5_000).await;
    assert_eq!(ids(&got), expected("big", &docs, &order));
    assert!(empty > 0, "no page was partial");
    let query = json!({"filter": {"odd": true}, "order": {"path": "n"}, "limit": 6});
    let (got, _) = node.all_pages("big", &query, ts, 40, 5_000).await;
    let odd: Vec<(String, Json)> = docs
        .iter()
        .filter(|(_, j)| j["odd"] == json!(true))
        .cloned()
        .collect();
    assert_eq!(
        ids(&got),
        expected(
            "big",
            &odd,
            &Order {
                path: "n".into(),
                descending: false
            }
        )
    );
    node.stop().await;
}

/// A page stops at its byte budget (with at least one document) and its cursor leads to the
/// rest, ordered or not; a page stops at its time budget too (0 ms: one storage step per
/// partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_its_byte_and_time_budgets() {
    let node = Node::start(Tuning {
        query_max_page_bytes: 4_000,
        ..Tuning::default()
    })
    .await;
    let pad = "x".repeat(480);
    let docs: Vec<(String, Json)> = (0..40)
        .map(|i| (format!("p{i}"), json!({"i": i, "pad": pad})))
        .collect();
    let ts = node.put("padded", &docs).await;
    let first = node
        .page("padded", &json!({"limit": 100}), None, ts, 0)
        .await
        .unwrap();
    let bytes: usize = first.documents.iter().map(|d| d.json.len()).sum();
    assert!(!first.documents.is_empty());
    assert!(
        first.documents.len() < 40,
        "the page ignored its byte budget"
    );
    assert!(bytes <= 4_000 + 500, "{bytes} bytes in one page");
    assert!(first.partial && first.cursor.is_some());
    let (all, _) = node
        .all_pages("padded", &json!({"limit": 100}), ts, 0, 100)
        .await;
    let mut seen: Vec<String> = ids(&all);
    seen.sort();
    let mut want: Vec<String> = docs.iter().map(|(id, _)| id.clone()).collect();
    want.sort();
    assert_eq!(seen, want, "every document once");
    let query = json!({"order": {"path": "i"}, "limit": 100});
    let first = node.page("padded", &query, None, ts, 0).await.unwrap();
    assert!(
        first.documents.len() < 40,
        "the ordered page ignored its byte budget"
    );
    let (all, _) = node.all_pages("padded", &query, ts, 0, 100).await;
    let want: Vec<Json> = (0..40).map(|i| json!(i)).collect();
    assert_eq!(
        all.iter()
            .map(|d| json_of(d)["i"].clone())
            .collect::<Vec<_>>(),
        want
    );
    node.stop().await;

    let node = Node::start(Tuning {
        query_max_page_ms: 0,
        ..Tuning::default()
    })
    .await;
    let docs: Vec<(String, Json)> = (0..2_000)
        .map(|i| (format!("t{i}"), json!({"i": i})))
        .collect();
    let ts = node.put("many", &docs).await;
    let first = node
        .page("many", &json!({"limit": 1000}), None, ts, 0)
        .await
        .unwrap();
    assert!(
        first.partial && first.cursor.is_some(),
        "the page ignored its time budget"
    );
    assert!(first.scanned <= 2 * 256, "scanned {}", first.scanned);
    let (all, _) = node
        .all_pages("many", &json!({"limit": 1000}), ts, 0, 100)
        .await;
    assert_eq!(
        all.iter()
            .map(|d| d.id.clone())
            .collect::<HashSet<_>>()
            .len(),
        2_000
    );
    assert_eq!(all.len(), 2_000);
    node.stop().await;
}

/// Writes to another collection, one record every 10 ms, until the returned flag is set.
fn keep_writing(
    node: &Node,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = node.log.clone();
    let flag = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut i = 0u64;
        // Bounded: at most five minutes of writes.
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && i < 30_000 {
            let record = tx(
                vec![replace("churn", &format!("w{}", i % 20), &json!({"i": i}))],
                1_700_000_000_000,
            );
            log.append(vec![record.encode_to_vec().into()])
                .await
                .unwrap();
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (stop, task)
}

/// Waits (bounded) until the node's GC timestamp is above `ts`.
async fn wait_gc_above(handle: &Handle, ts: Timestamp, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if handle.decided().decisions.gc > ts && handle.store().gc_watermark() > ts {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A cursor holds its read timestamp while the client pages slowly and writes and GC go on:
/// every page is served (without the lease, GC passed the cursor's timestamp within
/// milliseconds and the second page answered "garbage collected").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_pages_to_the_end_while_writes_and_gc_go_on() {
    let node = Node::start(Tuning {
        gc_interval_ms: 5,
        ..Tuning::default()
    })
    .await;
    let docs: Vec<(String, Json)> = (0..60)
        .map(|i| (format!("s{i}"), json!({"i": i})))
        .collect();
    let ts = node.put("slow", &docs).await;
    let (stop, writer) = keep_writing(&node);
    let query = json!({"order": {"path": "i"}, "limit": 10});
    let mut cursor: Option<String> = None;
    let mut seen = Vec::new();
    let mut first_at = None;
    for page_no in 0..20 {
        let page = node
            .page("slow", &query, cursor.as_deref(), ts, 0)
            .await
            .unwrap_or_else(|e| panic!("page {page_no}: {e}"));
        first_at.get_or_insert(page.at.unwrap().ts);
        assert_eq!(page.at.unwrap().ts, first_at.unwrap());
        seen.extend(page.documents.iter().map(|d| json_of(d)["i"].clone()));
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        if page_no == 0 {
            // Writes went on past the cursor's timestamp, and GC would have passed it.
            let at = Timestamp(first_at.unwrap());
            let deadline = Instant::now() + Duration::from_secs(10);
            while handle_ust(&node.handle) <= Timestamp(at.get() + 20) {
                assert!(Instant::now() < deadline, "the UST does not move");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                node.handle.decided().decisions.gc <= at,
                "GC passed a leased cursor"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(seen, (0..60).map(|i| json!(i)).collect::<Vec<_>>());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    node.stop().await;
}

fn handle_ust(handle: &Handle) -> Timestamp {
    handle.decided().decisions.ust
}

/// A cursor whose lease ended is gone once GC passes its timestamp: FAILED_PRECONDITION (410 at
/// the api-server), never a wrong page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_whose_lease_ended_is_gone() {
    let node = Node::start(Tuning {
        gc_interval_ms: 5,
        query_cursor_lease_ms: 300,
        ..Tuning::default()
    })
    .await;
    let docs: Vec<(String, Json)> = (0..30)
        .map(|i| (format!("g{i}"), json!({"i": i})))
        .collect();
    let ts = node.put("gone", &docs).await;
    let first = node
        .page("gone", &json!({"limit": 10}), None, ts, 0)
        .await
        .unwrap();
    let at = Timestamp(first.at.unwrap().ts);
    let cursor = first.cursor.unwrap();
    let (stop, writer) = keep_writing(&node);
    assert!(
        wait_gc_above(&node.handle, at, Duration::from_secs(20)).await,
        "the lease never ended"
    );
    let err = node
        .page("gone", &json!({"limit": 10}), Some(&cursor), ts, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("garbage collected"), "{err}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    node.stop().await;
}

/// Cursors that do not belong to the query are refused as invalid, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_forged_cursors_are_invalid() {
    let node = Node::start(Tuning::default()).await;
    let docs: Vec<(String, Json)> = (0..10)
        .map(|i| (format!("k{i}"), json!({"i": i})))
        .collect();
    let ts = node.put("c", &docs).await;
    let ordered = json!({"order": {"path": "i"}, "limit": 3});
    let page = node.page("c", &ordered, None, ts, 0).await.unwrap();
    let cursor = page.cursor.unwrap();
    for (query, cursor) in [
        (json!({"limit": 3}), cursor.clone()),
        (ordered.clone(), "zz".to_owned()),
        (ordered.clone(), cursor.replace("6b", "6c")),
    ] {
        let err = node
            .page("c", &query, Some(&cursor), ts, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    let err = node
        .page("other", &ordered, Some(&cursor), ts, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let _ = Ordering::Equal;
    node.stop().await;
}
