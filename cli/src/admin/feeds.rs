//! `causeway admin feeds list|show|create|pause|resume|delete`: the change data capture feeds
//! of a cdc service, through its admin API (`/v1/feeds`, see `causeway_cdc::http`).
//!
//! Reads are open; changes send the service's admin token. The answers are decoded leniently
//! (unknown fields ignored, missing ones defaulted) so that this command keeps working against
//! a cdc service of another version; `--json` prints them as they came.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_cdc::run::FeedStatus;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::problem;

/// Every request of a command is bounded by this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest feed spec sent (the cdc service accepts 64 KiB).
const MAX_SPEC_BYTES: u64 = 64 << 10;
/// The most characters of a feed's last error in the table (`show` has all of it).
const MAX_ERROR_CHARS: usize = 60;

/// Flags of `causeway admin feeds`.
#[derive(Debug, clap::Args)]
pub struct FeedsArgs {
    /// The cdc service's admin API (`host:port`, or a URL).
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_CDC",
        default_value = "127.0.0.1:7500"
    )]
    pub(crate) cdc: String,
    /// The cdc service's admin token, which create, pause, resume and delete need (`causeway
    /// dev` prints its admin token).
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_CDC_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
    #[command(subcommand)]
    pub(crate) command: FeedsCommand,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub(crate) enum FeedsCommand {
    /// Every feed: its sink, state, checkpoint, lag and events delivered.
    List {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One feed, with its collections and sink.
    Show {
        #[arg(value_parser = feed_name)]
        name: String,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Creates a feed from a feed spec (JSON) and starts it.
    Create {
        /// The feed spec: a JSON file, or `-` for stdin.
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
    },
    /// Stops a feed, keeping it and its checkpoint.
    Pause {
        #[arg(value_parser = feed_name)]
        name: String,
    },
    /// Starts a paused (or stopped) feed again from its checkpoint.
    Resume {
        #[arg(value_parser = feed_name)]
        name: String,
    },
    /// Stops and forgets a feed.
    Delete {
        #[arg(value_parser = feed_name)]
        name: String,
    },
}

fn feed_name(s: &str) -> Result<String, String> {
    if causeway_cdc::feed::valid_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a feed name: 1 to 64 letters, digits, `_` or `-`"
        ))
    }
}

/// A feed as the admin API answers it (`causeway_cdc::service::FeedInfo`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Feed {
    pub spec: Spec,
    pub paused: bool,
    pub status: FeedStatus,
    /// Events delivered since the service started.
    pub events: u64,
}

/// The parts of a feed spec shown.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Spec {
    pub name: String,
    pub sink: Sink,
    pub collections: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Sink {
    /// `kafka` or `webhook`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A webhook's URL.
    pub url: Option<String>,
    /// A Kafka sink's cluster.
    pub bootstrap_servers: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FeedList {
    feeds: Vec<Feed>,
}

impl Feed {
    /// The state, `paused` for a paused feed whatever its task last said.
    fn state(&self) -> &str {
        if self.paused {
            "paused"
        } else if self.status.state.is_empty() {
            "-"
        } else {
            &self.status.state
        }
    }
}

/// The feeds as a table, one row each (`no feeds` for none).
pub fn render_table(feeds: &[Feed]) -> String {
    if feeds.is_empty() {
        return "no feeds\n".to_owned();
    }
    let header = [
        "NAME",
        "SINK",
        "STATE",
        "CHECKPOINT",
        "RESOLVED",
        "LAG_TS",
        "LAG_MS",
        "EVENTS",
        "LAST_ERROR",
    ];
    let rows: Vec<[String; 9]> = feeds
        .iter()
        .map(|f| {
            [
                f.spec.name.clone(),
                or_dash(&f.spec.sink.kind),
                f.state().to_owned(),
                f.status.checkpoint.clone().unwrap_or_else(|| "-".into()),
                f.status.resolved.to_string(),
                f.status.lag_ts.to_string(),
                f.status.lag_ms.to_string(),
                f.events.to_string(),
                f.status
                    .last_error
                    .as_deref()
                    .map(|e| shorten(e, MAX_ERROR_CHARS))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // Numbers to the right, words to the left.
            if (4..=7).contains(&i) {
                line.push_str(&format!("{cell:>w$}  "));
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One feed: its row, then what the row leaves out.
pub fn render_feed(feed: &Feed) -> String {
    let mut out = render_table(std::slice::from_ref(feed));
    let target = feed
        .spec
        .sink
        .url
        .as_deref()
        .or(feed.spec.sink.bootstrap_servers.as_deref())
        .unwrap_or("");
    out.push_str(&format!(
        "\ncollections  {}\nsink         {} {target}\nust          {}\nlast error   {}\n",
        feed.spec.collections.join(", "),
        or_dash(&feed.spec.sink.kind),
        feed.status.ust,
        feed.status.last_error.as_deref().unwrap_or("-"),
    ));
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// `s` on one line and at most `max` characters, `…` marking a cut.
fn shorten(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The admin API of one cdc service.
struct Api {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(cdc: &str, token: Option<String>) -> Result<Api> {
        let base = if cdc.contains("://") {
            cdc.to_owned()
        } else {
            format!("http://{cdc}")
        };
        let base = Url::parse(&base).with_context(|| format!("--cdc {cdc:?} is not an address"))?;
        anyhow::ensure!(
            matches!(base.scheme(), "http" | "https") && !base.cannot_be_a_base(),
            "--cdc {cdc:?} is not host:port or an http(s) URL"
        );
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(Api { base, token, http })
    }

    /// `/v1/feeds` followed by `segments`, each escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("checked to be a base");
            path.pop_if_empty().extend(["v1", "feeds"]).extend(segments);
        }
        url
    }

    /// Sends a request; the body of a successful answer, or the problem as an error.
    async fn send(&self, method: Method, url: Url, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let changes = method != Method::GET;
        if changes && self.token.is_none() {
            bail!(
                "changing feeds needs the cdc service's admin token: --token or \
                 CAUSEWAY_CDC_ADMIN_TOKEN (causeway dev prints it)"
            );
        }
        let mut request = self.http.request(method, url.clone());
        if let (true, Some(token)) = (changes, &self.token) {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the cdc service at {}: {:#}",
                self.base,
                anyhow::Error::from(e)
            )
        })?;
        if !response.status().is_success() {
            return Err(problem::refused(&format!("the cdc service at {url}"), response).await);
        }
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        if status == StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        Ok(bytes.to_vec())
    }
}

/// Decodes an answer of the admin API.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    serde_json::from_slice(bytes).context("the cdc service's answer is not what it should be")
}

/// Prints `bytes` as they came (`--json`).
fn print_raw(bytes: &[u8]) {
    println!("{}", String::from_utf8_lossy(bytes).trim_end());
}

/// Reads the feed spec of `--spec` (a file or `-`) and checks that it is one.
fn read_spec(path: &std::path::Path) -> Result<(String, Vec<u8>)> {
    let (what, mut reader): (String, Box<dyn Read>) = if path.as_os_str() == "-" {
        ("stdin".into(), Box::new(std::io::stdin()))
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut bytes = Vec::new();
    reader
        .by_ref()
        .take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what}"))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_SPEC_BYTES,
        "{what} is larger than {MAX_SPEC_BYTES} bytes"
    );
    // The cdc service checks the spec in full; this gives the file's name to a typo.
    let spec: causeway_cdc::FeedSpec =
        serde_json::from_slice(&bytes).with_context(|| format!("{what} is not a feed spec"))?;
    Ok((spec.name, bytes))
}

/// Runs `causeway admin feeds …`.
pub async fn feeds(args: FeedsArgs) -> Result<()> {
    let api = Api::new(&args.cdc, args.token)?;
    match args.command {
        FeedsCommand::List { json } => {
            let bytes = api.send(Method::GET, api.url(&[]), None).await?;
            if json {
                print_raw(&bytes);
            } else {
                let list: FeedList = decode(&bytes)?;
                print!("{}", render_table(&list.feeds));
            }
        }
        FeedsCommand::Show { name, json } => {
            let bytes = api.send(Method::GET, api.url(&[&name]), None).await?;
            if json {
                print_raw(&bytes);
            } else {
                print!("{}", render_feed(&decode(&bytes)?));
            }
        }
        FeedsCommand::Create { spec } => {
            let (name, body) = read_spec(&spec)?;
            let bytes = api.send(Method::POST, api.url(&[]), Some(body)).await?;
            println!("created feed {name}");
            print!("{}", render_table(&[decode(&bytes)?]));
        }
        FeedsCommand::Pause { name } => {
            let bytes = api
                .send(Method::POST, api.url(&[&name, "pause"]), None)
                .await?;
            println!("paused feed {name}");
            print!("{}", render_table(&[decode(&bytes)?]));
        }
        FeedsCommand::Resume { name } => {
            let bytes = api
                .send(Method::POST, api.url(&[&name, "resume"]), None)
                .await?;
            println!("resumed feed {name}");
            print!("{}", render_table(&[decode(&bytes)?]));
        }
        FeedsCommand::Delete { name } => {
            api.send(Method::DELETE, api.url(&[&name]), None).await?;
            println!("deleted feed {name}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two feeds as `GET /v1/feeds` answers them.
    const LIST: &str = r#"{"feeds":[
      {"spec":{"name":"orders-hook","sink":{"type":"webhook","url":"http://h/hook","secrets":["whsec_x"]},
               "collections":["orders","catalog_*"],"before":false,"start":"now"},
       "paused":false,
       "status":{"state":"running","checkpoint":"00000000000000000042.0000000003","resolved":42,
                 "ust":50,"lag_ts":8,"lag_ms":120,"last_error":null},
       "events":1234,"a_field_of_a_later_version":1},
      {"spec":{"name":"k","sink":{"type":"kafka","bootstrap_servers":"k:9092"},"collections":["*"]},
       "paused":true,
       "status":{"state":"running","checkpoint":null,"resolved":0,"ust":0,"lag_ts":0,"lag_ms":0,
                 "last_error":"delivery failed:\n  broker k:9092 is down, and has been down for a long while now"},
       "events":0}
    ]}"#;

    #[test]
    fn the_table_has_a_row_per_feed_with_every_column() {
        let list: FeedList = serde_json::from_str(LIST).unwrap();
        let table = render_table(&list.feeds);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[0]),
            [
                "NAME",
                "SINK",
                "STATE",
                "CHECKPOINT",
                "RESOLVED",
                "LAG_TS",
                "LAG_MS",
                "EVENTS",
                "LAST_ERROR"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "orders-hook",
                "webhook",
                "running",
                "00000000000000000042.0000000003",
                "42",
                "8",
                "120",
                "1234",
                "-"
            ]
        );
        // Paused wins over the task's last word; the error is cut to one short line.
        let row = cells(lines[2]);
        assert_eq!(row[..8], ["k", "kafka", "paused", "-", "0", "0", "0", "0"]);
        assert!(
            lines[2].contains("delivery failed: broker k:9092 is down"),
            "{table}"
        );
        assert!(lines[2].ends_with('…'), "{table}");
        assert!(
            lines[2].split("delivery").nth(1).unwrap().chars().count() < MAX_ERROR_CHARS,
            "{table}"
        );
        // The columns line up: every header starts where its cells start.
        for name in ["STATE", "CHECKPOINT", "LAST_ERROR"] {
            let at = lines[0].find(name).unwrap();
            assert_eq!(&lines[1][at - 1..at], " ", "{name} in\n{table}");
            assert_ne!(&lines[1][at..=at], " ", "{name} in\n{table}");
        }
        // Numbers are right-aligned under their header.
        let end = lines[0].find("EVENTS").unwrap() + "EVENTS".len();
        assert_eq!(&lines[1][end - 4..end], "1234", "{table}");
        assert_eq!(render_table(&[]), "no feeds\n");
    }

    #[test]
    fn show_adds_the_collections_the_sink_and_the_whole_error() {
        let list: FeedList = serde_json::from_str(LIST).unwrap();
        let text = render_feed(&list.feeds[0]);
        assert!(text.contains("collections  orders, catalog_*"), "{text}");
        assert!(
            text.contains("sink         webhook http://h/hook"),
            "{text}"
        );
        assert!(text.contains("ust          50"), "{text}");
        let text = render_feed(&list.feeds[1]);
        assert!(text.contains("sink         kafka k:9092"), "{text}");
        assert!(text.contains("for a long while now"), "{text}");
    }

    #[test]
    fn urls_escape_the_name_and_keep_a_base_path() {
        let api = Api::new("127.0.0.1:7500", None).unwrap();
        assert_eq!(
            api.url(&["a-b", "pause"]).as_str(),
            "http://127.0.0.1:7500/v1/feeds/a-b/pause"
        );
        let api = Api::new("https://cdc.example/admin/", None).unwrap();
        assert_eq!(api.url(&[]).as_str(), "https://cdc.example/admin/v1/feeds");
        assert!(Api::new("ftp://h:21", None).is_err());
    }

    #[test]
    fn a_spec_file_is_checked_before_it_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"name":"n1","sink":{"type":"webhook","url":"http://h/","secrets":["whsec_AAAA"]},"collections":["notes"]}"#,
        )
        .unwrap();
        let (name, bytes) = read_spec(&good).unwrap();
        assert_eq!(name, "n1");
        assert_eq!(bytes, std::fs::read(&good).unwrap());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"name":"n1","colections":["notes"]}"#).unwrap();
        let e = format!("{:#}", read_spec(&bad).unwrap_err());
        assert!(e.contains("bad.json is not a feed spec"), "{e}");
        assert!(read_spec(&dir.path().join("missing.json")).is_err());
    }
}
