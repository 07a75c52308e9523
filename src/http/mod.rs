//! The HTTP edge: the operations (one file each, in `ops`), the routes
//! beside them (`service`), the filters they are built of, the one mapping
//! of outcomes to problem details, the OpenAPI document, rate limits, the
//! per-request context and the connection loop. Everything here speaks
//! HTTP; nothing below it does.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use warp::http::header::{HeaderValue, ALLOW, CONNECTION, VARY};
use warp::http::Method;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::Authority;
use crate::config::{EventsConfig, IdentityProviderConfig, MetricsConfig};
use crate::domain::Operation;
use crate::store::Store;

mod answer;
mod context;
pub(crate) mod dev;
mod docs;
pub(crate) mod error_answers;
mod filters;
pub(crate) mod openapi;
mod ops;
mod problem;
mod query;
pub(crate) mod rate_limit;
pub(crate) mod server;
mod service;
mod unsent;
mod url;

use context::{head, Head, ServedAs};
use problem::{problem_response, ApiError};
use rate_limit::RateLimits;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What every request handler shares.
pub struct AppState {
    pub store: Store,
    pub authority: Authority,
    pub limits: RateLimits,
    pub providers: Vec<IdentityProviderConfig>,
    pub metrics: MetricsConfig,
    pub cors_origins: Vec<String>,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub openapi_json: Bytes,
    pub events: EventsConfig,
    /// One permit per open event stream or long poll (`events.max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Turns true when the server starts shutting down: streams and long
    /// polls end then, so that draining does not wait for them.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The budget of answers waiting for their clients to read them.
    pub unsent: Arc<unsent::Unsent>,
    /// Answers of many rows being built at once (see `handlers::PageSlot`).
    pub pages: Arc<tokio::sync::Semaphore>,
    /// `linkid dev`'s controls; `None` in `serve`, which has none.
    pub dev: Option<dev::DevControls>,
}

impl AppState {
    /// The configured providers new links may use.
    pub fn linkable_providers(&self) -> impl Iterator<Item = &IdentityProviderConfig> {
        self.providers.iter().filter(|p| p.linkable)
    }
}

/// The whole application: every route, never rejecting.
pub fn app(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let origins = state.cors_origins.clone();
    let cors = !origins.is_empty();
    let routes = ops::routes(&state).or(service::routes(&state)).unify();
    let routes = if origins.is_empty() {
        routes.boxed()
    } else {
        // Preflights and cross-origin requests from other origins are
        // answered (or refused) by warp's CORS filter.
        let cors = warp::cors()
            .allow_origins(origins.iter().map(String::as_str))
            .allow_methods(cors_methods())
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
        routes.with(cors).map(Reply::into_response).boxed()
    };
    let outcome = no_tunnels()
        .and(routes)
        .map(Ok::<Response, Rejection>)
        .or_else(|rejection| async move { Ok::<_, Infallible>((Err(rejection),)) });
    head()
        .and(warp::method())
        .and(outcome)
        .map(move |head: Arc<Head>, method, outcome| {
            let mut response = finish(&head, method, outcome);
            if cors {
                // Answers differ by Origin: caches must keep them apart.
                response
                    .headers_mut()
                    .append(VARY, HeaderValue::from_static("origin"));
            }
            response
        })
}

/// The methods of the operations table (and HEAD wherever GET is), for
/// CORS preflights.
fn cors_methods() -> Vec<&'static str> {
    let mut methods = vec!["HEAD"];
    for spec in Operation::ALL.map(Operation::spec) {
        if !methods.contains(&spec.method) {
            methods.push(spec.method);
        }
    }
    methods
}

/// Refuses CONNECT, on any target: this server is no proxy and opens no
/// tunnels.
fn no_tunnels() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and_then(|method: Method| {
            std::future::ready(if method == Method::CONNECT {
                Err(warp::reject::custom(ApiError::MethodNotAllowed))
            } else {
                Ok(())
            })
        })
        .untuple_one()
}

/// Turns every outcome into the response: problem details for errors, the
/// request id on everything, and one metrics sample and log line each.
fn finish(head: &Head, method: Method, outcome: Result<Response, Rejection>) -> Response {
    let route = ServedAs::route();
    let mut response = match outcome {
        Ok(response) => response,
        Err(rejection) => {
            let error = ApiError::from_rejection(&rejection);
            if let ApiError::Internal(cause) = &error {
                tracing::error!(request_id = %head.id.0, error = ?cause, "request failed");
            }
            let mut response = problem_response(&error, &head.id.0);
            if matches!(error, ApiError::MethodNotAllowed) {
                // Empty where the target is no resource here: nothing is
                // allowed on it (RFC 9110 §10.2.1).
                let allow = route.map_or("", |route| route.allow());
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            // A request refused before its body was read (no or bad token,
            // wrong Content-Type, too large, no such route) leaves that body
            // on the connection, and hyper then closes it without a word: a
            // keep-alive client would send its next request into the closing
            // socket and get a connection error. Say that it closes.
            if head.declares_body {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    if let Some(unsent) = &head.unsent {
        response = within_unsent_budget(response, unsent, &head.id.0);
    }
    if let Ok(id) = HeaderValue::from_str(&head.id.0) {
        response.headers_mut().insert(&context::X_REQUEST_ID, id);
    }
    let elapsed = head.started.elapsed();
    let label = route.map_or("other", |r| r.label(&method));
    crate::telemetry::record_request(label, response.status().as_u16(), elapsed);
    // One line per request, no span: a span per request costs more than
    // the line. The token's log id was recorded when it authenticated.
    ServedAs::with_log_id(|token| {
        crate::telemetry::log_request(&crate::telemetry::RequestLine {
            method: if head.was_head {
                "HEAD"
            } else {
                method.as_str()
            },
            route: route.map_or("unknown", |r| r.template()),
            status: response.status().as_u16(),
            latency_us: elapsed.as_micros() as u64,
            request_id: &head.id.0,
            token,
        })
    });
    response
}

/// The response, counted against the budget of unsent answers until its
/// client's socket takes it; or, when it is large and the budget has no
/// room for it, a 503 that closes the connection instead (a client that
/// reads nothing could otherwise pipeline one after another).
fn within_unsent_budget(
    response: Response,
    unsent: &unsent::UnsentAccount,
    request_id: &str,
) -> Response {
    use hyper::body::Body as _;
    let size = match response.extensions().get::<answer::AnswerSize>() {
        Some(answer::AnswerSize(bytes)) => Some(*bytes as u64),
        None => response.body().size_hint().exact(),
    };
    let Some(bytes) = size else {
        // A stream of events: bounded by its own buffers.
        return response;
    };
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    if unsent.take(bytes) {
        return response;
    }
    let error = ApiError::ServerBusy {
        held: unsent.held_everywhere(),
    };
    let mut busy = problem_response(&error, request_id);
    busy.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    // Small enough always to be taken.
    let _ = unsent.take(busy.body().size_hint().exact().unwrap_or(0) as usize);
    busy
}

/// The route a request's path matched: an API operation's (whose method
/// may not have matched), or one beside the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Operation(Operation),
    Service {
        template: &'static str,
        /// Its metrics label.
        label: &'static str,
        /// Its `Allow` header.
        allow: &'static str,
    },
}

impl Route {
    /// A route beside the API, answered to GET (and HEAD).
    pub(crate) const fn service(template: &'static str, label: &'static str) -> Route {
        Route::Service {
            template,
            label,
            allow: "GET, HEAD",
        }
    }

    /// Its template, as the log line names it.
    pub fn template(self) -> &'static str {
        match self {
            Route::Operation(operation) => operation.spec().route,
            Route::Service { template, .. } => template,
        }
    }

    /// The metrics label of this route with this method: the operation's
    /// id, the service route's name, or `other` for a method it lacks.
    pub fn label(self, method: &Method) -> &'static str {
        match self {
            Route::Service { label, .. } => label,
            Route::Operation(matched) => Operation::ALL
                .into_iter()
                .map(Operation::spec)
                .find(|spec| spec.route == matched.spec().route && spec.method == method.as_str())
                .map_or("other", |spec| spec.id),
        }
    }

    /// The `Allow` header of this route (HEAD wherever GET is).
    pub fn allow(self) -> &'static str {
        static ALLOWS: OnceLock<Vec<(&'static str, &'static str)>> = OnceLock::new();
        let template = match self {
            Route::Service { allow, .. } => return allow,
            Route::Operation(operation) => operation.spec().route,
        };
        let allows = ALLOWS.get_or_init(|| {
            let mut allows: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
            for spec in Operation::ALL.map(Operation::spec) {
                let methods: &[&'static str] = if spec.method == "GET" {
                    &["GET", "HEAD"]
                } else {
                    std::slice::from_ref(&spec.method)
                };
                match allows.iter_mut().find(|(route, _)| *route == spec.route) {
                    Some((_, known)) => known.extend_from_slice(methods),
                    None => allows.push((spec.route, methods.to_vec())),
                }
            }
            allows
                .into_iter()
                .map(|(route, methods)| (route, &*Box::leak(methods.join(", ").into_boxed_str())))
                .collect()
        });
        allows
            .iter()
            .find(|(route, _)| *route == template)
            .map_or("GET, HEAD", |(_, allow)| allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_has_its_methods_and_labels_from_the_table() {
        let list = Route::Operation(Operation::ListLinkedIdentities);
        assert_eq!(
            list.template(),
            "/api/admin/users/v4/users/{user_id}/linked-identities"
        );
        assert_eq!(list.allow(), "GET, HEAD, POST");
        assert_eq!(list.label(&Method::POST), "linkIdentity");
        assert_eq!(list.label(&Method::PUT), "other");
        let one = Route::Operation(Operation::DeleteLinkedIdentity);
        assert_eq!(one.allow(), "GET, HEAD, DELETE");
        assert_eq!(one.label(&Method::GET), "getLinkedIdentity");
        let healthz = Route::service("/healthz", "healthz");
        assert_eq!(healthz.label(&Method::GET), "healthz");
        assert_eq!(healthz.allow(), "GET, HEAD");
    }
}
