//! Group commit on PostgreSQL: concurrent writes reaching one instance share
//! one transaction (`database.max_batch`), a write that fails in a batch
//! fails alone with the answer it would get alone, and the feed stays one
//! exact stream of whole transactions across instances. Transactions are
//! counted by the rows' `xmin` (the id of the transaction that wrote them).
//! Run with `LINKID_TEST_BACKEND=postgres`; skipped on SQLite.

use std::collections::{BTreeMap, HashMap};

use crate::helpers::{
    assert_problem, database_url_for, link_body, psql, skipped_unless, spawn_app_with, Backend,
    TestApp,
};
use crate::instances::{client, post_link, status_and_body, whole_feed, Instances};
use futures_util::future::join_all;

const LINKS: &str = "/api/admin/users/v4/users";

fn skipped() -> bool {
    skipped_unless(Backend::Postgres, "group commit is PostgreSQL's here")
}

/// What `a_mixed_burst` saw: how many writes committed a change, and in
/// how many transactions.
struct Burst {
    changes: usize,
    transactions: usize,
}

/// Sends at once, to one instance: links that must win, links whose remote
/// identity another user holds, links for users who hold another link,
/// deletes of stored links and of missing ones; checks every answer and
/// what was stored.
async fn a_mixed_burst(app: &TestApp) -> Burst {
    let url = app.database.as_ref().unwrap().url.clone();
    for i in 0..8 {
        assert_eq!(
            app.link_as_admin(&format!("holder-{i}"), "okta", &format!("taken-{i}"))
                .await
                .status(),
            201
        );
        assert_eq!(
            app.link_as_admin(&format!("busy-{i}"), "azure-ad", &format!("other-{i}"))
                .await
                .status(),
            201
        );
        assert_eq!(
            app.link_as_admin(&format!("leaving-{i}"), "okta", &format!("left-{i}"))
                .await
                .status(),
            201
        );
    }
    let before: i64 = psql(&url, "SELECT coalesce(max(seq), 0) FROM events")[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();

    let asked: Vec<(String, String)> = (0..8)
        .map(|i| (format!("thief-{i}"), format!("taken-{i}")))
        .chain((0..8).map(|i| (format!("busy-{i}"), format!("new-busy-{i}"))))
        .chain((0..32).map(|i| (format!("new-{i}"), format!("r-new-{i}"))))
        .collect();
    let requests = asked
        .iter()
        .map(|(user, remote)| app.link_as_admin(user, "okta", remote));
    let deletes = (0..8).map(|i| {
        let (leaving, missing) = (format!("leaving-{i}"), format!("missing-{i}"));
        async move {
            (
                app.delete(&app.admin, &leaving, "okta").await,
                app.delete(&app.admin, &missing, "okta").await,
            )
        }
    });
    let (links, deletes) = tokio::join!(join_all(requests), join_all(deletes));

    let mut links = links.into_iter();
    for response in links.by_ref().take(8) {
        assert_problem(response, 409, "IDENTITY_ALREADY_LINKED").await;
    }
    for response in links.by_ref().take(8) {
        let problem = assert_problem(response, 400, "USER_ALREADY_LINKED").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("\"azure-ad\""),
            "{problem}"
        );
    }
    for response in links {
        assert_eq!(response.status(), 201);
    }
    for (stored, missing) in deletes {
        assert_eq!(stored.status(), 200);
        assert_problem(missing, 404, "LINKED_IDENTITY_NOT_FOUND").await;
    }
    let stored: Vec<String> = psql(
        &url,
        "SELECT user_id FROM linked_identities WHERE user_id LIKE 'new-%' OR user_id LIKE 'thief-%' \
         OR user_id LIKE 'leaving-%' OR provider_id = 'okta' AND user_id LIKE 'busy-%'",
    )
    .into_iter()
    .map(|row| row[0].clone().unwrap())
    .collect();
    assert_eq!(
        stored.len(),
        32,
        "only the new users' links were added: {stored:?}"
    );
    assert!(
        stored.iter().all(|user| user.starts_with("new-")),
        "{stored:?}"
    );
    let events = psql(
        &url,
        &format!("SELECT type, count(*), count(DISTINCT xmin::text) FROM events WHERE seq > {before} GROUP BY type ORDER BY type"),
    );
    let counted: Vec<(String, String)> = events
        .iter()
        .map(|row| (row[0].clone().unwrap(), row[1].clone().unwrap()))
        .collect();
    assert_eq!(
        counted,
        [
            ("LINKED".into(), "32".into()),
            ("UNLINKED".into(), "8".into())
        ],
        "one event per change, none for a refusal"
    );
    let transactions: usize = psql(
        &url,
        &format!("SELECT count(DISTINCT xmin::text) FROM events WHERE seq > {before}"),
    )[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    Burst {
        changes: 40,
        transactions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_transactions_and_a_refused_one_fails_alone() {
    if skipped() {
        return;
    }
    let app = spawn_app_with(|_| {}).await;

    let burst = a_mixed_burst(&app).await;

    assert!(
        burst.transactions < burst.changes,
        "{} changes in {} transactions: no write shared one",
        burst.changes,
        burst.transactions
    );
    eprintln!(
        "group commit: {} changes in {} transactions",
        burst.changes, burst.transactions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_batch_1_each_write_commits_alone_with_the_same_answers() {
    if skipped() {
        return;
    }
    let app = spawn_app_with(|config| config.database.max_batch = 1).await;

    let burst = a_mixed_burst(&app).await;

    assert_eq!(burst.transactions, burst.changes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_write_storm_on_two_instances_the_feed_replays_to_the_stored_links() {
    if skipped() {
        return;
    }
    let cluster = Instances::start(2);
    let token = cluster.token.clone();

    // 48 writers on 16 users: links with different remote ids and names
    // race for each user across the instances, and deletes undo them.
    let writers = (0..48).map(|w| {
        let base = cluster.servers[w % 2].base.clone();
        let token = token.clone();
        async move {
            let client = client();
            for i in 0..8 {
                let user = format!("u{}", (w * 7 + i) % 16);
                let (status, body) = if i % 3 == 2 {
                    let response = client
                        .delete(format!("{base}{LINKS}/{user}/linked-identities/okta"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    status_and_body(response).await
                } else {
                    let body = link_body("okta", &format!("r-{user}-{}", w % 3), &format!("n{i}"));
                    post_link(&client, &base, &token, &user, &body).await
                };
                assert!(
                    [200, 201, 400, 404, 409].contains(&status),
                    "{status} {body}"
                );
            }
        }
    });
    join_all(writers).await;

    let feed = whole_feed(&client(), &cluster.servers[0].base, &token).await;
    let mut replayed: BTreeMap<String, (String, String)> = BTreeMap::new();
    for event in &feed {
        let user = event["user_id"].as_str().unwrap().to_owned();
        let link = (
            event["linked_user_id"].as_str().unwrap().to_owned(),
            event["linked_username"].as_str().unwrap().to_owned(),
        );
        let held = replayed.get(&user).map(|(remote, _)| remote.clone());
        match event["type"].as_str().unwrap() {
            "LINKED" => {
                assert_eq!(held, None, "LINKED while linked: {event}");
                replayed.insert(user, link);
            }
            "UPDATED" => {
                assert_eq!(
                    held.as_ref(),
                    Some(&link.0),
                    "UPDATED another link: {event}"
                );
                replayed.insert(user, link);
            }
            _ => {
                assert_eq!(
                    held.as_ref(),
                    Some(&link.0),
                    "UNLINKED another link: {event}"
                );
                replayed.remove(&user);
            }
        }
    }
    let url = database_url_for(cluster.path()).unwrap();
    let stored: BTreeMap<String, (String, String)> = psql(
        &url,
        "SELECT user_id, linked_user_id, linked_username FROM linked_identities",
    )
    .into_iter()
    .map(|row| {
        (
            row[0].clone().unwrap(),
            (row[1].clone().unwrap(), row[2].clone().unwrap()),
        )
    })
    .collect();
    assert_eq!(
        replayed, stored,
        "replaying the feed rebuilds the stored links"
    );

    // Each transaction's events are one run of the feed: a batch takes the
    // feed's lock once, and no other transaction's event falls inside it.
    let writers: Vec<String> = psql(&url, "SELECT xmin::text FROM events ORDER BY seq")
        .into_iter()
        .map(|row| row[0].clone().unwrap())
        .collect();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for (i, xmin) in writers.iter().enumerate() {
        if i == 0 || writers[i - 1] != *xmin {
            *runs.entry(xmin).or_default() += 1;
        }
    }
    assert!(
        runs.values().all(|&n| n == 1),
        "a transaction's events are split: {runs:?}"
    );
    assert!(
        runs.len() < feed.len(),
        "no two writes shared a transaction"
    );
    eprintln!(
        "write storm on two instances: {} events in {} transactions, {} links stored",
        feed.len(),
        runs.len(),
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_postgresql_refuses_fails_alone_and_the_rest_of_its_batch_commits() {
    if skipped() {
        return;
    }
    let app = spawn_app_with(|_| {}).await;
    let url = app.database.as_ref().unwrap().url.clone();
    // A row PostgreSQL refuses, as a check or a trigger of the operator's
    // would: the batch it lands in fails as a whole at first.
    psql(
        &url,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.user_id = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON linked_identities \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    );

    let users: Vec<String> = (0..24)
        .map(|i| {
            if i == 12 {
                "poison".into()
            } else {
                format!("good-{i}")
            }
        })
        .collect();
    let app = &app;
    let answers =
        join_all(users.iter().map(|user| async move {
            app.link_as_admin(user, "okta", &format!("r-{user}")).await
        }))
        .await;

    for (user, response) in users.iter().zip(answers) {
        let expected = if user == "poison" { 500 } else { 201 };
        assert_eq!(response.status(), expected, "{user}");
    }
    let stored = psql(&url, "SELECT count(*) FROM linked_identities")[0][0].clone();
    let events = psql(&url, "SELECT count(*) FROM events")[0][0].clone();
    assert_eq!(stored.as_deref(), Some("23"));
    assert_eq!(events.as_deref(), Some("23"));
}
