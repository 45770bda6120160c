//! [`Problem`]: the error answer of a request, as `application/problem+json` (RFC 9457) with a
//! stable `type` per [`Kind`]. Clients branch on `type`; `title` is fixed per kind and `detail`
//! says what was wrong with this request.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use causeway_core::ReadTimestamp;
use serde::Serialize;
use utoipa::ToSchema;

use crate::headers::READ_TIMESTAMP;

/// Every kind of error answer. The `type` of the problem is `urn:causeway:problem:<slug>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400: the body is not valid JSON, or not of the expected shape.
    InvalidJson,
    /// 400: the body is not UTF-8.
    InvalidUtf8,
    /// 400: the body nests arrays and objects deeper than `max_json_depth`.
    JsonTooDeep,
    /// 400: an integer beyond what a document holds exactly (below `i64::MIN`, above
    /// `u64::MAX`).
    NumberOutOfRange,
    /// 400: a collection name or document id is refused (length, characters, `.`/`..`).
    InvalidKey,
    /// 400: a path segment is not valid percent-encoded UTF-8.
    InvalidPath,
    /// 400: a document or patch is not a JSON object, or uses a reserved `$` field.
    InvalidDocument,
    /// 400: a query's filter, order, limit or cursor is refused.
    InvalidQuery,
    /// 400: a request header (`Causeway-After`, `Causeway-Request-Id`) or query parameter is
    /// invalid.
    InvalidParameter,
    /// 400: more mutations or keys than the limits allow.
    TooManyItems,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 403: the token does not allow this on this collection.
    Forbidden,
    /// 404: the document does not exist at the read timestamp.
    NotFound,
    /// 404: no such route.
    NoSuchRoute,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 410: the cursor's read timestamp is no longer retained; start the query again.
    CursorExpired,
    /// 410: a change stream's cursor is older than the history the cluster keeps.
    HistoryLost,
    /// 413: the request body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// 413: a document or patch is larger than `max_document_bytes`.
    DocumentTooLarge,
    /// 413: the transaction record is larger than the log accepts.
    TransactionTooLarge,
    /// 415: the `Content-Type` is not one the route takes.
    UnsupportedMediaType,
    /// 500: a bug or an unexpected failure.
    Internal,
    /// 502: a store node answered with an unexpected error.
    StoreError,
    /// 503: too many requests in flight.
    Overloaded,
    /// 429: the cluster's visibility is behind the log; writes are admitted at the rate it
    /// applies them, and this one did not get a turn in time.
    Throttled,
    /// 503: the log or the store nodes cannot be reached now.
    Unavailable,
    /// 503: the UST did not reach the `Causeway-After` token in time.
    CausalWaitTimeout,
    /// 412: a condition of the transaction (`If-Match`, `If-None-Match`, `conditions`) was
    /// false; the transaction aborted and changed nothing.
    ConditionFailed,
    /// 413: the transaction would have left a document over the size limit; it aborted and
    /// changed nothing.
    ResultTooLarge,
    /// 422: raw automerge changes that the document cannot take; the transaction aborted.
    ChangesRefused,
    /// 404: no retained transaction at this ts.
    NoSuchTransaction,
    /// 503: the transaction is in the log but its outcome was not known in time.
    OutcomeUnknown,
    /// 400: the request is not valid HTTP (a malformed header such as `Content-Length: abc`,
    /// method, target or version); the connection is closed.
    MalformedRequest,
    /// 408: the body did not arrive within `body_read_ms`; the connection is closed.
    RequestTimeout,
    /// 414: the request target is longer than the server reads; the connection is closed.
    UriTooLong,
    /// 431: the request head is larger than the server reads; the connection is closed.
    HeadersTooLarge,
    /// 429: the token sent more requests than its rate (`token_requests_per_s`) allows.
    RateLimited,
}

impl Kind {
    /// The stable slug of the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Kind::InvalidJson => "invalid_json",
            Kind::InvalidUtf8 => "invalid_utf8",
            Kind::JsonTooDeep => "json_too_deep",
            Kind::NumberOutOfRange => "number_out_of_range",
            Kind::InvalidKey => "invalid_key",
            Kind::InvalidPath => "invalid_path",
            Kind::InvalidDocument => "invalid_document",
            Kind::InvalidQuery => "invalid_query",
            Kind::InvalidParameter => "invalid_parameter",
            Kind::TooManyItems => "too_many_items",
            Kind::Unauthorized => "unauthorized",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not_found",
            Kind::NoSuchRoute => "no_such_route",
            Kind::MethodNotAllowed => "method_not_allowed",
            Kind::CursorExpired => "cursor_expired",
            Kind::HistoryLost => "history_lost",
            Kind::BodyTooLarge => "body_too_large",
            Kind::DocumentTooLarge => "document_too_large",
            Kind::TransactionTooLarge => "transaction_too_large",
            Kind::UnsupportedMediaType => "unsupported_media_type",
            Kind::Internal => "internal",
            Kind::StoreError => "store_error",
            Kind::Overloaded => "overloaded",
            Kind::Throttled => "throttled",
            Kind::Unavailable => "unavailable",
            Kind::CausalWaitTimeout => "causal_wait_timeout",
            Kind::ConditionFailed => "condition_failed",
            Kind::ResultTooLarge => "result_too_large",
            Kind::ChangesRefused => "changes_refused",
            Kind::NoSuchTransaction => "no_such_transaction",
            Kind::OutcomeUnknown => "outcome_unknown",
            Kind::MalformedRequest => "malformed_request",
            Kind::RequestTimeout => "request_timeout",
            Kind::UriTooLong => "uri_too_long",
            Kind::HeadersTooLarge => "headers_too_large",
            Kind::RateLimited => "rate_limited",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::InvalidJson
            | Kind::InvalidUtf8
            | Kind::JsonTooDeep
            | Kind::NumberOutOfRange
            | Kind::InvalidKey
            | Kind::InvalidPath
            | Kind::InvalidDocument
            | Kind::InvalidQuery
            | Kind::InvalidParameter
            | Kind::TooManyItems
            | Kind::MalformedRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound | Kind::NoSuchRoute => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::CursorExpired | Kind::HistoryLost => StatusCode::GONE,
            Kind::BodyTooLarge | Kind::DocumentTooLarge | Kind::TransactionTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Kind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Kind::StoreError => StatusCode::BAD_GATEWAY,
            Kind::Overloaded
            | Kind::Unavailable
            | Kind::CausalWaitTimeout
            | Kind::OutcomeUnknown => StatusCode::SERVICE_UNAVAILABLE,
            Kind::ConditionFailed => StatusCode::PRECONDITION_FAILED,
            Kind::ResultTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::ChangesRefused => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::NoSuchTransaction => StatusCode::NOT_FOUND,
            Kind::Throttled | Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Kind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Kind::UriTooLong => StatusCode::URI_TOO_LONG,
            Kind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::InvalidJson => "the body is not valid JSON of the expected shape",
            Kind::InvalidUtf8 => "the body is not UTF-8",
            Kind::JsonTooDeep => "the JSON nests too deep",
            Kind::NumberOutOfRange => "an integer a document cannot hold exactly",
            Kind::InvalidKey => "invalid collection name or document id",
            Kind::InvalidPath => "invalid path",
            Kind::InvalidDocument => "invalid document",
            Kind::InvalidQuery => "invalid query",
            Kind::InvalidParameter => "invalid header or parameter",
            Kind::TooManyItems => "too many mutations or keys",
            Kind::Unauthorized => "missing or invalid bearer token",
            Kind::Forbidden => "not allowed for this token",
            Kind::NotFound => "document not found",
            Kind::NoSuchRoute => "no such route",
            Kind::MethodNotAllowed => "method not allowed",
            Kind::CursorExpired => "the cursor has expired",
            Kind::HistoryLost => "the history after the cursor is gone",
            Kind::BodyTooLarge => "request body too large",
            Kind::DocumentTooLarge => "document too large",
            Kind::TransactionTooLarge => "transaction too large",
            Kind::UnsupportedMediaType => "unsupported content type",
            Kind::Internal => "internal error",
            Kind::StoreError => "store node error",
            Kind::Overloaded => "too many requests in flight",
            Kind::Throttled => "the cluster is behind; writes are throttled",
            Kind::Unavailable => "temporarily unavailable",
            Kind::CausalWaitTimeout => "the causal token was not reached in time",
            Kind::ConditionFailed => "a condition of the transaction is false; it aborted",
            Kind::ResultTooLarge => "the transaction would make a document too large; it aborted",
            Kind::ChangesRefused => {
                "the document cannot take these changes; the transaction aborted"
            }
            Kind::NoSuchTransaction => "no retained transaction at this ts",
            Kind::OutcomeUnknown => "the outcome of the transaction is not known yet",
            Kind::MalformedRequest => "the request is not valid HTTP",
            Kind::RequestTimeout => "the request body did not arrive in time",
            Kind::UriTooLong => "the request target is too long",
            Kind::HeadersTooLarge => "the request head is too large",
            Kind::RateLimited => "too many requests for this token",
        }
    }
}

/// An error answer. Build one with [`Problem::new`] and answer it with `into_response`.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: Kind,
    pub detail: String,
    /// Seconds, for the `Retry-After` header of a 429 or 503.
    pub retry_after_s: Option<u32>,
    /// The read timestamp, for a 404 of a read.
    pub read_ts: Option<ReadTimestamp>,
    /// The transaction's ts, for an answer about a transaction in the log.
    pub ts: Option<u64>,
    /// Why the transaction aborted.
    pub failures: Vec<FailureBody>,
    /// The answer is the original transaction's, to a retry with its idempotency key.
    pub replayed: bool,
}

/// One reason a transaction aborted.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FailureBody {
    pub collection: String,
    pub id: String,
    /// The index of the false condition in the transaction's `conditions` (the header
    /// conditions of a single-document write are condition 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<u32>,
    /// The version ts of the document found (0: it did not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found_version_ts: Option<u64>,
    /// For the size limit: the bytes the document would have had, and the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// For raw changes: why the document cannot take them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The body of an error answer (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemBody {
    /// `urn:causeway:problem:<slug>`, stable per kind of error.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The transaction's ts, when the answer is about a transaction in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// Why the transaction aborted (412, 413, 422).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureBody>,
}

impl Problem {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            retry_after_s: None,
            read_ts: None,
            ts: None,
            failures: Vec::new(),
            replayed: false,
        }
    }

    /// The answer is about the transaction at `ts` (also in `Causeway-Timestamp`).
    pub fn at_ts(mut self, ts: u64) -> Problem {
        self.ts = Some(ts);
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Problem {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            type_: format!("urn:causeway:problem:{}", self.kind.slug()),
            title: self.kind.title().into(),
            status: self.kind.status().as_u16(),
            detail: self.detail.clone(),
            ts: self.ts,
            failures: self.failures.clone(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (self.kind.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.kind == Kind::Unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"causeway\""),
            );
        }
        if let Some(ts) = self.ts {
            headers.insert(crate::headers::COMMIT_TIMESTAMP, HeaderValue::from(ts));
        }
        if self.replayed {
            headers.insert(
                crate::headers::IDEMPOTENT_REPLAYED,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(ts) = self.read_ts {
            if let Ok(v) = HeaderValue::from_str(&ts.to_string()) {
                headers.insert(READ_TIMESTAMP, v);
            }
        }
        response
    }
}
