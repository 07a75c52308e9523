//! The real binary, as a user runs it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::helpers::{assert_database_sound, backend, stored_links, Backend};

const BIN: &str = env!("CARGO_BIN_EXE_linkid");

/// A `linkid` server process started in a directory with no config file.
pub struct Server {
    child: Child,
    pub base: String,
    pub log: Arc<Mutex<String>>,
}

/// The binary, run in `dir` as a user would: none of the caller's
/// `LINKID_*` settings or `RUST_LOG` (the suite's own `LINKID_TEST_*`
/// would be unknown keys), and on PostgreSQL the database of `dir`
/// (`LINKID_DATABASE__URL`), so that every command run in `dir` shares it;
/// `LINKID_TEST_ROW_CACHE_BYTES` becomes `LINKID_DATABASE__ROW_CACHE_BYTES`.
pub fn command(dir: &Path) -> Command {
    // With no config.toml in `dir` the binary reads the installed config,
    // and these tests would run against that host's files.
    assert!(
        !Path::new(linkid::config::INSTALLED_CONFIG_PATH).exists(),
        "{} exists (the linkid package is installed here): the tests run the binary \
         in directories without a config file and would read it; remove the package \
         (apt-get purge linkid) or run the tests on another machine",
        linkid::config::INSTALLED_CONFIG_PATH
    );
    let mut command = Command::new(BIN);
    command.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LINKID_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    if let Some(url) = crate::helpers::database_url_for(dir) {
        command.env("LINKID_DATABASE__URL", url);
    }
    if let Some(bytes) = crate::helpers::row_cache_bytes() {
        command.env("LINKID_DATABASE__ROW_CACHE_BYTES", bytes.to_string());
    }
    command
}

impl Server {
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let mut command = command(dir);
        command
            .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening") {
                        // Text (`addr=127.0.0.1:N`) and JSON (`"addr":"127.0.0.1:N"`) logs.
                        if let Some(rest) = line.split("127.0.0.1:").nth(1) {
                            let port: String =
                                rest.chars().take_while(char::is_ascii_digit).collect();
                            let _ = addr_tx.send(format!("127.0.0.1:{port}"));
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the server did not say where it listens: {}",
                    log.lock().unwrap()
                )
            });
        Server {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn linkid(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().expect("the binary runs")
}

/// Runs a command to its end, or kills it after `limit` (a `serve` that
/// should have refused its configuration would otherwise run for ever).
pub fn output_within(
    mut command: std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

pub fn mint(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["token", "mint"];
    all.extend_from_slice(args);
    let output = linkid(dir, &all);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "mint prints only the token: {stdout:?}"
    );
    stdout.trim().to_owned()
}

pub async fn get(server: &Server, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path}", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_first_start_in_an_empty_directory_generates_the_key_and_database() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(dir.path(), &[]);

    let key = dir.path().join("data/root.key");
    assert!(key.exists());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        dir.path().join("data/linkid.db").exists(),
        backend() == Backend::Sqlite,
        "the SQLite file exists exactly when SQLite is the store"
    );
    let log = server.log();
    assert!(
        log.contains("data/root.key"),
        "the log says where the key is: {log}"
    );
    let private = std::fs::read_to_string(&key).unwrap();
    let hex = private.trim().split('/').nth(1).unwrap();
    assert!(!log.contains(hex), "the private key must never be logged");

    let token = mint(dir.path(), &["--admin"]);
    let response = get(
        &server,
        "/api/admin/users/v4/users/identity-providers",
        &token,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["identity_providers"].as_array().unwrap().len(), 3);
    assert!(
        !server.log().contains(&token),
        "tokens must never be logged"
    );
}

#[tokio::test]
async fn minted_rights_user_and_ttl_are_enforced() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(dir.path(), &[]);
    let lister = mint(
        dir.path(),
        &["--right", "linked_identities:list", "--user", "u-1"],
    );
    let short = mint(dir.path(), &["--admin", "--ttl", "1s"]);

    assert_eq!(
        get(
            &server,
            "/api/admin/users/v4/users/u-1/linked-identities",
            &lister
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        get(
            &server,
            "/api/admin/users/v4/users/u-2/linked-identities",
            &lister
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        get(
            &server,
            "/api/admin/users/v4/users/identity-providers",
            &lister
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        get(
            &server,
            "/api/admin/users/v4/users/identity-providers",
            &short
        )
        .await
        .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        get(
            &server,
            "/api/admin/users/v4/users/identity-providers",
            &short
        )
        .await
        .status(),
        401
    );
}

#[test]
fn mint_refuses_a_token_without_rights_and_unknown_rights() {
    let dir = TempDir::new().unwrap();

    let nothing = linkid(dir.path(), &["token", "mint"]);
    let unknown = linkid(dir.path(), &["token", "mint", "--right", "everything"]);
    let bad_ttl = linkid(dir.path(), &["token", "mint", "--admin", "--ttl", "soon"]);

    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("--admin"));
    assert!(!unknown.status.success());
    assert!(!bad_ttl.status.success());
}

#[test]
fn inspect_shows_blocks_and_revocation_ids() {
    let dir = TempDir::new().unwrap();
    let token = mint(
        dir.path(),
        &["--right", "linked_identities:list", "--ttl", "1h"],
    );

    let output = linkid(dir.path(), &["token", "inspect", &token]);

    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("valid for this server's root key"), "{text}");
    assert!(
        text.contains(r#"right("linked_identities:list")"#),
        "{text}"
    );
    assert!(text.contains("check if time"), "{text}");
    assert!(text.contains("revocation id: "), "{text}");
}

#[tokio::test]
async fn token_revoke_makes_a_running_server_refuse_the_token_within_a_second() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(dir.path(), &[]);
    let token = mint(dir.path(), &["--admin"]);
    let other = mint(dir.path(), &["--admin"]);
    let path = "/api/admin/users/v4/users/identity-providers";
    assert_eq!(get(&server, path, &token).await.status(), 200);

    let output = linkid(dir.path(), &["token", "revoke", &token]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let refused = get(&server, path, &token).await;
    assert_eq!(refused.status(), 401);
    assert!(refused.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(get(&server, path, &other).await.status(), 200);
}

#[test]
fn openapi_prints_the_committed_document() {
    let dir = TempDir::new().unwrap();

    let output = linkid(dir.path(), &["openapi"]);

    assert!(output.status.success());
    assert!(
        output.stdout == include_bytes!("../../openapi/openapi.json"),
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[tokio::test]
async fn sigterm_exits_zero_and_leaves_a_clean_database() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(dir.path(), &[]);
    let token = mint(dir.path(), &["--admin"]);
    let response = reqwest::Client::new()
        .post(format!("{}/api/admin/users/v4/users/u-1/linked-identities", server.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({"provider_id": "okta", "linked_user_id": "r1", "linked_username": "n"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let status = server.terminate();

    assert!(status.success(), "{status:?}");
    if backend() == Backend::Sqlite {
        let wal = dir.path().join("data/linkid.db-wal");
        assert!(
            !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
            "the WAL is checkpointed"
        );
    }
    assert_database_sound(dir.path());
    assert_eq!(stored_links(dir.path()).len(), 1);
}

/// Runs `linkid` with `input` on its stdin.
fn linkid_with_stdin(dir: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = command(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn inspect_says_whether_a_token_is_valid_expired_revoked_or_foreign_here() {
    let dir = TempDir::new().unwrap();
    let elsewhere = TempDir::new().unwrap();
    let valid = mint(dir.path(), &["--admin"]);
    let expiring = mint(dir.path(), &["--admin", "--ttl", "1s"]);
    let revoked = mint(dir.path(), &["--admin"]);
    let foreign = mint(elsewhere.path(), &["--admin"]);
    let revoke = linkid(dir.path(), &["token", "revoke", &revoked]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let key = std::fs::read_to_string(dir.path().join("data/root.key")).unwrap();
    let private: biscuit_auth::PrivateKey = key.trim().parse().unwrap();
    let trusted = biscuit_auth::KeyPair::from(&private).public().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    for (token, verdict) in [
        (&valid, "verdict: valid\n"),
        (&expiring, "verdict: expired\n"),
        (&revoked, "verdict: revoked\n"),
        (&foreign, "verdict: not signed by this server's root key"),
    ] {
        let output = linkid(dir.path(), &["token", "inspect", token]);

        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{verdict}: inspecting is no failure"
        );
        assert!(text.starts_with(verdict), "{verdict}: {text}");
        assert!(
            text.contains("block 0:"),
            "{verdict}: the blocks are shown: {text}"
        );
        assert!(
            text.contains(&trusted),
            "{verdict}: names the trusted key: {text}"
        );
    }
}

#[test]
fn inspect_and_revoke_read_the_token_from_stdin_with_a_dash() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin", "--subject", "ci"]);

    let inspected = linkid_with_stdin(
        dir.path(),
        &["token", "inspect", "-"],
        &format!("{token}\n"),
    );
    let revoked = linkid_with_stdin(dir.path(), &["token", "revoke", "-"], &format!("{token}\n"));
    let after = linkid_with_stdin(dir.path(), &["token", "inspect", "-"], &token);

    assert!(
        inspected.status.success(),
        "{}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    assert!(String::from_utf8_lossy(&inspected.stdout).starts_with("verdict: valid"));
    assert!(String::from_utf8_lossy(&inspected.stdout).contains(r#"subject("ci")"#));
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&revoked.stderr).contains("revoked"));
    assert!(String::from_utf8_lossy(&after.stdout).starts_with("verdict: revoked"));
}

#[test]
fn mint_refuses_a_ttl_of_zero() {
    let dir = TempDir::new().unwrap();

    for ttl in ["0s", "0", "500ms"] {
        let output = linkid(dir.path(), &["token", "mint", "--admin", "--ttl", ttl]);

        assert!(!output.status.success(), "--ttl {ttl}");
        assert!(output.stdout.is_empty(), "--ttl {ttl}: no token");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--ttl") && stderr.contains("1s"),
            "--ttl {ttl}: {stderr}"
        );
    }
}
