//! Change data capture's decisions (DESIGN.md §11): where an event sits in a feed, what kind of
//! event a change makes for a feed with a filter, and what a resumed feed may skip.
//!
//! A feed emits, for every transaction with ts ≤ UST in ts order, one event per document the
//! transaction wrote. An event's [`Position`] is `(ts, index)`, `index` counting the
//! transaction's written documents from 0 in the order the transaction first names them; its
//! text form ([`Position::id`]) is zero-padded so that it sorts as a string, and it is the event's
//! CloudEvents `id`, the dedupe key and the resume cursor on every sink.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// An event's place in the order of a feed: its transaction's ts, then its index in it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub ts: Timestamp,
    pub index: u32,
}

/// Digits of the ts and of the index in [`Position::id`]: every u64 and u32 fits.
const TS_DIGITS: usize = 20;
const INDEX_DIGITS: usize = 10;

impl Position {
    pub fn new(ts: Timestamp, index: u32) -> Position {
        Position { ts, index }
    }

    /// The position after every event of the transactions up to `ts`: a cursor that resumes
    /// with the first event above `ts`.
    pub fn end_of(ts: Timestamp) -> Position {
        Position {
            ts,
            index: u32::MAX,
        }
    }

    /// The text form: `ts.index`, zero-padded (`00000000000000000042.0000000003`).
    pub fn id(&self) -> String {
        format!(
            "{:0tw$}.{:0iw$}",
            self.ts.get(),
            self.index,
            tw = TS_DIGITS,
            iw = INDEX_DIGITS
        )
    }

    /// The ts up to which every transaction's events are at or below this position: `ts` at a
    /// transaction's end, the one before inside it. A feed resumed here reads the log after it
    /// and holds the GC timestamp at it.
    pub fn resolved(&self) -> Timestamp {
        if self.index == u32::MAX {
            self.ts
        } else {
            Timestamp(self.ts.get().saturating_sub(1))
        }
    }

    /// Whether a feed resumed after `self` emits the event at `event`.
    pub fn emits(&self, event: Position) -> bool {
        event > *self
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a cursor is an event id (`ts.index`, as in `00000000000000000042.0000000003`) or a ts; got {0:?}")]
pub struct BadCursor(pub String);

impl FromStr for Position {
    type Err = BadCursor;

    /// An event id resumes after that event; a bare ts (`42`) after every event up to it. Both
    /// may be written with or without the zero padding.
    fn from_str(s: &str) -> Result<Position, BadCursor> {
        let bad = || BadCursor(s.chars().take(64).collect());
        let digits = |t: &str| {
            !t.is_empty() && t.len() <= TS_DIGITS && t.bytes().all(|b| b.is_ascii_digit())
        };
        match s.split_once('.') {
            None if digits(s) => Ok(Position::end_of(Timestamp(s.parse().map_err(|_| bad())?))),
            Some((ts, index)) if digits(ts) && digits(index) && index.len() <= INDEX_DIGITS => {
                Ok(Position::new(
                    Timestamp(ts.parse().map_err(|_| bad())?),
                    index.parse().map_err(|_| bad())?,
                ))
            }
            _ => Err(bad()),
        }
    }
}

/// What a document was before and after a transaction, as a feed with a filter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The document did not exist (never written, or deleted).
    Absent,
    /// It existed, and the feed's filter matches it (always, for a feed without a filter).
    Matching,
    /// It existed and the filter does not match it.
    Other,
}

/// The operation of a change event (`data.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// `c`: the document was created.
    #[serde(rename = "c")]
    Create,
    /// `u`: the document existed and was written.
    #[serde(rename = "u")]
    Update,
    /// `d`: the document was deleted.
    #[serde(rename = "d")]
    Delete,
    /// `r`: the document as read by an initial scan.
    #[serde(rename = "r")]
    Read,
}

impl Op {
    /// The one-letter code of `data.op`.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// The CloudEvents `type` of a change event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Created,
    Updated,
    Deleted,
    /// The document stopped matching the feed's filter (it was updated, or its deletion is
    /// seen by a feed that matched it before).
    Left,
}

impl Kind {
    pub fn event_type(self) -> &'static str {
        match self {
            Kind::Created => "causeway.document.created",
            Kind::Updated => "causeway.document.updated",
            Kind::Deleted => "causeway.document.deleted",
            Kind::Left => "causeway.document.left",
        }
    }
}

/// The event a written document makes on a feed, from what the feed saw before and after the
/// transaction: `None` when the feed never saw it and still does not.
///
/// | before \ after | absent  | matching | other |
/// |---|---|---|---|
/// | absent   | —        | created  | —     |
/// | matching | deleted  | updated  | left  |
/// | other    | —        | updated  | —     |
///
/// A document that starts matching is an update of an existing document (`op: u`), with its
/// before-image when the feed asks for them.
pub fn classify(before: Side, after: Side) -> Option<(Kind, Op)> {
    use Side::*;
    let op = match (before, after) {
        (Absent, _) => Op::Create,
        (_, Absent) => Op::Delete,
        _ => Op::Update,
    };
    let kind = match (before, after) {
        (Absent, Matching) => Kind::Created,
        (Matching | Other, Matching) => Kind::Updated,
        (Matching, Absent) => Kind::Deleted,
        (Matching, Other) => Kind::Left,
        (Absent | Other, Absent | Other) => return None,
    };
    Some((kind, op))
}

/// Where a feed resumes, given its checkpoint and what the cluster still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Go on after the checkpoint.
    From(Position),
    /// The history after the checkpoint is gone (pruned below `lost_below` by GC or log
    /// retention): the feed must say so (`causeway.history_lost`) and cannot go on from it.
    HistoryLost {
        checkpoint: Position,
        lost_below: Timestamp,
    },
}

/// A feed at `checkpoint` needs every record above `checkpoint.ts` (for the events of a
/// partly delivered transaction, from `checkpoint.ts` itself) and the versions just before
/// them: the log must still start at or below the first ts it reads, and no store node's GC may
/// have passed that ts − 1.
pub fn resume(checkpoint: Position, log_first: Timestamp, gc: Timestamp) -> Resume {
    let first_needed = if checkpoint.index == u32::MAX {
        Timestamp(checkpoint.ts.get().saturating_add(1))
    } else {
        checkpoint.ts.max(Timestamp(1))
    };
    let lost_below = if log_first > first_needed {
        log_first
    } else if first_needed.get() - 1 < gc.get() {
        gc
    } else {
        return Resume::From(checkpoint);
    };
    Resume::HistoryLost {
        checkpoint,
        lost_below,
    }
}
