//! [`Service`]: binds the listener, opens the log, loads the tokens, and runs the HTTP server
//! and the config watch until shutdown; [`Handle`]: a cheap clonable view of a running service.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use causeway_config_manager::Client as ConfigClient;
use causeway_txlog::TxLog;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::admission::Admission;
use crate::auth::TokenStore;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::options::Options;
use crate::rate::RateLimiter;
use crate::tls::Certificate;
use causeway_config_manager::StoreNodes as Store;

/// What every request shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) options: Options,
    pub(crate) log: TxLog,
    pub(crate) store: Arc<Store>,
    /// The tokens in use, reloaded when their file changes.
    pub(crate) tokens: TokenStore,
    /// The request rate of each token.
    pub(crate) rate: RateLimiter,
    /// The HTTPS certificate, reloaded when its files change; `None`: plain HTTP.
    pub(crate) certificate: Option<Arc<Certificate>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Permits for `/v1` requests in flight (`max_concurrent_requests`).
    pub(crate) in_flight: Arc<Semaphore>,
    /// Bytes of request bodies held at once (`max_buffered_body_bytes`).
    pub(crate) body_bytes: Arc<Semaphore>,
    /// The OpenAPI document, rendered once.
    pub(crate) openapi_json: String,
    /// The highest `Bounds::next` of the log this server has seen (from its appends and from
    /// `bounds()`): a causal token below it names a transaction that exists.
    pub(crate) log_next: AtomicU64,
    /// Admission control of writes.
    pub(crate) admission: Admission,
    /// Permits for open change streams (`changes.max_streams`).
    pub(crate) change_streams: Arc<Semaphore>,
    /// Set when the service stops: change streams end.
    pub(crate) stopping: watch::Sender<bool>,
    /// The log's end over the last resume window, for the change streams' holds.
    pub(crate) log_ends: crate::changes::LogEnds,
}

/// An api-server, bound and ready to [`Service::run`].
#[derive(Debug)]
pub struct Service {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
    config_manager: ConfigClient,
    /// Whether this service opened the log (and so closes it at shutdown). A log handed in by
    /// [`Service::bind_with_log`] is shared with others and left open.
    owns_log: bool,
}

/// A cheap clonable view of a service.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Service {
    /// Validates the options, opens the log they name, loads the tokens and binds the listener.
    pub async fn bind(options: Options) -> Result<Service, Error> {
        options.validate()?;
        let log = TxLog::open(options.log.clone()).await.map_err(Error::Log)?;
        let mut service = Service::bind_with_log(options, log).await?;
        service.owns_log = true;
        Ok(service)
    }

    /// As [`Service::bind`], with a log that is already open (`causeway dev` and tests share one
    /// embedded log between the api-server and the store nodes). `options.log` is ignored.
    pub async fn bind_with_log(options: Options, log: TxLog) -> Result<Service, Error> {
        options.validate()?;
        let tokens =
            TokenStore::open(options.tokens_file.clone()).map_err(|source| Error::Tokens {
                path: options.tokens_file.clone().unwrap_or_default(),
                source,
            })?;
        if options.tokens_file.is_none() {
            tracing::warn!("no tokens file: every /v1 request will be refused with 401");
        }
        let certificate = match &options.https {
            Some(https) => Some(Certificate::open(https).map_err(Error::Tls)?),
            None => None,
        };
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
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            store: Arc::new(
                Store::new(
                    options.timeouts.store_tries,
                    metrics.store_failovers.clone(),
                    link,
                )
                .with_hedge_delay(std::time::Duration::from_millis(
                    options.timeouts.store_hedge_ms,
                ))
                .with_max_message_bytes(options.limits.max_store_message_bytes),
            ),
            in_flight: Arc::new(Semaphore::new(options.limits.max_concurrent_requests)),
            body_bytes: Arc::new(Semaphore::new(options.limits.max_buffered_body_bytes)),
            openapi_json: crate::openapi::json(&options.limits),
            log_next: AtomicU64::new(0),
            admission: Admission::new(options.admission),
            change_streams: Arc::new(Semaphore::new(options.changes.max_streams)),
            stopping: watch::channel(false).0,
            log_ends: Default::default(),
            rate: RateLimiter::new(
                options.limits.token_requests_per_s,
                options.limits.token_burst,
            ),
            certificate,
            options,
            log,
            tokens,
            metrics,
        });
        Ok(Service {
            shared,
            listener,
            local_addr,
            config_manager,
            owns_log: false,
        })
    }

    /// The address the server listens on (the real port when the options said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
            local_addr: self.local_addr,
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (at most `shutdown_grace_ms`), stops the config watch and, when this service opened the
    /// log, closes it.
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
        let stop_rx = shared.stopping.subscribe();
        let follower = tokio::spawn(shared.store.clone().follow(config_manager, stop_rx.clone()));
        let sampler = tokio::spawn(crate::admission::sample_loop(
            shared.clone(),
            stop_rx.clone(),
        ));
        let reloader = tokio::spawn(reload_loop(shared.clone(), stop_rx.clone()));
        let app = crate::routes::router(shared.clone());
        let tls = match &shared.certificate {
            Some(certificate) => Some(certificate.server_config().map_err(Error::Tls)?),
            None => None,
        };
        let https = tls.is_some();
        let listener = crate::server::Listener {
            listener,
            tls,
            max_connections: shared.options.limits.max_connections,
            header_read: Duration::from_millis(shared.options.timeouts.header_read_ms),
        };
        let mut server = tokio::spawn(crate::server::serve(listener, app, stop_rx.clone()));
        tracing::info!(addr = %local_addr, https, "api-server listening");
        let early = tokio::select! {
            () = shutdown => None,
            r = &mut server => Some(r),
        };
        let _ = shared.stopping.send(true);
        let result = match early {
            Some(joined) => joined,
            None => {
                let grace = Duration::from_millis(shared.options.timeouts.shutdown_grace_ms);
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        tracing::warn!(
                            "requests still in flight after the shutdown grace; dropping them"
                        );
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        let _ = follower.await;
        let _ = sampler.await;
        let _ = reloader.await;
        if owns_log {
            if let Err(e) = shared.log.close().await {
                tracing::warn!(error = %e, "closing the log failed");
            }
        }
        tracing::info!("api-server stopped");
        match result {
            Ok(r) => r.map_err(Error::Serve),
            Err(join) => Err(Error::Serve(std::io::Error::other(join))),
        }
    }
}

/// Reads the tokens file and the HTTPS files again every `tokens_reload_ms` and
/// `https.reload_ms`, until `stop` says stop. A file that does not load keeps what is in use and
/// logs an error once per change.
async fn reload_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tokens = tokio::time::interval(Duration::from_millis(shared.options.tokens_reload_ms));
    let https_ms = shared
        .options
        .https
        .as_ref()
        .map_or(u64::MAX / 4, |h| h.reload_ms);
    let mut https = tokio::time::interval(Duration::from_millis(https_ms));
    for ticker in [&mut tokens, &mut https] {
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.reset();
    }
    loop {
        tokio::select! {
            _ = tokens.tick() => match shared.tokens.reload() {
                Ok(true) => tracing::info!(
                    tokens = shared.tokens.current().len(),
                    "the tokens file changed: its tokens are in use"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    source = ?std::error::Error::source(&e),
                    "the tokens file changed but does not load: the tokens in use are kept"
                ),
            },
            _ = https.tick() => {
                let Some(certificate) = &shared.certificate else { continue };
                match certificate.reload() {
                    Ok(true) => tracing::info!("the HTTPS certificate files changed: the new certificate is in use"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        error = %e,
                        source = ?std::error::Error::source(&e),
                        "the HTTPS certificate files changed but do not load: the certificate in use is kept"
                    ),
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

impl Handle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether a routing configuration with store nodes is known (what `/readyz` says).
    pub fn is_ready(&self) -> bool {
        self.shared.store.has_nodes()
    }

    /// The metrics as Prometheus text (what `/metrics` answers).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// The log this service writes to.
    pub fn log(&self) -> &TxLog {
        &self.shared.log
    }
}
