//! The OpenAPI 3 document of the API, generated from the handlers' `#[utoipa::path]`
//! annotations and the request and answer types, served at `/v1/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::problem::ProblemBody;
use crate::routes::{
    CollectionGetRequest, DocumentResult, KeyRequest, MultiGetRequest, MultiGetResponse,
    MutationRequest, OrderRequest, QueryRequestBody, QueryResponseBody, TransactionRequest,
    WriteResponse,
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
        crate::routes::openapi,
        crate::routes::healthz,
        crate::routes::readyz,
        crate::routes::metrics,
    ),
    components(schemas(
        ProblemBody, WriteResponse, DocumentResult, KeyRequest, MultiGetRequest,
        CollectionGetRequest, MultiGetResponse, OrderRequest, QueryRequestBody, QueryResponseBody,
        MutationRequest, TransactionRequest
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "documents", description = "Single documents and multi-gets"),
        (name = "query", description = "Collection queries"),
        (name = "transactions", description = "Atomic multi-document writes"),
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

/// The document as JSON text.
pub fn json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}"))
}
