//! The accept loop: serves the app over HTTP/1.1 with hyper, one task per
//! connection, with what warp's own server lacks — timeouts for a request's
//! head, its body and an idle keep-alive connection, a limit on connections
//! below the file limit, an accept loop that backs off instead of spinning,
//! and a shutdown that closes idle and stalled connections at once.
//!
//! Each connection has a [`Connection`] record of what it is doing (its
//! [`Phase`]); the socket wrapper, the request and response bodies and the
//! connection's own task keep it current, and the task closes the
//! connection when the phase's deadline passes.
//!
//! What a client that stops reading can make the server hold is bounded
//! twice: a connection whose socket takes none of the server's bytes for
//! `write_timeout` is closed, and every answer is counted against one
//! budget of unsent bytes ([`Unsent`]) from the moment it is made until
//! the socket has taken it, so that the app can refuse an answer that
//! would pass the budget instead of holding it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use warp::http::header::{HeaderValue, CONNECTION};
use warp::http::{Method, Request, Uri};
use warp::reply::Response;

use super::context::{Head, ServedAs};
use crate::config::ServerConfig;

/// Clients past `max_connections` wait in the kernel's accept queue; this
/// deep (the kernel may cap it at `net.core.somaxconn`), not std's 128.
const LISTEN_BACKLOG: u32 = 1024;

/// Files kept free beside the connections: the database's files and the
/// ones it opens later (journals, backups), the log, PostgreSQL sockets.
const SPARE_FILES: u64 = 64;

/// How long the accept loop waits after an error that is not one client's
/// (out of files or memory) before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this period about failing `accept`s.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// At shutdown, a body still arriving gets this much longer, so that a
/// request half sent at the signal can finish while a trickled one cannot
/// hold the shutdown.
const SHUTDOWN_BODY_GRACE: Duration = Duration::from_secs(1);

/// A request body that did not arrive in time (the error its body stream
/// yields); the request is answered 408 and its connection closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the body did not arrive within {} s", .0.as_secs())]
pub(crate) struct BodyTimedOut(pub Duration);

/// How the server treats connections, from `[server]`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// A request's head must be in by then (from the connection's start
    /// for its first request, from the first byte for later ones).
    pub header_read_timeout: Duration,
    /// An idle connection waits this long for its next request.
    pub keep_alive_timeout: Duration,
    /// A request's body must be in this long after its head.
    pub body_timeout: Duration,
    /// Connections served at once, already below the file limit.
    pub max_connections: usize,
    /// How long requests in their handlers may take to finish at shutdown.
    pub shutdown_timeout: Duration,
    /// How long the socket may take none of the server's bytes before the
    /// connection is closed.
    pub write_timeout: Duration,
    /// Answers waiting for clients to read them, and the most there may be.
    pub unsent: Arc<Unsent>,
}

impl Settings {
    /// The shortest wait a phase change can start: how often, at most, a
    /// connection's task looks at its phase.
    fn tick(&self) -> Duration {
        self.header_read_timeout
            .min(self.keep_alive_timeout)
            .min(self.write_timeout)
    }

    /// The settings from the config, with the soft file limit raised to the
    /// hard one and `max_connections` lowered to fit under it.
    pub(crate) fn from_config(config: &ServerConfig) -> anyhow::Result<Settings> {
        let files = raise_file_limit();
        let open = open_files();
        let max_connections =
            connection_limit(config.max_connections, files, open).ok_or_else(|| {
                anyhow::anyhow!(
                    "the file limit ({files}, with {open} open) leaves no room for connections: \
                     raise it (ulimit -n, or LimitNOFILE= in a systemd unit)"
                )
            })?;
        if max_connections < config.max_connections {
            tracing::warn!(
                configured = config.max_connections,
                serving = max_connections,
                file_limit = files,
                "server.max_connections lowered to fit the file limit; raise the limit (ulimit -n, LimitNOFILE=) to serve more"
            );
        }
        Ok(Settings {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(config.keep_alive_timeout_secs),
            body_timeout: Duration::from_secs(config.body_timeout_secs),
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
            write_timeout: Duration::from_secs(config.write_timeout_secs),
            unsent: Arc::new(Unsent::new(
                usize::try_from(config.max_unsent_bytes).unwrap_or(usize::MAX),
            )),
        })
    }
}

/// Raises the soft limit on open files to the hard limit; returns the soft
/// limit in force.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// The files this process has open now (a guess where /proc is missing).
fn open_files() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(32, |entries| entries.count() as u64)
}

/// The connections to serve at once: as configured, but leaving the files
/// already open and `SPARE_FILES` free; `None` when nothing is left.
fn connection_limit(configured: u64, file_limit: u64, open: u64) -> Option<u64> {
    let room = file_limit.saturating_sub(open.saturating_add(SPARE_FILES));
    Some(configured.min(room)).filter(|n| *n > 0)
}

/// Binds `addr` with a deep accept queue.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As std does: a restarted server can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` (`warp::service` of the app's filter) on `listener` until
/// `shutdown` completes; then stops accepting, closes idle and stalled
/// connections, and waits up to `shutdown_timeout` for requests in their
/// handlers before dropping them.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    app: S,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<TimedBody>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        // Past the limit, stop accepting: new clients wait in the accept queue.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                let connection = serve_connection(
                    stream,
                    peer,
                    app.clone(),
                    settings.clone(),
                    stopping.clone(),
                );
                connections.spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            // One client's trouble (it reset before we accepted): next.
            Err(error) if is_one_clients(&error) => {}
            // Out of files or memory: every retry would fail alike, so wait
            // for connections to close rather than spin.
            Err(error) => {
                if let Some(since) = errors.record(Instant::now()) {
                    tracing::warn!(
                        error = %error,
                        failures_since_last_report = since,
                        "cannot accept connections; retrying every {ACCEPT_BACKOFF:?} (raise the file limit or lower server.max_connections)"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    // New clients are refused from here on.
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(settings.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "in-flight requests did not finish in {:?}; stopping anyway",
            settings.shutdown_timeout
        );
        connections.shutdown().await;
    }
}

/// Whether an `accept` error is about one client only, so the next
/// `accept` may well succeed.
fn is_one_clients(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// Counts `accept` failures so that they are logged once per
/// `ACCEPT_LOG_EVERY`, not once each.
#[derive(Debug, Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// Records a failure; returns how many there were since the last log
    /// line when this one should be logged.
    fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < ACCEPT_LOG_EVERY)
        {
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

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

/// The bytes of answers made but not yet taken by their clients' sockets,
/// over all connections, and the most there may be.
#[derive(Debug)]
pub(crate) struct Unsent {
    limit: usize,
    held: AtomicUsize,
}

/// Answers up to this size are always sent, whatever the budget holds: a
/// client that does not read can hold one of them per connection at most,
/// and the small reads a login needs never wait on the big pages.
pub(crate) const SMALL_ANSWER_BYTES: usize = 16 * 1024;

impl Unsent {
    pub(crate) fn new(limit: usize) -> Unsent {
        Unsent {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Counts `bytes` in, unless they are more than `SMALL_ANSWER_BYTES`
    /// and would pass the limit; says whether they were.
    fn take(&self, bytes: usize) -> bool {
        if bytes <= SMALL_ANSWER_BYTES {
            self.held.fetch_add(bytes, Ordering::Relaxed);
            return true;
        }
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held.saturating_add(bytes) <= self.limit).then_some(held + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether no answer over `SMALL_ANSWER_BYTES` fits now.
    pub(crate) fn is_full(&self) -> bool {
        self.held() + SMALL_ANSWER_BYTES >= self.limit
    }

    /// The bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One connection's account with the [`Unsent`] budget, handed to the app
/// in the request's head: it counts an answer in before sending it, and
/// the socket counts the bytes out as it takes them.
#[derive(Debug, Clone)]
pub(crate) struct UnsentAccount {
    connection: Arc<Connection>,
}

impl UnsentAccount {
    /// Counts an answer of `bytes` in; false when the budget has no room
    /// for it (it is larger than `SMALL_ANSWER_BYTES` and would pass it).
    pub(crate) fn take(&self, bytes: usize) -> bool {
        let taken = self.connection.budget.take(bytes);
        if taken {
            self.connection.unsent.fetch_add(bytes, Ordering::Relaxed);
        }
        taken
    }

    /// The bytes held over all connections now.
    pub(crate) fn held_everywhere(&self) -> usize {
        self.connection.budget.held()
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
    /// This connection's answer bytes counted in `budget` and not yet
    /// taken by the socket.
    unsent: AtomicUsize,
    budget: Arc<Unsent>,
}

impl Connection {
    fn new(now: Instant, budget: Arc<Unsent>) -> Connection {
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
            unsent: AtomicUsize::new(0),
            budget,
        }
    }

    /// The socket took `written` bytes: the answer bytes among them leave
    /// the budget, and writing is not blocked.
    fn wrote(&self, written: usize) {
        if self.write_blocked_since.load(Ordering::Relaxed) != 0 {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
        let unsent = self.unsent.load(Ordering::Relaxed);
        if unsent > 0 && written > 0 {
            let sent = unsent.min(written);
            self.unsent.fetch_sub(sent, Ordering::Relaxed);
            self.budget.give_back(sent);
        }
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

impl Drop for Connection {
    /// A closed connection's unsent answers are gone: out of the budget.
    fn drop(&mut self) {
        self.budget.give_back(*self.unsent.get_mut());
    }
}

/// The data behind a lock; a panic while holding one of these leaves no
/// half-made change, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves one connection until the client closes it, a deadline passes, or
/// shutdown closes it.
async fn serve_connection<S>(
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
    let connection = Arc::new(Connection::new(Instant::now(), settings.unsent.clone()));
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
    head.unsent = Some(UnsentAccount {
        connection: connection.clone(),
    });
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
            unsent: Arc::new(Unsent::new(1 << 20)),
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

    #[test]
    fn connections_leave_the_open_files_and_spares_free() {
        assert_eq!(connection_limit(1024, 1_048_576, 20), Some(1024));
        assert_eq!(
            connection_limit(1024, 1024, 20),
            Some(1024 - 20 - SPARE_FILES)
        );
        assert_eq!(connection_limit(1024, 80, 20), None);
        assert_eq!(connection_limit(0, 4096, 20), None);
    }

    #[test]
    fn accept_failures_are_logged_once_per_period_with_a_count() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();

        let first = errors.record(start);
        let quiet: Vec<_> = (1..50)
            .map(|i| errors.record(start + Duration::from_millis(100 * i)))
            .collect();
        let next = errors.record(start + ACCEPT_LOG_EVERY);

        assert_eq!(first, Some(1));
        assert!(quiet.iter().all(Option::is_none));
        assert_eq!(next, Some(50));
    }

    #[test]
    fn only_one_clients_accept_errors_are_retried_at_once() {
        use std::io::{Error, ErrorKind};
        assert!(is_one_clients(&Error::from(ErrorKind::ConnectionAborted)));
        assert!(!is_one_clients(&Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_one_clients(&Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_one_clients(&Error::from_raw_os_error(libc::ENOBUFS)));
    }
}
