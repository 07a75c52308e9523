//! An error answer stays small whatever the request held: a capped list of
//! field errors with a count of the rest, and long values cut.

use linkid::auth::Right;
use serde_json::Value;

use crate::helpers::{assert_problem, error_fields, spawn_app};

const SMALL: usize = 8 * 1024;

#[tokio::test]
async fn sixty_thousand_empty_embed_items_get_a_small_400() {
    let app = spawn_app().await;
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    let query = format!("?embed={}", ",".repeat(60_000));

    let response = app.list(&lister, "u-1", &query).await;

    let length = response.content_length();
    let problem = assert_problem(response, 400, "VALIDATION_FAILED").await;
    let size = problem.to_string().len();
    assert!(
        size < SMALL,
        "a {size}-byte answer to a {}-byte query",
        query.len()
    );
    assert!(length.is_none_or(|n| (n as usize) < SMALL));
    assert_eq!(error_fields(&problem).len(), 20, "{problem}");
    assert_eq!(problem["errors_omitted"], 60_001 - 20);
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("and 59998 more"));
}

#[tokio::test]
async fn a_body_with_1500_unknown_fields_gets_a_small_400() {
    let app = spawn_app().await;
    let mut body = serde_json::Map::new();
    for i in 0..1500 {
        body.insert(format!("u{i}"), Value::from(0));
    }
    // A field name as long as the body allows is cut in the answer.
    body.insert("x".repeat(1500), Value::from(1));

    let response = app.link(&app.admin, "u-1", &Value::Object(body)).await;

    let problem = assert_problem(response, 400, "VALIDATION_FAILED").await;
    assert!(
        problem.to_string().len() < SMALL,
        "{} bytes",
        problem.to_string().len()
    );
    assert_eq!(error_fields(&problem).len(), 20);
    assert!(problem["errors_omitted"].as_u64().unwrap() >= 1481);
    for error in problem["errors"].as_array().unwrap() {
        assert!(error["field"].as_str().unwrap().chars().count() <= 65);
    }
}

#[tokio::test]
async fn a_long_unknown_provider_is_cut_in_the_detail() {
    let app = spawn_app().await;
    let provider = "p".repeat(10_000);
    let body =
        serde_json::json!({"provider_id": provider, "linked_user_id": "r", "linked_username": "n"});

    let response = app.link(&app.admin, "u-1", &body).await;

    let problem = assert_problem(response, 400, "INVALID_IDENTITY_PROVIDER").await;
    assert!(problem["detail"].as_str().unwrap().len() < 400, "{problem}");
}

#[tokio::test]
async fn a_few_field_errors_are_listed_whole_without_a_count() {
    let app = spawn_app().await;

    let response = app.list(&app.admin, "u-1", "?embed=A,B").await;

    let problem = assert_problem(response, 400, "VALIDATION_FAILED").await;
    assert_eq!(error_fields(&problem), ["embed", "embed"]);
    assert!(problem.get("errors_omitted").is_none(), "{problem}");
}
