//! `GET /users/{user_id}/linked-identities/{provider_id}`: one linked
//! identity, where a new link's `Location` points.

use linkid::auth::{MintRequest, Right};
use serde_json::{json, Value};

use crate::helpers::{assert_problem, attenuate, error_fields, spawn_app, spawn_app_with};

#[tokio::test]
async fn getting_a_linked_identity_returns_it() {
    let app = spawn_app().await;
    let linked: Value = app
        .link_as_admin("u-1", "okta", "00u1")
        .await
        .json()
        .await
        .unwrap();

    let response = app.get_link(&app.admin, "u-1", "okta", "").await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, linked);
    assert!(body.get("actions").is_none());
}

#[tokio::test]
async fn the_location_of_a_new_link_answers_get_with_the_new_identity() {
    let app = spawn_app().await;
    // Path segments as a client sends them: `ada/lovelace` and `zoë 1` encoded.
    for user in ["u-42", "ada%2Flovelace", "zo%C3%AB%201"] {
        let created = app.link_as_admin(user, "okta", &format!("r-{user}")).await;
        assert_eq!(created.status(), 201);
        let location = created.headers()["location"].to_str().unwrap().to_owned();
        let linked: Value = created.json().await.unwrap();

        let response = app
            .client
            .get(app.url(&location))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();

        assert_eq!(response.status(), 200, "{location}");
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            linked,
            "{location}"
        );
    }
}

#[tokio::test]
async fn getting_a_link_the_user_does_not_have_is_linked_identity_not_found() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    for (user, provider) in [("u-1", "azure-ad"), ("u-2", "okta"), ("u-1", "no-such-idp")] {
        let problem = assert_problem(
            app.get_link(&app.admin, user, provider, "").await,
            404,
            "LINKED_IDENTITY_NOT_FOUND",
        )
        .await;
        assert!(
            problem["detail"].as_str().unwrap().contains(provider),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn a_deleted_link_is_not_found() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    app.delete(&app.admin, "u-1", "okta").await;

    assert_problem(
        app.get_link(&app.admin, "u-1", "okta", "").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn a_link_to_a_provider_removed_from_the_config_can_still_be_read() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let app = app
        .restart_with(|config| config.identity_providers.retain(|p| p.id != "okta"))
        .await;

    assert_eq!(
        app.get_link(&app.admin, "u-1", "okta", "").await.status(),
        200
    );
}

#[tokio::test]
async fn embed_actions_adds_what_the_token_may_do_to_the_identity() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let reader = app.token_with_rights(&[Right::LinkedIdentitiesList]);

    let admin: Value = app
        .get_link(&app.admin, "u-1", "okta", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();
    let read_only: Value = app
        .get_link(&reader, "u-1", "okta", "?embed=ACTIONS,ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(admin["actions"], json!(["DELETE"]));
    assert_eq!(read_only["actions"], json!([]));
}

#[tokio::test]
async fn getting_needs_the_list_right_for_that_user_and_provider() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    let deleter = app.token_with_rights(&[Right::LinkedIdentitiesDelete]);
    let for_u1 = app.mint(MintRequest {
        admin: true,
        user: Some("u-1".into()),
        ..Default::default()
    });
    let for_u2 = attenuate(&app.admin, &app.keypair, r#"check if user("u-2");"#);
    let for_azure = attenuate(
        &app.admin,
        &app.keypair,
        r#"check if provider("azure-ad");"#,
    );
    let for_okta = attenuate(&app.admin, &app.keypair, r#"check if provider("okta");"#);

    for token in [&lister, &for_u1, &for_okta] {
        assert_eq!(app.get_link(token, "u-1", "okta", "").await.status(), 200);
    }
    for token in [&deleter, &for_u2, &for_azure] {
        assert_problem(
            app.get_link(token, "u-1", "okta", "").await,
            403,
            "FORBIDDEN",
        )
        .await;
    }
    let anonymous = app
        .client
        .get(app.api("/users/u-1/linked-identities/okta"))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn bad_path_segments_and_embed_values_are_validation_errors_naming_each() {
    let app = spawn_app().await;

    let problem = assert_problem(
        app.get_link(&app.admin, "u%001", "ok%00ta", "?embed=EVERYTHING")
            .await,
        400,
        "VALIDATION_FAILED",
    )
    .await;

    assert_eq!(error_fields(&problem), ["user_id", "provider_id", "embed"]);
}

#[tokio::test]
async fn the_operation_is_counted_under_its_own_metrics_label() {
    let app = spawn_app_with(|_| {}).await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    app.get_link(&app.admin, "u-1", "okta", "").await;

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(
        metrics.contains(r#"operation="getLinkedIdentity",status="200""#),
        "{metrics}"
    );
}
