//! Clients that ask and never read: what they can make the server hold is
//! bounded by `server.max_unsent_bytes` (answers over 16 KiB past it are a
//! 503 `SERVER_BUSY`), and a connection whose socket takes none of the
//! server's bytes for `server.write_timeout_secs` is closed.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::cli::{linkid, mint, Server};

const PAGE: &str = "/api/admin/users/v4/linked-identities?limit=1000";

/// `server.max_unsent_bytes` where a test sets it: its smallest value.
const BUDGET: u64 = 8 * 1024 * 1024;

/// 1,000 links whose ids and usernames are as long as allowed, in 4-byte
/// characters: a page of all of them is about 3 MB of JSON.
fn import_long_links(dir: &Path) {
    let long = |tag: &str, i: usize| format!("{tag}{i:05}{}", "𝔘".repeat(240));
    let lines: String = (0..1000)
        .map(|i| {
            serde_json::json!({
                "user_id": long("u", i),
                "provider_id": "okta",
                "linked_user_id": long("r", i),
                "linked_username": long("n", i),
            })
            .to_string()
                + "\n"
        })
        .collect();
    let file = dir.join("long.jsonl");
    std::fs::write(&file, lines).unwrap();
    let imported = linkid(dir, &["import", file.to_str().unwrap()]);
    assert!(imported.status.success(), "{imported:?}");
}

/// A connection that asks for `path` (with these extra header lines) and
/// then reads nothing; its receive buffer is small, so what the kernel does
/// not take stays with the server.
async fn ask_and_never_read(base: &str, token: &str, path: &str, headers: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://").parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: linkid\r\n{headers}Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A line of the server's `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

async fn unsent_bytes(client: &reqwest::Client, base: &str) -> u64 {
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("linkid_unsent_answer_bytes "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("no linkid_unsent_answer_bytes in {metrics}"))
}

/// Waits up to `limit` for the unsent bytes to meet `wanted`; returns them.
async fn unsent_bytes_until(
    client: &reqwest::Client,
    base: &str,
    limit: Duration,
    wanted: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let held = unsent_bytes(client, base).await;
        if wanted(held) || Instant::now() > deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually_no_unsent_bytes(client: &reqwest::Client, base: &str) {
    let held = unsent_bytes_until(client, base, Duration::from_secs(10), |n| n == 0).await;
    assert_eq!(held, 0, "bytes still held");
}

/// How many requests of an operation the server has answered.
async fn answered(client: &reqwest::Client, base: &str, operation: &str) -> u64 {
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("linkid_requests_total{{operation=\"{operation}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn three_hundred_clients_that_never_read_big_pages_hold_no_more_than_the_budget() {
    let dir = tempfile::TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    import_long_links(dir.path());
    let server = Server::start(
        dir.path(),
        &[
            ("LINKID_SERVER__MAX_UNSENT_BYTES", &BUDGET.to_string()),
            // They stay until the test closes them, however slow the run.
            ("LINKID_SERVER__WRITE_TIMEOUT_SECS", "3600"),
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let page = client
            .get(format!("{}{PAGE}", server.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let page_bytes = page.bytes().await.unwrap().len();
        assert!(page_bytes > 2_500_000, "a page is {page_bytes} bytes");
        let before = status_kib(server.pid(), "VmRSS:");

        let mut stalled = Vec::new();
        for _ in 0..300 {
            stalled.push(ask_and_never_read(&server.base, &token, PAGE, "").await);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while answered(&client, &server.base, "searchLinkedIdentities").await < 301 {
            assert!(Instant::now() < deadline, "the 300 were not answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let providers = client
            .get(format!("{}/api/admin/users/v4/users/identity-providers", server.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(providers.status(), 200, "small answers are always sent");
        let peak = status_kib(server.pid(), "VmHWM:");
        eprintln!(
            "RSS {} MiB before, peak {} MiB with 300 clients that never read {page_bytes}-byte pages",
            before / 1024,
            peak / 1024
        );
        assert!(
            peak < before + 96 * 1024,
            "peak RSS {peak} KiB, {before} KiB before"
        );
        let held = unsent_bytes(&client, &server.base).await;
        assert!(held <= BUDGET + 300 * 16 * 1024, "{held} bytes held");
        // Each of them got its page or, past the budget, a small 503.
        let (mut pages, mut busy) = (0, 0);
        for stream in &mut stalled {
            let mut status = [0u8; 12];
            stream.read_exact(&mut status).await.unwrap();
            match &status {
                b"HTTP/1.1 200" => pages += 1,
                b"HTTP/1.1 503" => busy += 1,
                other => panic!("{}", String::from_utf8_lossy(other)),
            }
        }
        eprintln!("{pages} pages sent, {busy} refused 503 SERVER_BUSY");
        assert!(pages > 0 && busy > 0, "{pages} pages, {busy} refused");

        drop(stalled);
        eventually_no_unsent_bytes(&client, &server.base).await;
        let page = client
            .get(format!("{}{PAGE}", server.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "the budget came back");
    });
}

#[test]
fn a_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let dir = tempfile::TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    import_long_links(dir.path());
    let server = Server::start(dir.path(), &[("LINKID_SERVER__WRITE_TIMEOUT_SECS", "1")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        // The kernel takes most of the page into the socket's buffer (up
        // to net.ipv4.tcp_wmem's 4 MiB); the rest stays with the server.
        let mut stalled = ask_and_never_read(&server.base, &token, PAGE, "").await;
        let held = unsent_bytes_until(&client, &server.base, Duration::from_secs(10), |n| {
            n > 50_000
        })
        .await;
        assert!(held > 50_000, "{held} bytes held");

        eventually_no_unsent_bytes(&client, &server.base).await;
        let mut received = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut received))
                .await
                .expect("the server closed the connection");

        let text = String::from_utf8_lossy(&received);
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("the answer's head came")
            .trim()
            .parse()
            .unwrap();
        assert!(
            read.is_err() || received.len() < length,
            "{} bytes of a {length}-byte answer",
            received.len()
        );
    });
}

#[test]
fn event_streams_that_are_never_read_hold_a_few_hundred_kib_each() {
    let dir = tempfile::TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    // 1,000 LINKED events of about 3.5 KB each: the feed is 3.5 MB.
    import_long_links(dir.path());
    let server = Server::start(dir.path(), &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let before = status_kib(server.pid(), "VmRSS:");
        let mut streams = Vec::new();
        for _ in 0..64 {
            streams.push(
                ask_and_never_read(
                    &server.base,
                    &token,
                    "/api/admin/users/v4/linked-identities/events",
                    "Accept: text/event-stream\r\n",
                )
                .await,
            );
        }
        // Until the server stops growing: every stream is as full as it gets.
        let mut last = 0;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = status_kib(server.pid(), "VmRSS:");
            if now.abs_diff(last) < 1024 {
                break;
            }
            last = now;
        }
        let peak = status_kib(server.pid(), "VmHWM:");
        eprintln!(
            "RSS {} MiB before, peak {} MiB with 64 event streams that are never read",
            before / 1024,
            peak / 1024
        );
        assert!(
            peak < before + 64 * 1024,
            "peak RSS {peak} KiB, {before} KiB before"
        );
        drop(streams);
    });
}
