//! The warp filters the operations (and the routes beside them) are built
//! of: an operation's path, matched against its template in the operations
//! table and recorded as the request's route; the bearer, authenticated
//! (and `linkid dev`'s controls); the state; a JSON body within its limits.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use warp::http::header::HeaderValue;
use warp::{Filter, Rejection};

use warp::path::FullPath;

pub(super) use super::context::request_id;
use super::context::{head, optional_header, Client, Head, Header, ServedAs};
use super::problem::ApiError;
use super::server::BodyTimedOut;
use super::{AppState, Route, MAX_BODY_BYTES};
use crate::auth::Bearer;
use crate::domain::Operation;

pub(super) fn with_state(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone {
    let state = state.clone();
    warp::any().map(move || state.clone())
}

/// The request's head, the state and the bearer token, authenticated
/// (after path and method matched): one filter, so that a request passes
/// few combinators. In `linkid dev`, an authenticated request's `Prefer`
/// controls act here, before the operation does (see `dev`).
pub(super) fn authorized(
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
                if let Some(dev) = &state.dev {
                    super::dev::apply(dev, operation, &head).await?;
                }
                Ok::<_, Rejection>((head, state, bearer))
            }
        })
        .untuple_one()
}

/// The state and the authenticated bearer token.
pub(super) fn bearer(
    state: &Arc<AppState>,
    operation: Operation,
) -> impl Filter<Extract = (Arc<AppState>, Bearer), Error = Rejection> + Clone {
    authorized(state, operation)
        .map(|_: Arc<Head>, state, bearer| (state, bearer))
        .untuple_one()
}

/// The query string, the state and the authenticated bearer token.
pub(super) fn query_and_bearer(
    state: &Arc<AppState>,
    operation: Operation,
) -> impl Filter<Extract = (String, Arc<AppState>, Bearer), Error = Rejection> + Clone {
    authorized(state, operation)
        .map(|head: Arc<Head>, state, bearer| (head.query.clone(), state, bearer))
        .untuple_one()
}

/// An operation's path, without captures (see `template`).
pub(super) fn path0(operation: Operation) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    template(operation).map(|_: Captured| ()).untuple_one()
}

/// An operation's path and its one `{…}` segment, raw.
pub(super) fn path1(
    operation: Operation,
) -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    template(operation).map(|[first, _]: Captured| first)
}

/// An operation's path and its two `{…}` segments, raw.
pub(super) fn path2(
    operation: Operation,
) -> impl Filter<Extract = (String, String), Error = Rejection> + Clone {
    template(operation)
        .map(|[first, second]: Captured| (first, second))
        .untuple_one()
}

/// The `{…}` segments of a path, in order (unused ones empty).
type Captured = [String; 2];

/// The request's path matched against an operation's route template in
/// the table; a match is recorded as the request's route, for its log
/// line, its metrics and a 405's `Allow` (whether its method then matches
/// or not).
fn template(operation: Operation) -> impl Filter<Extract = (Captured,), Error = Rejection> + Clone {
    warp::path::full().and_then(move |path: FullPath| {
        let captured = captures(operation.spec().route, path.as_str());
        if captured.is_some() {
            ServedAs::record_route(Route::Operation(operation));
        }
        std::future::ready(captured.ok_or_else(warp::reject::not_found))
    })
}

/// A path's `{…}` segments when it fits the template: every literal
/// segment equal, each `{…}` one non-empty segment (taken raw: decoding is
/// the parser's), nothing more — no trailing slash, as warp's `path!`.
fn captures(template: &str, path: &str) -> Option<Captured> {
    let mut captured = Captured::default();
    let mut found = 0;
    let mut segments = path.strip_prefix('/')?.split('/');
    for part in template.trim_start_matches('/').split('/') {
        let segment = segments.next()?;
        if part.starts_with('{') {
            if segment.is_empty() || found == captured.len() {
                return None;
            }
            captured[found] = segment.to_owned();
            found += 1;
        } else if part != segment {
            return None;
        }
    }
    segments.next().is_none().then_some(captured)
}

/// Records a route beside the API as the request's, once its path matched.
pub(super) fn recorded(route: Route) -> impl Filter<Extract = (), Error = Infallible> + Clone {
    warp::any()
        .map(move || ServedAs::record_route(route))
        .untuple_one()
}

/// The request's client (see `Head::client`).
pub(super) fn client(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Option<Client>,), Error = Infallible> + Clone {
    let trusted = Arc::new(state.trusted_proxies.clone());
    head().map(move |head: Arc<Head>| head.client(&trusted))
}

/// Authenticates the bearer, within the rate limits: a client that keeps
/// failing is refused for a while, and a token may have a request budget.
pub(super) fn authenticate(state: &AppState, head: &Head) -> Result<Bearer, Rejection> {
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
pub(super) fn json_body() -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
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

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}";

    #[test]
    fn a_path_fits_its_template_and_gives_its_segments_raw() {
        let captured = captures(
            ONE,
            "/api/admin/users/v4/users/ada%2F1/linked-identities/okta",
        );

        assert_eq!(captured, Some(["ada%2F1".to_string(), "okta".to_string()]));
        assert_eq!(
            captures(
                "/api/admin/users/v4/linked-identities",
                "/api/admin/users/v4/linked-identities"
            ),
            Some(Captured::default())
        );
    }

    #[test]
    fn a_path_that_differs_anywhere_does_not_fit() {
        for path in [
            "/api/admin/users/v4/users/u/linked-identities",
            "/api/admin/users/v4/users/u/linked-identities/okta/",
            "/api/admin/users/v4/users//linked-identities/okta",
            "/api/admin/users/v4/users/u/linked-identities/okta/more",
            "/api/admin/users/v5/users/u/linked-identities/okta",
            "api/admin/users/v4/users/u/linked-identities/okta",
            "",
        ] {
            assert_eq!(captures(ONE, path), None, "{path}");
        }
    }

    #[test]
    fn json_is_application_json_or_a_json_suffix() {
        let is = |v: &str| is_json(&HeaderValue::from_str(v).unwrap());
        assert!(is("application/json"));
        assert!(is("Application/JSON; charset=utf-8"));
        assert!(is("application/problem+json"));
        assert!(!is("text/json"));
        assert!(!is("application/jsonx"));
    }
}
