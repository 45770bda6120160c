//! Logical time: transaction timestamps, configuration epochs and read timestamps.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The position of a transaction in the log: Kafka offset + 1.
///
/// `Timestamp::ZERO` is the empty database, before the first transaction. Timestamps are dense
/// in the embedded log but need not be on Kafka, which may leave gaps between offsets.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The empty database.
    pub const ZERO: Timestamp = Timestamp(0);
    /// The largest timestamp; no transaction ever gets it.
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// The timestamp of the record at log offset `offset`.
    pub fn from_offset(offset: u64) -> Timestamp {
        Timestamp(offset + 1)
    }

    /// The log offset of the record with this timestamp. `None` for `ZERO`, which has no record.
    pub fn offset(self) -> Option<u64> {
        self.0.checked_sub(1)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The id of a cluster configuration. `Epoch::ZERO` is the empty configuration; each new
/// configuration has the epoch of the one it follows plus one.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);

    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The time at which a read runs: a configuration epoch and a transaction timestamp, ordered
/// lexicographically (epoch first). Written `<epoch>.<ts>` on the wire (`Causeway-Read-Timestamp`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ReadTimestamp {
    pub epoch: Epoch,
    pub ts: Timestamp,
}

impl ReadTimestamp {
    pub fn new(epoch: Epoch, ts: Timestamp) -> ReadTimestamp {
        ReadTimestamp { epoch, ts }
    }
}

impl fmt::Display for ReadTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.ts)
    }
}

/// A `<epoch>.<ts>` string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid read timestamp {0:?}: expected <epoch>.<ts> with two unsigned integers")]
pub struct ParseReadTimestampError(pub String);

impl FromStr for ReadTimestamp {
    type Err = ParseReadTimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseReadTimestampError(s.chars().take(64).collect());
        let (epoch, ts) = s.split_once('.').ok_or_else(err)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(epoch) || !digits(ts) {
            return Err(err());
        }
        Ok(ReadTimestamp {
            epoch: Epoch(epoch.parse().map_err(|_| err())?),
            ts: Timestamp(ts.parse().map_err(|_| err())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_timestamps_order_by_epoch_first() {
        let a = ReadTimestamp::new(Epoch(1), Timestamp(100));
        let b = ReadTimestamp::new(Epoch(2), Timestamp(5));
        assert!(a < b);
        assert!(ReadTimestamp::new(Epoch(2), Timestamp(6)) > b);
    }

    #[test]
    fn read_timestamp_round_trips_through_text() {
        let r = ReadTimestamp::new(Epoch(3), Timestamp(42));
        assert_eq!(r.to_string(), "3.42");
        assert_eq!("3.42".parse::<ReadTimestamp>().unwrap(), r);
        for bad in [
            "",
            "3",
            "3.",
            ".4",
            "a.b",
            "3.4.5",
            "-1.2",
            "1.+2",
            "99999999999999999999.1",
        ] {
            assert!(bad.parse::<ReadTimestamp>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn timestamp_is_offset_plus_one() {
        assert_eq!(Timestamp::from_offset(0), Timestamp(1));
        assert_eq!(Timestamp(1).offset(), Some(0));
        assert_eq!(Timestamp::ZERO.offset(), None);
    }
}
