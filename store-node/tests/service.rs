//! The node service on its own: what it does at start with the state it saved.

mod common;

use std::sync::Arc;
use std::time::Duration;

use causeway_core::{ClusterConfig, NodeId, NodeInfo};
use causeway_store_node::state::Configs;
use causeway_store_node::{Options, Service, ServiceError, Store};
use causeway_txlog::{EmbeddedOptions, LogOptions};
use common::*;

/// A data dir that applied 20 records of one log, started on another (empty) log, as after the
/// topic was recreated: the node stops with a clear error instead of waiting or skipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_ends_below_the_applied_position_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = Store::open(&data, small_options()).unwrap();
        apply_stream(&store, 1, 1, 20, 5, 10);
        // The node serves from its saved configurations while the config manager is away.
        let config = ClusterConfig::bootstrap(
            1,
            1,
            &[NodeInfo {
                id: NodeId(1),
                addr: "127.0.0.1:1".into(),
            }],
        )
        .unwrap();
        let saved = Configs {
            revision: 1,
            current: Some(Arc::new(config)),
            next: None,
        };
        saved.save(&store).unwrap();
    }
    let log_dir = tempfile::tempdir().unwrap();
    let options = Options {
        node_id: NodeId(1),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        admin_listen: None,
        data_dir: data,
        // Nothing listens there: the node never reaches a config manager.
        config_manager: "127.0.0.1:1".into(),
        log: LogOptions::Embedded(EmbeddedOptions::new(log_dir.path())),
        store: small_options(),
        tuning: Default::default(),
    };
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
