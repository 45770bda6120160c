//! `causeway dev`: the config manager, P × R store nodes, the api-server and the cdc service in
//! one process, on ONE transaction log shared by all of them: the embedded log by default (it
//! locks its directory, so the components cannot each open it), or a topic on a Kafka cluster
//! with `--kafka BOOTSTRAP`.
//!
//! The data dir holds one subdirectory per component and two files of its own:
//!
//! ```text
//! <data-dir>/dev.json          the manifest: the installed shape, every store node's address,
//!                              the API's and the cdc admin API's of the latest run
//! <data-dir>/tokens.json       the generated admin token (0600), kept across restarts
//! <data-dir>/log/              the embedded transaction log (not with --kafka)
//! <data-dir>/config-manager/   the config manager's state file
//! <data-dir>/node-<id>/        each store node's RocksDB
//! <data-dir>/cdc/              the cdc service's feeds and webhook checkpoints
//! ```
//!
//! The store nodes' addresses are part of the bootstrapped configuration (the config manager
//! refuses a node that comes back under another address), so the first start picks free ports
//! and the manifest keeps them for every restart. The config manager may move: the nodes and the
//! api-server are told where it is at each start. The API (`--listen`, default 127.0.0.1:7300)
//! and the cdc service's admin API (`--cdc-listen`, default 127.0.0.1:7500) listen where the
//! flags say, and port 0 picks a free port; the manifest records where they listened.
//!
//! `causeway admin scale|replace` work against a dev cluster: when a proposal needs more spare
//! nodes than are registered, the config manager asks this process ([`DevSpares`], its
//! spare-node provider) to start them; they get the next free ids and their own data dirs, join
//! the manifest (so every restart starts them again), and register. The manifest's shape follows
//! the configuration the config manager installs.
//!
//! The cdc service runs the feeds created with `causeway admin feeds create` (kept in its state
//! dir across restarts) on the same log; the data dir's admin token guards its admin API. The
//! api-server serves the change streams (`causeway cdc tail`) itself.
//!
//! Start-up order: config manager, log, store nodes (they register), bootstrap on the first start
//! only, tokens, api-server, a probe read until the API answers, then the cdc service (its feeds
//! read from the store nodes). Shutdown runs in the reverse order, so no component loses a peer
//! while it still serves: the cdc service stops its feeds, the api-server drains its requests,
//! then the store nodes stop, then the config manager, and the log is closed last.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_api_server as api;
use causeway_cdc as cdc;
use causeway_config_manager as cm;
use causeway_core::{ClusterConfig, NodeId};
use causeway_proto::link::Security;
use causeway_store_node as store_node;
use causeway_txlog::{KafkaOptions, LogOptions, TxLog};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long start-up may take before `causeway dev` gives up (RocksDB opening, registration,
/// bootstrap, the first read).
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// The most store nodes one dev process runs, spare nodes included.
const MAX_NODES: usize = 64;
/// How long each tier may take to stop after being told to.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// The collection of the start-up probe read (a document that is never written).
const PROBE_COLLECTION: &str = "_causeway_probe";

/// Flags of `causeway dev`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Partitions of the cluster (first start: default 1; later: the data dir's shape).
    #[arg(long)]
    partitions: Option<u32>,
    /// Replicas per partition (first start: default 1; later: the data dir's shape).
    #[arg(long)]
    replicas: Option<u32>,
    /// Where every component keeps its data; reused across restarts.
    #[arg(long, default_value = ".causeway-dev")]
    data_dir: PathBuf,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// Where the cdc service's admin API listens (`causeway admin feeds --cdc`).
    #[arg(long, default_value = "127.0.0.1:7500")]
    cdc_listen: SocketAddr,
    /// Run on this Kafka cluster (`host:port[,host:port...]`) instead of the embedded log (first
    /// start; later starts reuse the data dir's log and refuse another).
    #[arg(long, value_name = "BOOTSTRAP")]
    kafka: Option<String>,
    /// The topic of the log on `--kafka`, created if missing with one partition.
    #[arg(long, default_value = "causeway-tx", requires = "kafka")]
    kafka_topic: String,
    /// Replication factor of the topic `--kafka` creates (`min.insync.replicas` is 2 from 3
    /// replicas up, else 1). Default 1, for a single local broker (`scripts/kafka.sh`).
    #[arg(long, default_value_t = 1, requires = "kafka")]
    kafka_replication_factor: i32,
}

/// The log a data dir's cluster runs on; its store nodes' applied positions are positions in it,
/// so it never changes for a data dir.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum ManifestLog {
    /// `<data-dir>/log`.
    #[default]
    Embedded,
    /// A topic on a Kafka cluster.
    Kafka {
        bootstrap_servers: String,
        topic: String,
    },
}

/// What the data dir remembers between runs (`dev.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub partitions: u32,
    pub replicas: u32,
    /// The config manager of the latest run (for `causeway admin status --data-dir`).
    pub config_manager: SocketAddr,
    /// The API address of the latest run.
    pub api: SocketAddr,
    /// The cdc service's admin API of the latest run (absent in data dirs from before it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc: Option<SocketAddr>,
    /// Every store node, with the address it must keep: those of the shape first bootstrapped,
    /// then the spare nodes started for proposals, in id order.
    pub nodes: Vec<ManifestNode>,
    /// The log (data dirs from before there was a choice ran on the embedded log).
    #[serde(default)]
    pub log: ManifestLog,
}

/// One store node of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestNode {
    pub id: u64,
    pub listen: SocketAddr,
}

impl Manifest {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("dev.json")
    }

    /// The manifest of a data dir, if it has one.
    pub fn load(data_dir: &Path) -> Result<Option<Manifest>> {
        let path = Manifest::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let manifest: Manifest = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a valid manifest", path.display()))?;
                ensure!(
                    manifest.nodes.len() as u64
                        >= u64::from(manifest.partitions) * u64::from(manifest.replicas),
                    "{} lists {} nodes for a {}×{} cluster",
                    path.display(),
                    manifest.nodes.len(),
                    manifest.partitions,
                    manifest.replicas
                );
                Ok(Some(manifest))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the manifest atomically (temp file, fsync, rename, fsync of the directory).
    fn store(&self, data_dir: &Path) -> Result<()> {
        let path = Manifest::path(data_dir);
        let tmp = data_dir.join("dev.json.tmp");
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::File::open(data_dir)?.sync_all()?;
        Ok(())
    }
}

/// The admin token of the data dir: read from `tokens.json`, or generated (and written with mode
/// 0600) on the first start.
fn ensure_admin_token(path: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct File {
        tokens: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        token: String,
        #[serde(default)]
        admin: bool,
    }
    match std::fs::read(path) {
        Ok(bytes) => {
            let file: File = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a tokens file", path.display()))?;
            file.tokens
                .into_iter()
                .find(|t| t.admin)
                .map(|t| t.token)
                .with_context(|| format!("{} has no admin token", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate_token();
            let body = serde_json::json!({"tokens": [
                {"name": "dev-admin", "token": token, "admin": true}
            ]});
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.write_all(&serde_json::to_vec_pretty(&body)?)?;
            file.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The internal links of a dev cluster: plaintext on loopback, every call carrying the data
/// dir's cluster secret, and the admin calls of the config manager its admin token
/// (`causeway admin … --data-dir` reads both). Each is generated on the first start (mode 0600).
fn dev_security(data_dir: &Path) -> Result<Security> {
    let secret = data_dir.join(CLUSTER_SECRET_FILE);
    let admin = data_dir.join(ADMIN_TOKEN_FILE);
    for path in [&secret, &admin] {
        ensure_secret_file(path)?;
    }
    Ok(Security {
        cluster_secret_file: Some(secret),
        admin_token_file: Some(admin),
        ..Security::default()
    })
}

/// The data dir's file of the cluster secret.
pub const CLUSTER_SECRET_FILE: &str = "cluster-secret";
/// The data dir's file of the admin token of the config manager.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Writes a new secret to `path` (mode 0600) unless it exists.
fn ensure_secret_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    file.write_all(generate_token().as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// 192 random bits from the OS-seeded generator, hex encoded.
fn generate_token() -> String {
    let bytes: [u8; 24] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("cw_dev_{hex}")
}

/// The shape to run: the flags, checked against the data dir's.
fn resolve_shape(args: &Args, existing: Option<&Manifest>) -> Result<(u32, u32)> {
    match existing {
        None => {
            let shape = (args.partitions.unwrap_or(1), args.replicas.unwrap_or(1));
            ensure!(
                shape.0 >= 1 && shape.1 >= 1,
                "--partitions and --replicas must be at least 1"
            );
            ensure!(
                u64::from(shape.0) * u64::from(shape.1) <= MAX_NODES as u64,
                "causeway dev runs at most {MAX_NODES} store nodes in one process"
            );
            Ok(shape)
        }
        Some(m) => {
            let wanted = (
                args.partitions.unwrap_or(m.partitions),
                args.replicas.unwrap_or(m.replicas),
            );
            if wanted != (m.partitions, m.replicas) {
                bail!(
                    "the data dir {} holds a {}×{} cluster (partitions × replicas), not {}×{}: \
                     run without --partitions/--replicas to reuse it, or pick another --data-dir",
                    args.data_dir.display(),
                    m.partitions,
                    m.replicas,
                    wanted.0,
                    wanted.1
                );
            }
            Ok(wanted)
        }
    }
}

/// The log to run on: the flags, checked against the data dir's.
fn resolve_log(args: &Args, existing: Option<&Manifest>) -> Result<ManifestLog> {
    let wanted = args.kafka.as_ref().map(|bootstrap| ManifestLog::Kafka {
        bootstrap_servers: bootstrap.clone(),
        topic: args.kafka_topic.clone(),
    });
    match (existing, wanted) {
        (None, wanted) => Ok(wanted.unwrap_or_default()),
        (Some(m), None) => Ok(m.log.clone()),
        (Some(m), Some(wanted)) if wanted == m.log => Ok(wanted),
        (Some(m), Some(wanted)) => bail!(
            "the data dir {} runs on {}, not {}: its store nodes hold positions in that log; \
             pick another --data-dir for another log",
            args.data_dir.display(),
            describe_log(&m.log),
            describe_log(&wanted)
        ),
    }
}

fn describe_log(log: &ManifestLog) -> String {
    match log {
        ManifestLog::Embedded => "the embedded log".into(),
        ManifestLog::Kafka {
            bootstrap_servers,
            topic,
        } => format!("Kafka topic {topic} at {bootstrap_servers}"),
    }
}

/// The options every component opens the log with.
fn log_options(args: &Args, log: &ManifestLog, data_dir: &Path) -> Result<LogOptions> {
    Ok(match log {
        ManifestLog::Embedded => serde_json::from_value(serde_json::json!({
            "backend": "embedded",
            "dir": data_dir.join("log"),
        }))?,
        ManifestLog::Kafka {
            bootstrap_servers,
            topic,
        } => {
            let mut o = KafkaOptions::new(bootstrap_servers.clone(), topic.clone());
            ensure!(
                args.kafka_replication_factor >= 1,
                "--kafka-replication-factor must be at least 1"
            );
            o.replication_factor = args.kafka_replication_factor;
            o.min_insync_replicas = if o.replication_factor >= 3 { 2 } else { 1 };
            LogOptions::Kafka(o)
        }
    })
}

/// A running component: how to tell it to stop, and its task.
struct Running {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

/// Spawns `run(stopped)`; `exited` hears the name when the component ends for any reason.
fn spawn<F, E>(
    name: String,
    exited: &mpsc::Sender<String>,
    run: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> Running
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let (stop, mut stopped) = watch::channel(false);
    let stopped: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let fut = run(stopped);
    let exited = exited.clone();
    let label = name.clone();
    let task = tokio::spawn(async move {
        let result = fut.await.with_context(|| format!("{label} failed"));
        let _ = exited.try_send(label);
        result
    });
    Running { name, stop, task }
}

/// Stops a tier of components and waits for them, each within [`STOP_DEADLINE`].
async fn stop_all(tier: Vec<Running>) -> Vec<anyhow::Error> {
    for r in &tier {
        let _ = r.stop.send(true);
    }
    let mut errors = Vec::new();
    for r in tier {
        match tokio::time::timeout(STOP_DEADLINE, r.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(e),
            Ok(Err(join)) => errors.push(anyhow::anyhow!("{} panicked: {join}", r.name)),
            Err(_) => errors.push(anyhow::anyhow!(
                "{} did not stop within {STOP_DEADLINE:?}",
                r.name
            )),
        }
    }
    errors
}

/// Everything that runs, by tier (the order of shutdown is cdc, api, nodes, config manager,
/// log). The store nodes are shared with [`DevSpares`], which adds the ones it starts.
struct Cluster {
    cdc: Vec<Running>,
    api: Vec<Running>,
    nodes: StoreNodes,
    config_manager: Vec<Running>,
    log: Option<TxLog>,
}

/// The running store nodes; `None` once shutdown has taken them, so no node starts after it.
type StoreNodes = Arc<Mutex<Option<Vec<Running>>>>;

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            cdc: Vec::new(),
            api: Vec::new(),
            nodes: Arc::new(Mutex::new(Some(Vec::new()))),
            config_manager: Vec::new(),
            log: None,
        }
    }
}

impl Cluster {
    async fn shutdown(self) -> Result<()> {
        let mut errors = stop_all(self.cdc).await;
        errors.extend(stop_all(self.api).await);
        let nodes = self
            .nodes
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default();
        errors.extend(stop_all(nodes).await);
        errors.extend(stop_all(self.config_manager).await);
        if let Some(log) = self.log {
            if let Err(e) = log.close().await {
                errors.push(anyhow::Error::new(e).context("closing the log"));
            }
        }
        match errors.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(first),
        }
    }
}

/// Runs `causeway dev` until `shutdown` completes (or a component fails).
pub async fn run(args: Args, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let existing = Manifest::load(&args.data_dir)?;
    let (partitions, replicas) = resolve_shape(&args, existing.as_ref())?;
    let log = resolve_log(&args, existing.as_ref())?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;

    let (exited_tx, mut exited_rx) = mpsc::channel::<String>(256);
    let mut cluster = Cluster::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let started = Instant::now();
    let startup = start(
        &args,
        &data_dir,
        existing.as_ref(),
        log,
        (partitions, replicas),
        &exited_tx,
        &mut cluster,
    );
    let outcome = tokio::select! {
        r = tokio::time::timeout(STARTUP_DEADLINE, startup) => match r {
            Ok(Ok(banner)) => Some(Ok(banner)),
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => Some(Err(anyhow::anyhow!(
                "the cluster did not start within {STARTUP_DEADLINE:?}"
            ))),
        },
        () = &mut shutdown => None,
    };
    let banner = match outcome {
        Some(Ok(banner)) => banner,
        Some(Err(e)) => {
            if let Err(stop) = cluster.shutdown().await {
                tracing::warn!(error = %format!("{stop:#}"), "shutdown after a failed start");
            }
            return Err(e);
        }
        None => return cluster.shutdown().await,
    };
    println!(
        "{banner}\n(started in {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let failed = tokio::select! {
        () = &mut shutdown => None,
        name = exited_rx.recv() => name,
    };
    let result = cluster.shutdown().await;
    match failed {
        Some(name) => {
            result?;
            bail!("{name} stopped unexpectedly; the cluster was shut down")
        }
        None => {
            result?;
            println!("causeway dev stopped cleanly");
            Ok(())
        }
    }
}

/// Starts every component into `cluster` and answers the banner to print.
async fn start(
    args: &Args,
    data_dir: &Path,
    existing: Option<&Manifest>,
    manifest_log: ManifestLog,
    (partitions, replicas): (u32, u32),
    exited: &mpsc::Sender<String>,
    cluster: &mut Cluster,
) -> Result<String> {
    let security = dev_security(data_dir)?;
    let spares = DevSpares::default();
    let cm_service = bind_config_manager(data_dir, existing, &security)
        .await?
        .with_spare_nodes(Arc::new(spares.clone()));
    let cm_addr = cm_service.local_addr();
    let cm_handle = cm_service.handle();
    cluster
        .config_manager
        .push(spawn("the config manager".into(), exited, |stopped| {
            cm_service.run(stopped)
        }));

    // The one log every component shares.
    let log_options = log_options(args, &manifest_log, data_dir)?;
    let log = TxLog::open(log_options.clone())
        .await
        .with_context(|| format!("opening {}", describe_log(&manifest_log)))?;
    cluster.log = Some(log.clone());

    // The store nodes, at the addresses of the manifest (free ports on the first start), the
    // spare nodes started for earlier proposals included.
    let count = partitions * replicas;
    let planned: Vec<ManifestNode> = match existing {
        Some(m) => m.nodes.clone(),
        None => (1..=u64::from(count))
            .map(|id| ManifestNode {
                id,
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            })
            .collect(),
    };
    let context = NodeContext {
        data_dir: data_dir.to_path_buf(),
        config_manager: cm_addr.to_string(),
        log_options: log_options.clone(),
        security: security.clone(),
        log: log.clone(),
        exited: exited.clone(),
        nodes: Arc::clone(&cluster.nodes),
    };
    let mut nodes = Vec::new();
    for node in planned {
        nodes.push(context.start(node.id, node.listen).await?);
    }
    let manifest = Arc::new(Mutex::new(Manifest {
        partitions,
        replicas,
        config_manager: cm_addr,
        api: args.listen,
        cdc: None,
        nodes,
        log: manifest_log.clone(),
    }));
    manifest.lock().expect("not poisoned").store(data_dir)?;
    spares.ready(context, Arc::clone(&manifest));

    // Bootstrap on the first start; later starts find the configuration in the config manager,
    // the authority on the shape: a manifest that missed an install (a stop just after it) is
    // brought up to date.
    let pair = cm_handle.pair();
    match &pair.current {
        None => {
            wait_registered(&cm_handle, count).await?;
            cm_handle
                .bootstrap(partitions, replicas)
                .await
                .context("bootstrapping the cluster")?;
            tracing::info!(partitions, replicas, "cluster bootstrapped");
        }
        Some(config) => record_shape(&manifest, data_dir, config)?,
    }
    let (partitions, replicas) = {
        let m = manifest.lock().expect("not poisoned");
        (m.partitions, m.replicas)
    };
    cluster
        .config_manager
        .push(spawn("the manifest keeper".into(), exited, |stopped| {
            keep_shape(
                cm_handle.subscribe(),
                Arc::clone(&manifest),
                data_dir.to_path_buf(),
                stopped,
            )
        }));

    // The api-server, with the data dir's admin token.
    let tokens_file = data_dir.join("tokens.json");
    let token = ensure_admin_token(&tokens_file)?;
    let api_service = api::Service::bind_with_log(
        api::Options {
            listen_addr: args.listen,
            config_manager_addr: cm_addr.to_string(),
            log: log_options.clone(),
            tokens_file: Some(tokens_file.clone()),
            security: Security {
                admin_token_file: None,
                ..security.clone()
            },
            ..api::Options::default()
        },
        log.clone(),
    )
    .await
    .with_context(|| format!("starting the api-server on {}", args.listen))?;
    let api_addr = api_service.local_addr();
    cluster
        .api
        .push(spawn("the api-server".into(), exited, |stopped| {
            api_service.run(stopped)
        }));
    {
        let mut m = manifest.lock().expect("not poisoned");
        m.api = api_addr;
        m.store(data_dir)?;
    }

    let url = format!("http://{api_addr}");
    wait_serving(&url, &token).await?;

    // The cdc service, once the cluster serves: its feeds follow the same log and ask the store
    // nodes for what the log cannot say.
    let cdc_service = cdc::Service::bind_with_log(
        cdc::Options {
            listen_addr: args.cdc_listen,
            config_manager_addr: cm_addr.to_string(),
            log: log_options,
            state_dir: data_dir.join("cdc"),
            admin_token: Some(token.clone()),
            security: Security {
                admin_token_file: None,
                ..security.clone()
            },
            ..cdc::Options::default()
        },
        log,
    )
    .await
    .with_context(|| {
        format!(
            "starting the cdc service on {} (--cdc-listen)",
            args.cdc_listen
        )
    })?;
    let cdc_addr = cdc_service.local_addr();
    cluster
        .cdc
        .push(spawn("the cdc service".into(), exited, |stopped| {
            cdc_service.run(stopped)
        }));
    {
        let mut m = manifest.lock().expect("not poisoned");
        m.cdc = Some(cdc_addr);
        m.store(data_dir)?;
    }

    let data = data_dir.display();
    let on = describe_log(&manifest_log);
    Ok(format!(
        "Causeway dev cluster ready: {partitions} partition(s) × {replicas} replica(s) on {on}, data in {data}\n\
         \n  API             {url}\n  admin token     {token}\n  tokens file     {tokens}\n  config manager  {cm_addr}   (causeway admin status --data-dir {data})\n  cdc admin       http://{cdc_addr}   (causeway admin feeds list --cdc {cdc_addr})\n\
         \nTry:\n  curl -sS -X PUT {url}/v1/collections/notes/documents/hello \\\n    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n    -d '{{\"text\": \"hello, causeway\"}}'\n\
         \n  causeway cdc tail --api {url} --token {token}   (every change, as it commits)\n\
         \nCtrl-C stops the cluster.",
        tokens = tokens_file.display(),
    ))
}

/// The config manager: at its address of the last run when it can have it (never a store node's:
/// they were all bound beside it), else on a free port that no store node of the manifest must
/// take back.
async fn bind_config_manager(
    data_dir: &Path,
    existing: Option<&Manifest>,
    security: &Security,
) -> Result<cm::Service> {
    let options = |listen_addr| cm::Options {
        listen_addr,
        data_dir: data_dir.join("config-manager"),
        security: security.clone(),
        ..cm::Options::default()
    };
    if let Some(m) = existing {
        match cm::Service::bind(options(m.config_manager)).await {
            Ok(service) => return Ok(service),
            Err(e) => {
                tracing::info!(addr = %m.config_manager, error = %e, "the config manager's last address is taken; picking another")
            }
        }
    }
    let reserved: Vec<SocketAddr> = existing
        .map(|m| m.nodes.iter().map(|n| n.listen).collect())
        .unwrap_or_default();
    // A few tries: the system hands out each free port at random.
    for _ in 0..16 {
        let service = cm::Service::bind(options(SocketAddr::from(([127, 0, 0, 1], 0))))
            .await
            .context("starting the config manager")?;
        if !reserved.contains(&service.local_addr()) {
            return Ok(service);
        }
    }
    bail!("no free port for the config manager outside the store nodes' ports")
}

/// What starting a store node takes; shared by the start-up and [`DevSpares`].
#[derive(Clone)]
struct NodeContext {
    data_dir: PathBuf,
    config_manager: String,
    log_options: LogOptions,
    security: Security,
    log: TxLog,
    exited: mpsc::Sender<String>,
    nodes: StoreNodes,
}

impl NodeContext {
    /// Binds store node `id` on `listen` (port 0: a free port) with its data dir under the dev
    /// data dir, and runs it; answers its manifest entry.
    async fn start(&self, id: u64, listen: SocketAddr) -> Result<ManifestNode> {
        let options = store_node::Options {
            node_id: NodeId(id),
            listen,
            advertise: None,
            admin_listen: None,
            data_dir: self.data_dir.join(format!("node-{id}")),
            config_manager: self.config_manager.clone(),
            log: self.log_options.clone(),
            store: Default::default(),
            tuning: Default::default(),
            security: Security {
                admin_token_file: None,
                ..self.security.clone()
            },
        };
        let service = store_node::Service::bind_with_log(options, self.log.clone())
            .await
            .with_context(|| format!("starting store node {id} on {listen}"))?;
        let entry = ManifestNode {
            id,
            listen: service.local_addr(),
        };
        let running = spawn(format!("store node {id}"), &self.exited, |stopped| {
            service.run(stopped)
        });
        let mut nodes = self.nodes.lock().expect("not poisoned");
        match nodes.as_mut() {
            Some(nodes) => nodes.push(running),
            None => {
                // Shutdown has begun: this node is not left running behind it.
                let _ = running.stop.send(true);
                bail!("causeway dev is shutting down");
            }
        }
        Ok(entry)
    }
}

/// The spare-node provider of a dev cluster: starts the store nodes a proposal is short of, in
/// this process, and records them in the manifest before they register.
#[derive(Debug, Clone, Default)]
pub struct DevSpares {
    inner: Arc<OnceLock<SparesReady>>,
}

/// What [`DevSpares`] needs, known once the store nodes of the manifest run.
struct SparesReady {
    context: NodeContext,
    manifest: Arc<Mutex<Manifest>>,
    /// One start at a time, so ids are never handed out twice.
    starting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SparesReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparesReady")
            .field("data_dir", &self.context.data_dir)
            .finish_non_exhaustive()
    }
}

impl DevSpares {
    fn ready(&self, context: NodeContext, manifest: Arc<Mutex<Manifest>>) {
        let _ = self.inner.set(SparesReady {
            context,
            manifest,
            starting: tokio::sync::Mutex::new(()),
        });
    }
}

impl cm::SpareNodes for DevSpares {
    fn start(
        &self,
        count: usize,
    ) -> futures::future::BoxFuture<'static, Result<(), cm::SpareNodesError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let ready = inner
                .get()
                .ok_or("causeway dev is still starting its store nodes")?;
            let _one_at_a_time = ready.starting.lock().await;
            for _ in 0..count {
                let (id, data_dir) = {
                    let m = ready.manifest.lock().expect("not poisoned");
                    if m.nodes.len() >= MAX_NODES {
                        return Err(format!(
                            "causeway dev runs at most {MAX_NODES} store nodes in one process"
                        )
                        .into());
                    }
                    let id = m.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
                    (id, ready.context.data_dir.clone())
                };
                let entry = ready
                    .context
                    .start(id, SocketAddr::from(([127, 0, 0, 1], 0)))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                tracing::info!(node = id, addr = %entry.listen, "spare store node started");
                let mut m = ready.manifest.lock().expect("not poisoned");
                m.nodes.push(entry);
                m.store(&data_dir).map_err(|e| format!("{e:#}"))?;
            }
            Ok(())
        })
    }
}

/// Records the shape of `config` in the manifest, if it differs.
fn record_shape(manifest: &Mutex<Manifest>, data_dir: &Path, config: &ClusterConfig) -> Result<()> {
    let partitions = u32::try_from(config.replicas.len()).unwrap_or(u32::MAX);
    let replicas = config.replicas.values().map(Vec::len).max().unwrap_or(0);
    let replicas = u32::try_from(replicas).unwrap_or(u32::MAX);
    let mut m = manifest.lock().expect("not poisoned");
    if (m.partitions, m.replicas) != (partitions, replicas) {
        tracing::info!(partitions, replicas, epoch = %config.epoch, "the installed shape goes into the manifest");
        m.partitions = partitions;
        m.replicas = replicas;
        m.store(data_dir)?;
    }
    Ok(())
}

/// Keeps the manifest's shape to the configuration installed, until `stopped`.
async fn keep_shape(
    mut pairs: watch::Receiver<cm::ConfigPair>,
    manifest: Arc<Mutex<Manifest>>,
    data_dir: PathBuf,
    stopped: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
) -> Result<(), std::io::Error> {
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return Ok(()),
            changed = pairs.changed() => {
                if changed.is_err() {
                    // The config manager stopped: shutdown is under way.
                    stopped.await;
                    return Ok(());
                }
            }
        }
        let current = pairs.borrow_and_update().current.clone();
        if let Some(config) = current {
            if let Err(e) = record_shape(&manifest, &data_dir, &config) {
                return Err(std::io::Error::other(format!("{e:#}")));
            }
        }
    }
}

/// Waits until the `count` store nodes of this run are registered and live.
async fn wait_registered(cm_handle: &cm::Handle, count: u32) -> Result<()> {
    loop {
        let nodes = cm_handle.list_nodes().await?;
        let live = nodes
            .iter()
            .filter(|n| n.live && (1..=u64::from(count)).contains(&n.info.id.0))
            .count();
        if live == count as usize {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the API answers a read (a never-written document: 404, not 503).
async fn wait_serving(url: &str, token: &str) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let probe = format!("{url}/v1/collections/{PROBE_COLLECTION}/documents/none");
    loop {
        let last = match http.get(&probe).bearer_auth(token).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(()),
            Ok(r) => format!("status {}", r.status()),
            Err(e) => e.to_string(),
        };
        tracing::debug!(last = %last, "waiting for the API to serve reads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(p: Option<u32>, r: Option<u32>) -> Args {
        Args {
            partitions: p,
            replicas: r,
            data_dir: PathBuf::from("d"),
            listen: "127.0.0.1:7300".parse().unwrap(),
            cdc_listen: "127.0.0.1:7500".parse().unwrap(),
            kafka: None,
            kafka_topic: "causeway-tx".into(),
            kafka_replication_factor: 1,
        }
    }

    fn manifest(p: u32, r: u32) -> Manifest {
        Manifest {
            partitions: p,
            replicas: r,
            config_manager: "127.0.0.1:1".parse().unwrap(),
            api: "127.0.0.1:2".parse().unwrap(),
            cdc: Some("127.0.0.1:4".parse().unwrap()),
            nodes: (1..=u64::from(p * r))
                .map(|id| ManifestNode {
                    id,
                    listen: "127.0.0.1:3".parse().unwrap(),
                })
                .collect(),
            log: ManifestLog::Embedded,
        }
    }

    #[test]
    fn the_shape_defaults_to_one_by_one_then_follows_the_data_dir() {
        assert_eq!(resolve_shape(&args(None, None), None).unwrap(), (1, 1));
        assert_eq!(resolve_shape(&args(Some(3), None), None).unwrap(), (3, 1));
        let m = manifest(2, 2);
        assert_eq!(resolve_shape(&args(None, None), Some(&m)).unwrap(), (2, 2));
        assert_eq!(
            resolve_shape(&args(Some(2), Some(2)), Some(&m)).unwrap(),
            (2, 2)
        );
        let e = resolve_shape(&args(Some(3), None), Some(&m)).unwrap_err();
        assert!(e.to_string().contains("holds a 2×2 cluster"), "{e}");
        assert!(resolve_shape(&args(Some(0), None), None).is_err());
    }

    #[test]
    fn the_log_is_chosen_on_the_first_start_and_kept() {
        let kafka = |bootstrap: &str| Args {
            kafka: Some(bootstrap.into()),
            ..args(None, None)
        };
        assert_eq!(
            resolve_log(&args(None, None), None).unwrap(),
            ManifestLog::Embedded
        );
        let on_kafka = resolve_log(&kafka("k:9092"), None).unwrap();
        assert_eq!(
            on_kafka,
            ManifestLog::Kafka {
                bootstrap_servers: "k:9092".into(),
                topic: "causeway-tx".into()
            }
        );
        let mut m = manifest(1, 1);
        m.log = on_kafka.clone();
        // Later starts reuse the data dir's log, with or without the same flag.
        assert_eq!(resolve_log(&args(None, None), Some(&m)).unwrap(), on_kafka);
        assert_eq!(resolve_log(&kafka("k:9092"), Some(&m)).unwrap(), on_kafka);
        let e = resolve_log(&kafka("other:9092"), Some(&m)).unwrap_err();
        assert!(
            e.to_string()
                .contains("runs on Kafka topic causeway-tx at k:9092"),
            "{e}"
        );
        let e = resolve_log(&kafka("k:9092"), Some(&manifest(1, 1))).unwrap_err();
        assert!(e.to_string().contains("runs on the embedded log"), "{e}");
        // A manifest from before the choice runs on the embedded log.
        let old = r#"{"partitions":1,"replicas":1,"config_manager":"127.0.0.1:1","api":"127.0.0.1:2","nodes":[{"id":1,"listen":"127.0.0.1:3"}]}"#;
        let old: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(old.log, ManifestLog::Embedded);
        assert_eq!(old.cdc, None, "data dirs from before the cdc service load");
        let dir = tempfile::tempdir().unwrap();
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m));
    }

    #[test]
    fn the_manifest_and_the_token_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), None);
        let m = manifest(2, 1);
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m));

        let tokens = dir.path().join("tokens.json");
        let first = ensure_admin_token(&tokens).unwrap();
        assert!(first.len() >= api::auth::MIN_TOKEN_BYTES);
        assert_eq!(ensure_admin_token(&tokens).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&tokens).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(generate_token(), first);
    }
}
