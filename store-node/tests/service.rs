//! The node service on its own: what it does at start with the state it saved.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use causeway_core::NodeId;
use causeway_core::Timestamp;
use causeway_store_node::{Options, Service, ServiceError, Store, StoreOptions};
use causeway_txlog::{EmbeddedOptions, LogOptions, TxLog};
use common::*;
use prost::Message;

/// The options of node 1 on `data`, with a config manager address nothing listens on.
fn one_node_options(data: PathBuf, log: LogOptions, store: StoreOptions) -> Options {
    Options {
        node_id: NodeId(1),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        admin_listen: None,
        data_dir: data,
        config_manager: "127.0.0.1:1".into(),
        log,
        store,
        tuning: Default::default(),
        security: Default::default(),
    }
}

/// A data dir that applied 20 records of one log, started on another (empty) log, as after the
/// topic was recreated: the node stops with a clear error instead of waiting or skipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_ends_below_the_applied_position_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = Store::open(&data, small_options()).unwrap();
        apply_stream(&store, 1, 1, 20, 5, 10);
        save_one_node_config(&store);
    }
    let log_dir = tempfile::tempdir().unwrap();
    let options = one_node_options(
        data,
        LogOptions::Embedded(EmbeddedOptions::new(log_dir.path())),
        small_options(),
    );
    let service = Service::bind(options).await.unwrap();
    let ran = tokio::time::timeout(Duration::from_secs(30), service.run(std::future::pending()))
        .await
        .expect("the node stops by itself");
    match ran {
        Err(ServiceError::Apply(message)) => assert!(
            message.contains("the log ends at 0 but this node has applied up to 20"),
            "{message}"
        ),
        other => panic!("the node did not stop on the mismatch: {other:?}"),
    }
}

/// With `store.sync_writes` off, apply does not fsync its groups: the node's sync task does, and
/// the committed ts follows the log all the same (without it the committed ts, and the UST with
/// it, would stay where the node started). What it committed is on disk after a stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_synced_writes_the_sync_task_advances_the_committed_ts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    save_one_node_config(&Store::open(&data, small_options()).unwrap());
    let log_dir = tempfile::tempdir().unwrap();
    let log_options = LogOptions::Embedded(EmbeddedOptions::new(log_dir.path()));
    let log = TxLog::open(log_options.clone()).await.unwrap();
    let store = StoreOptions {
        sync_writes: false,
        ..small_options()
    };
    let service = Service::bind_with_log(
        one_node_options(data.clone(), log_options, store),
        log.clone(),
    )
    .await
    .unwrap();
    let handle = service.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(service.run(async {
        let _ = stopped.await;
    }));
    // Five appends of 40 records, each after the previous one is committed.
    for batch in 0..5u64 {
        let records = (1..=40)
            .map(|i| {
                let ts = batch * 40 + i;
                stream_record(3, ts, 30).1.encode_to_vec().into()
            })
            .collect();
        let last = *log.append(records).await.unwrap().last().unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            while handle.committed() < last {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("committed stayed at {} below {last}", handle.committed()));
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the node stops")
        .unwrap()
        .unwrap();
    log.close().await.unwrap();
    drop(handle);
    let reopened = Store::open(&data, small_options()).unwrap();
    assert_eq!(reopened.applied(), Timestamp(200));
}
