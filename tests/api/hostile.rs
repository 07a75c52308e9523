//! A catalogue of bad requests, each with its exact status and code. The
//! server stays up, stores nothing it should not, and serves the next
//! valid request.

use std::time::Duration;

use linkid::auth::{revocation_ids, MintRequest};
use linkid::store::Store;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{attenuate, expired_admin, forged_admin, link_body, spawn_app, TestApp};

/// Sends raw bytes as one HTTP/1.1 request and reads the whole response.
async fn raw(app: &TestApp, request: Vec<u8>) -> (u16, Option<String>) {
    let addr = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    (status, code)
}

struct Request {
    method: &'static str,
    target: Vec<u8>,
    auth: Option<Vec<u8>>,
    content_type: Option<&'static str>,
    extra_headers: Vec<u8>,
    body: Vec<u8>,
    content_length: Option<String>,
}

impl Request {
    fn new(method: &'static str, target: impl Into<Vec<u8>>, token: &str) -> Request {
        Request {
            method,
            target: target.into(),
            auth: Some(format!("Bearer {token}").into_bytes()),
            content_type: None,
            extra_headers: Vec::new(),
            body: Vec::new(),
            content_length: None,
        }
    }

    fn post(token: &str, body: impl Into<Vec<u8>>) -> Request {
        let mut request = Request::new(
            "POST",
            "/api/admin/users/v4/users/hostile/linked-identities",
            token,
        );
        request.content_type = Some("application/json");
        request.body = body.into();
        request
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
        if let Some(auth) = &self.auth {
            out.extend_from_slice(b"authorization: ");
            out.extend_from_slice(auth);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(ct) = self.content_type {
            out.extend_from_slice(format!("content-type: {ct}\r\n").as_bytes());
        }
        let length = self
            .content_length
            .clone()
            .unwrap_or_else(|| self.body.len().to_string());
        out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
        out.extend_from_slice(&self.extra_headers);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

fn list_target(user: &str, query: &str) -> Vec<u8> {
    format!("/api/admin/users/v4/users/{user}/linked-identities{query}").into_bytes()
}

#[tokio::test]
async fn the_hostile_input_catalogue_gets_exact_errors_and_loses_nothing() {
    let app = spawn_app().await;
    let admin = app.admin.clone();
    let body = |provider: &str, remote: &str, username: &str| {
        link_body(provider, remote, username).to_string()
    };
    let revoked = app.mint(MintRequest {
        admin: true,
        ..Default::default()
    });
    let ids = revocation_ids(app.keypair.public(), &revoked).unwrap();
    let store = Store::open(&app.config.database, &app.config.id_rules())
        .await
        .unwrap();
    store
        .revoke(vec![ids.last().unwrap().clone()])
        .await
        .unwrap();
    store.close().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = expired_admin(&app.keypair, Duration::from_secs(3600));
    let forged = forged_admin();
    let other_user = attenuate(&admin, &app.keypair, r#"check if user("someone-else");"#);
    let deep = format!(
        "{{\"provider_id\": {}{}}}",
        "[".repeat(3000),
        "]".repeat(3000)
    );

    let with = |mut r: Request, f: &dyn Fn(&mut Request)| {
        f(&mut r);
        r
    };
    let get = |target: Vec<u8>, token: &str| Request::new("GET", target, token);

    let cases: Vec<(&str, Request, u16, Option<&str>)> = vec![
        (
            "malformed JSON",
            Request::post(&admin, "{"),
            400,
            Some("MALFORMED_JSON"),
        ),
        (
            "empty body",
            Request::post(&admin, ""),
            400,
            Some("MALFORMED_JSON"),
        ),
        (
            "trailing garbage",
            Request::post(&admin, format!("{} x", body("okta", "r", "n"))),
            400,
            Some("MALFORMED_JSON"),
        ),
        (
            "invalid UTF-8 in the body",
            Request::post(&admin, b"{\"provider_id\":\"ok\xff\xfeta\"}".to_vec()),
            400,
            Some("MALFORMED_JSON"),
        ),
        (
            "deeply nested JSON",
            Request::post(&admin, deep),
            400,
            Some("MALFORMED_JSON"),
        ),
        (
            "array body",
            Request::post(&admin, "[]"),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "string body",
            Request::post(&admin, "\"okta\""),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "null body",
            Request::post(&admin, "null"),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "number for provider_id",
            Request::post(
                &admin,
                r#"{"provider_id":1,"linked_user_id":"r","linked_username":"n"}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "boolean for linked_user_id",
            Request::post(
                &admin,
                r#"{"provider_id":"okta","linked_user_id":true,"linked_username":"n"}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "null linked_username",
            Request::post(
                &admin,
                r#"{"provider_id":"okta","linked_user_id":"r","linked_username":null}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "object linked_username",
            Request::post(
                &admin,
                r#"{"provider_id":"okta","linked_user_id":"r","linked_username":{}}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "missing linked_user_id",
            Request::post(&admin, r#"{"provider_id":"okta","linked_username":"n"}"#),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "empty object",
            Request::post(&admin, "{}"),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "unknown field",
            Request::post(
                &admin,
                r#"{"provider_id":"okta","linked_user_id":"r","linked_username":"n","role":"admin"}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "duplicate key",
            Request::post(
                &admin,
                r#"{"provider_id":"okta","provider_id":"azure-ad","linked_user_id":"r","linked_username":"n"}"#,
            ),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "empty linked_user_id",
            Request::post(&admin, body("okta", "", "n")),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "256-character linked_username",
            Request::post(&admin, body("okta", "r", &"n".repeat(256))),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "NUL in linked_user_id",
            Request::post(&admin, body("okta", "r\u{0}x", "n")),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "escape in linked_username",
            Request::post(&admin, body("okta", "r", "\u{1b}[31mred")),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "C1 control in linked_username",
            Request::post(&admin, body("okta", "r", "a\u{85}b")),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "newline in linked_user_id",
            Request::post(&admin, body("okta", "r\nX-Injected: 1", "n")),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "empty provider_id",
            Request::post(&admin, body("", "r", "n")),
            400,
            Some("INVALID_IDENTITY_PROVIDER"),
        ),
        (
            "path-like provider_id",
            Request::post(&admin, body("../okta", "r", "n")),
            400,
            Some("INVALID_IDENTITY_PROVIDER"),
        ),
        (
            "SQL-looking provider_id",
            Request::post(&admin, body("okta' OR '1'='1", "r", "n")),
            400,
            Some("INVALID_IDENTITY_PROVIDER"),
        ),
        (
            "unlinkable provider",
            Request::post(&admin, body("legacy-ldap-bridge", "r", "n")),
            400,
            Some("INVALID_IDENTITY_PROVIDER"),
        ),
        (
            "body over 16 KiB",
            Request::post(&admin, body("okta", "r", &"n".repeat(20_000))),
            413,
            Some("PAYLOAD_TOO_LARGE"),
        ),
        (
            "declared length over 16 KiB",
            with(Request::post(&admin, ""), &|r| {
                r.content_length = Some("1000000000".into())
            }),
            413,
            Some("PAYLOAD_TOO_LARGE"),
        ),
        (
            "text/plain body",
            with(Request::post(&admin, body("okta", "r", "n")), &|r| {
                r.content_type = Some("text/plain")
            }),
            415,
            Some("UNSUPPORTED_MEDIA_TYPE"),
        ),
        (
            "no Content-Type",
            with(Request::post(&admin, body("okta", "r", "n")), &|r| {
                r.content_type = None
            }),
            415,
            Some("UNSUPPORTED_MEDIA_TYPE"),
        ),
        (
            "XML body",
            with(Request::post(&admin, "<link/>"), &|r| {
                r.content_type = Some("application/xml")
            }),
            415,
            Some("UNSUPPORTED_MEDIA_TYPE"),
        ),
        (
            "NUL in user_id",
            get(list_target("u%00", ""), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "bad percent-encoded UTF-8 in user_id",
            get(list_target("%FF%FE", ""), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "256-character user_id",
            get(list_target(&"u".repeat(256), ""), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "raw invalid UTF-8 in the path (rejected by the HTTP parser)",
            get(
                b"/api/admin/users/v4/users/\xff/linked-identities".to_vec(),
                &admin,
            ),
            400,
            None,
        ),
        (
            "encoded slashes in user_id are part of the id",
            get(list_target("..%2F..%2Fetc", ""), &admin),
            200,
            None,
        ),
        (
            "encoded dots as user_id are an id",
            get(list_target("%2E%2E", ""), &admin),
            200,
            None,
        ),
        (
            "encoded slash as provider_id",
            Request::new(
                "DELETE",
                "/api/admin/users/v4/users/u-1/linked-identities/%2F",
                &admin,
            ),
            404,
            Some("LINKED_IDENTITY_NOT_FOUND"),
        ),
        (
            "unknown embed",
            get(list_target("u-1", "?embed=EVERYTHING"), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "lower-case embed",
            get(list_target("u-1", "?embed=actions"), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "empty embed item",
            get(list_target("u-1", "?embed=ACTIONS,,"), &admin),
            400,
            Some("VALIDATION_FAILED"),
        ),
        (
            "oversized headers",
            with(get(list_target("u-1", ""), &admin), &|r| {
                r.extra_headers = format!("x-big: {}\r\n", "a".repeat(1 << 20)).into_bytes()
            }),
            431,
            None,
        ),
        (
            "no token",
            with(get(list_target("u-1", ""), &admin), &|r| r.auth = None),
            401,
            Some("UNAUTHENTICATED"),
        ),
        (
            "Basic credentials",
            with(get(list_target("u-1", ""), &admin), &|r| {
                r.auth = Some(b"Basic YWRtaW46YWRtaW4=".to_vec())
            }),
            401,
            Some("UNAUTHENTICATED"),
        ),
        (
            "empty bearer token",
            get(list_target("u-1", ""), ""),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "bearer token that is not base64",
            get(list_target("u-1", ""), "%%%not*base64%%%"),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "truncated bearer token",
            get(list_target("u-1", ""), &admin[..admin.len() - 10]),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "bearer token with trailing garbage",
            get(list_target("u-1", ""), &format!("{admin} extra")),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "non-ASCII bearer token",
            with(get(list_target("u-1", ""), &admin), &|r| {
                r.auth = Some(b"Bearer \xff\xfe\xfd".to_vec())
            }),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "token signed by another key",
            get(list_target("u-1", ""), &forged),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "expired token",
            get(list_target("u-1", ""), &expired),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "revoked token",
            get(list_target("u-1", ""), &revoked),
            401,
            Some("INVALID_TOKEN"),
        ),
        (
            "token attenuated to another user",
            get(list_target("u-1", ""), &other_user),
            403,
            Some("FORBIDDEN"),
        ),
        (
            "token attenuated to another user, on POST",
            Request::post(&other_user, body("okta", "r", "n")),
            403,
            Some("FORBIDDEN"),
        ),
        (
            "wrong method",
            Request::new("PATCH", list_target("u-1", ""), &admin),
            405,
            Some("METHOD_NOT_ALLOWED"),
        ),
        (
            "unknown path",
            get(b"/api/admin/users/v5/users".to_vec(), &admin),
            404,
            Some("NOT_FOUND"),
        ),
    ];

    let mut failures = Vec::new();
    for (name, request, status, code) in &cases {
        let got = raw(&app, request.bytes()).await;
        if got != (*status, code.map(str::to_owned)) {
            failures.push(format!("{name}: expected {status} {code:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 40);

    let listed: Value = app.list(&admin, "hostile", "").await.json().await.unwrap();
    assert_eq!(
        listed["linked_identities"],
        serde_json::json!([]),
        "no bad request stored anything"
    );
    let sneaky = "x'); DROP TABLE linked_identities; --";
    assert_eq!(
        app.link(&admin, "hostile", &link_body("okta", sneaky, "n"))
            .await
            .status(),
        201
    );
    let listed: Value = app.list(&admin, "hostile", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"][0]["linked_user_id"], sneaky);
    eprintln!(
        "hostile input: {} bad requests, all answered as expected; the server still serves",
        cases.len()
    );
}
