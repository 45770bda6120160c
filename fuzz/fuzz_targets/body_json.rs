//! The api-server's body checks (`api-server/src/body_checks.rs`, built here by path): the
//! media type of `Content-Type`, and UTF-8, depth, JSON and exact integers of a body.
//!
//! Properties: the byte scan's depth is at least the depth of what the JSON parser built, and
//! equal on the parser's own output; a body that is accepted re-serialises to text that is
//! accepted too and parses equal (nothing is changed on the way); a refused integer is a token
//! of the text that no integer type holds; the media type does not depend on ASCII case.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "../../api-server/src/body_checks.rs"]
#[allow(dead_code)]
mod body_checks;

use body_checks::{check_depth, inexact_integer, media_type, parse, Refusal};

const MAX_DEPTH: usize = 32;

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    // The first line doubles as a Content-Type value.
    if let Ok(text) = std::str::from_utf8(data) {
        let line = text.lines().next().unwrap_or("");
        let accepted = ["application/json", "application/merge-patch+json"];
        let media = media_type(line, &accepted);
        assert_eq!(media, media_type(&line.to_ascii_uppercase(), &accepted));
        assert_eq!(media, media_type(&line.to_ascii_lowercase(), &accepted));
        if let Some(m) = media {
            assert!(line.trim_start().to_ascii_lowercase().starts_with(m));
        }
    }

    if let Some(token) = inexact_integer(data) {
        assert!(
            !token.is_empty() && !token.contains(['.', 'e', 'E']),
            "{token:?}"
        );
        assert!(token.parse::<i64>().is_err() && token.parse::<u64>().is_err());
        assert!(
            data.windows(token.len()).any(|w| w == token.as_bytes()),
            "the token is not in the text"
        );
    }

    // The scan never fails without a limit, and agrees with the parser on valid JSON. The text
    // may be deeper than its value, since a repeated key keeps only its last value
    // (`{"a": [[1]], "a": 1}`); the value's own text, without repeats, has exactly its depth.
    let scanned = check_depth(data, usize::MAX).expect("no limit");
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        assert!(scanned >= depth(&v), "depth scan below the parsed depth");
        let text = serde_json::to_vec(&v).expect("a parsed value serialises");
        assert_eq!(
            check_depth(&text, usize::MAX).expect("no limit"),
            depth(&v),
            "depth scan disagrees with the parse"
        );
    }

    match parse(data, MAX_DEPTH) {
        Ok(v) => {
            assert!(std::str::from_utf8(data).is_ok());
            assert!(depth(&v) <= MAX_DEPTH);
            let text = serde_json::to_vec(&v).expect("a parsed value serialises");
            match parse(&text, MAX_DEPTH) {
                Ok(again) => assert_eq!(again, v, "re-serialised body parses to another value"),
                Err(e) => panic!("the re-serialised body is refused: {e:?}"),
            }
        }
        Err(Refusal::Utf8 { valid_up_to }) => {
            assert_eq!(
                std::str::from_utf8(data).unwrap_err().valid_up_to(),
                valid_up_to
            );
        }
        Err(Refusal::TooDeep) => assert!(scanned > MAX_DEPTH),
        Err(Refusal::Syntax(_)) => assert!(serde_json::from_slice::<Value>(data).is_err()),
        Err(Refusal::InexactInteger(token)) => {
            assert_eq!(Some(token.as_str()), inexact_integer(data));
        }
    }
});
