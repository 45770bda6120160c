//! The change streams (`GET /v1/changes`, `GET /v1/collections/{c}/changes`) on a whole cluster
//! in this process (`support::Cluster`, over a real Apache Kafka): every committed change in ts
//! order with whole transactions and nothing aborted, the token's read permissions, resuming with
//! `Last-Event-ID`, and a client that does not read being disconnected.

mod support;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use causeway_api_server as api;
use serde_json::{json, Value};

use support::{within, Cluster, READER_TOKEN, TOKEN, WRITER_TOKEN};

/// One event of a stream: its id, its type and its CloudEvents JSON.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: String,
    kind: String,
    data: Value,
}

impl SseEvent {
    fn is_change(&self) -> bool {
        self.kind.starts_with("causeway.document.")
    }

    /// `(ts, index, count, op, collection/id)` of a change.
    fn summary(&self) -> (u64, u64, u64, String, String) {
        let d = &self.data["data"];
        (
            d["tx"]["ts"].as_u64().unwrap_or(0),
            d["tx"]["index"].as_u64().unwrap_or(0),
            d["tx"]["count"].as_u64().unwrap_or(0),
            d["op"].as_str().unwrap_or("").to_owned(),
            self.data["subject"].as_str().unwrap_or("").to_owned(),
        )
    }
}

/// A client of one stream.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    /// Opens `path` (`/v1/changes?…`) with `token`, resuming after `last_event_id` if given.
    async fn open(
        c: &Cluster,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<Stream> {
        // The cluster's client times whole requests out; a stream's wait for each chunk is
        // bounded instead (`next`).
        let mut request = reqwest::Client::new()
            .get(c.url(0, path))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "{path}: {status} {}",
                response.text().await.unwrap_or_default()
            );
        }
        ensure!(
            response.headers()["content-type"] == "text/event-stream",
            "{path}: not an event stream"
        );
        Ok(Stream {
            response,
            buffer: String::new(),
        })
    }

    /// The next event (comments skipped), `None` when the server ended the stream.
    async fn next(&mut self) -> Result<Option<SseEvent>> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        kind = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if let (Some(id), Some(kind)) = (id, kind) {
                    let data = serde_json::from_str(&data)
                        .with_context(|| format!("event {id}: data is not JSON: {data}"))?;
                    return Ok(Some(SseEvent { id, kind, data }));
                }
            }
            match within("the next server-sent event", self.response.chunk()).await?? {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes)?),
                None => return Ok(None),
            }
        }
    }

    /// The change events up to (and without) the first resolved event at or past `ts`.
    async fn changes_until(&mut self, ts: u64) -> Result<Vec<SseEvent>> {
        let mut changes = Vec::new();
        for _ in 0..10_000 {
            let Some(e) = self.next().await? else {
                bail!("the stream ended before ts {ts} was resolved");
            };
            if e.is_change() {
                changes.push(e);
            } else if e.kind == "causeway.resolved"
                && e.data["data"]["resolved"].as_u64().unwrap_or(0) >= ts
            {
                return Ok(changes);
            }
        }
        bail!("no resolved event at {ts} within 10,000 events")
    }
}

/// Heartbeats every 100 ms; no admission control (the stalled-client test writes 200 KB
/// documents as fast as it can, which a debug build on two cores applies seconds behind).
fn options() -> api::Options {
    api::Options {
        changes: api::ChangesOptions {
            resolved_interval_ms: 100,
            ..api::ChangesOptions::default()
        },
        admission: causeway_core::admission::AdmissionOptions {
            enabled: false,
            ..Default::default()
        },
        ..api::Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_streams_carry_committed_transactions_in_order_and_resume_after_the_last_event(
) -> Result<()> {
    let c = Cluster::start_with(4, 2, 2, 1, options()).await?;
    // Streams from now, opened before the writes: every one holds the history from its start.
    let mut live = Stream::open(&c, "/v1/changes", TOKEN, None).await?;
    let mut first = Stream::open(&c, "/v1/changes", TOKEN, None).await?;
    let mut reader = Stream::open(&c, "/v1/changes", READER_TOKEN, None).await?;
    let mut one = Stream::open(&c, "/v1/collections/hidden/changes", TOKEN, None).await?;

    let t1 = c
        .write(
            0,
            "PUT",
            "/v1/collections/seen/documents/x1",
            "application/json",
            Some(json!({"n": 1})),
        )
        .await?;
    let t2 = c
        .write(
            0,
            "POST",
            "/v1/transactions",
            "application/json",
            Some(json!({"mutations": [
                {"op": "replace", "collection": "seen", "id": "x2", "document": {"n": 2}},
                {"op": "replace", "collection": "hidden", "id": "y1", "document": {"n": 3}},
                {"op": "replace", "collection": "seen", "id": "x3", "document": {"n": 4}},
            ]})),
        )
        .await?;
    // A transaction whose condition is false is in the log but aborts: no event.
    let refused = c
        .http
        .post(c.url(0, "/v1/transactions"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "mutations": [{"op": "replace", "collection": "seen", "id": "x9", "document": {"n": 9}}],
            "conditions": [{"collection": "seen", "id": "x1", "filter": {"n": {"$gt": 100}}}],
        }))
        .send()
        .await?;
    ensure!(
        refused.status() == 412,
        "a false condition answered {}",
        refused.status()
    );
    let aborted = refused.json::<Value>().await?["ts"]
        .as_u64()
        .context("the 412's ts")?;
    let t4 = c
        .write(
            0,
            "PATCH",
            "/v1/collections/seen/documents/x1",
            "application/merge-patch+json",
            Some(json!({"$increment": {"n": 10}})),
        )
        .await?;
    let t5 = c
        .write(
            0,
            "DELETE",
            "/v1/collections/hidden/documents/y1",
            "application/json",
            None,
        )
        .await?;

    let all = live.changes_until(t5).await?;
    let expected = vec![
        (t1, 0, 1, "c".to_owned(), "seen/x1".to_owned()),
        (t2, 0, 3, "c".into(), "seen/x2".into()),
        (t2, 1, 3, "c".into(), "hidden/y1".into()),
        (t2, 2, 3, "c".into(), "seen/x3".into()),
        (t4, 0, 1, "u".into(), "seen/x1".into()),
        (t5, 0, 1, "d".into(), "hidden/y1".into()),
    ];
    let got: Vec<_> = all.iter().map(SseEvent::summary).collect();
    ensure!(
        got == expected,
        "the stream carried {got:?}, not {expected:?}"
    );
    ensure!(
        !got.iter().any(|g| g.0 == aborted),
        "the aborted transaction {aborted} has an event"
    );
    ensure!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "ids do not rise: {all:?}"
    );
    ensure!(
        all[4].data["data"]["after"] == json!({"n": 11}),
        "{:?}",
        all[4]
    );
    ensure!(
        all[5].data["data"]["after"].is_null(),
        "a delete carries an after-image"
    );
    ensure!(all[0].data["specversion"] == "1.0" && all[0].data["id"] == all[0].id.as_str());

    // Cut after two events and resumed with Last-Event-ID (its hold lingers after the cut): the
    // same events, once.
    let mut resumed = Vec::new();
    while resumed.len() < 2 {
        match first.next().await?.context("the stream ended")? {
            e if e.is_change() => resumed.push(e),
            _ => {}
        }
    }
    drop(first);
    let mut second = Stream::open(&c, "/v1/changes", TOKEN, Some(&resumed[1].id)).await?;
    resumed.extend(second.changes_until(t5).await?);
    ensure!(resumed == all, "resumed: {resumed:?}\nwhole: {all:?}");

    // A token sees the collections it may read, and counts a transaction's events among them.
    let seen: Vec<_> = reader
        .changes_until(t5)
        .await?
        .iter()
        .map(SseEvent::summary)
        .collect();
    let expected_seen = vec![
        (t1, 0, 1, "c".to_owned(), "seen/x1".to_owned()),
        (t2, 0, 2, "c".into(), "seen/x2".into()),
        (t2, 1, 2, "c".into(), "seen/x3".into()),
        (t4, 0, 1, "u".into(), "seen/x1".into()),
    ];
    ensure!(seen == expected_seen, "the reader saw {seen:?}");
    let hidden: Vec<_> = one
        .changes_until(t5)
        .await?
        .iter()
        .map(SseEvent::summary)
        .collect();
    ensure!(
        hidden
            == vec![
                (t2, 0, 1, "c".to_owned(), "hidden/y1".to_owned()),
                (t5, 0, 1, "d".into(), "hidden/y1".into())
            ],
        "the collection's stream carried {hidden:?}"
    );

    drop((second, reader, one));

    // Refusals: a problem, no stream.
    for (path, token, status) in [
        ("/v1/collections/hidden/changes", READER_TOKEN, 403),
        ("/v1/changes", WRITER_TOKEN, 403),
        ("/v1/changes?after=banana", TOKEN, 400),
        ("/v1/changes?collections=a%2Fb", TOKEN, 400),
        ("/v1/changes", "not-a-token-of-this-cluster", 401),
    ] {
        let r = c.http.get(c.url(0, path)).bearer_auth(token).send().await?;
        ensure!(
            r.status() == status,
            "{path}: {} instead of {status}",
            r.status()
        );
        ensure!(
            r.headers()["content-type"] == "application/problem+json",
            "{path}"
        );
    }
    drop(live);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_does_not_read_is_disconnected_and_resumes_without_a_gap() -> Result<()> {
    let mut base = options();
    base.changes.buffer_bytes = 64 << 10;
    base.changes.slow_client_ms = 300;
    let c = Cluster::start_with(1, 1, 1, 1, base).await?;
    let mut stalled = Stream::open(&c, "/v1/changes", TOKEN, None).await?;
    // Events of about 200 KB each, written until the stalled stream is let go: the socket
    // buffers in between hold a few MB.
    let text = "x".repeat(200 << 10);
    let slow = |c: &Cluster| {
        let (http, url) = (c.http.clone(), c.url(0, "/metrics"));
        async move {
            let text = http.get(url).send().await?.text().await?;
            Ok::<_, anyhow::Error>(
                text.lines()
                    .any(|l| l == "causeway_api_change_streams_slow_total 1")
                    && text.lines().any(|l| l == "causeway_api_change_streams 0"),
            )
        }
    };
    let (mut written, mut last) = (0u64, 0);
    while written < 400 && !(written % 20 == 0 && written > 0 && slow(&c).await?) {
        last = c
            .write(
                0,
                "PUT",
                &format!("/v1/collections/big/documents/d{written}"),
                "application/json",
                Some(json!({"i": written, "text": text})),
            )
            .await?;
        written += 1;
    }
    within("the stalled stream's disconnection", async {
        while !slow(&c).await? {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    // What was sent before the disconnection still arrives, then the stream ends.
    let mut got = Vec::new();
    let mut last_id = None;
    while let Some(e) = stalled.next().await? {
        last_id = Some(e.id.clone());
        if e.is_change() {
            got.push(
                e.data["data"]["key"]["id"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            );
        }
    }
    ensure!(
        (got.len() as u64) < written,
        "the stalled client got every event: not disconnected"
    );
    let mut resumed = Stream::open(&c, "/v1/changes", TOKEN, last_id.as_deref()).await?;
    got.extend(resumed.changes_until(last).await?.iter().map(|e| {
        e.data["data"]["key"]["id"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }));
    let expected: Vec<String> = (0..written).map(|i| format!("d{i}")).collect();
    ensure!(got == expected, "after the resume: {got:?}");
    drop(resumed);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_whose_history_is_gone_is_refused_with_410() -> Result<()> {
    let mut base = options();
    base.changes.resume_window_ms = 0;
    let c = Cluster::start_with(1, 1, 1, 1, base).await?;
    let mut last = 0;
    for i in 0..3 {
        last = c
            .write(
                0,
                "PUT",
                "/v1/collections/gone/documents/g",
                "application/json",
                Some(json!({"i": i})),
            )
            .await?;
    }
    // Nothing holds the history: once GC passes ts 1, a stream after 0 cannot be served. It is
    // refused before it starts (410, so that an EventSource stops), and a cursor past the
    // log's end is a bad one (400).
    let lost = within("410 history_lost", async {
        for _ in 0..200 {
            let r = reqwest::Client::new()
                .get(c.url(0, "/v1/changes?after=0"))
                .bearer_auth(TOKEN)
                .send()
                .await?;
            if r.status() == 410 {
                return Ok::<_, anyhow::Error>(r.json::<Value>().await?);
            }
            ensure!(r.status() == 200, "after=0: {}", r.status());
            drop(r);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!("every stream after 0 was served")
    })
    .await??;
    ensure!(
        lost["type"] == "urn:causeway:problem:history_lost",
        "{lost}"
    );
    let past = c
        .http
        .get(c.url(0, &format!("/v1/changes?after={}", last + 1000)))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    ensure!(
        past.status() == 400,
        "a cursor past the log's end: {}",
        past.status()
    );
    c.stop().await
}
