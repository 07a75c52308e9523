//! warp filters: one per operation, then one place that turns every outcome
//! into a response with an `x-request-id`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use warp::http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use warp::http::{Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::Bearer;
use crate::error::ApiError;
use crate::handlers;
use crate::startup::AppState;

/// The prefix every API operation lives under.
pub const API_PREFIX: &str = "/api/admin/users/v4";

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The whole application: every route, never rejecting.
pub fn app(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let origins = state.cors_origins.clone();
    let routes = if origins.is_empty() {
        routes(state).boxed()
    } else {
        // Preflights and cross-origin requests from other origins are
        // answered (or refused) by warp's CORS filter.
        let cors = warp::cors()
            .allow_origins(origins.iter().map(String::as_str))
            .allow_methods(["GET", "POST", "DELETE"])
            .allow_headers(["authorization", "content-type", "x-request-id"])
            .expose_headers([
                "x-request-id",
                "location",
                "www-authenticate",
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
                "ratelimit-policy",
            ])
            .max_age(600);
        routes(state).with(cors).map(Reply::into_response).boxed()
    };
    let outcome = routes
        .map(Ok::<Response, Rejection>)
        .or_else(|rejection| async move { Ok::<_, Infallible>((Err(rejection),)) });
    request_context()
        .and(warp::method())
        .and(warp::path::full())
        .and(declares_body())
        .and(outcome)
        .map(finish)
        // The span carries the token's log id, recorded once authenticated.
        .with(warp::trace(|_| {
            tracing::info_span!("request", token = tracing::field::Empty)
        }))
}

fn routes(state: Arc<AppState>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let api = warp::path!("api" / "admin" / "users" / "v4" / ..);
    let trusted_proxies = Arc::new(state.trusted_proxies.clone());
    let with_state = warp::any().map(move || state.clone());
    let bearer = with_state
        .clone()
        .and(client_address(trusted_proxies))
        .and(optional_header("authorization"))
        .and_then(authenticate);
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();

    // GET /api/admin/users/v4/users/identity-providers
    let list_providers = api
        .and(warp::path!("users" / "identity-providers"))
        .and(warp::get())
        .and(with_state.clone())
        .and(bearer.clone())
        .and_then(handlers::list_identity_providers);

    // GET /api/admin/users/v4/users/{user_id}/linked-identities?embed=ACTIONS
    let list_identities = api
        .and(warp::path!("users" / String / "linked-identities"))
        .and(warp::get())
        .and(query)
        .and(with_state.clone())
        .and(bearer.clone())
        .and_then(handlers::list_linked_identities);

    // POST /api/admin/users/v4/users/{user_id}/linked-identities?embed=ACTIONS
    let link = api
        .and(warp::path!("users" / String / "linked-identities"))
        .and(warp::post())
        .and(query)
        .and(with_state.clone())
        .and(bearer.clone())
        .and(json_body())
        .and_then(handlers::link_identity);

    // DELETE /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}
    let unlink = api
        .and(warp::path!("users" / String / "linked-identities" / String))
        .and(warp::delete())
        .and(with_state.clone())
        .and(bearer)
        .and_then(handlers::delete_linked_identity);

    // GET /healthz
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());

    // GET /readyz
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(handlers::readyz);

    // GET /metrics
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::addr::remote())
        .and_then(handlers::metrics);

    // GET /openapi.json
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .and(with_state)
        .map(|state: Arc<AppState>| {
            let mut response = Response::new(state.openapi_json.clone().into());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        });

    list_providers
        .or(list_identities)
        .unify()
        .or(link)
        .unify()
        .or(unlink)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
        .or(crate::openapi::docs())
        .unify()
}

/// A header's raw value, if present (never rejects, whatever its bytes).
fn optional_header(
    name: &'static str,
) -> impl Filter<Extract = (Option<HeaderValue>,), Error = Infallible> + Clone {
    warp::header::value(name)
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}

/// The client's address: the TCP peer, or, when the peer is a trusted
/// proxy, the nearest untrusted address in `X-Forwarded-For`.
fn client_address(
    trusted: Arc<Vec<IpAddr>>,
) -> impl Filter<Extract = (Option<IpAddr>,), Error = Infallible> + Clone {
    warp::addr::remote()
        .and(optional_header("x-forwarded-for"))
        .map(
            move |peer: Option<SocketAddr>, forwarded: Option<HeaderValue>| {
                let peer = peer?.ip();
                if !trusted.contains(&peer) {
                    return Some(peer);
                }
                let hops = forwarded
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                hops.rsplit(',')
                    .map(|hop| hop.trim().parse::<IpAddr>())
                    .find(|hop| !hop.as_ref().is_ok_and(|ip| trusted.contains(ip)))
                    .map_or(Some(peer), |hop| Some(hop.unwrap_or(peer)))
            },
        )
}

/// Authenticates the bearer, within the rate limits: an address that keeps
/// failing is refused for a while, and a token may have a request budget.
async fn authenticate(
    state: Arc<AppState>,
    address: Option<IpAddr>,
    header: Option<HeaderValue>,
) -> Result<Bearer, Rejection> {
    let span = tracing::Span::current();
    state.limits.check_address(address)?;
    match state
        .authority
        .authenticate(header.as_ref().map(HeaderValue::as_bytes))
    {
        Ok(bearer) => {
            span.record("token", tracing::field::display(bearer.log_id()));
            state.limits.check_token(bearer.id())?;
            Ok(bearer)
        }
        Err(error) => {
            span.record("token", tracing::field::display("anonymous"));
            Err(state
                .limits
                .failed_authentication(address)
                .unwrap_or(error)
                .into())
        }
    }
}

/// A JSON request body: declared as JSON (415 otherwise) and at most
/// `MAX_BODY_BYTES` (413 otherwise, whether or not a length was declared).
fn json_body() -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    optional_header("content-type")
        .and(optional_header("content-length"))
        .and_then(
            |content_type: Option<HeaderValue>, length: Option<HeaderValue>| async move {
                if !content_type.as_ref().is_some_and(is_json) {
                    return Err(warp::reject::custom(ApiError::UnsupportedMediaType));
                }
                let declared = length
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
                    return Err(warp::reject::custom(ApiError::PayloadTooLarge(
                        MAX_BODY_BYTES,
                    )));
                }
                Ok(())
            },
        )
        .untuple_one()
        .and(warp::body::stream())
        .and_then(collect_body)
}

async fn collect_body<S, B>(body: S) -> Result<Bytes, Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    futures_util::pin_mut!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            warp::reject::custom(ApiError::MalformedJson(format!(
                "the body could not be read: {e}"
            )))
        })?;
        if collected.len() + chunk.remaining() > MAX_BODY_BYTES {
            return Err(warp::reject::custom(ApiError::PayloadTooLarge(
                MAX_BODY_BYTES,
            )));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            collected.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(collected.freeze())
}

/// `application/json`, optionally with parameters, or any `application/*+json`.
fn is_json(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Per-request context taken before routing: the request id and the start time.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: String,
    pub started: Instant,
}

fn request_context() -> impl Filter<Extract = (RequestContext,), Error = Infallible> + Clone {
    optional_header("x-request-id").map(|given: Option<HeaderValue>| RequestContext {
        id: given
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_sane_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        started: Instant::now(),
    })
}

/// A caller's request id is echoed only when it is short and plain.
fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// Whether the request says it carries a body.
fn declares_body() -> impl Filter<Extract = (bool,), Error = Infallible> + Clone {
    optional_header("content-length")
        .and(optional_header("transfer-encoding"))
        .map(
            |length: Option<HeaderValue>, encoding: Option<HeaderValue>| {
                encoding.is_some() || length.is_some_and(|n| n.as_bytes() != b"0")
            },
        )
}

fn finish(
    context: RequestContext,
    method: Method,
    path: FullPath,
    declares_body: bool,
    outcome: Result<Response, Rejection>,
) -> Response {
    let mut response = match outcome {
        Ok(response) => response,
        Err(rejection) => {
            let error = ApiError::from_rejection(&rejection);
            if let ApiError::Internal(cause) = &error {
                tracing::error!(request_id = %context.id, error = ?cause, "request failed");
            }
            let mut response = problem_response(&error, &context.id);
            if matches!(error, ApiError::MethodNotAllowed) {
                if let Some((_, allow)) = route_of(path.as_str()) {
                    response
                        .headers_mut()
                        .insert(ALLOW, HeaderValue::from_static(allow));
                }
            }
            // A request refused before its body was read (no or bad token,
            // wrong Content-Type, too large, no such route) leaves that body
            // on the connection, and hyper then closes it without a word: a
            // keep-alive client would send its next request into the closing
            // socket and get a connection error. Say that it closes.
            if declares_body {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    if let Ok(id) = HeaderValue::from_str(&context.id) {
        response.headers_mut().insert("x-request-id", id);
    }
    let route = route_of(path.as_str()).map(|(route, _)| route);
    let elapsed = context.started.elapsed();
    crate::telemetry::record_request(
        crate::telemetry::operation_of(route, &method),
        response.status().as_u16(),
        elapsed,
    );
    tracing::info!(
        target: "linkid::request",
        method = %method,
        route = %route.unwrap_or("unknown"),
        status = response.status().as_u16(),
        latency_us = elapsed.as_micros() as u64,
        request_id = %context.id,
        "request"
    );
    response
}

/// A problem details response for an error.
pub fn problem_response(error: &ApiError, request_id: &str) -> Response {
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

/// A known path's route template and the methods it allows.
pub fn route_of(path: &str) -> Option<(&'static str, &'static str)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => Some(("/healthz", "GET")),
        ["readyz"] => Some(("/readyz", "GET")),
        ["metrics"] => Some(("/metrics", "GET")),
        ["openapi.json"] => Some(("/openapi.json", "GET")),
        ["docs", ..] => Some(("/docs", "GET")),
        ["api", "admin", "users", "v4", "users", "identity-providers"] => {
            Some(("/api/admin/users/v4/users/identity-providers", "GET"))
        }
        ["api", "admin", "users", "v4", "users", _, "linked-identities"] => Some((
            "/api/admin/users/v4/users/{user_id}/linked-identities",
            "GET, POST",
        )),
        ["api", "admin", "users", "v4", "users", _, "linked-identities", _] => Some((
            "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
            "DELETE",
        )),
        _ => None,
    }
}

/// A JSON response with a status.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let mut response = warp::reply::json(value).into_response();
    *response.status_mut() = status;
    response
}
