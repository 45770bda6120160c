//! `causeway check` end to end: against `causeway dev` on a temp data dir and a free loopback
//! port it passes every step (token from `--token-file` or `CAUSEWAY_TOKEN`) and leaves no
//! document behind; with a wrong token or none it fails at the write with the api-server's
//! `401`; against a port where nothing listens it fails at readiness once `--timeout` is spent.
//! Every process a test starts is killed by its PID at the end, and every wait has a deadline.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_causeway");
/// Start-up of a debug build of `causeway dev`; generous for a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(90);
/// The longest a `causeway check` run may take here: its `--timeout` and a margin.
const CHECK_DEADLINE: Duration = Duration::from_secs(60);

/// A child process, killed (by its PID) and reaped when dropped.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `causeway dev` on a free port, with its data dir and log.
struct Dev {
    process: Running,
    base: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Dev {
    /// Starts it and waits until it serves (its banner is printed after its own probe read).
    fn start(dir: &Path) -> Result<Dev> {
        let data_dir = dir.join("data");
        let log = dir.join("dev.log");
        let port = free_port()?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new(BIN)
            .arg("dev")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--cdc-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning causeway dev")?;
        let mut dev = Dev {
            process: Running { child },
            base: format!("http://127.0.0.1:{port}"),
            data_dir,
            log,
        };
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if dev.output().contains("Ctrl-C stops the cluster") {
                return Ok(dev);
            }
            if let Some(status) = dev.process.child.try_wait()? {
                bail!("causeway dev exited ({status})\n{}", dev.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "causeway dev did not serve within {START_DEADLINE:?}\n{}",
            dev.output()
        )
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The data dir's admin token.
    fn token(&self) -> Result<String> {
        let tokens: Value =
            serde_json::from_slice(&std::fs::read(self.data_dir.join("tokens.json"))?)?;
        tokens["tokens"][0]["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in tokens.json")
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What a `causeway check` run did.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `causeway check ARGS` (with `CAUSEWAY_TOKEN` set to `env_token`, or unset), killed if it
/// outlives [`CHECK_DEADLINE`].
fn check(dir: &Path, args: &[&str], env_token: Option<&str>) -> Result<Outcome> {
    let stdout = dir.join("check.out");
    let stderr = dir.join("check.err");
    let mut command = Command::new(BIN);
    command
        .arg("check")
        .args(args)
        .env_remove("CAUSEWAY_TOKEN")
        .env_remove("CAUSEWAY_API")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?);
    if let Some(token) = env_token {
        command.env("CAUSEWAY_TOKEN", token);
    }
    let started = Instant::now();
    let mut process = Running {
        child: command.spawn().context("spawning causeway check")?,
    };
    let status = loop {
        if let Some(status) = process.child.try_wait()? {
            break status;
        }
        if started.elapsed() > CHECK_DEADLINE {
            bail!(
                "causeway check {args:?} ran past {CHECK_DEADLINE:?}\n{}",
                std::fs::read_to_string(&stdout).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Outcome {
        status,
        stdout: std::fs::read_to_string(&stdout)?,
        stderr: std::fs::read_to_string(&stderr)?,
        took: started.elapsed(),
    })
}

/// The first word of each line of the output.
fn steps(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// The number after `at ts ` in the line of `step`.
fn ts_of(stdout: &str, step: &str) -> Result<u64> {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(step))
        .with_context(|| format!("no {step} line in\n{stdout}"))?;
    let (_, ts) = line
        .split_once(" at ts ")
        .with_context(|| format!("no ts in {line:?}"))?;
    Ok(ts.split_whitespace().next().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_against_a_dev_cluster_and_leaves_nothing_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(dir.path())?;
    let token = dev.token()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let token_file = token_file.to_str().context("a UTF-8 temp path")?;

    let by_file = check(
        dir.path(),
        &[
            "--api",
            &dev.base,
            "--token-file",
            token_file,
            "--timeout",
            "30s",
        ],
        None,
    )?;
    let by_env = check(
        dir.path(),
        &["--api", &dev.base, "--collection", "smoke"],
        Some(&token),
    )?;
    for (run, collection) in [(&by_file, "causeway_check"), (&by_env, "smoke")] {
        assert!(run.status.success(), "{run:?}\n{}", dev.output());
        assert_eq!(
            steps(&run.stdout),
            ["ready", "write", "read", "delete", "gone", "check"],
            "{run:?}"
        );
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert!(
            lines[..5]
                .iter()
                .all(|l| l.contains(" ok ") && l.contains(" ms")),
            "{run:?}"
        );
        assert!(
            lines[0].contains(&format!("{}/readyz", dev.base)),
            "{run:?}"
        );
        assert!(
            lines[1].contains(&format!("{collection}/check-")),
            "{run:?}"
        );
        assert!(lines[2].contains("the nonce matches"), "{run:?}");
        assert!(lines[5].starts_with("check passed in "), "{run:?}");
        assert!(run.stderr.is_empty(), "{run:?}");

        // The document is gone for any reader after the delete's ts.
        let write_line = lines[1];
        let id = write_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{collection}/")))
            .context("no id")?;
        assert!(
            id.len() == "check-".len() + 16 && id.starts_with("check-"),
            "{id}"
        );
        let written = ts_of(&run.stdout, "write")?;
        let deleted = ts_of(&run.stdout, "delete")?;
        assert!(deleted > written, "{run:?}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?;
        let read = http
            .get(format!(
                "{}/v1/collections/{collection}/documents/{id}",
                dev.base
            ))
            .bearer_auth(&token)
            .header("causeway-after", deleted.to_string())
            .send()
            .await?;
        assert_eq!(read.status(), 404, "{run:?}");
    }
    drop(dev);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_at_the_write_with_a_wrong_token_or_none() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(dir.path())?;
    let token_file = dir.path().join("wrong-token");
    std::fs::write(&token_file, "not-the-dev-admin-token-0123456789")?;
    let token_file = token_file.to_str().context("a UTF-8 temp path")?;

    let wrong = check(
        dir.path(),
        &[
            "--api",
            &dev.base,
            "--token-file",
            token_file,
            "--timeout",
            "20s",
        ],
        // The file wins over the environment.
        Some(&dev.token()?),
    )?;
    let none = check(dir.path(), &["--api", &dev.base, "--timeout", "20s"], None)?;
    for run in [&wrong, &none] {
        assert!(!run.status.success(), "{run:?}");
        assert_eq!(steps(&run.stdout), ["ready", "write"], "{run:?}");
        assert!(run.stdout.contains("write   FAILED"), "{run:?}");
        assert!(
            run.stderr.contains("causeway check failed at step write"),
            "{run:?}"
        );
        assert!(
            run.stderr.contains(": 401 ") && run.stderr.contains("bearer token"),
            "{run:?}"
        );
        assert!(run.took < Duration::from_secs(15), "no retries: {run:?}");
    }
    drop(dev);
    Ok(())
}

#[test]
fn check_fails_at_readiness_when_nothing_listens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = format!("http://127.0.0.1:{}", free_port()?);
    let run = check(dir.path(), &["--api", &base, "--timeout", "2s"], None)?;
    assert!(!run.status.success(), "{run:?}");
    assert_eq!(steps(&run.stdout), ["ready"], "{run:?}");
    assert!(run.stdout.contains("ready   FAILED"), "{run:?}");
    assert!(
        run.stderr.contains("causeway check failed at step ready"),
        "{run:?}"
    );
    assert!(run.stderr.contains("is not ready"), "{run:?}");
    assert!(run.stderr.contains("within --timeout 2s"), "{run:?}");
    assert!(
        run.stderr.contains(&format!("cannot reach {base}/readyz")),
        "{run:?}"
    );
    assert!(
        run.took >= Duration::from_millis(1900) && run.took < Duration::from_secs(15),
        "bounded by --timeout: {run:?}"
    );
    Ok(())
}
