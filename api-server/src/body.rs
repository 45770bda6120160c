//! Reading request bodies within the limits, in the order that keeps bad input cheap: the
//! `Content-Type`, the `Content-Length` (before reading anything), the bytes as they stream in
//! (for bodies without a length), UTF-8, the nesting depth on the raw bytes (so a body nested
//! 100,000 deep is refused before a parser could recurse into it), and only then the JSON parse.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value;

use crate::body_checks::{self as checks, Refusal};
pub use crate::body_checks::{check_depth, inexact_integer};
use crate::options::Limits;
use crate::problem::{Kind, Problem};

/// `application/json`.
pub const JSON: &str = "application/json";
/// `application/merge-patch+json` (RFC 7396).
pub const MERGE_PATCH: &str = "application/merge-patch+json";

/// The media type of a request, lowercased, without parameters; 415 when it is missing, is not
/// one of `accepted`, or names a charset other than UTF-8.
pub fn content_type(
    headers: &HeaderMap,
    accepted: &[&'static str],
) -> Result<&'static str, Problem> {
    let unsupported = || {
        Problem::new(
            Kind::UnsupportedMediaType,
            format!("Content-Type must be one of: {}", accepted.join(", ")),
        )
    };
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unsupported)?;
    checks::media_type(value, accepted).ok_or_else(unsupported)
}

/// Reads the whole body, refusing more than `max_bytes` whether or not a `Content-Length` says
/// so.
pub async fn read(headers: &HeaderMap, body: Body, max_bytes: usize) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::new(
            Kind::BodyTooLarge,
            format!("the request body is larger than {max_bytes} bytes"),
        )
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len = len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Problem::new(Kind::InvalidParameter, "invalid Content-Length"))?;
        if len > max_bytes as u64 {
            return Err(too_large());
        }
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            Problem::new(
                Kind::InvalidJson,
                format!("cannot read the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > max_bytes {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Checks UTF-8 and depth, then parses JSON, then refuses integers a document cannot hold.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Value, Problem> {
    checks::parse(bytes, limits.max_json_depth).map_err(|refusal| match refusal {
        Refusal::Utf8 { valid_up_to } => Problem::new(
            Kind::InvalidUtf8,
            format!("the body is not UTF-8 (at byte {valid_up_to})"),
        ),
        Refusal::TooDeep => Problem::new(
            Kind::JsonTooDeep,
            format!(
                "the body nests arrays and objects deeper than {}",
                limits.max_json_depth
            ),
        ),
        Refusal::Syntax(e) => Problem::new(Kind::InvalidJson, e.to_string()),
        Refusal::InexactInteger(number) => Problem::new(
            Kind::NumberOutOfRange,
            format!(
                "the integer {} is outside what a document holds exactly ({} to {}): send it \
                 as a string, or as a number with a fraction or an exponent to store a double",
                number.chars().take(64).collect::<String>(),
                i64::MIN,
                u64::MAX
            ),
        ),
    })
}

/// Content type, size, UTF-8, depth and parse of a JSON request body.
pub async fn json(
    headers: &HeaderMap,
    body: Body,
    limits: &Limits,
    accepted: &[&'static str],
) -> Result<(&'static str, Value), Problem> {
    let media = content_type(headers, accepted)?;
    let bytes = read(headers, body, limits.max_body_bytes).await?;
    Ok((media, parse(&bytes, limits)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(
            check_depth(br#"{"a": "[[[[{{{{", "b": [1, [2]]}"#, 3),
            Some(3)
        );
        assert_eq!(check_depth(br#""\"[[[""#, 1), Some(0));
        assert_eq!(check_depth(b"[[[]]]", 2), None);
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(check_depth(deep.as_bytes(), 32), None);
    }

    #[test]
    fn content_types_are_checked_with_their_charset() {
        let mut h = HeaderMap::new();
        assert!(content_type(&h, &[JSON]).is_err());
        for (v, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/json; charset=\"UTF-8\"", true),
            ("application/json; charset=latin1", false),
            ("text/plain", false),
            ("application/merge-patch+json", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            assert_eq!(content_type(&h, &[JSON]).is_ok(), ok, "{v}");
        }
    }

    #[test]
    fn parse_refuses_bad_utf8_depth_and_syntax() {
        let l = Limits::default();
        assert_eq!(
            parse(b"{\"a\": \"\xff\"}", &l).unwrap_err().kind,
            Kind::InvalidUtf8
        );
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(
            parse(deep.as_bytes(), &l).unwrap_err().kind,
            Kind::JsonTooDeep
        );
        assert_eq!(parse(b"{\"a\": ", &l).unwrap_err().kind, Kind::InvalidJson);
        let big = parse(b"{\"a\": 123456789012345678901234567890}", &l).unwrap_err();
        assert_eq!(big.kind, Kind::NumberOutOfRange);
        assert!(
            big.detail.contains("123456789012345678901234567890"),
            "{}",
            big.detail
        );
        assert_eq!(
            parse(b"{\"a\": [1]}", &l).unwrap(),
            serde_json::json!({"a": [1]})
        );
    }

    #[test]
    fn integers_beyond_i64_and_u64_are_found_and_others_pass() {
        for ok in [
            r#"{"a": -9223372036854775808, "b": 18446744073709551615, "c": 0, "d": -0}"#,
            r#"{"a": 1e300, "b": 123456789012345678901234567890.5, "c": -1.5E-7}"#,
            r#"{"a": "123456789012345678901234567890", "b\"": "x\\"}"#,
            r#"[1, [2, {"k": 3}]]"#,
        ] {
            assert_eq!(inexact_integer(ok.as_bytes()), None, "{ok}");
        }
        for (bad, number) in [
            (
                r#"{"a": 123456789012345678901234567890}"#,
                "123456789012345678901234567890",
            ),
            (r#"[18446744073709551616]"#, "18446744073709551616"),
            (
                r#"{"s": "\"", "n": -9223372036854775809}"#,
                "-9223372036854775809",
            ),
        ] {
            assert_eq!(inexact_integer(bad.as_bytes()), Some(number), "{bad}");
        }
    }

    proptest! {
        /// The byte scan agrees with the depth of the parsed value.
        #[test]
        fn depth_scan_matches_the_parsed_depth(v in arb_json()) {
            fn depth(v: &Value) -> usize {
                match v {
                    Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                    Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
                    _ => 0,
                }
            }
            let text = serde_json::to_string(&v).unwrap();
            prop_assert_eq!(check_depth(text.as_bytes(), 1000), Some(depth(&v)));
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            "[\\[\\]{}\"\\\\a]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[\\[{\"a]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
