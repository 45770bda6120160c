//! `causeway check`: a smoke test of a running cluster through its HTTP document API, for a
//! `helm test` pod and for operators after a deploy.
//!
//! It runs five steps and prints one line per step with its latency:
//! 1. `ready`: `GET /readyz` until it answers `200`.
//! 2. `write`: `PUT /v1/collections/{collection}/documents/check-<16 hex>` of a document holding
//!    a random nonce and the time; the answer's ts (body `ts`, header `Causeway-Timestamp`).
//! 3. `read`: `GET` of that document with `Causeway-After: <ts>` (read your write); the nonce
//!    must be the one written.
//! 4. `delete`: `DELETE` of the document; the delete's ts.
//! 5. `gone`: `GET` with `Causeway-After: <the delete's ts>` must answer `404 not_found`.
//!
//! The whole check ends within `--timeout`: every request is bounded by the time left. A step
//! retries, until then, what a cluster that is starting or rolling answers (no connection,
//! `429`, `502`, `503`, `504`); any other refusal ends the check at once with the problem+json's
//! title and detail ([`crate::problem`]), and a non-zero exit. When a step after the write
//! fails, the document is deleted on a best-effort basis.
//!
//! The bearer token is the content of `--token-file` (trimmed), else the environment variable
//! `CAUSEWAY_TOKEN`; with neither, requests carry no `Authorization` header.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::{json, Value};

use crate::admin::change::parse_duration;
use crate::problem;

/// The environment variable of the token when `--token-file` is absent.
const TOKEN_ENV: &str = "CAUSEWAY_TOKEN";
/// The first pause before retrying a step, doubled after each retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The most time the clean-up delete of a failed check takes.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The `type` of the problem a read of an absent document answers.
const NOT_FOUND_TYPE: &str = "urn:causeway:problem:not_found";

/// Flags of `causeway check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The api-server (or the Service in front of the api-servers).
    #[arg(long, env = "CAUSEWAY_API", default_value = "http://127.0.0.1:7300")]
    pub(crate) api: String,
    /// A file holding a bearer token that may read and write --collection (trimmed); default:
    /// the environment variable CAUSEWAY_TOKEN, else no token.
    #[arg(long, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
    /// The collection the check writes its document to (and deletes it from).
    #[arg(long, default_value = "causeway_check", value_parser = collection)]
    pub(crate) collection: String,
    /// The longest the whole check may take, waiting for readiness included (such as 500ms,
    /// 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

/// `--collection`: a collection name the api-server accepts (with the default limits).
fn collection(s: &str) -> Result<String, String> {
    causeway_core::key::validate_collection(s, &causeway_core::key::KeyLimits::default())
        .map(|()| s.to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// `causeway check`: exits non-zero, with what failed, unless every step passes.
pub async fn run(args: Args) -> Result<()> {
    let token = resolve_token(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    let api = base_url(&args.api)?;
    check(
        &api,
        &args.collection,
        token,
        args.timeout,
        &mut std::io::stdout(),
    )
    .await
}

/// The token: the file's content, trimmed (an empty one is an error), else `env` unless empty.
fn resolve_token(file: Option<&Path>, env: Option<String>) -> Result<Option<String>> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text.trim();
            anyhow::ensure!(
                !token.is_empty(),
                "the token file {} is empty",
                path.display()
            );
            Ok(Some(token.to_owned()))
        }
        None => Ok(env.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())),
    }
}

/// `--api` as a base URL: `host:port` means `http://host:port`.
fn base_url(api: &str) -> Result<Url> {
    let base = if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let url = Url::parse(&base).with_context(|| format!("--api {api:?} is not a URL"))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base(),
        "--api {api:?} is not host:port or an http(s) URL"
    );
    Ok(url)
}

/// The requests of one check, all within one deadline.
struct Checker {
    http: reqwest::Client,
    api: Url,
    token: Option<String>,
    timeout: Duration,
    deadline: Instant,
}

impl Checker {
    /// `api` followed by `segments`, each escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.api.clone();
        url.set_query(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The document's URL.
    fn document_url(&self, collection: &str, id: &str) -> Url {
        self.url(&["v1", "collections", collection, "documents", id])
    }

    /// A request with the token, bounded by `limit`.
    fn request(&self, method: Method, url: Url, limit: Duration) -> RequestBuilder {
        let request = self.http.request(method, url).timeout(limit);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends the request `build` makes (bounded by the time left) until an answer that is not
    /// a retryable one, which it returns whatever its status; an error at the deadline, with
    /// the last answer or failure.
    async fn send(
        &self,
        url: &Url,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
        method: Method,
    ) -> Result<Response> {
        let mut backoff = FIRST_BACKOFF;
        let mut last = None;
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                let request = build(self.request(method.clone(), url.clone(), left));
                last = Some(match request.send().await {
                    Ok(response) if !retryable(response.status()) => return Ok(response),
                    Ok(response) => format!(
                        "{:#}",
                        problem::refused(&format!("the api-server at {url}"), response).await
                    ),
                    Err(e) => format!(
                        "cannot reach {url}: {:#}",
                        anyhow::Error::from(e.without_url())
                    ),
                });
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let timeout = self.timeout;
                return Err(match last {
                    Some(last) => anyhow!("no success within --timeout {timeout:?}; last: {last}"),
                    None => anyhow!("no time left within --timeout {timeout:?}"),
                });
            }
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// An answer a cluster that is starting, rolling or busy gives for a while.
fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// The steps, printed to `out` one line each; the first failure ends the check.
async fn check(
    api: &Url,
    collection: &str,
    token: Option<String>,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<()> {
    let started = Instant::now();
    let checker = Checker {
        http: reqwest::Client::builder().build()?,
        api: api.clone(),
        token,
        timeout,
        deadline: started + timeout,
    };
    let id = format!("check-{:016x}", rand::random::<u64>());
    let nonce = format!("{:032x}", rand::random::<u128>());

    step(out, "ready", ready(&checker)).await?;
    let written = step(out, "write", write(&checker, collection, &id, &nonce)).await?;
    let rest = async {
        step(
            out,
            "read",
            read(&checker, collection, &id, &nonce, written),
        )
        .await?;
        let deleted = step(out, "delete", delete(&checker, collection, &id)).await?;
        step(out, "gone", gone(&checker, collection, &id, deleted)).await
    };
    if let Err(e) = rest.await {
        // Best effort: leave nothing behind (the delete step may not have run or taken).
        let url = checker.document_url(collection, &id);
        let cleaned = checker
            .request(Method::DELETE, url, CLEANUP_TIMEOUT.min(timeout))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !cleaned {
            return Err(e.context(format!("(the check document {collection}/{id} may remain)")));
        }
        return Err(e);
    }
    writeln!(
        out,
        "check passed in {} against {api}",
        millis(started.elapsed())
    )?;
    Ok(())
}

/// Runs one step: its line (`name ok latency detail`, or `name FAILED latency`) and its value;
/// a failure names the step.
async fn step<T>(
    out: &mut impl Write,
    name: &str,
    run: impl std::future::Future<Output = Result<(T, String)>>,
) -> Result<T> {
    let started = Instant::now();
    let result = run.await;
    let latency = millis(started.elapsed());
    match result {
        Ok((value, detail)) => {
            writeln!(out, "{name:<6}  ok      {latency:>10}  {detail}")?;
            out.flush()?;
            Ok(value)
        }
        Err(e) => {
            writeln!(out, "{name:<6}  FAILED  {latency:>10}")?;
            out.flush()?;
            Err(anyhow!("causeway check failed at step {name}: {e:#}"))
        }
    }
}

/// `12.3 ms`.
fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Step 1: `/readyz` answers 200.
async fn ready(checker: &Checker) -> Result<((), String)> {
    let url = checker.url(&["readyz"]);
    let response = checker
        .send(&url, |r| r, Method::GET)
        .await
        .with_context(|| format!("{url} is not ready"))?;
    if !response.status().is_success() {
        return Err(problem::refused(&format!("the api-server at {url}"), response).await);
    }
    Ok(((), url.to_string()))
}

/// Step 2: the document with the nonce; its commit ts.
async fn write(
    checker: &Checker,
    collection: &str,
    id: &str,
    nonce: &str,
) -> Result<(u64, String)> {
    let url = checker.document_url(collection, id);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let document = json!({
        "nonce": nonce,
        "written_at_ms": u64::try_from(now_ms).unwrap_or(u64::MAX),
        "written_by": "causeway check",
    });
    let response = checker
        .send(&url, |r| r.json(&document), Method::PUT)
        .await?;
    let ts = commit_ts(&url, response).await?;
    Ok((ts, format!("{collection}/{id} at ts {ts}")))
}

/// Step 3: the document read after `ts` holds `nonce`.
async fn read(
    checker: &Checker,
    collection: &str,
    id: &str,
    nonce: &str,
    ts: u64,
) -> Result<((), String)> {
    let url = checker.document_url(collection, id);
    let response = checker
        .send(
            &url,
            |r| r.header("causeway-after", ts.to_string()),
            Method::GET,
        )
        .await?;
    if !response.status().is_success() {
        let e = problem::refused(&format!("the api-server at {url}"), response).await;
        return Err(e.context(format!("the document written at ts {ts} is not read back")));
    }
    let read_ts = header(&response, "causeway-read-timestamp");
    let document: Value = response
        .json()
        .await
        .with_context(|| format!("{url} answered a body that is not JSON"))?;
    let found = document["nonce"].as_str();
    if found != Some(nonce) {
        bail!(
            "the document read after ts {ts} holds the nonce {}, not the {nonce:?} written",
            found.map_or_else(|| "(none)".to_owned(), |n| format!("{n:?}"))
        );
    }
    Ok(((), format!("the nonce matches (read at {read_ts})")))
}

/// Step 4: the delete; its commit ts.
async fn delete(checker: &Checker, collection: &str, id: &str) -> Result<(u64, String)> {
    let url = checker.document_url(collection, id);
    let response = checker.send(&url, |r| r, Method::DELETE).await?;
    let ts = commit_ts(&url, response).await?;
    Ok((ts, format!("at ts {ts}")))
}

/// Step 5: a read after the delete's ts finds no document (`404 not_found`).
async fn gone(checker: &Checker, collection: &str, id: &str, ts: u64) -> Result<((), String)> {
    let url = checker.document_url(collection, id);
    let response = checker
        .send(
            &url,
            |r| r.header("causeway-after", ts.to_string()),
            Method::GET,
        )
        .await?;
    let status = response.status();
    if status.is_success() {
        bail!("the document is still there in a read after its delete at ts {ts}");
    }
    let read_ts = header(&response, "causeway-read-timestamp");
    let body = response.bytes().await.unwrap_or_default();
    let kind = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|p| p["type"].as_str().map(str::to_owned));
    if status != StatusCode::NOT_FOUND || kind.as_deref() != Some(NOT_FOUND_TYPE) {
        bail!(
            "the api-server at {url}: {}",
            problem::describe(status, &body)
        );
    }
    Ok(((), format!("not found after ts {ts} (read at {read_ts})")))
}

/// The commit ts of a write's answer: the body's `ts`, which `Causeway-Timestamp` must equal.
async fn commit_ts(url: &Url, response: Response) -> Result<u64> {
    if !response.status().is_success() {
        return Err(problem::refused(&format!("the api-server at {url}"), response).await);
    }
    let header_ts = header(&response, "causeway-timestamp");
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("{url} answered a body that is not JSON"))?;
    let ts = body["ts"]
        .as_u64()
        .with_context(|| format!("{url} answered no ts: {body}"))?;
    if header_ts != "?" && header_ts != ts.to_string() {
        bail!("{url} answered ts {ts} but Causeway-Timestamp: {header_ts}");
    }
    Ok(ts)
}

/// A header's value as text, `?` when absent.
fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_have_defaults_and_bad_values_are_refused() {
        let cli = Cli::try_parse_from(["check"]).unwrap();
        assert_eq!(cli.args.collection, "causeway_check");
        assert_eq!(cli.args.timeout, Duration::from_secs(30));
        assert_eq!(cli.args.token_file, None);
        let cli = Cli::try_parse_from([
            "check",
            "--api",
            "h:1",
            "--token-file",
            "/t",
            "--collection",
            "smoke-1",
            "--timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(cli.args.api, "h:1");
        assert_eq!(cli.args.token_file.as_deref(), Some(Path::new("/t")));
        assert_eq!(cli.args.collection, "smoke-1");
        assert_eq!(cli.args.timeout, Duration::from_secs(2));
        for bad in ["1abc", "a/b", "", "a b"] {
            let e = Cli::try_parse_from(["check", "--collection", bad]).unwrap_err();
            assert!(e.to_string().contains("collection name"), "{e}");
        }
        let e = Cli::try_parse_from(["check", "--timeout", "soon"]).unwrap_err();
        assert!(e.to_string().contains("is not a duration"), "{e}");
    }

    #[test]
    fn the_token_is_the_trimmed_file_else_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret-token-0123\n").unwrap();
        let token = resolve_token(Some(&file), Some("env".into())).unwrap();
        assert_eq!(token.as_deref(), Some("s3cret-token-0123"));
        assert_eq!(
            resolve_token(None, Some("env-token\n".into())).unwrap(),
            Some("env-token".into())
        );
        assert_eq!(resolve_token(None, Some(" ".into())).unwrap(), None);
        assert_eq!(resolve_token(None, None).unwrap(), None);
        std::fs::write(&file, "\n").unwrap();
        let e = resolve_token(Some(&file), None).unwrap_err();
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
        let e = resolve_token(Some(&dir.path().join("absent")), None).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read the token file"),
            "{e:#}"
        );
    }

    #[test]
    fn urls_escape_the_id_and_keep_a_base_path() {
        let checker = |api: &str| Checker {
            http: reqwest::Client::new(),
            api: base_url(api).unwrap(),
            token: None,
            timeout: Duration::from_secs(1),
            deadline: Instant::now(),
        };
        assert_eq!(
            checker("h:7300").document_url("c", "a b").as_str(),
            "http://h:7300/v1/collections/c/documents/a%20b"
        );
        assert_eq!(
            checker("https://h/causeway/").url(&["readyz"]).as_str(),
            "https://h/causeway/readyz"
        );
        assert!(base_url("ftp://h").is_err());
    }

    /// A request as the fake api-server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        head: String,
        body: String,
    }

    /// A fake api-server: answers each request (one per connection) with `answer(request, all
    /// requests so far)`: a status line's code and reason, and a JSON body.
    async fn fake(
        answer: impl Fn(&Seen, &[Seen]) -> (u16, &'static str, String) + Send + 'static,
    ) -> (Url, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break (String::from_utf8_lossy(&buf).into_owned(), String::new());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                };
                let mut words = head.split_whitespace();
                let request = Seen {
                    method: words.next().unwrap_or_default().to_owned(),
                    path: words.next().unwrap_or_default().to_owned(),
                    head: head.to_ascii_lowercase(),
                    body,
                };
                let (code, reason, body) = {
                    let mut all = log.lock().unwrap();
                    all.push(request.clone());
                    answer(&request, &all)
                };
                let kind = if code >= 400 {
                    "application/problem+json"
                } else {
                    "application/json"
                };
                let reply = format!(
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: {kind}\r\ncauseway-timestamp: 9\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        (url, seen)
    }

    /// The nonce of the last PUT.
    fn written_nonce(all: &[Seen]) -> String {
        let put = all.iter().rev().find(|s| s.method == "PUT").unwrap();
        let doc: Value = serde_json::from_str(&put.body).unwrap();
        doc["nonce"].as_str().unwrap().to_owned()
    }

    const NOT_FOUND: &str = r#"{"type":"urn:causeway:problem:not_found","title":"not found","status":404,"detail":"no such document at the read timestamp"}"#;

    /// A well-behaved api-server, except what `twist` changes: `Some` answer replaces its own.
    async fn api_server(
        twist: impl Fn(&Seen, &[Seen]) -> Option<(u16, &'static str, String)> + Send + 'static,
    ) -> (Url, Arc<Mutex<Vec<Seen>>>) {
        fake(move |request, all| {
            if let Some(answer) = twist(request, all) {
                return answer;
            }
            let deleted = all.iter().any(|s| s.method == "DELETE");
            match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/readyz") => (200, "OK", r#"{"status":"ready"}"#.into()),
                ("PUT" | "DELETE", _) => (200, "OK", r#"{"ts":9}"#.into()),
                ("GET", _) if deleted => (404, "Not Found", NOT_FOUND.into()),
                ("GET", _) => (200, "OK", json!({"nonce": written_nonce(all)}).to_string()),
                _ => (404, "Not Found", r#"{"title":"no such route"}"#.into()),
            }
        })
        .await
    }

    async fn run_check(url: &Url, token: Option<&str>) -> (Result<()>, String) {
        let mut out = Vec::new();
        let result = check(
            url,
            "causeway_check",
            token.map(str::to_owned),
            Duration::from_secs(10),
            &mut out,
        )
        .await;
        (result, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn every_step_passes_with_the_token_and_causal_reads() {
        // /readyz answers 503 twice before 200: the check waits.
        let (url, seen) = api_server(|request, all| {
            let readyz = all.iter().filter(|s| s.path == "/readyz").count();
            (request.path == "/readyz" && readyz <= 2).then(|| {
                (
                    503,
                    "Service Unavailable",
                    r#"{"title":"unavailable"}"#.into(),
                )
            })
        })
        .await;
        let (result, out) = run_check(&url, Some("t0ken-t0ken-t0ken")).await;
        result.unwrap();
        let steps: Vec<&str> = out
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            steps,
            ["ready", "write", "read", "delete", "gone", "check"],
            "{out}"
        );
        assert!(out.lines().take(5).all(|l| l.contains(" ok ")), "{out}");
        let seen = seen.lock().unwrap().clone();
        let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(
            methods,
            ["GET", "GET", "GET", "PUT", "GET", "DELETE", "GET"]
        );
        let id = seen[3]
            .path
            .strip_prefix("/v1/collections/causeway_check/documents/check-");
        assert!(id.is_some_and(|id| id.len() == 16), "{:?}", seen[3].path);
        assert!(seen
            .iter()
            .all(|s| s.head.contains("authorization: bearer t0ken-t0ken-t0ken")));
        assert!(
            seen[4].head.contains("causeway-after: 9"),
            "{}",
            seen[4].head
        );
        assert!(
            seen[6].head.contains("causeway-after: 9"),
            "{}",
            seen[6].head
        );
    }

    #[tokio::test]
    async fn a_different_nonce_fails_the_read_and_the_document_is_deleted() {
        let (url, seen) = api_server(|request, all| {
            let deleted = all.iter().any(|s| s.method == "DELETE");
            (request.method == "GET" && request.path != "/readyz" && !deleted)
                .then(|| (200, "OK", r#"{"nonce":"stale"}"#.into()))
        })
        .await;
        let (result, out) = run_check(&url, None).await;
        let text = format!("{:#}", result.unwrap_err());
        assert!(text.contains("failed at step read"), "{text}");
        assert!(text.contains(r#"holds the nonce "stale""#), "{text}");
        assert!(out.contains("read    FAILED"), "{out}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.last().unwrap().method, "DELETE", "cleaned up");
        assert!(seen.iter().all(|s| !s.head.contains("authorization")));
    }

    #[tokio::test]
    async fn a_document_still_there_after_its_delete_fails_the_check() {
        let (url, _) = api_server(|request, all| {
            (request.method == "GET" && request.path != "/readyz")
                .then(|| (200, "OK", json!({"nonce": written_nonce(all)}).to_string()))
        })
        .await;
        let (result, out) = run_check(&url, None).await;
        let text = format!("{:#}", result.unwrap_err());
        assert!(text.contains("failed at step gone"), "{text}");
        assert!(text.contains("still there"), "{text}");
        assert!(out.contains("delete  ok"), "{out}");
    }

    #[tokio::test]
    async fn a_refused_write_is_its_problem_on_one_line_without_retries() {
        let (url, seen) = api_server(|request, _| {
            (request.method == "PUT").then(|| {
                (
                    403,
                    "Forbidden",
                    r#"{"type":"urn:causeway:problem:forbidden","title":"forbidden","status":403,"detail":"the token may not write causeway_check"}"#.into(),
                )
            })
        })
        .await;
        let (result, _) = run_check(&url, Some("t")).await;
        let text = format!("{:#}", result.unwrap_err());
        assert!(
            text.ends_with("403 forbidden: the token may not write causeway_check"),
            "{text}"
        );
        assert!(text.contains("failed at step write"), "{text}");
        let puts = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "PUT")
            .count();
        assert_eq!(puts, 1);
    }
}
