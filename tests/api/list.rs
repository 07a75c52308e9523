use linkid::auth::{MintRequest, Right};
use serde_json::{json, Value};

use crate::helpers::{assert_problem, error_fields, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_user_without_links_has_an_empty_list() {
    let app = spawn_app().await;

    let response = app.list(&app.admin, "u-1", "").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"linked_identities": []}));
}

#[tokio::test]
async fn listing_shows_the_link_without_actions_by_default() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let body: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();

    let items = body["linked_identities"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["provider_id"], "okta");
    assert_eq!(items[0]["linked_user_id"], "00u1");
    assert_eq!(items[0]["linked_username"], "00u1@example.com");
    assert!(items[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(items[0].get("actions").is_none());
    assert!(body.get("actions").is_none());
}

#[tokio::test]
async fn embed_actions_for_an_admin_offers_delete_on_each_link_and_no_create_when_linked() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let body: Value = app
        .list(&app.admin, "u-1", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(body["linked_identities"][0]["actions"], json!(["DELETE"]));
    assert_eq!(body["actions"], json!([]));
}

#[tokio::test]
async fn embed_actions_offers_create_to_an_unlinked_user() {
    let app = spawn_app().await;

    let body: Value = app
        .list(&app.admin, "u-2", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(
        body,
        json!({"linked_identities": [], "actions": ["CREATE"]})
    );
}

#[tokio::test]
async fn embed_is_accepted_repeated_and_comma_separated() {
    let app = spawn_app().await;
    for query in ["?embed=ACTIONS&embed=ACTIONS", "?embed=ACTIONS,ACTIONS"] {
        let body: Value = app
            .list(&app.admin, "u-1", query)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["actions"], json!(["CREATE"]), "{query}");
    }
}

#[tokio::test]
async fn an_unknown_embed_value_is_a_validation_error() {
    let app = spawn_app().await;
    for query in [
        "?embed=EVERYTHING",
        "?embed=ACTIONS,FOO",
        "?embed=actions",
        "?embed=",
    ] {
        let problem = assert_problem(
            app.list(&app.admin, "u-1", query).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), ["embed"], "{query}");
    }
}

#[tokio::test]
async fn actions_follow_what_the_token_may_do_not_its_role() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let read_only = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    let list_and_create =
        app.token_with_rights(&[Right::LinkedIdentitiesList, Right::LinkedIdentitiesCreate]);

    let linked: Value = app
        .list(&read_only, "u-1", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();
    let unlinked_read_only: Value = app
        .list(&read_only, "u-9", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();
    let unlinked_creator: Value = app
        .list(&list_and_create, "u-9", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(linked["linked_identities"][0]["actions"], json!([]));
    assert_eq!(unlinked_read_only["actions"], json!([]));
    assert_eq!(unlinked_creator["actions"], json!(["CREATE"]));
}

#[tokio::test]
async fn actions_honour_an_attenuation_that_forbids_deleting() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let token = biscuit_auth::Biscuit::from_base64(&app.admin, app.keypair.public())
        .unwrap()
        .append(
            biscuit_auth::BlockBuilder::new()
                .code(r#"check if operation($op), ["linked_identities:list", "linked_identities:create"].contains($op);"#)
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();

    let body: Value = app
        .list(&token, "u-1", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(body["linked_identities"][0]["actions"], json!([]));
}

#[tokio::test]
async fn create_is_not_offered_when_no_provider_is_linkable() {
    let app = spawn_app_with(|config| {
        for p in &mut config.identity_providers {
            p.linkable = false;
        }
    })
    .await;

    let body: Value = app
        .list(&app.admin, "u-1", "?embed=ACTIONS")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(body["actions"], json!([]));
}

#[tokio::test]
async fn links_to_a_provider_removed_from_the_config_are_still_listed() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;
    let app = app
        .restart_with(|config| config.identity_providers.retain(|p| p.id != "okta"))
        .await;

    let body: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();

    assert_eq!(body["linked_identities"][0]["provider_id"], "okta");
}

#[tokio::test]
async fn a_user_scoped_token_lists_its_own_user_only() {
    let app = spawn_app().await;
    let token = app.mint(MintRequest {
        admin: true,
        user: Some("u-1".into()),
        ..Default::default()
    });

    assert_eq!(app.list(&token, "u-1", "").await.status(), 200);
    assert_problem(app.list(&token, "u-2", "").await, 403, "FORBIDDEN").await;
    assert_eq!(app.list_providers(&token).await.status(), 200);
}

#[tokio::test]
async fn a_user_id_with_control_characters_is_a_validation_error() {
    let app = spawn_app().await;

    let problem = assert_problem(
        app.list(&app.admin, "u%0A1", "").await,
        400,
        "VALIDATION_FAILED",
    )
    .await;

    assert_eq!(error_fields(&problem), ["user_id"]);
}

#[tokio::test]
async fn user_ids_are_percent_decoded_and_up_to_255_characters() {
    let app = spawn_app().await;
    let long = "a".repeat(255);
    let too_long = "a".repeat(256);

    assert_eq!(
        app.link_as_admin("ada%20lovelace", "okta", "r1")
            .await
            .status(),
        201
    );
    assert_eq!(app.list(&app.admin, &long, "").await.status(), 200);
    assert_problem(
        app.list(&app.admin, &too_long, "").await,
        400,
        "VALIDATION_FAILED",
    )
    .await;
    let body: Value = app
        .list(&app.admin, "ada%20lovelace", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["linked_identities"][0]["linked_user_id"], "r1");
}
