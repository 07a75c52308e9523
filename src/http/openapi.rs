//! The OpenAPI 3.1 document, generated from the handlers and types, and the
//! offline docs page.

use std::sync::Arc;

use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::Config;
use warp::http::header::{
    HeaderValue, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, X_CONTENT_TYPE_OPTIONS,
};
use warp::http::StatusCode;
use warp::path::{FullPath, Tail};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::problem::{ApiError, FieldError};
use super::rate_limit::RateLimited;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "linkid: Linked Identities admin API",
        description = "Which account at a remote identity provider belongs to which local user. \
            Every operation needs `Authorization: Bearer <biscuit token>`; mint one with \
            `linkid token mint --admin`. Errors are RFC 9457 problem details \
            (`application/problem+json`) with a stable `code` and the `request_id`; every \
            response carries `x-request-id`.",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        super::handlers::list_identity_providers,
        super::handlers::list_linked_identities,
        super::handlers::link_identity,
        super::handlers::get_linked_identity,
        super::handlers::delete_linked_identity,
        super::handlers::search_linked_identities,
        super::handlers::list_events,
    ),
    // Embed is only named by the `embed` query parameters, which utoipa does
    // not collect on its own: without it their `$ref` dangles.
    components(schemas(super::problem::Problem, FieldError, crate::domain::Embed)),
    modifiers(&Errors),
    tags(
        (name = "Linked Identities", description = "Links between local users and accounts at remote identity providers."),
        (name = "System of record", description = "Every link at once: the login-time reverse lookup, paging through all links, and the change feed."),
    )
)]
struct ApiDoc;

/// The document as pretty JSON with a trailing newline: what `linkid
/// openapi` prints, `/openapi.json` serves and `openapi/openapi.json` holds.
pub fn document_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// Which error codes each operation can answer with, by status.
fn operation_errors(operation_id: &str) -> Vec<(StatusCode, Vec<ApiError>)> {
    let unauthenticated = (
        StatusCode::UNAUTHORIZED,
        vec![
            ApiError::MissingToken,
            ApiError::InvalidToken("expired".into()),
        ],
    );
    let forbidden = (
        StatusCode::FORBIDDEN,
        vec![
            ApiError::Forbidden,
            ApiError::CorsForbidden("origin not allowed".into()),
        ],
    );
    // Any operation: an address that failed to authenticate too often, or a
    // token that made too many requests (`[rate_limit]`).
    let rate_limited = (
        StatusCode::TOO_MANY_REQUESTS,
        vec![ApiError::RateLimited(RateLimited {
            what: "failed authentications from this address",
            retry_after: 12,
            limit: 100,
            window_secs: 60,
        })],
    );
    let internal = (
        StatusCode::INTERNAL_SERVER_ERROR,
        vec![ApiError::from(anyhow::anyhow!("example"))],
    );
    let bad_user = || {
        ApiError::Validation(vec![FieldError::new(
            "user_id",
            "must not contain control characters",
        )])
    };
    let bad_embed = || {
        ApiError::Validation(vec![FieldError::new(
            "embed",
            "\"EVERYTHING\" is not an embed option; the only one is ACTIONS",
        )])
    };
    match operation_id {
        "listIdentityProviders" => vec![unauthenticated, forbidden, rate_limited, internal],
        "listLinkedIdentities" => vec![
            (StatusCode::BAD_REQUEST, vec![bad_embed()]),
            unauthenticated,
            forbidden,
            rate_limited,
            internal,
        ],
        "linkIdentity" => vec![
            (
                StatusCode::BAD_REQUEST,
                vec![
                    ApiError::Validation(vec![
                        FieldError::new("linked_user_id", "is required"),
                        FieldError::new(
                            "nickname",
                            "is not a known field; the fields are provider_id, linked_user_id and linked_username",
                        ),
                    ]),
                    ApiError::MalformedJson("EOF while parsing an object at line 1 column 20".into()),
                    ApiError::InvalidIdentityProvider("github".into()),
                    ApiError::UserAlreadyLinked {
                        user_id: "u-42".into(),
                        provider_id: "azure-ad".into(),
                    },
                ],
            ),
            unauthenticated,
            forbidden,
            (
                StatusCode::CONFLICT,
                vec![ApiError::IdentityAlreadyLinked {
                    provider_id: "okta".into(),
                    linked_user_id: "00u1a2b3c4".into(),
                }],
            ),
            (StatusCode::PAYLOAD_TOO_LARGE, vec![ApiError::PayloadTooLarge(super::MAX_BODY_BYTES)]),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, vec![ApiError::UnsupportedMediaType]),
            (StatusCode::REQUEST_TIMEOUT, vec![ApiError::RequestTimeout(30)]),
            rate_limited,
            internal,
        ],
        "getLinkedIdentity" | "deleteLinkedIdentity" => vec![
            (StatusCode::BAD_REQUEST, vec![bad_user()]),
            unauthenticated,
            forbidden,
            (
                StatusCode::NOT_FOUND,
                vec![ApiError::LinkedIdentityNotFound {
                    user_id: "u-42".into(),
                    provider_id: "okta".into(),
                }],
            ),
            rate_limited,
            internal,
        ],
        _ => vec![],
    }
}

/// Adds the bearer scheme, every error response with an example per code,
/// and the headers every response carries.
struct Errors;

const EXAMPLE_REQUEST_ID: &str = "5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10";

impl Modify for Errors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("biscuit")
                    .description(Some(
                        "A biscuit token (base64url), e.g. from `linkid token mint --admin`.",
                    ))
                    .build(),
            ),
        );
        let request_id = HeaderBuilder::new()
            .schema(Some(
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String),
            ))
            .description(Some(
                "The request's id: the caller's `x-request-id` when sent and sane, else a new one.",
            ))
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let id = operation.operation_id.clone().unwrap_or_default();
                for (status, errors) in operation_errors(&id) {
                    operation.responses.responses.insert(
                        status.as_str().to_string(),
                        error_response(status, &errors).into(),
                    );
                }
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response
                            .headers
                            .insert("x-request-id".to_string(), request_id.clone().into());
                    }
                }
            }
        }
    }
}

fn error_response(status: StatusCode, errors: &[ApiError]) -> utoipa::openapi::Response {
    let codes: Vec<&str> = errors.iter().map(ApiError::code).collect();
    let mut content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem")));
    content = content.examples_from_iter(errors.iter().map(|error| {
        let value = serde_json::to_value(error.to_problem(EXAMPLE_REQUEST_ID))
            .expect("a problem serializes");
        (
            error.code().to_string(),
            ExampleBuilder::new()
                .summary(error.code())
                .value(Some(value))
                .build(),
        )
    }));
    let mut response = ResponseBuilder::new()
        .description(format!(
            "{}: {}",
            status.canonical_reason().unwrap_or("Error"),
            codes.join(", ")
        ))
        .content("application/problem+json", content.build());
    if status == StatusCode::UNAUTHORIZED {
        response = response.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String)))
                .description(Some("`Bearer` when no token was presented; `Bearer error=\"invalid_token\"` when a token was presented but is not valid (RFC 6750)."))
                .build(),
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        use utoipa::openapi::schema::Type;
        for (name, schema_type, description) in [
            (
                "Retry-After",
                Type::Integer,
                "Seconds to wait before trying again.",
            ),
            (
                "RateLimit-Limit",
                Type::Integer,
                "The requests (or failed authentications) allowed at once.",
            ),
            (
                "RateLimit-Remaining",
                Type::Integer,
                "Requests left now: 0.",
            ),
            (
                "RateLimit-Reset",
                Type::Integer,
                "Seconds until a request is allowed again.",
            ),
            (
                "RateLimit-Policy",
                Type::String,
                "The quota: `<limit>;w=<window seconds>`.",
            ),
        ] {
            response = response.header(
                name,
                HeaderBuilder::new()
                    .schema(Some(
                        utoipa::openapi::ObjectBuilder::new().schema_type(schema_type),
                    ))
                    .description(Some(description))
                    .build(),
            );
        }
    }
    response.build()
}

/// The `/docs` page's Content-Security-Policy. Swagger UI sets element
/// styles from script, hence `'unsafe-inline'` for styles only; its icons
/// are data: URIs.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/docs`: Swagger UI from files built into the binary, pointed at `/openapi.json`.
pub fn docs() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let config = Arc::new(
        Config::from("/openapi.json")
            .validator_url("none")
            // A token typed into the page lives only as long as the page:
            // persisting it would leave it in the browser's localStorage.
            .persist_authorization(false)
            .try_it_out_enabled(true),
    );
    warp::path("docs")
        .and(warp::get())
        .and(warp::path::full())
        .and(warp::path::tail())
        .and(warp::any().map(move || config.clone()))
        .and_then(serve_docs)
}

async fn serve_docs(
    full: FullPath,
    tail: Tail,
    config: Arc<Config<'static>>,
) -> Result<Response, Rejection> {
    if full.as_str() == "/docs" {
        let mut response = Response::new(Default::default());
        *response.status_mut() = StatusCode::FOUND;
        response
            .headers_mut()
            .insert(LOCATION, HeaderValue::from_static("/docs/"));
        return Ok(response);
    }
    match utoipa_swagger_ui::serve(tail.as_str(), config) {
        Ok(Some(file)) => {
            let mut response = Response::new(file.bytes.into_owned().into());
            if let Ok(value) = HeaderValue::from_str(&file.content_type) {
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            // The page holds a bearer token: it runs only its own scripts,
            // talks only to this server, and cannot be framed.
            response
                .headers_mut()
                .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CSP));
            response
                .headers_mut()
                .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            Ok(response)
        }
        Ok(None) => Err(warp::reject::not_found()),
        Err(error) => Err(warp::reject::custom(ApiError::from(anyhow::anyhow!(
            "cannot serve the docs page: {error}"
        )))),
    }
}
