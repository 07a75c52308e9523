//! One connection: hyper serving the app on it, with timeouts for a
//! request's head, its body, an idle keep-alive wait and a client that
//! stops reading, and a shutdown that closes it when it is idle or stalled.
//!
//! Each connection has a [`Connection`] record of what it is doing (its
//! [`Phase`]); the socket wrapper, the request and response bodies and the
//! connection's own task keep it current, and the task closes the
//! connection when the phase's deadline passes, or when its socket has
//! taken none of the server's bytes for `write_timeout`. The socket also
//! counts the answer bytes it takes out of the budget of unsent answers
//! (see `unsent`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use warp::http::header::{HeaderValue, CONNECTION};
use warp::http::{Method, Request, Uri};
use warp::reply::Response;

use super::Settings;
use crate::http::context::{Head, ServedAs};
use crate::http::unsent::UnsentAccount;

/// At shutdown, a body still arriving gets this much longer, so that a
/// request half sent at the signal can finish while a trickled one cannot
/// hold the shutdown.
const SHUTDOWN_BODY_GRACE: Duration = Duration::from_secs(1);

/// A request body that did not arrive in time (the error its body stream
/// yields); the request is answered 408 and its connection closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the body did not arrive within {} s", .0.as_secs())]
pub(crate) struct BodyTimedOut(pub Duration);

/// What a connection is doing, which decides when it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request under way: since the connection opened (`first`), or
    /// since the last response.
    Waiting { since: Instant, first: bool },
    /// A request's head is arriving; it is due `header_read_timeout` after
    /// `since` (the connection's start for a first request).
    ReadingHead { since: Instant },
    /// A request is in its handler or its response is being written (its
    /// body has its own deadline).
    Busy,
}

impl Phase {
    /// When the connection is closed if nothing happens first.
    fn deadline(self, settings: &Settings) -> Option<Instant> {
        match self {
            Phase::Waiting { since, first: true } | Phase::ReadingHead { since } => {
                Some(since + settings.header_read_timeout)
            }
            Phase::Waiting {
                since,
                first: false,
            } => Some(since + settings.keep_alive_timeout),
            Phase::Busy => None,
        }
    }

    /// When the connection's task looks at the phase next, at `now`: its
    /// deadline, but at most one `tick` away. Phases change without waking
    /// the task (three times a request), and no change brings a deadline
    /// nearer than one tick from when it happens, so a timer set this way
    /// is never late and a request costs no timer of its own.
    fn check_at(self, now: Instant, settings: &Settings) -> Instant {
        let next = now + settings.tick();
        self.deadline(settings).map_or(next, |due| due.min(next))
    }

    /// Bytes arrived from the client.
    fn on_bytes(self, now: Instant) -> Phase {
        match self {
            Phase::Waiting { since, first: true } => Phase::ReadingHead { since },
            Phase::Waiting { first: false, .. } => Phase::ReadingHead { since: now },
            other => other,
        }
    }
}

/// One connection's shared record: its phase, and what shutdown and the
/// body timeout need to tell each other.
#[derive(Debug)]
struct Connection {
    phase: Mutex<Phase>,
    /// When shutdown began, if it has.
    stopping_since: Mutex<Option<Instant>>,
    /// The request body waiting for bytes, to wake when shutdown begins.
    body_waiting: Mutex<Option<Waker>>,
    /// A body timed out: the connection closes after its answer.
    body_timed_out: AtomicBool,
    /// When the connection opened: the origin of `write_blocked_since`.
    opened: Instant,
    /// Nanoseconds after `opened` from which the socket has taken none of
    /// the bytes the server is trying to send, plus one; 0 while it takes them.
    write_blocked_since: AtomicU64,
    /// Its account with the budget of unsent answers, which its requests'
    /// heads share.
    unsent: Arc<UnsentAccount>,
}

impl Connection {
    fn new(now: Instant, unsent: Arc<UnsentAccount>) -> Connection {
        Connection {
            phase: Mutex::new(Phase::Waiting {
                since: now,
                first: true,
            }),
            stopping_since: Mutex::new(None),
            body_waiting: Mutex::new(None),
            body_timed_out: AtomicBool::new(false),
            opened: now,
            write_blocked_since: AtomicU64::new(0),
            unsent,
        }
    }

    /// The socket took `written` bytes: the answer bytes among them leave
    /// the budget, and writing is not blocked.
    fn wrote(&self, written: usize) {
        if self.write_blocked_since.load(Ordering::Relaxed) != 0 {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
        self.unsent.sent(written);
    }

    /// The socket took none of the bytes offered: writing is blocked from
    /// now, unless it already was.
    fn write_blocked(&self, now: Instant) {
        if self.write_blocked_since.load(Ordering::Relaxed) == 0 {
            let since = now.saturating_duration_since(self.opened).as_nanos() as u64 + 1;
            self.write_blocked_since.store(since, Ordering::Relaxed);
        }
    }

    /// Whether the socket has taken none of the server's bytes for `timeout`.
    fn write_stalled(&self, now: Instant, timeout: Duration) -> bool {
        match self.write_blocked_since.load(Ordering::Relaxed) {
            0 => false,
            since => {
                let since = self.opened + Duration::from_nanos(since - 1);
                now.saturating_duration_since(since) >= timeout
            }
        }
    }

    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Changes the phase. The connection's task is not woken: its timer is
    /// never later than the deadline a change can bring (see `Phase::check_at`).
    fn set_phase(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = lock(&self.phase);
        *phase = change(*phase);
    }

    fn begin_stopping(&self, now: Instant) {
        *lock(&self.stopping_since) = Some(now);
        if let Some(body) = lock(&self.body_waiting).take() {
            body.wake();
        }
    }

    fn stopping_since(&self) -> Option<Instant> {
        *lock(&self.stopping_since)
    }
}

/// The data behind a lock; a panic while holding one of these leaves no
/// half-made change, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves one connection until the client closes it, a deadline passes, or
/// shutdown closes it.
pub(super) async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    app: S,
    settings: Arc<Settings>,
    mut stopping: watch::Receiver<bool>,
) where
    S: Service<Request<TimedBody>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let unsent = Arc::new(UnsentAccount::new(settings.unsent.clone()));
    let connection = Arc::new(Connection::new(Instant::now(), unsent));
    let io = TokioIo::new(WatchedStream {
        stream,
        connection: connection.clone(),
    });
    let service = {
        let connection = connection.clone();
        let settings = settings.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            connection.set_phase(|_| Phase::Busy);
            let request = prepare(request, peer, &settings, &connection);
            let answer = ServedAs::scope(app.clone().call(request));
            let connection = connection.clone();
            async move {
                let Ok(mut response) = answer.await;
                if connection.body_timed_out.load(Ordering::Relaxed) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response.map(|body| ResponseBody {
                    body,
                    _sent: ResponseSent(connection),
                }))
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    // The deadlines here replace hyper's, whose header timer also runs
    // while a keep-alive connection waits for its next request.
    http.header_read_timeout(None);
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopped = false;
    let timer = tokio::time::sleep_until(Instant::now() + settings.tick());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
                return;
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                let phase = connection.phase();
                if phase.deadline(&settings).is_some_and(|due| due <= now) {
                    tracing::debug!(%peer, ?phase, "connection timed out");
                    return;
                }
                if connection.write_stalled(now, settings.write_timeout) {
                    tracing::debug!(%peer, "connection closed: the client took none of the server's bytes in server.write_timeout_secs");
                    return;
                }
                timer.as_mut().reset(phase.check_at(now, &settings));
            }
            _ = stopping.changed(), if !stopped => {
                stopped = true;
                connection.begin_stopping(Instant::now());
                // After the response in hand, if any, the connection closes.
                conn.as_mut().graceful_shutdown();
                if connection.phase() != Phase::Busy {
                    return;
                }
            }
        }
    }
}

/// Readies a request for the app: its peer, a target warp can route, and
/// a body with a deadline.
fn prepare(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    settings: &Settings,
    connection: &Arc<Connection>,
) -> Request<TimedBody> {
    // The request id is decided once, so the response, the log line and
    // the change feed agree.
    let mut head = Head::of(Some(peer), request.uri().query(), request.headers());
    // HEAD is answered wherever GET is: routed as GET, and hyper, which
    // knows the request was a HEAD, sends the answer's head alone.
    if request.method() == Method::HEAD {
        *request.method_mut() = Method::GET;
        head.was_head = true;
    }
    head.unsent = Some(connection.unsent.clone());
    request.extensions_mut().insert(Arc::new(head));
    // An authority-form target (`CONNECT host:port`) has no path, and
    // warp's `path::full()` panics on it; give it the root path, which the
    // app then refuses.
    if request.uri().path_and_query().is_none() {
        *request.uri_mut() = Uri::from_static("/");
    }
    let timeout = settings.body_timeout;
    request.map(|body| TimedBody {
        body,
        due: Instant::now() + timeout,
        timeout,
        timer: None,
        connection: connection.clone(),
    })
}

/// A request body that must arrive by `due` (or soon after shutdown
/// begins); late, it ends with [`BodyTimedOut`].
pub(crate) struct TimedBody {
    body: Incoming,
    due: Instant,
    timeout: Duration,
    /// Made on the first wait only: most requests have no body to wait for.
    timer: Option<Pin<Box<Sleep>>>,
    connection: Arc<Connection>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => return Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {}
        }
        // Registered before looking, so that a shutdown beginning in
        // between still wakes this body.
        *lock(&this.connection.body_waiting) = Some(cx.waker().clone());
        let due = match this.connection.stopping_since() {
            Some(since) => this.due.min(since + SHUTDOWN_BODY_GRACE),
            None => this.due,
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.connection
                    .body_timed_out
                    .store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that, once hyper is done with it, starts the
/// connection's keep-alive wait.
struct ResponseBody<B> {
    body: B,
    _sent: ResponseSent,
}

impl<B: Body + Unpin> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

struct ResponseSent(Arc<Connection>);

impl Drop for ResponseSent {
    fn drop(&mut self) {
        let now = Instant::now();
        self.0.set_phase(|_| Phase::Waiting {
            since: now,
            first: false,
        });
    }
}

/// The socket, noting when a request's first bytes arrive, and how the
/// server's bytes leave.
struct WatchedStream {
    stream: TcpStream,
    connection: Arc<Connection>,
}

impl WatchedStream {
    fn note(&self, written: &Poll<std::io::Result<usize>>) {
        match written {
            Poll::Ready(Ok(n)) => self.connection.wrote(*n),
            Poll::Pending => self.connection.write_blocked(Instant::now()),
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = Instant::now();
            this.connection.set_phase(|phase| phase.on_bytes(now));
        }
        read
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.note(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.note(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(30),
            max_connections: 16,
            shutdown_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            unsent: Arc::new(crate::http::unsent::Unsent::new(1 << 20)),
        }
    }

    #[test]
    fn a_first_request_has_the_header_timeout_from_the_connections_start() {
        let start = Instant::now();
        let later = start + Duration::from_secs(5);
        let fresh = Phase::Waiting {
            since: start,
            first: true,
        };

        let reading = fresh.on_bytes(later);

        assert_eq!(
            fresh.deadline(&settings()),
            Some(start + Duration::from_secs(10))
        );
        assert_eq!(
            reading.deadline(&settings()),
            Some(start + Duration::from_secs(10))
        );
    }

    #[test]
    fn a_kept_alive_connection_waits_the_keep_alive_timeout_then_the_header_timeout() {
        let done = Instant::now();
        let idle = Phase::Waiting {
            since: done,
            first: false,
        };
        let next = done + Duration::from_secs(60);

        assert_eq!(
            idle.deadline(&settings()),
            Some(done + Duration::from_secs(75))
        );
        assert_eq!(
            idle.on_bytes(next).deadline(&settings()),
            Some(next + Duration::from_secs(10))
        );
        assert_eq!(Phase::Busy.deadline(&settings()), None);
        assert_eq!(Phase::Busy.on_bytes(next), Phase::Busy);
    }
}
