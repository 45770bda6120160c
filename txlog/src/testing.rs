//! A real Apache Kafka for tests (feature `testing`): KRaft brokers started as JVM processes on
//! free loopback ports, each with its own temp dir.
//!
//! - [`Broker::start`]: one node, combined controller and broker; topics have one replica.
//! - [`Broker::start_cluster`]: `n` nodes (three for the production setting), each a controller
//!   and a broker, with an `n`-voter controller quorum; topics get replication factor
//!   `min(n, 3)` and `min.insync.replicas` 2 from three nodes up (1 below).
//! - [`Broker::shared`]: one single-node broker per test process, for tests that only need a
//!   topic of their own (give each a distinct topic name) and never stop the broker.
//!
//! The broker is `java -cp '<libs>/*' kafka.Kafka server.properties`, after
//! `kafka.tools.StorageTool format`. `<libs>` is `$CAUSEWAY_KAFKA_LIBS`, else
//! `~/.cache/causeway-kafka/4.4.0/libs`, which `scripts/setup.sh --broker` fills from Maven
//! Central through `mvn` (`txlog/kafka-broker/pom.xml`). `java` is `$JAVA_HOME/bin/java`, else
//! `java` on the `PATH`. Without either, starting fails with a message that says how to get them:
//! the Kafka tests never skip.
//!
//! Each node's output goes to `node-N/broker.log` in the broker's dir ([`Broker::log_tail`]
//! prints it for failure messages). Dropping the `Broker` stops every node: SIGTERM, then SIGKILL
//! after [`STOP_DEADLINE`]. A watchdog process per node does the same if the test process dies
//! without dropping it (a `shared` broker, a panic that aborts, kill -9 of the test), so no JVM
//! outlives its test. Set `CAUSEWAY_KEEP_BROKER_DIR=1` to keep the directory; its path is logged.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::kafka::KafkaOptions;

/// The Kafka version `txlog/kafka-broker/pom.xml` pins.
pub const KAFKA_VERSION: &str = "4.4.0";

/// How long a node may take to answer metadata after it starts.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The brokers' logging (shared with `scripts/kafka.sh`).
const LOG4J2: &str = include_str!("../kafka-broker/log4j2.properties");

/// The heap of each node's JVM.
const HEAP: &str = "-Xmx512m";

/// Every node of every test broker shares this cluster id: each broker has its own directories,
/// so it need not be unique (22 characters of base64url, 16 bytes, as `StorageTool` wants).
const CLUSTER_ID: &str = "Y2F1c2V3YXktdGVzdHMhIQ";

/// One KRaft cluster of `nodes().len()` JVM processes. Its data survives [`Broker::stop`],
/// [`Broker::kill`] and the restarts until the `Broker` is dropped.
#[derive(Debug)]
pub struct Broker {
    java: PathBuf,
    libs: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    /// The Kafka `node.id`: its index + 1.
    id: u32,
    port: u16,
    controller_port: u16,
    child: Option<Child>,
    /// The watchdog's stdin: it stops the JVM when this closes, which the kernel does when the
    /// test process exits however it exits.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Broker {
    /// One node (controller and broker), and waits until it answers metadata.
    pub fn start() -> io::Result<Broker> {
        Broker::start_cluster(1)
    }

    /// `nodes` nodes, each a controller and a broker, and waits until every one answers
    /// metadata and sees them all.
    pub fn start_cluster(nodes: usize) -> io::Result<Broker> {
        assert!((1..=9).contains(&nodes), "1 to 9 nodes, not {nodes}");
        let java = find_java()?;
        let libs = find_libs()?;
        let dir = tempfile::Builder::new()
            .prefix("causeway-kafka-")
            .tempdir()?;
        let mut broker = Broker {
            java,
            libs,
            dir,
            nodes: Vec::with_capacity(nodes),
        };
        for i in 0..nodes {
            broker.nodes.push(Node {
                id: i as u32 + 1,
                port: free_port()?,
                controller_port: free_port()?,
                child: None,
                watchdog: None,
            });
        }
        for i in 0..nodes {
            broker.write_config(i)?;
        }
        // Format every node's storage in parallel: each is a JVM start.
        let formats = (0..nodes)
            .map(|i| broker.format(i))
            .collect::<io::Result<Vec<_>>>()?;
        for (i, child) in formats.into_iter().enumerate() {
            let status = wait_with_deadline(child, START_DEADLINE)?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "formatting the storage of kafka node {} failed ({status}); its output:\n{}",
                    i + 1,
                    broker.node_log_tail(i, 4096)
                )));
            }
        }
        broker.launch_all()?;
        tracing::info!(nodes, dir = %broker.dir.path().display(), "started kafka");
        Ok(broker)
    }

    /// The single-node broker this test process shares, started on first use and stopped by its
    /// watchdog when the process exits. Never stop or restart it: tests that need that start
    /// their own.
    pub fn shared() -> io::Result<&'static Broker> {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        static START: std::sync::Mutex<()> = std::sync::Mutex::new(());
        if let Some(b) = SHARED.get() {
            return Ok(b);
        }
        let _one_at_a_time = START.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = SHARED.get() {
            return Ok(b);
        }
        let broker = Broker::start()?;
        Ok(SHARED.get_or_init(|| broker))
    }

    /// How many nodes the cluster has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `127.0.0.1:PORT,...` of every node, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client port of node `index` (0-based).
    pub fn port(&self, index: usize) -> u16 {
        self.nodes[index].port
    }

    /// The index of the node whose Kafka `node.id` is `id`.
    pub fn index_of(&self, id: i32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id as i32 == id)
    }

    /// The broker's directory: a `node-N` directory per node with its `server.properties`, its
    /// `data` and its output `broker.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Options for a log on this cluster: replication factor `min(nodes, 3)`,
    /// `min.insync.replicas` 2 when there are replicas to spare, and timeouts short enough for
    /// tests.
    pub fn log_options(&self, topic: &str) -> KafkaOptions {
        let mut o = KafkaOptions::new(self.bootstrap_servers(), topic);
        o.replication_factor = self.replication_factor();
        o.min_insync_replicas = self.min_insync_replicas();
        o.request_timeout_ms = 5_000;
        o.delivery_timeout_ms = 10_000;
        o.unavailable_after_ms = 3_000;
        o
    }

    fn replication_factor(&self) -> i32 {
        self.nodes.len().min(3) as i32
    }

    fn min_insync_replicas(&self) -> i32 {
        if self.replication_factor() >= 3 {
            2
        } else {
            1
        }
    }

    /// Whether node `index`'s process is alive.
    pub fn is_running(&mut self, index: usize) -> bool {
        match &mut self.nodes[index].child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9 of node `index` (the harshest stop, which the cluster must survive); waits for it
    /// to exit. Its data stays for [`Broker::restart_node`].
    pub fn kill(&mut self, index: usize) -> io::Result<()> {
        let node = &mut self.nodes[index];
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        stop_watchdog(node);
        Ok(())
    }

    /// Starts node `index` again on the same ports and data (killing it first if it runs), and
    /// waits until it answers metadata.
    pub fn restart_node(&mut self, index: usize) -> io::Result<()> {
        self.kill(index)?;
        self.launch(index)?;
        self.wait_until_ready(index)
    }

    /// kill -9 of every node.
    pub fn stop(&mut self) -> io::Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i)?;
        }
        Ok(())
    }

    /// Kills every node and starts them all again on their data; waits until each answers.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.launch_all()
    }

    /// Launches every node, then waits until each answers (a quorum needs them all up at once).
    fn launch_all(&mut self) -> io::Result<()> {
        for i in 0..self.nodes.len() {
            self.launch(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_until_ready(i)?;
        }
        Ok(())
    }

    /// The index of the node that leads `partition` of `topic`, from the metadata of any node
    /// that answers.
    pub fn leader(&self, topic: &str, partition: i32) -> io::Result<Option<usize>> {
        let client = metadata_client(&self.bootstrap_servers())?;
        let md = client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(io::Error::other)?;
        let leader = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader());
        drop(client);
        Ok(leader.and_then(|id| self.index_of(id)))
    }

    /// The last `bytes` of every node's output, for failure messages.
    pub fn log_tail(&self, bytes: u64) -> String {
        (0..self.nodes.len())
            .map(|i| {
                format!(
                    "--- kafka node {} ---\n{}",
                    i + 1,
                    self.node_log_tail(i, bytes)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn node_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}", index + 1))
    }

    fn node_log_tail(&self, index: usize, bytes: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.node_dir(index).join("broker.log")) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(io::SeekFrom::Start(len.saturating_sub(bytes)));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn write_config(&self, index: usize) -> io::Result<()> {
        let node = &self.nodes[index];
        let dir = self.node_dir(index);
        std::fs::create_dir_all(&dir)?;
        let voters = self
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let rf = self.replication_factor();
        let min_isr = self.min_insync_replicas();
        let properties = format!(
            "# A KRaft node for Causeway's tests: controller and broker in one process.
process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
auto.create.topics.enable=false
default.replication.factor={rf}
min.insync.replicas={min_isr}
unclean.leader.election.enable=false
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
# Tests kill brokers: notice a dead one in seconds, not the production defaults' 9 s (session)
# and 30 s (a follower's lag before it leaves the ISR).
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
replica.lag.time.max.ms=5000
# Retention tests age records out in seconds (and the first check must not wait 30 s).
log.initial.task.delay.ms=0
log.retention.check.interval.ms=500
log.segment.delete.delay.ms=1000
",
            id = node.id,
            port = node.port,
            controller_port = node.controller_port,
            data = dir.join("data").display(),
        );
        std::fs::write(dir.join("server.properties"), properties)?;
        std::fs::write(dir.join("log4j2.properties"), LOG4J2)?;
        Ok(())
    }

    /// A JVM on the broker's classpath, its output appended to the node's `broker.log`.
    fn java(&self, index: usize) -> io::Result<Command> {
        let dir = self.node_dir(index);
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("broker.log"))?;
        let mut command = Command::new(&self.java);
        command
            .arg(HEAP)
            .arg("-XX:+UseG1GC")
            .arg("-XX:MaxGCPauseMillis=20")
            .arg("-Djava.awt.headless=true")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .current_dir(&dir)
            .env_remove("KAFKA_OPTS")
            .env_remove("JAVA_TOOL_OPTIONS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }

    fn format(&self, index: usize) -> io::Result<Child> {
        self.java(index)?
            .arg("kafka.tools.StorageTool")
            .arg("format")
            .arg("--cluster-id")
            .arg(CLUSTER_ID)
            .arg("--config")
            .arg("server.properties")
            .arg("--ignore-formatted")
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", self.java.display())))
    }

    fn launch(&mut self, index: usize) -> io::Result<()> {
        let child = self
            .java(index)?
            .arg("kafka.Kafka")
            .arg("server.properties")
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting {}: {e}", self.java.display()))
            })?;
        let keep = std::env::var_os("CAUSEWAY_KEEP_BROKER_DIR").is_some();
        let pid = child.id();
        self.nodes[index].child = Some(child);
        match spawn_watchdog(pid, (!keep).then(|| self.dir.path())) {
            Ok(watchdog) => {
                self.nodes[index].watchdog = Some(watchdog);
                Ok(())
            }
            Err(e) => {
                // No JVM without its watchdog.
                let _ = self.kill(index);
                Err(e)
            }
        }
    }

    /// Waits until node `index` answers metadata listing every node that runs.
    fn wait_until_ready(&mut self, index: usize) -> io::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let port = self.nodes[index].port;
        let client = metadata_client(&format!("127.0.0.1:{port}"))?;
        let mut last_error: String;
        loop {
            let node = &mut self.nodes[index];
            if let Some(child) = &mut node.child {
                if let Some(status) = child.try_wait()? {
                    node.child = None;
                    stop_watchdog(node);
                    return Err(io::Error::other(format!(
                        "kafka node {} exited with {status} while starting; its output:\n{}",
                        index + 1,
                        self.node_log_tail(index, 8192)
                    )));
                }
            }
            let running = (0..self.nodes.len())
                .filter(|&i| self.is_running(i))
                .count();
            match client.fetch_metadata(None, Duration::from_millis(1000)) {
                Ok(md) if md.brokers().len() >= running => break,
                Ok(md) => {
                    last_error =
                        format!("metadata lists {} of {running} brokers", md.brokers().len())
                }
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                let _ = self.kill(index);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "kafka node {} did not answer within {START_DEADLINE:?} ({last_error}); \
                         its output:\n{}",
                        index + 1,
                        self.node_log_tail(index, 8192)
                    ),
                ));
            }
            // Polling interval of the readiness check.
            std::thread::sleep(Duration::from_millis(100));
        }
        // Dropping a librdkafka client may block; this one has no group, so it is quick.
        drop(client);
        Ok(())
    }

    /// SIGTERM to every node, then SIGKILL to those still running after [`STOP_DEADLINE`].
    fn terminate(&mut self) {
        for node in &self.nodes {
            if let Some(child) = &node.child {
                let _ = signal(child.id(), "TERM");
            }
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        for node in &mut self.nodes {
            if let Some(child) = node.child.take() {
                if let Err(e) =
                    wait_with_deadline(child, deadline.saturating_duration_since(Instant::now()))
                {
                    tracing::warn!(node = node.id, error = %e, "stopping a kafka node");
                }
            }
            stop_watchdog(node);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the Kafka brokers' output:\n{}", self.log_tail(4096));
        }
        self.terminate();
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

/// `kill -SIGNAL pid`.
fn signal(pid: u32, signal: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{signal} {pid} failed")))
    }
}

/// Waits for `child` to exit; SIGKILL when `deadline` passes first.
fn wait_with_deadline(
    mut child: Child,
    deadline: Duration,
) -> io::Result<std::process::ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= end {
            child.kill()?;
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shell that waits for its stdin to close, then stops `pid` (SIGTERM, SIGKILL after the stop
/// deadline) and removes `dir` (the broker's temp dir, which no `Drop` will remove then). The
/// caller keeps the write end until it stops the JVM itself.
fn spawn_watchdog(pid: u32, dir: Option<&Path>) -> io::Result<(Child, ChildStdin)> {
    let grace = STOP_DEADLINE.as_secs();
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "cat >/dev/null; kill -TERM {pid} 2>/dev/null; \
         i=0; while [ $i -lt {grace} ] && kill -0 {pid} 2>/dev/null; do sleep 1; i=$((i+1)); done; \
         kill -KILL {pid} 2>/dev/null; [ -z \"$1\" ] || rm -rf -- \"$1\"; exit 0"
    ));
    // `$0` and `$1` of the script: the directory goes as an argument, never into the script.
    command.arg("causeway-kafka-watchdog");
    command.arg(dir.map(Path::as_os_str).unwrap_or_default());
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let stdin = child.stdin.take().expect("piped stdin");
    Ok((child, stdin))
}

/// Ends a node's watchdog without letting it signal anything: its JVM is gone or being stopped
/// by the caller.
fn stop_watchdog(node: &mut Node) {
    if let Some((mut child, stdin)) = node.watchdog.take() {
        let _ = child.kill();
        let _ = child.wait();
        drop(stdin);
    }
}

fn metadata_client(bootstrap: &str) -> io::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .create()
        .map_err(io::Error::other)
}

/// `$JAVA_HOME/bin/java`, else `java` on the `PATH`.
pub fn find_java() -> io::Result<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let java = PathBuf::from(home).join("bin/java");
        if java.is_file() {
            return Ok(java);
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("java"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "java not found (JAVA_HOME, PATH): the Kafka tests need Java 17 or later; \
                 `scripts/setup.sh --broker` installs a Java 17 runtime and the broker",
            )
        })
}

/// `$CAUSEWAY_KAFKA_LIBS`, else `~/.cache/causeway-kafka/<version>/libs`; it must hold the
/// broker's jar.
pub fn find_libs() -> io::Result<PathBuf> {
    let libs = match std::env::var_os("CAUSEWAY_KAFKA_LIBS") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/causeway-kafka")
            .join(KAFKA_VERSION)
            .join("libs"),
    };
    let jar = libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"));
    if jar.is_file() {
        Ok(libs)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the Kafka {KAFKA_VERSION} broker is not in {} (no {}): run \
                 `scripts/setup.sh --broker`, which fetches it from Maven Central with mvn \
                 (txlog/kafka-broker/pom.xml), or set CAUSEWAY_KAFKA_LIBS",
                libs.display(),
                jar.display()
            ),
        ))
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
