//! SIGKILL in the middle of a write load loses no acknowledged write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::cli::{get, mint, Server};
use crate::helpers::{assert_database_sound, stored_links};

const CYCLES: usize = 5;
const WRITERS: usize = 32;

#[derive(Default)]
struct Acknowledged {
    linked: HashMap<String, String>,
    unlinked: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let client = reqwest::Client::new();
    let mut total_acks = 0;

    for cycle in 0..CYCLES {
        let server = Server::start(dir.path(), &[]);
        let base = server.base.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (client, base, token, acked, stop) =
                    (client.clone(), base.clone(), token.clone(), acked.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let user = format!("c{cycle}-w{w}-{i}");
                        let remote = format!("remote-{user}");
                        i += 1;
                        let url = format!("{base}/api/admin/users/v4/users/{user}/linked-identities");
                        let body = json!({"provider_id": "okta", "linked_user_id": remote, "linked_username": "n"});
                        let Ok(response) = client.post(&url).bearer_auth(&token).json(&body).send().await else { break };
                        let status = response.status().as_u16();
                        if response.bytes().await.is_err() { break }
                        assert!(status == 201, "a link answered {status}");
                        acked.lock().unwrap().linked.insert(user.clone(), remote);
                        if i % 3 == 0 {
                            // Until the delete is acknowledged, either state is allowed.
                            acked.lock().unwrap().linked.remove(&user);
                            let Ok(response) = client.delete(format!("{url}/okta")).bearer_auth(&token).send().await else { break };
                            let status = response.status().as_u16();
                            if response.bytes().await.is_err() { break }
                            assert!(status == 200, "a delete answered {status}");
                            acked.lock().unwrap().unlinked.push(user);
                        }
                    }
                })
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(800 + 200 * cycle as u64)).await;
        server.crash();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.expect("no writer saw a wrong status");
        }

        assert_database_sound(dir.path());

        let server = Server::start(dir.path(), &[]);
        let acked_now = {
            let acked = acked.lock().unwrap();
            Acknowledged {
                linked: acked.linked.clone(),
                unlinked: acked.unlinked.clone(),
            }
        };
        total_acks = acked_now.linked.len() + acked_now.unlinked.len();
        for (user, remote) in &acked_now.linked {
            let listed: Value = get(
                &server,
                &format!("/api/admin/users/v4/users/{user}/linked-identities"),
                &token,
            )
            .await
            .json()
            .await
            .unwrap();
            assert_eq!(
                listed["linked_identities"][0]["linked_user_id"],
                remote.as_str(),
                "cycle {cycle}: {user} lost"
            );
        }
        let stored = stored_links(dir.path());
        for user in &acked_now.unlinked {
            assert!(
                !stored.iter().any(|link| &link.user_id == user),
                "cycle {cycle}: the acknowledged delete of {user} was lost"
            );
        }
        let half_written = stored
            .iter()
            .filter(|link| {
                link.linked_user_id != format!("remote-{}", link.user_id)
                    || link.provider_id != "okta"
                    || link.created_at.is_empty()
                    || link.updated_at.is_empty()
            })
            .count();
        assert_eq!(half_written, 0, "cycle {cycle}");
        drop(server);
    }
    assert!(
        total_acks > 100,
        "the load acknowledged too few writes to prove anything: {total_acks}"
    );
    eprintln!("crash safety: {CYCLES} SIGKILL cycles, {total_acks} acknowledged writes checked, none lost");
}
