//! The Causeway headers, and parsing of the ones clients send.

use axum::http::{HeaderMap, HeaderName};
use causeway_core::{ReadTimestamp, Timestamp};

use crate::problem::{Kind, Problem};

/// On a write answer: the commit ts of the transaction.
pub const COMMIT_TIMESTAMP: HeaderName = HeaderName::from_static("causeway-timestamp");
/// On a read answer: the read timestamp `<epoch>.<ts>` the read ran at.
pub const READ_TIMESTAMP: HeaderName = HeaderName::from_static("causeway-read-timestamp");
/// On a read request: the causal token, the highest ts the client has seen (`<ts>`, or a read
/// timestamp `<epoch>.<ts>` of which the ts counts). The read runs at a ts at least this.
pub const AFTER: HeaderName = HeaderName::from_static("causeway-after");
/// On a write request: the client's request id, recorded in the transaction for idempotent
/// retries.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("causeway-request-id");

/// The `Causeway-After` token of a request; `Timestamp::ZERO` when absent.
pub fn after(headers: &HeaderMap) -> Result<Timestamp, Problem> {
    let Some(value) = headers.get(AFTER) else {
        return Ok(Timestamp::ZERO);
    };
    let bad = || {
        Problem::new(
            Kind::InvalidParameter,
            "Causeway-After must be a ts (an unsigned integer) or a read timestamp <epoch>.<ts>",
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map(Timestamp).map_err(|_| bad());
    }
    text.parse::<ReadTimestamp>()
        .map(|rt| rt.ts)
        .map_err(|_| bad())
}

/// The `Causeway-Request-Id` of a request (empty when absent): printable ASCII, bounded.
pub fn request_id(headers: &HeaderMap, max_bytes: usize) -> Result<String, Problem> {
    let Some(value) = headers.get(REQUEST_ID) else {
        return Ok(String::new());
    };
    let bytes = value.as_bytes();
    if bytes.len() > max_bytes || !bytes.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(Problem::new(
            Kind::InvalidParameter,
            format!("Causeway-Request-Id must be 1 to {max_bytes} bytes of printable ASCII"),
        ));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn causal_tokens_parse_as_ts_or_read_timestamp() {
        let mut h = HeaderMap::new();
        assert_eq!(after(&h).unwrap(), Timestamp::ZERO);
        h.insert(AFTER, HeaderValue::from_static("42"));
        assert_eq!(after(&h).unwrap(), Timestamp(42));
        h.insert(AFTER, HeaderValue::from_static("3.17"));
        assert_eq!(after(&h).unwrap(), Timestamp(17));
        for bad in ["", "-1", "1.2.3", "x", "99999999999999999999999"] {
            h.insert(AFTER, HeaderValue::from_static(bad));
            assert_eq!(after(&h).unwrap_err().kind, Kind::InvalidParameter, "{bad}");
        }
    }

    #[test]
    fn request_ids_are_bounded_printable_ascii() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h, 8).unwrap(), "");
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-1"));
        assert_eq!(request_id(&h, 8).unwrap(), "abc-1");
        h.insert(REQUEST_ID, HeaderValue::from_static("abcdefghij"));
        assert!(request_id(&h, 8).is_err());
        h.insert(REQUEST_ID, HeaderValue::from_static("a b"));
        assert!(request_id(&h, 8).is_err());
    }
}
