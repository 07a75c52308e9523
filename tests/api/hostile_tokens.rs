//! Tokens crafted to hurt the server: heavy datalog, oversized tokens,
//! floods of distinct attenuations. Each request is bounded in time, the
//! token cache in bytes, and `/healthz` keeps answering meanwhile.

use linkid::auth::{MintRequest, Right};

use crate::helpers::{assert_problem, attenuate, spawn_app_with, TestApp};

/// A token for one user that may read and write that user's links, as
/// `linkid token mint --right ... --user u-42` makes it.
fn user_token(app: &TestApp) -> String {
    app.mint(MintRequest {
        rights: Right::ALL.to_vec(),
        user: Some("u-42".into()),
        ..Default::default()
    })
}

#[tokio::test]
async fn fresh_attenuations_of_one_token_share_its_rate_limit() {
    let app = spawn_app_with(|config| {
        config.rate_limit.per_token_per_second = 1;
        config.rate_limit.per_token_burst = 3;
    })
    .await;
    let root = user_token(&app);
    let other_root = user_token(&app);

    for _ in 0..3 {
        let fresh = attenuate(&root, &app.keypair, "check if true;");
        assert_eq!(app.list(&fresh, "u-42", "").await.status(), 200);
    }
    let fresh = attenuate(&root, &app.keypair, "check if true;");
    let refused = app.list(&fresh, "u-42", "").await;
    let unaffected = app.list(&other_root, "u-42", "").await;

    assert_problem(refused, 429, "RATE_LIMITED").await;
    assert_eq!(unaffected.status(), 200);
}
