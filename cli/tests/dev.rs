//! The real `causeway` binary end to end: `causeway dev` on a temp data dir and a free loopback
//! port serves documents; after SIGINT it stops cleanly; restarted on the same data dir it serves
//! the same documents with the same token; `causeway admin status` describes it; a different
//! shape on that data dir is refused; `--kafka` runs it on a topic of the test broker and keeps the
//! data dir to that log; `causeway admin scale` against it has dev start the spare node it needs,
//! which a restart starts again, and `scale --ensure` (as the Helm hooks run it) is a no-op at
//! the shape, leaves a shrink to `--only fewer-nodes`, which drains the highest id; bad `admin` input is refused and changes nothing; the cdc
//! service runs beside it, and `causeway admin feeds` creates and pauses a feed that a restart
//! keeps. Every wait has a deadline; set `CAUSEWAY_KEEP_TEST_DIR=1` to keep the data dir for
//! inspection.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_causeway");
/// Start-up of a debug build with two RocksDB nodes; generous for a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(45);
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// A running `causeway dev`, killed if the test fails before stopping it.
struct Dev {
    child: Option<Child>,
    log: PathBuf,
}

impl Dev {
    fn start(data_dir: &Path, port: u16, extra: &[&str], log: PathBuf) -> Result<Dev> {
        let out = std::fs::File::create(&log)?;
        let child = dev_command(data_dir, port, extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning causeway dev")?;
        Ok(Dev {
            child: Some(child),
            log,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT, then waits for the exit.
    fn interrupt(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -INT failed");
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        bail!(
            "causeway dev did not stop within {STOP_DEADLINE:?}\n{}",
            self.output()
        )
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The note `id` as a read after `ts` sees it.
async fn get_note(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    ts: u64,
) -> Result<Value> {
    Ok(http
        .get(format!("{base}/v1/collections/notes/documents/{id}"))
        .bearer_auth(token)
        .header("causeway-after", ts.to_string())
        .send()
        .await?
        .json()
        .await?)
}

/// `causeway dev --data-dir DATA_DIR --listen 127.0.0.1:PORT --cdc-listen 127.0.0.1:0 EXTRA…`
/// (the tests run side by side: the cdc service takes a free port).
fn dev_command(data_dir: &Path, port: u16, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("dev")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--cdc-listen", "127.0.0.1:0"])
        .args(extra);
    command
}

/// Runs `causeway dev` with `extra` flags on `data_dir`, which must refuse to start; its stderr.
fn refused(data_dir: &Path, port: u16, extra: &[&str]) -> Result<String> {
    let out = dev_command(data_dir, port, extra).output()?;
    ensure!(!out.status.success(), "causeway dev {extra:?} started");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_token(data_dir: &Path) -> Result<String> {
    let tokens: Value = serde_json::from_slice(&std::fs::read(data_dir.join("tokens.json"))?)?;
    tokens["tokens"][0]["token"]
        .as_str()
        .map(str::to_owned)
        .context("no token")
}

/// Polls `/readyz`, then a read, until the API serves (404 for a missing document).
async fn wait_serving(
    http: &reqwest::Client,
    base: &str,
    dev: &Dev,
    data_dir: &Path,
) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if matches!(&ready, Ok(r) if r.status().is_success()) {
            if let Ok(token) = read_token(data_dir) {
                let r = http
                    .get(format!("{base}/v1/collections/notes/documents/missing"))
                    .bearer_auth(token)
                    .send()
                    .await?;
                // Serving, and the banner (URL, token, curl example) is printed.
                if r.status() == 404 && dev.output().contains("Ctrl-C stops the cluster") {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "causeway dev did not serve within {START_DEADLINE:?}\n{}",
        dev.output()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_documents_and_keeps_them_across_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;

    // First start: 2 partitions × 1 replica.
    let dev = Dev::start(
        &data_dir,
        port,
        &["--partitions", "2", "--replicas", "1"],
        dir.path().join("dev-1.log"),
    )?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    let token = read_token(&data_dir)?;
    assert!(dev.output().contains(&token), "the token is printed");
    assert!(dev.output().contains("curl"), "a curl example is printed");

    // Unauthenticated requests are refused.
    let r = http
        .get(format!("{base}/v1/collections/notes/documents/n-0"))
        .send()
        .await?;
    assert_eq!(r.status(), 401);

    let mut last_ts = 0u64;
    for i in 0..20 {
        let r = http
            .put(format!("{base}/v1/collections/notes/documents/n-{i}"))
            .bearer_auth(&token)
            .json(&json!({"i": i, "text": format!("note {i}")}))
            .send()
            .await?;
        ensure!(r.status() == 200, "PUT n-{i}: {}", r.status());
        let body: Value = r.json().await?;
        last_ts = last_ts.max(body["ts"].as_u64().context("no ts")?);
    }
    let r = http
        .post(format!("{base}/v1/transactions"))
        .bearer_auth(&token)
        .json(&json!({"mutations": [
            {"op": "increment", "collection": "accounts", "id": "alice", "path": "balance", "delta": -10},
            {"op": "increment", "collection": "accounts", "id": "bob", "path": "balance", "delta": 10},
        ]}))
        .send()
        .await?;
    ensure!(r.status() == 200, "transaction: {}", r.status());
    last_ts = last_ts.max(r.json::<Value>().await?["ts"].as_u64().context("no ts")?);

    let read_all = |after: u64| {
        let http = http.clone();
        let base = base.clone();
        let token = token.clone();
        async move {
            for i in 0..20 {
                let r = http
                    .get(format!("{base}/v1/collections/notes/documents/n-{i}"))
                    .bearer_auth(&token)
                    .header("causeway-after", after.to_string())
                    .send()
                    .await?;
                ensure!(r.status() == 200, "GET n-{i}: {}", r.status());
                let doc: Value = r.json().await?;
                ensure!(
                    doc == json!({"i": i, "text": format!("note {i}")}),
                    "n-{i}: {doc}"
                );
            }
            let r = http
                .post(format!("{base}/v1/documents:get"))
                .bearer_auth(&token)
                .header("causeway-after", after.to_string())
                .json(&json!({"keys": [{"collection": "accounts", "id": "alice"},
                                       {"collection": "accounts", "id": "bob"}]}))
                .send()
                .await?;
            ensure!(r.status() == 200, "multi-get: {}", r.status());
            let body: Value = r.json().await?;
            ensure!(
                body["documents"][0]["document"]["balance"] == -10
                    && body["documents"][1]["document"]["balance"] == 10,
                "accounts: {body}"
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    read_all(last_ts).await?;

    // `admin status` describes the running cluster.
    let status = Command::new(BIN)
        .args(["admin", "status", "--json", "--data-dir"])
        .arg(&data_dir)
        .output()?;
    ensure!(
        status.status.success(),
        "admin status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status["epoch"], 1, "{status}");
    assert_eq!(
        status["partitions"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    for p in status["partitions"].as_array().context("partitions")? {
        assert_eq!(p["replicas"][0]["health"], "ok", "{status}");
    }
    let share: f64 = status["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .filter_map(|p| p["share"].as_f64())
        .sum();
    assert!((share - 1.0).abs() < 1e-9, "{status}");

    // The cdc service runs beside the cluster, at the address of the manifest and the banner.
    let cdc = manifest(&data_dir)?["cdc"]
        .as_str()
        .context("no cdc address in dev.json")?
        .to_owned();
    assert!(
        dev.output()
            .contains(&format!("causeway admin feeds list --cdc {cdc}")),
        "{}",
        dev.output()
    );
    let (ok, out, err) = admin(&["feeds", "list", "--json", "--cdc", &cdc])?;
    ensure!(ok, "feeds list: {err}");
    assert_eq!(serde_json::from_str::<Value>(&out)?, json!({"feeds": []}));
    let spec = dir.path().join("feed.json");
    std::fs::write(
        &spec,
        json!({
            "name": "audit-hook",
            "sink": {"type": "webhook", "url": "http://127.0.0.1:9/hook",
                     "secrets": ["whsec_MDEyMzQ1Njc4OWFiY2RlZg=="]},
            "collections": ["audit"],
        })
        .to_string(),
    )?;
    let spec = spec.to_str().context("a UTF-8 path")?;
    // Changes need the admin token; it is the data dir's.
    let (ok, _, err) = admin(&["feeds", "create", "--spec", spec, "--cdc", &cdc])?;
    assert!(!ok && err.contains("admin token"), "{err}");
    let wrong = "wrong-token-0123456789";
    let (ok, _, err) = admin(&[
        "feeds", "create", "--spec", spec, "--cdc", &cdc, "--token", wrong,
    ])?;
    assert!(!ok && err.contains("403 forbidden"), "{err}");
    let (ok, out, err) = admin(&[
        "feeds", "create", "--spec", spec, "--cdc", &cdc, "--token", &token,
    ])?;
    ensure!(ok, "feeds create: {err}");
    assert!(out.contains("created feed audit-hook"), "{out}");
    let (ok, _, err) = admin(&[
        "feeds", "create", "--spec", spec, "--cdc", &cdc, "--token", &token,
    ])?;
    assert!(!ok && err.contains("409"), "a second create: {err}");
    let (ok, out, err) = admin(&[
        "feeds",
        "pause",
        "audit-hook",
        "--cdc",
        &cdc,
        "--token",
        &token,
    ])?;
    ensure!(ok, "feeds pause: {err}");
    assert!(out.contains("paused feed audit-hook"), "{out}");
    let (ok, _, err) = admin(&["feeds", "show", "nope", "--cdc", &cdc])?;
    // The whole problem on the first line (anyhow adds a backtrace under RUST_BACKTRACE=1).
    let first = err.lines().next().unwrap_or_default();
    assert!(
        !ok && first.ends_with(r#": 404 feed not found: no feed is named "nope""#),
        "{err}"
    );

    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");

    // A different shape on this data dir is refused, quickly and clearly.
    let stderr = refused(&data_dir, port, &["--partitions", "3"])?;
    assert!(stderr.contains("holds a 2×1 cluster"), "{stderr}");

    // Restart on the same data dir (the shape comes from it): the same token, every document.
    let dev = Dev::start(&data_dir, port, &[], dir.path().join("dev-2.log"))?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    assert_eq!(read_token(&data_dir)?, token);
    read_all(last_ts).await?;
    // And it still takes writes.
    let r = http
        .patch(format!("{base}/v1/collections/notes/documents/n-0"))
        .bearer_auth(&token)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"text": "edited"}"#)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let ts = r.json::<Value>().await?["ts"].as_u64().context("no ts")?;
    assert!(
        ts > last_ts,
        "commit ts {ts} after a restart must exceed {last_ts}"
    );
    let doc = get_note(&http, &base, &token, "n-0", ts).await?;
    assert_eq!(doc, json!({"i": 0, "text": "edited"}));

    // The feed is still there, still paused, on the cdc service's new address; then it goes.
    let cdc = manifest(&data_dir)?["cdc"]
        .as_str()
        .context("no cdc address in dev.json")?
        .to_owned();
    let (ok, out, err) = admin(&["feeds", "list", "--cdc", &cdc])?;
    ensure!(ok, "feeds list: {err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("audit-hook "))
        .with_context(|| format!("no row for the feed:\n{out}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["webhook", "paused"], "{out}");
    let (ok, out, err) = admin(&[
        "feeds",
        "delete",
        "audit-hook",
        "--cdc",
        &cdc,
        "--token",
        &token,
    ])?;
    ensure!(ok, "feeds delete: {err}");
    assert!(out.contains("deleted feed audit-hook"), "{out}");
    let (ok, out, err) = admin(&["feeds", "list", "--cdc", &cdc])?;
    ensure!(ok, "feeds list: {err}");
    assert_eq!(out, "no feeds\n");

    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");
    if std::env::var_os("CAUSEWAY_KEEP_TEST_DIR").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    Ok(())
}

/// `causeway admin ARGS…`: (success, stdout, stderr).
fn admin(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(BIN)
        .arg("admin")
        .args(args)
        .env_remove("CAUSEWAY_CDC")
        .env_remove("CAUSEWAY_CDC_ADMIN_TOKEN")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `causeway admin …` with the cluster secret and the admin token of the dev data dir.
fn admin_of(data_dir: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let secret = data_dir.join("cluster-secret");
    let token = data_dir.join("admin-token");
    let mut all = args.to_vec();
    all.extend([
        "--cluster-secret-file",
        secret.to_str().context("path")?,
        "--admin-token-file",
        token.to_str().context("path")?,
    ]);
    admin(&all)
}

fn manifest(data_dir: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        data_dir.join("dev.json"),
    )?)?)
}

/// `admin status --json` of the dev cluster in `data_dir`.
fn status_json(data_dir: &Path) -> Result<Value> {
    let data_dir = data_dir.to_str().context("utf-8 path")?;
    let (ok, out, err) = admin(&[
        "status",
        "--json",
        "--sample-ms",
        "0",
        "--data-dir",
        data_dir,
    ])?;
    ensure!(ok, "admin status: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Each of the notes `n-0` … `n-39` reads back `{"i": i}` after `ts`.
async fn notes_read_back(http: &reqwest::Client, base: &str, token: &str, ts: u64) -> Result<()> {
    for i in 0..40 {
        let r = http
            .get(format!("{base}/v1/collections/notes/documents/n-{i}"))
            .bearer_auth(token)
            .header("causeway-after", ts.to_string())
            .send()
            .await?;
        ensure!(r.status() == 200, "GET n-{i}: {}", r.status());
        ensure!(
            r.json::<Value>().await?["i"] == json!(i),
            "n-{i} reads back wrong"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_scale_against_dev_starts_the_spare_node_it_needs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let dev = Dev::start(&data_dir, port, &[], dir.path().join("dev-1.log"))?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    let cm = manifest(&data_dir)?["config_manager"]
        .as_str()
        .context("config_manager")?
        .to_string();

    // Without the data dir's cluster secret and admin token, the config manager refuses.
    let (ok, _, err) = admin(&["scale", "--partitions", "2", "--config-manager", &cm])?;
    assert!(!ok && err.contains("cluster secret"), "{err}");
    let secret = data_dir.join("cluster-secret");
    let (ok, _, err) = admin(&[
        "scale",
        "--partitions",
        "2",
        "--config-manager",
        &cm,
        "--cluster-secret-file",
        secret.to_str().context("path")?,
    ])?;
    assert!(!ok && err.contains("admin token"), "{err}");

    // Bad input is refused and changes nothing.
    let (ok, _, err) = admin_of(
        &data_dir,
        &["scale", "--partitions", "0", "--config-manager", &cm],
    )?;
    assert!(!ok && err.contains("--partitions"), "{err}");
    let (ok, _, err) = admin_of(&data_dir, &["scale", "--config-manager", &cm])?;
    assert!(!ok && err.contains("nothing to scale"), "{err}");
    let (ok, _, err) = admin_of(
        &data_dir,
        &["scale", "--partitions", "1", "--config-manager", &cm],
    )?;
    assert!(
        !ok && err.contains("already has 1 partition(s) × 1 replica(s)"),
        "{err}"
    );
    let (ok, _, err) = admin_of(&data_dir, &["replace", "n9", "--config-manager", &cm])?;
    assert!(
        !ok && err.contains("n9 is not in the current configuration"),
        "{err}"
    );
    let (ok, _, err) = admin_of(&data_dir, &["abort", "--config-manager", &cm])?;
    assert!(!ok && err.contains("no transition is running"), "{err}");
    let status = status_json(&data_dir)?;
    assert_eq!(status["next_epoch"], Value::Null, "{status}");
    assert_eq!(
        manifest(&data_dir)?["nodes"].as_array().map(Vec::len),
        Some(1)
    );

    // Documents to move.
    let token = read_token(&data_dir)?;
    let mut last_ts = 0u64;
    for i in 0..40 {
        let r = http
            .put(format!("{base}/v1/collections/notes/documents/n-{i}"))
            .bearer_auth(&token)
            .json(&json!({"i": i}))
            .send()
            .await?;
        ensure!(r.status() == 200, "PUT n-{i}: {}", r.status());
        last_ts = last_ts.max(r.json::<Value>().await?["ts"].as_u64().context("no ts")?);
    }

    // 1 × 1 → 2 × 1: dev starts node 2, which registers; the proposal is made and --wait
    // follows it until it is installed.
    let (ok, out, err) = admin_of(
        &data_dir,
        &[
            "scale",
            "--partitions",
            "2",
            "--wait",
            "--timeout",
            "60s",
            "--config-manager",
            &cm,
        ],
    )?;
    ensure!(ok, "admin scale --wait: {err}\n{}", dev.output());
    assert!(
        out.contains("proposed epoch 2: 2 partition(s) × 1 replica(s)")
            && out.contains("installed in"),
        "{out}"
    );
    let m = manifest(&data_dir)?;
    let ids: Vec<u64> = m["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(ids, [1, 2], "{m}");
    assert!(data_dir.join("node-2").is_dir());
    let status = status_json(&data_dir)?;
    assert_eq!(
        (status["epoch"].as_u64(), &status["next_epoch"]),
        (Some(2), &Value::Null),
        "{status}"
    );
    let nodes: Vec<u64> = status["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .filter_map(|p| p["replicas"][0]["node"].as_u64())
        .collect();
    assert_eq!(nodes, [1, 2], "{status}");
    // Every document reads back, whichever partition it moved to.
    notes_read_back(&http, &base, &token, last_ts).await?;

    // A restart starts the spare node again, at its address.
    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");
    let dev = Dev::start(&data_dir, port, &[], dir.path().join("dev-2.log"))?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let status = status_json(&data_dir)?;
        let n2 = status["partitions"][1]["replicas"][0].clone();
        if n2["node"] == 2 && n2["health"] == "ok" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node 2 is not back after the restart: {status}\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        manifest(&data_dir)?["nodes"],
        m["nodes"],
        "the same nodes, the same addresses"
    );

    // --ensure, as the Helm chart's hooks run it: a no-op at the shape, a shrink left for the
    // pre-upgrade hook when only growth is asked for, and the shrink itself draining node 2,
    // the highest id.
    let ensure = |extra: &[&str]| {
        let mut args = vec!["scale", "--ensure", "--config-manager", &cm];
        args.extend_from_slice(extra);
        admin_of(&data_dir, &args)
    };
    let (ok, out, err) = ensure(&["--partitions", "2"])?;
    assert!(
        ok && out.contains("the cluster has 2×1 already"),
        "{out}{err}"
    );
    let (ok, out, err) = ensure(&["--partitions", "1", "--only", "not-fewer-nodes", "--wait"])?;
    assert!(ok && out.contains("left for later"), "{out}{err}");
    assert_eq!(status_json(&data_dir)?["next_epoch"], Value::Null);
    let (ok, out, err) = ensure(&[
        "--partitions",
        "1",
        "--only",
        "fewer-nodes",
        "--wait",
        "--timeout",
        "60s",
    ])?;
    ensure!(ok, "scale --ensure to 1×1: {err}\n{}", dev.output());
    assert!(out.contains("installed in"), "{out}");
    let status = status_json(&data_dir)?;
    let nodes: Vec<u64> = status["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .filter_map(|p| p["replicas"][0]["node"].as_u64())
        .collect();
    assert_eq!(nodes, [1], "node 2, the highest id, left: {status}");
    notes_read_back(&http, &base, &token, last_ts).await?;
    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");
    if std::env::var_os("CAUSEWAY_KEEP_TEST_DIR").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_on_kafka_and_keeps_to_that_log() -> Result<()> {
    let broker = tokio::task::block_in_place(causeway_txlog::testing::Broker::shared)
        .context("starting Kafka (scripts/setup.sh --broker fetches it)")?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let bootstrap = broker.bootstrap_servers();
    let kafka = ["--kafka", &bootstrap, "--kafka-topic", "dev-on-kafka"];

    let dev = Dev::start(&data_dir, port, &kafka, dir.path().join("dev-1.log"))?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    ensure!(
        dev.output().contains("on Kafka topic dev-on-kafka"),
        "the banner names the log\n{}",
        dev.output()
    );
    let token = read_token(&data_dir)?;
    let r = http
        .put(format!("{base}/v1/collections/notes/documents/k"))
        .bearer_auth(&token)
        .json(&json!({"on": "kafka"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "PUT: {}", r.status());
    let ts = r.json::<Value>().await?["ts"].as_u64().context("no ts")?;
    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");

    // The records are in the topic: the log of record is Kafka, not a local file.
    let log = causeway_txlog::TxLog::open(causeway_txlog::LogOptions::Kafka(
        broker.log_options("dev-on-kafka"),
    ))
    .await?;
    ensure!(
        log.bounds().await?.next.get() > ts,
        "the topic ends before ts {ts}"
    );
    log.close().await?;
    ensure!(
        !data_dir.join("log").exists(),
        "an embedded log was created too"
    );

    // Another log for this data dir is refused; without the flag the data dir's log is used.
    let stderr = refused(
        &data_dir,
        port,
        &["--kafka", &bootstrap, "--kafka-topic", "another"],
    )?;
    assert!(
        stderr.contains("runs on Kafka topic dev-on-kafka"),
        "{stderr}"
    );

    let dev = Dev::start(&data_dir, port, &[], dir.path().join("dev-2.log"))?;
    wait_serving(&http, &base, &dev, &data_dir).await?;
    let doc = get_note(&http, &base, &token, "k", ts).await?;
    assert_eq!(doc, json!({"on": "kafka"}));
    let exit = dev.interrupt()?;
    assert!(exit.success(), "causeway dev exited with {exit}");
    Ok(())
}
