//! Running it as a service: metrics, readiness, rate limits, backups,
//! config checks, CORS and help.

use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::cli::{get, linkid, mint, Server};
use crate::helpers::{
    assert_problem, backend, link_body, skipped_unless, spawn_app, spawn_app_with, Backend,
};

async fn scrape(app: &crate::helpers::TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    response.text().await.unwrap()
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_requests_by_operation_and_status_after_traffic() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    let created = r#"linkid_requests_total{operation="linkIdentity",status="201"}"#;
    let conflicts = r#"linkid_requests_total{operation="linkIdentity",status="409"}"#;

    app.link_as_admin("m-1", "okta", "metrics-remote").await;
    app.link_as_admin("m-2", "okta", "metrics-remote").await;
    app.list(&app.admin, "m-1", "").await;
    let after = scrape(&app).await;

    assert!(
        sample(&after, created) >= sample(&before, created) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, conflicts) >= sample(&before, conflicts) + 1.0,
        "{after}"
    );
    assert!(
        after
            .contains(r#"linkid_request_duration_seconds_bucket{operation="listLinkedIdentities""#),
        "{after}"
    );
    assert!(sample(&after, "linkid_links_stored") >= 1.0, "{after}");
    assert!(after.contains("linkid_db_pool_connections"), "{after}");
    assert!(after.contains("linkid_token_cache_entries"), "{after}");
    assert!(
        sample(&after, "linkid_token_cache_hits_total") >= 1.0,
        "{after}"
    );
    if backend() == Backend::Sqlite {
        // (Group commit is SQLite's: PostgreSQL commits each request.)
        assert!(after.contains("linkid_write_batch_size"), "{after}");
    }
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let app = spawn_app_with(|c| c.metrics.enabled = false).await;

    let response = app.client.get(app.url("/metrics")).send().await.unwrap();

    assert_problem(response, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn readyz_is_200_while_the_database_answers_and_503_with_a_reason_when_not() {
    if skipped_unless(
        Backend::Sqlite,
        "it deletes the SQLite file (instances.rs pauses PostgreSQL instead)",
    ) {
        return;
    }
    let app = spawn_app().await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let db = app.config.database.path.clone();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let gone = app.client.get(app.url("/readyz")).send().await.unwrap();

    let problem = assert_problem(gone, 503, "NOT_READY").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("linkid.db"),
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
}

#[tokio::test]
async fn failed_authentications_from_one_address_trip_the_limit_and_recover() {
    let app = spawn_app_with(|c| {
        c.rate_limit.failed_auth_per_minute = 120;
        c.rate_limit.failed_auth_burst = 3;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.list_providers("bad-token").await.status(), 401);
    }

    let tripped = app.list_providers("bad-token").await;
    let blocked_valid = app.list_providers(&app.admin).await;

    assert_eq!(tripped.headers()["ratelimit-limit"], "3");
    assert_eq!(tripped.headers()["ratelimit-remaining"], "0");
    assert!(tripped.headers().contains_key("ratelimit-reset"));
    let retry: u64 = tripped.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_problem(tripped, 429, "RATE_LIMITED").await;
    assert_problem(blocked_valid, 429, "RATE_LIMITED").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.list_providers(&app.admin).await.status(), 200);
}

#[tokio::test]
async fn the_per_token_limit_trips_for_that_token_only_and_recovers() {
    let app = spawn_app_with(|c| {
        c.rate_limit.per_token_per_second = 2;
        c.rate_limit.per_token_burst = 2;
    })
    .await;
    let other = app.mint(linkid::auth::MintRequest {
        admin: true,
        ..Default::default()
    });
    assert_eq!(app.list_providers(&app.admin).await.status(), 200);
    assert_eq!(app.list_providers(&app.admin).await.status(), 200);

    let tripped = app.list_providers(&app.admin).await;

    assert!(tripped.headers().contains_key("retry-after"));
    assert_eq!(tripped.headers()["ratelimit-limit"], "2");
    assert_problem(tripped, 429, "RATE_LIMITED").await;
    assert_eq!(app.list_providers(&other).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.list_providers(&app.admin).await.status(), 200);
}

#[tokio::test]
async fn by_default_a_token_is_never_throttled() {
    let app = spawn_app().await;
    for i in 0..300 {
        assert_eq!(
            app.list(&app.admin, &format!("u-{i}"), "").await.status(),
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_write_load_is_a_consistent_copy() {
    if skipped_unless(
        Backend::Sqlite,
        "it copies a SQLite file (PostgreSQL has pg_dump)",
    ) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let base = server.base.clone();
    let load = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut acked = 0;
        for i in 0..600 {
            let response = client
                .post(format!(
                    "{base}/api/admin/users/v4/users/backup-{i}/linked-identities"
                ))
                .bearer_auth(&token)
                .json(&link_body("okta", &format!("remote-{i}"), "n"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            acked += 1;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let copy = dir.path().join("copy.db");
    let output = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let copy = copy.clone();
        move || linkid(&dir, &["backup", copy.to_str().unwrap()])
    })
    .await
    .unwrap();
    let acked = load.await.unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let copied: i64 = conn
        .query_row("SELECT count(*) FROM linked_identities", [], |r| r.get(0))
        .unwrap();
    assert!(copied >= 1 && copied <= acked, "{copied} of {acked}");
    let again = linkid(dir.path(), &["backup", copy.to_str().unwrap()]);
    assert!(!again.status.success(), "a backup never overwrites a file");
    drop(server);
}

#[test]
fn check_config_accepts_a_valid_config_and_explains_each_problem() {
    let dir = TempDir::new().unwrap();
    let ok = linkid(dir.path(), &["check-config"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration is valid"));

    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\naddr = \"localhost:http\"\n[auth]\nprivate_key_file = \"a-directory\"\npublic_key = \"ed25519/00\"\n[cors]\nallowed_origins = [\"not an origin\"]\n[[identity_providers]]\nid = \"x\"\ndisplay_name = \"X\"\nprotocol = \"OIDC\"\n[[identity_providers]]\nid = \"x\"\ndisplay_name = \"Y\"\nprotocol = \"OIDC\"\n",
    )
    .unwrap();
    let bad = linkid(
        dir.path(),
        &["--config", file.to_str().unwrap(), "check-config"],
    );
    assert_eq!(bad.status.code(), Some(2));
    let text = String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("server.addr"), "{text}");

    std::fs::write(
        &file,
        "[auth]\nprivate_key_file = \"a-directory\"\npublic_key = \"ed25519/00\"\n[cors]\nallowed_origins = [\"not an origin\"]\n[[identity_providers]]\nid = \"x\"\ndisplay_name = \"X\"\nprotocol = \"OIDC\"\n[[identity_providers]]\nid = \"x\"\ndisplay_name = \"Y\"\nprotocol = \"OIDC\"\n",
    )
    .unwrap();
    let bad = linkid(
        dir.path(),
        &["--config", file.to_str().unwrap(), "check-config"],
    );
    assert_eq!(bad.status.code(), Some(2));
    let text = String::from_utf8_lossy(&bad.stderr);
    for key in [
        "auth.private_key_file",
        "auth.public_key",
        "cors.allowed_origins[0]",
        "identity_providers[1].id",
    ] {
        assert!(text.contains(key), "names {key}: {text}");
    }
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(app.api("/users/identity-providers"))
        .bearer_auth(&app.admin)
        .header("origin", "https://admin.example.com")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert!(!response
        .headers()
        .contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn cors_lets_a_configured_origin_call_the_api() {
    let app =
        spawn_app_with(|c| c.cors.allowed_origins = vec!["https://admin.example.com".into()]).await;

    let preflight = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            app.api("/users/u-1/linked-identities"),
        )
        .header("origin", "https://admin.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    let call = app
        .client
        .post(app.api("/users/u-1/linked-identities"))
        .bearer_auth(&app.admin)
        .header("origin", "https://admin.example.com")
        .json(&link_body("okta", "cors-remote", "n"))
        .send()
        .await
        .unwrap();
    let stranger = app
        .client
        .get(app.api("/users/identity-providers"))
        .bearer_auth(&app.admin)
        .header("origin", "https://evil.example.net")
        .send()
        .await
        .unwrap();

    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://admin.example.com"
    );
    let allowed = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for method in ["GET", "HEAD", "POST", "DELETE"] {
        assert!(allowed.contains(method), "{method} in {allowed}");
    }
    assert_eq!(call.status(), 201);
    assert_eq!(
        call.headers()["access-control-allow-origin"],
        "https://admin.example.com"
    );
    let exposed = call.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("location"),
        "{exposed}"
    );
    assert_problem(stranger, 403, "CORS_FORBIDDEN").await;
}

#[test]
fn every_command_has_help_with_examples() {
    let dir = TempDir::new().unwrap();
    for command in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["token", "mint", "--help"],
        vec!["token", "inspect", "--help"],
        vec!["token", "revoke", "--help"],
        vec!["backup", "--help"],
        vec!["check-config", "--help"],
        vec!["seed", "--help"],
        vec!["openapi", "--help"],
    ] {
        let output = linkid(dir.path(), &command);
        assert!(output.status.success(), "{command:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Example"), "{command:?} has examples: {text}");
    }
}

#[tokio::test]
async fn readyz_and_metrics_are_listed_in_the_request_log_by_route() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let _ = get(
        &server,
        "/api/admin/users/v4/users/u-7/linked-identities",
        &token,
    )
    .await;
    let _ = client
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("route=/api/admin/users/v4/users/{user_id}/linked-identities"))
        .unwrap_or_else(|| panic!("no request line: {log}"));
    assert!(
        line.contains("status=200") && line.contains("method=GET") && line.contains("latency_us="),
        "{line}"
    );
    assert!(line.contains("request_id="), "{line}");
    let token_id = line
        .split("token=")
        .nth(1)
        .unwrap()
        .split(|c: char| c == '}' || c.is_whitespace())
        .next()
        .unwrap();
    assert_eq!(token_id.len(), 16, "{line}");
    assert!(
        log.lines()
            .any(|l| l.contains("route=/readyz") && l.contains("status=200")),
        "{log}"
    );
    let listed: Value = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(Value::String)
        .unwrap();
    assert!(listed.as_str().unwrap().contains("linkid_requests_total"));
}

#[tokio::test]
async fn behind_a_trusted_proxy_failed_authentications_count_per_forwarded_client() {
    let app = spawn_app_with(|c| {
        c.rate_limit.failed_auth_per_minute = 60;
        c.rate_limit.failed_auth_burst = 2;
        c.rate_limit.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    let from = |client: &'static str, token: &str| {
        app.client
            .get(app.api("/users/identity-providers"))
            .bearer_auth(token)
            .header("x-forwarded-for", format!("203.0.113.99, {client}"))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(from("198.51.100.1", "bad").await.unwrap().status(), 401);
    }
    assert_eq!(from("198.51.100.1", "bad").await.unwrap().status(), 429);

    let attacker = from("198.51.100.1", &app.admin).await.unwrap();
    let neighbour = from("198.51.100.2", &app.admin).await.unwrap();

    assert_problem(attacker, 429, "RATE_LIMITED").await;
    assert_eq!(
        neighbour.status(),
        200,
        "another client behind the same proxy is not blocked"
    );
}

#[test]
fn a_backup_is_private_and_touches_nothing_else_in_its_directory() {
    if skipped_unless(
        Backend::Sqlite,
        "it copies a SQLite file (PostgreSQL has pg_dump)",
    ) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new().unwrap();
    let seeded = linkid(dir.path(), &["seed", "--links", "3"]);
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let unrelated = dir.path().join("copy.partial");
    std::fs::write(&unrelated, "an operator's file").unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let mut command = crate::cli::command(dir.path());
    command.args(["backup", "copy.db"]);
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let output = command.output().unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mode = std::fs::metadata(dir.path().join("copy.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the backup's mode is {:o}",
        mode & 0o777
    );
    assert_eq!(
        std::fs::read_to_string(&unrelated).unwrap(),
        "an operator's file"
    );
    let mut after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    after.retain(|name| !before.contains(name));
    assert_eq!(after, ["copy.db"], "the backup left only its copy behind");
}

#[tokio::test]
async fn with_cors_every_answer_varies_by_origin() {
    let app =
        spawn_app_with(|c| c.cors.allowed_origins = vec!["https://admin.example.com".into()]).await;
    let from = |origin: &'static str| {
        app.client
            .get(app.api("/users/identity-providers"))
            .bearer_auth(&app.admin)
            .header("origin", origin)
            .send()
    };

    for response in [
        from("https://admin.example.com").await.unwrap(),
        from("https://evil.example.net").await.unwrap(),
        app.list_providers(&app.admin).await,
    ] {
        let vary: Vec<_> = response
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap().to_lowercase())
            .collect();
        assert!(
            vary.iter().any(|v| v.contains("origin")),
            "{} has Vary {vary:?}",
            response.status()
        );
    }
}

#[tokio::test]
async fn the_docs_page_has_a_content_security_policy_and_keeps_no_token() {
    let app = spawn_app().await;

    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    let initializer = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();

    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(initializer
        .headers()
        .contains_key("content-security-policy"));
    let script = initializer.text().await.unwrap();
    assert!(
        script.contains("\"persistAuthorization\": false"),
        "{script}"
    );
}
