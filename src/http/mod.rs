//! The HTTP edge: warp filters (one per operation), handlers, the one
//! mapping of outcomes to problem details, the OpenAPI document, rate limits
//! and the per-request context. Everything here speaks HTTP; nothing below
//! it does.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use warp::http::header::{HeaderValue, ALLOW, CONNECTION, VARY};
use warp::http::Method;
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::Authority;
use crate::config::{EventsConfig, IdentityProviderConfig, MetricsConfig};
use crate::domain::Operation;
use crate::store::Store;

mod answer;
mod context;
pub(crate) mod dev;
mod filters;
mod handlers;
pub(crate) mod openapi;
mod problem;
mod query;
pub(crate) mod rate_limit;
pub(crate) mod server;
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
    pub unsent: Arc<server::Unsent>,
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
    let routes = if origins.is_empty() {
        filters::routes(state).boxed()
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
        filters::routes(state)
            .with(cors)
            .map(Reply::into_response)
            .boxed()
    };
    let outcome = no_tunnels()
        .and(routes)
        .map(Ok::<Response, Rejection>)
        .or_else(|rejection| async move { Ok::<_, Infallible>((Err(rejection),)) });
    head()
        .and(warp::method())
        .and(warp::path::full())
        .and(outcome)
        .map(move |head: Arc<Head>, method, path, outcome| {
            let mut response = finish(&head, method, path, outcome);
            if cors {
                // Answers differ by Origin: caches must keep them apart.
                response
                    .headers_mut()
                    .append(VARY, HeaderValue::from_static("origin"));
            }
            response
        })
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
fn finish(
    head: &Head,
    method: Method,
    path: FullPath,
    outcome: Result<Response, Rejection>,
) -> Response {
    let route = route_of(path.as_str());
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
                let allow = route.map_or("", Route::allow);
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
            route: route.map_or("unknown", |r| r.template),
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
    unsent: &server::UnsentAccount,
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

/// A known path: its template and, through the operations table, its
/// methods and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub template: &'static str,
    /// The label of a route that is not an API operation (`healthz`, …).
    service: Option<&'static str>,
}

/// `linkid dev`'s reset's metrics label.
const DEV_RESET: &str = "devReset";

/// Routes beside the API: (template, metrics label). `/docs` also covers
/// everything below it; `/_dev/reset` exists in `linkid dev` only.
const SERVICE_ROUTES: [(&str, &str); 6] = [
    ("/healthz", "healthz"),
    ("/readyz", "readyz"),
    ("/metrics", "metrics"),
    ("/openapi.json", "openapi"),
    ("/docs", "docs"),
    ("/_dev/reset", DEV_RESET),
];

impl Route {
    /// The metrics label of this route with this method: the operation's
    /// id, the service route's name, or `other` for a method it lacks.
    pub fn label(self, method: &Method) -> &'static str {
        if let Some(service) = self.service {
            return service;
        }
        Operation::ALL
            .into_iter()
            .map(Operation::spec)
            .find(|spec| spec.route == self.template && spec.method == method.as_str())
            .map_or("other", |spec| spec.id)
    }

    /// The `Allow` header of this route (HEAD wherever GET is).
    pub fn allow(self) -> &'static str {
        static ALLOWS: OnceLock<Vec<(&'static str, &'static str)>> = OnceLock::new();
        if let Some(service) = self.service {
            return if service == DEV_RESET {
                "POST"
            } else {
                "GET, HEAD"
            };
        }
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
            .find(|(route, _)| *route == self.template)
            .map_or("GET", |(_, allow)| allow)
    }
}

/// The known route a request path falls under, if any.
pub fn route_of(path: &str) -> Option<Route> {
    let path = path.trim_matches('/');
    if path == "docs" || path.starts_with("docs/") {
        return Some(Route {
            template: "/docs",
            service: Some("docs"),
        });
    }
    if let Some((template, label)) = SERVICE_ROUTES
        .into_iter()
        .find(|(template, _)| template.trim_start_matches('/') == path)
    {
        return Some(Route {
            template,
            service: Some(label),
        });
    }
    // Each request looks its route up: compare segments only with the
    // templates that have as many.
    static TEMPLATES: OnceLock<Vec<(&'static str, usize)>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        Operation::ALL
            .into_iter()
            .map(|op| op.spec().route)
            .map(|t| (t, t.trim_matches('/').split('/').count()))
            .collect()
    });
    let segments = path.split('/').count();
    templates
        .iter()
        .filter(|(_, n)| *n == segments)
        .map(|(template, _)| *template)
        .find(|template| template_matches(template, path))
        .map(|template| Route {
            template,
            service: None,
        })
}

/// Whether a path (without its outer slashes) fits a template whose
/// `{name}` segments stand for any one segment.
fn template_matches(template: &str, path: &str) -> bool {
    let mut template = template.trim_matches('/').split('/');
    let mut path = path.split('/');
    loop {
        match (template.next(), path.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t.starts_with('{') || t == p => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_under_their_route_with_its_methods_and_labels() {
        let list = route_of("/api/admin/users/v4/users/u-1/linked-identities").unwrap();
        assert_eq!(
            list.template,
            "/api/admin/users/v4/users/{user_id}/linked-identities"
        );
        assert_eq!(list.allow(), "GET, HEAD, POST");
        assert_eq!(list.label(&Method::POST), "linkIdentity");
        assert_eq!(list.label(&Method::PUT), "other");
        let one = route_of("/api/admin/users/v4/users/u-1/linked-identities/okta").unwrap();
        assert_eq!(one.allow(), "GET, HEAD, DELETE");
        assert_eq!(one.label(&Method::GET), "getLinkedIdentity");
        assert_eq!(route_of("/healthz").unwrap().label(&Method::GET), "healthz");
        assert_eq!(route_of("/docs/index.html").unwrap().template, "/docs");
        assert_eq!(route_of("/api/admin/users/v4/users"), None);
        assert_eq!(route_of("/nope"), None);
    }
}
