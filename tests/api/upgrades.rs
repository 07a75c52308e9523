//! Databases written by earlier releases upgrade in place with nothing
//! lost; a database written by a newer linkid is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use tempfile::TempDir;

use crate::cli::{command, get, linkid, output_within, Server};
use crate::helpers::{skipped_unless, Backend};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-0.1.0");

/// Written at schema version 2; tests/fixtures/schema-2/README.md says how.
const SCHEMA_2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema-2");

/// A working directory holding a copy of the release 0.1.0 database and key.
fn release_0_1_0() -> (TempDir, String, String) {
    copy_of(FIXTURE)
}

/// A working directory holding a copy of a fixture's database and key,
/// and the fixture's admin and revoked tokens.
fn copy_of(fixture: &str) -> (TempDir, String, String) {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for file in ["linkid.db", "root.key"] {
        std::fs::copy(Path::new(fixture).join(file), data.join(file)).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let token = |name: &str| {
        std::fs::read_to_string(Path::new(fixture).join(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    (dir, token("admin.tok"), token("revoked.tok"))
}

/// Writes `dir/config.toml`: the built-in defaults with
/// `case_insensitive_ids = true` at `provider`.
fn ignoring_case_at(dir: &Path, provider: &str) {
    let okta = format!("id = \"{provider}\"\n");
    let config = linkid::config::DEFAULT_CONFIG_TOML.replacen(
        &okta,
        &format!("{okta}case_insensitive_ids = true\n"),
        1,
    );
    assert_ne!(
        config,
        linkid::config::DEFAULT_CONFIG_TOML,
        "{provider} is a default provider"
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
}

fn schema_version(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("data/linkid.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_database_from_release_0_1_0_upgrades_with_every_link_and_revocation_kept() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about SQLite database files (instances.rs covers PostgreSQL versions)",
    ) {
        return;
    }
    let (dir, admin, revoked) = release_0_1_0();

    let server = Server::start(dir.path(), &[]);

    let expected = [
        ("u-1", "okta", "00u1", "ada@example.com"),
        ("u-2", "azure-ad", "aad-2", "grace@example.com"),
        (
            "u-%C3%BCn%C3%AF",
            "corporate-saml",
            "CN=Ünï,O=Corp",
            "ünï@example.com",
        ),
    ];
    for (user, provider, remote, username) in expected {
        let response = get(
            &server,
            &format!("/api/admin/users/v4/users/{user}/linked-identities"),
            &admin,
        )
        .await;
        assert_eq!(response.status(), 200, "{user}");
        let body: Value = response.json().await.unwrap();
        let identity = &body["linked_identities"][0];
        assert_eq!(identity["provider_id"], provider);
        assert_eq!(identity["linked_user_id"], remote);
        assert_eq!(identity["linked_username"], username);
        assert_eq!(identity["created_at"], "2026-11-30T07:29:48Z");
    }
    let refused = get(
        &server,
        "/api/admin/users/v4/users/u-1/linked-identities",
        &revoked,
    )
    .await;
    assert_eq!(refused.status(), 401, "the revocation is kept");
    assert!(
        server.log().contains("upgraded the database schema"),
        "{}",
        server.log()
    );
    drop(server);

    let conn = rusqlite::Connection::open(dir.path().join("data/linkid.db")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(version >= 1, "the upgraded database records its version");
}

#[test]
fn a_database_newer_than_the_binary_is_refused_naming_both_versions() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about SQLite database files (instances.rs covers PostgreSQL versions)",
    ) {
        return;
    }
    let (dir, _, _) = release_0_1_0();
    let db = dir.path().join("data/linkid.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();

    let output = linkid(dir.path(), &["serve"]);

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("schema version 999"), "{stderr}");
    assert!(stderr.contains("this linkid's schema version"), "{stderr}");
    let after: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, 999, "the database is left as it was");
}

#[tokio::test]
async fn a_schema_2_database_upgrades_to_nfc_with_every_link_revocation_and_event_kept() {
    if skipped_unless(Backend::Sqlite, "it is about SQLite database files") {
        return;
    }
    let (dir, admin, revoked) = copy_of(SCHEMA_2);
    ignoring_case_at(dir.path(), "azure-ad");

    let server = Server::start(dir.path(), &[]);

    let expected = [
        ("u-1", "okta", "00u1", "ada@example.com"),
        (
            "u-2",
            "azure-ad",
            "AAD-Guid-ABC",
            "grace.hopper@example.com",
        ),
        // Written in NFD; read back in NFC, whichever form is asked for.
        (
            "jos%C3%A9",
            "corporate-saml",
            "CN=Jos\u{E9},O=Corp",
            "jos\u{E9}@example.com",
        ),
        (
            "jose%CC%81",
            "corporate-saml",
            "CN=Jos\u{E9},O=Corp",
            "jos\u{E9}@example.com",
        ),
        ("u-3", "okta", "00uABC", "abc@example.com"),
        ("u-4", "okta", "00uabc", "abc.lower@example.com"),
    ];
    for (user, provider, remote, username) in expected {
        let response = get(
            &server,
            &format!("/api/admin/users/v4/users/{user}/linked-identities"),
            &admin,
        )
        .await;
        assert_eq!(response.status(), 200, "{user}");
        let body: Value = response.json().await.unwrap();
        let identity = &body["linked_identities"][0];
        assert_eq!(identity["provider_id"], provider, "{user}");
        assert_eq!(identity["linked_user_id"], remote, "{user}");
        assert_eq!(identity["linked_username"], username, "{user}");
    }
    let gone: Value = get(
        &server,
        "/api/admin/users/v4/users/u-gone/linked-identities",
        &admin,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        gone["linked_identities"],
        serde_json::json!([]),
        "the unlink is kept"
    );
    // azure-ad compares ids ignoring case now: its keys were folded.
    let found: Value = get(
        &server,
        "/api/admin/users/v4/linked-identities?provider_id=azure-ad&linked_user_id=aad-guid-abc",
        &admin,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(found["linked_identities"][0]["user_id"], "u-2");
    let refused = get(
        &server,
        "/api/admin/users/v4/users/u-1/linked-identities",
        &revoked,
    )
    .await;
    assert_eq!(refused.status(), 401, "the revocation is kept");
    let feed: Value = get(
        &server,
        "/api/admin/users/v4/linked-identities/events",
        &admin,
    )
    .await
    .json()
    .await
    .unwrap();
    let events: Vec<(i64, String, String, String)> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap(),
                e["type"].as_str().unwrap().to_owned(),
                e["user_id"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(events.len(), 10, "{events:?}");
    assert_eq!(
        events[2].2, "jose\u{301}",
        "the feed's history is kept as it was written"
    );
    for (n, (seq, _, _, actor)) in events[..8].iter().enumerate() {
        assert_eq!(*seq, n as i64 + 1);
        assert_ne!(actor, "upgrade");
    }
    // The link whose ids NFC changed enters the feed as it changed.
    assert_eq!(
        events[8..],
        [
            (9, "UNLINKED".into(), "jose\u{301}".into(), "upgrade".into()),
            (10, "LINKED".into(), "jos\u{E9}".into(), "upgrade".into()),
        ]
    );
    assert!(
        server.log().contains("upgraded the database schema"),
        "{}",
        server.log()
    );
    drop(server);
    assert_eq!(schema_version(dir.path()), 4);
}

#[test]
fn an_upgrade_that_nfc_would_make_two_links_one_is_refused_naming_both_and_changes_nothing() {
    if skipped_unless(Backend::Sqlite, "it is about SQLite database files") {
        return;
    }
    let (dir, _, _) = copy_of(SCHEMA_2);
    // What schema 2 took for another user: jos\u{E9} composed, beside the
    // fixture's decomposed one.
    rusqlite::Connection::open(dir.path().join("data/linkid.db"))
        .unwrap()
        .execute(
            "INSERT INTO linked_identities (user_id, provider_id, linked_user_id, linked_username, \
             created_at, updated_at) VALUES ('jos\u{E9}', 'okta', '00u-other', 'x', \
             '2026-12-07T19:18:19Z', '2026-12-07T19:18:19Z')",
            [],
        )
        .unwrap();
    let mut serve = command(dir.path());
    serve.arg("serve");

    let output = output_within(serve, std::time::Duration::from_secs(30));

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for named in [r#""jose\u{301}""#, r#""jos\u{e9}""#, "NFC", "user_id"] {
        assert!(stderr.contains(named), "{named} in {stderr}");
    }
    assert_eq!(
        schema_version(dir.path()),
        2,
        "the database is left as it was"
    );
}

#[test]
fn a_start_that_would_make_two_links_one_remote_identity_is_refused_naming_both() {
    if skipped_unless(Backend::Sqlite, "it is about SQLite database files") {
        return;
    }
    let (dir, _, _) = copy_of(SCHEMA_2);
    ignoring_case_at(dir.path(), "okta");
    let mut serve = command(dir.path());
    serve.arg("serve");

    let output = output_within(serve, std::time::Duration::from_secs(30));

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for named in [
        "case_insensitive_ids",
        "okta",
        "u-3",
        "00uABC",
        "u-4",
        "00uabc",
    ] {
        assert!(stderr.contains(named), "{named} in {stderr}");
    }
    assert_eq!(
        schema_version(dir.path()),
        2,
        "the database is left as it was"
    );
}
