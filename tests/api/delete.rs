use serde_json::{json, Value};

use crate::helpers::{assert_problem, error_fields, spawn_app};

#[tokio::test]
async fn deleting_a_link_returns_the_deleted_identity() {
    let app = spawn_app().await;
    let linked: Value = app
        .link_as_admin("u-1", "okta", "00u1")
        .await
        .json()
        .await
        .unwrap();

    let response = app.delete(&app.admin, "u-1", "okta").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, linked);
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"], json!([]));
}

#[tokio::test]
async fn after_deleting_the_user_can_link_another_provider_and_the_identity_is_free() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    app.delete(&app.admin, "u-1", "okta").await;

    assert_eq!(
        app.link_as_admin("u-1", "azure-ad", "aad").await.status(),
        201
    );
    assert_eq!(app.link_as_admin("u-2", "okta", "00u1").await.status(), 201);
}

#[tokio::test]
async fn deleting_a_missing_link_is_linked_identity_not_found() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    assert_problem(
        app.delete(&app.admin, "u-1", "azure-ad").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
    assert_problem(
        app.delete(&app.admin, "u-2", "okta").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
    assert_problem(
        app.delete(&app.admin, "u-1", "no-such-idp").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn deleting_twice_is_not_found_the_second_time() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    assert_eq!(app.delete(&app.admin, "u-1", "okta").await.status(), 200);
    assert_problem(
        app.delete(&app.admin, "u-1", "okta").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn a_link_to_a_provider_removed_from_the_config_can_still_be_deleted() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let app = app
        .restart_with(|config| config.identity_providers.retain(|p| p.id != "okta"))
        .await;

    assert_eq!(app.delete(&app.admin, "u-1", "okta").await.status(), 200);
    assert_problem(
        app.delete(&app.admin, "u-1", "okta").await,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn a_provider_segment_with_control_characters_is_a_validation_error() {
    let app = spawn_app().await;

    let problem = assert_problem(
        app.delete(&app.admin, "u-1", "ok%00ta").await,
        400,
        "VALIDATION_FAILED",
    )
    .await;

    assert_eq!(error_fields(&problem), ["provider_id"]);
}
