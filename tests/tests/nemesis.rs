//! The fault and consistency suite, bounded for CI: one 2×2 cluster on the real broker, two
//! api-servers, and the load (`causeway_tests::load`: unique writes and their reads, bank
//! transfers and snapshot reads, causal sessions) recording every operation, while nemeses act
//! one after the other, each undone before the next: kill -9 and restart of a store node, a
//! SIGSTOP pause of one, kill -9 and restart of the config manager and of an api-server. The run
//! ends with final reads through both api-servers, and the history is judged by
//! `causeway_tests::history::check`: any anomaly fails the test. Requests that fail during a
//! fault (unavailability, not an anomaly) are counted per fault and printed with the time the
//! cluster took to serve a causal write and read again through every api-server, the figures
//! of RELIABILITY.md.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_core::NodeId;
use causeway_tests::load::{Load, LoadSpec};
use causeway_tests::{until, ClusterSpec, LocalCluster, API_TOKEN};
use serde_json::json;

/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(5);
/// The longest the cluster may take to serve again after a fault is undone.
const RECOVERY: Duration = Duration::from_secs(60);

/// One fault: what it does and how it is undone.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    KillStoreNode(NodeId),
    PauseStoreNode(NodeId),
    KillConfigManager,
    KillApiServer(usize),
}

impl Nemesis {
    fn name(self) -> String {
        match self {
            Nemesis::KillStoreNode(n) => format!("kill -9 store node {n}"),
            Nemesis::PauseStoreNode(n) => format!("SIGSTOP store node {n}"),
            Nemesis::KillConfigManager => "kill -9 config manager".into(),
            Nemesis::KillApiServer(i) => format!("kill -9 api-server {}", i + 1),
        }
    }

    fn inject(self, cluster: &mut LocalCluster) -> Result<()> {
        match self {
            Nemesis::KillStoreNode(n) => cluster.kill(n),
            Nemesis::PauseStoreNode(n) => cluster.pause(n),
            Nemesis::KillConfigManager => cluster.kill_config_manager(),
            Nemesis::KillApiServer(i) => cluster.kill_api_server(i),
        }
    }

    async fn undo(self, cluster: &mut LocalCluster) -> Result<()> {
        match self {
            Nemesis::KillStoreNode(n) => cluster.restart(n),
            Nemesis::PauseStoreNode(n) => cluster.resume(n),
            Nemesis::KillConfigManager => cluster.restart_config_manager(),
            Nemesis::KillApiServer(i) => cluster.restart_api_server(i).await,
        }
    }
}

/// How long until a write through each api-server is read back through every api-server at
/// `Causeway-After` its ts.
async fn recovery(cluster: &LocalCluster) -> Result<Duration> {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let urls = cluster.api_urls();
    until(
        "the cluster to serve causal writes and reads again",
        RECOVERY,
        || {
            let (http, urls) = (http.clone(), urls.clone());
            async move {
                for (i, url) in urls.iter().enumerate() {
                    let doc = format!("{url}/v1/collections/nemesis_probe/documents/p{i}");
                    let answer = http
                        .put(&doc)
                        .bearer_auth(API_TOKEN)
                        .json(&json!({"at": started.elapsed().as_millis() as u64}))
                        .send()
                        .await
                        .ok()?;
                    let ts: u64 = answer.json::<serde_json::Value>().await.ok()?["ts"].as_u64()?;
                    for reader in &urls {
                        let path = doc.replacen(url, reader, 1);
                        let read = http
                            .get(&path)
                            .bearer_auth(API_TOKEN)
                            .header("Causeway-After", ts.to_string())
                            .send()
                            .await
                            .ok()?;
                        read.status().is_success().then_some(())?;
                    }
                }
                Some(())
            }
        },
    )
    .await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nemesis_under_load_leaves_no_anomaly() {
    let mut cluster = LocalCluster::start(ClusterSpec::new(2, 2)).await.unwrap();
    cluster.start_api_servers(2).await.unwrap();
    let spec = LoadSpec {
        request_timeout: Duration::from_secs(3),
        max_duration: Duration::from_secs(300),
        ..LoadSpec::default()
    };
    let load = Load::start(cluster.api_urls(), spec).await.unwrap();
    until("the load to flow", Duration::from_secs(30), || async {
        (load.completed() > 100).then_some(())
    })
    .await
    .unwrap();

    let nodes = cluster.node_ids();
    let nemeses = [
        Nemesis::KillStoreNode(nodes[0]),
        Nemesis::PauseStoreNode(nodes[3]),
        Nemesis::KillConfigManager,
        Nemesis::KillApiServer(1),
    ];
    let mut recoveries = Vec::new();
    for nemesis in nemeses {
        load.mark(&nemesis.name());
        nemesis.inject(&mut cluster).unwrap();
        tokio::time::sleep(FAULT).await;
        nemesis.undo(&mut cluster).await.unwrap();
        load.mark(&format!("after {}", nemesis.name()));
        let recovered = recovery(&cluster).await;
        let recovered = match recovered {
            Ok(d) => d,
            Err(e) => panic!("{}: {e}\n{}", nemesis.name(), cluster.logs()),
        };
        recoveries.push((nemesis.name(), recovered));
        // A quiet moment between faults, so that each phase is the fault's alone.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let report = load.stop().await;
    println!("{report}");
    for (name, took) in &recoveries {
        println!("recovery after {name}: {took:?}");
    }
    assert!(
        report.consistency.is_clean(),
        "anomalies:\n{}",
        report.consistency
    );
    assert_eq!(report.violation_count, 0, "{report}");
    assert!(report.consistency.ops > 500, "{report}");
    if let Err(e) = check_final_state(&cluster).await {
        panic!("{e}");
    }
}

/// Every replica of every partition agrees once the faults are over.
async fn check_final_state(cluster: &LocalCluster) -> Result<()> {
    if cluster
        .verify_replicas_agree(Duration::from_secs(60))
        .await
        .is_err()
    {
        bail!("the replicas disagree after the faults\n{}", cluster.logs());
    }
    Ok(())
}
