//! Several linkid instances on one PostgreSQL database, and what only
//! PostgreSQL has: the rules hold across instances (one winner per race, a
//! revocation refused everywhere within a second, no acknowledged write
//! lost to a killed instance), start-up under the schema lock, outages
//! that end by themselves, statement timeouts, TLS, schema versions, and a
//! password that never shows. Run with `LINKID_TEST_BACKEND=postgres`;
//! skipped on SQLite.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::cli::{command, linkid, mint, Server};
use crate::helpers::{
    assert_problem, database_url_for, link_body, pg_server_url, psql, skipped_unless, spawn_app,
    spawn_app_with, stored_links, Backend, TestDatabase,
};

const LINKS: &str = "/api/admin/users/v4/users";
const PROVIDERS: [&str; 3] = ["azure-ad", "okta", "corporate-saml"];

fn skipped() -> bool {
    skipped_unless(
        Backend::Postgres,
        "it is about PostgreSQL (several instances, its faults, TLS)",
    )
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `n` linkid processes serving the database of one directory, with an
/// admin token minted there (so the key exists before they start).
pub(crate) struct Instances {
    dir: TempDir,
    pub(crate) servers: Vec<Server>,
    pub(crate) token: String,
}

impl Instances {
    pub(crate) fn start(n: usize) -> Instances {
        Instances::start_with(n, &[])
    }

    /// `start`, with these environment variables set for every instance.
    pub(crate) fn start_with(n: usize, env: &[(&str, &str)]) -> Instances {
        let dir = TempDir::new().unwrap();
        let token = mint(dir.path(), &["--admin"]);
        let servers = start_together(dir.path(), n, env);
        Instances {
            dir,
            servers,
            token,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `n` servers in `dir` at the same moment and waits until all listen.
fn start_together(dir: &Path, n: usize, env: &[(&str, &str)]) -> Vec<Server> {
    std::thread::scope(|scope| {
        let starting: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| Server::start(dir, env)))
            .collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

pub(crate) async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn post_link(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    user: &str,
    body: &Value,
) -> (u16, Value) {
    let response = client
        .post(format!("{base}{LINKS}/{user}/linked-identities"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    status_and_body(response).await
}

async fn list(client: &reqwest::Client, base: &str, token: &str, user: &str) -> (u16, Value) {
    let response = client
        .get(format!("{base}{LINKS}/{user}/linked-identities"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_and_body(response).await
}

/// The password in the test server's URL.
fn server_password() -> String {
    let url = pg_server_url();
    let userinfo = url.split("://").nth(1).unwrap().split('@').next().unwrap();
    userinfo.split(':').nth(1).unwrap().to_owned()
}

/// The revocation id that `linkid token revoke` records for `token`.
fn revocation_id(dir: &Path, token: &str) -> String {
    let text = std::fs::read_to_string(dir.join("data/root.key")).unwrap();
    let private: biscuit_auth::PrivateKey = text.trim().parse().unwrap();
    let public = biscuit_auth::KeyPair::from(&private).public();
    linkid::auth::revocation_ids(public, token)
        .unwrap()
        .pop()
        .unwrap()
}

/// Asks each server every 20 ms until it refuses `token` (401), up to
/// `patience`; gives each one's delay since `since` (None: never refused).
async fn refused_after(
    servers: &[&Server],
    token: &str,
    since: Instant,
    patience: Duration,
) -> Vec<Option<Duration>> {
    let client = client();
    join_all(servers.iter().map(|server| {
        let client = client.clone();
        async move {
            let url = format!("{}{LINKS}/identity-providers", server.base);
            while since.elapsed() < patience {
                let status = client
                    .get(&url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap()
                    .status();
                if status == 401 {
                    return Some(since.elapsed());
                }
                assert_eq!(status, 200, "{url}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uniqueness_races_split_across_three_instances_have_exactly_one_winner() {
    if skipped() {
        return;
    }
    const ROUNDS: usize = 4;
    const CLIENTS: usize = 48;
    let cluster = Instances::start(3);
    let bases: Vec<String> = cluster.servers.iter().map(|s| s.base.clone()).collect();
    let (client, token) = (client(), cluster.token.clone());
    let mut wins_by_instance = [0; 3];

    for round in 0..ROUNDS {
        // One user, many identities: one link, the rest USER_ALREADY_LINKED.
        let user = format!("race-user-{round}");
        let results = join_all((0..CLIENTS).map(|i| {
            let body = link_body(PROVIDERS[i % 3], &format!("remote-{round}-{i}"), "n");
            let (client, base, token, user) = (&client, &bases[i % 3], &token, &user);
            async move { (i % 3, post_link(client, base, token, user, &body).await) }
        }))
        .await;
        let winners: Vec<_> = results.iter().filter(|(_, (s, _))| *s == 201).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (_, (status, body)) in &results {
            assert!(
                *status == 201 || (*status == 400 && body["code"] == "USER_ALREADY_LINKED"),
                "round {round}: {status} {body}"
            );
        }
        wins_by_instance[winners[0].0] += 1;
        let (_, listed) = list(&client, &bases[(winners[0].0 + 1) % 3], &token, &user).await;
        assert_eq!(listed["linked_identities"].as_array().unwrap().len(), 1);
        assert_eq!(
            listed["linked_identities"][0]["linked_user_id"],
            winners[0].1 .1["linked_user_id"]
        );

        // One remote identity, many users: one owner, the rest IDENTITY_ALREADY_LINKED.
        let remote = format!("contested-{round}");
        let results = join_all((0..CLIENTS).map(|i| {
            let body = link_body("okta", &remote, "n");
            let user = format!("claimant-{round}-{i}");
            let (client, base, token) = (&client, &bases[i % 3], &token);
            async move {
                (
                    i % 3,
                    user.clone(),
                    post_link(client, base, token, &user, &body).await,
                )
            }
        }))
        .await;
        let winners: Vec<_> = results.iter().filter(|(_, _, (s, _))| *s == 201).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (_, _, (status, body)) in &results {
            assert!(
                *status == 201 || (*status == 409 && body["code"] == "IDENTITY_ALREADY_LINKED"),
                "round {round}: {status} {body}"
            );
        }
        wins_by_instance[winners[0].0] += 1;
        let owners = stored_links(cluster.path())
            .into_iter()
            .filter(|l| l.provider_id == "okta" && l.linked_user_id == remote)
            .map(|l| l.user_id)
            .collect::<Vec<_>>();
        assert_eq!(owners, [winners[0].1.clone()]);

        // The same link from every client (retries): one 201, the rest 200
        // with the same identity.
        let user = format!("retried-{round}");
        let body = link_body("corporate-saml", &format!("retried-remote-{round}"), "n");
        let results = join_all((0..CLIENTS).map(|i| {
            let (client, base, token, user, body) = (&client, &bases[i % 3], &token, &user, &body);
            async move { (i % 3, post_link(client, base, token, user, body).await) }
        }))
        .await;
        let winners: Vec<_> = results.iter().filter(|(_, (s, _))| *s == 201).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (_, (status, body)) in &results {
            assert!(
                *status == 201 || *status == 200,
                "round {round}: {status} {body}"
            );
            assert_eq!(body["linked_user_id"], format!("retried-remote-{round}"));
        }
        wins_by_instance[winners[0].0] += 1;
    }
    eprintln!(
        "races across 3 instances: {ROUNDS} rounds x 3 races x {CLIENTS} clients, exactly one 201 in each, \
         no 5xx; wins by instance {wins_by_instance:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoke_is_refused_by_all_three_instances_within_a_second() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(3);
    let victim = mint(cluster.path(), &["--admin"]);
    let servers: Vec<&Server> = cluster.servers.iter().collect();
    let client = client();
    for server in &servers {
        assert_eq!(list(&client, &server.base, &victim, "u-1").await.0, 200);
    }

    let dir = cluster.path().to_path_buf();
    let output = tokio::task::spawn_blocking({
        let victim = victim.clone();
        move || linkid(&dir, &["token", "revoke", &victim])
    })
    .await
    .unwrap();
    let revoked = Instant::now();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let delays = refused_after(&servers, &victim, revoked, Duration::from_secs(3)).await;

    for (i, delay) in delays.iter().enumerate() {
        let delay = delay.unwrap_or_else(|| panic!("instance {i} still accepts the revoked token"));
        assert!(delay < Duration::from_secs(1), "instance {i}: {delay:?}");
    }
    for server in &servers {
        assert_eq!(
            list(&client, &server.base, &cluster.token, "u-1").await.0,
            200
        );
    }
    eprintln!("revocation across 3 instances: refused after {delays:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_no_acknowledged_link_and_the_others_serve_them_all() {
    if skipped() {
        return;
    }
    const WRITERS: usize = 24;
    let mut cluster = Instances::start(3);
    let bases: Vec<String> = cluster.servers.iter().map(|s| s.base.clone()).collect();
    let acked: Arc<Mutex<HashMap<String, (String, usize)>>> = Arc::default();
    let (stop, killed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, base, token) = (client(), bases[w % 3].clone(), cluster.token.clone());
            let (acked, stop, killed) = (acked.clone(), stop.clone(), killed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("w{w}-{i}");
                    let remote = format!("remote-{user}");
                    i += 1;
                    let url = format!("{base}{LINKS}/{user}/linked-identities");
                    let body = link_body(PROVIDERS[w % 3], &remote, "n");
                    let Ok(response) = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                    else {
                        assert!(
                            w % 3 == 0 && killed.load(Ordering::Relaxed),
                            "instance {} failed",
                            w % 3
                        );
                        break;
                    };
                    let status = response.status().as_u16();
                    if response.bytes().await.is_err() {
                        assert!(w % 3 == 0 && killed.load(Ordering::Relaxed));
                        break;
                    }
                    assert_eq!(status, 201, "instance {}", w % 3);
                    acked.lock().unwrap().insert(user, (remote, w % 3));
                }
            })
        })
        .collect();

    // Until enough writes went through the instance to kill (the machine
    // may be busy): then kill it in the middle of its writes.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let through_first = acked
            .lock()
            .unwrap()
            .values()
            .filter(|(_, i)| *i == 0)
            .count();
        if through_first >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killed.store(true, Ordering::Relaxed);
    cluster.servers.remove(0).crash();
    let acked_before_kill = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer
            .await
            .expect("every write was acknowledged with a 201 until the kill");
    }

    let acked = acked.lock().unwrap().clone();
    let on_killed = acked
        .values()
        .filter(|(_, instance)| *instance == 0)
        .count();
    assert!(
        on_killed >= 50,
        "too few writes went to the killed instance: {on_killed}"
    );
    let survivors: Vec<String> = cluster.servers.iter().map(|s| s.base.clone()).collect();
    let client = client();
    let checks = acked.iter().enumerate().map(|(n, (user, (remote, _)))| {
        let (client, base, token) = (&client, &survivors[n % 2], &cluster.token);
        async move {
            let (status, listed) = list(client, base, token, user).await;
            assert_eq!(status, 200);
            assert_eq!(
                listed["linked_identities"][0]["linked_user_id"],
                remote.as_str(),
                "{user} was acknowledged and is lost"
            );
        }
    });
    futures_util::stream::iter(checks)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    eprintln!(
        "SIGKILL of 1 of 3 instances under {WRITERS} writers: {} acknowledged links ({on_killed} through the killed \
         instance, {acked_before_kill} before the kill), all served by the other two",
        acked.len()
    );
}

/// A PostgreSQL server of the test's own (scripts/pg-cluster.sh), which the
/// test may pause; deleted when dropped.
struct OwnCluster {
    dir: PathBuf,
    url: String,
}

impl OwnCluster {
    const SCRIPT: &'static str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-cluster.sh");

    fn start() -> OwnCluster {
        // Under /tmp: as root the server runs as the postgres user, who must reach it.
        let dir = tempfile::Builder::new()
            .prefix("linkid-own-pg.")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let mut cluster = OwnCluster {
            dir,
            url: String::new(),
        };
        cluster.script("start");
        let output = Command::new("bash")
            .args(["-c", r#". "$1" && printf %s "$LINKID_TEST_PG_URL""#, "-"])
            .arg(cluster.dir.join("env.sh"))
            .output()
            .unwrap();
        cluster.url = String::from_utf8(output.stdout).unwrap();
        cluster
    }

    fn script(&self, action: &str) {
        let output = Command::new(Self::SCRIPT)
            .arg(action)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pg-cluster.sh {action}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(Self::SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_is_down_requests_are_503_and_service_resumes_without_restart() {
    if skipped() {
        return;
    }
    let cluster = OwnCluster::start();
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(
        dir.path(),
        &[
            ("LINKID_DATABASE__URL", cluster.url.as_str()),
            ("LINKID_DATABASE__STATEMENT_TIMEOUT_SECS", "2"),
        ],
    );
    let client = client();
    let base = server.base.clone();
    let body = link_body("okta", "before-outage", "n");
    assert_eq!(
        post_link(&client, &base, &token, "before", &body).await.0,
        201
    );

    cluster.script("pause");
    let down = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while down.elapsed() < Duration::from_secs(3) {
        let mut started = Instant::now();
        let listed = client
            .get(format!("{base}{LINKS}/before/linked-identities"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(listed.headers().contains_key("retry-after"));
        assert_problem(listed, 503, "STORE_UNAVAILABLE").await;
        slowest = slowest.max(started.elapsed());
        started = Instant::now();
        let linked = client
            .post(format!("{base}{LINKS}/during/linked-identities"))
            .bearer_auth(&token)
            .json(&link_body("okta", "during-outage", "n"))
            .send()
            .await
            .unwrap();
        assert!(linked.headers().contains_key("retry-after"));
        assert_problem(linked, 503, "STORE_UNAVAILABLE").await;
        slowest = slowest.max(started.elapsed());
        answered += 2;
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    let problem = assert_problem(ready, 503, "NOT_READY").await;
    let reason = problem["detail"].as_str().unwrap().to_owned();
    assert!(reason.contains("PostgreSQL"), "{reason}");
    assert!(!reason.contains(&server_password()), "{reason}");
    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    cluster.script("resume");
    let outage = down.elapsed();
    let up = Instant::now();
    loop {
        let (status, listed) = list(&client, &base, &token, "before").await;
        if status == 200 {
            assert_eq!(
                listed["linked_identities"][0]["linked_user_id"],
                "before-outage"
            );
            break;
        }
        assert_eq!(status, 503);
        assert!(up.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = up.elapsed();
    let after = link_body("okta", "after-outage", "n");
    assert_eq!(
        post_link(&client, &base, &token, "after", &after).await.0,
        201
    );
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(!server.log().contains(&server_password()));
    eprintln!(
        "outage: PostgreSQL down {outage:.1?}; {answered} API calls answered 503 STORE_UNAVAILABLE, the slowest in \
         {slowest:.0?}; /readyz 503 ({reason}); service back {recovery:.0?} after PostgreSQL, no restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_started_together_on_an_empty_database_all_come_up() {
    if skipped() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let url = database_url_for(dir.path()).unwrap();
    assert_eq!(
        psql(
            &url,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        [[Some("0".to_owned())]],
        "the database starts empty"
    );

    let servers = start_together(dir.path(), 3, &[]);

    let client = client();
    for server in &servers {
        let ready = client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
        assert_eq!(list(&client, &server.base, &token, "u-1").await.0, 200);
    }
    let created = servers
        .iter()
        .filter(|s| s.log().contains("created the database schema"))
        .count();
    assert_eq!(
        created, 1,
        "one instance created the schema, the others found it"
    );
    assert_eq!(
        psql(&url, "SELECT version FROM linkid_schema_version"),
        [[Some("4".to_owned())]]
    );
}

#[tokio::test]
async fn tls_modes_are_honoured_and_a_wrong_ca_is_refused() {
    if skipped() {
        return;
    }
    let ca = std::env::var("LINKID_TEST_PG_CA").expect(
        "LINKID_TEST_PG_CA: the CA of the test server's certificate (scripts/pg-cluster.sh)",
    );
    let database = TestDatabase::create();
    let encrypted = |name: &str| {
        psql(
            &database.url,
            &format!(
                "SELECT DISTINCT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = current_database() AND a.application_name = '{name}'"
            ),
        )
    };

    for (i, (mode, tls)) in [
        ("sslmode=verify-full&sslrootcert=CA", "t"),
        ("sslmode=verify-ca&sslrootcert=CA", "t"),
        ("sslmode=require", "t"),
        ("sslmode=disable", "f"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("linkid-tls-{i}");
        let url = format!(
            "{}?{}&application_name={name}",
            database.url,
            mode.replace("CA", &ca)
        );
        let app =
            spawn_app_with(|c| c.database.url = Some(linkid::config::DatabaseUrl::new(url))).await;
        assert_eq!(
            app.link_as_admin(&name, "okta", &name).await.status(),
            201,
            "{mode}"
        );
        assert_eq!(encrypted(&name), [[Some(tls.to_owned())]], "{mode}");
    }

    let other = TempDir::new().unwrap();
    let other_ca = other.path().join("other-ca.crt");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=not the server's CA"])
        .arg("-keyout")
        .arg(other.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = format!(
            "{}?sslmode={mode}&sslrootcert={}",
            database.url,
            other_ca.display()
        );
        let mut config = crate::helpers::test_config(&other);
        config.database.url = Some(linkid::config::DatabaseUrl::new(url));

        let refused = linkid::startup::Application::build(&config).await.err();

        let message = format!(
            "{:#}",
            refused.expect("a certificate from another CA is refused")
        );
        assert!(message.contains("certificate"), "{mode}: {message}");
        assert!(!message.contains(&server_password()), "{mode}: {message}");
    }
}

#[tokio::test]
async fn the_password_never_appears_in_logs_check_config_readyz_or_errors() {
    if skipped() {
        return;
    }
    let password = server_password();
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let client = client();
    for (level, format) in [("trace", "text"), ("debug", "json")] {
        let server = Server::start(
            dir.path(),
            &[("RUST_LOG", level), ("LINKID_LOG__FORMAT", format)],
        );
        let base = server.base.clone();
        let user = format!("secret-{level}");
        assert_eq!(
            post_link(
                &client,
                &base,
                &token,
                &user,
                &link_body("okta", &user, "n")
            )
            .await
            .0,
            201
        );
        assert_eq!(list(&client, &base, &token, &user).await.0, 200);
        let ready = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let log = server.log();

        assert!(log.contains("database ready"), "{log}");
        assert!(
            log.contains("postgres://"),
            "the log names the database: {log}"
        );
        for shown in [&log, &ready, &metrics] {
            assert!(
                !shown.contains(&password),
                "the password in the {level}/{format} output"
            );
        }
    }
    let checked = linkid(dir.path(), &["check-config"]);
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success());
    assert!(
        stdout.contains("database.url     postgres://linkid_test@"),
        "{stdout}"
    );
    assert!(!stdout.contains(&password), "{stdout}");

    // A wrong password: the refusal says so and shows neither password.
    let url = database_url_for(dir.path()).unwrap();
    let wrong = url.replace(&password, "wrong-password-6f1d");
    let refused = command(dir.path())
        .env("LINKID_DATABASE__URL", &wrong)
        .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
        .arg("serve")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    for secret in [&password, "wrong-password-6f1d"] {
        assert!(!stderr.contains(secret), "{stderr}");
    }
    // A malformed URL: the config check names the key, not the password.
    let malformed = command(dir.path())
        .env(
            "LINKID_DATABASE__URL",
            url.replace("127.0.0.1:", "127.0.0.1:x"),
        )
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert_eq!(malformed.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(!stderr.contains(&password), "{stderr}");
}

#[tokio::test]
async fn a_stuck_statement_becomes_503_within_the_statement_timeout() {
    if skipped() {
        return;
    }
    let app = spawn_app_with(|c| c.database.statement_timeout_secs = 1).await;
    assert_eq!(app.link_as_admin("u-1", "okta", "r-1").await.status(), 201);
    let url = app.database.as_ref().unwrap().url.clone();
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE linked_identities IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let started = Instant::now();
    let linked = app.link_as_admin("u-2", "okta", "r-2").await;
    let link_took = started.elapsed();
    let started = Instant::now();
    let listed = app.list(&app.admin, "u-1", "").await;
    let list_took = started.elapsed();

    assert!(linked.headers().contains_key("retry-after"));
    let problem = assert_problem(linked, 503, "STORE_UNAVAILABLE").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("statement_timeout"),
        "{problem}"
    );
    assert_problem(listed, 503, "STORE_UNAVAILABLE").await;
    for took in [link_took, list_took] {
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{took:?}"
        );
    }
    let healthz = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    locker.batch_execute("ROLLBACK").await.unwrap();
    let started = Instant::now();
    assert_eq!(app.link_as_admin("u-2", "okta", "r-2").await.status(), 201);
    assert!(started.elapsed() < Duration::from_millis(500));
    eprintln!(
        "stuck statement: a link answered 503 after {link_took:.2?}, a list after {list_took:.2?} \
         (statement timeout 1s); fine again once the lock was gone"
    );
}

/// What happened when a transaction of the test's own took a revocation's
/// `seq` and committed only after `linkid token revoke` of another token
/// had taken the next one.
struct LateCommit {
    /// How long after the commit `linkid token revoke` finished (None: it
    /// finished before: nothing made it wait).
    revoke_finished_after_commit: Option<Duration>,
    /// Per server: when the early token was refused, after the commit.
    early_refused: Vec<Option<Duration>>,
    /// Per server: when the late token was refused, after the commit.
    late_refused: Vec<Option<Duration>>,
}

/// With `lock_expected`, the test commits after about a second (the
/// revocation waits for it meanwhile); without, it commits only once every
/// server refuses the late token, i.e. once the pollers have passed its seq.
async fn revoke_around_a_late_commit(
    dir: &Path,
    servers: &[&Server],
    lock_expected: bool,
    patience: Duration,
) -> LateCommit {
    let (early, late) = (mint(dir, &["--admin"]), mint(dir, &["--admin"]));
    let client = client();
    for server in servers {
        for token in [&early, &late] {
            assert_eq!(list(&client, &server.base, token, "u-1").await.0, 200);
        }
    }
    let url = database_url_for(dir).unwrap();
    let (mut held, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = held.transaction().await.unwrap();
    let added: bool = tx
        .query_one("SELECT linkid_revoke($1)", &[&revocation_id(dir, &early)])
        .await
        .unwrap()
        .get(0);
    assert!(added);

    let revoking = tokio::task::spawn_blocking({
        let (dir, late) = (dir.to_path_buf(), late.clone());
        move || {
            let output = linkid(&dir, &["token", "revoke", &late]);
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            Instant::now()
        }
    });
    // Pollers run meanwhile: had the late revocation committed, they would
    // see its seq and move past the early one's.
    let finished = if lock_expected {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tx.commit().await.unwrap();
        let committed = Instant::now();
        (committed, revoking.await.unwrap())
    } else {
        let finished = revoking.await.unwrap();
        let refused = refused_after(servers, &late, finished, Duration::from_secs(5)).await;
        assert!(refused.iter().all(Option::is_some), "{refused:?}");
        tx.commit().await.unwrap();
        (Instant::now(), finished)
    };
    let (committed, finished) = finished;
    let (early_refused, late_refused) = tokio::join!(
        refused_after(servers, &early, committed, patience),
        refused_after(servers, &late, committed, patience)
    );
    LateCommit {
        revoke_finished_after_commit: finished.checked_duration_since(committed),
        early_refused,
        late_refused,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_committed_late_is_still_refused_by_every_instance_within_a_second() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(3);
    let servers: Vec<&Server> = cluster.servers.iter().collect();

    let seen =
        revoke_around_a_late_commit(cluster.path(), &servers, true, Duration::from_secs(2)).await;

    let waited = seen
        .revoke_finished_after_commit
        .expect("the second revocation waited for the first one's commit");
    for (token, delays) in [("early", &seen.early_refused), ("late", &seen.late_refused)] {
        for (i, delay) in delays.iter().enumerate() {
            let delay =
                delay.unwrap_or_else(|| panic!("instance {i} never refused the {token} token"));
            assert!(
                delay < Duration::from_secs(1),
                "{token} token, instance {i}: {delay:?}"
            );
        }
    }

    // The same with a naive append (a sequence value without the lock),
    // on a database of its own: the early token is never refused. This is
    // what the lock prevents, and what the test above would catch.
    let naive = TempDir::new().unwrap();
    mint(naive.path(), &["--admin"]);
    let server = Server::start(naive.path(), &[]);
    psql(
        &database_url_for(naive.path()).unwrap(),
        "CREATE OR REPLACE FUNCTION linkid_next_seq(sequence regclass) RETURNS bigint \
         LANGUAGE sql AS 'SELECT nextval(sequence)'",
    );
    let gap =
        revoke_around_a_late_commit(naive.path(), &[&server], false, Duration::from_millis(1500))
            .await;
    assert!(gap.late_refused[0].is_some());
    assert_eq!(
        gap.early_refused[0], None,
        "without the lock the poller skips the late commit"
    );
    eprintln!(
        "late commit: the second revoke finished {waited:.2?} after the first's commit (it waited for the lock); after \
         the commit the early token was refused after {:?} and the late one after {:?} (3 instances). With a naive \
         append the early token was still accepted 1.5 s after its commit.",
        seen.early_refused, seen.late_refused
    );
}

#[test]
fn a_database_newer_than_the_binary_is_refused_naming_both_versions() {
    if skipped() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let seeded = linkid(dir.path(), &["seed", "--links", "2"]);
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let url = database_url_for(dir.path()).unwrap();
    psql(&url, "UPDATE linkid_schema_version SET version = 999");

    let refused = command(dir.path())
        .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
        .arg("serve")
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("schema version 999"), "{stderr}");
    let supported: u32 = stderr
        .split("this linkid's schema version ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the binary's version is named: {stderr}"));
    assert!((1..999).contains(&supported), "{stderr}");
    assert!(!stderr.contains(&server_password()), "{stderr}");
    assert_eq!(
        psql(&url, "SELECT (SELECT version FROM linkid_schema_version), (SELECT count(*) FROM linked_identities)"),
        [[Some("999".to_owned()), Some("2".to_owned())]],
        "the database is left as it was"
    );
}

#[tokio::test]
async fn seed_fills_postgresql_and_backup_points_to_pg_dump() {
    if skipped() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);

    let seeded = linkid(dir.path(), &["seed", "--links", "3000"]);
    let again = linkid(dir.path(), &["seed", "--links", "3000"]);
    let backup = linkid(dir.path(), &["backup", "copy.db"]);

    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    assert!(String::from_utf8_lossy(&seeded.stderr).contains("added 3000 links"));
    assert!(String::from_utf8_lossy(&again.stderr).contains("added 0 links"));
    let server = Server::start(dir.path(), &[]);
    let (status, listed) = list(&client(), &server.base, &token, "seed-user-2999").await;
    assert_eq!(status, 200);
    assert_eq!(
        listed["linked_identities"][0],
        json!({"provider_id": "corporate-saml", "linked_user_id": "seed-remote-2999",
               "linked_username": "seed-user-2999@example.com",
               "created_at": listed["linked_identities"][0]["created_at"],
               "updated_at": listed["linked_identities"][0]["updated_at"]})
    );
    let stderr = String::from_utf8_lossy(&backup.stderr);
    assert_eq!(backup.status.code(), Some(1));
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert!(!stderr.contains(&server_password()), "{stderr}");
    assert!(!dir.path().join("copy.db").exists());
}

#[tokio::test]
async fn the_store_names_its_database_without_the_password() {
    if skipped() {
        return;
    }
    let app = spawn_app().await;
    let name = app.database.as_ref().unwrap().name.clone();
    let store_says = linkid::store::Store::open(&app.config.database, &app.config.id_rules())
        .await
        .unwrap()
        .describe();
    assert!(store_says.ends_with(&format!("/{name}")), "{store_says}");
    assert!(!store_says.contains(&server_password()), "{store_says}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_caught_in_a_deadlock_with_another_writer_is_retried_not_a_503() {
    if skipped() {
        return;
    }
    // Another writer (say, an import in one transaction) holds a row with
    // the remote identity; this link waits for it, holding its own row for
    // the user; the writer then gives the user the very link asked for.
    // Each waits for the other: PostgreSQL breaks the cycle by failing the
    // link's statement, which is retried and finds the link made: a 200.
    let app = Arc::new(spawn_app().await);
    let url = app.database.as_ref().unwrap().url.clone();
    let (other, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    other
        .batch_execute(
            "BEGIN; INSERT INTO linked_identities \
             (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
             VALUES ('someone-else', 'okta', 'r-1', 'r-1', 'n', now(), now())",
        )
        .await
        .unwrap();

    let request = tokio::spawn({
        let app = app.clone();
        async move { app.link_as_admin("u-1", "okta", "r-1").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    other
        .batch_execute(
            "UPDATE linked_identities SET user_id = 'u-1', linked_username = 'r-1@example.com' \
             WHERE user_id = 'someone-else'; COMMIT",
        )
        .await
        .unwrap();
    let (status, body) = status_and_body(request.await.unwrap()).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["linked_user_id"], "r-1");
}

/// The change feed of one instance, read in pages of `limit` from `after`.
async fn feed_page(client: &reqwest::Client, base: &str, token: &str, query: &str) -> Value {
    let response = client
        .get(format!(
            "{base}/api/admin/users/v4/linked-identities/events{query}"
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.unwrap()
}

pub(crate) async fn whole_feed(client: &reqwest::Client, base: &str, token: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = feed_page(client, base, token, &format!("?after={after}&limit=1000")).await;
        let events = page["events"].as_array().unwrap().clone();
        after = page["next_after"].as_i64().unwrap();
        if events.is_empty() {
            return all;
        }
        all.extend(events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_tailing_one_instance_sees_every_change_made_through_both_once_in_order() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(2);
    let token = cluster.token.clone();
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let base = cluster.servers[w % 2].base.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let client = client();
                for i in 0..9 {
                    let user = format!("w{w}-u{}", i / 3);
                    let remote = format!("r-{user}");
                    match i % 3 {
                        0 => {
                            post_link(
                                &client,
                                &base,
                                &token,
                                &user,
                                &link_body("okta", &remote, "n"),
                            )
                            .await
                        }
                        1 => {
                            post_link(
                                &client,
                                &base,
                                &token,
                                &user,
                                &link_body("okta", &remote, &format!("n{i}")),
                            )
                            .await
                        }
                        _ => {
                            let response = client
                                .delete(format!("{base}{LINKS}/{user}/linked-identities/okta"))
                                .bearer_auth(&token)
                                .send()
                                .await
                                .unwrap();
                            status_and_body(response).await
                        }
                    };
                }
            })
        })
        .collect();
    let consumer = {
        let (base, token) = (cluster.servers[0].base.clone(), token.clone());
        tokio::spawn(async move {
            let client = client();
            let (mut seen, mut after, mut quiet) = (Vec::new(), 0, 0);
            while quiet < 3 {
                let page = feed_page(
                    &client,
                    &base,
                    &token,
                    &format!("?after={after}&limit=5&wait=1"),
                )
                .await;
                let events = page["events"].as_array().unwrap().clone();
                after = page["next_after"].as_i64().unwrap();
                quiet = if events.is_empty() { quiet + 1 } else { 0 };
                seen.extend(events);
            }
            seen
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }

    let seen = consumer.await.unwrap();
    let full = whole_feed(&client(), &cluster.servers[1].base, &token).await;
    assert_eq!(
        seen, full,
        "the tail on one instance equals a full read on the other"
    );
    let mut rebuilt = std::collections::BTreeMap::new();
    for event in &seen {
        let user = event["user_id"].as_str().unwrap().to_owned();
        match event["type"].as_str().unwrap() {
            "UNLINKED" => {
                rebuilt.remove(&user);
            }
            _ => {
                rebuilt.insert(user, event["linked_username"].as_str().unwrap().to_owned());
            }
        }
    }
    let stored: std::collections::BTreeMap<String, String> = stored_links(cluster.path())
        .into_iter()
        .map(|link| (link.user_id.clone(), String::new()))
        .collect();
    assert_eq!(
        rebuilt.keys().collect::<Vec<_>>(),
        stored.keys().collect::<Vec<_>>(),
        "replaying the feed rebuilds the stored links"
    );
    eprintln!(
        "feed across two instances: {} events from 32 writers",
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_instance_wakes_on_a_commit_through_another() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(2);
    let (waiting, writing) = (
        cluster.servers[0].base.clone(),
        cluster.servers[1].base.clone(),
    );
    let after = whole_feed(&client(), &waiting, &cluster.token).await.len();
    let poll = {
        let token = cluster.token.clone();
        tokio::spawn(async move {
            feed_page(
                &client(),
                &waiting,
                &token,
                &format!("?after={after}&wait=20"),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let committed = Instant::now();
    let (status, _) = post_link(
        &client(),
        &writing,
        &cluster.token,
        "elsewhere",
        &link_body("okta", "r-e", "n"),
    )
    .await;
    assert_eq!(status, 201);
    let page = poll.await.unwrap();

    let woke = committed.elapsed();
    assert_eq!(page["events"][0]["user_id"], "elsewhere");
    assert!(
        woke < Duration::from_millis(1500),
        "woke {woke:?} after the commit"
    );
    eprintln!("long poll woken {woke:?} after a commit on another instance");
}

/// Holds an event's transaction open (as a slow instance would) while a
/// link commits through linkid, and tails the feed all along; returns the
/// user ids the tail saw, in order.
async fn tail_around_a_late_event(cluster: &Instances, hold: Duration) -> Vec<String> {
    let url = database_url_for(cluster.path()).unwrap();
    let (mut held, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let base = cluster.servers[0].base.clone();
    let token = cluster.token.clone();
    let start = whole_feed(&client(), &base, &token).await.len() as i64;
    let tx = held.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO events (seq, type, occurred_at, user_id, provider_id, linked_user_id, \
         linked_username, actor) VALUES (linkid_next_seq('events_seq'), 'LINKED', now(), \
         'late', 'okta', 'r-late', 'late', 'test')",
        &[],
    )
    .await
    .unwrap();
    let linking = {
        let (base, token) = (base.clone(), token.clone());
        tokio::spawn(async move {
            post_link(
                &client(),
                &base,
                &token,
                "prompt",
                &link_body("okta", "r-prompt", "n"),
            )
            .await
        })
    };
    let tail = {
        let (base, token) = (base.clone(), token.clone());
        tokio::spawn(async move {
            let (mut seen, mut after) = (Vec::new(), start);
            let until = Instant::now() + hold + Duration::from_millis(1500);
            while Instant::now() < until {
                let page = feed_page(&client(), &base, &token, &format!("?after={after}")).await;
                for event in page["events"].as_array().unwrap() {
                    seen.push(event["user_id"].as_str().unwrap().to_owned());
                }
                after = page["next_after"].as_i64().unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            seen
        })
    };
    tokio::time::sleep(hold).await;
    tx.commit().await.unwrap();
    assert_eq!(linking.await.unwrap().0, 201);
    tail.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_never_skipped_by_a_tailing_consumer() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(1);

    let seen = tail_around_a_late_event(&cluster, Duration::from_millis(800)).await;

    assert_eq!(
        seen,
        ["late", "prompt"],
        "the late commit first, then the one that waited for it"
    );

    // A naive append (a sequence value without the lock), on a database of
    // its own: the link commits first, the tail moves past the late seq and
    // never sees it. This is what the lock prevents.
    let naive = Instances::start(1);
    psql(
        &database_url_for(naive.path()).unwrap(),
        "CREATE OR REPLACE FUNCTION linkid_next_seq(sequence regclass) RETURNS bigint \
         LANGUAGE sql AS 'SELECT nextval(sequence)'",
    );
    let skipped_late = tail_around_a_late_event(&naive, Duration::from_millis(800)).await;
    assert_eq!(
        skipped_late,
        ["prompt"],
        "without the lock the tail skips the late event"
    );
}
