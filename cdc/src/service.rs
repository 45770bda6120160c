//! [`Service`]: opens the log, loads the feeds (the state dir and the options), runs one task
//! per feed and the admin API until shutdown; [`Handle`]: the feeds, to list and change.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_config_manager::{Client as ConfigClient, StoreNodes};
use causeway_txlog::TxLog;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;
use crate::feed::FeedSpec;
use crate::hold::HoldOptions;
use crate::metrics::FeedMetrics;
use crate::options::Options;
use crate::run::{self, FeedStatus};

/// A feed as the state file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    spec: FeedSpec,
    #[serde(default)]
    paused: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    feeds: Vec<Entry>,
}

/// One feed of the running service.
#[derive(Debug)]
struct Feed {
    entry: Entry,
    status: Arc<Mutex<FeedStatus>>,
    metrics: Arc<FeedMetrics>,
    /// Stops the feed's task; `None` while paused.
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

/// What the admin API answers for a feed (its spec without secrets).
#[derive(Debug, Clone, Serialize)]
pub struct FeedInfo {
    pub spec: FeedSpec,
    pub paused: bool,
    pub status: FeedStatus,
    pub events: u64,
}

/// Why a change to the feeds was refused.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}")]
    Invalid(String),
    #[error("a feed named {0:?} exists")]
    Exists(String),
    #[error("no feed is named {0:?}")]
    NotFound(String),
    #[error("saving the feeds: {0}")]
    State(String),
}

#[derive(Debug)]
pub(crate) struct Shared {
    options: Options,
    log: TxLog,
    nodes: Arc<StoreNodes>,
    feeds: tokio::sync::Mutex<BTreeMap<String, Feed>>,
    state_file: PathBuf,
    /// Set at shutdown: no feed starts after it.
    stopping: watch::Sender<bool>,
}

/// A cdc service, bound and ready to [`Service::run`].
#[derive(Debug)]
pub struct Service {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
    config_manager: ConfigClient,
    owns_log: bool,
}

/// A cheap clonable view of a running service.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Service {
    pub async fn bind(options: Options) -> Result<Service, Error> {
        options.validate()?;
        let log = TxLog::open(options.log.clone()).await.map_err(Error::Log)?;
        let mut s = Service::bind_with_log(options, log).await?;
        s.owns_log = true;
        Ok(s)
    }

    /// As [`Service::bind`] with a log that is already open (`causeway dev`).
    pub async fn bind_with_log(options: Options, log: TxLog) -> Result<Service, Error> {
        options.validate()?;
        let link = causeway_proto::link::Link::load(&options.security)?.without_admin_token();
        let config_manager = ConfigClient::connect_lazy(&options.config_manager_addr, &link)
            .map_err(Error::ConfigManager)?;
        let listener = TcpListener::bind(options.listen_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: options.listen_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: options.listen_addr,
            source,
        })?;
        let state_file = options.state_dir.join("feeds.json");
        let state_error = |why: String| Error::State {
            path: state_file.display().to_string(),
            why,
        };
        std::fs::create_dir_all(&options.state_dir).map_err(|e| state_error(e.to_string()))?;
        let mut state: StateFile = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| state_error(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(state_error(e.to_string())),
        };
        for spec in &options.feeds {
            match state.feeds.iter_mut().find(|e| e.spec.name == spec.name) {
                Some(e) => e.spec = spec.clone(),
                None => state.feeds.push(Entry {
                    spec: spec.clone(),
                    paused: false,
                }),
            }
        }
        let mut feeds = BTreeMap::new();
        for entry in state.feeds {
            entry
                .spec
                .selection()
                .map_err(|e| state_error(e.to_string()))?;
            feeds.insert(
                entry.spec.name.clone(),
                Feed {
                    entry,
                    status: Arc::default(),
                    metrics: Arc::default(),
                    running: None,
                },
            );
        }
        let shared = Arc::new(Shared {
            nodes: Arc::new(StoreNodes::new(options.store_tries, Arc::default(), link)),
            options,
            log,
            feeds: tokio::sync::Mutex::new(feeds),
            state_file: state_file.clone(),
            stopping: watch::channel(false).0,
        });
        shared
            .save(&*shared.feeds.lock().await)
            .map_err(|e| state_error(e.to_string()))?;
        Ok(Service {
            shared,
            listener,
            local_addr,
            config_manager,
            owns_log: false,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
            local_addr: self.local_addr,
        }
    }

    /// Runs the feeds and the admin API until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Service {
            shared,
            listener,
            local_addr,
            config_manager,
            owns_log,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let follow =
            tokio::spawn(Arc::clone(&shared.nodes).follow(config_manager, stop_rx.clone()));
        {
            let mut feeds = shared.feeds.lock().await;
            for feed in feeds.values_mut() {
                if !feed.entry.paused {
                    shared.start(feed);
                } else {
                    feed.status.lock().unwrap_or_else(|e| e.into_inner()).state = "paused".into();
                }
            }
        }
        let handle = Handle {
            shared: Arc::clone(&shared),
            local_addr,
        };
        let app = crate::http::router(handle);
        let mut stopped = stop_rx.clone();
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .into_future(),
        );
        tracing::info!(addr = %local_addr, "cdc listening");
        shutdown.await;
        let _ = shared.stopping.send(true);
        let _ = stop_tx.send(true);
        let mut tasks = Vec::new();
        for feed in shared.feeds.lock().await.values_mut() {
            if let Some((stop, task)) = feed.running.take() {
                let _ = stop.send(true);
                tasks.push(task);
            }
        }
        for t in tasks {
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                tracing::warn!("a feed did not stop within 10 s");
            }
        }
        let _ = follow.await;
        let served = server.await;
        if owns_log {
            if let Err(e) = shared.log.close().await {
                tracing::warn!(error = %e, "closing the log failed");
            }
        }
        tracing::info!("cdc stopped");
        match served {
            Ok(r) => r.map_err(Error::Serve),
            Err(join) => Err(Error::Serve(std::io::Error::other(join))),
        }
    }
}

impl Shared {
    fn start(&self, feed: &mut Feed) {
        if *self.stopping.borrow() {
            return;
        }
        let (stop, rx) = watch::channel(false);
        let cx = run::Context {
            log: self.log.clone(),
            nodes: Arc::clone(&self.nodes),
            state_dir: self.options.state_dir.clone(),
            resolved_interval: Duration::from_millis(self.options.resolved_interval_ms),
            hold: HoldOptions {
                protect_max_age: Duration::from_millis(self.options.protect_max_age_ms),
                refresh: Duration::from_millis(200),
                linger: Duration::from_millis(self.options.hold_linger_ms),
            },
            status: Arc::clone(&feed.status),
            metrics: Arc::clone(&feed.metrics),
        };
        let task = tokio::spawn(run::run(feed.entry.spec.clone(), cx, rx));
        feed.running = Some((stop, task));
    }

    /// Writes the feeds (fsync, rename).
    fn save(&self, feeds: &BTreeMap<String, Feed>) -> std::io::Result<()> {
        let state = StateFile {
            feeds: feeds.values().map(|f| f.entry.clone()).collect(),
        };
        let tmp = self.state_file.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&state).expect("feeds serialize");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.state_file)?;
        std::fs::File::open(&self.options.state_dir)?.sync_all()
    }
}

impl Handle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.shared.options.admin_token.as_deref()
    }

    pub async fn list(&self) -> Vec<FeedInfo> {
        self.shared
            .feeds
            .lock()
            .await
            .values()
            .map(|f| FeedInfo {
                spec: f.entry.spec.redacted(),
                paused: f.entry.paused,
                status: f.status.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                events: f.metrics.events(),
            })
            .collect()
    }

    pub async fn get(&self, name: &str) -> Option<FeedInfo> {
        self.list().await.into_iter().find(|f| f.spec.name == name)
    }

    /// Creates and starts a feed.
    pub async fn create(&self, spec: FeedSpec) -> Result<(), FeedError> {
        spec.selection()
            .map_err(|e| FeedError::Invalid(e.to_string()))?;
        let mut feeds = self.shared.feeds.lock().await;
        if feeds.contains_key(&spec.name) {
            return Err(FeedError::Exists(spec.name));
        }
        let name = spec.name.clone();
        feeds.insert(
            name.clone(),
            Feed {
                entry: Entry {
                    spec,
                    paused: false,
                },
                status: Arc::default(),
                metrics: Arc::default(),
                running: None,
            },
        );
        if let Err(e) = self.shared.save(&feeds) {
            feeds.remove(&name);
            return Err(FeedError::State(e.to_string()));
        }
        self.shared.start(feeds.get_mut(&name).expect("inserted"));
        Ok(())
    }

    /// Stops a feed and keeps it (and its checkpoint) until [`Handle::resume`].
    pub async fn pause(&self, name: &str) -> Result<(), FeedError> {
        self.set_paused(name, true).await
    }

    /// Starts a paused (or stopped: history lost, failed) feed again from its checkpoint.
    pub async fn resume(&self, name: &str) -> Result<(), FeedError> {
        self.set_paused(name, false).await
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), FeedError> {
        let mut feeds = self.shared.feeds.lock().await;
        let feed = feeds
            .get_mut(name)
            .ok_or_else(|| FeedError::NotFound(name.to_owned()))?;
        feed.entry.paused = paused;
        let task = feed.running.take();
        if let Some((stop, task)) = task {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let feed = feeds.get_mut(name).expect("present");
        if paused {
            feed.status.lock().unwrap_or_else(|e| e.into_inner()).state = "paused".into();
        } else {
            self.shared.start(feed);
        }
        self.shared
            .save(&feeds)
            .map_err(|e| FeedError::State(e.to_string()))
    }

    /// Stops and forgets a feed, with its checkpoint file (a Kafka feed's checkpoint record
    /// stays in its topic: a feed created again under the name goes on from it).
    pub async fn delete(&self, name: &str) -> Result<(), FeedError> {
        let mut feeds = self.shared.feeds.lock().await;
        let mut feed = feeds
            .remove(name)
            .ok_or_else(|| FeedError::NotFound(name.to_owned()))?;
        if let Some((stop, task)) = feed.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let _ = std::fs::remove_file(
            self.shared
                .options
                .state_dir
                .join("checkpoints")
                .join(format!("{name}.txt")),
        );
        self.shared
            .save(&feeds)
            .map_err(|e| FeedError::State(e.to_string()))
    }

    /// The metrics as Prometheus text.
    pub async fn metrics_text(&self) -> String {
        let mut out = String::new();
        crate::metrics::preamble(&mut out);
        for (name, f) in self.shared.feeds.lock().await.iter() {
            f.metrics.render(name, &mut out);
        }
        out
    }
}
