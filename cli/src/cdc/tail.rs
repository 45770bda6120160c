//! `causeway cdc tail`: an api-server's change stream in the terminal.
//!
//! It reads `GET /v1/changes` (or `GET /v1/collections/{c}/changes` for one collection) as
//! server-sent events and prints one line per event: a compact `ts.index/count op
//! collection/id after` by default, the CloudEvents JSON as it came with `--json`.
//!
//! The api-server ends the stream of a client that reads too slowly, and a connection may break:
//! `tail` then reconnects with `Last-Event-ID` set to the last event it printed, so nothing is
//! missed or printed twice. Reconnecting waits the server's `retry:` time, doubled after every
//! attempt in a row that brought no event, and gives up after `--retries` such attempts.
//! `causeway.history_lost` (the cursor is older than the history kept) ends `tail` with an
//! error: no reconnection can bring those changes back.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use reqwest::{StatusCode, Url};
use serde_json::Value;

use super::sse;
use crate::problem;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream silent this long is broken: the api-server sends `causeway.resolved` every second
/// (by default) even when nothing changes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The first reconnection delay when the server has not sent `retry:`.
const DEFAULT_RETRY: Duration = Duration::from_millis(1000);
/// The longest reconnection delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The largest event accepted (a document is at most a few MiB, with its before-image twice).
const MAX_EVENT_BYTES: usize = 32 << 20;

/// Flags of `causeway cdc tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The api-server.
    #[arg(long, env = "CAUSEWAY_API", default_value = "http://127.0.0.1:7300")]
    pub(crate) api: String,
    /// A token that may read the collections (`causeway dev` prints its admin token).
    #[arg(long, env = "CAUSEWAY_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// A collection, or a pattern such as `catalog_*` (repeatable; default every collection the
    /// token may read).
    #[arg(long = "collection", value_name = "C", value_parser = collection)]
    pub(crate) collections: Vec<String>,
    /// Start after this cursor: an event id (`00000000000000000042.0000000003`) or a ts (`42`);
    /// default: the log's end.
    #[arg(long, value_name = "CURSOR", value_parser = cursor)]
    pub(crate) after: Option<String>,
    /// Carry before-images (printed after the after-image).
    #[arg(long)]
    pub(crate) before: bool,
    /// Print each event's CloudEvents JSON as it came, one per line.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print the `causeway.resolved` heartbeats too.
    #[arg(long)]
    pub(crate) resolved: bool,
    /// Exit after this many change events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) limit: Option<u64>,
    /// When the server ends the stream, exit instead of reconnecting.
    #[arg(long)]
    pub(crate) no_reconnect: bool,
    /// Reconnection attempts in a row that bring no event before giving up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub(crate) retries: u32,
}

/// `--collection`: a name or `prefix*`, one per flag.
fn collection(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains([',', '/']) {
        return Err(format!(
            "{s:?} is not a collection name or pattern (one per --collection)"
        ));
    }
    Ok(s.to_owned())
}

/// `--after`: `ts` or `ts.index`, digits only (the api-server checks the rest).
fn cursor(s: &str) -> Result<String, String> {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let ok = match s.split_once('.') {
        Some((ts, index)) => digits(ts) && digits(index),
        None => digits(s),
    };
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a cursor: an event id (00000000000000000042.0000000003) or a ts (42)"
        ))
    }
}

/// The stream's URL: one collection (not a pattern) has its own resource, anything else is
/// `/v1/changes?collections=…`.
fn changes_url(
    api: &str,
    collections: &[String],
    after: Option<&str>,
    before: bool,
) -> Result<Url> {
    let base = if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let mut url = Url::parse(&base).with_context(|| format!("--api {api:?} is not a URL"))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https"),
        "--api {api:?} is not an http(s) URL"
    );
    let one = match collections {
        [c] if !c.contains('*') => Some(c.as_str()),
        _ => None,
    };
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--api {api:?} cannot be a base URL"))?;
        path.pop_if_empty();
        match one {
            Some(c) => path.extend(["v1", "collections", c, "changes"]),
            None => path.extend(["v1", "changes"]),
        };
    }
    url.set_query(None);
    {
        let mut query = url.query_pairs_mut();
        if one.is_none() && !collections.is_empty() {
            query.append_pair("collections", &collections.join(","));
        }
        if let Some(after) = after {
            query.append_pair("after", after);
        }
        if before {
            query.append_pair("before", "true");
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    Ok(url)
}

/// How events are printed.
#[derive(Debug, Clone, Copy)]
struct Format {
    json: bool,
    resolved: bool,
    before: bool,
}

/// What an event is, for `tail`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `causeway.document.*`: counts towards `--limit`.
    Change,
    Resolved,
    /// The stream cannot go on: why.
    HistoryLost(String),
    Other,
}

/// An event's kind and the line to print for it (none for a heartbeat without `--resolved`).
fn render(event: &sse::Event, format: Format) -> (Kind, Option<String>) {
    let cloud: Option<Value> = serde_json::from_str(&event.data).ok();
    let kind_name = match (&*event.event, &cloud) {
        ("message", Some(c)) => c["type"].as_str().unwrap_or("message").to_owned(),
        (name, _) => name.to_owned(),
    };
    let data = cloud.as_ref().map(|c| &c["data"]).unwrap_or(&Value::Null);
    let kind = match kind_name.as_str() {
        k if k.starts_with("causeway.document.") => Kind::Change,
        "causeway.resolved" => Kind::Resolved,
        "causeway.history_lost" => Kind::HistoryLost(format!(
            "the history after {} is gone (lost below ts {}): the stream cannot resume there; \
             start again with a later --after",
            text(&data["checkpoint"]),
            text(&data["lost_below"])
        )),
        _ => Kind::Other,
    };
    if kind == Kind::Resolved && !format.resolved {
        return (kind, None);
    }
    if format.json || cloud.is_none() {
        return (kind, Some(event.data.replace('\n', " ")));
    }
    let line = match &kind {
        Kind::Change => {
            let tx = &data["tx"];
            let ts = if tx["ts"].is_null() {
                &data["ts"]
            } else {
                &tx["ts"]
            };
            let mut line = format!(
                "{}.{}/{} {} {}/{} {}",
                text(ts),
                text(&tx["index"]),
                text(&tx["count"]),
                text(&data["op"]),
                text(&data["key"]["collection"]),
                text(&data["key"]["id"]),
                data["after"]
            );
            if format.before {
                if let Some(before) = data.get("before") {
                    line.push_str(&format!(" before {before}"));
                }
            }
            line
        }
        Kind::Resolved => format!("resolved {}", text(&data["resolved"])),
        Kind::HistoryLost(_) => format!(
            "history lost: checkpoint {}, lost below ts {}",
            text(&data["checkpoint"]),
            text(&data["lost_below"])
        ),
        Kind::Other => format!("{kind_name} {data}"),
    };
    (kind, Some(line))
}

/// A string as it is, another value as JSON, a missing one as `?`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_owned(),
        other => other.to_string(),
    }
}

/// The delay before the `failures`-th reconnection in a row: `base`, doubled each time, at
/// most [`MAX_BACKOFF`].
fn backoff(base: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// Why one connection ended.
enum Ended {
    /// `--limit` change events printed.
    Limit,
    /// The server closed the stream, or it broke: reconnect.
    Closed(String),
}

/// Runs `causeway cdc tail`, printing to stdout.
pub async fn tail(args: TailArgs) -> Result<()> {
    let mut out = std::io::stdout();
    match run(args, &mut out).await {
        // `causeway cdc tail | head`: the reader has gone, which is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Follows the stream into `out` until `--limit`, history lost, `--no-reconnect` or too many
/// failed reconnections.
async fn run(args: TailArgs, out: &mut (impl Write + Send)) -> Result<()> {
    let url = changes_url(
        &args.api,
        &args.collections,
        args.after.as_deref(),
        args.before,
    )?;
    let format = Format {
        json: args.json,
        resolved: args.resolved,
        before: args.before,
    };
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(IDLE_TIMEOUT)
        .build()?;
    let mut last_id: Option<String> = None;
    let mut changes = 0u64;
    let mut failures = 0u32;
    let mut retry = DEFAULT_RETRY;
    loop {
        let mut request = http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(token) = &args.token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let why = match request.send().await {
            Err(e) => format!("cannot reach {url}: {:#}", anyhow::Error::from(e)),
            Ok(response) if response.status().is_success() => {
                let mut progressed = false;
                let ended = read_stream(
                    response,
                    format,
                    args.limit,
                    &mut changes,
                    &mut last_id,
                    &mut progressed,
                    &mut retry,
                    out,
                )
                .await?;
                if progressed {
                    failures = 0;
                }
                match ended {
                    Ended::Limit => return Ok(()),
                    Ended::Closed(why) if args.no_reconnect => {
                        eprintln!("{why}; not reconnecting (--no-reconnect)");
                        return Ok(());
                    }
                    Ended::Closed(why) => why,
                }
            }
            Ok(response) => {
                let status = response.status();
                let error = problem::refused(&format!("the api-server at {url}"), response).await;
                let retryable = status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT;
                if !retryable {
                    return Err(error);
                }
                format!("{error:#}")
            }
        };
        if args.no_reconnect {
            bail!("{why}");
        }
        failures += 1;
        if failures > args.retries {
            bail!(
                "{why}; gave up after {} attempts in a row without an event",
                args.retries
            );
        }
        let delay = backoff(retry, failures);
        let from = last_id
            .as_deref()
            .map(|id| format!(" after {id}"))
            .unwrap_or_default();
        eprintln!(
            "{why}; reconnecting{from} in {:.1} s ({failures}/{})",
            delay.as_secs_f64(),
            args.retries
        );
        tokio::time::sleep(delay).await;
    }
}

/// Prints the events of one response until it ends or `limit` change events are printed in all.
#[allow(clippy::too_many_arguments)]
async fn read_stream(
    response: reqwest::Response,
    format: Format,
    limit: Option<u64>,
    changes: &mut u64,
    last_id: &mut Option<String>,
    progressed: &mut bool,
    retry: &mut Duration,
    out: &mut (impl Write + Send),
) -> Result<Ended> {
    let mut parser = sse::Parser::new(MAX_EVENT_BYTES);
    let mut stream = response.bytes_stream();
    let mut events = Vec::new();
    let ended = loop {
        let chunk = match stream.next().await {
            None => break "the server ended the stream".to_owned(),
            Some(Err(e)) => {
                break format!("the stream broke: {:#}", anyhow::Error::from(e));
            }
            Some(Ok(chunk)) => chunk,
        };
        parser
            .push(&chunk, &mut events)
            .context("reading the change stream")?;
        if let Some(ms) = parser.retry_ms() {
            *retry = Duration::from_millis(ms.max(1));
        }
        for event in events.drain(..) {
            *progressed = true;
            if event.id.is_some() {
                last_id.clone_from(&event.id);
            }
            let (kind, line) = render(&event, format);
            if let Some(line) = line {
                writeln!(out, "{line}")?;
            }
            match kind {
                Kind::HistoryLost(why) => {
                    out.flush()?;
                    bail!("{why}");
                }
                Kind::Change => {
                    *changes += 1;
                    if limit.is_some_and(|limit| *changes >= limit) {
                        out.flush()?;
                        return Ok(Ended::Limit);
                    }
                }
                Kind::Resolved | Kind::Other => {}
            }
        }
        out.flush()?;
    };
    Ok(Ended::Closed(ended))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn event(id: &str, event: &str, data: &str) -> sse::Event {
        sse::Event {
            id: Some(id.to_owned()),
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    const CREATED: &str = r#"{"specversion":"1.0","type":"causeway.document.created","source":"/causeway/changes","id":"00000000000000000042.0000000001","subject":"notes/n1","time":"2026-01-01T00:00:00.000Z","datacontenttype":"application/json","data":{"op":"c","key":{"collection":"notes","id":"n1"},"ts":42,"tx":{"ts":42,"index":1,"count":2},"after":{"text":"a b"},"before":null}}"#;

    fn plain() -> Format {
        Format {
            json: false,
            resolved: false,
            before: false,
        }
    }

    #[test]
    fn a_change_is_one_compact_line_and_json_is_the_event_as_it_came() {
        let e = event(
            "00000000000000000042.0000000001",
            "causeway.document.created",
            CREATED,
        );
        assert_eq!(
            render(&e, plain()),
            (
                Kind::Change,
                Some(r#"42.1/2 c notes/n1 {"text":"a b"}"#.to_owned())
            )
        );
        let before = Format {
            before: true,
            ..plain()
        };
        assert_eq!(
            render(&e, before).1.unwrap(),
            r#"42.1/2 c notes/n1 {"text":"a b"} before null"#
        );
        let json = Format {
            json: true,
            ..plain()
        };
        assert_eq!(render(&e, json), (Kind::Change, Some(CREATED.to_owned())));
        // A deletion has no after-image.
        let deleted = r#"{"type":"causeway.document.deleted","data":{"op":"d","key":{"collection":"notes","id":"n1"},"ts":43,"tx":{"ts":43,"index":0,"count":1},"after":null}}"#;
        assert_eq!(
            render(&event("x", "causeway.document.deleted", deleted), plain()).1,
            Some("43.0/1 d notes/n1 null".to_owned())
        );
    }

    #[test]
    fn heartbeats_show_only_with_resolved_and_history_lost_stops() {
        let data = r#"{"type":"causeway.resolved","data":{"resolved":42}}"#;
        let e = event("00000000000000000042.4294967295", "causeway.resolved", data);
        assert_eq!(render(&e, plain()), (Kind::Resolved, None));
        let resolved = Format {
            resolved: true,
            ..plain()
        };
        assert_eq!(render(&e, resolved).1.unwrap(), "resolved 42");
        let json = Format {
            json: true,
            ..plain()
        };
        assert_eq!(render(&e, json), (Kind::Resolved, None));
        let lost = r#"{"type":"causeway.history_lost","data":{"checkpoint":"00000000000000000003.0000000000","lost_below":9,"offer":"initial_scan"}}"#;
        let (kind, line) = render(&event("x", "causeway.history_lost", lost), plain());
        let Kind::HistoryLost(why) = kind else {
            panic!("{kind:?}")
        };
        assert!(
            why.contains("after 00000000000000000003.0000000000 is gone (lost below ts 9)"),
            "{why}"
        );
        assert!(line.unwrap().starts_with("history lost"));
    }

    #[test]
    fn one_collection_has_its_own_url_and_several_or_a_pattern_use_collections() {
        let url = |c: &[&str], after: Option<&str>, before: bool| {
            let c: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            changes_url("http://h:7300/", &c, after, before)
                .unwrap()
                .to_string()
        };
        assert_eq!(url(&[], None, false), "http://h:7300/v1/changes");
        assert_eq!(
            url(&["orders"], Some("42"), true),
            "http://h:7300/v1/collections/orders/changes?after=42&before=true"
        );
        assert_eq!(
            url(&["orders", "catalog_*"], None, false),
            "http://h:7300/v1/changes?collections=orders%2Ccatalog_*"
        );
        assert_eq!(
            url(&["catalog_*"], None, false),
            "http://h:7300/v1/changes?collections=catalog_*"
        );
        assert_eq!(
            changes_url("127.0.0.1:7300", &[], None, false)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:7300/v1/changes"
        );
        assert!(changes_url("ftp://h", &[], None, false).is_err());
    }

    #[test]
    fn backoff_doubles_from_the_servers_retry_up_to_a_bound() {
        let base = Duration::from_millis(1000);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), base * 2);
        assert_eq!(backoff(base, 3), base * 4);
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
    }

    /// Reads one request's head from `conn`, answering its `last-event-id` header.
    async fn request_head(conn: &mut tokio::net::TcpStream) -> (String, Option<String>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "request cut");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let last = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("last-event-id")
                .then(|| value.trim().to_owned())
        });
        (head, last)
    }

    fn frame(id: &str, kind: &str, data: &str) -> String {
        format!("id: {id}\nevent: {kind}\ndata: {data}\n\n")
    }

    fn change(ts: u64, id: &str) -> String {
        let data = format!(
            r#"{{"type":"causeway.document.updated","data":{{"op":"u","key":{{"collection":"notes","id":"{id}"}},"ts":{ts},"tx":{{"ts":{ts},"index":0,"count":1}},"after":{{"n":{ts}}}}}}}"#
        );
        frame(
            &format!("{ts:020}.0000000000"),
            "causeway.document.updated",
            &data,
        )
    }

    #[tokio::test]
    async fn tail_reconnects_after_the_last_event_it_printed_and_stops_at_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            const HEAD: &str =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            // First connection: two changes, a heartbeat, then an event cut in the middle.
            let (mut conn, _) = listener.accept().await.unwrap();
            let (head, last) = request_head(&mut conn).await;
            assert!(
                head.starts_with("GET /v1/collections/notes/changes?after=7 "),
                "{head}"
            );
            assert!(head.contains("authorization: Bearer t0ken"), "{head}");
            assert_eq!(last, None);
            let resolved = r#"{"type":"causeway.resolved","data":{"resolved":9}}"#;
            let body = format!(
                "retry: 5\n: hello\n\n{}{}{}id: 00000000000000000010.0000000000\nevent: causeway.document.upd",
                change(8, "a"),
                change(9, "b"),
                frame("00000000000000000009.4294967295", "causeway.resolved", resolved),
            );
            conn.write_all(HEAD.as_bytes()).await.unwrap();
            conn.write_all(body.as_bytes()).await.unwrap();
            drop(conn);
            // Second: resumes after the heartbeat, the last complete event.
            let (mut conn, _) = listener.accept().await.unwrap();
            let (_, last) = request_head(&mut conn).await;
            conn.write_all(HEAD.as_bytes()).await.unwrap();
            let body = format!("{}{}", change(10, "c"), change(11, "d"));
            conn.write_all(body.as_bytes()).await.unwrap();
            // Held open: tail must leave on its own, at the limit.
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest).await;
            last
        });
        let args = TailArgs {
            api: format!("http://{addr}"),
            token: Some("t0ken".into()),
            collections: vec!["notes".into()],
            after: Some("7".into()),
            before: false,
            json: false,
            resolved: false,
            limit: Some(3),
            no_reconnect: false,
            retries: 2,
        };
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), run(args, &mut out))
            .await
            .expect("tail stops at the limit")
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "8.0/1 u notes/a {\"n\":8}\n9.0/1 u notes/b {\"n\":9}\n10.0/1 u notes/c {\"n\":10}\n"
        );
        assert_eq!(
            server.await.unwrap().as_deref(),
            Some("00000000000000000009.4294967295")
        );
    }

    #[tokio::test]
    async fn a_refused_stream_is_a_one_line_error_without_retries() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            request_head(&mut conn).await;
            let body = r#"{"type":"https://causeway.dev/problems/unauthorized","title":"unauthorized","status":401,"detail":"send a bearer token"}"#;
            let answer = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
            // A retry would be a second connection.
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_err()
        });
        let args = TailArgs {
            api: format!("http://{addr}"),
            token: None,
            collections: Vec::new(),
            after: None,
            before: false,
            json: false,
            resolved: false,
            limit: None,
            no_reconnect: false,
            retries: 3,
        };
        let e = run(args, &mut Vec::new()).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.ends_with("/v1/changes: 401 unauthorized: send a bearer token"),
            "{text}"
        );
        assert!(server.await.unwrap(), "no second attempt");
    }
}
