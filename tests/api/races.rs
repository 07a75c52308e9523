//! Many clients at once: the uniqueness rules hold, outcomes are exact per
//! request, and nothing answers 500.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use serde_json::Value;

use crate::helpers::{link_body, spawn_app, spawn_app_with, TestApp};

const CLIENTS: usize = 96;
const PROVIDERS: [&str; 3] = ["azure-ad", "okta", "corporate-saml"];

async fn outcome(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_linked_to_many_providers_at_once_has_exactly_one_link() {
    let app = Arc::new(spawn_app().await);
    for round in 0..3 {
        let user = format!("race-user-{round}");
        let results = join_all((0..CLIENTS).map(|i| {
            let app = app.clone();
            let user = user.clone();
            async move {
                let body = link_body(PROVIDERS[i % 3], &format!("remote-{round}-{i}"), "n");
                outcome(app.link(&app.admin, &user, &body).await).await
            }
        }))
        .await;

        let created: Vec<_> = results.iter().filter(|(s, _)| *s == 201).collect();
        assert_eq!(created.len(), 1, "{results:?}");
        for (status, body) in &results {
            assert!(
                *status == 201 || (*status == 400 && body["code"] == "USER_ALREADY_LINKED"),
                "{status} {body}"
            );
        }
        let listed: Value = app.list(&app.admin, &user, "").await.json().await.unwrap();
        assert_eq!(listed["linked_identities"].as_array().unwrap().len(), 1);
        assert_eq!(
            listed["linked_identities"][0]["linked_user_id"],
            created[0].1["linked_user_id"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_remote_identity_claimed_by_many_users_at_once_has_exactly_one_owner() {
    let app = Arc::new(spawn_app().await);
    for round in 0..3 {
        let remote = format!("contested-{round}");
        let results = join_all((0..CLIENTS).map(|i| {
            let app = app.clone();
            let remote = remote.clone();
            async move {
                let user = format!("claimant-{round}-{i}");
                let body = link_body("okta", &remote, "n");
                (
                    user.clone(),
                    outcome(app.link(&app.admin, &user, &body).await).await,
                )
            }
        }))
        .await;

        let winners: Vec<_> = results.iter().filter(|(_, (s, _))| *s == 201).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for (_, (status, body)) in &results {
            assert!(
                *status == 201 || (*status == 409 && body["code"] == "IDENTITY_ALREADY_LINKED"),
                "{status} {body}"
            );
        }
        let mut owners = 0;
        for (user, _) in &results {
            let listed: Value = app.list(&app.admin, user, "").await.json().await.unwrap();
            owners += listed["linked_identities"].as_array().unwrap().len();
        }
        assert_eq!(owners, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_link_sent_by_many_clients_at_once_is_one_201_and_the_rest_200() {
    // Many connections, so that on PostgreSQL the inserts truly overlap.
    let app = Arc::new(spawn_app_with(|c| c.database.pool_size = 16).await);
    for round in 0..5 {
        let user = format!("retried-{round}");
        let body = link_body("okta", &format!("retried-remote-{round}"), "n");
        let results = join_all((0..CLIENTS).map(|_| {
            let (app, user, body) = (app.clone(), user.clone(), body.clone());
            async move { outcome(app.link(&app.admin, &user, &body).await).await }
        }))
        .await;

        let created = results.iter().filter(|(s, _)| *s == 201).count();
        assert_eq!(created, 1, "{results:?}");
        for (status, body) in &results {
            assert!(*status == 201 || *status == 200, "{status} {body}");
            assert_eq!(body["linked_user_id"], format!("retried-remote-{round}"));
        }
    }
}

/// Link and delete requests interleaved on one user: the final state is what
/// the successful responses imply.
/// `before` is the link the user has when the storm starts; returns the one
/// it has after.
async fn storm(
    app: &Arc<TestApp>,
    user: &str,
    round: usize,
    before: Option<String>,
) -> Option<String> {
    let results = join_all((0..CLIENTS).map(|i| {
        let app = app.clone();
        let user = user.to_owned();
        async move {
            let provider = PROVIDERS[i % 3];
            if i % 2 == 0 {
                let body = link_body(provider, &format!("storm-{round}-{i}"), "n");
                (
                    "link",
                    outcome(app.link(&app.admin, &user, &body).await).await,
                )
            } else {
                (
                    "delete",
                    outcome(app.delete(&app.admin, &user, provider).await).await,
                )
            }
        }
    }))
    .await;

    let mut created: HashMap<String, usize> = before.into_iter().map(|key| (key, 1)).collect();
    let mut deleted: HashMap<String, usize> = HashMap::new();
    for (kind, (status, body)) in &results {
        let key = format!("{}/{}", body["provider_id"], body["linked_user_id"]);
        match (*kind, *status) {
            ("link", 201) => *created.entry(key).or_default() += 1,
            ("link", 400) => assert_eq!(body["code"], "USER_ALREADY_LINKED"),
            ("delete", 200) => *deleted.entry(key).or_default() += 1,
            ("delete", 404) => assert_eq!(body["code"], "LINKED_IDENTITY_NOT_FOUND"),
            other => panic!("unexpected outcome {other:?}: {body}"),
        }
    }
    for (key, n) in &deleted {
        assert_eq!(
            created.get(key),
            Some(n),
            "{key} was deleted but never created"
        );
    }
    let remaining: Vec<&String> = created
        .iter()
        .filter(|(key, n)| deleted.get(*key).copied().unwrap_or(0) < **n)
        .map(|(key, _)| key)
        .collect();
    let listed: Value = app.list(&app.admin, user, "").await.json().await.unwrap();
    let items = listed["linked_identities"].as_array().unwrap();
    assert_eq!(
        items.len(),
        remaining.len(),
        "created {created:?} deleted {deleted:?}"
    );
    let after = items
        .first()
        .map(|item| format!("{}/{}", item["provider_id"], item["linked_user_id"]));
    if let Some(key) = &after {
        assert_eq!(key, remaining[0]);
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_and_delete_storms_end_in_the_state_the_responses_imply() {
    let app = Arc::new(spawn_app().await);
    let mut state = None;
    for round in 0..8 {
        state = storm(&app, "stormy", round, state).await;
    }
}
