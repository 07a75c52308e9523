//! Reads are never older than the newest commit, whoever made it: this
//! server, or another connection to its database (`linkid import`, an
//! operator's SQL shell, another instance). The read path keeps answers and
//! open read transactions between requests; these tests read first, so
//! that whatever is kept is kept, then change the data and read at once —
//! on both of SQLite's read paths, the fast one (the default) and the plain
//! one (`database.row_cache_bytes = 0`), whichever the suite runs with.

use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::cli::{mint, Server};
use crate::helpers::{link_body, skipped_unless, spawn_app_with, Backend, TestApp};

/// `database.row_cache_bytes` for each read path: the default's 4 MiB (the
/// fast path), and 0 (the plain path).
const READ_PATHS: [u64; 2] = [4 * 1024 * 1024, 0];

/// An app whose SQLite store reads with `row_cache_bytes` (unused on
/// PostgreSQL, which keeps nothing between reads).
async fn app_reading_with(row_cache_bytes: u64) -> TestApp {
    spawn_app_with(|config| config.database.row_cache_bytes = row_cache_bytes).await
}

/// The usernames of a user's links, as listed.
async fn listed(app: &TestApp, user: &str) -> Vec<String> {
    let response = app.list(&app.admin, user, "").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    usernames(&body)
}

/// The usernames of the links holding one remote identity (the login-time
/// reverse lookup).
async fn looked_up(app: &TestApp, provider: &str, remote: &str) -> Vec<String> {
    let response = app
        .client
        .get(app.api(&format!(
            "/linked-identities?provider_id={provider}&linked_user_id={remote}"
        )))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    usernames(&body)
}

fn usernames(body: &Value) -> Vec<String> {
    body["linked_identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["linked_username"].as_str().unwrap().to_owned())
        .collect()
}

/// Every read of the test, twice over.
async fn read_everything(app: &TestApp) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen = vec![
            listed(app, "u-1").await,
            listed(app, "u-2").await,
            looked_up(app, "okta", "r-1").await,
            looked_up(app, "okta", "r-2").await,
        ];
    }
    seen
}

#[tokio::test]
async fn a_commit_by_another_connection_is_read_at_once() {
    for row_cache_bytes in READ_PATHS {
        a_commit_by_another_connection_is_read_at_once_by(&app_reading_with(row_cache_bytes).await)
            .await;
    }
}

async fn a_commit_by_another_connection_is_read_at_once_by(app: &TestApp) {
    let linked = app
        .link(&app.admin, "u-1", &link_body("okta", "r-1", "one"))
        .await;
    assert_eq!(linked.status(), 201);
    let none: Vec<String> = Vec::new();
    assert_eq!(
        read_everything(app).await,
        [
            vec!["one".to_owned()],
            none.clone(),
            vec!["one".to_owned()],
            none.clone()
        ]
    );

    app.execute_sql(
        "UPDATE linked_identities SET linked_username = 'renamed' WHERE user_id = 'u-1'",
    );
    assert_eq!(listed(app, "u-1").await, ["renamed"]);
    assert_eq!(looked_up(app, "okta", "r-1").await, ["renamed"]);
    let one: Value = app
        .get_link(&app.admin, "u-1", "okta", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["linked_username"], "renamed");

    app.execute_sql(
        "INSERT INTO linked_identities \
         (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
         VALUES ('u-2', 'okta', 'r-2', 'r-2', 'two', '2026-01-02T03:04:05Z', '2026-01-02T03:04:05Z')",
    );
    assert_eq!(listed(app, "u-2").await, ["two"]);
    assert_eq!(looked_up(app, "okta", "r-2").await, ["two"]);

    app.execute_sql("DELETE FROM linked_identities WHERE user_id = 'u-1'");
    assert_eq!(
        read_everything(app).await,
        [
            none.clone(),
            vec!["two".to_owned()],
            none,
            vec!["two".to_owned()]
        ]
    );
    assert_eq!(
        app.get_link(&app.admin, "u-1", "okta", "").await.status(),
        404
    );
}

#[tokio::test]
async fn this_servers_own_writes_are_read_at_once_after_reads_of_the_same_keys() {
    for row_cache_bytes in READ_PATHS {
        this_servers_own_writes_are_read_at_once_by(&app_reading_with(row_cache_bytes).await).await;
    }
}

async fn this_servers_own_writes_are_read_at_once_by(app: &TestApp) {
    for round in 0..3 {
        let remote = format!("r-{round}");
        let none: Vec<String> = Vec::new();
        assert_eq!(listed(app, "u-1").await, none);
        assert_eq!(looked_up(app, "okta", &remote).await, none);

        let linked = app
            .link(&app.admin, "u-1", &link_body("okta", &remote, "first"))
            .await;
        assert_eq!(linked.status(), 201);
        assert_eq!(listed(app, "u-1").await, ["first"]);
        assert_eq!(looked_up(app, "okta", &remote).await, ["first"]);

        // The same link with a new username: 200, and read as such.
        let renamed = app
            .link(&app.admin, "u-1", &link_body("okta", &remote, "second"))
            .await;
        assert_eq!(renamed.status(), 200);
        assert_eq!(listed(app, "u-1").await, ["second"]);
        assert_eq!(looked_up(app, "okta", &remote).await, ["second"]);

        assert_eq!(app.delete(&app.admin, "u-1", "okta").await.status(), 200);
        assert_eq!(listed(app, "u-1").await, none);
        assert_eq!(looked_up(app, "okta", &remote).await, none);
    }
}

#[tokio::test]
async fn an_idle_server_holds_no_read_snapshot_that_would_keep_the_wal_from_being_reset() {
    if skipped_unless(Backend::Sqlite, "it is about SQLite's WAL") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/admin/users/v4/users/u-1/linked-identities",
        server.base
    );
    let linked = client
        .post(&url)
        .bearer_auth(&token)
        .json(&link_body("okta", "r-1", "one"))
        .send()
        .await
        .unwrap();
    assert_eq!(linked.status(), 201);
    // Reads on every worker thread, each of which keeps its read
    // transaction open while it is busy.
    let reads = (0..64).map(|_| {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        async move {
            let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    });
    futures_util::future::join_all(reads).await;

    // Idle now: a checkpoint that resets the WAL needs every reader gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = rusqlite::Connection::open(dir.path().join("data/linkid.db")).unwrap();
    conn.busy_timeout(Duration::from_millis(500)).unwrap();
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        busy, 0,
        "a reader of the idle server still holds a snapshot"
    );
    // And the server reads on, after the reset.
    let listed: Value = client
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usernames(&listed), ["one"]);
}
