//! `linkid dev`'s controls for client tests — `Prefer: code=` (and
//! `example=`), `Prefer: delay=`, `POST /_dev/reset`, `--clock`, no limit
//! on failed authentications — and `serve`, which has none of them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::dev::Dev;
use crate::helpers::{assert_problem, spawn_app};

/// A `linkid dev` with its printed admin token.
fn dev(args: &[&str]) -> (Dev, String, TempDir, TempDir) {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let mut all = vec!["--print-token"];
    all.extend_from_slice(args);
    let dev = Dev::start(cwd.path(), tmp.path(), &all, &[]);
    let token = dev.token.clone().expect("--print-token prints the token");
    (dev, token, cwd, tmp)
}

/// A token minted with this key file.
fn mint_with_key(key: &std::path::Path, args: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let output = crate::cli::command(dir.path())
        .env("LINKID_AUTH__PRIVATE_KEY_FILE", key)
        .args(["token", "mint"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn link(
    api: &str,
    token: &str,
    user: &str,
    provider: &str,
    prefer: Option<&str>,
) -> reqwest::Response {
    let mut request = client()
        .post(format!("{api}/users/{user}/linked-identities"))
        .bearer_auth(token)
        .json(&json!({"provider_id": provider, "linked_user_id": format!("r-{user}"), "linked_username": user}));
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    request.send().await.unwrap()
}

async fn links_of(api: &str, token: &str, user: &str) -> Value {
    let answer = client()
        .get(format!("{api}/users/{user}/linked-identities"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json::<Value>().await.unwrap()["linked_identities"].clone()
}

#[tokio::test]
async fn prefer_code_answers_the_documented_error_with_its_headers_and_changes_nothing() {
    let (dev, token, _cwd, _tmp) = dev(&[]);

    let forced = link(&dev.api, &token, "u-1", "okta", Some("code=503")).await;
    assert_eq!(forced.headers()["retry-after"], "2");
    let request_id = forced.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let problem = assert_problem(forced, 503, "STORE_UNAVAILABLE").await;
    assert_eq!(problem["request_id"], request_id.as_str());
    assert_eq!(
        links_of(&dev.api, &token, "u-1").await,
        json!([]),
        "nothing was linked"
    );

    let unauthorized = link(
        &dev.api,
        &token,
        "u-1",
        "okta",
        Some("code=401, example=INVALID_TOKEN"),
    )
    .await;
    assert_eq!(
        unauthorized.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_problem(unauthorized, 401, "INVALID_TOKEN").await;
    let missing = link(&dev.api, &token, "u-1", "okta", Some("code=401")).await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_problem(missing, 401, "UNAUTHENTICATED").await;
    let limited = link(&dev.api, &token, "u-1", "okta", Some("code=429")).await;
    assert!(limited.headers().contains_key("retry-after"));
    assert_problem(limited, 429, "RATE_LIMITED").await;

    let picked = link(
        &dev.api,
        &token,
        "u-1",
        "okta",
        Some("code=400, example=USER_ALREADY_LINKED"),
    )
    .await;
    assert_problem(picked, 400, "USER_ALREADY_LINKED").await;
    let first = link(&dev.api, &token, "u-1", "okta", Some("code=400")).await;
    assert_problem(first, 400, "VALIDATION_FAILED").await;
    assert_eq!(
        links_of(&dev.api, &token, "u-1").await,
        json!([]),
        "still nothing"
    );

    let success = link(&dev.api, &token, "u-1", "okta", Some("code=201")).await;
    assert_eq!(success.status(), 201, "a success is answered for real");
    assert_eq!(
        links_of(&dev.api, &token, "u-1")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_status_or_example_the_operation_does_not_document_is_a_400_naming_what_it_does() {
    let (dev, token, _cwd, _tmp) = dev(&[]);

    let teapot = client()
        .get(format!("{}/users/identity-providers", dev.api))
        .bearer_auth(&token)
        .header("prefer", "code=418")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(teapot, 400, "VALIDATION_FAILED").await;
    let message = problem["errors"][0]["message"].as_str().unwrap();
    assert_eq!(problem["errors"][0]["field"], "Prefer");
    assert!(
        message.contains("listIdentityProviders") && message.contains("200, 401, 403, 429, 500"),
        "{message}"
    );

    let unknown = link(
        &dev.api,
        &token,
        "u-1",
        "okta",
        Some("code=409, example=USER_ALREADY_LINKED"),
    )
    .await;
    let problem = assert_problem(unknown, 400, "VALIDATION_FAILED").await;
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("IDENTITY_ALREADY_LINKED"),
        "{problem}"
    );
}

#[tokio::test]
async fn prefer_delay_answers_the_real_answer_that_much_later() {
    let (dev, token, _cwd, _tmp) = dev(&[]);
    let started = Instant::now();

    let late = link(&dev.api, &token, "u-1", "okta", Some("delay=1200")).await;

    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(late.status(), 201);
    let too_long = link(&dev.api, &token, "u-2", "okta", Some("delay=30001")).await;
    assert_problem(too_long, 400, "VALIDATION_FAILED").await;
}

#[tokio::test]
async fn without_a_valid_token_prefer_changes_nothing_and_the_answer_is_the_real_401() {
    let (dev, _token, _cwd, _tmp) = dev(&[]);

    let anonymous = client()
        .get(format!("{}/users/identity-providers", dev.api))
        .header("prefer", "code=503, delay=3000")
        .send()
        .await
        .unwrap();
    let forged = client()
        .get(format!("{}/users/identity-providers", dev.api))
        .bearer_auth("not-a-token")
        .header("prefer", "code=500")
        .send()
        .await
        .unwrap();

    assert_problem(anonymous, 401, "UNAUTHENTICATED").await;
    assert_problem(forged, 401, "INVALID_TOKEN").await;
}

#[tokio::test]
async fn reset_puts_back_the_fixtures_and_the_feed_starts_again_at_1() {
    let cwd = TempDir::new().unwrap();
    let fixtures = cwd.path().join("links.jsonl");
    std::fs::write(
        &fixtures,
        "{\"user_id\":\"fixture-1\",\"provider_id\":\"okta\",\"linked_user_id\":\"r-f1\",\"linked_username\":\"f1\"}\n",
    )
    .unwrap();
    let (dev, token, _cwd, _tmp) = dev(&["--fixtures", fixtures.to_str().unwrap()]);
    client()
        .delete(format!(
            "{}/users/fixture-1/linked-identities/okta",
            dev.api
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        link(&dev.api, &token, "u-1", "okta", None).await.status(),
        201
    );
    let reader = mint_with_key(
        &dev.data.join("root.key"),
        &["--right", "linked_identities:list"],
    );
    let reset_url = dev.api.replace("/api/admin/users/v4", "/_dev/reset");

    let refused = client()
        .post(&reset_url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_problem(refused, 403, "FORBIDDEN").await;
    let reset = client()
        .post(&reset_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    assert_eq!(reset.status(), 204);
    assert_eq!(links_of(&dev.api, &token, "u-1").await, json!([]));
    assert_eq!(
        links_of(&dev.api, &token, "fixture-1").await[0]["linked_user_id"],
        "r-f1"
    );
    let feed: Value = client()
        .get(format!("{}/linked-identities/events?after=0", dev.api))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1], "{feed}");
    assert_eq!(feed["events"][0]["user_id"], "fixture-1");
    assert_eq!(
        link(&dev.api, &token, "u-2", "okta", None).await.status(),
        201
    );
}

#[tokio::test]
async fn clock_stamps_every_change_with_its_instant() {
    let (dev, token, _cwd, _tmp) = dev(&["--clock", "2026-01-01T00:00:00Z"]);

    let created: Value = link(&dev.api, &token, "u-1", "okta", None)
        .await
        .json()
        .await
        .unwrap();
    let feed: Value = client()
        .get(format!("{}/linked-identities/events", dev.api))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(created["created_at"], "2026-01-01T00:00:00Z");
    assert_eq!(created["updated_at"], "2026-01-01T00:00:00Z");
    assert_eq!(feed["events"][0]["occurred_at"], "2026-01-01T00:00:00Z");
    assert!(dev.stdout.lock().unwrap().contains("2026-01-01T00:00:00Z"));
}

#[tokio::test]
async fn dev_does_not_throttle_failed_authentications_and_says_so() {
    let (dev, token, _cwd, _tmp) = dev(&[]);
    let providers = format!("{}/users/identity-providers", dev.api);

    for _ in 0..400 {
        let anonymous = client().get(&providers).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
    }
    let admin = client()
        .get(&providers)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    assert_eq!(admin.status(), 200);
    assert!(
        dev.stdout
            .lock()
            .unwrap()
            .contains("failed authentications are not rate-limited"),
        "{}",
        dev.stdout.lock().unwrap()
    );
}

#[tokio::test]
async fn serve_ignores_every_dev_control() {
    let app = spawn_app().await;

    let forced = app
        .client
        .get(app.api("/users/identity-providers"))
        .bearer_auth(&app.admin)
        .header("prefer", "code=503, delay=2000")
        .send()
        .await
        .unwrap();
    let started = Instant::now();
    let reset = app
        .client
        .post(app.url("/_dev/reset"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();

    assert_eq!(forced.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_problem(reset, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn head_is_answered_wherever_get_is_with_the_same_head_and_no_body() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "r-1").await;
    for path in [
        "/openapi.json".to_string(),
        "/healthz".to_string(),
        app.api("/users/u-1/linked-identities")
            .replace(&app.url(""), ""),
        app.api("/users/identity-providers")
            .replace(&app.url(""), ""),
    ] {
        let get = app
            .client
            .get(app.url(&path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        let head = app
            .client
            .head(app.url(&path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();

        assert_eq!(head.status(), get.status(), "{path}");
        assert_eq!(
            head.headers().get("content-type"),
            get.headers().get("content-type"),
            "{path}"
        );
        assert_eq!(
            head.headers().get("content-length"),
            get.headers().get("content-length"),
            "{path}"
        );
        assert!(head.bytes().await.unwrap().is_empty(), "{path}");
    }
    let wrong = app
        .client
        .put(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.headers()["allow"], "GET, HEAD");
}
