//! The OpenAPI 3.1 document, generated from the operations' files and the
//! types: their paths, the error answers and the links between them.

use std::collections::BTreeMap;

use serde_json::json;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use warp::http::StatusCode;

use super::error_answers::{store_unavailable, Answer, Use};
use super::problem::{ApiError, FieldError, ProblemCode};
use super::rate_limit::RateLimited;
use crate::domain::Operation;

mod links;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "linkid: Linked Identities admin API",
        description = "Which account at a remote identity provider belongs to which local user. \
            Every operation needs `Authorization: Bearer <biscuit token>`; mint one with \
            `linkid token mint --admin`. Errors are RFC 9457 problem details \
            (`application/problem+json`) with a stable `code` (see `ProblemCode`; each error \
            response narrows it to the codes it can carry) and the `request_id`; every \
            response carries `x-request-id`. Query parameters that an operation does not name \
            are ignored, not refused, as most HTTP APIs do (an older server still answers a \
            newer client, and what proxies and caches add passes): a misspelt optional \
            parameter is simply absent, so a lookup whose `linked_user_id` is misspelt lists \
            every link at the provider.",
        contact(name = "linkid maintainers"),
        license(name = "MIT", identifier = "MIT"),
    ),
    servers((url = "/", description = "The linkid server that serves this document.")),
    // Embed is only named by the `embed` query parameters, which utoipa does
    // not collect on its own: without it their `$ref` dangles.
    components(schemas(super::problem::Problem, ProblemCode, FieldError, crate::domain::Embed)),
    tags(
        (name = "Linked Identities", description = "Links between local users and accounts at remote identity providers."),
        (name = "System of record", description = "Every link at once: the login-time reverse lookup, paging through all links, and the change feed."),
    )
)]
struct ApiDoc;

/// The document as pretty JSON with a trailing newline: what `linkid
/// openapi` prints, `/openapi.json` serves and `openapi/openapi.json` holds.
pub fn document_json() -> String {
    let text = document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    let mut text = challenges_in_answer_order(&text);
    text.push('\n');
    text
}

/// Stands in the serialized document for the examples of the 401's
/// `WWW-Authenticate` header, until `challenges_in_answer_order` writes them.
const CHALLENGE_EXAMPLES: &str = "(the examples of WWW-Authenticate)";

/// Writes the `WWW-Authenticate` examples in place of their placeholder, in
/// the 401's order: the missing token's first. utoipa keeps a header's
/// examples in a map sorted by name, which puts `INVALID_TOKEN` first, and
/// Prism's mock answers every 401 (a request without a token too) with the
/// header's first example, whichever body example it sends.
fn challenges_in_answer_order(text: &str) -> String {
    let placeholder = format!("\"example\": {}", json!(CHALLENGE_EXAMPLES));
    let at = text
        .find(&placeholder)
        .expect("the document has the challenge header");
    let indent = &text[text[..at].rfind('\n').map_or(0, |line| line + 1)..at];
    let examples = InOrder(
        challenges()
            .into_iter()
            .map(|(code, challenge)| (code, json!({ "value": challenge })))
            .collect(),
    );
    let examples = serde_json::to_string_pretty(&examples)
        .expect("examples serialize")
        .replace('\n', &format!("\n{indent}"));
    text.replacen(&placeholder, &format!("\"examples\": {examples}"), 1)
}

/// A JSON object whose members keep the order they are given in.
struct InOrder(Vec<(&'static str, serde_json::Value)>);

impl serde::Serialize for InOrder {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// The document: the info and tags above, each operation's path from its
/// file (in the table's order), then what `Finish` adds.
fn document() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    for operation in Operation::ALL {
        (super::ops::file(operation).document)(&mut document);
    }
    Finish.modify(&mut document);
    document
}

/// What the document says an operation answers (for `linkid dev`'s
/// `Prefer: code=`).
pub(crate) fn documented(operation: Operation) -> super::dev::Documented {
    super::dev::Documented {
        statuses: documented_statuses(operation),
        errors: documented_errors(operation),
    }
}

/// Every error answer the document gives an operation, one per example,
/// in the document's order (`linkid dev` answers them on request).
fn documented_errors(operation: Operation) -> Vec<ApiError> {
    let shared = shared_answers();
    operation_answers(operation)
        .into_iter()
        .flat_map(|answer| match answer {
            Use::Own(answer) => answer.examples,
            Use::Shared(name) => shared
                .iter()
                .find(|(shared, _)| *shared == name)
                .map(|(_, answer)| answer.examples.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// The statuses the document gives an operation, in ascending order.
fn documented_statuses(operation: Operation) -> Vec<u16> {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let document = DOCUMENT
        .get_or_init(|| serde_json::from_str(&document_json()).expect("the document is JSON"));
    let spec = operation.spec();
    let mut statuses: Vec<u16> = document["paths"][spec.route][spec.method.to_ascii_lowercase()]
        ["responses"]
        .as_object()
        .map(|responses| responses.keys().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default();
    statuses.sort_unstable();
    statuses
}

/// The answers several operations share: (`components/responses` name, answer).
fn shared_answers() -> Vec<(&'static str, Answer)> {
    let answer =
        |name: &'static str, schema: &'static str, examples| (name, Answer::new(schema, examples));
    vec![
        answer(
            "Unauthorized",
            "UnauthorizedProblem",
            unauthorized_examples(),
        ),
        answer(
            "Forbidden",
            "ForbiddenProblem",
            vec![
                ApiError::Forbidden,
                ApiError::CorsForbidden("origin not allowed".into()),
            ],
        ),
        answer(
            "LinkedIdentityNotFound",
            "LinkedIdentityNotFoundProblem",
            vec![ApiError::LinkedIdentityNotFound {
                user_id: "u-42".into(),
                provider_id: "okta".into(),
            }],
        ),
        answer(
            "RequestTimeout",
            "RequestTimeoutProblem",
            vec![ApiError::RequestTimeout(30)],
        ),
        answer(
            "PayloadTooLarge",
            "PayloadTooLargeProblem",
            vec![ApiError::PayloadTooLarge(super::MAX_BODY_BYTES)],
        ),
        answer(
            "UnsupportedMediaType",
            "UnsupportedMediaTypeProblem",
            vec![ApiError::UnsupportedMediaType],
        ),
        // Any operation: an address that failed to authenticate too often,
        // or a token that made too many requests (`[rate_limit]`).
        answer(
            "RateLimited",
            "RateLimitedProblem",
            vec![ApiError::RateLimited(RateLimited {
                what: "failed authentications from this address",
                retry_after: 12,
                limit: 100,
                window_secs: 60,
            })],
        ),
        answer(
            "Internal",
            "InternalProblem",
            vec![ApiError::from(anyhow::anyhow!("not shown to clients"))],
        ),
        answer(
            "StoreUnavailable",
            "StoreUnavailableProblem",
            vec![store_unavailable()],
        ),
        answer(
            "StorageFull",
            "StorageFullProblem",
            vec![ApiError::StorageFull("database or disk is full".into())],
        ),
    ]
}

/// The two 401s: no token, and a token that is not valid.
fn unauthorized_examples() -> Vec<ApiError> {
    vec![
        ApiError::MissingToken,
        ApiError::InvalidToken("expired".into()),
    ]
}

/// An answer's first problem, as its schema's example when it has several:
/// the media type's examples are keyed by code, so sorted by name, and a
/// tool that answers "the first example" (Prism, for a status alone and for
/// a request without a token) takes the schema's example first. It should
/// get the common case (`UNAUTHENTICATED`, `FORBIDDEN`), not the first code
/// in the alphabet.
fn schema_example(answer: &Answer) -> Option<serde_json::Value> {
    (answer.examples.len() > 1).then(|| example_value(&answer.examples[0]))
}

/// Every error response an operation can answer with, by status: those its
/// file documents (whose validation examples come from its own parsers, so
/// they say what the server says), then those of every operation.
fn operation_answers(operation: Operation) -> Vec<Use> {
    use Use::Shared;
    let mut answers = (super::ops::file(operation).answers)();
    // Every operation: authentication, authorization (and CORS), rate
    // limits, and a server fault.
    answers.extend([
        Shared("Unauthorized"),
        Shared("Forbidden"),
        Shared("RateLimited"),
        Shared("Internal"),
    ]);
    answers
}

/// Finishes the document: the bearer scheme, the shared headers, one
/// narrowed problem schema per error response, the shared error responses,
/// each operation's error responses with an example per code, the
/// `x-request-id` header on every response, and the links.
struct Finish;

const EXAMPLE_REQUEST_ID: &str = "5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10";

impl Modify for Finish {
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
        components.headers.extend(
            shared_headers()
                .into_iter()
                .map(|(name, header)| (name.to_string(), header.into())),
        );
        if let Some(RefOr::T(code)) = components.schemas.get_mut("ProblemCode") {
            set_description(code, problem_code_table());
        }
        // Each narrowed problem schema, by name, with its codes and examples.
        let mut narrowed = BTreeMap::new();
        for (name, answer) in shared_answers() {
            narrowed.insert(answer.schema, (answer.codes(), schema_example(&answer)));
            components
                .responses
                .insert(name.to_string(), error_response(&answer).into());
        }

        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let id = operation.operation_id.clone().unwrap_or_default();
                let op = Operation::ALL
                    .into_iter()
                    .find(|op| op.id() == id)
                    .expect("every documented operation is in the operations table");
                add_error_responses(op, &mut operation.responses, &mut narrowed);
                for (status, response) in operation.responses.responses.iter_mut() {
                    if let RefOr::T(response) = response {
                        finish_response(op, status, response);
                    }
                }
            }
        }

        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, (codes, example)) in narrowed {
            components
                .schemas
                .insert(name.to_string(), narrowed_problem(&codes, example).into());
        }
    }
}

/// An operation's error responses: references to shared ones, its own
/// inline. Notes each narrowed schema its own answers use.
fn add_error_responses(
    op: Operation,
    responses: &mut utoipa::openapi::Responses,
    narrowed: &mut BTreeMap<&'static str, (Vec<ProblemCode>, Option<serde_json::Value>)>,
) {
    for answer in operation_answers(op) {
        let (status, response) = match answer {
            Use::Shared(name) => {
                let (_, shared) = shared_answers()
                    .into_iter()
                    .find(|(shared, _)| *shared == name)
                    .expect("a shared answer by that name");
                (shared.status(), RefOr::Ref(Ref::from_response_name(name)))
            }
            Use::Own(answer) => {
                let codes = answer.codes();
                let example = schema_example(&answer);
                let (known, known_example) = narrowed
                    .entry(answer.schema)
                    .or_insert((codes.clone(), example.clone()));
                assert_eq!(
                    *known, codes,
                    "{} narrows to one set of codes",
                    answer.schema
                );
                // A schema that answers with other examples elsewhere has none.
                if *known_example != example {
                    *known_example = None;
                }
                (answer.status(), error_response(&answer).into())
            }
        };
        responses
            .responses
            .insert(status.as_str().to_string(), response);
    }
}

/// The request id header on a response of an operation, the `Location` of
/// a 201, and the links that start at it.
fn finish_response(op: Operation, status: &str, response: &mut Response) {
    response.headers.insert(
        "x-request-id".into(),
        RefOr::Ref(Ref::new("#/components/headers/RequestId")),
    );
    if op == Operation::LinkIdentity && status == "201" {
        response
            .headers
            .insert("Location".into(), location_header().into());
    }
    for (name, link) in links::starting_at(op, status) {
        response.links.insert(name.to_string(), link.into());
    }
}

/// A header that every response of its kind carries.
fn required_header(
    schema_type: Type,
    description: &str,
    examples: &[(&str, serde_json::Value)],
) -> Header {
    let mut header = HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(schema_type)))
        .description(Some(description))
        // utoipa's Header has no `required`; OpenAPI's header object does.
        .extensions(Some(Extensions::from_iter([("required", true)])));
    header = match examples {
        [(_, only)] => header.example(Some(only.clone())),
        many => header.examples_from_iter(many.iter().map(|(name, value)| {
            (
                *name,
                ExampleBuilder::new().value(Some(value.clone())).build(),
            )
        })),
    };
    header.build()
}

/// `components/headers`, by name.
fn shared_headers() -> Vec<(&'static str, Header)> {
    vec![
        (
            "RequestId",
            required_header(
                Type::String,
                "The request's id: the caller's `x-request-id` when sent and sane (1-128 \
                 characters of letters, digits and `-_.:/+=@`), else a new UUID. Problem \
                 bodies repeat it as `request_id`; the server's log names it.",
                &[("", json!(EXAMPLE_REQUEST_ID))],
            ),
        ),
        ("WwwAuthenticate", www_authenticate_header()),
        (
            "RetryAfter",
            required_header(
                Type::Integer,
                "Seconds to wait before trying again.",
                &[("", json!(2))],
            ),
        ),
        (
            "RateLimitLimit",
            required_header(
                Type::Integer,
                "The requests (or failed authentications) allowed at once.",
                &[("", json!(100))],
            ),
        ),
        (
            "RateLimitRemaining",
            required_header(Type::Integer, "Requests left now: 0.", &[("", json!(0))]),
        ),
        (
            "RateLimitReset",
            required_header(
                Type::Integer,
                "Seconds until a request is allowed again.",
                &[("", json!(12))],
            ),
        ),
        (
            "RateLimitPolicy",
            required_header(
                Type::String,
                "The quota: `<limit>;w=<window seconds>`.",
                &[("", json!("100;w=60"))],
            ),
        ),
    ]
}

/// The RFC 6750 challenge of each 401 example, by the example's name (its
/// problem code), in the 401's order.
fn challenges() -> Vec<(&'static str, String)> {
    unauthorized_examples()
        .iter()
        .flat_map(|error| {
            error
                .headers()
                .into_iter()
                .filter(|(name, _)| *name == "www-authenticate")
                .map(|(_, challenge)| (error.code().as_str(), challenge))
        })
        .collect()
}

/// The RFC 6750 challenge of a 401. OpenAPI gives a response one set of
/// headers for all its examples, so the pairing is by name: the header's
/// examples are named as the 401's body examples are (by problem code),
/// which is how a mock that pairs examples by name (Microcks) sends each
/// problem with its own challenge, and each body example says its challenge
/// too (`headers_sent_with`). The schema lists the two values the server
/// sends. Prism sends a header's first example whatever body example it
/// answers: the missing token's comes first (`challenges_in_answer_order`).
fn www_authenticate_header() -> Header {
    HeaderBuilder::new()
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(
                    challenges().into_iter().map(|(_, challenge)| challenge),
                )),
        ))
        .description(Some(
            "The RFC 6750 challenge: `Bearer` when no token was presented (the \
             `UNAUTHENTICATED` example); `Bearer error=\"invalid_token\"` when one was and it \
             is not valid (`INVALID_TOKEN`).",
        ))
        .example(Some(json!(CHALLENGE_EXAMPLES)))
        .extensions(Some(Extensions::from_iter([("required", true)])))
        .build()
}

fn location_header() -> Header {
    required_header(
        Type::String,
        "The new linked identity's URL (getLinkedIdentity), path segments percent-encoded.",
        &[(
            "",
            json!("/api/admin/users/v4/users/u-42/linked-identities/okta"),
        )],
    )
}

/// The `ProblemCode` schema's description: every code, its status and meaning.
fn problem_code_table() -> String {
    let mut text = String::from(
        "A problem's stable code: what programs switch on. Each error response narrows it \
         to the codes that response can carry.\n\n| code | status | when |\n|---|---|---|\n",
    );
    for code in ProblemCode::ALL {
        text.push_str(&format!(
            "| `{}` | {} | {} |\n",
            code.as_str(),
            code.status().as_u16(),
            code.meaning().replace('|', "\\|")
        ));
    }
    text
}

fn set_description(schema: &mut utoipa::openapi::Schema, description: String) {
    if let utoipa::openapi::Schema::Object(object) = schema {
        object.description = Some(description);
    }
}

/// `Problem` with `code` narrowed to an error response's codes, and its
/// first example when it has several.
fn narrowed_problem(
    codes: &[ProblemCode],
    example: Option<serde_json::Value>,
) -> utoipa::openapi::Schema {
    let status = codes[0].status();
    let mut narrowing = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(codes.iter().map(|code| code.as_str()))),
        )
        .required("code");
    if codes == [ProblemCode::ValidationFailed] {
        narrowing = narrowing.required("errors");
    }
    let listed: Vec<String> = codes
        .iter()
        .map(|code| format!("`{}`", code.as_str()))
        .collect();
    AllOfBuilder::new()
        .item(Ref::from_schema_name("Problem"))
        .item(narrowing)
        .description(Some(format!(
            "A {} problem: {}.",
            status.as_u16(),
            listed.join(" or ")
        )))
        .examples(example)
        .into()
}

/// A problem as an example value.
fn example_value(error: &ApiError) -> serde_json::Value {
    serde_json::to_value(error.to_problem(EXAMPLE_REQUEST_ID)).expect("a problem serializes")
}

fn error_response(answer: &Answer) -> Response {
    let status = answer.status();
    for error in &answer.examples {
        assert_eq!(error.status(), status, "one status per error response");
    }
    let mut description = format!("{}.\n", status.canonical_reason().unwrap_or("Error"));
    for code in answer.codes() {
        description.push_str(&format!("\n- `{}`: {}", code.as_str(), code.meaning()));
    }
    // The headers of this status: (name, `components/headers` name).
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if status == StatusCode::UNAUTHORIZED {
        headers.push(("WWW-Authenticate", "WwwAuthenticate"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        headers.push(("Retry-After", "RetryAfter"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        headers.extend([
            ("RateLimit-Limit", "RateLimitLimit"),
            ("RateLimit-Remaining", "RateLimitRemaining"),
            ("RateLimit-Reset", "RateLimitReset"),
            ("RateLimit-Policy", "RateLimitPolicy"),
        ]);
    }
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(answer.schema)))
        .examples_from_iter(answer.examples.iter().map(|error| {
            let mut example = ExampleBuilder::new()
                .summary(error.code().as_str())
                .value(Some(example_value(error)));
            if let Some(sent) = headers_sent_with(error, &headers) {
                example = example.description(sent);
            }
            (error.code().as_str(), example.build())
        }))
        .build();
    let mut response = ResponseBuilder::new()
        .description(description)
        .header_ref("x-request-id", Ref::new("#/components/headers/RequestId"))
        .content("application/problem+json", content);
    for (name, component) in headers {
        response = response.header_ref(name, Ref::new(format!("#/components/headers/{component}")));
    }
    response.build()
}

/// An example's own header values, said in its description: a response has
/// one set of headers for all its examples, so this is where a 401 example
/// says which challenge comes with it.
fn headers_sent_with(error: &ApiError, documented: &[(&str, &str)]) -> Option<String> {
    let sent: Vec<String> = error
        .headers()
        .into_iter()
        .map(|(name, value)| {
            let shown = documented
                .iter()
                .find(|(documented, _)| documented.eq_ignore_ascii_case(name))
                .map_or(name, |(documented, _)| *documented);
            format!("`{shown}: {value}`")
        })
        .collect();
    (!sent.is_empty()).then(|| format!("Sent with {}.", sent.join(", ")))
}
