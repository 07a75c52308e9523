//! What each request carries besides its route: its id and start time, its
//! client's address, and raw header access that never rejects.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use warp::http::header::HeaderValue;
use warp::Filter;

use super::server::PeerAddr;

/// Per-request context taken before routing: the request id and the start time.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: String,
    pub started: Instant,
}

pub(super) fn request_context(
) -> impl Filter<Extract = (RequestContext,), Error = Infallible> + Clone {
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

/// A header's raw value, if present (never rejects, whatever its bytes).
pub(super) fn optional_header(
    name: &'static str,
) -> impl Filter<Extract = (Option<HeaderValue>,), Error = Infallible> + Clone {
    warp::header::value(name)
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}

/// Whether the request says it carries a body.
pub(super) fn declares_body() -> impl Filter<Extract = (bool,), Error = Infallible> + Clone {
    optional_header("content-length")
        .and(optional_header("transfer-encoding"))
        .map(
            |length: Option<HeaderValue>, encoding: Option<HeaderValue>| {
                encoding.is_some() || length.is_some_and(|n| n.as_bytes() != b"0")
            },
        )
}

/// The client's address: the TCP peer, or, when the peer is a trusted
/// proxy, the nearest untrusted address in `X-Forwarded-For`.
pub(super) fn client_address(
    trusted: Arc<Vec<IpAddr>>,
) -> impl Filter<Extract = (Option<IpAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerAddr>()
        .and(optional_header("x-forwarded-for"))
        .map(
            move |peer: Option<PeerAddr>, forwarded: Option<HeaderValue>| {
                let peer = peer?.0.ip();
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
