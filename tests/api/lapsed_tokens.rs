//! Streams and long polls live longer than one request: their token is
//! checked again while they live, so one that expires or is revoked stops
//! receiving changes within about a second and frees its stream slot.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use linkid::auth::{revocation_ids, MintRequest};
use linkid::store::Store;

use crate::helpers::{assert_problem, spawn_app_with, TestApp};

fn short_lived(app: &TestApp, ttl: Duration) -> String {
    app.mint(MintRequest {
        admin: true,
        ttl: Some(ttl),
        ..Default::default()
    })
}

/// The latest instant from which a token minted just before with this ttl
/// is expired: its time check compares whole seconds, so it holds through
/// the second its expiry falls in.
fn expired_by(ttl: Duration) -> Instant {
    let now = SystemTime::now();
    let expiry = (now + ttl).duration_since(UNIX_EPOCH).unwrap().as_secs();
    let invalid = UNIX_EPOCH + Duration::from_secs(expiry + 1);
    Instant::now() + invalid.duration_since(now).unwrap()
}

async fn open_stream(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(app.api("/linked-identities/events"))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

/// Reads a stream until it ends (or `limit` passes): its text, and when
/// it ended (`None`: it did not).
async fn read_to_end(response: reqwest::Response, limit: Duration) -> (String, Option<Instant>) {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Some(Err(_)) | None) => return (text, Some(Instant::now())),
            Err(_) => return (text, None),
        }
    }
}

async fn revoke(app: &TestApp, token: &str) -> Instant {
    let ids = revocation_ids(app.keypair.public(), token).unwrap();
    let store = Store::open(&app.config.database, &app.config.id_rules())
        .await
        .unwrap();
    store
        .revoke(vec![ids.last().unwrap().clone()])
        .await
        .unwrap();
    store.close().await;
    Instant::now()
}

#[tokio::test]
async fn a_stream_ends_soon_after_its_token_expires_and_carries_no_later_change() {
    let app = Arc::new(spawn_app_with(|c| c.events.heartbeat_secs = 60).await);
    let token = short_lived(&app, Duration::from_secs(3));
    let expires = expired_by(Duration::from_secs(3));
    let stream = open_stream(&app, &token).await;
    assert_eq!(stream.status(), 200);
    let reader = tokio::spawn(read_to_end(stream, Duration::from_secs(10)));

    app.link_as_admin("before-expiry", "okta", "r-1").await;
    tokio::time::sleep_until((expires + Duration::from_millis(200)).into()).await;
    app.link_as_admin("after-expiry", "okta", "r-2").await;
    let (text, ended) = reader.await.unwrap();

    let ended = ended.expect("the stream ended");
    let cut_off = ended.saturating_duration_since(expires);
    eprintln!("stream cut off {cut_off:?} after its token expired");
    assert!(cut_off < Duration::from_millis(2500), "{cut_off:?}");
    assert!(text.contains("before-expiry"), "{text}");
    assert!(!text.contains("after-expiry"), "{text}");
    assert!(
        text.contains(":closed: the bearer token is expired"),
        "{text}"
    );
}

#[tokio::test]
async fn a_stream_ends_within_a_second_of_its_token_being_revoked() {
    let app = Arc::new(spawn_app_with(|c| c.events.heartbeat_secs = 60).await);
    let token = short_lived(&app, Duration::from_secs(3600));
    let stream = open_stream(&app, &token).await;
    assert_eq!(stream.status(), 200);
    let reader = tokio::spawn(read_to_end(stream, Duration::from_secs(10)));
    app.link_as_admin("before-revocation", "okta", "r-1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let revoked = revoke(&app, &token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.link_as_admin("after-revocation", "okta", "r-2").await;
    let (text, ended) = reader.await.unwrap();

    let cut_off = ended
        .expect("the stream ended")
        .saturating_duration_since(revoked);
    eprintln!("stream cut off {cut_off:?} after its token was revoked");
    assert!(cut_off < Duration::from_millis(1250), "{cut_off:?}");
    assert!(text.contains("before-revocation"), "{text}");
    assert!(!text.contains("after-revocation"), "{text}");
    assert!(
        text.contains(":closed: the bearer token is revoked"),
        "{text}"
    );
}

#[tokio::test]
async fn a_long_poll_whose_token_is_revoked_while_it_waits_does_not_answer_the_change() {
    let app = Arc::new(spawn_app_with(|_| {}).await);
    let token = short_lived(&app, Duration::from_secs(3600));
    let poll = {
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move {
            app.client
                .get(app.api("/linked-identities/events?after=0&wait=10"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let revoked = revoke(&app, &token).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.link_as_admin("secret-user", "okta", "secret-remote")
        .await;
    let answer = poll.await.unwrap();

    eprintln!(
        "long poll answered {} {:?} after its token was revoked",
        answer.status(),
        revoked.elapsed()
    );
    let problem = assert_problem(answer, 401, "INVALID_TOKEN").await;
    assert!(!problem.to_string().contains("secret"), "{problem}");
}

#[tokio::test]
async fn a_long_poll_answers_401_when_its_token_expires_while_it_waits() {
    let app = spawn_app_with(|_| {}).await;
    let token = short_lived(&app, Duration::from_secs(2));
    let started = Instant::now();

    let answer = app
        .client
        .get(app.api("/linked-identities/events?after=0&wait=30"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_problem(answer, 401, "INVALID_TOKEN").await;
}

#[tokio::test]
async fn streams_whose_tokens_expired_free_their_slots_for_others() {
    let app = spawn_app_with(|c| {
        c.events.max_streams = 4;
        c.events.heartbeat_secs = 60;
    })
    .await;
    let token = short_lived(&app, Duration::from_secs(2));
    let mut held = Vec::new();
    for _ in 0..4 {
        let stream = open_stream(&app, &token).await;
        assert_eq!(stream.status(), 200);
        held.push(stream);
    }
    assert_problem(open_stream(&app, &app.admin).await, 503, "TOO_MANY_STREAMS").await;

    let expires = expired_by(Duration::from_secs(2));
    tokio::time::sleep_until((expires + Duration::from_millis(1500)).into()).await;

    let admin = open_stream(&app, &app.admin).await;
    assert_eq!(
        admin.status(),
        200,
        "the expired streams (still connected: {}) gave their slots back",
        held.len()
    );
}
