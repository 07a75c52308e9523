//! Webhooks end to end: the real binary (`linkid serve`) delivering its
//! change feed to receivers on loopback — a warp receiver whose answers a
//! test scripts, and the Python receiver that verifies every delivery with
//! the Standard Webhooks library — with the standings in the database,
//! `linkid webhooks status | replay | enable`, SIGKILL and restart, and on
//! PostgreSQL two instances sharing the lease.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::cli::{linkid, mint, Server};
use crate::helpers::{backend, Backend};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const LINKS: &str = "/api/admin/users/v4/users";

/// Long enough for a thousand deliveries on a busy machine.
const PATIENCE: Duration = Duration::from_secs(180);

/// What the scripted receiver does with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Holds the request this long, then answers 204.
    Hang(Duration),
}

/// One request as a receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    signature: String,
    body: Vec<u8>,
}

impl Received {
    fn seq(&self) -> i64 {
        self.id.trim_start_matches("evt_").parse().unwrap_or(-1)
    }
}

/// How the receiver answers: `plan(seq, attempt)` (attempt 1 is the first
/// at that seq); 204 when it says nothing.
type Plan = Arc<dyn Fn(i64, usize) -> Option<Answer> + Send + Sync>;

/// A warp receiver on loopback, stopped when dropped.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    async fn start(plan: Plan) -> Receiver {
        Self::start_on(0, plan).await
    }

    async fn start_on(port: u16, plan: Plan) -> Receiver {
        use warp::Filter;
        let received = Arc::new(Mutex::new(Vec::<Received>::new()));
        let seen = received.clone();
        let routes = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let request = Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp").parse().unwrap_or(0),
                    signature: header("webhook-signature"),
                    body: body.to_vec(),
                };
                let attempt = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(request.clone());
                    seen.iter().filter(|r| r.id == request.id).count()
                };
                let answer = plan(request.seq(), attempt);
                async move {
                    let status = match answer {
                        Some(Answer::Hang(time)) => {
                            tokio::time::sleep(time).await;
                            204
                        }
                        Some(Answer::Status(status)) => status,
                        None => 204,
                    };
                    let mut reply = warp::http::Response::builder().status(status);
                    if (300..400).contains(&status) {
                        reply = reply.header("location", "http://127.0.0.1:1/elsewhere");
                    }
                    reply.body(String::new()).unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Receiver {
            port,
            received,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until every seq in `seqs` was received at least once.
    async fn wait_for(&self, seqs: impl IntoIterator<Item = i64>, patience: Duration) {
        let want: Vec<i64> = seqs.into_iter().collect();
        let deadline = Instant::now() + patience;
        loop {
            let got: std::collections::HashSet<i64> =
                self.received().iter().map(Received::seq).collect();
            if want.iter().all(|s| got.contains(s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {want:?}; received {:?}",
                self.received().iter().map(|r| &r.id).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A webhook entry of the test config.
struct Hook<'a> {
    id: &'a str,
    url: String,
}

/// Writes `config.toml` (and the secret file, 0600) into `dir`, with
/// `[[webhooks]]` for `hooks`, all starting at the beginning, and an admin token.
fn configure(dir: &Path, hooks: &[Hook<'_>], timeout_secs: u64) -> String {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("hooks.whsec");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = String::new();
    for hook in hooks {
        config.push_str(&format!(
            "[[webhooks]]\nid = \"{}\"\nurl = \"{}\"\nsecret_file = \"{}\"\nstart = \"beginning\"\n\n",
            hook.id,
            hook.url,
            secret.display()
        ));
    }
    config.push_str(&format!(
        "[webhook_delivery]\ntimeout_secs = {timeout_secs}\nmax_backoff_secs = 1\n"
    ));
    std::fs::write(dir.join("config.toml"), config).unwrap();
    mint(dir, &["--admin"])
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Links users `{prefix}0..{prefix}{count-1}`, `parallel` at a time.
async fn link_users(base: &str, token: &str, prefix: &str, count: usize, parallel: usize) {
    let client = client();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (client, base, token, prefix, next) = (
                client.clone(),
                base.to_string(),
                token.to_string(),
                prefix.to_string(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let response = client
                        .post(format!("{base}{LINKS}/{prefix}{i}/linked-identities"))
                        .bearer_auth(&token)
                        .json(&json!({"provider_id": "okta", "linked_user_id": format!("r-{prefix}{i}"), "linked_username": "n"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

/// The whole change feed, as the API serves it.
async fn whole_feed(base: &str, token: &str) -> Vec<Value> {
    let client = client();
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = client
            .get(format!(
                "{base}/api/admin/users/v4/linked-identities/events?after={after}&limit=1000"
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = page["events"].as_array().unwrap().clone();
        after = page["next_after"].as_i64().unwrap();
        if events.is_empty() {
            return all;
        }
        all.extend(events);
    }
}

/// `linkid webhooks status --json`, run in `dir`.
fn status(dir: &Path) -> Vec<Value> {
    let output = linkid(dir, &["webhooks", "status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Each seq's ids in the order received, with repeats collapsed: the
/// order in which events were finally got.
fn distinct_in_order(received: &[Received]) -> Vec<i64> {
    let mut order: Vec<i64> = Vec::new();
    for request in received {
        if !order.contains(&request.seq()) {
            order.push(request.seq());
        }
    }
    order
}

/// The signature linkid's key makes for a request: Standard Webhooks.
fn signed(request: &Received) -> bool {
    let secrets = linkid::config::SigningSecrets::parse(SECRET).unwrap();
    let key = secrets.iter().next().unwrap().expose();
    request.signature == linkid::webhooks::sign(key, &request.id, request.timestamp, &request.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_reach_a_receiver_in_order_signed_with_the_feeds_events_in_data() {
    let receiver = Receiver::start(Arc::new(|_, _| None)).await;
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "receiver",
            url: receiver.url(),
        }],
        10,
    );
    let server = Server::start(dir.path(), &[]);
    let started = Instant::now();

    link_users(&server.base, &token, "u", 1000, 16).await;
    receiver.wait_for(1..=1000, PATIENCE).await;
    eprintln!(
        "1,000 changes delivered {:?} after the first write",
        started.elapsed()
    );

    let received = receiver.received();
    let ids: Vec<i64> = received.iter().map(Received::seq).collect();
    assert_eq!(ids, (1..=1000).collect::<Vec<_>>(), "in order, once each");
    let feed = whole_feed(&server.base, &token).await;
    assert_eq!(feed.len(), 1000);
    for (request, event) in received.iter().zip(&feed) {
        assert!(signed(request), "{}", request.id);
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["data"], *event, "{}", request.id);
        assert_eq!(body["type"], "linked_identity.linked");
        assert_eq!(body["timestamp"], event["occurred_at"]);
        // `data` is the event object as written, byte for byte.
        let text = std::str::from_utf8(&request.body).unwrap();
        let data = &text[text.find("\"data\":").unwrap() + 7..text.len() - 1];
        assert_eq!(serde_json::from_str::<Value>(data).unwrap(), *event);
    }
    let shown = status(dir.path());
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["id"], "receiver");
    assert_eq!(shown[0]["state"], "ACTIVE");
    assert_eq!(shown[0]["delivered_seq"], 1000);
    assert_eq!(shown[0]["pending"], 0);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_webhooks_library_verifies_deliveries_from_the_server() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has_library = std::process::Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_library {
        assert!(
            !crate::helpers::venv_is_required(),
            "CI must run this: .venv lacks standardwebhooks"
        );
        eprintln!("skipped: no .venv with standardwebhooks (scripts/test.sh makes it)");
        return;
    }
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("received.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract/webhook_receiver.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .arg(SECRET)
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "python",
            url: format!("http://127.0.0.1:{port}/linkid"),
        }],
        10,
    );
    let server = Server::start(dir.path(), &[]);

    link_users(&server.base, &token, "p", 100, 8).await;
    let deadline = Instant::now() + PATIENCE;
    let records: Vec<Value> = loop {
        // Only whole lines: the receiver may be writing the next one.
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        let records: Vec<Value> = whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if records.len() >= 100 || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.terminate();
    let _ = child.kill();
    let _ = child.wait();

    let ids: Vec<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        (1..=100).map(|s| format!("evt_{s}")).collect::<Vec<_>>()
    );
    assert!(records.iter().all(|r| r["verified"] == true), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_times_out_redirects_or_is_down_gets_every_event_in_order() {
    // Down at first: its port is free until the receiver starts on it.
    let port = free_port();
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "flaky",
            url: format!("http://127.0.0.1:{port}/hooks"),
        }],
        1,
    );
    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "f", 10, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let down = status(dir.path());

    let receiver = Receiver::start_on(
        port,
        Arc::new(|seq, attempt| match (seq, attempt) {
            (2, 1 | 2) => Some(Answer::Status(500)),
            (4, 1) => Some(Answer::Hang(Duration::from_secs(3))),
            (6, 1) => Some(Answer::Status(302)),
            (8, 1) => Some(Answer::Status(429)),
            _ => None,
        }),
    )
    .await;
    receiver.wait_for(1..=10, Duration::from_secs(60)).await;
    server.terminate();

    assert_eq!(down[0]["state"], "RETRYING", "{down:?}");
    assert_eq!(down[0]["delivered_seq"], 0);
    assert_eq!(down[0]["pending"], 10);
    assert!(down[0]["attempts"].as_u64().unwrap() >= 1, "{down:?}");
    assert!(down[0]["last_error"].is_string(), "{down:?}");
    assert!(down[0]["next_attempt_at"].is_string(), "{down:?}");
    let received = receiver.received();
    assert_eq!(distinct_in_order(&received), (1..=10).collect::<Vec<_>>());
    let tries = |seq: i64| received.iter().filter(|r| r.seq() == seq).count();
    assert_eq!(tries(2), 3, "500 twice, then 204");
    assert!(tries(4) >= 2, "timed out, then sent again");
    assert_eq!(tries(6), 2, "a redirect is not followed but retried");
    assert_eq!(tries(8), 2);
    // Nothing after an event was sent before it was delivered.
    for (i, request) in received.iter().enumerate() {
        assert!(
            received[i..]
                .iter()
                .all(|later| later.seq() >= request.seq()),
            "{} then earlier",
            request.id
        );
        assert!(signed(request), "{}", request.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_webhook_until_enable_which_resumes_with_that_event() {
    let receiver = Receiver::start(Arc::new(|seq, attempt| {
        (seq == 3 && attempt == 1).then_some(Answer::Status(410))
    }))
    .await;
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "gone",
            url: receiver.url(),
        }],
        5,
    );
    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "g", 5, 1).await;
    receiver.wait_for([3], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let disabled = status(dir.path());
    let before = receiver.received().len();

    let enabled = linkid(dir.path(), &["webhooks", "enable", "gone"]);
    let asked = Instant::now();
    receiver.wait_for([5], Duration::from_secs(30)).await;
    let acted_in = asked.elapsed();
    server.terminate();

    assert_eq!(disabled[0]["state"], "DISABLED", "{disabled:?}");
    assert_eq!(disabled[0]["delivered_seq"], 2);
    assert_eq!(disabled[0]["last_status"], 410);
    assert_eq!(disabled[0]["pending"], 3);
    assert_eq!(before, 3, "nothing is sent while disabled");
    assert!(enabled.status.success());
    assert!(
        acted_in < Duration::from_secs(5),
        "acted after {acted_in:?}"
    );
    let ids: Vec<i64> = receiver.received().iter().map(Received::seq).collect();
    assert_eq!(ids, [1, 2, 3, 3, 4, 5], "resumed with the refused event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_a_running_server_sends_again_from_after_the_seq_given() {
    let receiver = Receiver::start(Arc::new(|_, _| None)).await;
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "crm",
            url: format!("http://hook:pw-9z@127.0.0.1:{}/hooks", receiver.port),
        }],
        5,
    );
    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "r", 5, 1).await;
    receiver.wait_for(1..=5, Duration::from_secs(30)).await;

    let replayed = linkid(dir.path(), &["webhooks", "replay", "crm", "--after", "2"]);
    let unknown = linkid(dir.path(), &["webhooks", "replay", "nope", "--after", "2"]);
    let asked = Instant::now();
    let deadline = asked + Duration::from_secs(30);
    while receiver.received().len() < 8 {
        assert!(Instant::now() < deadline, "{:?}", receiver.received());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acted_in = asked.elapsed();
    let shown = status(dir.path());
    let log = server.log();
    server.terminate();

    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(!unknown.status.success());
    assert!(
        acted_in < Duration::from_secs(5),
        "acted after {acted_in:?}"
    );
    let ids: Vec<i64> = receiver.received().iter().map(Received::seq).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 3, 4, 5]);
    assert_eq!(
        shown[0]["url"],
        format!("http://127.0.0.1:{}/hooks", receiver.port)
    );
    for text in [log.as_str(), &serde_json::to_string(&shown).unwrap()] {
        assert!(!text.contains("pw-9z"), "{text}");
        assert!(!text.contains(&SECRET[6..]), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_delivery_loses_nothing_and_repeats_only_the_event_in_flight() {
    // The first attempt at event 4 hangs until the server is killed.
    let receiver = Receiver::start(Arc::new(|seq, attempt| {
        (seq == 4 && attempt == 1).then_some(Answer::Hang(Duration::from_secs(60)))
    }))
    .await;
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "crash",
            url: receiver.url(),
        }],
        30,
    );
    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "k", 8, 1).await;
    receiver.wait_for([4], Duration::from_secs(30)).await;
    server.crash();

    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "k-after-", 2, 1).await;
    receiver.wait_for(1..=10, Duration::from_secs(60)).await;
    server.terminate();

    let ids: Vec<i64> = receiver.received().iter().map(Received::seq).collect();
    assert_eq!(ids, [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_delays_only_its_own_webhook() {
    let hanging =
        Receiver::start(Arc::new(|_, _| Some(Answer::Hang(Duration::from_secs(60))))).await;
    let healthy = Receiver::start(Arc::new(|_, _| None)).await;
    let dead_port = free_port();
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[
            Hook {
                id: "hanging",
                url: hanging.url(),
            },
            Hook {
                id: "dead",
                url: format!("http://127.0.0.1:{dead_port}/hooks"),
            },
            Hook {
                id: "healthy",
                url: healthy.url(),
            },
        ],
        30,
    );
    let server = Server::start(dir.path(), &[]);

    let started = Instant::now();
    link_users(&server.base, &token, "d", 50, 4).await;
    healthy.wait_for(1..=50, Duration::from_secs(30)).await;
    let took = started.elapsed();
    let shown: HashMap<String, Value> = status(dir.path())
        .into_iter()
        .map(|w| (w["id"].as_str().unwrap().to_string(), w))
        .collect();
    server.terminate();

    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(shown["healthy"]["delivered_seq"], 50);
    assert_eq!(shown["hanging"]["delivered_seq"], 0);
    assert_eq!(shown["dead"]["state"], "RETRYING");
    assert_eq!(hanging.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_two_instances_deliver_each_event_once_and_one_takes_over_when_the_other_dies(
) {
    if backend() != Backend::Postgres {
        eprintln!("skipped: it is about PostgreSQL instances sharing a lease");
        return;
    }
    let receiver = Receiver::start(Arc::new(|_, _| None)).await;
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "shared",
            url: receiver.url(),
        }],
        10,
    );
    let first = Server::start(dir.path(), &[]);
    let second = Server::start(dir.path(), &[]);
    link_users(&first.base, &token, "a", 100, 8).await;
    link_users(&second.base, &token, "b", 100, 8).await;
    receiver.wait_for(1..=200, Duration::from_secs(60)).await;
    let ids: Vec<i64> = receiver.received().iter().map(Received::seq).collect();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "each once, in order");

    // SIGKILL the instance holding the lease; the other takes over.
    let url = crate::helpers::database_url_for(dir.path()).unwrap();
    let holder = crate::helpers::psql(
        &url,
        "SELECT holder FROM webhook_leases WHERE webhook = 'shared'",
    );
    let holder = holder[0][0].clone().unwrap();
    let (dying, living) = if holder.contains(&format!("/{}/", first.pid())) {
        (first, second)
    } else {
        assert!(holder.contains(&format!("/{}/", second.pid())), "{holder}");
        (second, first)
    };
    dying.crash();
    let killed = Instant::now();
    link_users(&living.base, &token, "c", 10, 1).await;
    receiver.wait_for(201..=210, Duration::from_secs(30)).await;
    let took_over = killed.elapsed();
    eprintln!("the other instance delivered {took_over:?} after the SIGKILL");
    living.terminate();

    assert!(took_over < Duration::from_secs(15), "took {took_over:?}");
    assert_eq!(
        distinct_in_order(&receiver.received()),
        (1..=210).collect::<Vec<_>>()
    );
    assert_eq!(receiver.received().len(), 210, "no event was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_reset_sends_each_webhook_what_changes_after_it_from_the_new_feed() {
    let receiver = Receiver::start(Arc::new(|_, _| None)).await;
    let (cwd, tmp) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    configure(
        cwd.path(),
        &[Hook {
            id: "dev",
            url: receiver.url(),
        }],
        5,
    );
    let dev = crate::dev::Dev::start(cwd.path(), tmp.path(), &["--print-token"], &[]);
    let token = dev.token.clone().unwrap();
    let base = dev.api.replace("/api/admin/users/v4", "");
    link_users(&base, &token, "before-", 2, 1).await;
    receiver.wait_for([1, 2], Duration::from_secs(30)).await;

    let reset = client()
        .post(format!("{base}/_dev/reset"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    link_users(&base, &token, "after-", 1, 1).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while receiver.received().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", receiver.received());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(reset.status(), 204);
    let received = receiver.received();
    let last: Value = serde_json::from_slice(&received[2].body).unwrap();
    assert_eq!(received[2].id, "evt_1", "the feed started again at 1");
    assert_eq!(last["data"]["user_id"], "after-0");
}

#[test]
fn serve_refuses_a_bad_webhook_naming_it_as_check_config_does() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let secret = dir.path().join("hooks.whsec");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[[webhooks]]\nid = \"bad\"\nurl = \"ftp://user:pw-5k@127.0.0.1/x\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();

    let checked = linkid(dir.path(), &["check-config"]);
    let served = crate::cli::output_within(
        {
            let mut serve = crate::cli::command(dir.path());
            serve.env("LINKID_SERVER__ADDR", "127.0.0.1:0").arg("serve");
            serve
        },
        Duration::from_secs(30),
    );

    for output in [&checked, &served] {
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("webhooks[0].url"), "{stderr}");
        assert!(!stderr.contains("pw-5k"), "{stderr}");
    }
}

/// Runs `sql` on the database the binary uses in `dir`, beside it.
fn execute_sql(dir: &Path, sql: &str) {
    match crate::helpers::database_url_for(dir) {
        Some(url) => {
            crate::helpers::psql(&url, sql);
        }
        None => {
            let conn = rusqlite::Connection::open(dir.join("data/linkid.db")).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch(sql).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_whose_events_were_pruned_is_expired_until_replayed_after_the_pruning() {
    let port = free_port();
    let dir = TempDir::new().unwrap();
    let token = configure(
        dir.path(),
        &[Hook {
            id: "late",
            url: format!("http://127.0.0.1:{port}/hooks"),
        }],
        1,
    );
    let server = Server::start(dir.path(), &[]);
    link_users(&server.base, &token, "e", 8, 1).await;

    // Retention prunes events 1..=5 while the receiver is down.
    execute_sql(
        dir.path(),
        "BEGIN; DELETE FROM events WHERE seq <= 5; UPDATE feed_state SET pruned_through = 5; COMMIT;",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let expired = loop {
        let shown = status(dir.path());
        if shown[0]["state"] == "EXPIRED" || Instant::now() > deadline {
            break shown;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let receiver = Receiver::start_on(port, Arc::new(|_, _| None)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let while_expired = receiver.received().len();
    let replayed = linkid(dir.path(), &["webhooks", "replay", "late", "--after", "5"]);
    receiver.wait_for(6..=8, Duration::from_secs(10)).await;
    server.terminate();

    assert_eq!(expired[0]["state"], "EXPIRED", "{expired:?}");
    assert_eq!(expired[0]["delivered_seq"], 0);
    assert!(expired[0]["last_error"].is_string(), "{expired:?}");
    assert_eq!(while_expired, 0, "nothing is sent while expired");
    assert!(replayed.status.success());
    let ids: Vec<i64> = receiver.received().iter().map(Received::seq).collect();
    assert_eq!(ids, [6, 7, 8]);
}

/// A loopback port nothing listens on (a receiver that is down until it
/// starts there).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
