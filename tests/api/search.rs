//! `GET /linked-identities`: the login-time reverse lookup, and keyset
//! paging through every link that never repeats or skips one, also while
//! others write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use linkid::auth::{MintRequest, Right};
use serde_json::Value;

use crate::helpers::{assert_problem, attenuate, error_fields, spawn_app, TestApp};

async fn search(app: &TestApp, token: &str, query: &str) -> reqwest::Response {
    app.client
        .get(app.api(&format!("/linked-identities{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn page(app: &TestApp, query: &str) -> Value {
    let response = search(app, &app.admin, query).await;
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.unwrap()
}

fn users(page: &Value) -> Vec<String> {
    page["linked_identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["user_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_reverse_lookup_finds_the_owner_of_a_remote_identity() {
    let app = spawn_app().await;
    app.link_as_admin("u-ada", "okta", "00u-ada").await;
    app.link_as_admin("u-grace", "azure-ad", "00u-ada").await;

    let found = page(&app, "?provider_id=okta&linked_user_id=00u-ada").await;
    let missing = page(&app, "?provider_id=okta&linked_user_id=nobody").await;

    assert_eq!(found["linked_identities"].as_array().unwrap().len(), 1);
    let link = &found["linked_identities"][0];
    assert_eq!(link["user_id"], "u-ada");
    assert_eq!(link["provider_id"], "okta");
    assert_eq!(link["linked_user_id"], "00u-ada");
    assert_eq!(link["linked_username"], "00u-ada@example.com");
    assert!(link["created_at"].is_string() && link["updated_at"].is_string());
    assert_eq!(found["next_cursor"], Value::Null);
    assert_eq!(missing["linked_identities"], serde_json::json!([]));
    assert_eq!(missing["next_cursor"], Value::Null);
}

#[tokio::test]
async fn a_provider_filter_pages_through_that_provider_only() {
    let app = spawn_app().await;
    for i in 0..12 {
        let provider = if i % 3 == 0 { "okta" } else { "azure-ad" };
        app.link_as_admin(&format!("u-{i:02}"), provider, &format!("r-{i}"))
            .await;
    }

    let mut seen = Vec::new();
    let mut query = "?provider_id=okta&limit=2".to_string();
    loop {
        let body = page(&app, &query).await;
        for link in body["linked_identities"].as_array().unwrap() {
            assert_eq!(link["provider_id"], "okta");
        }
        seen.extend(users(&body));
        match body["next_cursor"].as_str() {
            Some(cursor) => query = format!("?provider_id=okta&limit=2&cursor={cursor}"),
            None => break,
        }
    }

    assert_eq!(seen, ["u-00", "u-03", "u-06", "u-09"]);
}

#[tokio::test]
async fn a_walk_of_1000_links_in_pages_of_7_while_others_write_sees_each_lasting_link_once() {
    let app = Arc::new(spawn_app().await);
    let lasting: BTreeSet<String> = (0..1000).map(|i| format!("stay-{i:04}")).collect();
    let all: Vec<String> = lasting.iter().cloned().collect();
    let loaders: Vec<_> = all
        .chunks(50)
        .map(|chunk| {
            let (app, chunk) = (app.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for user in chunk {
                    let response = app.link_as_admin(&user, "okta", &format!("r-{user}")).await;
                    assert_eq!(response.status(), 201);
                }
            })
        })
        .collect();
    for loader in loaders {
        loader.await.unwrap();
    }
    // Writers link and unlink other users, before, among and after the lasting ones.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    for prefix in ["a", "stay-05", "zz"] {
                        let user = format!("{prefix}-w{w}-{n}");
                        app.link_as_admin(&user, "azure-ad", &format!("r-{user}"))
                            .await;
                        if n % 2 == 0 {
                            app.delete(&app.admin, &user, "azure-ad").await;
                        }
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut pages = 0;
    let mut query = "?limit=7".to_string();
    loop {
        let body = page(&app, &query).await;
        let users = users(&body);
        assert!(users.len() <= 7);
        assert!(
            users.windows(2).all(|w| w[0] < w[1]),
            "a page is in order: {users:?}"
        );
        for user in users {
            *seen.entry(user).or_default() += 1;
        }
        pages += 1;
        match body["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=7&cursor={cursor}"),
            None => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for writer in writers {
        rounds += writer.await.unwrap();
    }

    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "repeated: {repeated:?}");
    let missed: Vec<_> = lasting.iter().filter(|u| !seen.contains_key(*u)).collect();
    assert!(
        missed.is_empty(),
        "skipped {} lasting links: {missed:?}",
        missed.len()
    );
    assert!(pages >= 1000 / 7, "{pages} pages");
    assert!(rounds > 0, "the writers wrote during the walk");
    eprintln!(
        "walk: {pages} pages, {} links seen, {rounds} writer rounds",
        seen.len()
    );
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_field() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "r-1").await;
    app.link_as_admin("u-2", "okta", "r-2").await;
    let first = page(&app, "?limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=1&limit=2", "limit"),
        ("?linked_user_id=r-1", "linked_user_id"),
        ("?provider_id=", "provider_id"),
        ("?cursor=not-a-cursor", "cursor"),
        (
            &format!("?cursor={}x", &cursor[..cursor.len() - 1]),
            "cursor",
        ),
        (&format!("?provider_id=okta&cursor={cursor}"), "cursor"),
    ] {
        let problem = assert_problem(
            search(&app, &app.admin, query).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), [field], "{query}: {problem}");
    }
}

#[tokio::test]
async fn searching_needs_the_search_right_and_honours_a_provider_attenuation() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "r-1").await;
    let searcher = app.token_with_rights(&[Right::LinkedIdentitiesSearch]);
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    let user_scoped = attenuate(&app.admin, &app.keypair, r#"check if user("u-1");"#);
    let minted_for_user = app.mint(MintRequest {
        admin: true,
        user: Some("u-1".into()),
        ..Default::default()
    });
    let okta_only = attenuate(&searcher, &app.keypair, r#"check if provider("okta");"#);

    assert_eq!(search(&app, &searcher, "").await.status(), 200);
    assert_problem(search(&app, &lister, "").await, 403, "FORBIDDEN").await;
    assert_problem(search(&app, &user_scoped, "").await, 403, "FORBIDDEN").await;
    assert_problem(search(&app, &minted_for_user, "").await, 403, "FORBIDDEN").await;
    assert_eq!(
        search(&app, &okta_only, "?provider_id=okta").await.status(),
        200
    );
    assert_problem(
        search(&app, &okta_only, "?provider_id=azure-ad").await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert_problem(search(&app, &okta_only, "").await, 403, "FORBIDDEN").await;
}
