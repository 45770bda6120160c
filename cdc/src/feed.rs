//! Feeds: what one stream of changes selects and where it goes. A [`FeedSpec`] is what an
//! operator writes (the feeds file, the admin API); [`Selection`] is its compiled form that the
//! follower applies to every change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use causeway_core::cdc::{classify, Kind, Op, Side};
use causeway_core::query::{Filter, QueryLimits};
use causeway_core::{CollectionPattern, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// One feed, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedSpec {
    /// Letters, digits, `_` and `-`, at most 64: the feed's key in the state, its Kafka
    /// transactional id and checkpoint key, its `source`.
    pub name: String,
    pub sink: SinkSpec,
    /// Collection patterns as in the tokens file (`orders`, `catalog_*`, `*`).
    pub collections: Vec<String>,
    /// A filter in the query language (`{"field": {"$op": value}}`), evaluated on the before
    /// and the after image: a document that stops matching gives `causeway.document.left`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
    /// Carry `before` in change events.
    #[serde(default)]
    pub before: bool,
    #[serde(default)]
    pub start: Start,
}

/// Where a new feed starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// With the first transaction after the log's end when the feed is created.
    #[default]
    Now,
    /// With the first transaction after this ts.
    After(Timestamp),
    /// A consistent snapshot of the selected collections (`op: r`), then
    /// `causeway.snapshot.complete`, then the changes after the snapshot.
    InitialScan,
}

/// Where a feed's events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    Kafka(KafkaSinkSpec),
    Webhook(WebhookSinkSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkSpec {
    pub bootstrap_servers: String,
    /// librdkafka properties (TLS, SASL, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// A collection's topic when the map does not name one: `topic_prefix` + collection.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Collection → topic.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// A tombstone (null value) after a delete's event, so that log compaction drops the key.
    #[serde(default)]
    pub tombstones: bool,
    /// The topic of the feeds' checkpoints (compacted, keyed by feed name), written in the same
    /// Kafka transaction as the events.
    #[serde(default = "default_checkpoint_topic")]
    pub checkpoint_topic: String,
}

fn default_topic_prefix() -> String {
    "causeway.".to_owned()
}

fn default_checkpoint_topic() -> String {
    "causeway-cdc-checkpoints".to_owned()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkSpec {
    /// `http://` or `https://`.
    pub url: String,
    /// Standard Webhooks secrets (`whsec_` + base64): every one signs each request, so a
    /// receiver can rotate.
    pub secrets: Vec<String>,
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// How long a batch may wait for more events.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts of one batch before the budget is spent.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_first_ms")]
    pub backoff_first_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// What happens once the budget is spent.
    #[serde(default)]
    pub on_exhausted: Exhausted,
}

fn default_max_events() -> usize {
    500
}
fn default_max_bytes() -> usize {
    1 << 20
}
fn default_max_delay_ms() -> u64 {
    20
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    8
}
fn default_backoff_first_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

/// A webhook's batch that spent its retry budget.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Exhausted {
    /// Keep retrying at the longest backoff: nothing is skipped, order is kept.
    #[default]
    Block,
    /// Append the batch to this file (JSON lines), emit `causeway.gap` and go on.
    DeadLetter { file: PathBuf },
}

/// Why a feed spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("feed {feed:?}: {reason}")]
pub struct BadFeed {
    pub feed: String,
    pub reason: String,
}

impl FeedSpec {
    /// Checks the spec and compiles what the follower needs.
    pub fn selection(&self) -> Result<Selection, BadFeed> {
        let bad = |reason: String| BadFeed {
            feed: self.name.chars().take(64).collect(),
            reason,
        };
        if !valid_name(&self.name) {
            return Err(bad(
                "a feed name is 1 to 64 letters, digits, `_` or `-`".into()
            ));
        }
        if self.collections.is_empty() {
            return Err(bad("name at least one collection pattern".into()));
        }
        let patterns = self
            .collections
            .iter()
            .map(|p| {
                CollectionPattern::parse(p)
                    .ok_or_else(|| bad(format!("bad collection pattern {p:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filter = match &self.filter {
            None => None,
            Some(f) => Some(
                Filter::parse(f, &QueryLimits::default())
                    .map_err(|e| bad(format!("filter: {e}")))?,
            ),
        };
        if self.start == Start::InitialScan
            && patterns
                .iter()
                .any(|p| matches!(p, CollectionPattern::Prefix(_)))
        {
            return Err(bad(
                "an initial scan needs collection names, not patterns".into()
            ));
        }
        match &self.sink {
            SinkSpec::Webhook(w) => {
                if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                    || reqwest::Url::parse(&w.url).is_err()
                {
                    return Err(bad(format!(
                        "webhook url {:?} is not an http(s) URL",
                        w.url
                    )));
                }
                if w.secrets.is_empty() {
                    return Err(bad("a webhook needs at least one secret".into()));
                }
                for s in &w.secrets {
                    crate::sink::webhook::secret_key(s).map_err(bad)?;
                }
                if w.max_events == 0 || w.max_bytes == 0 || w.max_attempts == 0 {
                    return Err(bad(
                        "max_events, max_bytes and max_attempts must be positive".into(),
                    ));
                }
                if w.timeout_ms == 0
                    || w.backoff_first_ms == 0
                    || w.backoff_max_ms < w.backoff_first_ms
                {
                    return Err(bad("timeout_ms and backoff_first_ms must be positive, backoff_max_ms at least backoff_first_ms".into()));
                }
            }
            SinkSpec::Kafka(k) => {
                if k.bootstrap_servers.is_empty() {
                    return Err(bad("kafka bootstrap_servers is empty".into()));
                }
                let topic_ok = |t: &str| {
                    !t.is_empty()
                        && t.len() <= 249
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                };
                if !topic_ok(&k.checkpoint_topic)
                    || k.topics.values().any(|t| !topic_ok(t))
                    || !(k.topic_prefix.is_empty() || topic_ok(&k.topic_prefix))
                {
                    return Err(bad(
                        "a Kafka topic name is 1 to 249 of [a-zA-Z0-9._-]".into()
                    ));
                }
            }
        }
        Ok(Selection::new(patterns, filter, self.before))
    }
}

/// What stands for a secret in a spec that is shown.
pub const REDACTED: &str = "<redacted>";

impl FeedSpec {
    /// The spec as the admin API shows it: webhook secrets and the Kafka properties that hold
    /// credentials (passwords, keys, tokens, JAAS configs) are left out.
    pub fn redacted(&self) -> FeedSpec {
        let mut spec = self.clone();
        match &mut spec.sink {
            SinkSpec::Webhook(w) => w.secrets.iter_mut().for_each(|s| *s = REDACTED.into()),
            SinkSpec::Kafka(k) => {
                for (name, value) in &mut k.properties {
                    let name = name.to_ascii_lowercase();
                    if ["password", "secret", "key", "token", "jaas", "credential"]
                        .iter()
                        .any(|w| name.contains(w))
                    {
                        *value = REDACTED.into();
                    }
                }
            }
        }
        spec
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Who may see a collection (the SSE stream's token), besides the patterns.
pub type Access = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a feed takes from every change.
#[derive(Clone)]
pub struct Selection {
    patterns: Vec<CollectionPattern>,
    filter: Option<Filter>,
    /// Carry before-images.
    pub before: bool,
    access: Option<Access>,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("patterns", &self.patterns)
            .field("filter", &self.filter)
            .field("before", &self.before)
            .finish_non_exhaustive()
    }
}

impl Selection {
    pub fn new(
        patterns: Vec<CollectionPattern>,
        filter: Option<Filter>,
        before: bool,
    ) -> Selection {
        Selection {
            patterns,
            filter,
            before,
            access: None,
        }
    }

    /// Only the collections `access` allows, too.
    pub fn with_access(mut self, access: Access) -> Selection {
        self.access = Some(access);
        self
    }

    /// Whether the feed takes changes of `collection`.
    pub fn takes(&self, collection: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(collection))
            && self.access.as_ref().is_none_or(|allows| allows(collection))
    }

    /// The collection names of an initial scan (patterns are refused for it).
    pub fn named_collections(&self) -> Vec<String> {
        self.patterns
            .iter()
            .filter_map(|p| match p {
                CollectionPattern::Exact(c) => Some(c.clone()),
                CollectionPattern::Prefix(_) => None,
            })
            .collect()
    }

    /// Whether the feed must read before-images from the store (to carry them, or to tell
    /// whether a document left the filter).
    pub fn needs_before(&self) -> bool {
        self.before || self.filter.is_some()
    }

    /// The event a change makes on this feed (see `causeway_core::cdc::classify`); the JSON
    /// texts are parsed only when there is a filter.
    pub fn classify(&self, before: Option<&[u8]>, after: Option<&[u8]>) -> Option<(Kind, Op)> {
        let side = |json: Option<&[u8]>| match (json, &self.filter) {
            (None, _) => Side::Absent,
            (Some(_), None) => Side::Matching,
            (Some(text), Some(filter)) => match serde_json::from_slice::<Json>(text) {
                Ok(doc) if filter.matches(&doc) => Side::Matching,
                _ => Side::Other,
            },
        };
        classify(side(before), side(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_spec_has_no_secrets() {
        let webhook: FeedSpec = serde_json::from_value(serde_json::json!({
            "name": "f", "collections": ["c"],
            "sink": {"type": "webhook", "url": "http://h/", "secrets": ["whsec_c2VjcmV0LWtleS0wMTIzNDU2Nzg5"]}
        }))
        .unwrap();
        let shown = serde_json::to_string(&webhook.redacted()).unwrap();
        assert!(!shown.contains("whsec_c2Vj"), "{shown}");
        let kafka: FeedSpec = serde_json::from_value(serde_json::json!({
            "name": "k", "collections": ["c"],
            "sink": {"type": "kafka", "bootstrap_servers": "b:9092", "properties": {
                "sasl.password": "hunter2", "ssl.key.password": "k3y",
                "sasl.jaas.config": "x password=p", "security.protocol": "SASL_SSL"}}
        }))
        .unwrap();
        let shown = serde_json::to_string(&kafka.redacted()).unwrap();
        for secret in ["hunter2", "k3y", "password=p"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("SASL_SSL"), "{shown}");
    }

    /// The feed of the README's tour is one this build takes.
    #[test]
    fn the_readme_feed_is_valid() {
        let readme = include_str!("../../README.md");
        let (_, rest) = readme
            .split_once("cat > feed.json <<'JSON'\n")
            .expect("the README shows a feed");
        let (json, _) = rest.split_once("\nJSON\n").expect("the feed's JSON ends");
        let spec: FeedSpec = serde_json::from_str(json).expect("the README's feed parses");
        spec.selection().expect("the README's feed is valid");
        assert_eq!(spec.start, Start::InitialScan);
        assert!(matches!(spec.sink, SinkSpec::Webhook(_)));
    }
}
