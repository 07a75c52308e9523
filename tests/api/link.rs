use serde_json::{json, Value};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::helpers::{assert_problem, error_fields, link_body, spawn_app, spawn_app_with, PREFIX};

#[tokio::test]
async fn a_new_link_is_201_with_the_identity_and_a_location() {
    let app = spawn_app().await;

    let response = app
        .link(
            &app.admin,
            "u-1",
            &link_body("okta", "00u1", "ada@example.com"),
        )
        .await;

    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"],
        format!("{PREFIX}/users/u-1/linked-identities/okta").as_str()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["provider_id"], "okta");
    assert_eq!(body["linked_user_id"], "00u1");
    assert_eq!(body["linked_username"], "ada@example.com");
    assert_eq!(body["created_at"], body["updated_at"]);
    assert!(body.get("actions").is_none());
}

#[tokio::test]
async fn the_location_percent_encodes_the_user_id() {
    let app = spawn_app().await;

    let response = app.link_as_admin("ada%2Fl", "okta", "r1").await;

    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"],
        format!("{PREFIX}/users/ada%2Fl/linked-identities/okta").as_str()
    );
    let body: Value = app
        .list(&app.admin, "ada%2Fl", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["linked_identities"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_link_again_is_200_and_changes_nothing() {
    let app = spawn_app().await;
    let first: Value = app
        .link_as_admin("u-1", "okta", "00u1")
        .await
        .json()
        .await
        .unwrap();

    let again = app.link_as_admin("u-1", "okta", "00u1").await;

    assert_eq!(again.status(), 200);
    assert!(again.headers().get("location").is_none());
    let body: Value = again.json().await.unwrap();
    assert_eq!(body, first);
}

#[tokio::test]
async fn the_same_link_with_a_new_username_updates_the_username() {
    let app = spawn_app().await;
    app.link(
        &app.admin,
        "u-1",
        &link_body("okta", "00u1", "old@example.com"),
    )
    .await;

    let response = app
        .link(
            &app.admin,
            "u-1",
            &link_body("okta", "00u1", "new@example.com"),
        )
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["linked_username"], "new@example.com");
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(
        listed["linked_identities"][0]["linked_username"],
        "new@example.com"
    );
}

#[tokio::test]
async fn linking_a_second_provider_is_user_already_linked() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-1", "azure-ad", "aad-1").await;

    assert_problem(response, 400, "USER_ALREADY_LINKED").await;
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn linking_another_remote_account_at_the_same_provider_is_user_already_linked() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-1", "okta", "00u2").await;

    assert_problem(response, 400, "USER_ALREADY_LINKED").await;
}

#[tokio::test]
async fn a_remote_identity_held_by_another_user_is_409() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-2", "okta", "00u1").await;

    assert_problem(response, 409, "IDENTITY_ALREADY_LINKED").await;
    let listed: Value = app.list(&app.admin, "u-2", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"], json!([]));
}

#[tokio::test]
async fn the_same_remote_id_at_another_provider_is_a_different_identity() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "shared-id").await;

    let response = app.link_as_admin("u-2", "azure-ad", "shared-id").await;

    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn an_unknown_provider_is_invalid_identity_provider() {
    let app = spawn_app().await;
    for provider in ["github", "", "OKTA"] {
        let response = app.link_as_admin("u-1", provider, "r1").await;
        assert_problem(response, 400, "INVALID_IDENTITY_PROVIDER").await;
    }
}

#[tokio::test]
async fn a_provider_that_is_not_linkable_is_invalid_identity_provider() {
    let app = spawn_app().await;

    let response = app.link_as_admin("u-1", "legacy-ldap-bridge", "r1").await;

    assert_problem(response, 400, "INVALID_IDENTITY_PROVIDER").await;
}

#[tokio::test]
async fn embed_actions_on_link_adds_delete_to_the_identity() {
    let app = spawn_app().await;

    let response = app
        .client
        .post(app.api("/users/u-1/linked-identities?embed=ACTIONS"))
        .bearer_auth(&app.admin)
        .json(&link_body("okta", "00u1", "ada"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["actions"], json!(["DELETE"]));
}

#[tokio::test]
async fn concurrent_links_of_one_remote_identity_have_exactly_one_winner() {
    let app = spawn_app().await;
    let app = std::sync::Arc::new(app);

    let attempts = (0..32).map(|i| {
        let app = app.clone();
        tokio::spawn(async move {
            app.link_as_admin(&format!("u-{i}"), "okta", "contested")
                .await
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }

    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        31,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn one_commit_per_request_gives_the_same_outcomes() {
    let app = spawn_app_with(|config| config.database.max_batch = 1).await;

    assert_eq!(app.link_as_admin("u-1", "okta", "00u1").await.status(), 201);
    assert_eq!(app.link_as_admin("u-1", "okta", "00u1").await.status(), 200);
    assert_problem(
        app.link_as_admin("u-2", "okta", "00u1").await,
        409,
        "IDENTITY_ALREADY_LINKED",
    )
    .await;
    assert_problem(
        app.link_as_admin("u-1", "azure-ad", "x").await,
        400,
        "USER_ALREADY_LINKED",
    )
    .await;
}

#[tokio::test]
async fn bidirectional_formatting_characters_are_refused_like_control_characters() {
    let app = spawn_app().await;

    for spoof in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
        let body = link_body(
            "okta",
            &format!("r{spoof}1"),
            &format!("admin{spoof}@example.com"),
        );
        let problem = assert_problem(
            app.link(&app.admin, "u-1", &body).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(
            error_fields(&problem),
            ["linked_user_id", "linked_username"],
            "{spoof:?}"
        );
        let user = utf8_percent_encode(&format!("u{spoof}1"), NON_ALPHANUMERIC).to_string();
        let problem = assert_problem(
            app.list(&app.admin, &user, "").await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), ["user_id"]);
    }
    let listed: serde_json::Value = app
        .client
        .get(app.api("/linked-identities"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["linked_identities"],
        serde_json::json!([]),
        "nothing was stored"
    );
}
