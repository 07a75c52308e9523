//! The store notices what happens to its file and disk: a database file
//! deleted or replaced, a full disk. Writes are refused with 503 or 507
//! (never a 201 that a restart would lose), `/readyz` says why, and service
//! resumes by itself when the cause is gone.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::helpers::{assert_problem, skipped_unless, spawn_app, spawn_app_with, Backend, TestApp};

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_deleted_database_file_refuses_writes_and_reads_until_it_is_back() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about the SQLite file and its disk (instances.rs covers PostgreSQL outages)",
    ) {
        return;
    }
    let app = spawn_app().await;
    assert_eq!(
        app.link_as_admin("before", "okta", "r-before")
            .await
            .status(),
        201
    );
    let db = app.config.database.path.clone();
    let kept = db.with_extension("kept");
    std::fs::hard_link(&db, &kept).unwrap();
    std::fs::remove_file(&db).unwrap();

    let write = app.link_as_admin("after", "okta", "r-after").await;
    assert!(write.headers().contains_key("retry-after"));
    assert_problem(write, 503, "STORE_UNAVAILABLE").await;
    assert_problem(
        app.list(&app.admin, "before", "").await,
        503,
        "STORE_UNAVAILABLE",
    )
    .await;
    let (status, problem) = readyz(&app).await;
    assert_eq!(status, 503);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("deleted or replaced"),
        "{problem}"
    );
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The same file, back at its path (a hard link keeps its identity).
    std::fs::hard_link(&kept, &db).unwrap();
    assert_eq!(
        app.link_as_admin("after", "okta", "r-after").await.status(),
        201
    );
    assert_eq!(readyz(&app).await.0, 200);
    let app = app.restart_with(|_| {}).await;
    let listed: Value = app
        .list(&app.admin, "after", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["linked_identities"][0]["linked_user_id"], "r-after");
}

#[tokio::test]
async fn a_database_file_replaced_by_another_refuses_writes() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about the SQLite file and its disk (instances.rs covers PostgreSQL outages)",
    ) {
        return;
    }
    let app = spawn_app().await;
    let db = app.config.database.path.clone();
    let other = db.with_extension("other");
    std::fs::copy(&db, &other).unwrap();
    std::fs::rename(&other, &db).unwrap();

    assert_problem(
        app.link_as_admin("u", "okta", "r").await,
        503,
        "STORE_UNAVAILABLE",
    )
    .await;
    assert_eq!(readyz(&app).await.0, 503);
}

/// A small tmpfs, unmounted on drop (before its temp dir goes); `None`
/// unless running as root.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs");
        Some(Tmpfs { path, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file
            .write_all(&chunk)
            .and_then(|()| file.sync_all())
            .is_ok()
        {}
        let small = [0u8; 512];
        while file
            .write_all(&small)
            .and_then(|()| file.sync_all())
            .is_ok()
        {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_507_then_service_resumes_when_space_frees() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about the SQLite file and its disk (instances.rs covers PostgreSQL outages)",
    ) {
        return;
    }
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let db = disk.path().join("linkid.db");
    let app = spawn_app_with(|config| config.database.path = db.clone()).await;
    assert_eq!(app.link_as_admin("u-0", "okta", "r-0").await.status(), 201);
    let filler = disk.fill();

    let mut acknowledged = vec!["u-0".to_string()];
    let mut refused = None;
    for i in 1..400 {
        let user = format!("u-{i}");
        let response = app.link_as_admin(&user, "okta", &format!("r-{i}")).await;
        match response.status().as_u16() {
            201 => acknowledged.push(user),
            _ => {
                refused = Some(response);
                break;
            }
        }
    }
    let refused = refused.expect("a write on a full disk is refused");
    assert_problem(refused, 507, "STORAGE_FULL").await;
    let (status, problem) = readyz(&app).await;
    assert_eq!(status, 503, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("space"),
        "{problem}"
    );
    assert_eq!(
        app.list(&app.admin, "u-0", "").await.status(),
        200,
        "reads go on"
    );

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(readyz(&app).await.0, 200, "ready again once space frees");
    assert_eq!(
        app.link_as_admin("later", "okta", "r-later").await.status(),
        201
    );
    acknowledged.push("later".into());

    let app = app
        .restart_with(|config| config.database.path = db.clone())
        .await;
    for user in &acknowledged {
        let listed: Value = app.list(&app.admin, user, "").await.json().await.unwrap();
        assert_eq!(
            listed["linked_identities"].as_array().unwrap().len(),
            1,
            "{user} kept"
        );
    }
}

#[tokio::test]
async fn a_write_that_fails_half_done_is_undone_alone_and_its_batch_commits() {
    if skipped_unless(
        Backend::Sqlite,
        "it is about the SQLite writer's batches (a trigger makes one job fail after it wrote)",
    ) {
        return;
    }
    let app = spawn_app().await;
    // The link's insert succeeds, then its event's insert fails: the job
    // has written something when it fails.
    app.execute_sql(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON events WHEN NEW.user_id LIKE 'boom-%' \
         BEGIN SELECT RAISE(ABORT, 'boom'); END;",
    );
    for round in 0..5 {
        let requests = (0..30).map(|i| {
            let user = if i == 15 {
                format!("boom-{round}")
            } else {
                format!("w-{round}-{i}")
            };
            let app = &app;
            async move {
                let status = app
                    .link_as_admin(&user, "okta", &format!("r-{user}"))
                    .await
                    .status()
                    .as_u16();
                (user, status)
            }
        });
        for (user, status) in futures_util::future::join_all(requests).await {
            let expected = if user.starts_with("boom-") { 500 } else { 201 };
            assert_eq!(status, expected, "{user}");
        }
    }
    let conn = rusqlite::Connection::open(&app.config.database.path).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM linked_identities WHERE user_id LIKE 'boom-%'"),
        0,
        "a failed write left its link behind"
    );
    assert_eq!(count("SELECT count(*) FROM linked_identities"), 5 * 29);
    assert_eq!(
        count("SELECT count(*) FROM events WHERE type = 'LINKED'"),
        5 * 29
    );
}
