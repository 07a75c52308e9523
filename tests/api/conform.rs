//! `linkid conform`, the real binary, judging linkid itself (on the
//! backend under test): it passes at both levels, leaves nothing behind,
//! writes a JUnit report a parser reads, turns an expected failure into an
//! `xfail`, and exits 2 when it cannot run at all. tests/contract/
//! test_conform.py judges a deliberately broken server.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use linkid::auth::Right;
use serde_json::Value;

use crate::helpers::{forged_admin, spawn_app, TestApp};

/// The checks of each level.
const SEED_CHECKS: usize = 11;
const FULL_CHECKS: usize = 23;

/// Runs `linkid conform URL ARGS...` with `token` in `LINKID_CONFORM_TOKEN`
/// (off the runtime's thread: the server under judgement runs on it).
async fn conform(url: &str, token: &str, args: &[&str]) -> Output {
    conform_in(tempfile::tempdir().unwrap().path(), url, token, args).await
}

/// `conform`, run in `dir`.
async fn conform_in(dir: &Path, url: &str, token: &str, args: &[&str]) -> Output {
    let mut command = crate::cli::command(dir);
    command.arg("conform").arg(url).args(args);
    if !token.is_empty() {
        command.env("LINKID_CONFORM_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every link whose user this tool made (`conform-…`), read through the search.
async fn links_of_conform_users(app: &TestApp) -> Vec<Value> {
    let answer = app
        .client
        .get(app.api("/linked-identities?limit=1000"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert!(body["next_cursor"].is_null(), "fewer than 1000 links");
    body["linked_identities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|link| link["user_id"].as_str().unwrap().starts_with("conform-"))
        .cloned()
        .collect()
}

/// Asserts a run where every check passed: one `ok` line each, then the count.
fn assert_all_passed(output: &Output, checks: usize) {
    let text = stdout(output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(output));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), checks + 1, "{text}");
    assert!(
        lines[..checks].iter().all(|l| l.starts_with("ok ")),
        "{text}"
    );
    assert_eq!(
        lines[checks],
        format!("{checks} passed, 0 failed, 0 skipped")
    );
}

#[tokio::test]
async fn conform_passes_linkid_at_full_in_under_30_seconds_and_leaves_nothing_behind() {
    let app = spawn_app().await;
    let started = Instant::now();
    let output = conform(&app.address, &app.admin, &[]).await;
    let took = started.elapsed();
    eprintln!("linkid conform --level full took {took:?}");
    assert_all_passed(&output, FULL_CHECKS);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        stderr(&output).contains("cleanup: deleted"),
        "{}",
        stderr(&output)
    );
    assert_eq!(links_of_conform_users(&app).await, Vec::<Value>::new());
    let shown = format!("{}{}", stdout(&output), stderr(&output));
    assert!(!shown.contains(&app.admin), "the token was printed");
}

#[tokio::test]
async fn conform_passes_linkid_at_seed_and_writes_a_well_formed_junit_report() {
    let app = spawn_app().await;
    let report = tempfile::tempdir().unwrap();
    let path = report.path().join("conform.xml");
    let output = conform(
        &app.address,
        &app.admin,
        &["--level", "seed", "--junit", path.to_str().unwrap()],
    )
    .await;
    assert_all_passed(&output, SEED_CHECKS);
    assert_eq!(links_of_conform_users(&app).await, Vec::<Value>::new());

    let xml = std::fs::read_to_string(&path).unwrap();
    let document = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let suites = document.root_element();
    assert_eq!(suites.tag_name().name(), "testsuites");
    let cases: Vec<_> = suites
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), SEED_CHECKS);
    assert_eq!(cases[0].attribute("name"), Some("auth.missing-token"));
    assert!(cases.iter().all(|c| c.first_element_child().is_none()));
    assert_eq!(suites.attribute("failures"), Some("0"));
}

#[tokio::test]
async fn an_expected_failure_turns_a_fail_into_an_xfail_and_exit_0() {
    let app = spawn_app().await;
    // A token that may read but not link: links.create fails with a 403.
    let reader =
        app.token_with_rights(&[Right::IdentityProvidersList, Right::LinkedIdentitiesList]);
    let failing = conform(&app.address, &reader, &["--only", "links.create"]).await;
    assert_eq!(failing.status.code(), Some(1), "{}", stderr(&failing));
    let text = stdout(&failing);
    assert!(
        text.starts_with("FAIL links.create: expected 201"),
        "{text}"
    );
    assert!(text.contains("code FORBIDDEN"), "{text}");
    assert!(text.ends_with("0 passed, 1 failed, 0 skipped\n"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join("expected-failures");
    std::fs::write(&expected, "# a read-only token\nlinks.create  # 403\n").unwrap();
    let output = conform(
        &app.address,
        &reader,
        &[
            "--only",
            "links.create",
            "--expected-failures",
            expected.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "xfail links.create\n1 passed, 0 failed, 0 skipped\n"
    );
}

#[tokio::test]
async fn conform_exits_2_for_an_unreachable_server_and_reads_no_config_file() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // It judges another server: this one's (broken) config is not its business.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[server]\nno_such_key = 1\n",
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let output = conform_in(dir.path(), &url, "some-token", &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot reach http://127.0.0.1:"),
        "{}",
        stderr(&output)
    );
    assert_eq!(stdout(&output), "");
}

#[tokio::test]
async fn conform_exits_2_when_the_token_is_refused_or_missing() {
    let app = spawn_app().await;
    let refused = conform(&app.address, &forged_admin(), &[]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("refused the token on the provider list: 401"),
        "{}",
        stderr(&refused)
    );
    let missing = conform(&app.address, "", &[]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no token"),
        "{}",
        stderr(&missing)
    );
    assert_eq!(stdout(&missing), "");
}

#[test]
fn the_conform_token_in_the_environment_is_no_configuration_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = crate::cli::command(dir.path())
        .arg("check-config")
        .env("LINKID_CONFORM_TOKEN", "a-token-for-conform")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("a-token-for-conform"));
}
