//! The pure checks of a request body (`body` reads the body and turns their refusals into
//! problems): the media type, and the JSON text's nesting depth and integers on the raw bytes
//! before and after the parse. This module uses only `std` and `serde_json`, so the fuzz targets
//! (`fuzz/`) build it on its own, without the server.

use serde_json::Value;

/// Why [`parse`] refused a body, in the order the checks run.
#[derive(Debug)]
pub enum Refusal {
    /// The bytes are not UTF-8; the first `valid_up_to` are.
    Utf8 { valid_up_to: usize },
    /// Arrays and objects nest deeper than the limit.
    TooDeep,
    /// The text is not JSON.
    Syntax(serde_json::Error),
    /// An integer the document model cannot hold exactly (see [`inexact_integer`]).
    InexactInteger(String),
}

/// The media type of a `Content-Type` value that is one of `accepted`: lowercased, without its
/// parameters; `None` when it is none of them or names a charset other than UTF-8.
pub fn media_type(value: &str, accepted: &[&'static str]) -> Option<&'static str> {
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    for param in parts {
        let (name, val) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset")
            && !val.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        {
            return None;
        }
    }
    accepted.iter().copied().find(|a| *a == essence)
}

/// The bytes of JSON text outside its strings, with their positions: each string, its quotes
/// and its contents (escapes honoured), is skipped.
fn outside_strings(bytes: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    bytes.iter().copied().enumerate().filter(move |&(_, b)| {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            false
        } else {
            in_string = b == b'"';
            !in_string
        }
    })
}

/// The deepest nesting of arrays and objects in JSON text, or `None` as soon as it passes
/// `max`. Works on the raw bytes, without recursion.
pub fn check_depth(bytes: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (_, b) in outside_strings(bytes) {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return None;
                }
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Some(deepest)
}

/// The first integer in JSON text (a number without a fraction or an exponent) that the document
/// model cannot hold exactly: below `i64::MIN` or above `u64::MAX`. A JSON parser would turn it
/// into the nearest double, and the document would keep another number than the one sent.
/// Works on the raw bytes of text that parsed.
pub fn inexact_integer(bytes: &[u8]) -> Option<&str> {
    let in_number = |b: u8| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9');
    let mut start = None;
    // A byte past the end closes a number that ends the text.
    for (i, b) in outside_strings(bytes).chain([(bytes.len(), b' ')]) {
        match start {
            None if b == b'-' || b.is_ascii_digit() => start = Some(i),
            Some(from) if !in_number(b) => {
                start = None;
                let token = std::str::from_utf8(&bytes[from..i]).ok()?;
                let integer = !token.contains(['.', 'e', 'E']);
                if integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                    return Some(token);
                }
            }
            _ => {}
        }
    }
    None
}

/// Checks UTF-8 and depth (at most `max_depth`), then parses JSON, then refuses integers a
/// document cannot hold exactly.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, Refusal> {
    std::str::from_utf8(bytes).map_err(|e| Refusal::Utf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    check_depth(bytes, max_depth).ok_or(Refusal::TooDeep)?;
    let value: Value = serde_json::from_slice(bytes).map_err(Refusal::Syntax)?;
    if let Some(number) = inexact_integer(bytes) {
        return Err(Refusal::InexactInteger(number.to_owned()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number with a fraction is kept as the double nearest to it: the JSON parser's fast
    /// default was one unit in the last place off for this one (found by the `body_json` fuzz
    /// target), so the document kept 7778888888888886.
    #[test]
    fn doubles_are_parsed_exactly() {
        for (text, expected) in [
            ("[7778888888888887.0]", 7778888888888887.0f64),
            ("[7778888888888887E0]", 7778888888888887.0),
            ("[0.1]", 0.1),
            ("[2.2250738585072014e-308]", 2.2250738585072014e-308),
        ] {
            let v = parse(text.as_bytes(), 4).unwrap();
            assert_eq!(
                v[0].as_f64().unwrap().to_bits(),
                expected.to_bits(),
                "{text}"
            );
            let again = serde_json::to_vec(&v).unwrap();
            assert_eq!(parse(&again, 4).unwrap(), v, "{text}");
        }
    }

    #[test]
    fn media_types_ignore_case_and_refuse_other_charsets() {
        let accepted = ["application/json"];
        assert_eq!(
            media_type(" Application/JSON ; charset=\"utf-8\"", &accepted),
            Some("application/json")
        );
        assert_eq!(
            media_type("application/json; charset=latin1", &accepted),
            None
        );
        assert_eq!(media_type("application/jsonx", &accepted), None);
    }
}
