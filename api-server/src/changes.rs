//! Server-sent events of committed changes (DESIGN.md §11): `GET /v1/changes` and
//! `GET /v1/collections/{collection}/changes`.
//!
//! Each stream is a [`Follower`] of its own over the log, from the client's cursor
//! (`Last-Event-ID`, else `after=`, else the log's end), with the token's read permissions in its
//! selection: a token sees the changes of the collections it may read and nothing else, and a
//! transaction's `tx.count` counts only those. Events are the CloudEvents of the cdc feeds, one
//! per SSE event (`id:` the position, `event:` the type, `data:` the structured JSON); a
//! `causeway.resolved` event every `changes.resolved_interval_ms` is the heartbeat.
//!
//! A stream holds the cluster's GC timestamp at its cursor (a named hold, `causeway_cdc::hold`),
//! and the store node keeps that hold for `changes.resume_window_ms` after the client went away:
//! a client that reconnects with `Last-Event-ID` within the window misses nothing. A client that
//! does not read is disconnected once its stream's buffer has been full for
//! `changes.slow_client_ms`. History that is gone (log retention, GC past a cursor older than
//! the window) ends the stream with `causeway.history_lost`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use causeway_cdc::event::Body as EventBody;
use causeway_cdc::feed::Selection;
use causeway_cdc::follow::{FollowError, Follower, Tuning};
use causeway_cdc::hold::{Hold, HoldOptions};
use causeway_cdc::Event;
use causeway_core::cdc::Position;
use causeway_core::{CollectionPattern, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::auth::{Access, Principal};
use crate::metrics::Metrics;
use crate::problem::{Kind, Problem, ProblemBody};
use crate::service::Shared;

/// The CloudEvents `source` of the api-server's streams.
const SOURCE: &str = "/causeway/changes";
/// Longest cursor (`after=`, `Last-Event-ID`) and `collections=` value accepted, in bytes.
const MAX_PARAMETER_BYTES: usize = 4096;
/// Most patterns in `collections=`.
const MAX_PATTERNS: usize = 64;

/// Settings of the change streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesOptions {
    /// Most streams open at once on this api-server; more get 503 `overloaded`. Default 256.
    pub max_streams: usize,
    /// How often a stream sends `causeway.resolved`, even when idle. Default 1000 ms.
    pub resolved_interval_ms: u64,
    /// Bytes of events a stream buffers for a client that reads slower than they come (an event
    /// larger than this takes the whole buffer). Default 1 MiB.
    pub buffer_bytes: usize,
    /// How long a client may keep the stream waiting for room in its buffer (every event in
    /// that time had to wait) before it is disconnected. Default 5000 ms.
    pub slow_client_ms: u64,
    /// How long the store nodes keep the history after a stream's last event once its client
    /// went away, so that a client reconnecting within it resumes from `Last-Event-ID`.
    /// Default 60000 ms (at most a day).
    pub resume_window_ms: u64,
}

impl Default for ChangesOptions {
    fn default() -> Self {
        ChangesOptions {
            max_streams: 256,
            resolved_interval_ms: 1000,
            buffer_bytes: 1 << 20,
            slow_client_ms: 5000,
            resume_window_ms: 60_000,
        }
    }
}

impl ChangesOptions {
    /// Why these settings cannot work, if they cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.max_streams == 0 || self.buffer_bytes == 0 || self.buffer_bytes > u32::MAX as usize
        {
            return Some(
                "changes.max_streams and changes.buffer_bytes (at most 4 GiB) must be positive",
            );
        }
        if self.resolved_interval_ms == 0 || self.resolved_interval_ms > 3_600_000 {
            return Some("changes.resolved_interval_ms is 1 to 3600000");
        }
        if self.slow_client_ms == 0 {
            return Some("changes.slow_client_ms must be positive");
        }
        if self.resume_window_ms > 24 * 3600 * 1000 {
            return Some("changes.resume_window_ms is at most 86400000 (a day)");
        }
        None
    }
}

/// What a stream asks for.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    /// Resume after this; `None`: from the log's end.
    after: Option<Position>,
    /// `collections=` of `/v1/changes` (default every collection).
    patterns: Vec<CollectionPattern>,
    /// `before=true`: carry before-images.
    before: bool,
}

/// The stream's parameters from the query and `Last-Event-ID` (which wins over `after=`: it is
/// what a reconnecting client sends).
fn params(query: Option<&str>, headers: &HeaderMap) -> Result<Params, Problem> {
    let invalid = |why: String| Problem::new(Kind::InvalidParameter, why);
    let cursor = |text: &str, name: &str| -> Result<Position, Problem> {
        if text.len() > MAX_PARAMETER_BYTES {
            return Err(invalid(format!(
                "{name} is longer than {MAX_PARAMETER_BYTES} bytes"
            )));
        }
        text.trim()
            .parse::<Position>()
            .map_err(|e| invalid(format!("{name}: {e}")))
    };
    let mut params = Params {
        after: None,
        patterns: Vec::new(),
        before: false,
    };
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "after" => params.after = Some(cursor(&value, "after")?),
            "before" => {
                params.before = match &*value {
                    "true" | "" => true,
                    "false" => false,
                    _ => return Err(invalid("before is true or false".into())),
                }
            }
            "collections" => {
                if value.len() > MAX_PARAMETER_BYTES {
                    return Err(invalid(format!(
                        "collections is longer than {MAX_PARAMETER_BYTES} bytes"
                    )));
                }
                for p in value.split(',').filter(|p| !p.is_empty()) {
                    let pattern = CollectionPattern::parse(p).ok_or_else(|| {
                        invalid(format!(
                            "collections: {:?} is not a collection name, `prefix*` or `*`",
                            p.chars().take(64).collect::<String>()
                        ))
                    })?;
                    params.patterns.push(pattern);
                }
                if params.patterns.len() > MAX_PATTERNS {
                    return Err(invalid(format!(
                        "collections names at most {MAX_PATTERNS} patterns"
                    )));
                }
            }
            _ => {}
        }
    }
    if let Some(id) = headers.get("last-event-id") {
        let text = id
            .to_str()
            .map_err(|_| invalid("Last-Event-ID is not ASCII".into()))?;
        if !text.trim().is_empty() {
            params.after = Some(cursor(text, "Last-Event-ID")?);
        }
    }
    Ok(params)
}

#[utoipa::path(
    get,
    path = "/v1/changes",
    tag = "changes",
    params(
        ("after" = Option<String>, Query, description = "Resume after this event id (`ts.index`) or ts; default: from now"),
        ("before" = Option<bool>, Query, description = "Carry before-images"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (wins over `after`)"),
        ("collections" = Option<String>, Query, description = "Comma-separated collection patterns (`orders,catalog_*`); default every collection the token may read"),
    ),
    responses(
        (status = 200, description = "The stream: per event `id:` (the position), `event:` (the CloudEvents type) and `data:` (the CloudEvents JSON); `causeway.resolved` heartbeats", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid cursor or parameter", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "The history after the cursor is gone", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Too many streams, or the log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn all_changes(
    State(s): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    if !principal.reads_any() {
        return Err(Problem::new(
            Kind::Forbidden,
            "this token may not read any collection",
        ));
    }
    let mut params = params(query.as_deref(), &headers)?;
    if params.patterns.is_empty() {
        params
            .patterns
            .push(CollectionPattern::Prefix(String::new()));
    }
    open(&s, principal, credentials(&headers), params).await
}

#[utoipa::path(
    get,
    path = "/v1/collections/{collection}/changes",
    tag = "changes",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("after" = Option<String>, Query, description = "Resume after this event id (`ts.index`) or ts; default: from now"),
        ("before" = Option<bool>, Query, description = "Carry before-images"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (wins over `after`)"),
    ),
    responses(
        (status = 200, description = "The stream: per event `id:` (the position), `event:` (the CloudEvents type) and `data:` (the CloudEvents JSON); `causeway.resolved` heartbeats", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid cursor or parameter", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "The history after the cursor is gone", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Too many streams, or the log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn collection_changes(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let collection = s.collection_from_path(path)?;
    principal.require(Access::Read, &collection)?;
    let mut params = params(query.as_deref(), &headers)?;
    params.patterns = vec![CollectionPattern::Exact(collection)];
    open(&s, principal, credentials(&headers), params).await
}

/// The headers a stream shows again, while it runs, to stay open: its token.
fn credentials(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        kept.insert(header::AUTHORIZATION, v.clone());
    }
    kept
}

/// How often a stream checks that its token is still in the tokens file.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

/// Starts a stream: a permit of `max_streams`, the cursor checked against the log and the
/// history kept (so that a bad or lost cursor is a problem, not a stream), the follower's task,
/// the response.
async fn open(
    s: &Arc<Shared>,
    principal: Arc<Principal>,
    credentials: HeaderMap,
    params: Params,
) -> Result<Response, Problem> {
    let permit = Arc::clone(&s.change_streams)
        .try_acquire_owned()
        .map_err(|_| {
            Problem::new(
                Kind::Overloaded,
                "too many change streams open; retry later",
            )
            .retry_after(s.options.timeouts.retry_after_s)
        })?;
    let unavailable = |why: String| {
        Problem::new(Kind::Unavailable, why).retry_after(s.options.timeouts.retry_after_s)
    };
    let end = Follower::now(&s.log)
        .await
        .map_err(|e| unavailable(format!("the log's end: {e}")))?;
    let start = match params.after {
        Some(after) if after.ts > end.ts => {
            return Err(Problem::new(
                Kind::InvalidParameter,
                format!(
                    "the cursor {} is past the log's end (ts {})",
                    after.ts.get(),
                    end.ts.get()
                ),
            ))
        }
        Some(after) => after,
        None => end,
    };
    let reader = principal;
    let selection = Selection::new(params.patterns, None, params.before)
        .with_access(Arc::new(move |c: &str| reader.allows(Access::Read, c)));
    let follower = Follower::new(
        s.log.clone(),
        Arc::clone(&s.store),
        Arc::new(selection),
        start,
        Tuning::default(),
    );
    let options = s.options.changes;
    let hold = Hold::start(
        Arc::clone(&s.store),
        owner(),
        HoldOptions {
            protect_max_age: HOLD_MAX_AGE,
            refresh: Duration::from_millis(200),
            linger: Duration::from_millis(options.resume_window_ms),
        },
    );
    hold.set(follower.resolved());
    match follower.check_resume().await {
        Ok(()) => {}
        Err(FollowError::HistoryLost {
            checkpoint,
            lost_below,
        }) => {
            return Err(Problem::new(
                Kind::HistoryLost,
                format!(
                    "the history after {checkpoint} is gone (kept from ts {}): start again \
                     without a cursor, and read the current state with a query",
                    lost_below.get()
                ),
            ))
        }
        Err(e) => return Err(unavailable(e.to_string())),
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
    let buffer = Buffer {
        tx,
        bytes: Arc::new(Semaphore::new(options.buffer_bytes)),
        budget: options.buffer_bytes,
        slow: Duration::from_millis(options.slow_client_ms),
        full_since: None,
    };
    let shared = Arc::clone(s);
    tokio::spawn(async move {
        let _open = OpenStream::new(&shared.metrics);
        // A token removed from the tokens file (revoked) ends its streams too.
        let revoked = async {
            loop {
                tokio::time::sleep(TOKEN_CHECK).await;
                if shared.tokens.authenticate(&credentials).is_err() {
                    return;
                }
            }
        };
        let ended = tokio::select! {
            ended = stream(&shared, follower, buffer, &hold, options) => ended,
            () = revoked => Ended::Revoked,
        };
        if ended == Ended::SlowClient {
            shared.metrics.change_stream_slow();
        }
        drop(permit);
    });
    // A frame's share of the buffer is given back once the server has taken it to send.
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|frame| frame.map(|(bytes, _permit)| Ok::<_, std::convert::Infallible>(bytes)))
    }));
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies that buffer (nginx) would hold the events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// How long a stream holds the GC timestamp at a cursor that does not move (nothing new in the
/// log for that long): past it, the hold is let go.
const HOLD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A name for a stream's GC hold, unique across api-servers and restarts.
fn owner() -> String {
    static STREAMS: AtomicU64 = AtomicU64::new(0);
    let n = STREAMS.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("causeway-api/changes/{}-{nanos:x}-{n}", std::process::id())
}

/// Counts a stream as open while it lives, whatever ends it.
struct OpenStream<'a>(&'a Metrics);

impl<'a> OpenStream<'a> {
    fn new(metrics: &'a Metrics) -> OpenStream<'a> {
        metrics.change_stream(1);
        OpenStream(metrics)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.change_stream(-1);
    }
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    ClientGone,
    SlowClient,
    /// The stream's token left the tokens file.
    Revoked,
    /// History lost, the log unreadable, or the api-server stopping.
    Server,
}

/// What a stream has sent and its client not yet taken, bounded in bytes.
struct Buffer {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    /// Permits for the bytes in the buffer (`changes.buffer_bytes`).
    bytes: Arc<Semaphore>,
    budget: usize,
    slow: Duration,
    /// Since when every frame has had to wait for room: the client has been behind since.
    full_since: Option<Instant>,
}

impl Buffer {
    /// Queues `frame`, waiting for room. A client that has left no room at any send for `slow`
    /// is too slow, whether it reads nothing or a frame now and then without catching up.
    async fn send(&mut self, frame: Bytes) -> Result<(), Ended> {
        // A frame larger than the whole budget takes all of it.
        let n = u32::try_from(frame.len().clamp(1, self.budget)).unwrap_or(u32::MAX);
        let permit = match Arc::clone(&self.bytes).try_acquire_many_owned(n) {
            Ok(p) => {
                self.full_since = None;
                p
            }
            Err(_) => {
                let since = *self.full_since.get_or_insert_with(Instant::now);
                let left = self.slow.saturating_sub(since.elapsed());
                let wait = Arc::clone(&self.bytes).acquire_many_owned(n);
                tokio::select! {
                    r = tokio::time::timeout(left, wait) => match r {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => return Err(Ended::Server),
                        Err(_) => return Err(Ended::SlowClient),
                    },
                    () = self.tx.closed() => return Err(Ended::ClientGone),
                }
            }
        };
        self.tx.send((frame, permit)).map_err(|_| Ended::ClientGone)
    }
}

/// Follows the log into the client's buffer until the client goes, falls behind, or the stream
/// cannot go on.
async fn stream(
    shared: &Shared,
    mut follower: Follower,
    mut buffer: Buffer,
    hold: &Hold,
    options: ChangesOptions,
) -> Ended {
    let mut stopping = shared.stopping.subscribe();
    let interval = Duration::from_millis(options.resolved_interval_ms);
    let window = Duration::from_millis(options.resume_window_ms);
    // Tells the client how soon to reconnect, and shows at once that the stream is open.
    if let Err(e) = buffer
        .send(Bytes::from_static(b"retry: 1000\n: causeway changes\n\n"))
        .await
    {
        return e;
    }
    let mut trail = Trail::new(follower.resolved(), window);
    let mut next_resolved = Instant::now();
    loop {
        if Instant::now() >= next_resolved {
            // Only at a transaction's end: a resolved id inside a transaction would move a
            // reconnecting client's cursor back.
            let cursor = follower.cursor();
            if cursor.index == u32::MAX {
                let resolved = Event {
                    position: cursor,
                    time_ms: causeway_cdc::follow::now_ms(),
                    body: EventBody::Resolved { ts: cursor.ts },
                };
                if let Err(e) = buffer.send(frame(&resolved)).await {
                    return e;
                }
            }
            next_resolved = Instant::now() + interval;
            // However old the cursor a client came with, no stream holds the history further
            // back than the log's end a window ago.
            hold.set(shared.log_ends.floor(&shared.log, window).await);
        }
        let wait = next_resolved
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let events = tokio::select! {
            r = follower.next(wait) => r,
            () = buffer.tx.closed() => return Ended::ClientGone,
            _ = stopping.wait_for(|s| *s) => return Ended::Server,
        };
        match events {
            Ok(events) => {
                for e in &events {
                    if let Err(ended) = buffer.send(frame(e)).await {
                        return ended;
                    }
                }
                if let Some(ts) = trail.moved(follower.resolved(), Instant::now()) {
                    hold.set(ts);
                }
            }
            Err(e) => {
                let last = match e {
                    FollowError::HistoryLost {
                        checkpoint,
                        lost_below,
                    } => frame(&Event {
                        position: checkpoint,
                        time_ms: causeway_cdc::follow::now_ms(),
                        body: EventBody::HistoryLost {
                            checkpoint,
                            lost_below,
                        },
                    }),
                    e => {
                        tracing::warn!(error = %e, "a change stream stopped");
                        let why = e.to_string().replace(['\r', '\n'], " ");
                        Bytes::from(format!(": stopped: {why}\n\n"))
                    }
                };
                let _ = buffer.send(last).await;
                return Ended::Server;
            }
        }
    }
}

/// The log's end over the last while, sampled by the streams (at most every 500 ms, whatever
/// their number): how far back a stream may hold the history.
#[derive(Debug, Default)]
pub(crate) struct LogEnds {
    samples: std::sync::Mutex<VecDeque<(Instant, Timestamp)>>,
}

impl LogEnds {
    /// The log's end as it was `window` ago (zero while the samples are younger).
    async fn floor(&self, log: &causeway_txlog::TxLog, window: Duration) -> Timestamp {
        let due = self
            .lock()
            .back()
            .is_none_or(|(at, _)| at.elapsed() >= Duration::from_millis(500));
        if due {
            if let Ok(end) = Follower::now(log).await {
                self.observe(end.ts, Instant::now(), window);
            }
        }
        self.at(Instant::now(), window)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Timestamp)>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, end: Timestamp, now: Instant, window: Duration) {
        let mut samples = self.lock();
        samples.push_back((now, end));
        // The newest sample older than the window, and every younger one.
        while samples.len() >= 2 && now.duration_since(samples[1].0) >= window {
            samples.pop_front();
        }
    }

    fn at(&self, now: Instant, window: Duration) -> Timestamp {
        match self.lock().front() {
            Some(&(at, end)) if now.duration_since(at) >= window => end,
            _ => Timestamp::ZERO,
        }
    }
}

/// Where a stream's GC hold stands: where the stream was `window` ago. Bytes sent are not bytes
/// read (a disconnection loses what was in flight), so the hold trails what was sent by the
/// resume window: a client that reconnects within the window, from an event it got within the
/// window, finds the history after it. Samples are at least 100 ms apart, so a window of a
/// minute keeps at most 600.
#[derive(Debug)]
struct Trail {
    window: Duration,
    samples: VecDeque<(Instant, Timestamp)>,
}

impl Trail {
    fn new(start: Timestamp, window: Duration) -> Trail {
        Trail {
            window,
            samples: [(Instant::now(), start)].into(),
        }
    }

    /// Takes in the stream's resolved ts at `now`; answers the ts to hold at, when it moved.
    fn moved(&mut self, resolved: Timestamp, now: Instant) -> Option<Timestamp> {
        let &(last_at, last) = self.samples.back().expect("a trail has a sample");
        if resolved > last && now.duration_since(last_at) >= Duration::from_millis(100) {
            self.samples.push_back((now, resolved));
        }
        let cutoff = now.checked_sub(self.window)?;
        let before = self.samples.front().map(|s| s.1);
        while self.samples.len() >= 2 && self.samples[1].0 <= cutoff {
            self.samples.pop_front();
        }
        let &(at, ts) = self.samples.front().expect("a trail has a sample");
        (at <= cutoff && Some(ts) != before).then_some(ts)
    }
}

/// One event as SSE: `id:`, `event:`, then its CloudEvents JSON on one `data:` line.
fn frame(e: &Event) -> Bytes {
    let mut json = serde_json::to_string(&e.to_json(SOURCE)).expect("an event serializes to JSON");
    if json.contains(['\n', '\r']) {
        // Stored JSON text may hold line breaks, and in JSON text they can only be whitespace
        // between tokens (inside strings they are escaped): spaces mean the same.
        json = json.replace(['\n', '\r'], " ");
    }
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {json}\n\n",
        e.id(),
        e.event_type()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_cdc::event::Change;
    use causeway_core::cdc::{Kind as ChangeKind, Op};
    use serde_json::value::RawValue;

    fn headers(last_event_id: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(id) = last_event_id {
            h.insert("last-event-id", HeaderValue::from_str(id).unwrap());
        }
        h
    }

    #[test]
    fn last_event_id_wins_over_after_and_parameters_are_checked() {
        let p = params(Some("after=7"), &headers(None)).unwrap();
        assert_eq!(p.after, Some(Position::end_of(Timestamp(7))));
        let p = params(
            Some("after=7"),
            &headers(Some("00000000000000000009.0000000002")),
        )
        .unwrap();
        assert_eq!(p.after, Some(Position::new(Timestamp(9), 2)));
        let p = params(
            Some("collections=orders%2Ccatalog_*&before=true"),
            &headers(None),
        )
        .unwrap();
        assert_eq!(
            p.patterns,
            vec![
                CollectionPattern::Exact("orders".into()),
                CollectionPattern::Prefix("catalog_".into())
            ]
        );
        assert!(p.before);
        assert_eq!(params(None, &headers(None)).unwrap().after, None);
        for (query, last) in [
            (Some("after=x"), None),
            (Some("after=-1"), None),
            (Some("before=maybe"), None),
            (Some("collections=a%2Fb"), None),
            (None, Some("1.2.3")),
        ] {
            let refused = params(query, &headers(last)).unwrap_err();
            assert_eq!(refused.kind, Kind::InvalidParameter, "{query:?} {last:?}");
        }
    }

    #[test]
    fn the_hold_trails_the_stream_by_the_resume_window() {
        let window = Duration::from_secs(10);
        let mut trail = Trail::new(Timestamp(5), window);
        let t0 = trail.samples[0].0;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Within the first window nothing moves, whatever the stream sent.
        assert_eq!(trail.moved(Timestamp(9), at(1_000)), None);
        assert_eq!(trail.moved(Timestamp(20), at(5_000)), None);
        assert_eq!(trail.moved(Timestamp(20), at(9_999)), None);
        // At 10 s the start is a window old: still held there.
        assert_eq!(trail.moved(Timestamp(30), at(10_000)), None);
        // At 11 s, what was sent at 1 s is a window old.
        assert_eq!(trail.moved(Timestamp(30), at(11_000)), Some(Timestamp(9)));
        assert_eq!(trail.moved(Timestamp(30), at(12_000)), None);
        assert_eq!(trail.moved(Timestamp(30), at(15_000)), Some(Timestamp(20)));
        assert_eq!(trail.moved(Timestamp(31), at(40_000)), Some(Timestamp(30)));
        // Samples closer than 100 ms are not kept.
        let mut dense = Trail::new(Timestamp(1), window);
        let t0 = dense.samples[0].0;
        for i in 1..=50u64 {
            dense.moved(Timestamp(1 + i), t0 + Duration::from_millis(100 + i));
        }
        assert_eq!(dense.samples.len(), 2);
    }

    #[test]
    fn no_hold_reaches_further_back_than_the_log_end_a_window_ago() {
        let ends = LogEnds::default();
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        ends.observe(Timestamp(100), at(0), window);
        // Younger than the window: nothing is known a window ago, no floor.
        assert_eq!(ends.at(at(5), window), Timestamp::ZERO);
        ends.observe(Timestamp(200), at(5), window);
        assert_eq!(ends.at(at(10), window), Timestamp(100));
        ends.observe(Timestamp(300), at(16), window);
        // At 16 s the end of 5 s is the newest a window old; the one of 0 s is dropped.
        assert_eq!(ends.at(at(16), window), Timestamp(200));
        assert_eq!(ends.lock().len(), 2);
    }

    #[test]
    fn a_frame_is_one_sse_event_with_the_cloudevent_on_one_data_line() {
        let event = Event {
            position: Position::new(Timestamp(42), 1),
            time_ms: 0,
            body: EventBody::Change(Change {
                kind: ChangeKind::Created,
                op: Op::Create,
                collection: "notes".into(),
                id: "n1".into(),
                tx_count: 2,
                after: Some(RawValue::from_string("{\n \"text\": \"a\\nb\"\n}".into()).unwrap()),
                before: None,
            }),
        };
        let text = String::from_utf8(frame(&event).to_vec()).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 00000000000000000042.0000000001");
        assert_eq!(lines[1], "event: causeway.document.created");
        let data: serde_json::Value =
            serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["data"]["after"]["text"], "a\nb");
        assert_eq!(data["data"]["tx"]["count"], 2);
        assert_eq!(&lines[3..], ["", ""]);
    }
}
