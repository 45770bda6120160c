//! A real Kafka-protocol broker for tests: tansu with its SQLite storage, on a free loopback port
//! with its own temp dir (feature `testing`).
//!
//! The binary is `$TANSU_BIN`, else `tansu` on the `PATH`, else `~/.cargo/bin/tansu`; install it
//! with `cargo install tansu --locked --features libsql`. Without it [`Broker::start`] fails: the
//! Kafka tests never skip. Never the `memory://` engine: in tansu 0.6.0 it returns wrong records
//! for a fetch from an offset and a wrong high watermark.
//!
//! Set `CAUSEWAY_KEEP_BROKER_DIR=1` to keep the broker's directory (its SQLite file and
//! `broker.log`) after the test; its path is logged.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::kafka::KafkaOptions;

/// How long a broker may take to answer after it starts.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A tansu broker process. Killed on drop; its data survives [`Broker::stop`] and
/// [`Broker::restart`] until the `Broker` is dropped.
#[derive(Debug)]
pub struct Broker {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free loopback port with a fresh SQLite file, and waits until it
    /// answers Kafka metadata requests.
    pub fn start() -> io::Result<Broker> {
        let bin = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("causeway-tansu-")
            .tempdir()?;
        let port = free_port()?;
        let mut broker = Broker {
            bin,
            dir,
            port,
            child: None,
        };
        broker.launch()?;
        Ok(broker)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's directory: its SQLite file `tansu.db` and its output `broker.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Options for a log on this broker: one replica, and timeouts short enough for tests.
    pub fn log_options(&self, topic: &str) -> KafkaOptions {
        let mut o = KafkaOptions::new(self.bootstrap_servers(), topic);
        o.replication_factor = 1;
        o.min_insync_replicas = 1;
        o.request_timeout_ms = 5_000;
        o.delivery_timeout_ms = 10_000;
        o.unavailable_after_ms = 3_000;
        o
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the broker (SIGKILL: the harshest stop, which it must survive) and waits for it to
    /// exit. The data stays for [`Broker::restart`].
    pub fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port and the same SQLite file, and waits until it
    /// answers. Stops it first if it runs.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.launch()
    }

    /// The last `bytes` of the broker's output, for failure messages.
    pub fn log_tail(&self, bytes: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("broker.log")) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = io::Seek::seek(&mut f, io::SeekFrom::Start(len.saturating_sub(bytes)));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn launch(&mut self) -> io::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            // Relative to the working directory: `<dir>/tansu.db`.
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .current_dir(self.dir.path())
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting {}: {e}", self.bin.display()))
            })?;
        self.child = Some(child);
        tracing::info!(port = self.port, dir = %self.dir.path().display(), "started tansu");
        self.wait_until_ready()
    }

    fn wait_until_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("log_level", "3")
            .create()
            .map_err(io::Error::other)?;
        let mut last_error: String;
        loop {
            if let Some(child) = &mut self.child {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "tansu exited with {status} while starting; its output:\n{}",
                        self.log_tail(4096)
                    )));
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                match client.fetch_metadata(None, Duration::from_millis(1000)) {
                    Ok(md) if !md.brokers().is_empty() => break,
                    Ok(_) => last_error = "metadata without brokers".into(),
                    Err(e) => last_error = e.to_string(),
                }
            } else {
                last_error = "connection refused".into();
            }
            if Instant::now() >= deadline {
                let _ = self.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tansu did not answer within {START_DEADLINE:?} ({last_error}); its output:\n{}",
                        self.log_tail(4096)
                    ),
                ));
            }
            // Polling interval of the readiness check.
            std::thread::sleep(Duration::from_millis(50));
        }
        // Dropping a librdkafka client may block; this one has no group, so it is quick.
        drop(client);
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop();
        if std::env::var_os("CAUSEWAY_KEEP_BROKER_DIR").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::TempDir::new().expect("temp dir for the broker"),
            );
            let kept = dir.keep();
            tracing::info!(dir = %kept.display(), "kept the broker's directory");
        }
    }
}

/// The tansu binary: `$TANSU_BIN`, else `tansu` on the `PATH`, else `~/.cargo/bin/tansu`.
pub fn find_binary() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("TANSU_BIN={} is not a file", bin.display()),
        ));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("tansu"));
    let in_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path
        .chain(in_cargo)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): install it with \
                 `cargo install tansu --locked --features libsql`",
            )
        })
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
