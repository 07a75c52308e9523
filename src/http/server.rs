//! The accept loop: serves the app over HTTP/1.1 with hyper, one task per
//! connection (see `connection`), with what warp's own server lacks — a
//! limit on connections below the file limit, an accept loop that backs
//! off instead of spinning, and a shutdown that closes idle and stalled
//! connections at once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower_service::Service;
use warp::http::Request;
use warp::reply::Response;

use super::unsent::Unsent;
use crate::config::ServerConfig;

mod connection;

use connection::serve_connection;
pub(crate) use connection::{BodyTimedOut, TimedBody};

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

#[cfg(test)]
mod tests {
    use super::*;

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
