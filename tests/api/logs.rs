//! No token, private key or secret ever reaches the log, at any level, in
//! either format.

use tempfile::TempDir;

use crate::cli::{mint, Server};
use crate::helpers::{attenuate, forged_admin};

async fn exercise(server: &Server, tokens: &[&str]) {
    let client = reqwest::Client::new();
    let base = &server.base;
    for token in tokens {
        let _ = client
            .get(format!(
                "{base}/api/admin/users/v4/users/u-1/linked-identities?embed=ACTIONS"
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let _ = client
            .post(format!("{base}/api/admin/users/v4/users/u-1/linked-identities"))
            .bearer_auth(token)
            .json(&serde_json::json!({"provider_id": "okta", "linked_user_id": "r", "linked_username": "n"}))
            .send()
            .await
            .unwrap();
        let _ = client
            .delete(format!(
                "{base}/api/admin/users/v4/users/u-1/linked-identities/okta"
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_log_never_contains_a_token_or_the_private_key() {
    for (level, format) in [("trace", "text"), ("debug", "json"), ("info", "text")] {
        let dir = TempDir::new().unwrap();
        let admin = mint(dir.path(), &["--admin"]);
        let key_text = std::fs::read_to_string(dir.path().join("data/root.key")).unwrap();
        let private: biscuit_auth::PrivateKey = key_text.trim().parse().unwrap();
        let keypair = biscuit_auth::KeyPair::from(&private);
        let attenuated = attenuate(&admin, &keypair, r#"check if user("u-2");"#);
        let forged = forged_admin();
        let truncated = admin[..admin.len() - 7].to_owned();
        let server = Server::start(
            dir.path(),
            &[("RUST_LOG", level), ("LINKID_LOG__FORMAT", format)],
        );

        exercise(
            &server,
            &[&admin, &attenuated, &forged, &truncated, "garbage-token"],
        )
        .await;
        let log = server.log();

        assert!(
            log.lines().count() > 10,
            "the server logged requests at {level}: {log}"
        );
        let private_hex = key_text.trim().split('/').nth(1).unwrap();
        assert!(!log.contains(private_hex), "private key in the {level} log");
        for token in [&admin, &attenuated, &forged, &truncated] {
            // Any 40-character window of a token would be a leak.
            assert!(
                !log.contains(&token[10..50]),
                "token material in the {level}/{format} log"
            );
        }
        assert!(
            !log.contains("garbage-token"),
            "a presented token was logged at {level}"
        );
    }
}
