use linkid::auth::Right;
use serde_json::Value;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

#[tokio::test]
async fn listing_providers_returns_only_the_linkable_ones() {
    let app = spawn_app().await;

    let response = app.list_providers(&app.admin).await;

    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    let providers = body["identity_providers"].as_array().unwrap();
    let ids: Vec<&str> = providers
        .iter()
        .map(|p| p["provider_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["azure-ad", "okta", "corporate-saml"]);
    assert_eq!(
        providers[2],
        serde_json::json!({"provider_id": "corporate-saml", "display_name": "Corporate SAML", "protocol": "SAML"})
    );
}

#[tokio::test]
async fn a_provider_made_unlinkable_in_the_config_is_not_listed() {
    let app = spawn_app_with(|config| {
        config
            .identity_providers
            .retain(|p| p.id != "corporate-saml");
        config.identity_providers[0].linkable = false;
    })
    .await;

    let body: Value = app.list_providers(&app.admin).await.json().await.unwrap();

    assert_eq!(
        body,
        serde_json::json!({"identity_providers": [{"provider_id": "okta", "display_name": "Okta", "protocol": "OIDC"}]})
    );
}

#[tokio::test]
async fn listing_providers_needs_the_identity_providers_list_right() {
    let app = spawn_app().await;
    let allowed = app.token_with_rights(&[Right::IdentityProvidersList]);
    let other = app.token_with_rights(&[Right::LinkedIdentitiesList]);

    assert_eq!(app.list_providers(&allowed).await.status(), 200);
    assert_problem(app.list_providers(&other).await, 403, "FORBIDDEN").await;
}
