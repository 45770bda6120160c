//! Component tests of the api-server: the real service on a loopback port, writing to the real
//! embedded transaction log on a temp dir, with no store node (reads answer 503). They check
//! what a client sees (statuses, problem types, headers) and what reaches the log (read back
//! through the log itself).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_api_server::{Handle, Options, Service};
use causeway_proto::v1::mutation::Op;
use causeway_proto::v1::Transaction;
use causeway_txlog::testing::Broker;
use causeway_txlog::{codec, EmbeddedOptions, LogOptions, Timestamp, TxLog};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const ADMIN: &str = "admin-token-0123456789abcdef";
const SHOP: &str = "shop-token-0123456789abcdef";
/// Test limits: small enough to exceed cheaply.
const MAX_BODY: usize = 1 << 20;
const MAX_DOC: usize = 64 << 10;

/// Where a test server's transaction log lives.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Embedded,
    /// The test process's Apache Kafka broker, a topic of the test's own.
    Kafka,
}

struct Server {
    addr: SocketAddr,
    handle: Handle,
    log: TxLog,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), causeway_api_server::Error>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut Options)) -> Result<Server> {
        Server::start_on(Backend::Embedded, tweak).await
    }

    async fn start_on(backend: Backend, tweak: impl FnOnce(&mut Options)) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let log = match backend {
            Backend::Embedded => {
                let options = LogOptions::Embedded(embedded(dir.path().join("log"))?);
                TxLog::open(options).await?
            }
            Backend::Kafka => {
                let broker = tokio::task::block_in_place(Broker::shared)
                    .context("starting Kafka (scripts/setup.sh --broker fetches it)")?;
                static TOPICS: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let n = TOPICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let options = LogOptions::Kafka(broker.log_options(&format!("causeway-tx-{n}")));
                TxLog::open(options).await?
            }
        };
        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            serde_json::to_vec(&json!({"tokens": [
                {"name": "ops", "token": ADMIN, "admin": true},
                {"name": "shop", "token": SHOP, "read": ["orders", "catalog"], "write": ["orders"]},
            ]}))?,
        )?;
        let mut options = Options {
            listen_addr: "127.0.0.1:0".parse()?,
            // Nothing listens there: no store node is ever known, reads answer 503.
            config_manager_addr: "127.0.0.1:1".into(),
            tokens_file: Some(tokens),
            ..Options::default()
        };
        options.limits.max_body_bytes = MAX_BODY;
        options.limits.max_document_bytes = MAX_DOC;
        options.limits.max_mutations_per_transaction = 8;
        tweak(&mut options);
        let service = Service::bind_with_log(options, log.clone()).await?;
        let addr = service.local_addr();
        let handle = service.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.run(async move {
            let _ = stopped.await;
        }));
        Ok(Server {
            addr,
            handle,
            log,
            stop: Some(stop),
            task,
            _dir: dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn log_next(&self) -> Result<Timestamp> {
        Ok(self.log.bounds().await?.next)
    }

    /// The transactions of the log after `after`, up to its end, decoded.
    async fn records_after(&self, after: Timestamp) -> Result<Vec<(Timestamp, Transaction)>> {
        let end = self.log_next().await?;
        let mut out = Vec::new();
        let mut stream = self.log.read_from(after);
        while out.last().map_or(after, |(ts, _)| *ts).get() + 1 < end.get() {
            let record = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .context("reading the log timed out")?
                .context("log stream ended")??;
            out.push((record.ts, codec::decode(&record.payload)?));
        }
        Ok(out)
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("the service did not stop in time")???;
        Ok(())
    }
}

fn embedded(dir: std::path::PathBuf) -> Result<EmbeddedOptions> {
    Ok(serde_json::from_value(json!({ "dir": dir }))?)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("building the client")
}

/// Sends raw bytes (for what a well-behaved client library refuses to send, or normalises
/// away) and answers the status and body. The request should say `Connection: close`.
async fn raw(addr: SocketAddr, head: Vec<u8>, body_chunks: Vec<Vec<u8>>) -> Result<(u16, String)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Write concurrently with reading: the server may answer (413) before the body is sent,
    // and the answer must be read before the connection is reset.
    let write = tokio::spawn(async move {
        if writer.write_all(&head).await.is_err() {
            return;
        }
        for chunk in body_chunks {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = writer.flush().await;
    });
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .context("no answer in time")?;
    write.abort();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| {
            format!(
                "no status line in {:?}",
                text.chars().take(200).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn raw_head(method: &str, target: &[u8], extra: &str) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n{extra}\r\n"
        )
        .as_bytes(),
    );
    head
}

fn problem_type(body: &str) -> String {
    // A chunked answer has chunk sizes around the JSON: take the object itself.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => body,
    };
    serde_json::from_str::<Value>(json)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| {
            format!(
                "<not a problem: {:?}>",
                body.chars().take(200).collect::<String>()
            )
        })
}

async fn expect_problem(
    response: reqwest::Response,
    status: u16,
    slug: &str,
    case: &str,
) -> Result<()> {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.text().await?;
    ensure!(got == status, "{case}: status {got}, want {status}: {body}");
    ensure!(
        content_type == "application/problem+json",
        "{case}: content type {content_type:?}"
    );
    let t = problem_type(&body);
    ensure!(
        t == format!("urn:causeway:problem:{slug}"),
        "{case}: type {t}, want {slug}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_4xx_and_nothing_reaches_the_log() -> Result<()> {
    bad_input_table(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_4xx_and_nothing_reaches_the_kafka_log() -> Result<()> {
    bad_input_table(Backend::Kafka).await
}

/// Every kind of bad input gets its 4xx, nothing reaches the log, and the server stays healthy.
async fn bad_input_table(backend: Backend) -> Result<()> {
    let server = Server::start_on(backend, |_| {}).await?;
    let http = client();
    let before = server.log_next().await?;
    let doc = |c: &str, id: &str| server.url(&format!("/v1/collections/{c}/documents/{id}"));
    let put = |url: String| {
        http.put(url)
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
    };

    // Oversized body with a Content-Length: refused from the header, before reading.
    let (status, body) = raw(
        server.addr,
        raw_head(
            "PUT",
            b"/v1/collections/orders/documents/a",
            &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                MAX_BODY + 1
            ),
        ),
        vec![],
    )
    .await?;
    ensure!(
        status == 413 && problem_type(&body).ends_with(":body_too_large"),
        "{status} {body}"
    );
    // Oversized body without a Content-Length (chunked): refused as it streams in.
    let mut chunks = Vec::new();
    let piece = vec![b' '; 16 << 10];
    for _ in 0..(MAX_BODY / piece.len() + 4) {
        let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
        c.extend_from_slice(&piece);
        c.extend_from_slice(b"\r\n");
        chunks.push(c);
    }
    chunks.push(b"0\r\n\r\n".to_vec());
    let (status, body) = raw(
        server.addr,
        raw_head(
            "PUT",
            b"/v1/collections/orders/documents/a",
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
        ),
        chunks,
    )
    .await?;
    ensure!(
        status == 413 && problem_type(&body).ends_with(":body_too_large"),
        "{status} {body}"
    );

    // JSON nested 100,000 deep, arrays and objects: refused before parsing.
    let deep_arrays = "[".repeat(100_000) + &"]".repeat(100_000);
    let deep_objects = "{\"a\":".repeat(100_000) + "1" + &"}".repeat(100_000);
    for (name, body) in [("arrays", deep_arrays), ("objects", deep_objects)] {
        let r = put(doc("orders", "deep")).body(body).send().await?;
        expect_problem(r, 400, "json_too_deep", name).await?;
    }
    // Invalid UTF-8 in the body.
    let r = put(doc("orders", "a"))
        .body(b"{\"a\": \"\xff\xfe\"}".to_vec())
        .send()
        .await?;
    expect_problem(r, 400, "invalid_utf8", "utf-8 body").await?;
    // An integer a document cannot hold exactly: refused, never stored rounded.
    let r = put(doc("orders", "a"))
        .body(r#"{"n": 123456789012345678901234567890}"#)
        .send()
        .await?;
    expect_problem(r, 400, "number_out_of_range", "big integer").await?;
    // Invalid UTF-8 in the path, percent-encoded and raw.
    let r = put(doc("orders", "%FF%FE")).body("{}").send().await?;
    expect_problem(r, 400, "invalid_path", "utf-8 path").await?;
    let (status, _) = raw(
        server.addr,
        raw_head(
            "PUT",
            b"/v1/collections/orders/documents/\xff\xfe",
            "Content-Type: application/json\r\nContent-Length: 2\r\n",
        ),
        vec![b"{}".to_vec()],
    )
    .await?;
    ensure!(
        (400..500).contains(&status),
        "raw invalid UTF-8 path: {status}"
    );

    // Ids: 64 KB. In the path, hyper itself refuses a URI that long (414); a 60,000-byte id
    // reaches the validation (400); in a body, a 64 KB id is refused by the validation too.
    let (status, _) = raw(
        server.addr,
        raw_head(
            "PUT",
            format!("/v1/collections/orders/documents/{}", "a".repeat(64 << 10)).as_bytes(),
            "Content-Type: application/json\r\nContent-Length: 2\r\n",
        ),
        vec![b"{}".to_vec()],
    )
    .await?;
    ensure!(status == 414, "64 KB id in the path: {status}");
    let (status, body) = raw(
        server.addr,
        raw_head(
            "PUT",
            format!("/v1/collections/orders/documents/{}", "a".repeat(60_000)).as_bytes(),
            "Content-Type: application/json\r\nContent-Length: 2\r\n",
        ),
        vec![b"{}".to_vec()],
    )
    .await?;
    ensure!(
        status == 400 && problem_type(&body).ends_with(":invalid_key"),
        "60,000-byte id: {status} {}",
        body.chars().take(200).collect::<String>()
    );
    let r = http
        .post(server.url("/v1/transactions"))
        .bearer_auth(ADMIN)
        .json(&json!({"mutations": [{"op": "delete", "collection": "orders", "id": "a".repeat(64 << 10)}]}))
        .send()
        .await?;
    expect_problem(r, 400, "invalid_key", "64 KB id in a transaction").await?;
    for (case, target, want) in [
        (
            "NUL",
            "/v1/collections/orders/documents/a%00b",
            Some("invalid_key"),
        ),
        (
            "slash",
            "/v1/collections/orders/documents/a%2Fb",
            Some("invalid_key"),
        ),
        (
            "backslash",
            "/v1/collections/orders/documents/a%5Cb",
            Some("invalid_key"),
        ),
        (
            "dot-dot",
            "/v1/collections/orders/documents/..",
            Some("invalid_key"),
        ),
        (
            "dot",
            "/v1/collections/orders/documents/.",
            Some("invalid_key"),
        ),
        (
            "encoded dot-dot",
            "/v1/collections/orders/documents/%2e%2e",
            Some("invalid_key"),
        ),
        (
            "encoded dot-dot upper",
            "/v1/collections/orders/documents/%2E%2E",
            Some("invalid_key"),
        ),
        (
            "traversal",
            "/v1/collections/orders/documents/../../etc/passwd",
            None,
        ),
        (
            "encoded traversal",
            "/v1/collections/orders/documents/..%2F..%2Fetc%2Fpasswd",
            Some("invalid_key"),
        ),
        (
            "collection traversal",
            "/v1/collections/..%2Fx/documents/a",
            Some("invalid_key"),
        ),
        (
            "bad collection",
            "/v1/collections/9lives/documents/a",
            Some("invalid_key"),
        ),
        (
            "literal slash",
            "/v1/collections/orders/documents/a/b",
            Some("no_such_route"),
        ),
    ] {
        let (status, body) = raw(
            server.addr,
            raw_head(
                "PUT",
                target.as_bytes(),
                "Content-Type: application/json\r\nContent-Length: 2\r\n",
            ),
            vec![b"{}".to_vec()],
        )
        .await?;
        match want {
            Some(slug) => ensure!(
                (400..500).contains(&status) && problem_type(&body).ends_with(slug),
                "{case}: {status} {body}"
            ),
            None => ensure!((400..500).contains(&status), "{case}: {status} {body}"),
        }
    }

    // Content types.
    let r = http
        .put(doc("orders", "a"))
        .bearer_auth(ADMIN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 415, "unsupported_media_type", "text/plain").await?;
    let r = http
        .put(doc("orders", "a"))
        .bearer_auth(ADMIN)
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 415, "unsupported_media_type", "no content type").await?;
    let r = http
        .put(doc("orders", "a"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json; charset=latin1")
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 415, "unsupported_media_type", "latin1").await?;
    let r = http
        .patch(doc("orders", "a"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/xml")
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 415, "unsupported_media_type", "patch xml").await?;

    // Tokens and permissions.
    let r = http
        .put(doc("orders", "a"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await?;
    ensure!(r.headers().contains_key("www-authenticate"));
    expect_problem(r, 401, "unauthorized", "no token").await?;
    let r = http
        .put(doc("orders", "a"))
        .bearer_auth("admin-token-0123456789abcdeX")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 401, "unauthorized", "wrong token").await?;
    let r = http
        .put(doc("orders", "a"))
        .header("authorization", format!("Basic {ADMIN}"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await?;
    expect_problem(r, 401, "unauthorized", "not bearer").await?;
    for (method, c) in [("PUT", "users"), ("PUT", "catalog"), ("DELETE", "catalog")] {
        let r = http
            .request(method.parse()?, doc(c, "a"))
            .bearer_auth(SHOP)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await?;
        expect_problem(r, 403, "forbidden", &format!("{method} {c}")).await?;
    }
    let r = http.get(doc("users", "a")).bearer_auth(SHOP).send().await?;
    expect_problem(r, 403, "forbidden", "read users").await?;
    let r = http
        .post(server.url("/v1/transactions"))
        .bearer_auth(SHOP)
        .json(&json!({"mutations": [
            {"op": "replace", "collection": "orders", "id": "a", "document": {}},
            {"op": "delete", "collection": "users", "id": "b"},
        ]}))
        .send()
        .await?;
    expect_problem(r, 403, "forbidden", "transaction touching users").await?;

    // Shapes and limits.
    for (case, body, status, slug) in [
        ("array document", json!([1, 2]), 400, "invalid_document"),
        ("string document", json!("x"), 400, "invalid_document"),
        (
            "reserved field",
            json!({"$set": 1}),
            400,
            "invalid_document",
        ),
        (
            "too large",
            json!({"a": "x".repeat(MAX_DOC)}),
            413,
            "document_too_large",
        ),
    ] {
        let r = put(doc("orders", "a")).json(&body).send().await?;
        expect_problem(r, status, slug, case).await?;
    }
    let r = put(doc("orders", "a")).body("{\"a\": ").send().await?;
    expect_problem(r, 400, "invalid_json", "truncated JSON").await?;
    let r = put(doc("orders", "a")).body("").send().await?;
    expect_problem(r, 400, "invalid_json", "empty body").await?;
    let r = put(doc("orders", "a") + "?wait=later")
        .json(&json!({}))
        .send()
        .await?;
    expect_problem(r, 400, "invalid_parameter", "wait=later").await?;
    let r = put(doc("orders", "a"))
        .header("causeway-request-id", "x".repeat(1000))
        .json(&json!({}))
        .send()
        .await?;
    expect_problem(r, 400, "invalid_parameter", "long request id").await?;
    for (case, patch) in [
        ("increment not an object", json!({"$increment": 5})),
        ("increment by a float", json!({"$increment": {"n": 1.5}})),
        ("increment empty path", json!({"$increment": {"a..b": 1}})),
        ("other $ operator", json!({"$set": {"a": 1}})),
        ("patch not an object", json!([1])),
    ] {
        let r = http
            .patch(doc("orders", "a"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&patch)?)
            .send()
            .await?;
        expect_problem(r, 400, "invalid_document", case).await?;
    }
    let many: Vec<Value> = (0..9)
        .map(|i| json!({"op": "delete", "collection": "orders", "id": format!("d{i}")}))
        .collect();
    for (case, body, slug) in [
        (
            "too many mutations",
            json!({ "mutations": many }),
            "too_many_items",
        ),
        ("no mutations", json!({"mutations": []}), "invalid_json"),
        (
            "unknown op",
            json!({"mutations": [{"op": "upsert", "collection": "orders", "id": "a"}]}),
            "invalid_json",
        ),
        (
            "unknown field",
            json!({"mutations": [{"op": "delete", "collection": "orders", "id": "a", "x": 1}]}),
            "invalid_json",
        ),
        (
            "bad id in tx",
            json!({"mutations": [{"op": "delete", "collection": "orders", "id": ".."}]}),
            "invalid_key",
        ),
        (
            "bad doc in tx",
            json!({"mutations": [
                {"op": "delete", "collection": "orders", "id": "a"},
                {"op": "replace", "collection": "orders", "id": "b", "document": [1]},
            ]}),
            "invalid_document",
        ),
    ] {
        let r = http
            .post(server.url("/v1/transactions"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await?;
        expect_problem(r, 400, slug, case).await?;
    }
    let r = http
        .post(server.url("/v1/nowhere"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    expect_problem(r, 404, "no_such_route", "no route").await?;
    let r = http
        .post(doc("orders", "a"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    expect_problem(r, 405, "method_not_allowed", "POST a document").await?;

    // Nothing reached the log, and the server is healthy.
    ensure!(
        server.log_next().await? == before,
        "bad input reached the log"
    );
    let r = http.get(server.url("/healthz")).send().await?;
    ensure!(r.status() == 200);

    // The control: a good write does reach it.
    let r = put(doc("orders", "a"))
        .json(&json!({"ok": true}))
        .send()
        .await?;
    ensure!(r.status() == 200, "good write: {}", r.text().await?);
    ensure!(
        server.log_next().await? > before,
        "the good write is in the log"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_append_one_transaction_each_and_answer_its_ts() -> Result<()> {
    // No store node decides anything here: a write that must know its outcome gives up soon.
    let server = Server::start(|o| o.timeouts.visible_wait_ms = 300).await?;
    let http = client();
    let before = server.log_next().await?;
    let doc = server.url("/v1/collections/orders/documents/o-1");

    let value = json!({"n": 1, "f": 2.5, "s": "é", "b": true, "z": null, "a": [1, {"x": []}], "o": {"k": "v"}});
    let r = http
        .put(&doc)
        .bearer_auth(SHOP)
        .header("idempotency-key", "req-42")
        .json(&value)
        .send()
        .await?;
    // A write with an idempotency key answers its outcome; with no store node to tell it, the
    // answer is 503 "outcome unknown", naming the ts of the record in the log.
    ensure!(r.status() == 503, "{}", r.status());
    let header_ts: u64 = r.headers()["causeway-timestamp"].to_str()?.parse()?;
    let body: Value = r.json().await?;
    ensure!(body["ts"] == json!(header_ts), "{body}");
    ensure!(
        body["type"] == "urn:causeway:problem:outcome_unknown",
        "{body}"
    );
    ensure!(
        header_ts == before.get(),
        "the first record gets the log's next ts"
    );

    let r = http
        .patch(&doc)
        .bearer_auth(SHOP)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"s": null, "o": {"k2": 1}, "$increment": {"counters.views": 5, "n": -2}}"#)
        .send()
        .await?;
    ensure!(r.status() == 200);
    let r = http
        .patch(&doc)
        .bearer_auth(SHOP)
        .header("content-type", "application/json")
        .body(r#"{"$increment": {"n": 1}}"#)
        .send()
        .await?;
    ensure!(r.status() == 200);
    let r = http.delete(&doc).bearer_auth(SHOP).send().await?;
    ensure!(r.status() == 200);
    let r = http
        .post(server.url("/v1/transactions"))
        .bearer_auth(ADMIN)
        .json(&json!({"mutations": [
            {"op": "replace", "collection": "accounts", "id": "a", "document": {"balance": 10}},
            {"op": "increment", "collection": "accounts", "id": "a", "path": "balance", "delta": -3},
            {"op": "increment", "collection": "accounts", "id": "b", "path": "balance", "delta": 3},
            {"op": "merge_patch", "collection": "accounts", "id": "b", "patch": {"owner": "bo"}},
            {"op": "delete", "collection": "accounts", "id": "c"},
        ]}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let tx_ts: u64 = r.headers()["causeway-timestamp"].to_str()?.parse()?;

    let records = server
        .records_after(Timestamp(before.get().saturating_sub(1)))
        .await?;
    ensure!(
        records.len() == 5,
        "one record per request: {}",
        records.len()
    );
    ensure!(records[4].0.get() == tx_ts);
    let ops = |i: usize| -> Vec<Op> {
        records[i]
            .1
            .mutations
            .iter()
            .map(|m| m.op.clone().expect("an op"))
            .collect()
    };
    // PUT: one replace with the same JSON, and the request id.
    ensure!(records[0].1.idempotency_key == "req-42");
    ensure!(records[0].1.wall_clock_ms > 1_600_000_000_000);
    match &ops(0)[..] {
        [Op::Replace(r)] => ensure!(serde_json::from_slice::<Value>(&r.json)? == value),
        other => anyhow::bail!("PUT: {other:?}"),
    }
    // PATCH: the merge patch without $increment, then the increments.
    match &ops(1)[..] {
        [Op::MergePatch(p), Op::Increment(a), Op::Increment(b)] => {
            ensure!(
                serde_json::from_slice::<Value>(&p.json)? == json!({"s": null, "o": {"k2": 1}})
            );
            let mut incs = vec![(a.path.clone(), a.delta), (b.path.clone(), b.delta)];
            incs.sort();
            ensure!(
                incs == vec![
                    (vec!["counters".to_string(), "views".to_string()], 5),
                    (vec!["n".to_string()], -2)
                ]
            );
        }
        other => anyhow::bail!("PATCH: {other:?}"),
    }
    // A PATCH of increments only has no merge patch.
    ensure!(matches!(&ops(2)[..], [Op::Increment(i)] if i.delta == 1));
    ensure!(matches!(&ops(3)[..], [Op::Delete(_)]));
    // The transaction: all five mutations, in order, in one record.
    let tx = &records[4].1;
    let keys: Vec<(&str, &str)> = tx
        .mutations
        .iter()
        .map(|m| (m.collection.as_str(), m.id.as_str()))
        .collect();
    ensure!(
        keys == vec![
            ("accounts", "a"),
            ("accounts", "a"),
            ("accounts", "b"),
            ("accounts", "b"),
            ("accounts", "c")
        ]
    );
    ensure!(matches!(
        &ops(4)[..],
        [
            Op::Replace(_),
            Op::Increment(_),
            Op::Increment(_),
            Op::MergePatch(_),
            Op::Delete(_)
        ]
    ));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_store_nodes_answer_503_with_retry_after() -> Result<()> {
    let server = Server::start(|_| {}).await?;
    let http = client();
    let r = http
        .get(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(SHOP)
        .send()
        .await?;
    ensure!(r.headers().get("retry-after").is_some());
    expect_problem(r, 503, "unavailable", "read").await?;
    let r = http
        .post(server.url("/v1/collections/orders/query"))
        .bearer_auth(SHOP)
        .json(&json!({"filter": {"status": "open"}, "limit": 10}))
        .send()
        .await?;
    expect_problem(r, 503, "unavailable", "query").await?;
    // A bad query is refused before any store node is asked.
    for (case, q) in [
        (
            "unknown operator",
            json!({"filter": {"a": {"$regex": "x"}}}),
        ),
        ("limit too big", json!({"limit": 1_000_000})),
        ("unknown field", json!({"select": ["a"]})),
        ("bad cursor", json!({"cursor": 5})),
    ] {
        let r = http
            .post(server.url("/v1/collections/orders/query"))
            .bearer_auth(SHOP)
            .json(&q)
            .send()
            .await?;
        expect_problem(r, 400, "invalid_query", case).await?;
    }
    let r = http
        .get(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(SHOP)
        .header("causeway-after", "soon")
        .send()
        .await?;
    expect_problem(r, 400, "invalid_parameter", "bad causal token").await?;
    // A token past the end of the log names no transaction: refused at once, not waited for.
    // Once a write has that ts, the same token is accepted (and meets no store node here).
    let r = http
        .get(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(SHOP)
        .header("causeway-after", "1")
        .send()
        .await?;
    expect_problem(r, 400, "invalid_parameter", "token past the log's end").await?;
    let r = http
        .put(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(SHOP)
        .json(&json!({"n": 1}))
        .send()
        .await?;
    ensure!(r.status() == 200, "write: {}", r.status());
    let ts = r.headers()["causeway-timestamp"].to_str()?.to_owned();
    let r = http
        .get(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(SHOP)
        .header("causeway-after", ts)
        .send()
        .await?;
    expect_problem(r, 503, "unavailable", "token of a committed write").await?;
    let r = http
        .post(server.url("/v1/documents:get"))
        .bearer_auth(SHOP)
        .json(&json!({"keys": [{"collection": "orders", "id": "a"}, {"collection": "users", "id": "b"}]}))
        .send()
        .await?;
    expect_problem(r, 403, "forbidden", "multi-get of users").await?;
    let r = http
        .post(server.url("/v1/collections/orders/documents:get"))
        .bearer_auth(SHOP)
        .json(&json!({"ids": []}))
        .send()
        .await?;
    expect_problem(r, 400, "too_many_items", "empty multi-get").await?;
    let r = http.get(server.url("/readyz")).send().await?;
    expect_problem(r, 503, "unavailable", "readyz").await?;
    ensure!(!server.handle.is_ready());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_describes_the_api() -> Result<()> {
    let server = Server::start(|_| {}).await?;
    let r = client().get(server.url("/v1/openapi.json")).send().await?;
    ensure!(r.status() == 200);
    let doc: Value = r.json().await?;
    ensure!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().context("paths")?;
    for p in [
        "/v1/collections/{collection}/documents/{id}",
        "/v1/collections/{collection}/documents:get",
        "/v1/documents:get",
        "/v1/collections/{collection}/query",
        "/v1/transactions",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
    ] {
        ensure!(paths.contains_key(p), "missing {p}");
    }
    let doc_ops = &paths["/v1/collections/{collection}/documents/{id}"];
    for m in ["get", "put", "patch", "delete"] {
        ensure!(doc_ops.get(m).is_some(), "missing {m}");
    }
    // Every schema reference resolves.
    let schemas = doc["components"]["schemas"]
        .as_object()
        .context("schemas")?;
    let text = serde_json::to_string(&doc)?;
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap_or("");
        ensure!(schemas.contains_key(name), "dangling $ref {name}");
    }
    ensure!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_status() -> Result<()> {
    let server = Server::start(|_| {}).await?;
    let http = client();
    for _ in 0..3 {
        http.get(server.url("/healthz")).send().await?;
    }
    http.put(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await?;
    http.put(server.url("/v1/collections/orders/documents/a"))
        .send()
        .await?;
    let text = http
        .get(server.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let route = "/v1/collections/{collection}/documents/{id}";
    for line in [
        "causeway_api_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 3".to_string(),
        format!("causeway_api_requests_total{{route=\"{route}\",method=\"PUT\",status=\"200\"}} 1"),
        format!("causeway_api_requests_total{{route=\"{route}\",method=\"PUT\",status=\"401\"}} 1"),
        format!("causeway_api_request_duration_seconds_count{{route=\"{route}\",method=\"PUT\",status=\"200\"}} 1"),
        "causeway_api_log_appends_total 1".to_string(),
    ] {
        ensure!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    ensure!(text.contains("# TYPE causeway_api_request_duration_seconds histogram"));
    ensure!(server
        .handle
        .metrics_text()
        .contains("causeway_api_requests_total"));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_concurrency_limit_are_shed_with_503() -> Result<()> {
    let server = Server::start(|o| {
        o.limits.max_concurrent_requests = 1;
        // Without store nodes a write that waits for its outcome waits this long.
        o.timeouts.visible_wait_ms = 5000;
    })
    .await?;
    let http = client();
    // Hold the only place: a write waiting for an outcome no store node will tell.
    let held = tokio::spawn({
        let http = http.clone();
        let url = server.url("/v1/collections/orders/documents/a?wait=outcome");
        async move {
            http.put(url)
                .bearer_auth(ADMIN)
                .json(&json!({"a": 1}))
                .send()
                .await
        }
    });
    wait_in_flight(&server, 2).await?; // the held request and the /metrics request
    let r = http
        .get(server.url("/v1/collections/orders/documents/a"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    ensure!(r.headers().get("retry-after").is_some());
    expect_problem(r, 503, "overloaded", "over the limit").await?;
    // Health and metrics are not limited.
    ensure!(http.get(server.url("/healthz")).send().await?.status() == 200);
    held.abort();
    server.stop().await
}

/// Waits (bounded) until the server counts `n` requests in flight, the `/metrics` request
/// that asks included.
async fn wait_in_flight(server: &Server, n: usize) -> Result<()> {
    let http = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http
            .get(server.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if text.contains(&format!("causeway_api_requests_in_flight {n}\n")) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{n} requests never were in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_body_slowly_does_not_block_others() -> Result<()> {
    let server = Server::start(|o| o.limits.max_concurrent_requests = 1).await?;
    // A body that trickles in, one byte every 50 ms, for the whole test.
    let mut slow = TcpStream::connect(server.addr).await?;
    let body = br#"{"slow": "0123456789012345678901234567890123456789"}"#;
    slow.write_all(&raw_head(
        "PUT",
        b"/v1/collections/orders/documents/slow",
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
    ))
    .await?;
    let trickle = tokio::spawn(async move {
        for b in body {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // While it trickles (about 2.6 s), other clients' writes are served.
    let http = client();
    for i in 0..5 {
        let r = http
            .put(server.url(&format!("/v1/collections/orders/documents/fast-{i}")))
            .bearer_auth(ADMIN)
            .json(&json!({"i": i}))
            .send()
            .await?;
        let status = r.status();
        ensure!(
            status == 200,
            "write {i} during a slow body: {status} {}",
            r.text().await?
        );
    }
    ensure!(
        !trickle.is_finished(),
        "the slow body finished before the other writes"
    );
    // The slow request itself is served once its body is in.
    let mut slow = tokio::time::timeout(Duration::from_secs(10), trickle).await??;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 200"),
        "the slow write: {answer}"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_at_once_are_bounded_in_bytes() -> Result<()> {
    let server = Server::start(|o| {
        o.limits.max_body_bytes = 1000;
        o.limits.max_buffered_body_bytes = 1500;
    })
    .await?;
    // A client declares a 1000-byte body and sends a little of it: its 1000 bytes are held.
    let mut held = TcpStream::connect(server.addr).await?;
    held.write_all(&raw_head(
        "PUT",
        b"/v1/collections/orders/documents/held",
        "Content-Type: application/json\r\nContent-Length: 1000\r\n",
    ))
    .await?;
    held.write_all(b"{\"pad\": \"").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another 1000-byte body finds no room: 503 with Retry-After, nothing written.
    let http = client();
    let big = json!({"pad": "x".repeat(900)});
    let r = http
        .put(server.url("/v1/collections/orders/documents/big"))
        .bearer_auth(ADMIN)
        .json(&big)
        .send()
        .await?;
    ensure!(r.status() == 503, "a body past the budget: {}", r.status());
    ensure!(r.headers().contains_key("retry-after"), "no Retry-After");
    // A small one fits in what is left.
    let r = http
        .put(server.url("/v1/collections/orders/documents/small"))
        .bearer_auth(ADMIN)
        .json(&json!({"i": 1}))
        .send()
        .await?;
    ensure!(r.status() == 200, "a small body: {}", r.status());
    // Once the held body's connection goes, its room comes back.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = http
        .put(server.url("/v1/collections/orders/documents/big"))
        .bearer_auth(ADMIN)
        .json(&big)
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "the big body after room came back: {}",
        r.status()
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_without_a_valid_token_hold_no_room() -> Result<()> {
    let server = Server::start(|o| {
        o.limits.max_body_bytes = 1000;
        o.limits.max_buffered_body_bytes = 1000;
    })
    .await?;
    // Clients without a valid token declare 1000-byte bodies and send them slowly.
    let mut strangers = Vec::new();
    for token in ["", "Authorization: Bearer not-a-token-0123456789\r\n"] {
        let mut s = TcpStream::connect(server.addr).await?;
        let head = format!(
            "PUT /v1/collections/orders/documents/x HTTP/1.1\r\nHost: localhost\r\n{token}\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(b"{\"pad\": \"").await?;
        strangers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A client with a token still finds the whole room.
    let r = client()
        .put(server.url("/v1/collections/orders/documents/big"))
        .bearer_auth(ADMIN)
        .json(&json!({"pad": "x".repeat(900)}))
        .send()
        .await?;
    let status = r.status();
    ensure!(
        status == 200,
        "a body with a token: {status} {}",
        r.text().await?
    );
    drop(strangers);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes() -> Result<()> {
    let server = Server::start(|o| o.timeouts.body_read_ms = 300).await?;
    let mut stream = TcpStream::connect(server.addr).await?;
    let mut head = raw_head(
        "PUT",
        b"/v1/collections/orders/documents/a",
        "Content-Type: application/json\r\nContent-Length: 100\r\n",
    );
    // Keep-alive: the server must close the connection itself.
    let text = String::from_utf8(head.clone())?.replace("Connection: close\r\n", "");
    head = text.into_bytes();
    stream.write_all(&head).await?;
    stream.write_all(b"{\"a\":").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .context("the connection was not closed")??;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").context("no answer")?;
    ensure!(head.starts_with("HTTP/1.1 408"), "{answer}");
    ensure!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    ensure!(head.contains("application/problem+json"), "{head}");
    ensure!(
        problem_type(body) == "urn:causeway:problem:request_timeout",
        "{body}"
    );
    let records = server.records_after(Timestamp::ZERO).await?;
    ensure!(records.is_empty(), "a timed-out write reached the log");
    server.stop().await
}

/// One answer read off a keep-alive connection: status, lowercased headers, body. Every answer
/// of the server has a `Content-Length`.
async fn read_answer(
    stream: &mut tokio::io::BufReader<TcpStream>,
) -> Result<(u16, Vec<(String, String)>, String)> {
    use tokio::io::AsyncBufReadExt;
    let mut status_line = String::new();
    stream.read_line(&mut status_line).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("no status line: {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').context("a malformed header")?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .context("an answer without content-length")?
        .1
        .parse()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok((status, headers, String::from_utf8(body)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_leave_a_keep_alive_connection_healthy() -> Result<()> {
    let server = Server::start(|_| {}).await?;
    let stream = TcpStream::connect(server.addr).await?;
    let mut stream = tokio::io::BufReader::new(stream);
    let request = |method: &str, path: &str, token: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_DOC + 10));
    for i in 0..30 {
        // (request, status, problem slug or "" for a success)
        let (text, status, slug) = match i % 5 {
            0 => (
                request(
                    "PUT",
                    &format!("/v1/collections/orders/documents/d{i}"),
                    ADMIN,
                    "{\"ok\": 1}",
                ),
                200,
                "",
            ),
            // Refused on the token, before the body is looked at.
            1 => (
                request(
                    "PUT",
                    "/v1/collections/orders/documents/x",
                    "wrong-token-0123456789",
                    "{\"a\": \"GET /healthz HTTP/1.1\"}",
                ),
                401,
                "unauthorized",
            ),
            // Refused on the permission, before the body is looked at.
            2 => (
                request(
                    "PUT",
                    "/v1/collections/users/documents/x",
                    SHOP,
                    "{\"a\": 2}",
                ),
                403,
                "forbidden",
            ),
            // Refused on the document's size.
            3 => (
                request("PUT", "/v1/collections/orders/documents/x", ADMIN, &big),
                413,
                "document_too_large",
            ),
            // Refused on the route, with a body.
            _ => (
                request("POST", "/nowhere", ADMIN, "{\"a\": 3}"),
                404,
                "no_such_route",
            ),
        };
        stream.get_mut().write_all(text.as_bytes()).await?;
        let (got, headers, body) =
            tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
                .await
                .with_context(|| format!("request {i}: no answer"))?
                .with_context(|| format!("request {i}: the answer does not parse"))?;
        ensure!(got == status, "request {i}: {got}, want {status}: {body}");
        ensure!(
            !headers
                .iter()
                .any(|(n, v)| n == "connection" && v == "close"),
            "request {i}: the connection is closed"
        );
        if slug.is_empty() {
            let v: Value = serde_json::from_str(&body)?;
            ensure!(v["ts"].as_u64().is_some(), "request {i}: {body}");
        } else {
            ensure!(
                problem_type(&body) == format!("urn:causeway:problem:{slug}"),
                "request {i}: {body}"
            );
        }
    }
    // A body declared larger than the limit is not read: 413, and the connection closes.
    let head = format!(
        "PUT /v1/collections/orders/documents/x HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    stream.get_mut().write_all(head.as_bytes()).await?;
    let (got, headers, body) = read_answer(&mut stream).await?;
    ensure!(
        got == 413 && problem_type(&body) == "urn:causeway:problem:body_too_large",
        "{got} {body}"
    );
    ensure!(
        headers
            .iter()
            .any(|(n, v)| n == "connection" && v == "close"),
        "{headers:?}"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_cannot_parse_get_problem_bodies() -> Result<()> {
    let server = Server::start(|_| {}).await?;
    // A 64 KiB document id: longer than any request target the server reads.
    let mut target = b"/v1/collections/orders/documents/".to_vec();
    target.extend(std::iter::repeat_n(b'a', 64 << 10));
    let (status, body) = raw(server.addr, raw_head("GET", &target, ""), vec![]).await?;
    ensure!(status == 414, "a 64 KiB id: {status}");
    ensure!(
        problem_type(&body) == "urn:causeway:problem:uri_too_long",
        "{body}"
    );
    // A Content-Length that is not a number.
    let head = raw_head(
        "PUT",
        b"/v1/collections/orders/documents/a",
        "Content-Type: application/json\r\nContent-Length: abc\r\n",
    );
    let (status, body) = raw(server.addr, head, vec![b"{}".to_vec()]).await?;
    ensure!(status == 400, "Content-Length: abc: {status}");
    ensure!(
        problem_type(&body) == "urn:causeway:problem:malformed_request",
        "{body}"
    );
    // Headers beyond what the server reads.
    let huge = format!("X-Pad: {}\r\n", "p".repeat(1 << 20));
    let (status, body) = raw(server.addr, raw_head("GET", b"/healthz", &huge), vec![]).await?;
    ensure!(status == 431, "a 1 MiB header: {status}");
    ensure!(
        problem_type(&body) == "urn:causeway:problem:headers_too_large",
        "{body}"
    );
    ensure!(server.records_after(Timestamp::ZERO).await?.is_empty());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_rate_gets_429_with_retry_after() -> Result<()> {
    let server = Server::start(|o| {
        o.limits.token_requests_per_s = 1;
        o.limits.token_burst = 3;
    })
    .await?;
    let http = client();
    let get = |token: &'static str| {
        http.get(server.url("/v1/collections/orders/documents/a"))
            .bearer_auth(token)
            .send()
    };
    // The burst goes (503: no store node, but served), then the bucket is empty.
    for i in 0..3 {
        let status = get(ADMIN).await?.status();
        ensure!(status == 503, "request {i} of the burst: {status}");
    }
    let r = get(ADMIN).await?;
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    ensure!(retry == Some(1), "Retry-After {retry:?}");
    expect_problem(r, 429, "rate_limited", "past the rate").await?;
    // Another token has its own bucket.
    ensure!(get(SHOP).await?.status() == 503);
    server.stop().await
}

/// A test CA and a certificate for `localhost` and 127.0.0.1 signed by it: (chain PEM, key PEM,
/// the certificate's DER).
fn leaf(ca: &rcgen::Certificate, ca_key: &rcgen::KeyPair) -> Result<(String, String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
}

/// A TLS connection to `addr`, trusting only `ca`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &rcgen::Certificate,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::ServerName;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    Ok(tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost")?, tcp),
    )
    .await??)
}

/// Connects over TLS trusting only `ca`, asks `/healthz` and answers the server's certificate
/// (DER) and the status.
async fn https_healthz(addr: SocketAddr, ca: &rcgen::Certificate) -> Result<(Vec<u8>, u16)> {
    let mut tls = tls_connect(addr, ca).await?;
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .to_vec();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    // A server that closes without close_notify is an error here, after the answer.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no answer: {text:?}"))?;
    Ok((served, status))
}

/// A test CA: its certificate and key.
fn test_ca() -> Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok((ca_params.self_signed(&ca_key)?, ca_key))
}

/// Writes a certificate of `ca` into `dir`: its HTTPS options, and the certificate's DER.
fn https_options(
    dir: &std::path::Path,
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> Result<(causeway_api_server::HttpsOptions, Vec<u8>)> {
    let (chain_file, key_file) = (dir.join("chain.pem"), dir.join("key.pem"));
    let (chain, key, der) = leaf(ca, ca_key)?;
    std::fs::write(&chain_file, chain)?;
    std::fs::write(&key_file, key)?;
    let options = causeway_api_server::HttpsOptions {
        cert_chain_file: chain_file,
        key_file,
        reload_ms: 50,
    };
    Ok((options, der))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_its_certificate_and_a_replaced_one_on_new_connections() -> Result<()> {
    let (ca, ca_key) = test_ca()?;
    let dir = tempfile::tempdir()?;
    let (https, first) = https_options(dir.path(), &ca, &ca_key)?;
    let (chain_file, key_file) = (https.cert_chain_file.clone(), https.key_file.clone());
    let server = Server::start(|o| o.https = Some(https.clone())).await?;
    let (served, status) = https_healthz(server.addr, &ca).await?;
    ensure!(
        status == 200 && served == first,
        "the first certificate: {status}"
    );
    // Plain HTTP is not served.
    let plain = client().get(server.url("/healthz")).send().await;
    ensure!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // Replace both files: new connections get the new certificate.
    let (chain, key, second) = leaf(&ca, &ca_key)?;
    std::fs::write(&key_file, key)?;
    std::fs::write(&chain_file, chain)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (served, status) = https_healthz(server.addr, &ca).await?;
        ensure!(status == 200);
        if served == second {
            break;
        }
        ensure!(served == first, "a certificate that is neither");
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A bad file (a key of another certificate, then garbage) keeps the certificate in use.
    let (_, other_key, _) = leaf(&ca, &ca_key)?;
    std::fs::write(&key_file, other_key)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&chain_file, "not a certificate")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (served, status) = https_healthz(server.addr, &ca).await?;
    ensure!(
        status == 200 && served == second,
        "a bad file replaced the certificate"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_file_is_reloaded_and_a_bad_one_keeps_the_tokens() -> Result<()> {
    const NEW: &str = "new-token-with-enough-entropy-0123456789abcdef";
    let server = Server::start(|o| o.tokens_reload_ms = 50).await?;
    let tokens_file = server._dir.path().join("tokens.json");
    let http = client();
    let status = |token: &'static str| {
        let request = http
            .get(server.url("/v1/collections/orders/documents/a"))
            .bearer_auth(token)
            .send();
        async move { Ok::<_, anyhow::Error>(request.await?.status().as_u16()) }
    };
    // Served (503: no store node) or refused (401).
    ensure!(status(SHOP).await? == 503 && status(NEW).await? == 401);
    // Rotate: SHOP goes, NEW comes, stored as its hash.
    std::fs::write(
        &tokens_file,
        serde_json::to_vec(&json!({"tokens": [
            {"name": "ops", "token": ADMIN, "admin": true},
            {"name": "new", "token": causeway_api_server::auth::token_hash(NEW), "read": ["orders"]},
        ]}))?,
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status(NEW).await? != 503 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the new token was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(status(SHOP).await? == 401, "a removed token still works");
    // The hash itself is not a token.
    let hash: &'static str = Box::leak(causeway_api_server::auth::token_hash(NEW).into_boxed_str());
    ensure!(status(hash).await? == 401, "the stored hash opened the API");
    // A file that does not load keeps the tokens in use.
    std::fs::write(&tokens_file, b"{\"tokens\": [")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(status(NEW).await? == 503 && status(ADMIN).await? == 503);
    ensure!(status(SHOP).await? == 401);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() -> Result<()> {
    let server = Server::start(|o| o.limits.max_connections = 1).await?;
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // The only connection: served, and kept open.
    let mut first = tokio::io::BufReader::new(TcpStream::connect(server.addr).await?);
    first.get_mut().write_all(request).await?;
    let (status, _, _) = read_answer(&mut first).await?;
    ensure!(status == 200);
    // A second one is not served while the first is open...
    let mut second = tokio::io::BufReader::new(TcpStream::connect(server.addr).await?);
    second.get_mut().write_all(request).await?;
    let waited = tokio::time::timeout(Duration::from_millis(300), read_answer(&mut second)).await;
    ensure!(waited.is_err(), "a connection past the cap was served");
    // ...and is once the first closes.
    drop(first);
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut second))
        .await
        .context("the waiting connection was never served")??;
    ensure!(status == 200);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_connection_that_sends_nothing_or_half_a_preface_loses_its_place() -> Result<()>
{
    let (ca, ca_key) = test_ca()?;
    let dir = tempfile::tempdir()?;
    let (https, _) = https_options(dir.path(), &ca, &ca_key)?;
    let server = Server::start(|o| {
        o.https = Some(https.clone());
        o.limits.max_connections = 1;
        o.timeouts.header_read_ms = 300;
    })
    .await?;
    for opening in [&b""[..], b"PRI * HTTP/2"] {
        // The only place, taken by a connection that completes its handshake, then sends
        // nothing or the start of the HTTP/2 preface, and stops.
        let mut silent = tls_connect(server.addr, &ca).await?;
        silent.write_all(opening).await?;
        silent.flush().await?;
        // Served once the silent one has been closed after header_read_ms.
        let (_, status) =
            tokio::time::timeout(Duration::from_secs(5), https_healthz(server.addr, &ca))
                .await
                .with_context(|| {
                    format!("a silent TLS connection ({opening:?}) kept the only place")
                })??;
        ensure!(status == 200);
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_or_half_a_preface_loses_its_place() -> Result<()> {
    let server = Server::start(|o| {
        o.limits.max_connections = 1;
        o.timeouts.header_read_ms = 300;
    })
    .await?;
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for opening in [&b""[..], b"PRI * HTTP/2"] {
        // The only place, taken by a connection that sends nothing, or the start of the
        // HTTP/2 preface, and stops.
        let mut silent = TcpStream::connect(server.addr).await?;
        silent.write_all(opening).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = tokio::io::BufReader::new(TcpStream::connect(server.addr).await?);
        next.get_mut().write_all(request).await?;
        // Served once the silent one has been closed after header_read_ms.
        let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut next))
            .await
            .with_context(|| format!("a silent connection ({opening:?}) kept the only place"))??;
        ensure!(status == 200);
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), silent.read_to_end(&mut rest)).await;
        // Closed: an end of stream, or a reset where it had sent bytes the server never read.
        ensure!(
            closed.is_ok(),
            "the silent connection ({opening:?}) was not closed"
        );
    }
    server.stop().await
}

/// One HTTP/2 frame read off `tcp`: (type, flags, payload); `None` at the end of the stream.
async fn read_h2_frame(tcp: &mut TcpStream) -> Result<Option<(u8, u8, Vec<u8>)>> {
    let mut head = [0u8; 9];
    match tcp.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await?;
    Ok(Some((head[3], head[4], payload)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_carries_at_most_64_streams_and_is_closed_when_it_answers_no_ping(
) -> Result<()> {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const ACK: u8 = 0x1;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    let server = Server::start(|o| o.timeouts.header_read_ms = 300).await?;
    // HTTP/2 with prior knowledge: the preface and empty settings; then it answers nothing.
    let mut tcp = TcpStream::connect(server.addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tcp.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]).await?;
    let (mut max_streams, mut pinged) = (None, false);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((kind, flags, payload)) = read_h2_frame(&mut tcp).await? {
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    for setting in payload.chunks_exact(6) {
                        if u16::from_be_bytes([setting[0], setting[1]]) == MAX_CONCURRENT_STREAMS {
                            let value = [setting[2], setting[3], setting[4], setting[5]];
                            max_streams = Some(u32::from_be_bytes(value));
                        }
                    }
                }
                PING if flags & ACK == 0 => pinged = true,
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(
        max_streams == Some(64),
        "the server's settings allow {max_streams:?} streams"
    );
    ensure!(pinged, "the server never pinged a silent HTTP/2 connection");
    ended
        .context("a connection that answers no ping is still open after 5 s")?
        .context("reading the server's frames")?;
    server.stop().await
}
