use serde_json::Value;

use crate::helpers::spawn_app;

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

#[tokio::test]
async fn the_served_document_is_byte_identical_to_the_committed_one() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert!(
        served == COMMITTED,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn the_document_is_openapi_3_1_with_every_operation_and_error_code() {
    let doc: Value = serde_json::from_str(COMMITTED).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let expected = [
        (
            "/api/admin/users/v4/users/identity-providers",
            "get",
            vec![
                ("200", ""),
                ("401", "UNAUTHENTICATED"),
                ("401", "INVALID_TOKEN"),
                ("403", "FORBIDDEN"),
                ("500", "INTERNAL"),
            ],
        ),
        (
            "/api/admin/users/v4/users/{user_id}/linked-identities",
            "get",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("401", "INVALID_TOKEN"),
                ("403", "FORBIDDEN"),
            ],
        ),
        (
            "/api/admin/users/v4/users/{user_id}/linked-identities",
            "post",
            vec![
                ("201", ""),
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("400", "MALFORMED_JSON"),
                ("400", "INVALID_IDENTITY_PROVIDER"),
                ("400", "USER_ALREADY_LINKED"),
                ("401", "INVALID_TOKEN"),
                ("403", "FORBIDDEN"),
                ("409", "IDENTITY_ALREADY_LINKED"),
                ("413", "PAYLOAD_TOO_LARGE"),
                ("415", "UNSUPPORTED_MEDIA_TYPE"),
                ("500", "INTERNAL"),
            ],
        ),
        (
            "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
            "delete",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("401", "UNAUTHENTICATED"),
                ("403", "FORBIDDEN"),
                ("404", "LINKED_IDENTITY_NOT_FOUND"),
            ],
        ),
    ];
    for (path, method, responses) in expected {
        let operation = &doc["paths"][path][method];
        assert_eq!(
            operation["security"][0]["bearer"],
            serde_json::json!([]),
            "{method} {path}"
        );
        for (status, code) in responses {
            let response = &operation["responses"][status];
            assert!(response.is_object(), "{method} {path} documents {status}");
            if !code.is_empty() {
                let example = &response["content"]["application/problem+json"]["examples"][code];
                assert_eq!(
                    example["value"]["code"], code,
                    "{method} {path} {status} has an example for {code}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_binary() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let redirect = client.get(app.url("/docs")).send().await.unwrap();
    let page = client.get(app.url("/docs/")).send().await.unwrap();
    let config = client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();

    assert_eq!(redirect.status(), 302);
    assert_eq!(redirect.headers()["location"], "/docs/");
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "the page must load nothing from the internet"
    );
    let js = config.text().await.unwrap();
    assert!(js.contains("/openapi.json"), "{js}");
}
