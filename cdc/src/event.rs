//! The events a feed emits, as CloudEvents 1.0 (DESIGN.md §11): change events
//! (`causeway.document.created|updated|deleted|left`; an initial scan's documents are
//! `created` with `op: r`) and
//! the feed's own (`causeway.resolved`, `causeway.snapshot.complete`, `causeway.history_lost`,
//! `causeway.gap`).
//!
//! Every event has an `id` that is a [`Position`]: a change's `ts.index`; a feed event's
//! `Position::end_of(ts)`, so that resuming after it resumes after everything up to `ts`.
//! Document JSON travels as the stored text (`RawValue`), never parsed again unless a filter
//! needs it.

use causeway_core::cdc::{Kind, Op, Position};
use causeway_core::Timestamp;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value as Json};

/// The CloudEvents version every event carries.
pub const SPEC_VERSION: &str = "1.0";
/// The content type of a webhook batch.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// What one event says.
#[derive(Debug, Clone)]
pub enum Body {
    /// A document the transaction at `position.ts` wrote (or an initial scan read).
    Change(Change),
    /// Every event at or below `ts` has been delivered on this feed.
    Resolved { ts: Timestamp },
    /// The initial scan at `snapshot` is complete; changes after it follow.
    SnapshotComplete { snapshot: Timestamp },
    /// The feed cannot go on from its checkpoint: the history after it is gone.
    HistoryLost {
        checkpoint: Position,
        lost_below: Timestamp,
    },
    /// Events from `first` to `last` were moved to the dead letters after the retry budget.
    Gap {
        first: Position,
        last: Position,
        dead_letter: String,
    },
}

/// A change event's data.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: Kind,
    pub op: Op,
    pub collection: String,
    pub id: String,
    /// The transaction's written documents on this feed.
    pub tx_count: u32,
    pub after: Option<Box<RawValue>>,
    /// Present when the feed asks for before-images (`null` for a created document).
    pub before: Option<Option<Box<RawValue>>>,
}

/// One event of a feed.
#[derive(Debug, Clone)]
pub struct Event {
    pub position: Position,
    /// The wall clock of the record (milliseconds since the epoch); for feed events, of the
    /// moment they were made.
    pub time_ms: u64,
    pub body: Body,
}

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    source: &'a str,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    time: String,
    datacontenttype: &'static str,
    data: Json,
}

#[derive(Serialize)]
struct ChangeData<'a> {
    op: &'static str,
    key: Key<'a>,
    ts: u64,
    tx: Tx,
    after: &'a Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: &'a Option<Option<Box<RawValue>>>,
}

#[derive(Serialize)]
struct Key<'a> {
    collection: &'a str,
    id: &'a str,
}

#[derive(Serialize)]
struct Tx {
    ts: u64,
    index: u32,
    count: u32,
}

impl Event {
    /// The CloudEvents `type`.
    pub fn event_type(&self) -> &'static str {
        match &self.body {
            Body::Change(c) => c.kind.event_type(),
            Body::Resolved { .. } => "causeway.resolved",
            Body::SnapshotComplete { .. } => "causeway.snapshot.complete",
            Body::HistoryLost { .. } => "causeway.history_lost",
            Body::Gap { .. } => "causeway.gap",
        }
    }

    /// `collection/id` for a change.
    pub fn subject(&self) -> Option<String> {
        match &self.body {
            Body::Change(c) => Some(format!("{}/{}", c.collection, c.id)),
            _ => None,
        }
    }

    pub fn id(&self) -> String {
        self.position.id()
    }

    /// The CloudEvents `data`.
    pub fn data(&self) -> Json {
        match &self.body {
            Body::Change(c) => serde_json::to_value(ChangeData {
                op: c.op.code(),
                key: Key {
                    collection: &c.collection,
                    id: &c.id,
                },
                ts: self.position.ts.get(),
                tx: Tx {
                    ts: self.position.ts.get(),
                    index: self.position.index,
                    count: c.tx_count,
                },
                after: &c.after,
                before: &c.before,
            })
            .expect("change data serializes"),
            Body::Resolved { ts } => json!({ "resolved": ts.get() }),
            Body::SnapshotComplete { snapshot } => json!({ "snapshot": snapshot.get() }),
            Body::HistoryLost {
                checkpoint,
                lost_below,
            } => json!({
                "checkpoint": checkpoint.id(),
                "lost_below": lost_below.get(),
                "offer": "initial_scan",
            }),
            Body::Gap {
                first,
                last,
                dead_letter,
            } => json!({ "first": first.id(), "last": last.id(), "dead_letter": dead_letter }),
        }
    }

    /// The whole event in CloudEvents' structured JSON form.
    pub fn to_json(&self, source: &str) -> Json {
        serde_json::to_value(Envelope {
            specversion: SPEC_VERSION,
            kind: self.event_type(),
            source,
            id: self.id(),
            subject: self.subject(),
            time: rfc3339(self.time_ms),
            datacontenttype: "application/json",
            data: self.data(),
        })
        .expect("an event serializes")
    }

    /// The CloudEvents binary-mode headers (`ce_*`, for Kafka): the value is [`Event::data`].
    pub fn binary_headers(&self, source: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("ce_specversion", SPEC_VERSION.to_owned()),
            ("ce_type", self.event_type().to_owned()),
            ("ce_source", source.to_owned()),
            ("ce_id", self.id()),
            ("ce_time", rfc3339(self.time_ms)),
            ("content-type", "application/json".to_owned()),
        ];
        if let Some(s) = self.subject() {
            h.push(("ce_subject", s));
        }
        h
    }

    pub fn is_change(&self) -> bool {
        matches!(self.body, Body::Change(_))
    }
}

/// `ms` since the Unix epoch as an RFC 3339 UTC time with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_169_600_000), "2026-12-02T00:00:00.000Z");
    }

    #[test]
    fn a_change_event_has_the_envelope_and_the_data_of_the_contract() {
        let event = Event {
            position: Position::new(Timestamp(42), 1),
            time_ms: 1_796_169_600_000,
            body: Body::Change(Change {
                kind: Kind::Deleted,
                op: Op::Delete,
                collection: "orders".into(),
                id: "o1".into(),
                tx_count: 2,
                after: None,
                before: Some(Some(RawValue::from_string(r#"{"n":1}"#.into()).unwrap())),
            }),
        };
        let j = event.to_json("/causeway/feeds/f");
        assert_eq!(j["specversion"], "1.0");
        assert_eq!(j["type"], "causeway.document.deleted");
        assert_eq!(j["id"], "00000000000000000042.0000000001");
        assert_eq!(j["subject"], "orders/o1");
        assert_eq!(j["time"], "2026-12-02T00:00:00.000Z");
        assert_eq!(j["datacontenttype"], "application/json");
        assert_eq!(
            j["data"],
            json!({"op": "d", "key": {"collection": "orders", "id": "o1"}, "ts": 42,
                   "tx": {"ts": 42, "index": 1, "count": 2}, "after": null, "before": {"n": 1}})
        );
    }
}
