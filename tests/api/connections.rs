//! Connections as an attacker opens them: slow headers, short bodies, idle
//! sockets, floods past the connection and file limits, odd request lines,
//! and clients behind a trusted proxy. Raw sockets, so that the server's
//! timeouts (not the client's) decide when a connection ends.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linkid::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::cli::Server;
use crate::helpers::{assert_problem, spawn_app_with, TestApp, PREFIX};

/// Short timeouts so that each test takes a few seconds.
fn timeouts(header: u64, keep_alive: u64, body: u64) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.server.header_read_timeout_secs = header;
        c.server.keep_alive_timeout_secs = keep_alive;
        c.server.body_timeout_secs = body;
    }
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads one response (head and a `content-length` body); `None` when the
/// server closes the connection first.
async fn read_response(stream: &mut TcpStream) -> Option<String> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse().unwrap());
            if bytes.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// How long until the server closes the connection (reading and dropping
/// whatever it sends), or `None` if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Writes `bytes` one at a time, `every` apart, until done or refused.
fn trickle(mut stream: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, every: Duration) {
    tokio::spawn(async move {
        for byte in bytes {
            if stream.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
}

fn link_head(app: &TestApp, length: usize) -> String {
    format!(
        "POST {PREFIX}/users/u-1/linked-identities HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n",
        app.admin
    )
}

#[tokio::test]
async fn a_header_trickled_one_byte_a_second_is_cut_off_near_the_header_timeout() {
    let app = spawn_app_with(timeouts(1, 30, 30)).await;
    let (mut read, write) = connect(&app).await.into_split();
    let started = Instant::now();

    trickle(
        write,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaa\r\n\r\n".to_vec(),
        Duration::from_secs(1),
    );
    let mut buf = [0u8; 64];
    let closed = timeout(Duration::from_secs(6), read.read(&mut buf)).await;

    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the connection is still open after 6 s: {closed:?}"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_millis(2500),
        "closed after {after:?}, the header timeout is 1 s"
    );
}

#[tokio::test]
async fn a_body_that_stops_short_is_answered_408_near_the_body_timeout_and_closed() {
    let app = spawn_app_with(timeouts(30, 30, 1)).await;
    let mut stream = connect(&app).await;
    let started = Instant::now();

    stream
        .write_all(format!("{}{{\"pro", link_head(&app, 10)).as_bytes())
        .await
        .unwrap();
    let response = timeout(Duration::from_secs(6), read_response(&mut stream))
        .await
        .expect("no answer within 6 s: the body timeout is 1 s")
        .expect("an answer before the connection closes");
    let answered = started.elapsed();
    let closed = closed_within(&mut stream, Duration::from_secs(2)).await;

    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert!(response.contains("x-request-id"), "{response}");
    assert!(
        response.contains("\"code\":\"REQUEST_TIMEOUT\""),
        "{response}"
    );
    assert!(
        answered >= Duration::from_millis(800) && answered < Duration::from_millis(2500),
        "answered after {answered:?}, the body timeout is 1 s"
    );
    assert!(closed.is_some(), "the connection stays open after the 408");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_for_the_keep_alive_timeout_not_the_header_timeout() {
    let app = spawn_app_with(timeouts(1, 3, 30)).await;
    let mut stream = connect(&app).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let first = read_response(&mut stream).await.unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // Idle for longer than the header timeout: still open for a next request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(request).await.unwrap();
    let second = read_response(&mut stream)
        .await
        .expect("an idle keep-alive connection is not cut at the header timeout");
    let closed = closed_within(&mut stream, Duration::from_secs(7)).await;

    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    let closed = closed.expect("the idle connection is still open after 7 s");
    assert!(
        closed >= Duration::from_millis(2500) && closed < Duration::from_millis(4500),
        "closed {closed:?} after the last response, the keep-alive timeout is 3 s"
    );
}

#[tokio::test]
async fn past_max_connections_a_new_client_waits_and_is_served_once_one_closes() {
    let app = spawn_app_with(|c| {
        timeouts(30, 30, 30)(c);
        c.server.max_connections = 16;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(connect(&app).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = connect(&app).await;
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let waited = timeout(Duration::from_millis(700), read_response(&mut client)).await;
    assert!(
        waited.is_err(),
        "a 17th client was served past max_connections = 16: {waited:?}"
    );
    drop(idle.pop());
    let started = Instant::now();
    let served = timeout(Duration::from_secs(3), read_response(&mut client))
        .await
        .expect("the waiting client is served once a connection closes")
        .unwrap();

    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served {:?} after a slot freed",
        started.elapsed()
    );
}

#[tokio::test]
async fn fifty_slow_clients_do_not_hold_graceful_shutdown() {
    let app = spawn_app_with(|c| {
        timeouts(30, 30, 30)(c);
        c.server.shutdown_timeout_secs = 10;
    })
    .await;
    let every = Duration::from_millis(500);
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut stream = connect(&app).await;
        match i % 3 {
            // Sending its headers slowly.
            0 => {
                let (_, write) = stream.into_split();
                trickle(
                    write,
                    b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
                    every,
                );
            }
            // Sending its body slowly.
            1 => {
                stream
                    .write_all(link_head(&app, 200).as_bytes())
                    .await
                    .unwrap();
                let (_, write) = stream.into_split();
                trickle(write, vec![b' '; 200], every);
            }
            // Idle between requests.
            _ => {
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
                read_response(&mut stream).await.unwrap();
                idle.push(stream);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;

    let started = Instant::now();
    timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("shutdown ends");
    let took = started.elapsed();

    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with 50 slow clients (shutdown_timeout_secs = 10)"
    );
}

/// The server's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A file limit for a process (soft and hard).
fn set_file_limit(pid: libc::pid_t, limit: u64) {
    let limit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    let done = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The binary, started with a file limit of `files` (soft and hard), in a
/// directory with no config file; killed when dropped.
struct LimitedServer {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl LimitedServer {
    fn start(dir: &Path, files: u64, env: &[(&str, &str)]) -> LimitedServer {
        let mut command = crate::cli::command(dir);
        command
            .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: files,
                    rlim_max: files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    if let Some(rest) = line.split("127.0.0.1:").nth(1) {
                        let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                        let _ = addr_tx.send(format!("127.0.0.1:{port}"));
                    }
                }
                let mut log = lines.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        LimitedServer { child, addr, log }
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens up to `n` idle sockets (they wait in the accept queue once the
/// server stops accepting), fewer if that queue is full.
async fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        match timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
            Ok(Ok(socket)) => sockets.push(socket),
            _ => break,
        }
    }
    sockets
}

async fn healthz_within(addr: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    timeout(limit, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut stream).await
    })
    .await
    .ok()
    .flatten()
    .filter(|r| r.starts_with("HTTP/1.1 200"))
    .map(|_| started.elapsed())
}

#[tokio::test]
async fn started_with_a_low_file_limit_a_flood_of_idle_sockets_neither_spins_nor_breaks_it() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = LimitedServer::start(
        dir.path(),
        256,
        &[("LINKID_SERVER__HEADER_READ_TIMEOUT_SECS", "1")],
    );
    assert!(healthz_within(&server.addr, Duration::from_secs(5))
        .await
        .is_some());
    let cpu_before = cpu_time(server.child.id());

    let sockets = flood(&server.addr, 400).await;
    let served = healthz_within(&server.addr, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_time(server.child.id()) - cpu_before;
    drop(sockets);
    let after = healthz_within(&server.addr, Duration::from_secs(5)).await;

    let log = server.log.lock().unwrap().clone();
    let served = served.unwrap_or_else(|| {
        panic!("/healthz was not answered while the idle sockets were open: {log}")
    });
    assert!(log.contains("server.max_connections lowered"), "{log}");
    assert!(served < Duration::from_secs(8), "/healthz took {served:?}");
    assert!(
        cpu < Duration::from_millis(1500),
        "the server used {cpu:?} of CPU"
    );
    assert!(after.is_some(), "/healthz fails after the flood: {log}");
    assert!(!log.contains("Too many open files"), "{log}");
}

#[tokio::test]
async fn out_of_files_while_serving_it_backs_off_logs_once_and_recovers() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = LimitedServer::start(
        dir.path(),
        4096,
        &[("LINKID_SERVER__HEADER_READ_TIMEOUT_SECS", "1")],
    );
    // Something else took the files the server counted on.
    assert!(healthz_within(&server.addr, Duration::from_secs(5))
        .await
        .is_some());
    set_file_limit(server.child.id() as libc::pid_t, 64);
    let cpu_before = cpu_time(server.child.id());

    let sockets = flood(&server.addr, 200).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_time(server.child.id()) - cpu_before;
    let served = healthz_within(&server.addr, Duration::from_secs(10)).await;
    drop(sockets);

    let log = server.log.lock().unwrap().clone();
    let errors = log.lines().filter(|l| l.contains("accept")).count();
    assert!(
        cpu < Duration::from_millis(1500),
        "the server used {cpu:?} of CPU"
    );
    assert!(errors <= 2, "{errors} accept errors logged: {log}");
    assert!(
        served.is_some(),
        "/healthz was not answered while out of files: {log}"
    );
}

#[tokio::test]
async fn request_lines_without_a_path_get_a_problem_and_log_no_panic() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = Server::start(dir.path(), &[]);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let cases = [
        (
            "CONNECT x:1 HTTP/1.1\r\nhost: x:1\r\n\r\n",
            "HTTP/1.1 405",
            "METHOD_NOT_ALLOWED",
        ),
        (
            "CONNECT /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
            "HTTP/1.1 405",
            "METHOD_NOT_ALLOWED",
        ),
        (
            "OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n",
            "HTTP/1.1 404",
            "NOT_FOUND",
        ),
        (
            "GET * HTTP/1.1\r\nhost: x\r\n\r\n",
            "HTTP/1.1 404",
            "NOT_FOUND",
        ),
        (
            "GET http://x HTTP/1.1\r\nhost: x\r\n\r\n",
            "HTTP/1.1 404",
            "NOT_FOUND",
        ),
    ];

    for (request, status, code) in cases {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = timeout(Duration::from_secs(5), read_response(&mut stream))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no answer to {request:?}: {}", server.log()));

        assert!(response.starts_with(status), "{request:?}: {response}");
        assert!(response.contains("application/problem+json"), "{response}");
        assert!(response.contains("x-request-id"), "{response}");
        assert!(response.contains(code), "{response}");
    }
    let absolute = "GET http://x/healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream.write_all(absolute.as_bytes()).await.unwrap();
    let response = read_response(&mut stream).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test]
async fn metrics_behind_a_trusted_proxy_refuse_a_forwarded_remote_client() {
    let app =
        spawn_app_with(|c| c.rate_limit.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]).await;
    let scrape = |forwarded: &'static str| {
        app.client
            .get(app.url("/metrics"))
            .header("x-forwarded-for", forwarded)
            .send()
    };

    let remote = scrape("203.0.113.7").await.unwrap();
    let local = scrape("127.0.0.1").await.unwrap();

    assert_problem(remote, 404, "NOT_FOUND").await;
    assert_eq!(local.status(), 200);
}

/// Sends a request with a bad (or the admin) token and these
/// `X-Forwarded-For` lines; returns the status.
async fn status_from(app: &TestApp, forwarded: &[String], token: &str) -> u16 {
    let mut request = app
        .client
        .get(app.api("/users/identity-providers"))
        .bearer_auth(token);
    for line in forwarded {
        request = request.header("x-forwarded-for", line);
    }
    request.send().await.unwrap().status().as_u16()
}

fn lines(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

#[tokio::test]
async fn behind_a_trusted_proxy_failures_count_per_forwarded_client_whatever_the_hop_form() {
    let app = spawn_app_with(|c| {
        c.rate_limit.failed_auth_per_minute = 60;
        c.rate_limit.failed_auth_burst = 2;
        c.rate_limit.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    // (what, two failures, a third as the same client in another form, a
    // neighbour behind the same proxy)
    let cases = [
        (
            "a hop with a port",
            [lines(&["203.0.113.7:5555"]), lines(&["203.0.113.7:5556"])],
            lines(&["203.0.113.7:6666"]),
            lines(&["203.0.113.8:5555"]),
        ),
        (
            "bracketed IPv6",
            [lines(&["[2001:db8::9]:443"]), lines(&["[2001:db8::9]"])],
            lines(&["2001:db8::9"]),
            lines(&["[2001:db8:0:1::9]:443"]),
        ),
        (
            "several lines, the proxy's own last",
            [
                lines(&["198.51.100.1", "203.0.113.20"]),
                lines(&["198.51.100.2, 198.51.100.3", "203.0.113.20"]),
            ],
            lines(&["198.51.100.4", "203.0.113.20, 127.0.0.1"]),
            lines(&["198.51.100.1", "203.0.113.21"]),
        ),
        (
            "rotating IPv6 addresses in one /64",
            [lines(&["2001:db8:1:2::1"]), lines(&["2001:db8:1:2::2"])],
            lines(&["2001:db8:1:2:ffff:ffff:ffff:3"]),
            lines(&["2001:db8:1:3::1"]),
        ),
        (
            "a hop that names no address",
            [lines(&["unknown"]), lines(&["unknown"])],
            lines(&["unknown"]),
            // The proxy's own requests are not blocked by its clients' failures.
            lines(&[]),
        ),
    ];

    for (what, failures, again, neighbour) in cases {
        for forwarded in &failures {
            assert_eq!(status_from(&app, forwarded, "bad").await, 401, "{what}");
        }
        let blocked = status_from(&app, &again, "bad").await;
        let other = status_from(&app, &neighbour, &app.admin).await;

        assert_eq!(blocked, 429, "{what}: the same client is counted as one");
        assert_eq!(other, 200, "{what}: a neighbour is not blocked");
    }
}

#[tokio::test]
async fn on_a_dual_stack_listener_an_ipv4_proxy_is_trusted_and_loopback_reads_metrics() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("no IPv6 here; skipped");
        return;
    }
    let app = spawn_app_with(|c| {
        c.server.addr = "[::]:0".parse().unwrap();
        c.rate_limit.failed_auth_per_minute = 60;
        c.rate_limit.failed_auth_burst = 2;
        c.rate_limit.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    // The peer is ::ffff:127.0.0.1 (app.address is http://127.0.0.1:port).
    let client = lines(&["203.0.113.40"]);

    for _ in 0..2 {
        assert_eq!(status_from(&app, &client, "bad").await, 401);
    }
    let blocked = status_from(&app, &client, "bad").await;
    let neighbour = status_from(&app, &lines(&["203.0.113.41"]), &app.admin).await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();

    assert_eq!(blocked, 429);
    assert_eq!(neighbour, 200, "the IPv4-mapped peer is the trusted proxy");
    assert_eq!(metrics.status(), 200, "::ffff:127.0.0.1 is loopback");
}
