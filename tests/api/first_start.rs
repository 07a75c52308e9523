//! The first minutes on a fresh machine: processes started together agree
//! on one root key, and one database serves one server at a time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::cli::{get, linkid, mint, output_within, Server};
use crate::helpers::{skipped_unless, Backend};

/// Holds a spawned child back until `at`, between fork and exec, so that
/// processes spawned one after another start at the same moment.
fn start_at(command: &mut Command, at: Instant) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only reads the monotonic clock and sleeps, both
    // async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            Ok(())
        })
    }
}

fn linkid_command(dir: &Path, args: &[&str]) -> Command {
    let mut command = crate::cli::command(dir);
    command.env("LINKID_SERVER__ADDR", "127.0.0.1:0").args(args);
    command
}

/// A child process killed when dropped, so that a failing assertion
/// leaves no server running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a starting server's log until it listens (its public key) or exits.
fn public_key_of_started(mut reaped: Reaped) -> Result<String, String> {
    let child = &mut reaped.0;
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    let mut public = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        log.push_str(&line);
        log.push('\n');
        if let Some(at) = line.find("ed25519/") {
            public = Some(line[at..at + 8 + 64].to_owned());
        }
        if line.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            return public.ok_or(log);
        }
    }
    let status = child.wait().unwrap();
    Err(format!("serve exited ({status}) before listening:\n{log}"))
}

#[test]
fn serve_and_token_mint_started_together_on_an_empty_directory_share_one_key() {
    for trial in 0..40 {
        let dir = TempDir::new().unwrap();
        let mut serves = Vec::new();
        let mut mints = Vec::new();
        let at = Instant::now() + Duration::from_millis(150);
        for i in 0..10 {
            if i % 5 == 0 {
                let database = format!("./data/serve-{i}.db");
                let mut command = linkid_command(dir.path(), &["serve"]);
                let child = start_at(&mut command, at)
                    .env("LINKID_DATABASE__PATH", &database)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                serves.push(Reaped(child));
            } else {
                let mut command = linkid_command(dir.path(), &["token", "mint", "--admin"]);
                let child = start_at(&mut command, at)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                mints.push(child);
            }
        }

        let tokens: Vec<String> = mints
            .into_iter()
            .map(|child| {
                let output = child.wait_with_output().unwrap();
                assert!(
                    output.status.success(),
                    "trial {trial}: mint failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                String::from_utf8(output.stdout).unwrap().trim().to_owned()
            })
            .collect();
        let served_keys: Vec<String> = serves
            .into_iter()
            .map(|child| {
                public_key_of_started(child).unwrap_or_else(|e| panic!("trial {trial}: {e}"))
            })
            .collect();

        let text = std::fs::read_to_string(dir.path().join("data/root.key")).unwrap();
        let private: biscuit_auth::PrivateKey = text.trim().parse().unwrap();
        let public = biscuit_auth::KeyPair::from(&private).public();
        for token in &tokens {
            assert!(!token.is_empty(), "trial {trial}: an empty token");
            assert!(
                biscuit_auth::Biscuit::from_base64(token, public).is_ok(),
                "trial {trial}: a token signed by another key"
            );
        }
        for key in &served_keys {
            assert_eq!(
                key,
                &public.to_string(),
                "trial {trial}: a server with another key"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("root.key") && name != "root.key")
            .collect();
        assert!(
            leftovers.is_empty(),
            "trial {trial}: temp files left: {leftovers:?}"
        );
    }
}

#[tokio::test]
async fn a_second_serve_on_the_same_database_is_refused_naming_the_first_ones_pid() {
    if skipped_unless(
        Backend::Sqlite,
        "many instances share one PostgreSQL database",
    ) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let first = Server::start(dir.path(), &[]);
    let token = mint(dir.path(), &["--admin"]);
    let doomed = mint(dir.path(), &["--admin"]);

    let second = output_within(
        linkid_command(dir.path(), &["serve"]),
        Duration::from_secs(30),
    );

    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    let database = dir.path().canonicalize().unwrap().join("data/linkid.db");
    assert!(stderr.contains(database.to_str().unwrap()), "{stderr}");

    // CLI commands keep working beside the running server.
    let revoked = linkid(dir.path(), &["token", "revoke", &doomed]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let line = r#"{"user_id":"u-7","provider_id":"okta","linked_user_id":"r-7","linked_username":"seven"}"#;
    std::fs::write(dir.path().join("links.jsonl"), format!("{line}\n")).unwrap();
    let imported = linkid(dir.path(), &["import", "links.jsonl"]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let exported = linkid(dir.path(), &["export"]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert!(String::from_utf8_lossy(&exported.stdout).contains("r-7"));
    let backup = linkid(dir.path(), &["backup", "copy.db"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let checked = linkid(dir.path(), &["check-config"]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let summary = String::from_utf8_lossy(&checked.stdout);
    assert!(
        summary.contains(&format!("pid {}", first.pid())),
        "check-config says who serves it: {summary}"
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let path = "/api/admin/users/v4/users/u-7/linked-identities";
    assert_eq!(get(&first, path, &token).await.status(), 200);
    assert_eq!(get(&first, path, &doomed).await.status(), 401);

    // Once the first has stopped, its lock is gone with it.
    assert!(first.terminate().success());
    let next = Server::start(dir.path(), &[]);
    assert_eq!(get(&next, path, &token).await.status(), 200);
}

#[test]
fn threads_creating_the_key_at_once_all_load_the_one_key_written() {
    for trial in 0..50 {
        let dir = TempDir::new().unwrap();
        let helpers_config = crate::helpers::test_config(&dir);
        let config = helpers_config.auth.clone();
        let start = std::sync::Arc::new(std::sync::Barrier::new(16));

        let publics: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let start = start.clone();
                    let config = &config;
                    scope.spawn(move || {
                        start.wait();
                        linkid::auth::RootKey::load_or_create(config)
                            .map(|key| key.public.to_string())
                            .map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("trial {trial}: {e}"))
                })
                .collect()
        });

        assert!(
            publics.iter().all(|p| p == &publics[0]),
            "trial {trial}: {publics:?}"
        );
    }
}
