//! warp filters: one function per operation (path, method, then the
//! bearer, so a wrong path is a 404 and not a 401), and the injectors they
//! share.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use warp::http::header::{HeaderValue, CONTENT_TYPE};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::context::{head, optional_header, query, request_id, Client, Head, Header, ServedAs};
use super::problem::ApiError;
use super::server::BodyTimedOut;
use super::{handlers, AppState, MAX_BODY_BYTES};
use crate::auth::Bearer;
use crate::domain::Operation;

/// Every route: the API operations, the ones a busy install calls most
/// first, then the service endpoints.
pub(super) fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    list_linked_identities(&state)
        .or(search_linked_identities(&state))
        .unify()
        .or(get_linked_identity(&state))
        .unify()
        .or(list_identity_providers(&state))
        .unify()
        .or(link_identity(&state))
        .unify()
        .or(delete_linked_identity(&state))
        .unify()
        .or(list_events(&state))
        .unify()
        .or(healthz())
        .unify()
        .or(readyz(&state))
        .unify()
        .or(metrics(&state))
        .unify()
        .or(openapi_json(&state))
        .unify()
        .or(super::openapi::docs())
        .unify()
        .or(dev_reset(&state))
        .unify()
}

/// POST /_dev/reset (`linkid dev` only: elsewhere there is no such path)
fn dev_reset(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let dev = state.dev.is_some();
    warp::path!("_dev" / "reset")
        .and_then(move || {
            std::future::ready(if dev {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            })
        })
        .untuple_one()
        .and(warp::post())
        .and(head())
        .and(with_state(state))
        .and_then(|head: Arc<Head>, state: Arc<AppState>| async move {
            let bearer = authenticate(&state, &head)?;
            handlers::dev_reset(state, bearer).await
        })
}

fn with_state(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone {
    let state = state.clone();
    warp::any().map(move || state.clone())
}

/// The request's head, the state and the bearer token, authenticated
/// (after path and method matched): one filter, so that a request passes
/// few combinators. In `linkid dev`, an authenticated request's `Prefer`
/// controls act here, before the operation does (see `dev`).
fn authorized(
    state: &Arc<AppState>,
    operation: Operation,
) -> impl Filter<Extract = (Arc<Head>, Arc<AppState>, Bearer), Error = Rejection> + Clone {
    let state = state.clone();
    head()
        .and_then(move |head: Arc<Head>| {
            let state = state.clone();
            let authenticated = authenticate(&state, &head);
            async move {
                let bearer = authenticated?;
                if state.dev.is_some() {
                    super::dev::apply(operation, &head).await?;
                }
                Ok::<_, Rejection>((head, state, bearer))
            }
        })
        .untuple_one()
}

/// The state and the authenticated bearer token.
fn bearer(
    state: &Arc<AppState>,
    operation: Operation,
) -> impl Filter<Extract = (Arc<AppState>, Bearer), Error = Rejection> + Clone {
    authorized(state, operation)
        .map(|_: Arc<Head>, state, bearer| (state, bearer))
        .untuple_one()
}

/// The query string, the state and the authenticated bearer token.
fn query_and_bearer(
    state: &Arc<AppState>,
    operation: Operation,
) -> impl Filter<Extract = (String, Arc<AppState>, Bearer), Error = Rejection> + Clone {
    authorized(state, operation)
        .map(|head: Arc<Head>, state, bearer| (head.query.clone(), state, bearer))
        .untuple_one()
}

/// GET /api/admin/users/v4/users/identity-providers
fn list_identity_providers(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "users" / "identity-providers")
        .and(warp::get())
        .and(bearer(state, Operation::ListIdentityProviders))
        .and_then(handlers::list_identity_providers)
}

/// GET /api/admin/users/v4/users/{user_id}/linked-identities?embed=ACTIONS
fn list_linked_identities(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "users" / String / "linked-identities")
        .and(warp::get())
        .and(query_and_bearer(state, Operation::ListLinkedIdentities))
        .and_then(handlers::list_linked_identities)
}

/// POST /api/admin/users/v4/users/{user_id}/linked-identities?embed=ACTIONS
fn link_identity(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "users" / String / "linked-identities")
        .and(warp::post())
        .and(query_and_bearer(state, Operation::LinkIdentity))
        .and(json_body())
        .and(request_id())
        .and_then(handlers::link_identity)
}

/// GET /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}?embed=ACTIONS
fn get_linked_identity(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "users" / String / "linked-identities" / String)
        .and(warp::get())
        .and(query_and_bearer(state, Operation::GetLinkedIdentity))
        .and_then(handlers::get_linked_identity)
}

/// DELETE /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}
fn delete_linked_identity(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "users" / String / "linked-identities" / String)
        .and(warp::delete())
        .and(bearer(state, Operation::DeleteLinkedIdentity))
        .and(request_id())
        .and_then(handlers::delete_linked_identity)
}

/// GET /api/admin/users/v4/linked-identities?provider_id=&linked_user_id=&limit=&cursor=
fn search_linked_identities(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "linked-identities")
        .and(warp::get())
        .and(query_and_bearer(state, Operation::SearchLinkedIdentities))
        .and_then(handlers::search_linked_identities)
}

/// GET /api/admin/users/v4/linked-identities/events?after=&limit=&wait=
/// (or `Accept: text/event-stream`, resuming after `Last-Event-ID`)
fn list_events(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "admin" / "users" / "v4" / "linked-identities" / "events")
        .and(warp::get())
        .and(query())
        .and(optional_header(Header::Accept))
        .and(optional_header(Header::LastEventId))
        .and(bearer(state, Operation::ListEvents))
        .and_then(handlers::list_events)
}

/// GET /healthz
fn healthz() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response())
}

/// GET /readyz
fn readyz(state: &Arc<AppState>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state))
        .and_then(handlers::readyz)
}

/// GET /metrics
fn metrics(state: &Arc<AppState>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .and(client(state))
        .and_then(handlers::metrics)
}

/// GET /openapi.json
fn openapi_json(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("openapi.json")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<AppState>| {
            let mut response = Response::new(state.openapi_json.clone().into());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        })
}

/// The request's client (see `Head::client`).
fn client(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Option<Client>,), Error = Infallible> + Clone {
    let trusted = Arc::new(state.trusted_proxies.clone());
    head().map(move |head: Arc<Head>| head.client(&trusted))
}

/// Authenticates the bearer, within the rate limits: a client that keeps
/// failing is refused for a while, and a token may have a request budget.
fn authenticate(state: &AppState, head: &Head) -> Result<Bearer, Rejection> {
    let client = head.client(&state.trusted_proxies);
    let header = head.header(Header::Authorization);
    state
        .limits
        .check_address(client.as_ref())
        .map_err(ApiError::RateLimited)?;
    match state
        .authority
        .authenticate(header.as_ref().map(HeaderValue::as_bytes))
    {
        Ok(bearer) => {
            ServedAs::record(ServedAs::Token(bearer.clone()));
            state
                .limits
                .check_token(bearer.id())
                .map_err(ApiError::RateLimited)?;
            Ok(bearer)
        }
        Err(error) => {
            ServedAs::record(ServedAs::Anonymous);
            Err(state
                .limits
                .failed_authentication(client.as_ref())
                .map_or(ApiError::from(error), ApiError::RateLimited)
                .into())
        }
    }
}

/// A JSON request body: declared as JSON (415 otherwise) and at most
/// `MAX_BODY_BYTES` (413 otherwise, whether or not a length was declared).
fn json_body() -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    optional_header(Header::ContentType)
        .and(optional_header(Header::ContentLength))
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
            let timed_out = std::error::Error::source(&e)
                .and_then(|cause| cause.downcast_ref::<BodyTimedOut>());
            warp::reject::custom(match timed_out {
                Some(BodyTimedOut(after)) => ApiError::RequestTimeout(after.as_secs()),
                None => ApiError::MalformedJson(format!("the body could not be read: {e}")),
            })
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
