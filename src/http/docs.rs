//! `/docs`: the interactive page for the OpenAPI document — Swagger UI
//! from files built into the binary (it loads nothing from the internet),
//! pointed at `/openapi.json`.

use std::sync::Arc;

use utoipa_swagger_ui::Config;
use warp::http::header::{
    HeaderValue, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, X_CONTENT_TYPE_OPTIONS,
};
use warp::http::StatusCode;
use warp::path::{FullPath, Tail};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::filters::recorded;
use super::problem::ApiError;
use super::Route;

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
        .and(recorded(Route::service("/docs", "docs")))
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
