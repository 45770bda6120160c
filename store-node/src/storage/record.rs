//! The version record: the value of a `docs` key.
//!
//! ```text
//! tombstone: FORMAT ‖ KIND_TOMBSTONE
//! put:       FORMAT ‖ KIND_SNAPSHOT | KIND_DELTA ‖ history_changes u32 BE ‖ deltas u32 BE
//!            ‖ json_len u32 BE ‖ json ‖ automerge bytes
//! put:       FORMAT ‖ KIND_SNAPSHOT_OF_ACTOR ‖ history_changes u32 BE ‖ deltas u32 BE
//!            ‖ json_len u32 BE ‖ actor_len u8 ‖ actor ‖ json ‖ automerge bytes
//! ```
//!
//! A snapshot carries the document's full `save()`; a delta carries `save_after(heads of the
//! previous version)`, so its automerge state is the nearest older snapshot plus every delta up
//! to it. `json` is the materialized document (a JSON object, serde_json's compact form with keys
//! in automerge's sorted order): reads never touch automerge.
//!
//! A snapshot may name the automerge actor that the store's own changes to the document use
//! until its next re-base or re-creation (see `apply_version`); the deltas after it use the
//! same. A document whose snapshot names none (written before actors were kept per
//! document) gets an actor per mutation (`document::actor`) until then.

/// The record format this build writes and reads.
pub const FORMAT: u8 = 1;

const KIND_TOMBSTONE: u8 = 0;
const KIND_SNAPSHOT: u8 = 1;
const KIND_DELTA: u8 = 2;
const KIND_SNAPSHOT_OF_ACTOR: u8 = 3;
const HEADER: usize = 2 + 4 + 4 + 4;

/// How a put version carries its automerge state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The full document (`save()`).
    Snapshot,
    /// The changes since the previous version (`save_after`).
    Delta,
}

/// A decoded version record, borrowing the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Tombstone,
    Put {
        segment: Segment,
        /// Changes in the automerge history since the document was created or last re-based.
        history_changes: u32,
        /// Deltas since the nearest older snapshot (0 for a snapshot).
        deltas: u32,
        /// A snapshot's: the actor of the store's changes to this history, if it names one.
        actor: Option<&'a [u8]>,
        json: &'a [u8],
        automerge: &'a [u8],
    },
}

impl<'a> Record<'a> {
    /// Decodes bytes from a peer; `None` if they are not a version record.
    pub fn parse(bytes: &'a [u8]) -> Option<Record<'a>> {
        match bytes {
            [FORMAT, KIND_TOMBSTONE] => Some(Record::Tombstone),
            [FORMAT, kind @ (KIND_SNAPSHOT | KIND_DELTA | KIND_SNAPSHOT_OF_ACTOR), ..]
                if bytes.len() >= HEADER =>
            {
                let u32_at =
                    |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
                let history_changes = u32_at(2);
                let deltas = u32_at(6);
                let json_len = usize::try_from(u32_at(10)).ok()?;
                let mut rest = &bytes[HEADER..];
                let actor = if *kind == KIND_SNAPSHOT_OF_ACTOR {
                    let (&len, after) = rest.split_first()?;
                    let len = usize::from(len);
                    if len == 0 || after.len() < len {
                        return None;
                    }
                    let (actor, after) = after.split_at(len);
                    rest = after;
                    Some(actor)
                } else {
                    None
                };
                if rest.len() < json_len {
                    return None;
                }
                let (json, automerge) = rest.split_at(json_len);
                let segment = if *kind == KIND_DELTA {
                    Segment::Delta
                } else {
                    Segment::Snapshot
                };
                if (segment == Segment::Snapshot) != (deltas == 0) {
                    return None;
                }
                Some(Record::Put {
                    segment,
                    history_changes,
                    deltas,
                    actor,
                    json,
                    automerge,
                })
            }
            _ => None,
        }
    }

    /// Decodes a record this store wrote; anything else is corruption.
    pub fn decode(bytes: &'a [u8]) -> Record<'a> {
        match Record::parse(bytes) {
            Some(record) => record,
            None => panic!(
                "corrupt version record ({} bytes, starting {:02x?})",
                bytes.len(),
                &bytes[..bytes.len().min(16)]
            ),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Record::Tombstone => vec![FORMAT, KIND_TOMBSTONE],
            Record::Put {
                segment,
                history_changes,
                deltas,
                actor,
                json,
                automerge,
            } => {
                assert_eq!(segment == Segment::Snapshot, deltas == 0);
                assert!(
                    actor.is_none() || segment == Segment::Snapshot,
                    "only a snapshot names an actor"
                );
                let json_len = u32::try_from(json.len()).expect("json under 4 GiB");
                let actor_len = actor.map_or(0, |a| 1 + a.len());
                let mut out = Vec::with_capacity(HEADER + actor_len + json.len() + automerge.len());
                out.push(FORMAT);
                out.push(match (segment, actor) {
                    (Segment::Snapshot, None) => KIND_SNAPSHOT,
                    (Segment::Snapshot, Some(_)) => KIND_SNAPSHOT_OF_ACTOR,
                    (Segment::Delta, _) => KIND_DELTA,
                });
                out.extend_from_slice(&history_changes.to_be_bytes());
                out.extend_from_slice(&deltas.to_be_bytes());
                out.extend_from_slice(&json_len.to_be_bytes());
                if let Some(actor) = actor {
                    let len = u8::try_from(actor.len()).expect("an actor id under 256 bytes");
                    assert!(len > 0, "an empty actor id");
                    out.push(len);
                    out.extend_from_slice(actor);
                }
                out.extend_from_slice(json);
                out.extend_from_slice(automerge);
                out
            }
        }
    }

    pub fn json(&self) -> Option<&'a [u8]> {
        match self {
            Record::Tombstone => None,
            Record::Put { json, .. } => Some(json),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for record in [
            Record::Tombstone,
            Record::Put {
                segment: Segment::Snapshot,
                history_changes: 3,
                deltas: 0,
                actor: None,
                json: b"{\"a\":1}",
                automerge: b"\x85o",
            },
            Record::Put {
                segment: Segment::Snapshot,
                history_changes: 3,
                deltas: 0,
                actor: Some(b"0123456789abcdef"),
                json: b"{\"a\":1}",
                automerge: b"\x85o",
            },
            Record::Put {
                segment: Segment::Delta,
                history_changes: 4,
                deltas: 1,
                actor: None,
                json: b"{}",
                automerge: b"",
            },
        ] {
            assert_eq!(Record::decode(&record.encode()), record);
        }
        assert_eq!(Record::parse(&[FORMAT]), None);
        assert_eq!(Record::parse(&[9, 0]), None);
        assert_eq!(Record::parse(&[FORMAT, KIND_SNAPSHOT, 0, 0]), None);
        let header = [
            FORMAT,
            KIND_SNAPSHOT_OF_ACTOR,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        // An actor of no bytes, or longer than the record.
        assert_eq!(Record::parse(&[&header[..], &[0]].concat()), None);
        assert_eq!(Record::parse(&[&header[..], &[4, 1, 2]].concat()), None);
        // A snapshot that names an actor has no deltas before it.
        let mut delta = header;
        delta[9] = 1;
        assert_eq!(Record::parse(&[&delta[..], &[1, 7]].concat()), None);
    }
}
