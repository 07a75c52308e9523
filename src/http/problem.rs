//! One error type for the API, mapped to RFC 9457 problem details in one
//! place; the store's and the authorizer's errors become it here.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::http::header::{HeaderValue, CONTENT_TYPE};
use warp::http::StatusCode;
use warp::reply::Response;

use super::rate_limit::RateLimited;
use crate::auth::AuthError;
use crate::store::StoreError;

/// One field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// The field's name: a body field, `user_id`, `provider_id` or `embed`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// The most field errors a problem lists; the rest are only counted, so an
/// answer stays small whatever the request held.
pub const MAX_FIELD_ERRORS: usize = 20;

/// The most characters of a field name, and of a message, that an error repeats.
const MAX_FIELD_CHARS: usize = 64;
const MAX_MESSAGE_CHARS: usize = 200;

impl FieldError {
    /// A field error; over-long names and messages (which may quote what
    /// the client sent) are cut.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: clip(field.into(), MAX_FIELD_CHARS),
            message: clip(message.into(), MAX_MESSAGE_CHARS),
        }
    }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
pub fn clip(mut text: String, max: usize) -> String {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Declares `ProblemCode` from one list: each code's text, HTTP status and
/// meaning, so that the enum, its status and the document cannot drift apart.
macro_rules! problem_codes {
    ($($variant:ident = ($text:literal, $status:ident, $meaning:literal),)*) => {
        /// A problem's stable code: what programs switch on. Each error
        /// response of the document narrows it to the codes that response
        /// can carry.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ProblemCode {
            $($variant,)*
        }

        impl ProblemCode {
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $text,)*
                }
            }

            pub fn status(self) -> StatusCode {
                match self {
                    $(ProblemCode::$variant => StatusCode::$status,)*
                }
            }

            /// When a response carries this code, in a few words.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $meaning,)*
                }
            }
        }
    };
}

problem_codes! {
    ValidationFailed = ("VALIDATION_FAILED", BAD_REQUEST, "a path segment, query value, header or body field is invalid; `errors` names each"),
    MalformedJson = ("MALFORMED_JSON", BAD_REQUEST, "the body is not well-formed JSON"),
    InvalidIdentityProvider = ("INVALID_IDENTITY_PROVIDER", BAD_REQUEST, "`provider_id` is not a configured, linkable identity provider"),
    UserAlreadyLinked = ("USER_ALREADY_LINKED", BAD_REQUEST, "the user already has a (different) link; a user may be linked to one identity provider at a time"),
    Unauthenticated = ("UNAUTHENTICATED", UNAUTHORIZED, "no bearer token was presented (`WWW-Authenticate: Bearer`)"),
    InvalidToken = ("INVALID_TOKEN", UNAUTHORIZED, "the bearer token is malformed, forged, expired or revoked (`WWW-Authenticate: Bearer error=\"invalid_token\"`; `detail` says which)"),
    Forbidden = ("FORBIDDEN", FORBIDDEN, "a valid token without the right for this request"),
    CorsForbidden = ("CORS_FORBIDDEN", FORBIDDEN, "a cross-origin request from an origin not in `cors.allowed_origins`"),
    LinkedIdentityNotFound = ("LINKED_IDENTITY_NOT_FOUND", NOT_FOUND, "the user has no link to that identity provider"),
    NotFound = ("NOT_FOUND", NOT_FOUND, "no such path"),
    MethodNotAllowed = ("METHOD_NOT_ALLOWED", METHOD_NOT_ALLOWED, "the path exists but not with this method (`Allow` lists those it has)"),
    RequestTimeout = ("REQUEST_TIMEOUT", REQUEST_TIMEOUT, "the request body did not arrive within `server.body_timeout_secs`"),
    IdentityAlreadyLinked = ("IDENTITY_ALREADY_LINKED", CONFLICT, "the remote identity is linked to another user"),
    EventsExpired = ("EVENTS_EXPIRED", GONE, "retention pruned events after `after`; `detail` says where to continue"),
    PayloadTooLarge = ("PAYLOAD_TOO_LARGE", PAYLOAD_TOO_LARGE, "the body is over 16 KiB"),
    UnsupportedMediaType = ("UNSUPPORTED_MEDIA_TYPE", UNSUPPORTED_MEDIA_TYPE, "the body is not sent as `application/json`"),
    RateLimited = ("RATE_LIMITED", TOO_MANY_REQUESTS, "too many failed authentications from this address, or requests with this token (`Retry-After`)"),
    Internal = ("INTERNAL", INTERNAL_SERVER_ERROR, "a server fault; the server's log has the cause under the `request_id`"),
    StoreUnavailable = ("STORE_UNAVAILABLE", SERVICE_UNAVAILABLE, "the database cannot be used now (`Retry-After`); service resumes by itself"),
    TooManyStreams = ("TOO_MANY_STREAMS", SERVICE_UNAVAILABLE, "every slot for event streams and long polls (`events.max_streams`) is taken (`Retry-After`)"),
    ServerBusy = ("SERVER_BUSY", SERVICE_UNAVAILABLE, "answers waiting for clients that read slowly fill `server.max_unsent_bytes`; this answer (over 16 KiB) was not made to wait too (`Retry-After`)"),
    NotReady = ("NOT_READY", SERVICE_UNAVAILABLE, "`/readyz`: the database does not answer"),
    StorageFull = ("STORAGE_FULL", INSUFFICIENT_STORAGE, "the disk holding the database is full; nothing was written"),
}

/// An RFC 9457 problem details body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: `code` says which problem this is.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// A stable upper-case code, for programs.
    pub code: ProblemCode,
    /// The request's `x-request-id`.
    pub request_id: String,
    /// `VALIDATION_FAILED` only: each field that failed (at most 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub errors: Option<Vec<FieldError>>,
    /// How many more field errors there were than `errors` lists; present
    /// only when the list was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub errors_omitted: Option<usize>,
}

/// Every way a request can fail.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400 `VALIDATION_FAILED`: fields, path segments or query values are invalid.
    #[error("the request is invalid: {}", describe_fields(.0))]
    Validation(Vec<FieldError>),
    /// 400 `MALFORMED_JSON`: the body is not well-formed JSON.
    #[error("the body is not valid JSON: {}", clip(.0.clone(), MAX_MESSAGE_CHARS))]
    MalformedJson(String),
    /// 400 `INVALID_IDENTITY_PROVIDER`: unknown or not linkable provider.
    #[error("{:?} is not a configured, linkable identity provider; GET /api/admin/users/v4/users/identity-providers lists them", clip(.0.clone(), MAX_FIELD_CHARS))]
    InvalidIdentityProvider(String),
    /// 400 `USER_ALREADY_LINKED`: the user has a link to another identity.
    /// The provider is named only to a bearer who may read that link.
    #[error("user {user_id:?} is already linked to {}; a user may be linked to one identity provider at a time, so delete that link first", .provider_id.as_ref().map_or_else(|| "another identity".to_owned(), |p| format!("identity provider {p:?}")))]
    UserAlreadyLinked {
        user_id: String,
        provider_id: Option<String>,
    },
    /// 409 `IDENTITY_ALREADY_LINKED`: another user holds this remote identity.
    #[error("the remote identity {linked_user_id:?} at {provider_id:?} is already linked to another user")]
    IdentityAlreadyLinked {
        provider_id: String,
        linked_user_id: String,
    },
    /// 404 `LINKED_IDENTITY_NOT_FOUND`: the user has no link to that provider.
    #[error("user {user_id:?} has no linked identity at provider {provider_id:?}")]
    LinkedIdentityNotFound {
        user_id: String,
        provider_id: String,
    },
    /// 401 `UNAUTHENTICATED`: no bearer token was presented.
    #[error("this operation needs a bearer token: send Authorization: Bearer <token>")]
    MissingToken,
    /// 401 `INVALID_TOKEN`: malformed, forged, expired or revoked token.
    #[error("the bearer token is {0}")]
    InvalidToken(Cow<'static, str>),
    /// 403 `FORBIDDEN`: a valid token without the right for this request.
    #[error("the bearer token does not allow this operation on this resource")]
    Forbidden,
    /// 404 `NOT_FOUND`: no such path.
    #[error("there is no resource at this path; the API lives under /api/admin/users/v4")]
    NotFound,
    /// 405 `METHOD_NOT_ALLOWED`: the path exists, the method does not.
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    /// 408 `REQUEST_TIMEOUT`: the body did not arrive within `server.body_timeout_secs`.
    #[error("the request body did not arrive within {0} s; the connection is closed")]
    RequestTimeout(u64),
    /// 413 `PAYLOAD_TOO_LARGE`: body over the limit.
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415 `UNSUPPORTED_MEDIA_TYPE`: the body is not declared as JSON.
    #[error("the body must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429 `RATE_LIMITED`: too many requests (or failed authentications).
    #[error("too many {}; retry in {} s", .0.what, .0.retry_after)]
    RateLimited(RateLimited),
    /// 403 `CORS_FORBIDDEN`: a cross-origin request from an origin not allowed.
    #[error("this cross-origin request is not allowed: {0}")]
    CorsForbidden(String),
    /// 410 `EVENTS_EXPIRED`: retention pruned events the consumer has not seen.
    #[error("the events after this point were pruned by retention (events.retention_days); events up to seq {pruned_through} are gone: export the links and continue from after={pruned_through}")]
    EventsExpired { pruned_through: i64 },
    /// 503 `TOO_MANY_STREAMS`: every slot for event streams and long polls is taken.
    #[error("too many event streams and long polls are open (events.max_streams); retry later")]
    TooManyStreams,
    /// 503 `SERVER_BUSY`: the answer would pass the budget of unsent answers.
    #[error("the server holds {held} bytes of answers that clients have not read yet, as many as server.max_unsent_bytes allows; retry in a moment, or ask for a smaller page")]
    ServerBusy { held: usize },
    /// 503 `STORE_UNAVAILABLE`: the database cannot be used now; retry later.
    #[error("the database is unavailable ({0}); retry later")]
    StoreUnavailable(String),
    /// 507 `STORAGE_FULL`: the disk holding the database is full.
    #[error("the database's disk is full ({0}); nothing was written")]
    StorageFull(String),
    /// 503 `NOT_READY`: the database does not answer.
    #[error("not ready: {0}")]
    NotReady(String),
    /// 500 `INTERNAL`: logged with its cause, never shown.
    #[error("an internal error occurred; the request id identifies it in the server's log")]
    Internal(Arc<anyhow::Error>),
}

/// The first few field errors in words, and how many more there are.
fn describe_fields(fields: &[FieldError]) -> String {
    const SHOWN: usize = 3;
    let mut text = fields
        .iter()
        .take(SHOWN)
        .map(|f| format!("{} {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ");
    if fields.len() > SHOWN {
        text.push_str(&format!("; and {} more", fields.len() - SHOWN));
    }
    text
}

impl warp::reject::Reject for ApiError {}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> Self {
        ApiError::Validation(errors)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        ApiError::Internal(Arc::new(error))
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            // Naming the provider is the handler's call (see `UserAlreadyLinked`).
            StoreError::UserAlreadyLinked { current } => ApiError::UserAlreadyLinked {
                user_id: current.user_id,
                provider_id: None,
            },
            StoreError::IdentityAlreadyLinked {
                provider_id,
                linked_user_id,
            } => ApiError::IdentityAlreadyLinked {
                provider_id,
                linked_user_id,
            },
            StoreError::NotFound {
                user_id,
                provider_id,
            } => ApiError::LinkedIdentityNotFound {
                user_id,
                provider_id,
            },
            StoreError::EventsExpired { pruned_through } => {
                ApiError::EventsExpired { pruned_through }
            }
            StoreError::Unavailable(why) => ApiError::StoreUnavailable(why),
            StoreError::Full(why) => ApiError::StorageFull(why),
            StoreError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Missing => ApiError::MissingToken,
            AuthError::Invalid(why) => ApiError::InvalidToken(why),
            AuthError::Forbidden => ApiError::Forbidden,
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    pub fn code(&self) -> ProblemCode {
        match self {
            ApiError::Validation(_) => ProblemCode::ValidationFailed,
            ApiError::MalformedJson(_) => ProblemCode::MalformedJson,
            ApiError::InvalidIdentityProvider(_) => ProblemCode::InvalidIdentityProvider,
            ApiError::UserAlreadyLinked { .. } => ProblemCode::UserAlreadyLinked,
            ApiError::IdentityAlreadyLinked { .. } => ProblemCode::IdentityAlreadyLinked,
            ApiError::LinkedIdentityNotFound { .. } => ProblemCode::LinkedIdentityNotFound,
            ApiError::MissingToken => ProblemCode::Unauthenticated,
            ApiError::InvalidToken(_) => ProblemCode::InvalidToken,
            ApiError::Forbidden => ProblemCode::Forbidden,
            ApiError::CorsForbidden(_) => ProblemCode::CorsForbidden,
            ApiError::RateLimited(_) => ProblemCode::RateLimited,
            ApiError::NotReady(_) => ProblemCode::NotReady,
            ApiError::StoreUnavailable(_) => ProblemCode::StoreUnavailable,
            ApiError::EventsExpired { .. } => ProblemCode::EventsExpired,
            ApiError::TooManyStreams => ProblemCode::TooManyStreams,
            ApiError::ServerBusy { .. } => ProblemCode::ServerBusy,
            ApiError::StorageFull(_) => ProblemCode::StorageFull,
            ApiError::NotFound => ProblemCode::NotFound,
            ApiError::MethodNotAllowed => ProblemCode::MethodNotAllowed,
            ApiError::RequestTimeout(_) => ProblemCode::RequestTimeout,
            ApiError::PayloadTooLarge(_) => ProblemCode::PayloadTooLarge,
            ApiError::UnsupportedMediaType => ProblemCode::UnsupportedMediaType,
            ApiError::Internal(_) => ProblemCode::Internal,
        }
    }

    /// Headers this error's response carries: the RFC 6750 challenge on a
    /// 401, `Retry-After` and the `RateLimit-*` fields on a 429.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::MissingToken => {
                vec![("www-authenticate", "Bearer".to_string())]
            }
            // Exactly DESIGN.md's challenge; the reason is in the body.
            ApiError::InvalidToken(_) => vec![(
                "www-authenticate",
                r#"Bearer error="invalid_token""#.to_string(),
            )],
            ApiError::RateLimited(RateLimited {
                retry_after,
                limit,
                window_secs,
                ..
            }) => vec![
                ("retry-after", retry_after.to_string()),
                ("ratelimit-limit", limit.to_string()),
                ("ratelimit-remaining", "0".to_string()),
                ("ratelimit-reset", retry_after.to_string()),
                ("ratelimit-policy", format!("{limit};w={window_secs}")),
            ],
            ApiError::StoreUnavailable(_) | ApiError::TooManyStreams => {
                vec![("retry-after", "2".to_string())]
            }
            ApiError::ServerBusy { .. } => vec![("retry-after", "1".to_string())],
            _ => vec![],
        }
    }

    /// The problem details body for this error.
    pub fn to_problem(&self, request_id: &str) -> Problem {
        let status = self.status();
        Problem {
            problem_type: "about:blank".to_string(),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: self.code(),
            request_id: request_id.to_string(),
            errors: match self {
                ApiError::Validation(fields) => {
                    Some(fields.iter().take(MAX_FIELD_ERRORS).cloned().collect())
                }
                _ => None,
            },
            errors_omitted: match self {
                ApiError::Validation(fields) if fields.len() > MAX_FIELD_ERRORS => {
                    Some(fields.len() - MAX_FIELD_ERRORS)
                }
                _ => None,
            },
        }
    }

    /// Turns a warp rejection into our error: ours as they are, warp's by kind.
    pub fn from_rejection(rejection: &warp::Rejection) -> ApiError {
        if let Some(error) = rejection.find::<ApiError>() {
            return error.clone();
        }
        if rejection.is_not_found() {
            ApiError::NotFound
        } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
            ApiError::MethodNotAllowed
        } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
            ApiError::PayloadTooLarge(super::MAX_BODY_BYTES)
        } else if rejection
            .find::<warp::reject::UnsupportedMediaType>()
            .is_some()
        {
            ApiError::UnsupportedMediaType
        } else if let Some(cors) = rejection.find::<warp::filters::cors::CorsForbidden>() {
            ApiError::CorsForbidden(cors.to_string())
        } else {
            anyhow::anyhow!("unhandled rejection: {rejection:?}").into()
        }
    }
}

/// A problem details response for an error.
pub(super) fn problem_response(error: &ApiError, request_id: &str) -> Response {
    let body = serde_json::to_vec(&error.to_problem(request_id)).unwrap_or_default();
    let mut response = Response::new(body.into());
    *response.status_mut() = error.status();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    for (name, value) in error.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_problem_code_is_written_as_its_text_and_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for code in ProblemCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
            assert!(seen.insert(code.as_str()), "{code:?} listed twice");
            assert!(!code.meaning().is_empty());
        }
    }

    #[test]
    fn an_error_has_the_status_of_its_code() {
        assert_eq!(ApiError::MissingToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            ApiError::TooManyStreams.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::StorageFull("x".into()).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
    }
}
