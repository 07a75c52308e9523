//! Tokens crafted to hurt the server: heavy datalog, oversized tokens,
//! floods of distinct attenuations. Each request is bounded in time, the
//! token cache in bytes, and `/healthz` keeps answering meanwhile.

use std::time::{Duration, Instant, SystemTime};

use biscuit_auth::builder_ext::BuilderExt;
use biscuit_auth::{Biscuit, BlockBuilder, KeyPair};
use linkid::auth::{MintRequest, Right};
use serde_json::Value;

use crate::helpers::{assert_problem, attenuate, spawn_app, spawn_app_with, TestApp};

/// `facts` facts and one rule joining `width` of them: facts^width candidate
/// matches, each tested by an arithmetic condition that never holds.
fn join_block(facts: usize, width: usize) -> String {
    let facts: String = (0..facts).map(|i| format!("f({i});")).collect();
    let body: Vec<String> = (0..width).map(|v| format!("f($v{v})")).collect();
    let sum: Vec<String> = (0..width).map(|v| format!("$v{v}")).collect();
    format!(
        "{facts}\ng($v0) <- {}, {} == 1000;",
        body.join(", "),
        sum.join(" + ")
    )
}

/// 30 facts and a rule joining five of them: 24 million matches.
fn heavy_block() -> String {
    join_block(30, 5)
}

/// A token for one user that may read and write that user's links, as
/// `linkid token mint --right ... --user u-42` makes it.
fn user_token(app: &TestApp) -> String {
    app.mint(MintRequest {
        rights: Right::ALL.to_vec(),
        user: Some("u-42".into()),
        ..Default::default()
    })
}

/// The same user-scoped token, expired a minute ago.
fn expired_user_token(app: &TestApp) -> String {
    Biscuit::builder()
        .code(
            r#"right("linked_identities:list");
               check if user("u-42") or operation("identity_providers:list");"#,
        )
        .unwrap()
        .check_expiration_date(SystemTime::now() - Duration::from_secs(60))
        .build(&app.keypair)
        .unwrap()
        .to_base64()
        .unwrap()
}

/// A block holding one string fact of `len` characters, distinct each call.
fn padding_block(len: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nonce = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("note(\"{nonce}-{}\");", "x".repeat(len))
}

/// `count` distinct attenuations of a token, each with one padding block
/// of `len` characters (the token is parsed once, not once per copy).
fn padded_copies(app: &TestApp, token: &str, count: usize, len: usize) -> Vec<String> {
    let token = Biscuit::from_base64(token, app.keypair.public()).unwrap();
    (0..count)
        .map(|_| {
            let block = BlockBuilder::new().code(padding_block(len)).unwrap();
            token.append(block).unwrap().to_base64().unwrap()
        })
        .collect()
}

/// The value of one unlabelled metric on `/metrics`.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} is not on /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn detail_of(response: reqwest::Response) -> String {
    let body: Value = assert_problem(response, 401, "INVALID_TOKEN").await;
    body["detail"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_heavy_rule_is_answered_within_two_seconds() {
    let app = spawn_app().await;
    let token = attenuate(&user_token(&app), &app.keypair, &heavy_block());

    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), app.list(&token, "u-42", ""))
        .await
        .expect("the heavy token is answered, not run for 30 s");
    let elapsed = started.elapsed();

    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let detail = detail_of(response).await;
    assert!(detail.contains("too complex"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_with_a_heavy_rule_is_401_expired_at_once() {
    let app = spawn_app().await;
    let token = attenuate(&expired_user_token(&app), &app.keypair, &heavy_block());

    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), app.list(&token, "u-42", ""))
        .await
        .expect("the expired token is answered, not run for 15 s");
    let elapsed = started.elapsed();

    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let detail = detail_of(response).await;
    assert!(detail.contains("expired"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_within_a_second_while_four_attackers_send_heavy_tokens() {
    let app = std::sync::Arc::new(spawn_app().await);
    let base = user_token(&app);
    // Joins under the work budget, which really run, and far over it,
    // which are refused unrun.
    let blocks: Vec<String> = [(30, 2), (40, 2), (30, 3), (30, 5)]
        .into_iter()
        .map(|(facts, width)| join_block(facts, width))
        .collect();
    let tokens: Vec<String> = blocks
        .iter()
        .map(|block| attenuate(&base, &app.keypair, block))
        .collect();
    let attack_until = Instant::now() + Duration::from_secs(3);

    let attackers: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut n = i;
                while Instant::now() < attack_until {
                    let token = &tokens[n % tokens.len()];
                    let _ = app.list(token, "u-42", "").await;
                    n += 1;
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while Instant::now() < attack_until {
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            app.client.get(app.url("/healthz")).send(),
        )
        .await
        .expect("/healthz answers while the attack runs")
        .unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for attacker in attackers {
        tokio::time::timeout(Duration::from_secs(10), attacker)
            .await
            .expect("every attacker's request is answered")
            .unwrap();
    }

    assert!(
        slowest < Duration::from_secs(1),
        "slowest /healthz took {slowest:?}"
    );
}

#[tokio::test]
async fn a_token_over_each_cap_is_401_naming_the_cap() {
    let app = spawn_app().await;
    let base = user_token(&app);
    let many_blocks = (0..20)
        .fold(
            Biscuit::from_base64(&base, app.keypair.public()).unwrap(),
            |token, _| {
                token
                    .append(BlockBuilder::new().check("check if true").unwrap())
                    .unwrap()
            },
        )
        .to_base64()
        .unwrap();
    let many_facts: String = (0..300).map(|i| format!("f({i});")).collect();
    let many_rules: String = (0..200)
        .map(|i| format!("check if true or f({i});"))
        .collect();
    let cases = [
        (
            padded_copies(&app, &base, 1, 20_000).remove(0),
            "auth.max_token_bytes",
        ),
        (many_blocks, "auth.max_blocks"),
        (
            attenuate(&base, &app.keypair, &many_facts),
            "auth.max_facts",
        ),
        (
            attenuate(&base, &app.keypair, &many_rules),
            "auth.max_rules",
        ),
    ];

    for (token, cap) in cases {
        let detail = detail_of(app.list(&token, "u-42", "").await).await;
        assert!(detail.contains(cap), "{cap}: {detail}");
    }
}

#[tokio::test]
async fn a_minted_token_with_honest_attenuations_and_a_third_party_block_still_works() {
    let app = spawn_app().await;
    let minted = app.mint(MintRequest {
        rights: Right::ALL.to_vec(),
        user: Some("u-42".into()),
        ttl: Some(Duration::from_secs(3600)),
        ..Default::default()
    });
    let narrowed = attenuate(
        &minted,
        &app.keypair,
        r#"check if user("u-42");
           check if operation($op), ["linked_identities:list", "identity_providers:list"].contains($op);"#,
    );
    let dated = attenuate(
        &narrowed,
        &app.keypair,
        r#"check if time($t), $t < 2999-01-01T00:00:00Z;
           check if user($u), $u.starts_with("u-");"#,
    );
    let issuer = KeyPair::new();
    let token = Biscuit::from_base64(&dated, app.keypair.public()).unwrap();
    let third_party = token
        .third_party_request()
        .unwrap()
        .create_block(
            &issuer.private(),
            BlockBuilder::new()
                .code(
                    r#"group("support"); group("tier-2"); department("identity");
                       check if time($t), $t < 2999-01-01T00:00:00Z;"#,
                )
                .unwrap(),
        )
        .unwrap();
    let token = token
        .append_third_party(issuer.public(), third_party)
        .unwrap()
        .to_base64()
        .unwrap();

    let response = app.list(&token, "u-42", "?embed=ACTIONS").await;

    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

#[tokio::test]
async fn distinct_large_tokens_answered_403_never_enter_the_token_cache() {
    let app = spawn_app().await;
    let base = user_token(&app);

    for token in padded_copies(&app, &base, 25, 10_000) {
        // The token is for u-42 only.
        assert_problem(app.list(&token, "u-7", "").await, 403, "FORBIDDEN").await;
    }

    assert_eq!(metric(&app, "linkid_token_cache_entries").await, 0.0);
    assert_eq!(metric(&app, "linkid_token_cache_bytes").await, 0.0);
}

#[tokio::test]
async fn allowed_tokens_are_cached_up_to_the_byte_bound() {
    let bound = 1024 * 1024;
    let app = spawn_app_with(|config| config.auth.token_cache_bytes = bound).await;
    let base = user_token(&app);

    // About 14 KB each as text, 45 KB parsed: 40 of them are over the bound.
    for token in padded_copies(&app, &base, 40, 10_000) {
        assert_eq!(app.list(&token, "u-42", "").await.status(), 200);
    }

    let entries = metric(&app, "linkid_token_cache_entries").await;
    let bytes = metric(&app, "linkid_token_cache_bytes").await;
    assert!((5.0..40.0).contains(&entries), "{entries} entries");
    assert!(bytes <= bound as f64, "{bytes} bytes");
    assert!(
        bytes > bound as f64 / 2.0,
        "{bytes} bytes: the cache filled up"
    );
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

    // Fresh attenuations, one after another, until one is refused: with a
    // burst of 3 and 1 a second, at most 3 + one per second spent pass.
    let started = std::time::Instant::now();
    let mut passed = 0;
    let refused = loop {
        let fresh = attenuate(&root, &app.keypair, "check if true;");
        let answer = app.list(&fresh, "u-42", "").await;
        if answer.status() != 200 || passed == 30 {
            break answer;
        }
        passed += 1;
    };
    let unaffected = app.list(&other_root, "u-42", "").await;

    assert_problem(refused, 429, "RATE_LIMITED").await;
    let allowed = 3 + started.elapsed().as_secs() + 1;
    assert!(
        passed >= 3 && passed <= allowed,
        "{passed} passed, at most {allowed}"
    );
    assert_eq!(unaffected.status(), 200);
}
