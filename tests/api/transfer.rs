//! `linkid export` and `linkid import`: JSON Lines from one snapshot, an
//! all-or-nothing import that reports every bad line and conflict, and a
//! round trip that is byte-identical.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::cli::{get, linkid, mint, Server};
use crate::helpers::link_body;

fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = linkid(dir, args);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn export(dir: &Path) -> String {
    let (ok, stdout, stderr) = run(dir, &["export"]);
    assert!(ok, "{stderr}");
    stdout
}

fn line(user: &str, provider: &str, remote: &str, username: &str) -> String {
    format!(
        r#"{{"user_id":"{user}","provider_id":"{provider}","linked_user_id":"{remote}","linked_username":"{username}","created_at":"2026-01-02T03:04:05Z","updated_at":"2026-01-03T04:05:06Z"}}"#
    )
}

#[tokio::test]
async fn export_then_import_into_an_empty_database_then_export_is_byte_identical() {
    let source = TempDir::new().unwrap();
    let token = mint(source.path(), &["--admin"]);
    let server = Server::start(source.path(), &[]);
    let client = reqwest::Client::new();
    for (user, provider, remote, name) in [
        ("u-1", "okta", "00u1", "ada@example.com"),
        (
            "u-%C3%BCn%C3%AF",
            "corporate-saml",
            "CN=Ünï,O=Corp",
            "ünï \"quoted\"",
        ),
        ("u-3", "azure-ad", "aad/3", "grace"),
    ] {
        let response = client
            .post(format!(
                "{}/api/admin/users/v4/users/{user}/linked-identities",
                server.base
            ))
            .bearer_auth(&token)
            .json(&link_body(provider, remote, name))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    drop(server);
    let first = export(source.path());
    std::fs::write(source.path().join("links.jsonl"), &first).unwrap();

    let target = TempDir::new().unwrap();
    let (ok, stdout, stderr) = run(
        target.path(),
        &[
            "import",
            source.path().join("links.jsonl").to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "created 3, updated 0, unchanged 0");
    let second = export(target.path());

    assert_eq!(first.lines().count(), 3);
    assert_eq!(first, second, "byte-identical");
    let (ok, stdout, _) = run(
        target.path(),
        &[
            "import",
            source.path().join("links.jsonl").to_str().unwrap(),
        ],
    );
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        "created 0, updated 0, unchanged 3",
        "importing again changes nothing"
    );
}

#[test]
fn an_import_with_bad_lines_and_conflicts_reports_each_and_applies_nothing() {
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        format!(
            "{}\n{}\n",
            line("u-1", "okta", "r-1", "ada"),
            line("u-2", "okta", "r-2", "bob")
        ),
    )
    .unwrap();
    assert!(run(dir.path(), &["import", good.to_str().unwrap()]).0);
    let before = export(dir.path());
    let file = dir.path().join("bad.jsonl");
    let lines = [
        line("u-3", "okta", "r-3", "new"),                       // 1 fine
        "{not json".to_string(),                                 // 2
        line("u-4", "github", "r-4", "x"),                       // 3 unknown provider
        r#"{"user_id":"u-5","provider_id":"okta"}"#.to_string(), // 4 missing fields
        line("u-1", "azure-ad", "r-9", "x"),                     // 5 user linked (stored)
        line("u-6", "okta", "r-2", "x"),                         // 6 identity linked (stored)
        line("u-3", "azure-ad", "r-7", "x"),                     // 7 user linked (line 1)
        line("u-8", "okta", "r-3", "x"),                         // 8 identity linked (line 1)
        String::new(),                                           // 9 blank: skipped
        r#"{"user_id":"u-10","provider_id":"okta","linked_user_id":"r","linked_username":"n","created_at":"soon"}"#.to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();

    let (ok, stdout, stderr) = run(dir.path(), &["import", file.to_str().unwrap()]);

    assert!(!ok);
    for expected in [
        "line 2: line: is not JSON",
        "line 3: provider_id:",
        "line 4: linked_user_id: is required",
        "line 4: linked_username: is required",
        "line 5: user_id: USER_ALREADY_LINKED",
        "line 6: linked_user_id: IDENTITY_ALREADY_LINKED",
        "line 7: user_id: USER_ALREADY_LINKED",
        "line 8: linked_user_id: IDENTITY_ALREADY_LINKED",
        "line 10: created_at:",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
    assert!(
        !stderr.contains("line 1:") && !stderr.contains("line 9:"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was imported"), "{stderr}");
    assert!(stdout.is_empty());
    assert_eq!(export(dir.path()), before, "nothing applied");
}

#[test]
fn a_dry_run_reports_what_would_change_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let seed = dir.path().join("seed.jsonl");
    std::fs::write(
        &seed,
        format!(
            "{}\n{}\n",
            line("u-1", "okta", "r-1", "ada"),
            line("u-2", "okta", "r-2", "bob")
        ),
    )
    .unwrap();
    assert!(run(dir.path(), &["import", seed.to_str().unwrap()]).0);
    let before = export(dir.path());
    let file = dir.path().join("next.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n{}\n",
            line("u-1", "okta", "r-1", "ada"),
            line("u-2", "okta", "r-2", "bobby"),
            line("u-3", "okta", "r-3", "cy")
        ),
    )
    .unwrap();

    let (ok, stdout, stderr) = run(dir.path(), &["import", file.to_str().unwrap(), "--dry-run"]);

    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("would have created 1, updated 1, unchanged 1"),
        "{stdout}"
    );
    assert_eq!(export(dir.path()), before);
    let (ok, stdout, _) = run(dir.path(), &["import", file.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(stdout.trim(), "created 1, updated 1, unchanged 1");
}

#[test]
fn import_reads_stdin_and_records_events_by_import() {
    let dir = TempDir::new().unwrap();
    let mut child = crate::cli::command(dir.path())
        .args(["import", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "{}",
        line("u-1", "okta", "r-1", "ada")
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "created 1, updated 0, unchanged 0"
    );

    assert_eq!(
        crate::helpers::stored_events(dir.path()),
        [("LINKED".to_string(), "import".to_string(), None)]
    );
}

#[tokio::test]
async fn a_running_server_serves_imported_links_at_once_and_wakes_long_polls() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let base = server.base.clone();
    let poll = {
        let (base, token) = (base.clone(), token.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let page: Value = reqwest::Client::new()
                .get(format!(
                    "{base}/api/admin/users/v4/linked-identities/events?after=0&wait=20"
                ))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = dir.path().join("links.jsonl");
    std::fs::write(
        &file,
        format!("{}\n", line("imported", "okta", "r-i", "ida")),
    )
    .unwrap();

    let imported = Instant::now();
    let (ok, _, stderr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || run(&dir, &["import", "links.jsonl"])
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    let listed = get(
        &server,
        "/api/admin/users/v4/users/imported/linked-identities",
        &token,
    )
    .await;

    let body: Value = listed.json().await.unwrap();
    assert_eq!(body["linked_identities"][0]["linked_user_id"], "r-i");
    let (page, _) = poll.await.unwrap();
    assert_eq!(page["events"][0]["user_id"], "imported");
    assert_eq!(page["events"][0]["actor"], "import");
    assert!(imported.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_export_while_servers_write_is_one_consistent_snapshot() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (base, token, stop) = (server.base.clone(), token.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let url = format!("{base}/api/admin/users/v4/users/w{w}-{i}/linked-identities");
                    let response = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&link_body("okta", &format!("r{w}-{i}"), "n"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                    i += 1;
                }
                i
            })
        })
        .collect();
    // Until the writers have committed something, however slow the run.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = get(
            &server,
            "/api/admin/users/v4/linked-identities?limit=1",
            &token,
        )
        .await
        .json()
        .await
        .unwrap();
        if !page["linked_identities"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no write committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let exported = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || export(&dir)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }

    let users: Vec<String> = exported
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["user_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        !users.is_empty() && users.len() <= written,
        "{} of {written}",
        users.len()
    );
    assert!(
        users.windows(2).all(|w| w[0] < w[1]),
        "in user_id order, each once"
    );
}

#[test]
fn an_import_line_naming_a_field_twice_is_refused_naming_the_line() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("twice.jsonl");
    std::fs::write(
        &file,
        [
            line("u-1", "okta", "r-1", "ada"),
            r#"{"user_id":"u-2","provider_id":"okta","linked_user_id":"r-2","linked_username":"bob","provider_id":"azure-ad"}"#.to_string(),
        ]
        .join("\n"),
    )
    .unwrap();

    let (ok, _, stderr) = run(dir.path(), &["import", file.to_str().unwrap()]);

    assert!(!ok);
    assert!(
        stderr.contains("line 2: provider_id: appears more than once"),
        "{stderr}"
    );
    assert!(!stderr.contains("line 1:"), "{stderr}");
    assert_eq!(export(dir.path()), "", "nothing applied");
}

#[test]
fn an_import_stores_ids_in_nfc_and_refuses_invisible_characters() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("forms.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n",
            line(
                "jose\u{301}",
                "okta",
                "CN=Jose\u{301}",
                "jose\u{301}@example.com"
            ),
            line("jos\u{E9}", "okta", "CN=Jos\u{E9}", "jos\u{E9}@example.com"),
        ),
    )
    .unwrap();
    let hidden = dir.path().join("hidden.jsonl");
    std::fs::write(&hidden, line("ada\u{200B}", "okta", "r-1", "ada")).unwrap();

    let (ok, stdout, stderr) = run(dir.path(), &["import", file.to_str().unwrap()]);
    let (refused, _, why) = run(dir.path(), &["import", hidden.to_str().unwrap()]);

    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("created 1, updated 0, unchanged 1"),
        "{stdout}"
    );
    let exported = export(dir.path());
    assert!(exported.contains(r#""user_id":"josé""#), "{exported}");
    assert!(
        exported.contains(r#""linked_user_id":"CN=José""#),
        "{exported}"
    );
    assert!(!exported.contains('\u{301}'), "{exported}");
    assert!(!refused);
    assert!(
        why.contains("line 1: user_id: must not contain invisible"),
        "{why}"
    );
}
