//! The `causeway-config-manager` binary: starts from flags or a JSON file, serves, keeps its state
//! across restarts, and exits cleanly on SIGTERM.

use causeway_proto::link::Link;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causeway_config_manager::Client;
use causeway_core::{Epoch, NodeId, NodeInfo};

const DEADLINE: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_causeway-config-manager"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the binary starts")
}

async fn connect(addr: &str) -> Client {
    let start = Instant::now();
    loop {
        if let Ok(c) = Client::connect(addr, &Link::open()).await {
            if c.get_config().await.is_ok() {
                return c;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the binary did not serve on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(start.elapsed() < DEADLINE, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_binary_serves_keeps_its_state_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let child = spawn(
        &["--listen", &addr, "--data-dir", data.to_str().unwrap()],
        &dir.path().join("first.log"),
    );
    let c = connect(&addr).await;
    c.register(&NodeInfo {
        id: NodeId(7),
        addr: "127.0.0.1:7007".into(),
    })
    .await
    .unwrap();
    let pair = c.bootstrap(1, 1).await.unwrap();
    let mut watch = c.watch().await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap(), pair);
    terminate(child).await;

    let addr = format!("127.0.0.1:{}", free_port());
    let file = dir.path().join("options.json");
    std::fs::write(
        &file,
        serde_json::json!({ "listen_addr": addr, "data_dir": data, "heartbeat_timeout_ms": 3000 })
            .to_string(),
    )
    .unwrap();
    let child = spawn(
        &["--config", file.to_str().unwrap()],
        &dir.path().join("second.log"),
    );
    let c = connect(&addr).await;
    let again = c.get_config().await.unwrap();
    assert_eq!(again, pair);
    assert_eq!(again.current_epoch(), Epoch(1));
    terminate(child).await;
}
