//! Child processes of the harness: spawning a workspace binary with its output in a log file,
//! signalling it, and reading the tail of its log for failure messages.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// One child process and where its output goes. Dropping it kills the process.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(mut command: Command, log: PathBuf) -> Result<Proc> {
        let out = File::options().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process still runs; one that exited by itself is reaped first.
    pub(crate) fn reap_running(&mut self) -> bool {
        if let Some(child) = &mut self.child {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
            }
        }
        self.child.is_some()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`, ...) with the `kill` command.
    pub(crate) fn signal(&self, signal: &str) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("process not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", child.id());
        }
        Ok(())
    }

    /// kill -9 and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last 4000 bytes of the process's log.
    pub(crate) fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the workspace's binaries are: next to the test executable's `deps` directory.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound and released: the process that takes it binds it again),
/// below the kernel's ephemeral range (32768 and up on Linux): a port from that range may be
/// taken by any outgoing connection while its process is down, and a restarted process must
/// bind its own port again.
pub(crate) fn free_addr() -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over the range by the process id, so that test binaries running at once rarely
    // probe the same ports.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 12;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
