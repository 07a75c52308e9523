//! The change feed: every change recorded with its actor in the change's own
//! transaction; a consumer that keeps asking `after=next_after` sees each
//! exactly once, in commit order; long polls, server-sent events, retention
//! and bounded streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use linkid::auth::{revocation_ids, MintRequest, Right};
use serde_json::{json, Value};

use crate::helpers::{
    assert_problem, attenuate, error_fields, link_body, spawn_app, spawn_app_with, TestApp,
};

async fn feed(app: &TestApp, token: &str, query: &str) -> reqwest::Response {
    app.client
        .get(app.api(&format!("/linked-identities/events{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn events(app: &TestApp, query: &str) -> Value {
    let response = feed(app, &app.admin, query).await;
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.unwrap()
}

/// Every event from the start, in pages.
async fn all_events(app: &TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = events(app, &format!("?after={after}&limit=1000")).await;
        let batch = page["events"].as_array().unwrap().clone();
        after = page["next_after"].as_i64().unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

async fn link_with_id(app: &TestApp, token: &str, user: &str, body: &Value, id: &str) -> u16 {
    app.client
        .post(app.api(&format!("/users/{user}/linked-identities")))
        .bearer_auth(token)
        .header("x-request-id", id)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn every_change_is_recorded_with_its_actor_subject_and_request_id() {
    let app = spawn_app().await;
    let token = app.mint(MintRequest {
        admin: true,
        subject: Some("provisioning-bot".into()),
        ..Default::default()
    });
    let log_id: String = revocation_ids(app.keypair.public(), &token)
        .unwrap()
        .last()
        .unwrap()[..16]
        .to_owned();
    let lister = app.token_with_rights(&[Right::LinkedIdentitiesList]);
    app.link_as_admin("other", "okta", "taken").await;
    let before = all_events(&app).await.len();

    assert_eq!(
        link_with_id(
            &app,
            &token,
            "u-1",
            &link_body("okta", "r-1", "ada"),
            "req-link"
        )
        .await,
        201
    );
    assert_eq!(
        link_with_id(
            &app,
            &token,
            "u-1",
            &link_body("okta", "r-1", "ada"),
            "req-same"
        )
        .await,
        200
    );
    assert_eq!(
        link_with_id(
            &app,
            &token,
            "u-1",
            &link_body("okta", "r-1", "ada.l"),
            "req-rename"
        )
        .await,
        200
    );
    assert_eq!(
        link_with_id(
            &app,
            &token,
            "u-1",
            &link_body("azure-ad", "r-2", "x"),
            "req-second"
        )
        .await,
        400
    );
    assert_eq!(
        link_with_id(
            &app,
            &token,
            "u-2",
            &link_body("okta", "taken", "x"),
            "req-taken"
        )
        .await,
        409
    );
    assert_eq!(
        link_with_id(
            &app,
            &lister,
            "u-3",
            &link_body("okta", "r-3", "x"),
            "req-403"
        )
        .await,
        403
    );
    assert_eq!(app.delete(&token, "u-9", "okta").await.status(), 404);
    let deleted = app
        .client
        .delete(app.api("/users/u-1/linked-identities/okta"))
        .bearer_auth(&token)
        .header("x-request-id", "req-unlink")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);

    let recorded: Vec<Value> = all_events(&app).await.split_off(before);
    let summary: Vec<(&str, &str, &str)> = recorded
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["linked_username"].as_str().unwrap(),
                e["request_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("LINKED", "ada", "req-link"),
            ("UPDATED", "ada.l", "req-rename"),
            ("UNLINKED", "ada.l", "req-unlink")
        ],
        "an identical retry and refused requests record nothing"
    );
    for event in &recorded {
        assert_eq!(event["actor"], log_id.as_str());
        assert_eq!(event["subject"], "provisioning-bot");
        assert_eq!(event["user_id"], "u-1");
        assert_eq!(event["provider_id"], "okta");
        assert_eq!(event["linked_user_id"], "r-1");
        assert!(event["occurred_at"].as_str().unwrap().ends_with('Z'));
    }
    let seqs: Vec<i64> = recorded
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let anonymous = all_events(&app).await;
    assert_eq!(
        anonymous[0]["subject"],
        Value::Null,
        "a token without a subject"
    );
}

#[tokio::test]
async fn a_tailing_consumer_sees_every_change_once_in_order_during_32_writers() {
    let app = Arc::new(spawn_app().await);
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let app = app.clone();
            tokio::spawn(async move {
                for i in 0..12 {
                    let user = format!("w{w}-u{}", i % 4);
                    match i % 3 {
                        0 => app.link_as_admin(&user, "okta", &format!("r-{user}")).await,
                        1 => {
                            app.link(
                                &app.admin,
                                &user,
                                &link_body("okta", &format!("r-{user}"), &format!("renamed-{i}")),
                            )
                            .await
                        }
                        _ => app.delete(&app.admin, &user, "okta").await,
                    };
                }
            })
        })
        .collect();
    let consumer = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            let mut quiet = 0;
            while quiet < 3 {
                let page = events(&app, &format!("?after={after}&limit=5&wait=1")).await;
                let batch = page["events"].as_array().unwrap().clone();
                after = page["next_after"].as_i64().unwrap();
                quiet = if batch.is_empty() { quiet + 1 } else { 0 };
                seen.extend(batch);
            }
            seen
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }

    let seen = consumer.await.unwrap();
    let full = all_events(&app).await;
    assert_eq!(seen.len(), full.len());
    assert_eq!(seen, full, "the tail equals a full read, in order");
    let mut rebuilt: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for event in &seen {
        let user = event["user_id"].as_str().unwrap().to_owned();
        let value = |k: &str| event[k].as_str().unwrap().to_owned();
        match event["type"].as_str().unwrap() {
            "LINKED" | "UPDATED" => {
                rebuilt.insert(
                    user,
                    (
                        value("provider_id"),
                        value("linked_user_id"),
                        value("linked_username"),
                    ),
                );
            }
            "UNLINKED" => {
                rebuilt.remove(&user);
            }
            other => panic!("unknown type {other}"),
        }
    }
    let mut stored = BTreeMap::new();
    let page: Value = app
        .client
        .get(app.api("/linked-identities?limit=1000"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for link in page["linked_identities"].as_array().unwrap() {
        let value = |k: &str| link[k].as_str().unwrap().to_owned();
        stored.insert(
            value("user_id"),
            (
                value("provider_id"),
                value("linked_user_id"),
                value("linked_username"),
            ),
        );
    }
    assert_eq!(
        rebuilt, stored,
        "replaying the feed rebuilds the stored links"
    );
    eprintln!("tail: {} events from 32 writers", seen.len());
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_event_is_committed_or_empty_when_the_time_is_up() {
    let app = Arc::new(spawn_app().await);
    app.link_as_admin("u-0", "okta", "r-0").await;
    let after = events(&app, "").await["next_after"].as_i64().unwrap();

    let started = Instant::now();
    let empty = events(&app, &format!("?after={after}&wait=1")).await;
    assert_eq!(empty["events"], json!([]));
    assert_eq!(empty["next_after"], after);
    assert!(started.elapsed() >= Duration::from_millis(900), "it waited");

    let poll = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let page = events(&app, &format!("?after={after}&wait=30")).await;
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = Instant::now();
    app.link_as_admin("u-1", "okta", "r-1").await;
    let (page, waited) = poll.await.unwrap();

    assert_eq!(page["events"][0]["user_id"], "u-1");
    assert_eq!(page["next_after"], after + 1);
    assert!(
        waited >= Duration::from_millis(250) && committed.elapsed() < Duration::from_secs(2),
        "{waited:?}"
    );
}

/// Reads server-sent events until `count` have come; returns them and
/// whether a heartbeat comment was seen.
async fn read_sse(
    response: reqwest::Response,
    count: usize,
    within: Duration,
) -> (Vec<(i64, String, Value)>, bool) {
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut found = Vec::new();
    let mut heartbeat = false;
    let deadline = Instant::now() + within;
    while found.len() < count || !heartbeat {
        let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), stream.next()).await else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, String::new(), Value::Null);
            for line in block.lines() {
                if line.starts_with(':') {
                    heartbeat = true;
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).unwrap();
                }
            }
            if let Some(id) = id {
                found.push((id, kind, data));
            }
        }
        if found.len() >= count && within < Duration::from_secs(2) {
            break;
        }
    }
    (found, heartbeat)
}

async fn open_stream(app: &TestApp, query: &str, last_event_id: Option<i64>) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.api(&format!("/linked-identities/events{query}")))
        .bearer_auth(&app.admin)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn server_sent_events_stream_the_feed_resume_after_last_event_id_and_beat() {
    let app = spawn_app_with(|c| c.events.heartbeat_secs = 1).await;
    app.link_as_admin("u-1", "okta", "r-1").await;
    app.link_as_admin("u-2", "okta", "r-2").await;

    let stream = open_stream(&app, "", None).await;
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let writer = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.link_as_admin("u-3", "okta", "r-3").await;
    };
    let ((found, heartbeat), ()) =
        tokio::join!(read_sse(stream, 3, Duration::from_secs(5)), writer);

    let users: Vec<&str> = found
        .iter()
        .map(|(_, _, d)| d["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["u-1", "u-2", "u-3"],
        "the stored events, then a new one live"
    );
    for (id, kind, data) in &found {
        assert_eq!(*id, data["seq"].as_i64().unwrap());
        assert_eq!(kind, "LINKED");
    }
    assert!(
        heartbeat,
        "a heartbeat comment within the heartbeat interval"
    );

    let resumed = open_stream(&app, "?after=0", Some(found[1].0)).await;
    let (again, _) = read_sse(resumed, 1, Duration::from_millis(1500)).await;
    assert_eq!(
        again[0].2["user_id"], "u-3",
        "Last-Event-ID wins over after"
    );
}

#[tokio::test]
async fn retention_prunes_old_events_and_asking_for_them_is_410() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.link_as_admin(&format!("u-{i}"), "okta", &format!("r-{i}"))
            .await;
    }
    app.execute_sql("UPDATE events SET occurred_at = '2020-01-01T00:00:00Z' WHERE seq <= 2");
    let app = app.restart_with(|c| c.events.retention_days = 30).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while feed(&app, &app.admin, "?after=0").await.status() == 200 {
        assert!(
            Instant::now() < deadline,
            "old events are pruned soon after start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let gone = assert_problem(
        feed(&app, &app.admin, "?after=1").await,
        410,
        "EVENTS_EXPIRED",
    )
    .await;
    assert!(
        gone["detail"].as_str().unwrap().contains("after=2"),
        "{gone}"
    );
    let kept = events(&app, "?after=2").await;
    assert_eq!(kept["events"][0]["user_id"], "u-2");
    let stream = open_stream(&app, "?after=0", None).await;
    assert_problem(stream, 410, "EVENTS_EXPIRED").await;
}

#[tokio::test]
async fn bad_feed_parameters_are_400_naming_the_field() {
    let app = spawn_app().await;
    for (query, field) in [
        ("?after=-1", "after"),
        ("?after=x", "after"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?wait=61", "wait"),
        ("?wait=-1", "wait"),
        ("?after=1&after=2", "after"),
    ] {
        let problem = assert_problem(
            feed(&app, &app.admin, query).await,
            400,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(error_fields(&problem), [field], "{query}");
    }
    let bad_resume = app
        .client
        .get(app.api("/linked-identities/events"))
        .bearer_auth(&app.admin)
        .header("accept", "text/event-stream")
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(bad_resume, 400, "VALIDATION_FAILED").await;
    assert_eq!(error_fields(&problem), ["Last-Event-ID"]);
}

#[tokio::test]
async fn reading_the_feed_needs_events_list_and_a_user_scoped_token_cannot() {
    let app = spawn_app().await;
    let reader = app.token_with_rights(&[Right::EventsList]);
    let searcher = app.token_with_rights(&[Right::LinkedIdentitiesSearch]);
    let user_scoped = attenuate(&app.admin, &app.keypair, r#"check if user("u-1");"#);

    assert_eq!(feed(&app, &reader, "").await.status(), 200);
    assert_problem(feed(&app, &searcher, "").await, 403, "FORBIDDEN").await;
    assert_problem(feed(&app, &user_scoped, "").await, 403, "FORBIDDEN").await;
    let anonymous = app
        .client
        .get(app.api("/linked-identities/events"))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn open_streams_and_long_polls_are_bounded() {
    let app = Arc::new(spawn_app_with(|c| c.events.max_streams = 2).await);
    let first = open_stream(&app, "", None).await;
    let second = open_stream(&app, "", None).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let third = open_stream(&app, "", None).await;
    assert!(third.headers().contains_key("retry-after"));
    assert_problem(third, 503, "TOO_MANY_STREAMS").await;
    assert_problem(
        feed(&app, &app.admin, "?wait=5").await,
        503,
        "TOO_MANY_STREAMS",
    )
    .await;
    assert_eq!(
        feed(&app, &app.admin, "").await.status(),
        200,
        "a plain read needs no slot"
    );

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = open_stream(&app, "", None).await;
        if again.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a closed stream frees its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn sigterm_ends_open_streams_within_the_shutdown_timeout() {
    let dir = tempfile::TempDir::new().unwrap();
    let token = crate::cli::mint(dir.path(), &["--admin"]);
    let server = crate::cli::Server::start(
        dir.path(),
        &[("LINKID_SERVER__SHUTDOWN_TIMEOUT_SECS", "10")],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let streams: Vec<reqwest::Response> = runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut open = Vec::new();
        for _ in 0..3 {
            let response = client
                .get(format!(
                    "{}/api/admin/users/v4/linked-identities/events",
                    server.base
                ))
                .bearer_auth(&token)
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            open.push(response);
        }
        open
    });

    let started = Instant::now();
    let status = server.terminate();

    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
    runtime.block_on(async {
        for stream in streams {
            let ended = tokio::time::timeout(Duration::from_secs(2), stream.bytes()).await;
            assert!(ended.is_ok(), "the stream ended");
        }
    });
}

#[tokio::test]
async fn an_event_carries_the_request_id_the_response_gave_when_the_client_sent_none() {
    let app = spawn_app().await;

    let response = app.link_as_admin("u-1", "okta", "r-1").await;

    let given = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let recorded = all_events(&app).await;
    assert_eq!(recorded[0]["request_id"], given.as_str());
}
