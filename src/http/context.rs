//! What each request carries besides its route: its id and start time, its
//! client's address, and raw header access that never rejects.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use std::cell::RefCell;

use warp::http::header::{self, HeaderName, HeaderValue};
use warp::http::HeaderMap;
use warp::Filter;

use crate::auth::Bearer;

/// Whom a request was served for, for its log line.
#[derive(Clone, Default)]
pub(crate) enum ServedAs {
    /// No token was asked for (or none was looked at yet).
    #[default]
    Nobody,
    /// A token was asked for and did not authenticate.
    Anonymous,
    Token(Bearer),
}

/// What the request's filters learned on its way, for its log line, its
/// metrics and a 405's `Allow`.
#[derive(Default)]
struct Served {
    by: ServedAs,
    /// The route whose path it matched last (its method may not have).
    route: Option<super::Route>,
}

tokio::task_local! {
    /// The server loop gives each request its own (`ServedAs::scope`).
    static SERVED: RefCell<Served>;
}

impl ServedAs {
    /// Runs a request's future with a place for whom it was served for.
    pub(crate) fn scope<F: std::future::Future>(
        request: F,
    ) -> impl std::future::Future<Output = F::Output> {
        SERVED.scope(RefCell::new(Served::default()), request)
    }

    /// Records whom the request is served for.
    pub(crate) fn record(served: ServedAs) {
        let _ = SERVED.try_with(|slot| slot.borrow_mut().by = served);
    }

    /// Records the route whose path the request matched.
    pub(crate) fn record_route(route: super::Route) {
        let _ = SERVED.try_with(|slot| slot.borrow_mut().route = Some(route));
    }

    /// The route whose path the request matched last, if any.
    pub(crate) fn route() -> Option<super::Route> {
        SERVED.try_with(|slot| slot.borrow().route).ok().flatten()
    }

    /// The log id of whom the request was served for: the token's, or
    /// `anonymous`, or `-` when no token was asked for.
    pub(crate) fn with_log_id<R>(f: impl FnOnce(&str) -> R) -> R {
        let served = SERVED
            .try_with(|slot| slot.borrow().by.clone())
            .unwrap_or_default();
        match &served {
            ServedAs::Nobody => f("-"),
            ServedAs::Anonymous => f("anonymous"),
            ServedAs::Token(bearer) => f(bearer.log_id()),
        }
    }
}

/// The request's id: the caller's `x-request-id` when sane, else a new one.
/// The server loop decides it once per request (in the request's [`Head`]),
/// so handlers (for the change feed) and the response agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id for a request that sent this `x-request-id` (or none).
    pub fn choose(given: Option<&HeaderValue>) -> RequestId {
        RequestId(
            given
                .and_then(|v| v.to_str().ok())
                .filter(|v| is_sane_request_id(v))
                .map(str::to_owned)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        )
    }
}

pub(super) fn request_id() -> impl Filter<Extract = (RequestId,), Error = Infallible> + Clone {
    head().map(|head: Arc<Head>| head.id.clone())
}

/// `x-request-id`, which requests may send and every response carries.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The headers the app reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Header {
    Authorization,
    ContentType,
    ContentLength,
    Accept,
    LastEventId,
    /// `linkid dev`'s controls (see `dev`).
    Prefer,
}

impl Header {
    const ALL: [Header; 6] = [
        Header::Authorization,
        Header::ContentType,
        Header::ContentLength,
        Header::Accept,
        Header::LastEventId,
        Header::Prefer,
    ];

    /// Its name, as a constant: looking a header up by a `&str` parses
    /// and hashes the name every time.
    fn name(self) -> &'static HeaderName {
        static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
        static PREFER: HeaderName = HeaderName::from_static("prefer");
        match self {
            Header::Authorization => &header::AUTHORIZATION,
            Header::ContentType => &header::CONTENT_TYPE,
            Header::ContentLength => &header::CONTENT_LENGTH,
            Header::Accept => &header::ACCEPT,
            Header::LastEventId => &LAST_EVENT_ID,
            Header::Prefer => &PREFER,
        }
    }
}

/// What the app reads from a request's head, taken once by the server loop
/// and shared as a request extension: warp's header and query filters
/// reject — an allocation each — when a header or the query is missing,
/// and most requests lack most of them.
#[derive(Debug)]
pub(crate) struct Head {
    /// The request's id (see [`RequestId`]).
    pub id: RequestId,
    /// The raw query string, "" when there is none.
    pub query: String,
    /// Whether the request says it carries a body.
    pub declares_body: bool,
    /// The first value of each header the app reads, raw.
    headers: [Option<HeaderValue>; Header::ALL.len()],
    /// Every `X-Forwarded-For` line, in order (none copied when none came).
    forwarded_for: Vec<String>,
    /// The TCP peer of the connection it came on (none for a request that
    /// did not come through the server loop).
    peer: Option<SocketAddr>,
    /// When the server loop took it.
    pub started: Instant,
    /// Its connection's account with the budget of unsent answers (none
    /// for a request that did not come through the server loop).
    pub unsent: Option<std::sync::Arc<super::unsent::UnsentAccount>>,
    /// It came as a HEAD, and is routed as the GET it stands for.
    pub was_head: bool,
}

impl Head {
    /// The head of a request from this peer with this target and these
    /// headers.
    pub(crate) fn of(peer: Option<SocketAddr>, query: Option<&str>, headers: &HeaderMap) -> Head {
        let length = headers.get(header::CONTENT_LENGTH);
        Head {
            id: RequestId::choose(headers.get(&X_REQUEST_ID)),
            query: query.unwrap_or("").to_owned(),
            declares_body: headers.contains_key(header::TRANSFER_ENCODING)
                || length.is_some_and(|n| n.as_bytes() != b"0"),
            headers: Header::ALL.map(|h| match h {
                // Preferences may come on several lines: one list.
                Header::Prefer => joined(headers, h.name()),
                _ => headers.get(h.name()).cloned(),
            }),
            forwarded_for: headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(|line| String::from_utf8_lossy(line.as_bytes()).into_owned())
                .collect(),
            peer,
            started: Instant::now(),
            unsent: None,
            was_head: false,
        }
    }

    /// The request's client: the TCP peer, or, when the peer is a trusted
    /// proxy, the client its `X-Forwarded-For` lines name.
    pub(super) fn client(&self, trusted: &[IpAddr]) -> Option<Client> {
        let peer = self.peer?.ip().to_canonical();
        Some(resolve_client(
            peer,
            self.forwarded_for.iter().map(String::as_str),
            trusted,
        ))
    }

    pub(crate) fn header(&self, header: Header) -> Option<HeaderValue> {
        self.headers[header as usize].clone()
    }
}

/// Every value of a header, joined by commas as one list (RFC 9110 §5.3).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let rest: Vec<&HeaderValue> = values.collect();
    if rest.is_empty() {
        return Some(first.clone());
    }
    let mut all = first.as_bytes().to_vec();
    for value in rest {
        all.extend_from_slice(b", ");
        all.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&all).ok()
}

/// The request's [`Head`] (one made here for a request that did not come
/// through the server loop).
pub(super) fn head() -> impl Filter<Extract = (Arc<Head>,), Error = Infallible> + Clone {
    warp::ext::optional::<Arc<Head>>().map(|head: Option<Arc<Head>>| {
        head.unwrap_or_else(|| Arc::new(Head::of(None, None, &HeaderMap::new())))
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
    header: Header,
) -> impl Filter<Extract = (Option<HeaderValue>,), Error = Infallible> + Clone {
    head().map(move |head: Arc<Head>| head.header(header))
}

/// The raw query string ("" when there is none).
pub(super) fn query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    head().map(|head: Arc<Head>| head.query.clone())
}

/// Who sent a request, as far as the server can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// Its address (an IPv4-mapped IPv6 address in its IPv4 form).
    Address(IpAddr),
    /// A forwarded hop that is no address (`unknown`, an obfuscated id), as
    /// the trusted proxy wrote it, cut to `MAX_NAMED_CLIENT` characters.
    Named(String),
}

impl Client {
    /// Whether the client is on this host.
    pub fn is_loopback(&self) -> bool {
        matches!(self, Client::Address(ip) if ip.is_loopback())
    }
}

/// The longest name of a `Client::Named` kept (it keys a rate limit).
const MAX_NAMED_CLIENT: usize = 64;

/// The client of a request from `peer` with these `X-Forwarded-For` lines.
/// Only a trusted peer's lines count. They are one list, in order (RFC 7230
/// §3.2.2; each proxy appends to it), read from the right: the first hop that
/// is not a trusted proxy is the client, whatever it says, since the hops
/// left of it are the client's own words. All trusted: the leftmost one.
fn resolve_client<'a>(
    peer: IpAddr,
    lines: impl Iterator<Item = &'a str>,
    trusted: &[IpAddr],
) -> Client {
    let mut client = Client::Address(peer);
    if !trusted.contains(&peer) {
        return client;
    }
    let hops: Vec<&str> = lines
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect();
    for hop in hops.into_iter().rev() {
        client = parse_hop(hop);
        match &client {
            Client::Address(ip) if trusted.contains(ip) => {}
            _ => break,
        }
    }
    client
}

/// One `X-Forwarded-For` hop: an IPv4 or IPv6 address, with or without a
/// port (`203.0.113.7:5555`, `[2001:db8::9]:443`, `[2001:db8::9]`), maybe
/// quoted; anything else names the client as it stands.
fn parse_hop(hop: &str) -> Client {
    let hop = hop.trim().trim_matches('"');
    let address = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
        });
    match address {
        Some(ip) => Client::Address(ip.to_canonical()),
        None => Client::Named(hop.chars().take(MAX_NAMED_CLIENT).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn address(text: &str) -> Client {
        Client::Address(ip(text))
    }

    #[test]
    fn hops_parse_with_or_without_ports_brackets_and_quotes() {
        assert_eq!(parse_hop("203.0.113.7"), address("203.0.113.7"));
        assert_eq!(parse_hop(" 203.0.113.7:5555 "), address("203.0.113.7"));
        assert_eq!(parse_hop("2001:db8::9"), address("2001:db8::9"));
        assert_eq!(parse_hop("[2001:db8::9]"), address("2001:db8::9"));
        assert_eq!(parse_hop("[2001:db8::9]:443"), address("2001:db8::9"));
        assert_eq!(parse_hop("\"[2001:db8::9]:443\""), address("2001:db8::9"));
        assert_eq!(parse_hop("::ffff:198.51.100.4"), address("198.51.100.4"));
        assert_eq!(
            parse_hop("[::ffff:198.51.100.4]:80"),
            address("198.51.100.4")
        );
    }

    #[test]
    fn a_hop_that_is_no_address_names_the_client_cut_short() {
        assert_eq!(parse_hop("unknown"), Client::Named("unknown".into()));
        assert_eq!(parse_hop("_hidden"), Client::Named("_hidden".into()));
        assert_eq!(
            parse_hop("203.0.113.7:port"),
            Client::Named("203.0.113.7:port".into())
        );
        let Client::Named(long) = parse_hop(&"x".repeat(1000)) else {
            panic!("a name");
        };
        assert_eq!(long.len(), MAX_NAMED_CLIENT);
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let client = resolve_client(ip("198.51.100.1"), ["203.0.113.7"].into_iter(), &[]);

        assert_eq!(client, address("198.51.100.1"));
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_across_lines_is_the_client() {
        let trusted = [ip("127.0.0.1"), ip("10.0.0.2")];
        let resolve =
            |lines: &[&str]| resolve_client(ip("127.0.0.1"), lines.iter().copied(), &trusted);

        assert_eq!(resolve(&["203.0.113.7"]), address("203.0.113.7"));
        assert_eq!(
            resolve(&["198.51.100.1, 203.0.113.7, 10.0.0.2"]),
            address("203.0.113.7")
        );
        // A client-sent line comes first; the proxy appends its own.
        assert_eq!(
            resolve(&["198.51.100.1", "203.0.113.7"]),
            address("203.0.113.7")
        );
        assert_eq!(
            resolve(&["198.51.100.1", "203.0.113.7,", "10.0.0.2"]),
            address("203.0.113.7")
        );
        assert_eq!(resolve(&["203.0.113.7:5555"]), address("203.0.113.7"));
        assert_eq!(resolve(&["[2001:db8::9]:443"]), address("2001:db8::9"));
        // No address: the client as the proxy named it, not the proxy.
        assert_eq!(
            resolve(&["198.51.100.1, unknown"]),
            Client::Named("unknown".into())
        );
        // Nothing forwarded, or only proxies: the leftmost known.
        assert_eq!(resolve(&[]), address("127.0.0.1"));
        assert_eq!(resolve(&[" , "]), address("127.0.0.1"));
        assert_eq!(resolve(&["10.0.0.2, 127.0.0.1"]), address("10.0.0.2"));
    }

    #[test]
    fn only_addresses_on_this_host_are_loopback() {
        assert!(address("127.0.0.1").is_loopback());
        assert!(address("::1").is_loopback());
        assert!(!address("203.0.113.7").is_loopback());
        assert!(!Client::Named("localhost".into()).is_loopback());
    }
}
