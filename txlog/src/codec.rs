//! The log's record format: one protobuf `causeway.v1.Transaction` per record.
//!
//! Writers build a [`Transaction`] with [`TRANSACTION_FORMAT_VERSION`] and [`encode`] it; readers
//! [`decode`] it and get a typed error for a format version they do not know, so an old node never
//! misapplies a record written by a newer one.

use bytes::Bytes;
use prost::Message;

pub use causeway_proto::v1::{Transaction, TRANSACTION_FORMAT_VERSION};

use crate::error::{Error, Result};

/// Encodes a transaction as a log record payload.
///
/// Panics when `tx.format_version` is not [`TRANSACTION_FORMAT_VERSION`]: writing a record this
/// build could not read back is a bug in the writer.
pub fn encode(tx: &Transaction) -> Bytes {
    assert_eq!(
        tx.format_version, TRANSACTION_FORMAT_VERSION,
        "writing a transaction with a format version this build does not write"
    );
    Bytes::from(tx.encode_to_vec())
}

/// Decodes a log record payload into a transaction, refusing unknown format versions.
pub fn decode(payload: &[u8]) -> Result<Transaction> {
    let tx = Transaction::decode(payload).map_err(Error::Decode)?;
    if !causeway_proto::v1::transaction_format_supported(tx.format_version) {
        return Err(Error::UnknownFormatVersion {
            found: tx.format_version,
            supported: TRANSACTION_FORMAT_VERSION,
        });
    }
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_proto::v1::{mutation, Increment, Mutation};

    fn sample() -> Transaction {
        Transaction {
            format_version: TRANSACTION_FORMAT_VERSION,
            wall_clock_ms: 1_700_000_000_000,
            idempotency_key: "req-1".into(),
            mutations: vec![Mutation {
                collection: "accounts".into(),
                id: "a".into(),
                op: Some(mutation::Op::Increment(Increment {
                    path: vec!["balance".into()],
                    delta: -5,
                })),
            }],
            conditions: vec![causeway_proto::v1::Condition {
                collection: "accounts".into(),
                id: "a".into(),
                exists: Some(true),
                version_ts: None,
                filter: br#"{"balance": {"$gte": 5}}"#.to_vec(),
            }],
            idempotency_scope: "tester".into(),
            limits: Some(causeway_proto::v1::ApplyLimits {
                max_document_bytes: 1000,
                max_history_changes: 0,
                idempotency_window_ms: 60_000,
            }),
        }
    }

    #[test]
    fn transactions_round_trip() {
        let tx = sample();
        assert_eq!(decode(&encode(&tx)).unwrap(), tx);
    }

    #[test]
    fn unknown_format_versions_are_refused() {
        let mut tx = sample();
        tx.format_version = TRANSACTION_FORMAT_VERSION + 1;
        let err = decode(&tx.encode_to_vec()).unwrap_err();
        assert!(
            matches!(err, Error::UnknownFormatVersion { found, supported }
                if found == TRANSACTION_FORMAT_VERSION + 1 && supported == TRANSACTION_FORMAT_VERSION),
            "{err:?}"
        );
        // A record without a version (all defaults) is version 0: refused too.
        assert!(matches!(
            decode(&[]),
            Err(Error::UnknownFormatVersion { found: 0, .. })
        ));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(matches!(decode(&[0xff, 0xff, 0xff]), Err(Error::Decode(_))));
    }

    #[test]
    #[should_panic(expected = "format version")]
    fn encoding_an_unknown_version_is_a_bug() {
        let mut tx = sample();
        tx.format_version = 0;
        encode(&tx);
    }
}
