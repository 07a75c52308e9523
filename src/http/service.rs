//! The routes beside the API: liveness and readiness, the metrics, the
//! OpenAPI document and its page, and `linkid dev`'s reset.

use std::sync::Arc;

use warp::http::header::{HeaderValue, CONTENT_TYPE};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::filters::{authenticate, client, recorded, with_state};
use super::problem::ApiError;
use super::{AppState, Route};
use crate::auth::Bearer;
use crate::domain::Right;

/// Routes beside the API, each with its template and metrics label.
const HEALTHZ: Route = Route::service("/healthz", "healthz");
const READYZ: Route = Route::service("/readyz", "readyz");
const METRICS: Route = Route::service("/metrics", "metrics");
const OPENAPI: Route = Route::service("/openapi.json", "openapi");
pub(super) const DEV_RESET: Route = Route::Service {
    template: "/_dev/reset",
    label: "devReset",
    allow: "POST",
};

/// Every route beside the API.
pub(super) fn routes(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    healthz()
        .or(readyz(state))
        .unify()
        .or(metrics_route(state))
        .unify()
        .or(openapi_json(state))
        .unify()
        .or(super::docs::docs())
        .unify()
        .or(dev_reset_route(state))
        .unify()
}

/// GET /healthz
fn healthz() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("healthz")
        .and(recorded(HEALTHZ))
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response())
}

/// GET /readyz
fn readyz(state: &Arc<AppState>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("readyz")
        .and(recorded(READYZ))
        .and(warp::get())
        .and(with_state(state))
        .and_then(readyz_answer)
}

/// GET /metrics
fn metrics_route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(recorded(METRICS))
        .and(warp::get())
        .and(with_state(state))
        .and(client(state))
        .and_then(metrics)
}

/// GET /openapi.json
fn openapi_json(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("openapi.json")
        .and(recorded(OPENAPI))
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

/// POST /_dev/reset (`linkid dev` only: elsewhere there is no such path)
fn dev_reset_route(
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
        .and(recorded(DEV_RESET))
        .and(warp::post())
        .and(super::context::head())
        .and(with_state(state))
        .and_then(
            |head: Arc<super::context::Head>, state: Arc<AppState>| async move {
                let bearer = authenticate(&state, &head)?;
                dev_reset(state, bearer).await
            },
        )
}

/// `POST /_dev/reset` (`linkid dev` only): the data as `linkid dev` started,
/// for a bearer that may do everything; 204.
async fn dev_reset(state: Arc<AppState>, bearer: Bearer) -> Result<Response, Rejection> {
    let Some(dev) = &state.dev else {
        return Err(warp::reject::not_found());
    };
    for right in Right::ALL {
        super::ops::authorize(&state, &bearer, right, None, None).await?;
    }
    crate::store::replace_all(
        &dev.database,
        &dev.rules,
        dev.providers.clone(),
        dev.fixtures.clone(),
    )
    .await
    .map_err(ApiError::from)?;
    state
        .store
        .reread_newest_event()
        .await
        .map_err(ApiError::from)?;
    // The feed starts again: each webhook resumes at its new end, as if
    // replayed there, and gets what changes from now on.
    let end = *state.store.newest_event().borrow();
    let standings = state
        .store
        .webhook_standings()
        .await
        .map_err(ApiError::from)?;
    for (standing, _) in standings {
        state
            .store
            .replay_webhook(standing.webhook, end)
            .await
            .map_err(ApiError::from)?;
    }
    let mut response = Response::new(bytes::Bytes::new().into());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// `GET /readyz`: 200 while the database answers, else 503 `NOT_READY` with the reason.
async fn readyz_answer(state: Arc<AppState>) -> Result<Response, Rejection> {
    state.store.ready().await.map_err(ApiError::NotReady)?;
    Ok(super::answer::json(
        StatusCode::OK,
        &serde_json::json!({"status": "ready"}),
    ))
}

/// `GET /metrics`: Prometheus text, when enabled and (by default) only to
/// loopback clients (behind trusted proxies, the forwarded client).
async fn metrics(
    state: Arc<AppState>,
    client: Option<super::context::Client>,
) -> Result<Response, Rejection> {
    let local = client
        .as_ref()
        .is_some_and(super::context::Client::is_loopback);
    if !state.metrics.enabled || (state.metrics.loopback_only && !local) {
        return Err(warp::reject::not_found());
    }
    let links = state.store.count().await.map_err(ApiError::from)?;
    let (connections, idle) = state.store.pool_state();
    metrics::gauge!("linkid_links_stored").set(links as f64);
    metrics::gauge!("linkid_db_pool_connections").set(connections);
    metrics::gauge!("linkid_db_pool_idle_connections").set(idle);
    metrics::gauge!("linkid_token_cache_entries").set(state.authority.cached_tokens() as f64);
    metrics::gauge!("linkid_token_cache_bytes").set(state.authority.cached_token_bytes() as f64);
    metrics::gauge!("linkid_unsent_answer_bytes").set(state.unsent.held() as f64);
    let mut response = Response::new(crate::telemetry::prometheus().render().into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
