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
/// On a write request: the client's key for idempotent retries (IETF httpapi
/// `Idempotency-Key`): a second transaction with a key already committed within the retention
/// window changes nothing and answers the first one's ts and outcome.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The former name of `Idempotency-Key`, still accepted as an alias.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("causeway-request-id");
/// On a write answer: `true` when the answer is the original transaction's (a retry).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

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

/// The `Idempotency-Key` of a request (or its alias `Causeway-Request-Id`; empty when
/// absent): printable ASCII, bounded. A structured-field string (`"key"`) counts without its
/// quotes.
pub fn idempotency_key(headers: &HeaderMap, max_bytes: usize) -> Result<String, Problem> {
    let key = |name: &HeaderName| -> Result<Option<String>, Problem> {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Problem::new(
                Kind::InvalidParameter,
                format!("{name} must be given once"),
            ));
        }
        let mut bytes = value.as_bytes();
        if bytes.len() >= 2 && bytes[0] == b'"' && bytes[bytes.len() - 1] == b'"' {
            bytes = &bytes[1..bytes.len() - 1];
        }
        if bytes.is_empty()
            || bytes.len() > max_bytes
            || !bytes.iter().all(|b| (0x21..0x7f).contains(b))
        {
            return Err(Problem::new(
                Kind::InvalidParameter,
                format!("{name} must be 1 to {max_bytes} bytes of printable ASCII"),
            ));
        }
        Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
    };
    match (key(&IDEMPOTENCY_KEY)?, key(&REQUEST_ID)?) {
        (Some(a), Some(b)) if a != b => Err(Problem::new(
            Kind::InvalidParameter,
            "Idempotency-Key and Causeway-Request-Id differ: send Idempotency-Key only",
        )),
        (Some(k), _) | (None, Some(k)) => Ok(k),
        (None, None) => Ok(String::new()),
    }
}

/// What `If-Match` and `If-None-Match` ask of the document: `(exists, version_ts)`.
/// `If-Match: "<ts>"` (the ETag a read answers) asks for that version; `If-Match: *` for any;
/// `If-None-Match: *` for none.
pub fn preconditions(headers: &HeaderMap) -> Result<(Option<bool>, Option<u64>), Problem> {
    let text = |name: HeaderName| {
        headers
            .get(&name)
            .map(|v| {
                v.to_str().map(str::trim).map_err(|_| {
                    Problem::new(Kind::InvalidParameter, format!("{name} is not ASCII"))
                })
            })
            .transpose()
    };
    let if_match = text(axum::http::header::IF_MATCH)?;
    let if_none_match = text(axum::http::header::IF_NONE_MATCH)?;
    let mut exists = None;
    let mut version = None;
    match if_match {
        None => {}
        Some("*") => exists = Some(true),
        Some(tag) => {
            let ts = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| {
                    Problem::new(
                        Kind::InvalidParameter,
                        "If-Match must be * or one strong ETag \"<version ts>\" as a read answers it",
                    )
                })?;
            version = Some(ts);
        }
    }
    match if_none_match {
        None => {}
        Some("*") => {
            if exists == Some(true) || version.is_some() {
                return Err(Problem::new(
                    Kind::InvalidParameter,
                    "If-Match and If-None-Match: * cannot both hold",
                ));
            }
            exists = Some(false);
        }
        Some(_) => {
            return Err(Problem::new(
                Kind::InvalidParameter,
                "If-None-Match on a write must be *",
            ))
        }
    }
    Ok((exists, version))
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
    fn idempotency_keys_are_bounded_printable_ascii() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h, 8).unwrap(), "");
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"abc-1\""));
        assert_eq!(idempotency_key(&h, 8).unwrap(), "abc-1");
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-1"));
        assert_eq!(idempotency_key(&h, 8).unwrap(), "abc-1", "an equal alias");
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-2"));
        assert!(idempotency_key(&h, 8).is_err(), "a different alias");
        h.remove(IDEMPOTENCY_KEY);
        assert_eq!(idempotency_key(&h, 8).unwrap(), "abc-2", "the alias alone");
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("one"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("two"));
        assert!(idempotency_key(&h, 8).is_err(), "given twice");
        for bad in ["abcdefghij", "a b", "\"\""] {
            h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(bad));
            assert!(idempotency_key(&h, 8).is_err(), "{bad}");
        }
    }

    #[test]
    fn preconditions_parse_etags_and_stars() {
        use axum::http::header::{IF_MATCH, IF_NONE_MATCH};
        let mut h = HeaderMap::new();
        assert_eq!(preconditions(&h).unwrap(), (None, None));
        h.insert(IF_MATCH, HeaderValue::from_static("\"42\""));
        assert_eq!(preconditions(&h).unwrap(), (None, Some(42)));
        h.insert(IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(preconditions(&h).unwrap(), (Some(true), None));
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(preconditions(&h).is_err(), "both");
        h.remove(IF_MATCH);
        assert_eq!(preconditions(&h).unwrap(), (Some(false), None));
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"3\""));
        assert!(preconditions(&h).is_err());
        h.remove(IF_NONE_MATCH);
        for bad in ["42", "W/\"42\"", "\"4\", \"5\"", "\"x\""] {
            h.insert(IF_MATCH, HeaderValue::from_static(bad));
            assert!(preconditions(&h).is_err(), "{bad}");
        }
    }
}
