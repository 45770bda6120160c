//! The OpenAPI 3 document of the API, generated from the handlers' `#[utoipa::path]`
//! annotations and the request and answer types, served at `/v1/openapi.json`.
//!
//! The generated document knows the shapes; [`constrain`] then writes in the rules that depend
//! on the configured [`Limits`] (key syntax and lengths, item counts, page sizes), in one place
//! rather than on every route, so clients and schemathesis see the limits this server enforces.

use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::options::Limits;

use crate::problem::ProblemBody;
use crate::routes::{
    CollectionGetRequest, ConditionRequest, DocumentResult, KeyRequest, MultiGetRequest,
    MultiGetResponse, MutationRequest, OrderRequest, QueryRequestBody, QueryResponseBody,
    TransactionOutcome, TransactionRequest, WriteResponse,
};

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Causeway document API",
        description = "A partitioned, replicated, causally consistent document store. Writes answer \
            their commit ts (Causeway-Timestamp); reads answer their read timestamp \
            (Causeway-Read-Timestamp) and accept a causal token (Causeway-After). Errors are \
            application/problem+json with a stable type urn:causeway:problem:<slug>."
    ),
    paths(
        crate::routes::get_document,
        crate::routes::put_document,
        crate::routes::patch_document,
        crate::routes::delete_document,
        crate::routes::get_documents,
        crate::routes::get_collection_documents,
        crate::routes::query,
        crate::routes::transaction,
        crate::routes::get_transaction,
        crate::changes::all_changes,
        crate::changes::collection_changes,
        crate::routes::openapi,
        crate::routes::healthz,
        crate::routes::readyz,
        crate::routes::metrics,
    ),
    components(schemas(
        ProblemBody, WriteResponse, DocumentResult, KeyRequest, MultiGetRequest,
        CollectionGetRequest, MultiGetResponse, OrderRequest, QueryRequestBody, QueryResponseBody,
        MutationRequest, TransactionRequest, ConditionRequest, TransactionOutcome,
        crate::problem::FailureBody
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "documents", description = "Single documents and multi-gets"),
        (name = "query", description = "Collection queries"),
        (name = "transactions", description = "Atomic multi-document writes"),
        (name = "changes", description = "Committed changes as server-sent events"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the operations refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON text, with the rules of `limits`.
pub fn json(limits: &Limits) -> String {
    let mut doc =
        serde_json::to_value(ApiDoc::openapi()).expect("the generated OpenAPI document serialises");
    constrain(&mut doc, limits);
    serde_json::to_string_pretty(&doc).expect("a JSON value serialises")
}

/// Collection names: an ASCII letter or `_`, then letters, digits, `_` and `-`
/// (`causeway_core::key::validate_collection`).
const COLLECTION_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_-]*$";
/// Document ids: no control characters, `/` or `\`, and not `.` or `..`
/// (`causeway_core::key::validate_id`). Their limit is in bytes of UTF-8, which a JSON schema
/// cannot say; `maxLength` (characters) is the same number, a necessary condition.
const ID_PATTERN: &str = r"^(?!\.\.?$)[^\u0000-\u001f\u007f-\u009f/\\]+$";

/// Top-level field names of a document: anything not starting with `$`.
const DOCUMENT_FIELD_PATTERN: &str = r"^([^$][\s\S]*)?$";
/// Top-level field names of a merge patch: those of a document, and `$increment`.
const PATCH_FIELD_PATTERN: &str = r"^([^$][\s\S]*)?$|^\$increment$";

/// Writes the limits of this server into the generated document.
fn constrain(doc: &mut Value, limits: &Limits) {
    let collection = json!({"type": "string", "minLength": 1,
        "maxLength": limits.keys.max_collection_bytes, "pattern": COLLECTION_PATTERN});
    let id = json!({"type": "string", "minLength": 1,
        "maxLength": limits.keys.max_id_bytes, "pattern": ID_PATTERN});
    let object = json!({"type": "object"});

    if let Some(paths) = doc["paths"].as_object_mut() {
        for operation in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in operation.values_mut() {
                let params = op.get_mut("parameters").and_then(Value::as_array_mut);
                for param in params.into_iter().flatten() {
                    let schema = match param["name"].as_str() {
                        Some("collection") => collection.clone(),
                        Some("id") => id.clone(),
                        Some("wait") => json!({"type": "string", "enum": ["outcome", "visible"]}),
                        Some("Causeway-After") => {
                            json!({"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"})
                        }
                        Some("Idempotency-Key") => json!({"type": "string", "minLength": 1,
                            "maxLength": limits.max_idempotency_key_bytes, "pattern": "^[!-~]+$"}),
                        Some("If-Match") => json!({"type": "string",
                            "pattern": "^(\\*|\"[0-9]+\")$"}),
                        Some("If-None-Match") => json!({"type": "string", "enum": ["*"]}),
                        Some("after" | "Last-Event-ID") => json!({"type": "string",
                            "pattern": "^[0-9]{1,20}(\\.[0-9]{1,10})?$"}),
                        Some("ts") => {
                            json!({"type": "integer", "minimum": 1, "maximum": i64::MAX})
                        }
                        _ => continue,
                    };
                    param["schema"] = schema;
                }
                // Documents and patches are JSON objects whose top-level names starting with
                // `$` are reserved (a patch may carry `$increment`).
                let content = op
                    .pointer_mut("/requestBody/content")
                    .and_then(Value::as_object_mut);
                for (media, body) in content.into_iter().flatten() {
                    if body["schema"].as_object().is_some_and(|s| s.is_empty()) {
                        let names = if media.as_str() == crate::body::MERGE_PATCH {
                            PATCH_FIELD_PATTERN
                        } else {
                            DOCUMENT_FIELD_PATTERN
                        };
                        body["schema"] =
                            json!({"type": "object", "propertyNames": {"pattern": names}});
                    }
                }
            }
        }
    }

    let schemas = &mut doc["components"]["schemas"];
    let key_properties = |schema: &mut Value| {
        schema["properties"]["collection"] = collection.clone();
        schema["properties"]["id"] = id.clone();
    };
    key_properties(&mut schemas["KeyRequest"]);
    for variant in schemas["MutationRequest"]["oneOf"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        key_properties(variant);
        variant["additionalProperties"] = json!(false);
        for body in ["document", "patch"] {
            if variant["properties"].get(body).is_some() {
                variant["properties"][body] = object.clone();
            }
        }
    }
    for (schema, field, max, items) in [
        ("MultiGetRequest", "keys", limits.max_keys_per_get, None),
        (
            "CollectionGetRequest",
            "ids",
            limits.max_keys_per_get,
            Some(&id),
        ),
        (
            "TransactionRequest",
            "mutations",
            limits.max_mutations_per_transaction,
            None,
        ),
    ] {
        let array = &mut schemas[schema]["properties"][field];
        array["minItems"] = json!(1);
        array["maxItems"] = json!(max);
        if let Some(items) = items {
            array["items"] = items.clone();
        }
    }
    let query = &mut schemas["QueryRequestBody"]["properties"];
    query["limit"]["minimum"] = json!(1);
    query["limit"]["maximum"] = json!(limits.max_query_limit);
    query["filter"] =
        json!({"type": ["object", "null"], "description": query["filter"]["description"]});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_carries_the_configured_limits() {
        let mut limits = Limits::default();
        limits.keys.max_id_bytes = 77;
        limits.max_mutations_per_transaction = 9;
        let doc: Value = serde_json::from_str(&json(&limits)).unwrap();
        let params =
            &doc["paths"]["/v1/collections/{collection}/documents/{id}"]["put"]["parameters"];
        let id = params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "id")
            .unwrap();
        assert_eq!(id["schema"]["maxLength"], 77);
        let wait = params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "wait")
            .unwrap();
        assert_eq!(wait["schema"]["enum"], json!(["outcome", "visible"]));
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["TransactionRequest"]["properties"]["mutations"]["maxItems"],
            9
        );
        assert_eq!(
            schemas["KeyRequest"]["properties"]["collection"]["pattern"],
            COLLECTION_PATTERN
        );
    }
}
