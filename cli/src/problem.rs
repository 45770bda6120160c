//! An HTTP error answer as one line for the terminal: the `title` and `detail` of an
//! `application/problem+json` body (RFC 9457), which the api-server and the cdc service send,
//! else the start of whatever the body holds.

use reqwest::StatusCode;

/// The most bytes of an error body read: enough for any problem document.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// The most characters of a body that is not a problem document shown.
const MAX_SHOWN_CHARS: usize = 200;

/// The error of a refused request to `what` (e.g. `the cdc service at http://…`).
pub async fn refused(what: &str, response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let mut body = Vec::new();
    let mut response = response;
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    anyhow::anyhow!("{what}: {}", describe(status, &body))
}

/// `404 feed not found: no feed is named "x"`, on one line.
pub fn describe(status: StatusCode, body: &[u8]) -> String {
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(problem) if problem.is_object() => {
            let field = |name: &str| problem[name].as_str().map(one_line);
            match (field("title"), field("detail")) {
                (Some(title), Some(detail)) if !detail.is_empty() => format!("{title}: {detail}"),
                (Some(title), _) => title,
                (None, Some(detail)) => format!("{reason}: {detail}"),
                (None, None) => format!("{reason}: {}", one_line(&problem.to_string())),
            }
        }
        _ => {
            let body = one_line(&String::from_utf8_lossy(body));
            if body.is_empty() {
                reason
            } else {
                let mut shown: String = body.chars().take(MAX_SHOWN_CHARS).collect();
                if shown.len() < body.len() {
                    shown.push('…');
                }
                format!("{reason}: {shown}")
            }
        }
    };
    format!("{} {text}", status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_document_is_its_title_and_detail_on_one_line() {
        let body = br#"{"type":"https://causeway.dev/problems/feed_not_found","title":"feed not found","status":404,"detail":"no feed is named \"x\"\nat all"}"#;
        assert_eq!(
            describe(StatusCode::NOT_FOUND, body),
            r#"404 feed not found: no feed is named "x" at all"#
        );
        let body = br#"{"title":"forbidden","status":403}"#;
        assert_eq!(describe(StatusCode::FORBIDDEN, body), "403 forbidden");
        let body = br#"{"detail":"bad cursor"}"#;
        assert_eq!(
            describe(StatusCode::BAD_REQUEST, body),
            "400 bad request: bad cursor"
        );
    }

    #[test]
    fn another_body_is_shown_short_or_the_reason_alone() {
        assert_eq!(
            describe(StatusCode::BAD_GATEWAY, b"upstream\r\n down"),
            "502 bad gateway: upstream down"
        );
        assert_eq!(
            describe(StatusCode::SERVICE_UNAVAILABLE, b""),
            "503 service unavailable"
        );
        let long = describe(StatusCode::INTERNAL_SERVER_ERROR, &[b'x'; 1000]);
        assert!(long.ends_with('…') && long.len() < 300, "{long}");
    }
}
