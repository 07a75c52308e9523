//! `spawn_app`: the application `main` runs, on port 0, with a fresh
//! database: a temp SQLite file, or with `LINKID_TEST_BACKEND=postgres` a
//! database of its own on the server at `LINKID_TEST_PG_URL`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::Duration;

use biscuit_auth::KeyPair;
use figment::providers::{Format, Toml};
use figment::Figment;
use linkid::auth::{mint, MintRequest, Right, RootKey};
use linkid::config::{Config, DatabaseUrl, DEFAULT_CONFIG_TOML};
use linkid::startup::Application;
use reqwest::{Client, Response};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const PREFIX: &str = "/api/admin/users/v4";

pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub keypair: KeyPair,
    pub admin: String,
    pub config: Config,
    pub dir: TempDir,
    /// The PostgreSQL database, dropped with the app (None on SQLite).
    pub database: Option<TestDatabase>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The store the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `LINKID_TEST_BACKEND`: `sqlite` (the default) or `postgres`, which
/// needs `LINKID_TEST_PG_URL` (a missing one fails the test, loudly).
pub fn backend() -> Backend {
    match std::env::var("LINKID_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
        Ok("postgres") => {
            pg_server_url();
            Backend::Postgres
        }
        Ok(other) => panic!("LINKID_TEST_BACKEND={other:?}: use sqlite or postgres"),
    }
}

/// True (after saying why) when this test is about the other backend
/// only: `if skipped_unless(Backend::Sqlite, "it deletes the SQLite file") { return; }`.
pub fn skipped_unless(wanted: Backend, why: &str) -> bool {
    let skip = backend() != wanted;
    if skip {
        eprintln!("skipped on {:?}: {why}", backend());
    }
    skip
}

/// `LINKID_TEST_PG_URL`: a superuser on a throwaway server.
pub fn pg_server_url() -> String {
    std::env::var("LINKID_TEST_PG_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        panic!(
            "LINKID_TEST_BACKEND=postgres needs LINKID_TEST_PG_URL: start a throwaway server with \
             eval \"$(scripts/pg-cluster.sh start \"$(mktemp -d /tmp/pg.XXXXXX)\")\" (scripts/test.sh does)"
        )
    })
}

/// `url` (a libpq URL) naming the database `dbname` instead.
pub fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{dbname}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Runs `sql` (one or more statements, simple protocol) on the database at
/// `url`, on a thread of its own so that sync and async tests can call it,
/// and returns the rows' values as text.
pub fn psql(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
                tokio::spawn(connection);
                let messages = client
                    .simple_query(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                messages
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                            (0..row.len())
                                .map(|i| row.get(i).map(str::to_owned))
                                .collect(),
                        ),
                        _ => None,
                    })
                    .collect()
            })
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A database of one test's own on the test server; dropped when dropped.
pub struct TestDatabase {
    pub name: String,
    /// Its URL (with the test server's password).
    pub url: String,
}

impl TestDatabase {
    /// A new, empty database.
    pub fn create() -> TestDatabase {
        let server = pg_server_url();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep_databases_of_dead_runs(&server));
        // The pid lets a later run drop what a killed one left behind.
        let name = format!(
            "linkid_t_{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        psql(&server, &format!("CREATE DATABASE \"{name}\""));
        TestDatabase {
            url: with_dbname(&server, &name),
            name,
        }
    }

    /// One for the backend under test: None on SQLite.
    pub fn for_backend() -> Option<TestDatabase> {
        (backend() == Backend::Postgres).then(TestDatabase::create)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = pg_server_url();
        let name = self.name.clone();
        // (Not from a panic: a second panic would abort the run.)
        if !std::thread::panicking() {
            psql(
                &server,
                &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            );
        }
    }
}

/// Drops test databases of test processes that are gone (killed runs, or
/// those made for a directory, which live until the process ends).
fn sweep_databases_of_dead_runs(server: &str) {
    let names = psql(
        server,
        "SELECT datname FROM pg_database WHERE datname LIKE 'linkid\\_t\\_%'",
    );
    for name in names.into_iter().filter_map(|row| row[0].clone()) {
        let pid = name.split('_').nth(2).unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            psql(
                server,
                &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            );
        }
    }
}

/// The PostgreSQL URL of the database that the binary run in `dir` uses
/// (made on first use, kept until the test process ends), or None on
/// SQLite, where the binary keeps its file in `dir/data`.
pub fn database_url_for(dir: &Path) -> Option<String> {
    // A static is never dropped: these databases outlive the tests, and the
    // sweep of the next run drops them.
    static BY_DIR: Mutex<Option<HashMap<PathBuf, TestDatabase>>> = Mutex::new(None);
    if backend() != Backend::Postgres {
        return None;
    }
    let mut by_dir = BY_DIR.lock().unwrap_or_else(|e| e.into_inner());
    let database = by_dir
        .get_or_insert_with(HashMap::new)
        .entry(dir.to_path_buf())
        .or_insert_with(TestDatabase::create);
    Some(database.url.clone())
}

/// One stored link, as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLink {
    pub user_id: String,
    pub provider_id: String,
    pub linked_user_id: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Every link the database of the binary run in `dir` holds, read directly.
/// The change feed's (type, actor, request_id) as the CLI commands in
/// `dir` stored them, on either backend.
pub fn stored_events(dir: &Path) -> Vec<(String, String, Option<String>)> {
    const QUERY: &str = "SELECT type, actor, request_id FROM events ORDER BY seq";
    match database_url_for(dir) {
        Some(url) => psql(&url, QUERY)
            .into_iter()
            .map(|row| {
                (
                    row[0].clone().unwrap(),
                    row[1].clone().unwrap(),
                    row[2].clone(),
                )
            })
            .collect(),
        None => {
            let conn = rusqlite::Connection::open(dir.join("data/linkid.db")).unwrap();
            let mut stmt = conn.prepare(QUERY).unwrap();
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap();
            rows.map(Result::unwrap).collect()
        }
    }
}

pub fn stored_links(dir: &Path) -> Vec<StoredLink> {
    const QUERY: &str =
        "SELECT user_id, provider_id, linked_user_id, created_at, updated_at FROM linked_identities";
    match database_url_for(dir) {
        Some(url) => psql(
            &url,
            &QUERY.replace(
                "created_at, updated_at",
                "created_at::text, updated_at::text",
            ),
        )
        .into_iter()
        .map(|row| {
            let text = |i: usize| row[i].clone().unwrap_or_default();
            StoredLink {
                user_id: text(0),
                provider_id: text(1),
                linked_user_id: text(2),
                created_at: text(3),
                updated_at: text(4),
            }
        })
        .collect(),
        None => {
            let conn = rusqlite::Connection::open(dir.join("data/linkid.db")).unwrap();
            let mut stmt = conn.prepare(QUERY).unwrap();
            stmt.query_map([], |r| {
                Ok(StoredLink {
                    user_id: r.get(0)?,
                    provider_id: r.get(1)?,
                    linked_user_id: r.get(2)?,
                    created_at: r.get(3)?,
                    updated_at: r.get(4)?,
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        }
    }
}

/// Asserts that the database of the binary run in `dir` is sound: SQLite's
/// integrity check passes (PostgreSQL checks its own).
pub fn assert_database_sound(dir: &Path) {
    if database_url_for(dir).is_none() {
        let conn = rusqlite::Connection::open(dir.join("data/linkid.db")).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}

/// `LINKID_TEST_ROW_CACHE_BYTES`: when set, `database.row_cache_bytes` for
/// every app and binary the suite starts. scripts/test.sh runs the SQLite
/// pass once more with `0`, the plain read path (no row cache, no read
/// transaction held between reads).
pub fn row_cache_bytes() -> Option<u64> {
    let bytes = std::env::var("LINKID_TEST_ROW_CACHE_BYTES").ok()?;
    if bytes.is_empty() {
        return None;
    }
    Some(bytes.parse().unwrap_or_else(|_| {
        panic!("LINKID_TEST_ROW_CACHE_BYTES={bytes:?}: use a number of bytes, e.g. 0")
    }))
}

/// The built-in defaults with every path in a fresh temp dir and port 0
/// (and `LINKID_TEST_ROW_CACHE_BYTES`, see `row_cache_bytes`).
pub fn test_config(dir: &TempDir) -> Config {
    let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .merge(("server.addr", "127.0.0.1:0"))
        .merge(("database.path", dir.path().join("linkid.db")))
        .merge(("auth.private_key_file", dir.path().join("root.key")));
    if let Some(bytes) = row_cache_bytes() {
        figment = figment.merge(("database.row_cache_bytes", bytes));
    }
    Config::from_figment(figment).expect("the test config is valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    start_app(dir, TestDatabase::for_backend(), customize).await
}

/// Starts the app on `dir` (key, SQLite file) and `database` (PostgreSQL).
async fn start_app(
    dir: TempDir,
    database: Option<TestDatabase>,
    customize: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = test_config(&dir);
    if let Some(database) = &database {
        config.database.url = Some(DatabaseUrl::new(database.url.clone()));
    }
    customize(&mut config);
    let app = Application::build(&config).await.expect("the app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let keypair = RootKey::load_or_create(&config.auth)
        .expect("the key loads")
        .keypair
        .expect("the test app holds its private key");
    let admin = mint(
        &keypair,
        &MintRequest {
            admin: true,
            ..Default::default()
        },
    )
    .expect("an admin token");
    TestApp {
        address,
        client: Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        keypair,
        admin,
        config,
        dir,
        database,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.address)
    }

    pub fn mint(&self, request: MintRequest) -> String {
        mint(&self.keypair, &request).expect("a token")
    }

    pub fn token_with_rights(&self, rights: &[Right]) -> String {
        self.mint(MintRequest {
            rights: rights.to_vec(),
            ..Default::default()
        })
    }

    pub async fn list_providers(&self, token: &str) -> Response {
        self.client
            .get(self.api("/users/identity-providers"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn list(&self, token: &str, user: &str, query: &str) -> Response {
        self.client
            .get(self.api(&format!("/users/{user}/linked-identities{query}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn link(&self, token: &str, user: &str, body: &Value) -> Response {
        self.client
            .post(self.api(&format!("/users/{user}/linked-identities")))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn link_as_admin(&self, user: &str, provider: &str, remote: &str) -> Response {
        self.link(
            &self.admin,
            user,
            &link_body(provider, remote, &format!("{remote}@example.com")),
        )
        .await
    }

    pub async fn get_link(&self, token: &str, user: &str, provider: &str, query: &str) -> Response {
        self.client
            .get(self.api(&format!(
                "/users/{user}/linked-identities/{provider}{query}"
            )))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, token: &str, user: &str, provider: &str) -> Response {
        self.client
            .delete(self.api(&format!("/users/{user}/linked-identities/{provider}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Stops the server as SIGTERM would and waits for it; returns what
    /// outlives it (the temp dir with the SQLite file and key, the database).
    async fn shut_down(mut self) -> (TempDir, Option<TestDatabase>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        (self.dir, self.database)
    }

    /// Stops the server as SIGTERM would and waits for it.
    pub async fn stop(self) {
        self.shut_down().await;
    }

    /// Runs one SQL statement that both backends understand on this app's
    /// database, as an operator (or another process) would.
    pub fn execute_sql(&self, sql: &str) {
        match &self.database {
            Some(database) => {
                psql(&database.url, sql);
            }
            None => {
                rusqlite::Connection::open(&self.config.database.path)
                    .unwrap()
                    .execute_batch(sql)
                    .unwrap();
            }
        }
    }

    /// Starts a new server on the same database and key.
    pub async fn restart_with(self, customize: impl FnOnce(&mut Config)) -> TestApp {
        let (dir, database) = self.shut_down().await;
        start_app(dir, database, customize).await
    }
}

pub fn link_body(provider: &str, remote: &str, username: &str) -> Value {
    json!({"provider_id": provider, "linked_user_id": remote, "linked_username": username})
}

/// Asserts a problem details response and returns its body.
pub async fn assert_problem(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type"
    );
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "code in {body}");
    assert_eq!(body["status"], status, "status in {body}");
    assert!(body["title"].is_string(), "title in {body}");
    assert!(body["detail"].is_string(), "detail in {body}");
    assert_eq!(
        body["request_id"],
        request_id.as_str(),
        "request_id in {body}"
    );
    body
}

/// The `field` names of a validation problem's errors.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .expect("a validation problem lists its errors")
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

/// A token with one more block, as any holder can add.
pub fn attenuate(token: &str, key: &KeyPair, code: &str) -> String {
    biscuit_auth::Biscuit::from_base64(token, key.public())
        .unwrap()
        .append(biscuit_auth::BlockBuilder::new().code(code).unwrap())
        .unwrap()
        .to_base64()
        .unwrap()
}

/// An admin token that expired `ago` before now.
pub fn expired_admin(key: &KeyPair, ago: Duration) -> String {
    use biscuit_auth::builder_ext::BuilderExt;
    biscuit_auth::Biscuit::builder()
        .code(r#"role("admin");"#)
        .unwrap()
        .check_expiration_date(std::time::SystemTime::now() - ago)
        .build(key)
        .unwrap()
        .to_base64()
        .unwrap()
}

/// An admin token signed by a root key no server here trusts.
pub fn forged_admin() -> String {
    mint(
        &KeyPair::new(),
        &MintRequest {
            admin: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Whether a test that needs the repository's `.venv` must fail rather
/// than skip without it: under `scripts/test.sh` (which makes the venv and
/// sets `LINKID_TEST_FULL`) and wherever `CI` is set.
pub fn venv_is_required() -> bool {
    std::env::var_os("LINKID_TEST_FULL").is_some() || std::env::var_os("CI").is_some()
}
