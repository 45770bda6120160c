//! The HTTP routes: handlers, request and answer bodies (with their OpenAPI schemas), and the
//! middleware that counts, times and bounds requests.
//!
//! Every handler checks in the same order, so bad input is refused before it costs anything:
//! the token (401), the path (400), the permission (403), the body's type, size, UTF-8 and depth
//! (415, 413, 400), its shape and limits (400, 413); only then does a write reach the log or a
//! read reach a store node.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedSemaphorePermit;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use causeway_core::query::Query;
use causeway_core::{DocKey, Epoch, KeyHash, ReadTimestamp, Timestamp};
use causeway_proto::v1 as pb;
use causeway_proto::v1::mutation::Op;
use causeway_txlog::codec;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::Code;
use utoipa::ToSchema;

use crate::auth::{Access, Principal};
use crate::body::{self, JSON, MERGE_PATCH};
use crate::headers::{self, COMMIT_TIMESTAMP, READ_TIMESTAMP};
use crate::outcome;
use crate::problem::{Kind, Problem, ProblemBody};
use crate::service::Shared;
use causeway_config_manager::StoreError;

/// The longest query cursor accepted, in bytes.
const MAX_CURSOR_BYTES: usize = 4096;
/// The field of a PATCH body that holds counter increments.
const INCREMENT: &str = "$increment";

type AppState = Arc<Shared>;

/// The router of every endpoint, with its middleware.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/collections/{collection}/documents/{id}",
            get(get_document)
                .put(put_document)
                .patch(patch_document)
                .delete(delete_document),
        )
        .route(
            "/v1/collections/{collection}/documents:get",
            post(get_collection_documents),
        )
        .route("/v1/documents:get", post(get_documents))
        .route("/v1/collections/{collection}/query", post(query))
        .route("/v1/transactions", post(transaction))
        .route("/v1/transactions/{ts}", get(get_transaction))
        .route("/v1/changes", get(crate::changes::all_changes))
        .route(
            "/v1/collections/{collection}/changes",
            get(crate::changes::collection_changes),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// The answer to a write.
#[derive(Debug, Serialize, ToSchema)]
pub struct WriteResponse {
    /// The commit ts of the transaction (also in the `Causeway-Timestamp` header). Send it as
    /// `Causeway-After` to read your writes through any api-server.
    pub ts: u64,
    /// `"committed"`, when the write waited for its outcome (a conditional write, an
    /// `Idempotency-Key`, `?wait=outcome` or `?wait=visible`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// With `?wait=visible`: whether a read coordinated by any store node sees the write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible: Option<bool>,
}

/// One document of a multi-get or a query page.
#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentResult {
    pub collection: String,
    pub id: String,
    /// False when the document does not exist at the read timestamp.
    pub found: bool,
    /// The ts of the transaction that wrote this version, when found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_ts: Option<u64>,
    /// The document, when found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<Value>,
}

/// A key of `POST /v1/documents:get`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub collection: String,
    pub id: String,
}

/// `POST /v1/documents:get`: documents of any collections, read at one timestamp.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MultiGetRequest {
    pub keys: Vec<KeyRequest>,
}

/// `POST /v1/collections/{collection}/documents:get`: documents of one collection.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectionGetRequest {
    pub ids: Vec<String>,
}

/// The answer of a multi-get: one result per requested key, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct MultiGetResponse {
    /// `<epoch>.<ts>`, also in the `Causeway-Read-Timestamp` header.
    pub read_timestamp: String,
    pub documents: Vec<DocumentResult>,
}

/// The sort order of a query.
#[derive(Debug, Deserialize, ToSchema)]
pub struct OrderRequest {
    /// A dotted field path.
    pub path: String,
    #[serde(default)]
    pub descending: bool,
}

/// `POST /v1/collections/{collection}/query`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct QueryRequestBody {
    /// The filter (see API.md): `{"field": value}`, `$eq $ne $gt $gte $lt $lte $in $nin
    /// $exists $not`, `$and`, `$or`, dotted paths. Absent: every document.
    #[serde(default)]
    pub filter: Option<Value>,
    pub order: Option<OrderRequest>,
    /// Documents per page; absent: the server's maximum (`max_query_limit`).
    pub limit: Option<u32>,
    /// The cursor of the previous page: the next page runs at the same read timestamp.
    pub cursor: Option<String>,
}

/// A page of query results.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueryResponseBody {
    pub read_timestamp: String,
    pub documents: Vec<DocumentResult>,
    /// Present when there may be more: send it back for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// True when the page stopped at the work limit (`max_query_scanned`) rather than at the
    /// limit or the end; continue with the cursor.
    pub partial: bool,
    /// Documents examined for this page.
    pub scanned: u32,
}

/// One mutation of `POST /v1/transactions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum MutationRequest {
    /// Replace the whole document.
    Replace {
        collection: String,
        id: String,
        document: Value,
    },
    /// Apply an RFC 7396 JSON Merge Patch (creating the document if absent).
    MergePatch {
        collection: String,
        id: String,
        patch: Value,
    },
    /// Add `delta` to the counter at the dotted `path` (created at 0 if absent).
    Increment {
        collection: String,
        id: String,
        path: String,
        delta: i64,
    },
    /// Delete the document.
    Delete { collection: String, id: String },
}

/// `POST /v1/transactions`: mutations over any documents, applied atomically in order as one
/// log record.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionRequest {
    pub mutations: Vec<MutationRequest>,
    /// Evaluated on the documents as they are just before the transaction; one false condition
    /// aborts it whole (412, naming each false condition). A transaction with conditions
    /// answers once its outcome is known.
    #[serde(default)]
    pub conditions: Vec<ConditionRequest>,
}

/// A condition of `POST /v1/transactions` on one document: every field given must hold.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionRequest {
    pub collection: String,
    pub id: String,
    /// The document exists (true) or does not (false).
    #[serde(default)]
    pub exists: Option<bool>,
    /// The document's version ts (the ETag a read answers) is this; 0: it does not exist.
    #[serde(default)]
    pub version_ts: Option<u64>,
    /// A query filter (the language of queries) the document matches; an absent document
    /// matches no filter.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Value>,
}

// ---------------------------------------------------------------------------------------------
// Documents

#[utoipa::path(
    get,
    path = "/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("id" = String, Path, description = "Document id"),
        ("Causeway-After" = Option<String>, Header, description = "Causal token: read at a ts at least this"),
    ),
    responses(
        (status = 200, description = "The document", body = serde_json::Value,
            headers(("Causeway-Read-Timestamp" = String, description = "<epoch>.<ts> of the read"))),
        (status = 400, description = "Invalid key or header", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "Not found at the read timestamp", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable or causal wait timed out", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_document(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let key = s.key_from_path(path)?;
    principal.require(Access::Read, key.collection())?;
    let min_ts = s.causal_token(&headers).await?;
    let (at, mut documents) = s.read(vec![key], min_ts).await?;
    let doc = documents
        .pop()
        .ok_or_else(|| Problem::new(Kind::StoreError, "the store node answered no document"))?;
    if !doc.found {
        let mut p = Problem::new(Kind::NotFound, "no such document at the read timestamp");
        p.read_ts = Some(at);
        return Err(p);
    }
    let mut response = (StatusCode::OK, doc.json).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    h.insert(READ_TIMESTAMP, header_value(&at.to_string()));
    h.insert(
        header::ETAG,
        header_value(&format!("\"{}\"", doc.version_ts)),
    );
    Ok(response)
}

#[utoipa::path(
    put,
    path = "/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("id" = String, Path, description = "Document id"),
        ("wait" = Option<String>, Query, description = "`visible`: wait until the write is visible to reads (bounded)"),
        ("Causeway-Request-Id" = Option<String>, Header, description = "Client request id, recorded for idempotent retries"),
    ),
    request_body(content = serde_json::Value, content_type = "application/json",
        description = "The whole document: a JSON object; top-level fields starting with '$' are reserved"),
    responses(
        (status = 200, description = "Committed", body = WriteResponse,
            headers(("Causeway-Timestamp" = u64, description = "The commit ts"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Throttled by admission control: the cluster's visibility is behind the log", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn put_document(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let key = s.key_from_path(path)?;
    principal.require(Access::Write, key.collection())?;
    let write = s.write_request(&headers, query.as_deref(), Some(&key))?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[JSON]).await?;
    let json = s.document_bytes(value, "document")?;
    let mutation = mutation(&key, Op::Replace(pb::Replace { json }));
    s.commit(vec![mutation], write, &principal).await
}

#[utoipa::path(
    patch,
    path = "/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("id" = String, Path, description = "Document id"),
        ("wait" = Option<String>, Query, description = "`visible`: wait until the write is visible to reads (bounded)"),
        ("Causeway-Request-Id" = Option<String>, Header, description = "Client request id, recorded for idempotent retries"),
    ),
    request_body(content = serde_json::Value, content_type = "application/merge-patch+json",
        description = "An RFC 7396 JSON Merge Patch (application/merge-patch+json or application/json). \
            A top-level \"$increment\": {\"path.to.counter\": delta} adds integer deltas to counters after the patch"),
    responses(
        (status = 200, description = "Committed", body = WriteResponse,
            headers(("Causeway-Timestamp" = u64, description = "The commit ts"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Throttled by admission control: the cluster's visibility is behind the log", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn patch_document(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let key = s.key_from_path(path)?;
    principal.require(Access::Write, key.collection())?;
    let write = s.write_request(&headers, query.as_deref(), Some(&key))?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[MERGE_PATCH, JSON]).await?;
    let Value::Object(mut patch) = value else {
        return Err(Problem::new(
            Kind::InvalidDocument,
            "a merge patch must be a JSON object",
        ));
    };
    let increments = match patch.remove(INCREMENT) {
        None => Vec::new(),
        Some(Value::Object(incs)) => incs
            .into_iter()
            .map(|(path, delta)| {
                let delta = delta.as_i64().ok_or_else(|| {
                    Problem::new(
                        Kind::InvalidDocument,
                        format!("the increment of {path:?} must be an integer within 64 bits"),
                    )
                })?;
                Ok((s.counter_path(&path)?, delta))
            })
            .collect::<Result<Vec<_>, Problem>>()?,
        Some(_) => {
            return Err(Problem::new(
                Kind::InvalidDocument,
                "\"$increment\" must be an object of \"path.to.counter\": integer delta",
            ))
        }
    };
    if increments.len() + 1 > s.options.limits.max_mutations_per_transaction {
        return Err(Problem::new(
            Kind::TooManyItems,
            format!(
                "at most {} mutations per transaction",
                s.options.limits.max_mutations_per_transaction
            ),
        ));
    }
    let mut mutations = Vec::with_capacity(increments.len() + 1);
    if !patch.is_empty() || increments.is_empty() {
        let json = s.document_bytes(Value::Object(patch), "merge patch")?;
        mutations.push(mutation(&key, Op::MergePatch(pb::MergePatch { json })));
    }
    for (path, delta) in increments {
        mutations.push(mutation(&key, Op::Increment(pb::Increment { path, delta })));
    }
    s.commit(mutations, write, &principal).await
}

#[utoipa::path(
    delete,
    path = "/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("id" = String, Path, description = "Document id"),
        ("wait" = Option<String>, Query, description = "`visible`: wait until the write is visible to reads (bounded)"),
        ("Causeway-Request-Id" = Option<String>, Header, description = "Client request id, recorded for idempotent retries"),
    ),
    responses(
        (status = 200, description = "Committed (whether or not the document existed)", body = WriteResponse,
            headers(("Causeway-Timestamp" = u64, description = "The commit ts"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Throttled by admission control: the cluster's visibility is behind the log", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn delete_document(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let key = s.key_from_path(path)?;
    principal.require(Access::Write, key.collection())?;
    let write = s.write_request(&headers, query.as_deref(), Some(&key))?;
    let mutation = mutation(&key, Op::Delete(pb::Delete {}));
    s.commit(vec![mutation], write, &principal).await
}

// ---------------------------------------------------------------------------------------------
// Multi-get, query, transactions

#[utoipa::path(
    post,
    path = "/v1/documents:get",
    tag = "documents",
    params(("Causeway-After" = Option<String>, Header, description = "Causal token: read at a ts at least this")),
    request_body(content = MultiGetRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The documents, at one read timestamp", body = MultiGetResponse,
            headers(("Causeway-Read-Timestamp" = String, description = "<epoch>.<ts> of the read"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable or causal wait timed out", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_documents(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let min_ts = s.causal_token(&headers).await?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[JSON]).await?;
    let request: MultiGetRequest = shape(value)?;
    s.check_key_count(request.keys.len())?;
    let keys = request
        .keys
        .iter()
        .map(|k| {
            let key = s.key(&k.collection, &k.id)?;
            principal.require(Access::Read, key.collection())?;
            Ok(key)
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    s.multi_get(keys, min_ts).await
}

#[utoipa::path(
    post,
    path = "/v1/collections/{collection}/documents:get",
    tag = "documents",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("Causeway-After" = Option<String>, Header, description = "Causal token: read at a ts at least this"),
    ),
    request_body(content = CollectionGetRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The documents, at one read timestamp", body = MultiGetResponse,
            headers(("Causeway-Read-Timestamp" = String, description = "<epoch>.<ts> of the read"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable or causal wait timed out", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_collection_documents(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let collection = s.collection_from_path(path)?;
    principal.require(Access::Read, &collection)?;
    let min_ts = s.causal_token(&headers).await?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[JSON]).await?;
    let request: CollectionGetRequest = shape(value)?;
    s.check_key_count(request.ids.len())?;
    let keys = request
        .ids
        .iter()
        .map(|id| s.key(&collection, id))
        .collect::<Result<Vec<_>, Problem>>()?;
    s.multi_get(keys, min_ts).await
}

#[utoipa::path(
    post,
    path = "/v1/collections/{collection}/query",
    tag = "query",
    params(
        ("collection" = String, Path, description = "Collection name"),
        ("Causeway-After" = Option<String>, Header, description = "Causal token: read at a ts at least this"),
    ),
    request_body(content = QueryRequestBody, content_type = "application/json"),
    responses(
        (status = 200, description = "A page of matching documents", body = QueryResponseBody,
            headers(("Causeway-Read-Timestamp" = String, description = "<epoch>.<ts> of the read"))),
        (status = 400, description = "Invalid query", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "The cursor expired", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable or causal wait timed out", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn query(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let collection = s.collection_from_path(path)?;
    principal.require(Access::Read, &collection)?;
    let min_ts = s.causal_token(&headers).await?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[JSON]).await?;
    let Value::Object(mut fields) = value else {
        return Err(Problem::new(
            Kind::InvalidQuery,
            "a query must be a JSON object",
        ));
    };
    let cursor = match fields.remove("cursor") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(c)) if c.len() <= MAX_CURSOR_BYTES => c,
        Some(_) => {
            return Err(Problem::new(
                Kind::InvalidQuery,
                format!("cursor must be a string of at most {MAX_CURSOR_BYTES} bytes"),
            ))
        }
    };
    let limits = &s.options.limits;
    let mut parsed = Query::parse(&Value::Object(fields), &limits.query)
        .map_err(|e| Problem::new(Kind::InvalidQuery, e.to_string()))?;
    match parsed.limit {
        Some(l) if l > limits.max_query_limit => {
            return Err(Problem::new(
                Kind::InvalidQuery,
                format!("limit must be at most {}", limits.max_query_limit),
            ))
        }
        Some(_) => {}
        None => parsed.limit = Some(limits.max_query_limit),
    }
    let query_json = serde_json::to_string(&parsed)
        .map_err(|e| Problem::new(Kind::Internal, format!("cannot encode the query: {e}")))?;
    let timeouts = s.options.timeouts;
    let has_cursor = !cursor.is_empty();
    let request = pb::QueryRequest {
        collection: collection.clone(),
        query: query_json,
        cursor,
        min_ts: min_ts.get(),
        timeout_ms: timeouts.causal_wait_ms,
        at_ts: None,
        max_scanned: limits.max_query_scanned,
    };
    let deadline = s.read_deadline();
    let response = s
        .store
        .call_hedged(|mut c| {
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(deadline);
            async move { c.query(req).await.map(tonic::Response::into_inner) }
        })
        .await
        .map_err(|e| s.store_problem(e, min_ts, has_cursor))?;
    let at = read_ts(response.at)?;
    let documents = response
        .documents
        .into_iter()
        .map(document_result)
        .collect::<Result<Vec<_>, _>>()?;
    let body = QueryResponseBody {
        read_timestamp: at.to_string(),
        documents,
        cursor: response.cursor,
        partial: response.partial,
        scanned: response.scanned,
    };
    Ok(json_response(StatusCode::OK, &body, Some(at)))
}

#[utoipa::path(
    post,
    path = "/v1/transactions",
    tag = "transactions",
    params(
        ("wait" = Option<String>, Query, description = "`visible`: wait until the write is visible to reads (bounded)"),
        ("Causeway-Request-Id" = Option<String>, Header, description = "Client request id, recorded for idempotent retries"),
    ),
    request_body(content = TransactionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Committed, atomically", body = WriteResponse,
            headers(("Causeway-Timestamp" = u64, description = "The commit ts"))),
        (status = 400, description = "Invalid input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Throttled by admission control: the cluster's visibility is behind the log", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The log is unavailable", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn transaction(
    State(s): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let mut write = s.write_request(&headers, query.as_deref(), None)?;
    let (_, value) = body::json(&headers, body, &s.options.limits, &[JSON]).await?;
    // Count before the shape is parsed: a huge array is refused without building every item.
    let limits = &s.options.limits;
    for (field, max) in [
        ("mutations", limits.max_mutations_per_transaction),
        ("conditions", limits.max_conditions_per_transaction),
    ] {
        if value
            .get(field)
            .and_then(Value::as_array)
            .is_some_and(|items| items.len() > max)
        {
            return Err(Problem::new(
                Kind::TooManyItems,
                format!("at most {max} {field} per transaction"),
            ));
        }
    }
    let request: TransactionRequest = shape(value)?;
    if request.mutations.is_empty() {
        return Err(Problem::new(
            Kind::InvalidJson,
            "a transaction needs at least one mutation",
        ));
    }
    let mut mutations = Vec::with_capacity(request.mutations.len());
    for m in request.mutations {
        let (collection, id) = match &m {
            MutationRequest::Replace { collection, id, .. }
            | MutationRequest::MergePatch { collection, id, .. }
            | MutationRequest::Increment { collection, id, .. }
            | MutationRequest::Delete { collection, id } => (collection, id),
        };
        let key = s.key(collection, id)?;
        principal.require(Access::Write, key.collection())?;
        let op = match m {
            MutationRequest::Replace { document, .. } => Op::Replace(pb::Replace {
                json: s.document_bytes(document, "document")?,
            }),
            MutationRequest::MergePatch { patch, .. } => {
                if !patch.is_object() {
                    return Err(Problem::new(
                        Kind::InvalidDocument,
                        "a merge patch must be a JSON object",
                    ));
                }
                Op::MergePatch(pb::MergePatch {
                    json: s.document_bytes(patch, "merge patch")?,
                })
            }
            MutationRequest::Increment { path, delta, .. } => Op::Increment(pb::Increment {
                path: s.counter_path(&path)?,
                delta,
            }),
            MutationRequest::Delete { .. } => Op::Delete(pb::Delete {}),
        };
        mutations.push(mutation(&key, op));
    }
    for c in request.conditions {
        let key = s.key(&c.collection, &c.id)?;
        principal.require(Access::Read, key.collection())?;
        write
            .conditions
            .push(s.condition(&key, c.exists, c.version_ts, c.filter)?);
    }
    s.commit(mutations, write, &principal).await
}

/// The answer of `GET /v1/transactions/{ts}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionOutcome {
    pub ts: u64,
    /// `committed`, `aborted`, `duplicate` (a retry that changed nothing; see `duplicate_of`)
    /// or `pending` (in the log, not yet decided by the nodes asked).
    pub outcome: String,
    /// Why it aborted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<crate::problem::FailureBody>,
    /// For a duplicate: the ts of the transaction it repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/v1/transactions/{ts}",
    tag = "transactions",
    params(("ts" = u64, Path, description = "The transaction's ts (the `ts` of its write answer)")),
    responses(
        (status = 200, description = "The outcome", body = TransactionOutcome),
        (status = 202, description = "In the log, not decided yet", body = TransactionOutcome),
        (status = 400, description = "Invalid ts", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No retained transaction at this ts", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The store nodes cannot be reached", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_transaction(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let principal = s.tokens.authenticate(&headers)?;
    let Path(text) = path.map_err(|e| Problem::new(Kind::InvalidPath, e.body_text()))?;
    let ts = text
        .parse::<u64>()
        .ok()
        .filter(|ts| (1..=i64::MAX as u64).contains(ts))
        .ok_or_else(|| {
            Problem::new(
                Kind::InvalidPath,
                "a transaction ts is an integer from 1 to 2^63 - 1",
            )
        })?;
    if let Err(next) = s.in_log(Timestamp(ts)).await? {
        return Err(Problem::new(
            Kind::NoSuchTransaction,
            format!("ts {ts} is past the end of the transaction log (next ts {next})"),
        ));
    }
    if !s.store.has_nodes() {
        return Err(
            Problem::new(Kind::Unavailable, "no store node is known yet")
                .retry_after(s.options.timeouts.retry_after_s),
        );
    }
    let (status, outcome) = match outcome::lookup(&s.store, Timestamp(ts)).await {
        outcome::Lookup::Decided(o) => (StatusCode::OK, o),
        outcome::Lookup::Pending => {
            let body = TransactionOutcome {
                ts,
                outcome: "pending".into(),
                failures: Vec::new(),
                duplicate_of: None,
            };
            return Ok(json_response(StatusCode::ACCEPTED, &body, None));
        }
        outcome::Lookup::Unknown { pruned } => {
            return Err(Problem::new(
                Kind::NoSuchTransaction,
                if pruned {
                    format!("the outcome of ts {ts} is no longer retained")
                } else {
                    format!("no transaction that wrote documents is retained at ts {ts}")
                },
            ))
        }
    };
    // The reasons name documents: only those of collections the token may read.
    let failures = outcome::failures(&outcome)
        .into_iter()
        .filter(|f| principal.allows(Access::Read, &f.collection))
        .collect();
    let body = TransactionOutcome {
        ts,
        outcome: if outcome.duplicate_of != 0 {
            "duplicate"
        } else if outcome.committed {
            "committed"
        } else {
            "aborted"
        }
        .into(),
        failures,
        duplicate_of: (outcome.duplicate_of != 0).then_some(outcome.duplicate_of),
    };
    Ok(json_response(status, &body, None))
}

// ---------------------------------------------------------------------------------------------
// Operations

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This OpenAPI 3 document", content_type = "application/json"))
)]
async fn openapi(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
        s.openapi_json.clone(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process serves HTTP"))
)]
async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}), None)
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Store nodes are known: reads and writes can be served"),
        (status = 503, description = "Not ready yet", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(s): State<AppState>) -> Response {
    if s.store.has_nodes() {
        json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ready"}),
            None,
        )
    } else {
        Problem::new(
            Kind::Unavailable,
            "no routing configuration with store nodes is known yet",
        )
        .retry_after(s.options.timeouts.retry_after_s)
        .into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"))
)]
async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn no_route() -> Problem {
    Problem::new(Kind::NoSuchRoute, "no such route; see /v1/openapi.json")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        Kind::MethodNotAllowed,
        "this route does not take this method",
    )
}

/// Counts and times every request by route pattern and status, and bounds it, in this order:
///
/// 1. The body is read whole first (at most `max_body_bytes`, within `body_read_ms`: 413 or
///    408, and the connection is closed, since the rest of the body is not read). A handler
///    that refuses a request before looking at its body (401, 403) so leaves no unread bytes on
///    a keep-alive connection, and the request holds no place while its body trickles in.
/// 2. A token's request rate (`token_requests_per_s`): 429 `rate_limited`.
/// 3. `/v1` requests past `max_concurrent_requests` get 503 at once (load shedding rather than
///    queueing).
async fn observe(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = match *request.method() {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let refuse = |response: Response| {
        s.metrics
            .observe(&route, method, response.status().as_u16(), start.elapsed());
        response
    };
    let limited = route.starts_with("/v1/") && route != "/v1/openapi.json";
    // A request without a valid token costs nothing but its connection: refused before its
    // body is held or counted against any limit, the body drained (not kept) so that a
    // keep-alive connection can carry the next request.
    if limited {
        if let Err(problem) = s.tokens.authenticate(request.headers()) {
            let drained = drain(&s, request.into_body()).await;
            let mut response = problem.into_response();
            if !drained {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return refuse(response);
        }
    }
    let (request, _body_bytes) = match whole_body(&s, request).await {
        Ok(read) => read,
        Err(problem) => {
            // The rest of the body was not read: the connection cannot carry another request.
            let mut response = problem.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return refuse(response);
        }
    };
    let rated = s.options.limits.token_requests_per_s > 0;
    if let Some(Ok(principal)) = rated.then(|| s.tokens.authenticate(request.headers())) {
        if let Err(wait) = s.rate.take(&principal.name, Instant::now()) {
            let retry_s = u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX);
            let rate = s.options.limits.token_requests_per_s;
            return refuse(
                Problem::new(
                    Kind::RateLimited,
                    format!(
                        "token {:?} may send {rate} requests per second: retry after {retry_s} s",
                        principal.name
                    ),
                )
                .retry_after(retry_s)
                .into_response(),
            );
        }
    }
    let permit = if limited {
        match s.in_flight.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return refuse(
                    Problem::new(Kind::Overloaded, "too many requests in flight; retry later")
                        .retry_after(s.options.timeouts.retry_after_s)
                        .into_response(),
                );
            }
        }
    } else {
        None
    };
    let _in_flight = InFlight::new(&s);
    let response = next.run(request).await;
    drop(permit);
    s.metrics
        .observe(&route, method, response.status().as_u16(), start.elapsed());
    response
}

/// `request` with its body read whole (a request without a body as it is): at most
/// `max_body_bytes` (413), within `body_read_ms` (408), in room reserved of
/// `max_buffered_body_bytes` (503 when there is none), which the answer's permit holds.
async fn whole_body(
    s: &Shared,
    request: Request,
) -> Result<(Request, Option<OwnedSemaphorePermit>), Problem> {
    use axum::body::HttpBody;
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return Ok((Request::from_parts(parts, body), None));
    }
    let max = s.options.limits.max_body_bytes;
    // A declared length past the limit is refused by `body::read` without reading.
    let reserve = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(max, |n| n.min(max));
    let room = u32::try_from(reserve.max(1))
        .ok()
        .and_then(|n| Arc::clone(&s.body_bytes).try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            Problem::new(
                Kind::Overloaded,
                "too many request bodies held at once (limits.max_buffered_body_bytes); retry later",
            )
            .retry_after(s.options.timeouts.retry_after_s)
        })?;
    let limit = s.options.timeouts.body_read_ms;
    let read = body::read(&parts.headers, body, s.options.limits.max_body_bytes);
    let bytes = tokio::time::timeout(std::time::Duration::from_millis(limit), read)
        .await
        .map_err(|_| {
            Problem::new(
                Kind::RequestTimeout,
                format!("the request body did not arrive within {limit} ms"),
            )
        })??;
    Ok((Request::from_parts(parts, Body::from(bytes)), Some(room)))
}

/// Reads `body` to its end without keeping it: at most `max_body_bytes`, within
/// `body_read_ms`. False when it did not end so (the connection must close).
async fn drain(s: &Shared, body: Body) -> bool {
    use axum::body::HttpBody;
    use futures::StreamExt;
    let max = s.options.limits.max_body_bytes;
    if body.size_hint().lower() > max as u64 {
        return false;
    }
    let limit = std::time::Duration::from_millis(s.options.timeouts.body_read_ms);
    let read = async {
        let mut stream = body.into_data_stream();
        let mut seen = 0usize;
        while let Some(chunk) = stream.next().await {
            seen += chunk.map_err(|_| ())?.len();
            if seen > max {
                return Err(());
            }
        }
        Ok(())
    };
    matches!(tokio::time::timeout(limit, read).await, Ok(Ok(())))
}

/// Keeps the in-flight gauge right when a request's future is dropped (client gone).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(s: &'a Shared) -> InFlight<'a> {
        s.metrics.request_started();
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.request_finished();
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the handlers

impl Shared {
    /// The `Causeway-After` of a request. A token at or past the end of the log names no
    /// transaction, so waiting for it could only time out: it is refused at once (400). Only a
    /// token past the end this server already knows costs a `bounds()` call.
    async fn causal_token(&self, headers: &HeaderMap) -> Result<Timestamp, Problem> {
        let min_ts = headers::after(headers)?;
        if min_ts == Timestamp::ZERO {
            return Ok(min_ts);
        }
        if let Err(next) = self.in_log(min_ts).await? {
            return Err(Problem::new(
                Kind::InvalidParameter,
                format!(
                    "Causeway-After {} is past the end of the transaction log (next ts {next}): \
                     no such transaction",
                    min_ts.get()
                ),
            ));
        }
        Ok(min_ts)
    }

    /// Whether `ts` names a record of the log: `Err(next ts)` when it is past the end.
    async fn in_log(&self, ts: Timestamp) -> Result<Result<(), u64>, Problem> {
        if ts.get() < self.log_next.load(Ordering::Relaxed) {
            return Ok(Ok(()));
        }
        let bounds = self.log.bounds().await.map_err(|e| {
            tracing::warn!(error = %e, "log bounds failed");
            Problem::new(Kind::Unavailable, "the transaction log is unavailable")
                .retry_after(self.options.timeouts.retry_after_s)
        })?;
        let next = bounds.next.get();
        self.log_next.fetch_max(next, Ordering::Relaxed);
        Ok(if ts.get() < next { Ok(()) } else { Err(next) })
    }

    fn key(&self, collection: &str, id: &str) -> Result<DocKey, Problem> {
        DocKey::new(collection, id, &self.options.limits.keys)
            .map_err(|e| Problem::new(Kind::InvalidKey, e.to_string()))
    }

    fn key_from_path(
        &self,
        path: Result<Path<(String, String)>, PathRejection>,
    ) -> Result<DocKey, Problem> {
        let Path((collection, id)) =
            path.map_err(|e| Problem::new(Kind::InvalidPath, e.body_text()))?;
        self.key(&collection, &id)
    }

    pub(crate) fn collection_from_path(
        &self,
        path: Result<Path<String>, PathRejection>,
    ) -> Result<String, Problem> {
        let Path(collection) = path.map_err(|e| Problem::new(Kind::InvalidPath, e.body_text()))?;
        causeway_core::key::validate_collection(&collection, &self.options.limits.keys)
            .map_err(|e| Problem::new(Kind::InvalidKey, e.to_string()))?;
        Ok(collection)
    }

    fn check_key_count(&self, n: usize) -> Result<(), Problem> {
        let max = self.options.limits.max_keys_per_get;
        if n == 0 || n > max {
            return Err(Problem::new(
                Kind::TooManyItems,
                format!("a multi-get takes 1 to {max} keys"),
            ));
        }
        Ok(())
    }

    /// The compact JSON of a document or merge patch: an object, no reserved `$` top-level
    /// fields, within `max_document_bytes`.
    fn document_bytes(&self, value: Value, what: &str) -> Result<Vec<u8>, Problem> {
        let Value::Object(map) = &value else {
            return Err(Problem::new(
                Kind::InvalidDocument,
                format!("a {what} must be a JSON object"),
            ));
        };
        if let Some(k) = map.keys().find(|k| k.starts_with('$')) {
            return Err(Problem::new(
                Kind::InvalidDocument,
                format!(
                    "top-level field {:?} is reserved: field names starting with '$' are not stored",
                    k.chars().take(64).collect::<String>()
                ),
            ));
        }
        let bytes = serde_json::to_vec(&value)
            .map_err(|e| Problem::new(Kind::Internal, format!("cannot encode JSON: {e}")))?;
        let max = self.options.limits.max_document_bytes;
        if bytes.len() > max {
            return Err(Problem::new(
                Kind::DocumentTooLarge,
                format!(
                    "the {what} is {} bytes of JSON, more than {max}",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// A counter's dotted path as object keys.
    fn counter_path(&self, path: &str) -> Result<Vec<String>, Problem> {
        let max = self.options.limits.query.max_path_segments;
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.len() > self.options.limits.query.max_path_bytes
            || segments.len() > max
            || segments.iter().any(|s| s.is_empty())
            || segments[0].starts_with('$')
        {
            return Err(Problem::new(
                Kind::InvalidDocument,
                format!(
                    "invalid counter path {:?}: 1 to {max} non-empty dotted segments, not starting with '$'",
                    path.chars().take(64).collect::<String>()
                ),
            ));
        }
        Ok(segments)
    }

    /// What a write asks besides its mutations: `?wait=`, `Idempotency-Key`, and for a
    /// single-document write (`key`) the conditions of `If-Match` / `If-None-Match`.
    fn write_request(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        key: Option<&DocKey>,
    ) -> Result<Write, Problem> {
        let wait = wait_mode(query)?;
        let idempotency_key =
            headers::idempotency_key(headers, self.options.limits.max_idempotency_key_bytes)?;
        let mut conditions = Vec::new();
        match (key, headers::preconditions(headers)?) {
            (_, (None, None)) => {}
            (Some(key), (exists, version_ts)) => {
                conditions.push(self.condition(key, exists, version_ts, None)?);
            }
            (None, _) => {
                return Err(Problem::new(
                    Kind::InvalidParameter,
                    "If-Match and If-None-Match apply to single-document writes; a transaction \
                     states its conditions in its body",
                ))
            }
        }
        Ok(Write {
            conditions,
            idempotency_key,
            wait,
        })
    }

    /// A condition on `key`, its filter checked as queries check theirs.
    fn condition(
        &self,
        key: &DocKey,
        exists: Option<bool>,
        version_ts: Option<u64>,
        filter: Option<Value>,
    ) -> Result<pb::Condition, Problem> {
        let filter = match filter {
            None => Vec::new(),
            Some(filter) => {
                // Apply parses filters within the default limits: refuse here what it would.
                causeway_core::query::Filter::parse(
                    &filter,
                    &causeway_core::query::QueryLimits::default(),
                )
                .map_err(|e| Problem::new(Kind::InvalidQuery, format!("condition filter: {e}")))?;
                serde_json::to_vec(&filter).map_err(|e| {
                    Problem::new(Kind::Internal, format!("cannot encode a filter: {e}"))
                })?
            }
        };
        if exists.is_none() && version_ts.is_none() && filter.is_empty() {
            return Err(Problem::new(
                Kind::InvalidJson,
                "a condition needs exists, version_ts or filter",
            ));
        }
        Ok(pb::Condition {
            collection: key.collection().to_owned(),
            id: key.id().to_owned(),
            exists,
            version_ts,
            filter,
        })
    }

    /// Appends one transaction of `mutations` to the log and answers: at once with its ts, or,
    /// when the write must know (conditions, an idempotency key, `?wait=`), with its outcome.
    async fn commit(
        &self,
        mutations: Vec<pb::Mutation>,
        write: Write,
        principal: &Principal,
    ) -> Result<Response, Problem> {
        let wall_clock_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let written = mutations
            .first()
            .map(|m| KeyHash::of(&m.collection, &m.id))
            .ok_or_else(|| Problem::new(Kind::Internal, "a write without mutations"))?;
        let must_know = write.wait != Wait::Append
            || !write.conditions.is_empty()
            || !write.idempotency_key.is_empty();
        let tx = pb::Transaction {
            format_version: pb::TRANSACTION_FORMAT_VERSION,
            wall_clock_ms,
            idempotency_scope: if write.idempotency_key.is_empty() {
                String::new()
            } else {
                principal.name.clone()
            },
            idempotency_key: write.idempotency_key,
            mutations,
            conditions: write.conditions,
            limits: Some(pb::ApplyLimits {
                max_document_bytes: self.options.limits.max_document_bytes as u64,
                max_history_changes: 0,
                idempotency_window_ms: self.options.limits.idempotency_window_ms,
            }),
        };
        let record = codec::encode(&tx);
        let max = self.log.max_record_bytes();
        if record.len() > max {
            return Err(Problem::new(
                Kind::TransactionTooLarge,
                format!(
                    "the transaction is {} bytes as a log record, more than the log's {max}",
                    record.len()
                ),
            ));
        }
        let retry = self.options.timeouts.retry_after_s;
        if let Err(throttled) = self.admission.admit().await {
            self.metrics.throttled();
            return Err(throttled);
        }
        let append = tokio::time::timeout(
            std::time::Duration::from_millis(self.options.timeouts.append_ms),
            self.log.append(vec![record]),
        )
        .await;
        let ts = match append {
            Ok(Ok(ts)) if ts.len() == 1 => ts[0],
            Ok(Ok(ts)) => {
                self.metrics.log_append(false);
                tracing::error!(
                    count = ts.len(),
                    "the log answered a wrong number of timestamps"
                );
                return Err(Problem::new(
                    Kind::Internal,
                    "the log answered no timestamp",
                ));
            }
            Ok(Err(e)) => {
                self.metrics.log_append(false);
                return Err(log_problem(&e, retry));
            }
            Err(_elapsed) => {
                self.metrics.log_append(false);
                tracing::warn!("log append timed out");
                return Err(Problem::new(
                    Kind::Unavailable,
                    "the log did not confirm the append in time; the outcome is unknown \
                     (retry with the same Idempotency-Key: a transaction whose key was \
                     committed applies once)",
                )
                .retry_after(retry));
            }
        };
        self.metrics.log_append(true);
        self.log_next.fetch_max(ts.get() + 1, Ordering::Relaxed);
        self.admission.appended(ts.get());
        let ts = Timestamp(ts.get());
        if !must_know {
            return Ok(write_response(ts, None, None, false));
        }
        let timeout =
            std::time::Duration::from_millis(u64::from(self.options.timeouts.visible_wait_ms));
        let Some(outcome) = outcome::wait(&self.store, ts, written, timeout).await else {
            return Err(Problem::new(
                Kind::OutcomeUnknown,
                format!(
                    "the transaction is in the log at ts {ts}, but its outcome was not known in \
                     time: ask GET /v1/transactions/{ts}"
                ),
            )
            .at_ts(ts.0)
            .retry_after(retry));
        };
        // A retry of a committed transaction changed nothing and answers the original (only a
        // committed transaction's key is remembered).
        let (ts, replayed) = match outcome.duplicate_of {
            0 if !outcome.committed => {
                // The reasons name documents and their versions: only those the token may read.
                let mut problem = outcome::aborted(ts, &outcome);
                problem
                    .failures
                    .retain(|f| principal.allows(Access::Read, &f.collection));
                return Err(problem);
            }
            0 => (ts, false),
            original => (Timestamp(original), true),
        };
        let visible = if write.wait == Wait::Visible {
            Some(self.wait_visible(ts).await)
        } else {
            None
        };
        Ok(write_response(ts, Some("committed"), visible, replayed))
    }

    /// Waits (bounded) until the UST reaches `ts`; false when it did not in time or no node
    /// could say.
    async fn wait_visible(&self, ts: Timestamp) -> bool {
        crate::visible::wait_visible(
            &self.store,
            ts,
            self.options.timeouts.visible_wait_ms,
            self.options.timeouts.store_rpc_ms,
        )
        .await
    }

    fn read_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            u64::from(self.options.timeouts.causal_wait_ms) + self.options.timeouts.store_rpc_ms,
        )
    }

    /// A coordinated read of `keys` at one read timestamp.
    async fn read(
        &self,
        keys: Vec<DocKey>,
        min_ts: Timestamp,
    ) -> Result<(ReadTimestamp, Vec<pb::Document>), Problem> {
        let n = keys.len();
        let request = pb::ReadRequest {
            keys: keys
                .iter()
                .map(|k| pb::DocumentKey {
                    collection: k.collection().to_owned(),
                    id: k.id().to_owned(),
                })
                .collect(),
            min_ts: min_ts.get(),
            timeout_ms: self.options.timeouts.causal_wait_ms,
            with_automerge: false,
        };
        let deadline = self.read_deadline();
        let response = self
            .store
            .call_hedged(|mut c| {
                let mut req = tonic::Request::new(request.clone());
                req.set_timeout(deadline);
                async move { c.read(req).await.map(tonic::Response::into_inner) }
            })
            .await
            .map_err(|e| self.store_problem(e, min_ts, false))?;
        let at = read_ts(response.at)?;
        if response.documents.len() != n {
            return Err(Problem::new(
                Kind::StoreError,
                format!(
                    "the store node answered {} documents for {n} keys",
                    response.documents.len()
                ),
            ));
        }
        Ok((at, response.documents))
    }

    async fn multi_get(&self, keys: Vec<DocKey>, min_ts: Timestamp) -> Result<Response, Problem> {
        let (at, documents) = self.read(keys, min_ts).await?;
        let documents = documents
            .into_iter()
            .map(document_result)
            .collect::<Result<Vec<_>, _>>()?;
        let body = MultiGetResponse {
            read_timestamp: at.to_string(),
            documents,
        };
        Ok(json_response(StatusCode::OK, &body, Some(at)))
    }

    /// The answer for a failed store-node call.
    fn store_problem(&self, e: StoreError, min_ts: Timestamp, cursor: bool) -> Problem {
        let retry = self.options.timeouts.retry_after_s;
        let status = match e {
            StoreError::NoNodes => {
                return Problem::new(Kind::Unavailable, "no store node is known yet")
                    .retry_after(retry)
            }
            StoreError::Status(s) => s,
        };
        let message = status.message().chars().take(512).collect::<String>();
        match status.code() {
            Code::DeadlineExceeded if min_ts > Timestamp::ZERO => Problem::new(
                Kind::CausalWaitTimeout,
                format!("the UST did not reach ts {} in time", min_ts.get()),
            )
            .retry_after(retry),
            Code::InvalidArgument => Problem::new(Kind::InvalidQuery, message),
            Code::FailedPrecondition if cursor => Problem::new(
                Kind::CursorExpired,
                "the cursor's read timestamp is no longer retained; start the query again",
            ),
            Code::DeadlineExceeded
            | Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::Aborted => Problem::new(
                Kind::Unavailable,
                format!("store nodes unavailable: {message}"),
            )
            .retry_after(retry),
            code => {
                tracing::warn!(?code, %message, "store node error");
                Problem::new(Kind::StoreError, format!("store node error: {message}"))
            }
        }
    }
}

/// The answer for a failed log append.
fn log_problem(e: &causeway_txlog::Error, retry: u32) -> Problem {
    use causeway_txlog::Error as E;
    match e {
        E::RecordTooLarge { size, max } => Problem::new(
            Kind::TransactionTooLarge,
            format!("the transaction is {size} bytes as a log record, more than the log's {max}"),
        ),
        E::Unavailable { .. } | E::Closed => {
            tracing::warn!(error = %e, "log append failed");
            Problem::new(Kind::Unavailable, "the transaction log is unavailable").retry_after(retry)
        }
        other => {
            tracing::error!(error = %other, "log append failed");
            Problem::new(Kind::Internal, "the transaction log failed")
        }
    }
}

fn mutation(key: &DocKey, op: Op) -> pb::Mutation {
    pb::Mutation {
        collection: key.collection().to_owned(),
        id: key.id().to_owned(),
        op: Some(op),
    }
}

/// What a write waits for before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The append (unless the write must know its outcome: conditions, an idempotency key).
    Append,
    /// `?wait=outcome`: the outcome.
    Outcome,
    /// `?wait=visible`: the outcome, then visibility to every coordinator.
    Visible,
}

/// A write's options besides its mutations.
#[derive(Debug)]
struct Write {
    conditions: Vec<pb::Condition>,
    idempotency_key: String,
    wait: Wait,
}

/// The `wait` of the query string; values other than `outcome` and `visible` are refused,
/// other parameters ignored.
fn wait_mode(query: Option<&str>) -> Result<Wait, Problem> {
    let mut wait = Wait::Append;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "wait" {
            wait = match value {
                "outcome" => Wait::Outcome,
                "visible" => Wait::Visible,
                _ => {
                    return Err(Problem::new(
                        Kind::InvalidParameter,
                        "wait is \"outcome\" or \"visible\"",
                    ))
                }
            };
        }
    }
    Ok(wait)
}

/// The answer of a write that committed (or was appended, when `outcome` is `None`).
fn write_response(
    ts: Timestamp,
    outcome: Option<&str>,
    visible: Option<bool>,
    replayed: bool,
) -> Response {
    let body = WriteResponse {
        ts: ts.0,
        outcome: outcome.map(str::to_owned),
        visible,
    };
    let mut response = json_response(StatusCode::OK, &body, None);
    let h = response.headers_mut();
    h.insert(COMMIT_TIMESTAMP, HeaderValue::from(ts.0));
    if replayed {
        h.insert(
            headers::IDEMPOTENT_REPLAYED,
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// Deserialises a parsed body into its request type, 400 on a wrong shape.
fn shape<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Problem> {
    serde_json::from_value(value).map_err(|e| Problem::new(Kind::InvalidJson, e.to_string()))
}

fn read_ts(at: Option<pb::ReadTs>) -> Result<ReadTimestamp, Problem> {
    let at = at.ok_or_else(|| {
        Problem::new(
            Kind::StoreError,
            "the store node answered no read timestamp",
        )
    })?;
    Ok(ReadTimestamp::new(Epoch(at.epoch), Timestamp(at.ts)))
}

fn document_result(d: pb::Document) -> Result<DocumentResult, Problem> {
    let document = if d.found {
        Some(serde_json::from_slice::<Value>(&d.json).map_err(|e| {
            Problem::new(
                Kind::StoreError,
                format!("the store node answered a document that is not JSON: {e}"),
            )
        })?)
    } else {
        None
    };
    Ok(DocumentResult {
        collection: d.collection,
        id: d.id,
        found: d.found,
        version_ts: d.found.then_some(d.version_ts),
        document,
    })
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn json_response<T: Serialize>(
    status: StatusCode,
    body: &T,
    at: Option<ReadTimestamp>,
) -> Response {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            return Problem::new(Kind::Internal, format!("cannot encode the answer: {e}"))
                .into_response()
        }
    };
    let mut response = (status, bytes).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Some(at) = at {
        h.insert(READ_TIMESTAMP, header_value(&at.to_string()));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parameter_is_outcome_visible_or_refused() {
        assert_eq!(wait_mode(None).unwrap(), Wait::Append);
        assert_eq!(wait_mode(Some("x=1")).unwrap(), Wait::Append);
        assert_eq!(wait_mode(Some("wait=visible")).unwrap(), Wait::Visible);
        assert_eq!(wait_mode(Some("a=b&wait=visible")).unwrap(), Wait::Visible);
        assert_eq!(wait_mode(Some("wait=outcome")).unwrap(), Wait::Outcome);
        assert!(wait_mode(Some("wait=now")).is_err());
        assert!(wait_mode(Some("wait")).is_err());
    }
}
