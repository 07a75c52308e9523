//! One request to the server under judgement and its answer, read with
//! bounds: the server is untrusted, so every request times out, redirects
//! are never followed (a token must not travel elsewhere), and a body past
//! `MAX_BODY_BYTES` is refused rather than read.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde_json::Value;

use crate::domain::{Operation, API_PREFIX};

/// The most of an answer's body that is read.
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How long one request may take, connecting and reading included.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server under judgement: its base URL, the client and the token.
pub(crate) struct Api {
    client: reqwest::Client,
    /// The base URL without a trailing slash (the API is under `API_PREFIX`).
    base: String,
    token: String,
}

/// Which `Authorization` a request carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Auth<'a> {
    /// The token under which the run judges the server.
    Token,
    /// None at all.
    Without,
    /// `Bearer` and this (a token the server must refuse).
    Bearer(&'a str),
}

/// A request body.
pub(crate) enum Body {
    /// JSON, as `application/json`.
    Json(Value),
    /// These bytes, with this `Content-Type`.
    Raw {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
}

/// One request: what the check sends, beyond the method and target.
pub(crate) struct Request<'a> {
    pub method: Method,
    /// The path and query below the base URL.
    pub target: String,
    pub auth: Auth<'a>,
    pub body: Option<Body>,
    /// An `x-request-id` to send.
    pub request_id: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A request with the run's token and no body.
    pub(crate) fn new(method: Method, target: String) -> Request<'a> {
        Request {
            method,
            target,
            auth: Auth::Token,
            body: None,
            request_id: None,
        }
    }
}

/// An answer, its body read whole (within `MAX_BODY_BYTES`).
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// `METHOD path`, for messages.
    pub request: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON, when it is JSON.
    pub(crate) fn json(&self) -> Result<Value, String> {
        if self.body.is_empty() {
            return Err("the body is empty".to_string());
        }
        serde_json::from_slice(&self.body).map_err(|e| format!("the body is not JSON ({e})"))
    }

    /// A header's value as text, when present and readable.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The media type of `Content-Type`, lower-cased, without parameters.
    pub(crate) fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }

    /// How the answer went, for a failure message: status, error code and
    /// the start of the body.
    pub(crate) fn describe(&self) -> String {
        let code = self.json().ok().and_then(|body| error_code(&body));
        let text = String::from_utf8_lossy(&self.body);
        let excerpt: String = text.chars().take(200).collect();
        let more = if text.chars().count() > 200 {
            "…"
        } else {
            ""
        };
        format!(
            "{} to {} (code {}, body {})",
            self.status,
            self.request,
            code.as_deref().unwrap_or("-"),
            if excerpt.is_empty() {
                "empty".to_string()
            } else {
                format!("{excerpt}{more}")
            }
        )
    }
}

/// The error code an error body carries: its `code` member, else the first
/// string under a key named `code` anywhere in it.
pub(crate) fn error_code(body: &Value) -> Option<String> {
    if let Some(code) = body.get("code").and_then(Value::as_str) {
        return Some(code.to_string());
    }
    match body {
        Value::Object(members) => members.iter().find_map(|(key, value)| match value {
            Value::String(code) if key == "code" => Some(code.clone()),
            _ => error_code(value),
        }),
        Value::Array(items) => items.iter().find_map(error_code),
        _ => None,
    }
}

/// A request that got no answer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unanswered {
    pub request: String,
    pub why: String,
    /// Whether the server began an answer (a status came) before it failed.
    pub began: bool,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no answer to {}: {}", self.request, self.why)
    }
}

impl Api {
    /// A client for the server at `base` (an http or https URL).
    pub(crate) fn new(base: &str, token: String) -> Result<Api, String> {
        let base = parse_base(base)?;
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("linkid-conform/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Api {
            client,
            base,
            token,
        })
    }

    /// The base URL, as the run names the server.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// The token, so that messages can be cleared of it.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Sends a request and reads its answer.
    pub(crate) async fn send(&self, request: Request<'_>) -> Result<Answer, Unanswered> {
        let url = format!("{}{}", self.base, request.target);
        let shown = format!("{} {}", request.method, request.target);
        let unanswered = |why: String| Unanswered {
            request: shown.clone(),
            why,
            began: false,
        };
        let cut_short = |why: String| Unanswered {
            began: true,
            ..unanswered(why)
        };
        let mut builder = self.client.request(request.method.clone(), &url);
        let bearer = match request.auth {
            Auth::Token => Some(self.token.as_str()),
            Auth::Bearer(token) => Some(token),
            Auth::Without => None,
        };
        if let Some(token) = bearer {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| unanswered("the token is not a valid header value".to_string()))?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        if let Some(id) = request.request_id {
            builder = builder.header("x-request-id", id);
        }
        match request.body {
            Some(Body::Json(value)) => {
                builder = builder
                    .header(CONTENT_TYPE, "application/json")
                    .body(value.to_string());
            }
            Some(Body::Raw {
                content_type,
                bytes,
            }) => {
                builder = builder.header(CONTENT_TYPE, content_type).body(bytes);
            }
            None => {}
        }
        let mut response = builder.send().await.map_err(|e| unanswered(why(e)))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if response
            .content_length()
            .is_some_and(|length| length > MAX_BODY_BYTES as u64)
        {
            return Err(cut_short(format!(
                "its body is larger than {} MiB",
                MAX_BODY_BYTES >> 20
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| cut_short(why(e)))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(cut_short(format!(
                    "its body is larger than {} MiB",
                    MAX_BODY_BYTES >> 20
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            request: shown,
            status,
            headers,
            body,
        })
    }

    /// Resolves a `Location` header against the URL it came with, as a
    /// target below the base URL; an error when it points elsewhere (the
    /// token would go with it).
    pub(crate) fn target_of(&self, from_target: &str, location: &str) -> Result<String, String> {
        let from = Url::parse(&format!("{}{from_target}", self.base))
            .map_err(|e| format!("cannot parse the request URL: {e}"))?;
        let resolved = from
            .join(location)
            .map_err(|e| format!("Location {location:?} is not a URL reference: {e}"))?;
        let base = Url::parse(&self.base).map_err(|e| e.to_string())?;
        let base_path = base.path().trim_end_matches('/');
        let below = resolved.path().strip_prefix(base_path).unwrap_or("");
        if resolved.origin() != base.origin() || !below.starts_with('/') {
            return Err(format!(
                "Location {location:?} points away from {} (not followed: the token would go with it)",
                self.base
            ));
        }
        Ok(match resolved.query() {
            Some(query) => format!("{below}?{query}"),
            None => below.to_string(),
        })
    }
}

/// The message of a transport error: its cause chain, without the URL
/// (the request names it already).
fn why(error: reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
    }
    let error = error.without_url();
    let mut parts = vec![error.to_string()];
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&error);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// The base URL as given, checked: http or https, no query or fragment, no
/// trailing slash; a URL that names the API prefix itself is taken as its
/// server's base.
pub(crate) fn parse_base(text: &str) -> Result<String, String> {
    let url = Url::parse(text).map_err(|e| {
        format!("{text:?} is not a URL ({e}): give the server's base, e.g. http://127.0.0.1:8080")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{text:?} is not an http or https URL: give the server's base, e.g. http://127.0.0.1:8080"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} has a query or fragment: give the server's base, e.g. http://127.0.0.1:8080"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{} holds credentials: pass the token with --token or LINKID_CONFORM_TOKEN instead",
            url.host_str().unwrap_or("the URL")
        ));
    }
    let mut base = url.as_str().trim_end_matches('/').to_string();
    if let Some(server) = base.strip_suffix(API_PREFIX) {
        base = server.to_string();
    }
    Ok(base)
}

/// The target of an operation: its route with the path parameters filled
/// in (percent-encoded), and `query` (with its `?`, or empty) after it.
pub(crate) fn target(operation: Operation, params: &[(&str, &str)], query: &str) -> String {
    let mut route = operation.spec().route.to_string();
    for (name, value) in params {
        route = route.replace(&format!("{{{name}}}"), &segment(value));
    }
    format!("{route}{query}")
}

/// One path segment, percent-encoded.
pub(crate) fn segment(value: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, SEGMENT).to_string()
}

/// A query string (`?a=b&c=d`) from pairs.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        query.append_pair(name, value);
    }
    format!("?{}", query.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_loses_its_trailing_slash_and_the_api_prefix() {
        assert_eq!(
            parse_base("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            parse_base("https://ids.example.com/api/admin/users/v4").unwrap(),
            "https://ids.example.com"
        );
        assert_eq!(
            parse_base("https://example.com/ids/").unwrap(),
            "https://example.com/ids"
        );
    }

    #[test]
    fn a_base_url_must_be_http_without_query_or_credentials() {
        assert!(parse_base("127.0.0.1:8080").is_err());
        assert!(parse_base("ftp://example.com")
            .unwrap_err()
            .contains("http"));
        assert!(parse_base("http://example.com/?a=b").is_err());
        assert!(parse_base("http://ada:secret@example.com")
            .unwrap_err()
            .contains("credentials"));
    }

    #[test]
    fn targets_fill_the_route_with_encoded_segments() {
        assert_eq!(
            target(
                Operation::DeleteLinkedIdentity,
                &[("user_id", "conform-ab-1"), ("provider_id", "a/b c")],
                ""
            ),
            "/api/admin/users/v4/users/conform-ab-1/linked-identities/a%2Fb%20c"
        );
        assert_eq!(
            query(&[("provider_id", "okta"), ("linked_user_id", "a&b")]),
            "?provider_id=okta&linked_user_id=a%26b"
        );
    }

    #[test]
    fn an_error_code_is_found_in_problem_details_and_in_other_shapes() {
        let problem = serde_json::json!({"code": "USER_ALREADY_LINKED", "status": 400});
        assert_eq!(error_code(&problem).unwrap(), "USER_ALREADY_LINKED");
        let nested =
            serde_json::json!({"error": {"message": "no", "code": "INVALID_IDENTITY_PROVIDER"}});
        assert_eq!(error_code(&nested).unwrap(), "INVALID_IDENTITY_PROVIDER");
        assert_eq!(error_code(&serde_json::json!({"error": "x"})), None);
    }

    #[test]
    fn a_location_below_the_base_resolves_and_one_elsewhere_is_refused() {
        let api = Api::new("http://127.0.0.1:8080", "t".to_string()).unwrap();
        let from = "/api/admin/users/v4/users/u/linked-identities";
        assert_eq!(
            api.target_of(from, "/api/admin/users/v4/users/u/linked-identities/okta")
                .unwrap(),
            "/api/admin/users/v4/users/u/linked-identities/okta"
        );
        assert_eq!(
            api.target_of(from, "linked-identities/okta").unwrap(),
            "/api/admin/users/v4/users/u/linked-identities/okta"
        );
        assert!(api
            .target_of(from, "http://evil.example/steal")
            .unwrap_err()
            .contains("points away"));
    }
}
