//! The cdc service's admin API (JSON):
//! - `GET /v1/feeds`, `GET /v1/feeds/{name}`: specs (without secrets), states, checkpoints, lag;
//! - `POST /v1/feeds` (a feed spec): 201, 400 for a bad spec, 409 when the name exists;
//! - `POST /v1/feeds/{name}/pause`, `POST /v1/feeds/{name}/resume`, `DELETE /v1/feeds/{name}`;
//! - `GET /metrics`, `GET /healthz`.
//!
//! Changes need `Authorization: Bearer <admin_token>`; without an `admin_token` configured they
//! are refused (403). Errors are `application/problem+json`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::feed::FeedSpec;
use crate::service::{FeedError, Handle};

/// The largest feed spec accepted.
const MAX_BODY: usize = 64 << 10;

pub fn router(handle: Handle) -> Router {
    Router::new()
        .route("/v1/feeds", get(list).post(create))
        .route("/v1/feeds/{name}", get(show).delete(delete))
        .route("/v1/feeds/{name}/pause", post(pause))
        .route("/v1/feeds/{name}/resume", post(resume))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(handle)
}

fn problem(status: StatusCode, kind: &str, detail: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({
            "type": format!("https://causeway.dev/problems/{kind}"),
            "title": kind.replace('_', " "),
            "status": status.as_u16(),
            "detail": detail.into(),
        })),
    )
        .into_response()
}

fn feed_error(e: FeedError) -> Response {
    match &e {
        FeedError::Invalid(_) => problem(StatusCode::BAD_REQUEST, "invalid_feed", e.to_string()),
        FeedError::Exists(_) => problem(StatusCode::CONFLICT, "feed_exists", e.to_string()),
        FeedError::NotFound(_) => problem(StatusCode::NOT_FOUND, "feed_not_found", e.to_string()),
        FeedError::State(_) => {
            problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

/// The 401/403 of a request without the admin token (compared in constant time); `None` when
/// it carries it.
fn refusal(handle: &Handle, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = handle.admin_token() else {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the cdc service has no admin_token: feeds change only through its options file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "wrong admin token",
        )),
        None => Some(problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <admin token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

async fn list(State(h): State<Handle>) -> Response {
    Json(json!({ "feeds": h.list().await })).into_response()
}

async fn show(State(h): State<Handle>, Path(name): Path<String>) -> Response {
    match h.get(&name).await {
        Some(f) => Json(f).into_response(),
        None => feed_error(FeedError::NotFound(name)),
    }
}

async fn create(State(h): State<Handle>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    let spec: FeedSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_feed",
                format!("a feed spec: {e}"),
            )
        }
    };
    let name = spec.name.clone();
    match h.create(spec).await {
        Ok(()) => (StatusCode::CREATED, Json(h.get(&name).await)).into_response(),
        Err(e) => feed_error(e),
    }
}

async fn pause(State(h): State<Handle>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    match h.pause(&name).await {
        Ok(()) => Json(h.get(&name).await).into_response(),
        Err(e) => feed_error(e),
    }
}

async fn resume(State(h): State<Handle>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    match h.resume(&name).await {
        Ok(()) => Json(h.get(&name).await).into_response(),
        Err(e) => feed_error(e),
    }
}

async fn delete(State(h): State<Handle>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    match h.delete(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => feed_error(e),
    }
}

async fn metrics(State(h): State<Handle>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics_text().await,
    )
        .into_response()
}
