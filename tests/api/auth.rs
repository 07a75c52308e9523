use std::time::Duration;

use linkid::auth::{revocation_ids, MintRequest, Right};
use linkid::store::Store;

use crate::helpers::{
    assert_problem, attenuate, expired_admin, forged_admin, link_body, spawn_app,
};

async fn assert_invalid_token(response: reqwest::Response) {
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    assert_problem(response, 401, "INVALID_TOKEN").await;
}

#[tokio::test]
async fn a_request_without_a_token_is_401_with_a_bare_bearer_challenge() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(app.api("/users/identity-providers"))
        .send()
        .await
        .unwrap();

    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(!challenge.contains("error="), "{challenge}");
    assert_problem(response, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn every_operation_needs_a_token() {
    let app = spawn_app().await;
    let requests = [
        app.client.get(app.api("/users/u-1/linked-identities")),
        app.client
            .post(app.api("/users/u-1/linked-identities"))
            .json(&link_body("okta", "r", "n")),
        app.client
            .delete(app.api("/users/u-1/linked-identities/okta")),
    ];
    for request in requests {
        assert_problem(request.send().await.unwrap(), 401, "UNAUTHENTICATED").await;
    }
}

#[tokio::test]
async fn another_scheme_is_treated_as_no_bearer_token() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(app.api("/users/identity-providers"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();

    assert_problem(response, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn malformed_tokens_are_invalid_token() {
    let app = spawn_app().await;
    let truncated = &app.admin[..app.admin.len() / 2];
    for token in ["not-a-biscuit", "!!!!", truncated, "e30"] {
        assert_invalid_token(app.list_providers(token).await).await;
    }
    let empty = app
        .client
        .get(app.api("/users/identity-providers"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_invalid_token(empty).await;
}

#[tokio::test]
async fn a_token_signed_by_another_root_key_is_invalid_token() {
    let app = spawn_app().await;
    let forged = forged_admin();

    assert_invalid_token(app.list_providers(&forged).await).await;
}

#[tokio::test]
async fn an_expired_token_is_invalid_token() {
    let app = spawn_app().await;
    let expired = expired_admin(&app.keypair, Duration::from_secs(60));
    let attenuated_expired = attenuate(
        &app.admin,
        &app.keypair,
        "check if time($t), $t <= 2020-01-01T00:00:00Z;",
    );

    assert_invalid_token(app.list_providers(&expired).await).await;
    assert_invalid_token(app.list_providers(&attenuated_expired).await).await;
    assert_invalid_token(
        app.link(&expired, "u-1", &link_body("okta", "r", "n"))
            .await,
    )
    .await;
}

#[tokio::test]
async fn a_token_with_a_ttl_works_until_it_expires() {
    let app = spawn_app().await;
    let token = app.mint(MintRequest {
        admin: true,
        ttl: Some(Duration::from_secs(1)),
        ..Default::default()
    });

    assert_eq!(app.list_providers(&token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_invalid_token(app.list_providers(&token).await).await;
}

#[tokio::test]
async fn a_revoked_token_is_refused_within_a_second_without_restart() {
    let app = spawn_app().await;
    let token = app.mint(MintRequest {
        admin: true,
        ..Default::default()
    });
    let child = attenuate(&token, &app.keypair, r#"check if user("u-1");"#);
    assert_eq!(app.list_providers(&token).await.status(), 200);
    let ids = revocation_ids(app.keypair.public(), &token).unwrap();
    let store = Store::open(&app.config.database, &app.config.id_rules())
        .await
        .unwrap();

    store
        .revoke(vec![ids.last().unwrap().clone()])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    assert_invalid_token(app.list_providers(&token).await).await;
    assert_invalid_token(app.list(&child, "u-1", "").await).await;
    assert_eq!(app.list_providers(&app.admin).await.status(), 200);
}

#[tokio::test]
async fn a_valid_token_without_the_right_is_403() {
    let app = spawn_app().await;
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);

    assert_eq!(app.list(&lister, "u-1", "").await.status(), 200);
    assert_problem(
        app.link(&lister, "u-1", &link_body("okta", "r", "n")).await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert_problem(app.delete(&lister, "u-1", "okta").await, 403, "FORBIDDEN").await;
    assert_problem(app.list_providers(&lister).await, 403, "FORBIDDEN").await;
}

#[tokio::test]
async fn rights_grant_exactly_their_operation() {
    let app = spawn_app().await;
    let creator = app.token_with_rights(&[Right::LinkedIdentitiesCreate]);
    let deleter = app.token_with_rights(&[Right::LinkedIdentitiesDelete]);

    assert_eq!(
        app.link(&creator, "u-1", &link_body("okta", "r", "n"))
            .await
            .status(),
        201
    );
    assert_eq!(app.delete(&deleter, "u-1", "okta").await.status(), 200);
    assert_problem(app.list(&creator, "u-1", "").await, 403, "FORBIDDEN").await;
}

#[tokio::test]
async fn a_token_attenuated_to_one_user_works_for_that_user_only() {
    let app = spawn_app().await;
    let token = attenuate(&app.admin, &app.keypair, r#"check if user("u-1");"#);

    assert_eq!(
        app.link(&token, "u-1", &link_body("okta", "r1", "n"))
            .await
            .status(),
        201
    );
    assert_eq!(app.list(&token, "u-1", "").await.status(), 200);
    assert_problem(app.list(&token, "u-2", "").await, 403, "FORBIDDEN").await;
    assert_problem(
        app.link(&token, "u-2", &link_body("okta", "r2", "n")).await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert_problem(app.delete(&token, "u-2", "okta").await, 403, "FORBIDDEN").await;
    assert_eq!(app.delete(&token, "u-1", "okta").await.status(), 200);
}

#[tokio::test]
async fn a_read_only_attenuation_is_403_on_post_and_delete() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "r1").await;
    let token = attenuate(
        &app.admin,
        &app.keypair,
        r#"check if operation("linked_identities:list") or operation("identity_providers:list");"#,
    );

    assert_eq!(app.list(&token, "u-1", "").await.status(), 200);
    assert_eq!(app.list_providers(&token).await.status(), 200);
    assert_problem(
        app.link(&token, "u-2", &link_body("okta", "r2", "n")).await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert_problem(app.delete(&token, "u-1", "okta").await, 403, "FORBIDDEN").await;
}

#[tokio::test]
async fn an_attenuation_cannot_add_rights() {
    let app = spawn_app().await;
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    let escalated = attenuate(
        &lister,
        &app.keypair,
        r#"role("admin"); right("linked_identities:delete");"#,
    );

    assert_problem(
        app.delete(&escalated, "u-1", "okta").await,
        403,
        "FORBIDDEN",
    )
    .await;
}

#[tokio::test]
async fn an_attenuation_to_one_provider_is_honoured_on_link() {
    let app = spawn_app().await;
    let token = attenuate(
        &app.admin,
        &app.keypair,
        r#"check if provider("okta") or operation("linked_identities:list");"#,
    );

    assert_problem(
        app.link(&token, "u-1", &link_body("azure-ad", "r1", "n"))
            .await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert_eq!(
        app.link(&token, "u-1", &link_body("okta", "r1", "n"))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn a_token_signed_by_another_key_is_told_which_public_key_this_server_trusts() {
    let app = spawn_app().await;

    let response = app.list_providers(&forged_admin()).await;

    let body = assert_problem(response, 401, "INVALID_TOKEN").await;
    let detail = body["detail"].as_str().unwrap();
    let trusted = app.keypair.public().to_string();
    assert!(trusted.starts_with("ed25519/"), "{trusted}");
    assert!(detail.contains(&trusted), "{detail}");
}

#[tokio::test]
async fn answers_stay_exact_per_user_provider_and_time_when_a_token_is_reused() {
    let app = spawn_app().await;
    let one_user = attenuate(&app.admin, &app.keypair, r#"check if user("u-1");"#);
    let one_provider = attenuate(
        &app.admin,
        &app.keypair,
        r#"check if provider("okta") or operation("linked_identities:list");"#,
    );
    // Mentions time outside a time-only check: never answered from memory.
    let until_2000 = attenuate(
        &app.admin,
        &app.keypair,
        r#"check if time($t), user($u), $u != "nobody", $t < 2000-01-01T00:00:00Z;"#,
    );

    for _ in 0..3 {
        assert_eq!(app.list(&one_user, "u-1", "").await.status(), 200);
        assert_eq!(app.list(&one_user, "u-2", "").await.status(), 403);
        assert_eq!(
            app.link(&one_provider, "u-3", &link_body("azure-ad", "r-3", "n"))
                .await
                .status(),
            403
        );
        assert_eq!(app.list(&until_2000, "u-1", "").await.status(), 403);
    }
    assert_eq!(
        app.link(&one_provider, "u-3", &link_body("okta", "r-3", "n"))
            .await
            .status(),
        201
    );
    assert_eq!(app.delete(&one_provider, "u-3", "okta").await.status(), 200);
}

/// What a deny-list block (`reject if user("victim")`) hides and what it
/// does not, exactly as the README's token section says it: a change to
/// either side fails this test until the other follows.
#[tokio::test]
async fn a_deny_list_block_hides_the_users_own_paths_but_not_collection_reads_as_the_readme_says() {
    let app = spawn_app().await;
    assert_eq!(
        app.link_as_admin("victim", "okta", "00u-victim")
            .await
            .status(),
        201
    );
    let deny = attenuate(&app.admin, &app.keypair, r#"reject if user("victim");"#);
    let allow = attenuate(&app.admin, &app.keypair, r#"check if user("u-42");"#);
    let read = |token: &str, path: &str| app.client.get(app.api(path)).bearer_auth(token).send();

    let own_path = read(&deny, "/users/victim/linked-identities")
        .await
        .unwrap();
    let search = read(&deny, "/linked-identities").await.unwrap();
    let lookup = read(
        &deny,
        "/linked-identities?provider_id=okta&linked_user_id=00u-victim",
    )
    .await
    .unwrap();
    let feed = read(&deny, "/linked-identities/events").await.unwrap();

    assert_problem(own_path, 403, "FORBIDDEN").await;
    for (what, response) in [
        ("search", search),
        ("reverse lookup", lookup),
        ("feed", feed),
    ] {
        assert_eq!(response.status(), 200, "{what}");
        let body = response.text().await.unwrap();
        assert!(
            body.contains(r#""user_id":"victim""#),
            "{what} still shows victim: {body}"
        );
    }
    // An allow-list block carries no such gap: collection reads are refused.
    for path in ["/linked-identities", "/linked-identities/events"] {
        assert_problem(read(&allow, path).await.unwrap(), 403, "FORBIDDEN").await;
    }
    let readme = include_str!("../../README.md");
    for said in [
        r#"reject if user("victim")"#,
        "collection reads",
        r#"check if user("u-42")"#,
        "linked_identities:search",
        "events:list",
    ] {
        assert!(
            readme.contains(said),
            "the README's token section says {said:?}"
        );
    }
}
