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
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;

use crate::auth::{Access, Principal};
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
    /// Events a stream buffers for a client that reads slower than they come. Default 1024.
    pub buffer_events: usize,
    /// How long a stream's buffer may stay full before the client is disconnected. Default
    /// 5000 ms.
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
            buffer_events: 1024,
            slow_client_ms: 5000,
            resume_window_ms: 60_000,
        }
    }
}

impl ChangesOptions {
    /// Why these settings cannot work, if they cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.max_streams == 0 || self.buffer_events == 0 {
            return Some("changes.max_streams and changes.buffer_events must be positive");
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
    let mut params = params(query.as_deref(), &headers)?;
    if params.patterns.is_empty() {
        params
            .patterns
            .push(CollectionPattern::Prefix(String::new()));
    }
    open(&s, principal, params).await
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
    open(&s, principal, params).await
}

/// Starts a stream: a permit of `max_streams`, the follower's task, the response.
async fn open(
    s: &Arc<Shared>,
    principal: Arc<Principal>,
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
    let reader = principal;
    let selection = Selection::new(params.patterns, None, params.before)
        .with_access(Arc::new(move |c: &str| reader.allows(Access::Read, c)));
    let start = match params.after {
        Some(after) => after,
        None => Follower::now(&s.log).await.map_err(|e| {
            Problem::new(Kind::Unavailable, format!("the log's end: {e}"))
                .retry_after(s.options.timeouts.retry_after_s)
        })?,
    };
    let options = s.options.changes;
    let (tx, mut rx) = mpsc::channel::<Bytes>(options.buffer_events);
    let follower = Follower::new(
        s.log.clone(),
        Arc::clone(&s.store),
        Arc::new(selection),
        start,
        Tuning::default(),
    );
    let shared = Arc::clone(s);
    tokio::spawn(async move {
        shared.metrics.change_stream(1);
        let hold = Hold::start(
            Arc::clone(&shared.store),
            owner(),
            HoldOptions {
                protect_max_age: HOLD_MAX_AGE,
                refresh: Duration::from_millis(200),
                linger: Duration::from_millis(options.resume_window_ms),
            },
        );
        let ended = stream(follower, &tx, &hold, options, shared.stopping.subscribe()).await;
        if ended == Ended::SlowClient {
            shared.metrics.change_stream_slow();
        }
        shared.metrics.change_stream(-1);
        drop(permit);
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|frame| frame.map(Ok::<_, std::convert::Infallible>))
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

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    ClientGone,
    SlowClient,
    /// History lost, the log unreadable, or the api-server stopping.
    Server,
}

/// Follows the log into `tx` until the client goes, falls behind, or the stream cannot go on.
async fn stream(
    mut follower: Follower,
    tx: &mpsc::Sender<Bytes>,
    hold: &Hold,
    options: ChangesOptions,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let slow = Duration::from_millis(options.slow_client_ms);
    let interval = Duration::from_millis(options.resolved_interval_ms);
    let send = |frame: Bytes| async move {
        match tx.send_timeout(frame, slow).await {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(_)) => Err(Ended::SlowClient),
            Err(SendTimeoutError::Closed(_)) => Err(Ended::ClientGone),
        }
    };
    // Tells the client how soon to reconnect, and shows at once that the stream is open.
    if let Err(e) = send(Bytes::from_static(b"retry: 1000\n: causeway changes\n\n")).await {
        return e;
    }
    let mut trail = Trail::new(
        follower.resolved(),
        Duration::from_millis(options.resume_window_ms),
    );
    hold.set(follower.resolved());
    if let Err(e) = follower.check_resume().await {
        return finish(e, tx, slow).await;
    }
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
                if let Err(e) = send(frame(&resolved)).await {
                    return e;
                }
            }
            next_resolved = Instant::now() + interval;
        }
        let wait = next_resolved
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let events = tokio::select! {
            r = follower.next(wait) => r,
            () = tx.closed() => return Ended::ClientGone,
            _ = stopping.wait_for(|s| *s) => return Ended::Server,
        };
        match events {
            Ok(events) => {
                for e in &events {
                    if let Err(ended) = send(frame(e)).await {
                        return ended;
                    }
                }
                if let Some(ts) = trail.moved(follower.resolved(), Instant::now()) {
                    hold.set(ts);
                }
            }
            Err(e) => return finish(e, tx, slow).await,
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
    samples: std::collections::VecDeque<(Instant, Timestamp)>,
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

/// Ends a stream that cannot go on: `causeway.history_lost` when the history is gone, else a
/// comment with the reason (the client reconnects and tries again).
async fn finish(e: FollowError, tx: &mpsc::Sender<Bytes>, slow: Duration) -> Ended {
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
    let _ = tx.send_timeout(last, slow).await;
    Ended::Server
}

/// One event as SSE: `id:`, `event:`, then its CloudEvents JSON on one `data:` line.
fn frame(e: &Event) -> Bytes {
    let mut json = serde_json::to_string(&e.to_json(SOURCE)).expect("an event serializes to JSON");
    if json.contains(['\n', '\r']) {
        // Stored JSON text may hold line breaks between tokens; parsed and written again, it
        // has none (line breaks inside strings are escaped).
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        json = value.to_string();
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
