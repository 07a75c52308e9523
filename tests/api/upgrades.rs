//! Databases written by earlier releases upgrade in place with nothing
//! lost; a database written by a newer linkid is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use tempfile::TempDir;

use crate::cli::{get, linkid, Server};
use crate::helpers::{skipped_unless, Backend};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-0.1.0");

/// A working directory holding a copy of the release 0.1.0 database and key.
fn release_0_1_0() -> (TempDir, String, String) {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for file in ["linkid.db", "root.key"] {
        std::fs::copy(Path::new(FIXTURE).join(file), data.join(file)).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let token = |name: &str| {
        std::fs::read_to_string(Path::new(FIXTURE).join(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    (dir, token("admin.tok"), token("revoked.tok"))
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
