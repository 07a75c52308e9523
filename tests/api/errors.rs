use serde_json::{json, Value};

use crate::helpers::{assert_problem, error_fields, spawn_app};

async fn post_raw(
    app: &crate::helpers::TestApp,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.api("/users/u-1/linked-identities"))
        .bearer_auth(&app.admin)
        .body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_echoes_a_sane_one() {
    let app = spawn_app().await;

    let generated = app.list_providers(&app.admin).await;
    let echoed = app
        .client
        .get(app.api("/users/identity-providers"))
        .bearer_auth(&app.admin)
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    let insane = app
        .client
        .get(app.url("/nowhere"))
        .header("x-request-id", "has spaces and <html>")
        .send()
        .await
        .unwrap();

    assert!(!generated.headers()["x-request-id"].is_empty());
    assert_eq!(echoed.headers()["x-request-id"], "trace-abc-123");
    let replaced = insane.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(replaced, "has spaces and <html>");
    let body = assert_problem(insane, 404, "NOT_FOUND").await;
    assert_eq!(body["request_id"], replaced.as_str());
}

#[tokio::test]
async fn unknown_paths_are_404_problem_details() {
    let app = spawn_app().await;
    for path in [
        "/",
        "/api",
        "/api/admin/users/v4/users",
        "/api/admin/users/v4/users/u-1/linked-identities/okta/extra",
    ] {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        assert_problem(response, 404, "NOT_FOUND").await;
    }
}

#[tokio::test]
async fn a_wrong_method_on_a_known_path_is_405_with_allow() {
    let app = spawn_app().await;
    let cases = [
        (
            reqwest::Method::PUT,
            "/api/admin/users/v4/users/u-1/linked-identities",
            "GET, HEAD, POST",
        ),
        (
            reqwest::Method::POST,
            "/api/admin/users/v4/users/identity-providers",
            "GET, HEAD",
        ),
        (
            reqwest::Method::PUT,
            "/api/admin/users/v4/users/u-1/linked-identities/okta",
            "GET, HEAD, DELETE",
        ),
        (reqwest::Method::DELETE, "/healthz", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let response = app
            .client
            .request(method, app.url(path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allow, "{path}");
        assert_problem(response, 405, "METHOD_NOT_ALLOWED").await;
    }
}

#[tokio::test]
async fn a_body_over_16_kib_is_413_and_nothing_is_stored() {
    let app = spawn_app().await;
    let huge = json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": "x".repeat(17 * 1024)});

    let response = post_raw(&app, Some("application/json"), huge.to_string()).await;

    assert_problem(response, 413, "PAYLOAD_TOO_LARGE").await;
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"], json!([]));
}

#[tokio::test]
async fn a_chunked_body_over_16_kib_is_413() {
    let app = spawn_app().await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b' '; 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));

    let response = post_raw(&app, Some("application/json"), body).await;

    assert_problem(response, 413, "PAYLOAD_TOO_LARGE").await;
}

#[tokio::test]
async fn a_body_that_is_not_declared_json_is_415() {
    let app = spawn_app().await;
    let body =
        json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": "n"}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let response = post_raw(&app, content_type, body.clone()).await;
        assert_problem(response, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    }
    let with_charset = post_raw(&app, Some("application/json; charset=utf-8"), body).await;
    assert_eq!(with_charset.status(), 201);
}

#[tokio::test]
async fn malformed_json_is_400_malformed_json() {
    let app = spawn_app().await;
    for body in ["{", "{\"provider_id\": }", "", "nul", "{\"a\":1}}"] {
        let response = post_raw(&app, Some("application/json"), body).await;
        assert_problem(response, 400, "MALFORMED_JSON").await;
    }
}

#[tokio::test]
async fn body_problems_are_listed_by_field() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"linked_user_id": "r", "linked_username": "n"}),
            vec!["provider_id"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": 42, "linked_username": "n"}),
            vec!["linked_user_id"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": null}),
            vec!["linked_username"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": "n", "admin": true}),
            vec!["admin"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": "", "linked_username": "n"}),
            vec!["linked_user_id"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": "a\u{7}b"}),
            vec!["linked_username"],
        ),
        (
            json!({"provider_id": "okta", "linked_user_id": "x".repeat(256), "linked_username": "n"}),
            vec!["linked_user_id"],
        ),
        (
            json!({}),
            vec!["provider_id", "linked_user_id", "linked_username"],
        ),
        (json!([1, 2]), vec!["body"]),
        (json!("okta"), vec!["body"]),
    ];
    for (body, fields) in cases {
        let problem = assert_problem(
            app.link(&app.admin, "u-1", &body).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), fields, "{body}");
    }
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"], json!([]));
}

#[tokio::test]
async fn a_duplicated_key_is_refused_by_name() {
    let app = spawn_app().await;
    let body =
        r#"{"provider_id":"okta","linked_user_id":"a","linked_user_id":"b","linked_username":"n"}"#;

    let problem = assert_problem(
        post_raw(&app, Some("application/json"), body).await,
        400,
        "VALIDATION_FAILED",
    )
    .await;

    assert_eq!(error_fields(&problem), ["linked_user_id"]);
}

#[tokio::test]
async fn a_255_character_value_is_accepted_and_sql_looking_text_is_stored_verbatim() {
    let app = spawn_app().await;
    let sneaky = "x'); DROP TABLE linked_identities; --";
    let long = "é".repeat(255);

    let response = app
        .link(
            &app.admin,
            "u-1",
            &json!({"provider_id": "okta", "linked_user_id": sneaky, "linked_username": long}),
        )
        .await;

    assert_eq!(response.status(), 201);
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"][0]["linked_user_id"], sneaky);
    assert_eq!(
        listed["linked_identities"][0]["linked_username"],
        long.as_str()
    );
}

#[tokio::test]
async fn healthz_answers_without_a_token() {
    let app = spawn_app().await;

    let response = app.client.get(app.url("/healthz")).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
}
