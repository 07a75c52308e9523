use serde_json::{json, Value};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::helpers::{assert_problem, error_fields, link_body, spawn_app, spawn_app_with, PREFIX};

#[tokio::test]
async fn a_new_link_is_201_with_the_identity_and_a_location() {
    let app = spawn_app().await;

    let response = app
        .link(
            &app.admin,
            "u-1",
            &link_body("okta", "00u1", "ada@example.com"),
        )
        .await;

    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"],
        format!("{PREFIX}/users/u-1/linked-identities/okta").as_str()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["provider_id"], "okta");
    assert_eq!(body["linked_user_id"], "00u1");
    assert_eq!(body["linked_username"], "ada@example.com");
    assert_eq!(body["created_at"], body["updated_at"]);
    assert!(body.get("actions").is_none());
}

#[tokio::test]
async fn the_location_percent_encodes_the_user_id() {
    let app = spawn_app().await;

    let response = app.link_as_admin("ada%2Fl", "okta", "r1").await;

    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"],
        format!("{PREFIX}/users/ada%2Fl/linked-identities/okta").as_str()
    );
    let body: Value = app
        .list(&app.admin, "ada%2Fl", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["linked_identities"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_link_again_is_200_and_changes_nothing() {
    let app = spawn_app().await;
    let first: Value = app
        .link_as_admin("u-1", "okta", "00u1")
        .await
        .json()
        .await
        .unwrap();

    let again = app.link_as_admin("u-1", "okta", "00u1").await;

    assert_eq!(again.status(), 200);
    assert!(again.headers().get("location").is_none());
    let body: Value = again.json().await.unwrap();
    assert_eq!(body, first);
}

#[tokio::test]
async fn the_same_link_with_a_new_username_updates_the_username() {
    let app = spawn_app().await;
    app.link(
        &app.admin,
        "u-1",
        &link_body("okta", "00u1", "old@example.com"),
    )
    .await;

    let response = app
        .link(
            &app.admin,
            "u-1",
            &link_body("okta", "00u1", "new@example.com"),
        )
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["linked_username"], "new@example.com");
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(
        listed["linked_identities"][0]["linked_username"],
        "new@example.com"
    );
}

#[tokio::test]
async fn linking_a_second_provider_is_user_already_linked() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-1", "azure-ad", "aad-1").await;

    assert_problem(response, 400, "USER_ALREADY_LINKED").await;
    let listed: Value = app.list(&app.admin, "u-1", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn linking_another_remote_account_at_the_same_provider_is_user_already_linked() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-1", "okta", "00u2").await;

    assert_problem(response, 400, "USER_ALREADY_LINKED").await;
}

#[tokio::test]
async fn a_remote_identity_held_by_another_user_is_409() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "00u1").await;

    let response = app.link_as_admin("u-2", "okta", "00u1").await;

    assert_problem(response, 409, "IDENTITY_ALREADY_LINKED").await;
    let listed: Value = app.list(&app.admin, "u-2", "").await.json().await.unwrap();
    assert_eq!(listed["linked_identities"], json!([]));
}

#[tokio::test]
async fn the_same_remote_id_at_another_provider_is_a_different_identity() {
    let app = spawn_app().await;
    app.link_as_admin("u-1", "okta", "shared-id").await;

    let response = app.link_as_admin("u-2", "azure-ad", "shared-id").await;

    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn an_unknown_provider_is_invalid_identity_provider() {
    let app = spawn_app().await;
    for provider in ["github", "", "OKTA"] {
        let response = app.link_as_admin("u-1", provider, "r1").await;
        assert_problem(response, 400, "INVALID_IDENTITY_PROVIDER").await;
    }
}

#[tokio::test]
async fn a_provider_that_is_not_linkable_is_invalid_identity_provider() {
    let app = spawn_app().await;

    let response = app.link_as_admin("u-1", "legacy-ldap-bridge", "r1").await;

    assert_problem(response, 400, "INVALID_IDENTITY_PROVIDER").await;
}

#[tokio::test]
async fn embed_actions_on_link_adds_delete_to_the_identity() {
    let app = spawn_app().await;

    let response = app
        .client
        .post(app.api("/users/u-1/linked-identities?embed=ACTIONS"))
        .bearer_auth(&app.admin)
        .json(&link_body("okta", "00u1", "ada"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["actions"], json!(["DELETE"]));
}

#[tokio::test]
async fn concurrent_links_of_one_remote_identity_have_exactly_one_winner() {
    let app = spawn_app().await;
    let app = std::sync::Arc::new(app);

    let attempts = (0..32).map(|i| {
        let app = app.clone();
        tokio::spawn(async move {
            app.link_as_admin(&format!("u-{i}"), "okta", "contested")
                .await
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }

    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        31,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn one_commit_per_request_gives_the_same_outcomes() {
    let app = spawn_app_with(|config| config.database.max_batch = 1).await;

    assert_eq!(app.link_as_admin("u-1", "okta", "00u1").await.status(), 201);
    assert_eq!(app.link_as_admin("u-1", "okta", "00u1").await.status(), 200);
    assert_problem(
        app.link_as_admin("u-2", "okta", "00u1").await,
        409,
        "IDENTITY_ALREADY_LINKED",
    )
    .await;
    assert_problem(
        app.link_as_admin("u-1", "azure-ad", "x").await,
        400,
        "USER_ALREADY_LINKED",
    )
    .await;
}

#[tokio::test]
async fn bidirectional_formatting_characters_are_refused_like_control_characters() {
    let app = spawn_app().await;

    for spoof in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
        let body = link_body(
            "okta",
            &format!("r{spoof}1"),
            &format!("admin{spoof}@example.com"),
        );
        let problem = assert_problem(
            app.link(&app.admin, "u-1", &body).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(
            error_fields(&problem),
            ["linked_user_id", "linked_username"],
            "{spoof:?}"
        );
        let user = utf8_percent_encode(&format!("u{spoof}1"), NON_ALPHANUMERIC).to_string();
        let problem = assert_problem(
            app.list(&app.admin, &user, "").await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), ["user_id"]);
    }
    let listed: serde_json::Value = app
        .client
        .get(app.api("/linked-identities"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["linked_identities"],
        serde_json::json!([]),
        "nothing was stored"
    );
}

/// `text` as a path segment, every byte but letters and digits escaped.
fn segment(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn invisible_and_format_characters_are_refused_in_ids_and_usernames() {
    let app = spawn_app().await;
    let look_alikes = [
        '\u{200B}',  // zero width space
        '\u{200E}',  // left-to-right mark
        '\u{200F}',  // right-to-left mark
        '\u{061C}',  // Arabic letter mark
        '\u{2028}',  // line separator
        '\u{E0041}', // tag Latin capital letter A
        '\u{FE0F}',  // variation selector 16
        '\u{00AD}',  // soft hyphen
        '\u{3164}',  // Hangul filler
    ];

    for hidden in look_alikes {
        let body = link_body(
            "okta",
            &format!("00u{hidden}1"),
            &format!("ada{hidden}@example.com"),
        );
        let problem = assert_problem(
            app.link(&app.admin, "u-1", &body).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(
            error_fields(&problem),
            ["linked_user_id", "linked_username"],
            "{hidden:?}"
        );
        let code_point = format!("U+{:04X}", u32::from(hidden));
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(&code_point),
            "{problem}"
        );
        let problem = assert_problem(
            app.list(&app.admin, &segment(&format!("ada{hidden}")), "")
                .await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), ["user_id"], "{hidden:?}");
        let lookup = app
            .client
            .get(app.api(&format!(
                "/linked-identities?provider_id=okta&linked_user_id={}",
                segment(&format!("00u{hidden}1"))
            )))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(lookup, 400, "VALIDATION_FAILED").await;
        assert_eq!(error_fields(&problem), ["linked_user_id"], "{hidden:?}");
    }
    let listed: Value = app
        .client
        .get(app.api("/linked-identities"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["linked_identities"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn an_id_typed_composed_or_decomposed_is_one_user_and_one_remote_identity() {
    let app = spawn_app().await;
    let (composed, decomposed) = ("jos\u{E9}", "jose\u{301}");

    let created = app
        .link(
            &app.admin,
            &segment(decomposed),
            &link_body(
                "okta",
                &format!("CN={decomposed}"),
                &format!("{decomposed}@example.com"),
            ),
        )
        .await;
    let again = app
        .link(
            &app.admin,
            &segment(composed),
            &link_body(
                "okta",
                &format!("CN={composed}"),
                &format!("{composed}@example.com"),
            ),
        )
        .await;
    let taken = app
        .link(
            &app.admin,
            "u-2",
            &link_body("okta", &format!("CN={decomposed}"), "other@example.com"),
        )
        .await;

    assert_eq!(created.status(), 201);
    assert_eq!(
        created.headers()["location"],
        format!("{PREFIX}/users/jos%C3%A9/linked-identities/okta").as_str(),
        "stored and answered in NFC"
    );
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["linked_user_id"], format!("CN={composed}"));
    assert_eq!(body["linked_username"], format!("{composed}@example.com"));
    assert_eq!(again.status(), 200, "the same user and the same link");
    assert_problem(taken, 409, "IDENTITY_ALREADY_LINKED").await;
    let listed: Value = app
        .list(&app.admin, &segment(decomposed), "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["linked_identities"].as_array().unwrap().len(), 1);
    let found: Value = app
        .client
        .get(app.api(&format!(
            "/linked-identities?provider_id=okta&linked_user_id={}",
            segment(&format!("CN={decomposed}"))
        )))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["linked_identities"][0]["user_id"], composed);
}

/// A config with `case_insensitive_ids` on at `provider`.
fn ignoring_case_at(provider: &'static str) -> impl FnOnce(&mut linkid::config::Config) {
    move |config| {
        config
            .identity_providers
            .iter_mut()
            .find(|p| p.id == provider)
            .unwrap()
            .case_insensitive_ids = true;
    }
}

#[tokio::test]
async fn at_a_case_insensitive_provider_ids_that_differ_in_case_are_one_remote_identity() {
    let app = spawn_app_with(ignoring_case_at("azure-ad")).await;
    let created = app.link_as_admin("u-1", "azure-ad", "00uABC").await;
    assert_eq!(created.status(), 201);

    let other_user = app.link_as_admin("u-2", "azure-ad", "00uabc").await;
    let retry = app.link_as_admin("u-1", "azure-ad", "00UABC").await;
    let lookup = app
        .client
        .get(app.api("/linked-identities?provider_id=azure-ad&linked_user_id=00UaBc"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();

    let problem = assert_problem(other_user, 409, "IDENTITY_ALREADY_LINKED").await;
    assert!(
        !problem["detail"].as_str().unwrap().contains("00uABC"),
        "the answer names the id as asked, not as stored: {problem}"
    );
    assert_eq!(
        retry.status(),
        200,
        "the same remote identity: the existing link"
    );
    let retried: Value = retry.json().await.unwrap();
    assert_eq!(retried["linked_user_id"], "00uABC", "stored as first given");
    let found: Value = lookup.json().await.unwrap();
    assert_eq!(found["linked_identities"][0]["user_id"], "u-1");
    assert_eq!(found["linked_identities"][0]["linked_user_id"], "00uABC");
    // Elsewhere case still matters.
    assert_eq!(
        app.link_as_admin("u-3", "okta", "00uABC").await.status(),
        201
    );
    assert_eq!(
        app.link_as_admin("u-4", "okta", "00uabc").await.status(),
        201
    );
}

/// The reverse lookup's answer for a remote identity.
async fn lookup(app: &crate::helpers::TestApp, provider: &str, remote: &str) -> Value {
    app.client
        .get(app.api(&format!(
            "/linked-identities?provider_id={provider}&linked_user_id={}",
            segment(remote)
        )))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn turning_case_insensitive_ids_on_recomputes_the_keys_at_the_next_start() {
    let app = spawn_app().await;
    assert_eq!(
        app.link_as_admin("u-1", "azure-ad", "AAD-Guid-ABC")
            .await
            .status(),
        201
    );
    // A lookup in another case misses (and the miss may be cached).
    let before = lookup(&app, "azure-ad", "aad-guid-abc").await;
    assert_eq!(before["linked_identities"], json!([]));

    let app = app.restart_with(ignoring_case_at("azure-ad")).await;

    let after = lookup(&app, "azure-ad", "aad-guid-abc").await;
    assert_eq!(after["linked_identities"][0]["user_id"], "u-1");
    assert_problem(
        app.link_as_admin("u-2", "azure-ad", "aad-guid-abc").await,
        409,
        "IDENTITY_ALREADY_LINKED",
    )
    .await;
    // And off again: exact ids.
    let app = app.restart_with(|_| {}).await;
    let off = lookup(&app, "azure-ad", "aad-guid-abc").await;
    assert_eq!(off["linked_identities"], json!([]));
    assert_eq!(
        app.link_as_admin("u-2", "azure-ad", "aad-guid-abc")
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn turning_case_insensitive_ids_on_where_two_links_would_collide_is_refused_naming_them() {
    let app = spawn_app().await;
    assert_eq!(
        app.link_as_admin("u-1", "okta", "00uABC").await.status(),
        201
    );
    assert_eq!(
        app.link_as_admin("u-2", "okta", "00uabc").await.status(),
        201
    );
    let mut config = app.config.clone();
    ignoring_case_at("okta")(&mut config);

    let refused = linkid::store::Store::open(&config.database, &config.id_rules())
        .await
        .err()
        .expect("the store refuses to open")
        .to_string();

    for named in [
        "okta",
        "u-1",
        "u-2",
        "00uABC",
        "00uabc",
        "case_insensitive_ids",
    ] {
        assert!(refused.contains(named), "{named} in {refused}");
    }
    // Nothing changed: the two links are still two.
    for (user, remote) in [("u-1", "00uABC"), ("u-2", "00uabc")] {
        let found = lookup(&app, "okta", remote).await;
        assert_eq!(found["linked_identities"][0]["user_id"], user);
    }
}

#[tokio::test]
async fn a_location_resolves_to_the_link_whatever_the_user_id() {
    let app = spawn_app().await;
    for (user, encoded) in [
        ("..", "%2E%2E"),
        (".", "%2E"),
        (r"a\b", "a%5Cb"),
        ("a b", "a%20b"),
        ("ü", "%C3%BC"),
        ("a+b@c", "a%2Bb%40c"),
    ] {
        // Sent as bytes: clients that follow WHATWG's URL rules (reqwest,
        // browsers) take `%2E%2E` for a dot segment too, where RFC 3986's
        // resolution does not.
        let body = link_body("okta", &format!("r-{encoded}"), "n").to_string();
        let (status, headers, _) = raw(
            &app,
            "POST",
            &format!("{PREFIX}/users/{encoded}/linked-identities"),
            &body,
        )
        .await;
        assert_eq!(status, 201, "{user}");
        let location = headers
            .lines()
            .find_map(|h| h.strip_prefix("location: "))
            .unwrap_or_else(|| panic!("a location in {headers}"))
            .to_owned();
        assert_eq!(
            location,
            format!("{PREFIX}/users/{encoded}/linked-identities/okta"),
            "{user}"
        );

        let (status, _, body) = raw(&app, "GET", &location, "").await;

        assert_eq!(status, 200, "{user}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["linked_user_id"], format!("r-{encoded}"), "{user}");
    }
}

/// Sends `method target` as the bytes given, with the admin token and a
/// JSON body; returns the status, the header lines and the body.
async fn raw(
    app: &crate::helpers::TestApp,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        app.admin,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.replace("\r\n", "\n"), body.to_owned())
}

#[tokio::test]
async fn conflict_answers_name_only_what_the_token_could_read() {
    let app = spawn_app().await;
    assert_eq!(
        app.link_as_admin("victim", "azure-ad", "aad-1")
            .await
            .status(),
        201
    );
    let okta_only =
        crate::helpers::attenuate(&app.admin, &app.keypair, r#"check if provider("okta");"#);
    let may_read_azure = app.mint(linkid::auth::MintRequest {
        rights: vec![
            linkid::auth::Right::LinkedIdentitiesCreate,
            linkid::auth::Right::LinkedIdentitiesList,
        ],
        ..Default::default()
    });

    let hidden = assert_problem(
        app.link(&okta_only, "victim", &link_body("okta", "00u1", "n"))
            .await,
        400,
        "USER_ALREADY_LINKED",
    )
    .await;
    let named = assert_problem(
        app.link(&may_read_azure, "victim", &link_body("okta", "00u1", "n"))
            .await,
        400,
        "USER_ALREADY_LINKED",
    )
    .await;

    assert!(
        !hidden.to_string().contains("azure"),
        "an okta-only token learns nothing of azure-ad: {hidden}"
    );
    assert!(
        hidden["detail"].as_str().unwrap().contains("victim"),
        "{hidden}"
    );
    assert!(
        named["detail"].as_str().unwrap().contains("azure-ad"),
        "{named}"
    );

    // The remote identity's owner stays unnamed too.
    assert_eq!(
        app.link_as_admin("owner", "okta", "00u7").await.status(),
        201
    );
    let attacker =
        crate::helpers::attenuate(&okta_only, &app.keypair, r#"check if user("attacker");"#);
    let taken = assert_problem(
        app.link(&attacker, "attacker", &link_body("okta", "00u7", "n"))
            .await,
        409,
        "IDENTITY_ALREADY_LINKED",
    )
    .await;
    let text = taken.to_string();
    assert!(
        !text.contains("owner") && !text.contains("00u7@example.com"),
        "{text}"
    );
}
