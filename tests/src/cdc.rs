//! Change data capture in a [`LocalCluster`]: `causeway-cdc` processes ([`Cdc`]: started with
//! their feeds, killed -9 by PID, restarted on the same state directory) and a webhook endpoint
//! ([`Receiver`]) that checks every request's Standard Webhooks signature and records every
//! event it acknowledges, and can answer 503 or refuse connections for a while.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use causeway_cdc::sink::webhook;
use causeway_core::cdc::Position;
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;

use crate::process::{binary, free_addr, Proc};
use crate::{until, LocalCluster};

/// The admin token of every `causeway-cdc` the harness starts.
pub const CDC_ADMIN_TOKEN: &str = "local-cluster-cdc-admin-token";

/// A webhook secret (Standard Webhooks form) for test feeds.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One `causeway-cdc` process. Dropping it kills it.
#[derive(Debug)]
pub struct Cdc {
    proc: Proc,
    addr: SocketAddr,
    config: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    http: reqwest::Client,
}

impl LocalCluster {
    /// Starts a `causeway-cdc` against this cluster's log and config manager with `feeds` (feed
    /// specs as JSON) and `resolved_interval_ms`, and waits until its admin API answers.
    /// `CAUSEWAY_TEST_CDC_LINGER_MS` sets its `hold_linger_ms` (default 10 min; `0` shows what a
    /// restart does to a feed without it: `history_lost`).
    pub async fn start_cdc(&self, feeds: Vec<Json>, resolved_interval_ms: u64) -> Result<Cdc> {
        static CDCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CDCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let dir = self.root.join(format!("cdc-{n}"));
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr()?;
        let state_dir = dir.join("state");
        let linger_ms = std::env::var("CAUSEWAY_TEST_CDC_LINGER_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(600_000);
        let options = json!({
            "listen_addr": addr.to_string(),
            "config_manager_addr": self.cm_addr.to_string(),
            "log": self.log_options,
            "state_dir": state_dir,
            "feeds": feeds,
            "resolved_interval_ms": resolved_interval_ms,
            "admin_token": CDC_ADMIN_TOKEN,
            "hold_linger_ms": linger_ms,
            "security": self.member_security(),
        });
        let config = dir.join("options.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&options)?)?;
        let log = self.root.join(format!("cdc-{n}.log"));
        let cdc = Cdc {
            proc: spawn_cdc(&config, &log)?,
            addr,
            config,
            state_dir,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        cdc.wait_healthy(Duration::from_secs(30)).await?;
        Ok(cdc)
    }
}

fn spawn_cdc(config: &std::path::Path, log: &std::path::Path) -> Result<Proc> {
    let mut command = Command::new(binary("causeway-cdc")?);
    command.arg("--config").arg(config);
    Proc::spawn(command, log.to_path_buf())
}

impl Cdc {
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_healthy(&self, deadline: Duration) -> Result<()> {
        let url = format!("{}/healthz", self.admin_url());
        let http = self.http.clone();
        let healthy = until("causeway-cdc to answer /healthz", deadline, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        healthy.map_err(|e| anyhow!("{e}\n--- cdc ---\n{}", self.tail()))
    }

    /// A feed as the admin API shows it (`spec`, `paused`, `status`, `events`).
    pub async fn feed(&self, name: &str) -> Result<Json> {
        let r = self
            .http
            .get(format!("{}/v1/feeds/{name}", self.admin_url()))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("GET feed {name}: {}", r.status());
        }
        Ok(r.json().await?)
    }

    /// Creates a feed through the admin API.
    pub async fn create_feed(&self, spec: &Json) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/v1/feeds", self.admin_url()))
            .bearer_auth(CDC_ADMIN_TOKEN)
            .json(spec)
            .send()
            .await?;
        if r.status() != StatusCode::CREATED {
            let status = r.status();
            bail!(
                "creating feed: {status} {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Waits until `name`'s admin view satisfies `ready`; answers that view.
    pub async fn wait_feed(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        ready: impl Fn(&Json) -> bool,
    ) -> Result<Json> {
        let ready = &ready;
        let waited = until(&format!("feed {name}: {what}"), deadline, || async move {
            let f = self.feed(name).await.ok()?;
            ready(&f).then_some(f)
        })
        .await;
        waited.map_err(|e| anyhow!("{e}\n--- cdc ---\n{}", self.tail()))
    }

    /// The durable checkpoint of a webhook feed (its file in `state_dir/checkpoints`).
    pub fn checkpoint(&self, feed: &str) -> Result<Option<Position>> {
        let file = self
            .state_dir
            .join("checkpoints")
            .join(format!("{feed}.txt"));
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(Some(
                text.trim()
                    .parse()
                    .with_context(|| format!("{}", file.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// SIGSTOP: the process does nothing more until [`Cdc::kill`] or [`Cdc::resume`].
    pub fn pause(&self) -> Result<()> {
        self.proc.signal("STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.proc.signal("CONT")
    }

    /// kill -9 by PID, and reap.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.signal("KILL")?;
        if let Some(mut child) = self.proc.child.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the killed process again on the same options, state and address.
    pub async fn restart(&mut self) -> Result<()> {
        if self.proc.is_running() {
            bail!("causeway-cdc is running");
        }
        self.proc = spawn_cdc(&self.config, &self.log)?;
        self.wait_healthy(Duration::from_secs(30)).await
    }

    /// The tail of the process's log.
    pub fn tail(&self) -> String {
        self.proc.tail()
    }
}

/// The spec of a webhook feed of `collections` to `url`, signed with [`WEBHOOK_SECRET`], at
/// most `max_events` per request, retried briefly and blocking when retries run out; `extra`'s
/// fields are set over it.
pub fn webhook_feed(
    name: &str,
    url: &str,
    collections: &[&str],
    max_events: usize,
    extra: Json,
) -> Json {
    let mut spec = json!({
        "name": name,
        "collections": collections,
        "sink": {
            "type": "webhook",
            "url": url,
            "secrets": [WEBHOOK_SECRET],
            "max_events": max_events,
            "max_delay_ms": 20,
            "max_attempts": 3,
            "backoff_first_ms": 100,
            "backoff_max_ms": 1000,
            "on_exhausted": {"mode": "block"},
        },
    });
    if let Some(extra) = extra.as_object() {
        for (k, val) in extra {
            spec[k] = val.clone();
        }
    }
    spec
}

/// How a [`Receiver`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// 503 to every request (with `Retry-After: 1`), without recording it.
    Unavailable,
}

/// One acknowledged request.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which run of the feed's process sent it ([`Receiver::next_run`] counts them).
    pub run: u32,
    pub webhook_id: String,
    pub at: Instant,
    pub events: Vec<Json>,
}

#[derive(Debug)]
struct ReceiverState {
    mode: Mode,
    run: u32,
    deliveries: Vec<Delivery>,
    /// Requests answered 503.
    refused: u64,
    /// Requests that failed a check (signature, headers, body): each is a defect.
    bad: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    keys: Vec<Vec<u8>>,
    state: Mutex<ReceiverState>,
}

/// A webhook endpoint on 127.0.0.1 that verifies and records every request.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Receiver {
    /// Listens on a free loopback port; checks signatures with [`WEBHOOK_SECRET`].
    pub async fn start() -> Result<Receiver> {
        let keys = vec![webhook::secret_key(WEBHOOK_SECRET).map_err(|e| anyhow!(e))?];
        let shared = Arc::new(Shared {
            keys,
            state: Mutex::new(ReceiverState {
                mode: Mode::Up,
                run: 0,
                deliveries: Vec::new(),
                refused: 0,
                bad: Vec::new(),
            }),
        });
        let mut r = Receiver {
            addr: free_addr()?,
            shared,
            server: None,
        };
        r.listen().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    async fn listen(&mut self) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding the receiver on {}", self.addr))?;
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&self.shared));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        self.server = Some((tx, task));
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReceiverState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answer 503 from now on.
    pub fn unavailable(&self) {
        self.state().mode = Mode::Unavailable;
    }

    /// Stop listening: connections are refused until [`Receiver::accept`].
    pub async fn refuse(&mut self) -> Result<()> {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .map_err(|_| anyhow!("the receiver did not stop within 15 s"))??;
        }
        Ok(())
    }

    /// Listen again (on the same port) and acknowledge requests.
    pub async fn accept(&mut self) -> Result<()> {
        self.state().mode = Mode::Up;
        if self.server.is_none() {
            self.listen().await?;
        }
        Ok(())
    }

    /// The feed's process was restarted: later deliveries belong to its next run.
    pub fn next_run(&self) {
        self.state().run += 1;
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state().deliveries.clone()
    }

    /// Requests answered 503.
    pub fn refused(&self) -> u64 {
        self.state().refused
    }

    /// Requests that failed the receiver's checks.
    pub fn bad(&self) -> Vec<String> {
        self.state().bad.clone()
    }

    /// The highest `causeway.resolved` ts received.
    pub fn resolved(&self) -> u64 {
        self.state()
            .deliveries
            .iter()
            .flat_map(|d| &d.events)
            .filter(|e| e["type"] == "causeway.resolved")
            .filter_map(|e| e["data"]["resolved"].as_u64())
            .max()
            .unwrap_or(0)
    }
}

/// Largest difference between a request's `webhook-timestamp` and the receiver's clock
/// (the Standard Webhooks recommendation).
const TIMESTAMP_TOLERANCE_S: u64 = 300;

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let checked = (|| -> Result<(String, Vec<Json>), String> {
        let id = header("webhook-id").ok_or("no webhook-id")?;
        let ts: u64 = header("webhook-timestamp")
            .and_then(|t| t.parse().ok())
            .ok_or("no webhook-timestamp")?;
        let signature = header("webhook-signature").ok_or("no webhook-signature")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now.abs_diff(ts) > TIMESTAMP_TOLERANCE_S {
            return Err(format!("webhook-timestamp {ts} is {now} ± more than 5 min"));
        }
        if !webhook::verify(&shared.keys, &id, ts, &body, &signature) {
            return Err(format!("bad signature on {id}"));
        }
        if header("content-type").as_deref() != Some(causeway_cdc::event::BATCH_CONTENT_TYPE) {
            return Err(format!("{id}: content type {:?}", header("content-type")));
        }
        let events: Vec<Json> =
            serde_json::from_slice(&body).map_err(|e| format!("{id}: not a JSON array: {e}"))?;
        if events.is_empty() {
            return Err(format!("{id}: an empty batch"));
        }
        let first = events[0]["id"].as_str().unwrap_or_default();
        if !id.ends_with(&format!("-{first}")) {
            return Err(format!(
                "webhook-id {id} does not name the first event {first}"
            ));
        }
        Ok((id, events))
    })();
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    match checked {
        Err(why) => {
            state.bad.push(why);
            StatusCode::UNAUTHORIZED
        }
        Ok(_) if state.mode == Mode::Unavailable => {
            state.refused += 1;
            StatusCode::SERVICE_UNAVAILABLE
        }
        Ok((webhook_id, events)) => {
            let run = state.run;
            state.deliveries.push(Delivery {
                run,
                webhook_id,
                at: Instant::now(),
                events,
            });
            StatusCode::NO_CONTENT
        }
    }
}
