//! `spawn_app`: the application `main` runs, on port 0, with a temp database.

use std::time::Duration;

use biscuit_auth::KeyPair;
use figment::providers::{Format, Toml};
use figment::Figment;
use linkid::auth::{mint, MintRequest, Right, RootKey};
use linkid::config::{Config, DEFAULT_CONFIG_TOML};
use linkid::startup::Application;
use reqwest::{Client, Response};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const PREFIX: &str = "/api/admin/users/v4";

pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub keypair: KeyPair,
    pub admin: String,
    pub config: Config,
    pub dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The built-in defaults with every path in a fresh temp dir and port 0.
pub fn test_config(dir: &TempDir) -> Config {
    let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .merge(("server.addr", "127.0.0.1:0"))
        .merge(("database.path", dir.path().join("linkid.db")))
        .merge(("auth.private_key_file", dir.path().join("root.key")));
    Config::from_figment(figment).expect("the test config is valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = test_config(&dir);
    customize(&mut config);
    let app = Application::build(&config).await.expect("the app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let keypair = RootKey::load_or_create(&config.auth)
        .expect("the key loads")
        .keypair
        .expect("the test app holds its private key");
    let admin = mint(
        &keypair,
        &MintRequest {
            admin: true,
            ..Default::default()
        },
    )
    .expect("an admin token");
    TestApp {
        address,
        client: Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        keypair,
        admin,
        config,
        dir,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.address)
    }

    pub fn mint(&self, request: MintRequest) -> String {
        mint(&self.keypair, &request).expect("a token")
    }

    pub fn token_with_rights(&self, rights: &[Right]) -> String {
        self.mint(MintRequest {
            rights: rights.to_vec(),
            ..Default::default()
        })
    }

    pub async fn list_providers(&self, token: &str) -> Response {
        self.client
            .get(self.api("/users/identity-providers"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn list(&self, token: &str, user: &str, query: &str) -> Response {
        self.client
            .get(self.api(&format!("/users/{user}/linked-identities{query}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn link(&self, token: &str, user: &str, body: &Value) -> Response {
        self.client
            .post(self.api(&format!("/users/{user}/linked-identities")))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn link_as_admin(&self, user: &str, provider: &str, remote: &str) -> Response {
        self.link(
            &self.admin,
            user,
            &link_body(provider, remote, &format!("{remote}@example.com")),
        )
        .await
    }

    pub async fn get_link(&self, token: &str, user: &str, provider: &str, query: &str) -> Response {
        self.client
            .get(self.api(&format!(
                "/users/{user}/linked-identities/{provider}{query}"
            )))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, token: &str, user: &str, provider: &str) -> Response {
        self.client
            .delete(self.api(&format!("/users/{user}/linked-identities/{provider}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Stops the server as SIGTERM would and waits for it; the temp dir
    /// (database and key) stays while the caller keeps it.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        self.dir
    }

    /// Starts a new server on the same database and key.
    pub async fn restart_with(self, customize: impl FnOnce(&mut Config)) -> TestApp {
        let dir = self.stop().await;
        let db = dir.path().join("linkid.db");
        let key = dir.path().join("root.key");
        let mut app = spawn_app_with(|config| {
            config.database.path = db;
            config.auth.private_key_file = key;
            customize(config);
        })
        .await;
        app.dir = dir;
        app
    }
}

pub fn link_body(provider: &str, remote: &str, username: &str) -> Value {
    json!({"provider_id": provider, "linked_user_id": remote, "linked_username": username})
}

/// Asserts a problem details response and returns its body.
pub async fn assert_problem(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type"
    );
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "code in {body}");
    assert_eq!(body["status"], status, "status in {body}");
    assert!(body["title"].is_string(), "title in {body}");
    assert!(body["detail"].is_string(), "detail in {body}");
    assert_eq!(
        body["request_id"],
        request_id.as_str(),
        "request_id in {body}"
    );
    body
}

/// The `field` names of a validation problem's errors.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .expect("a validation problem lists its errors")
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

/// A token with one more block, as any holder can add.
pub fn attenuate(token: &str, key: &KeyPair, code: &str) -> String {
    biscuit_auth::Biscuit::from_base64(token, key.public())
        .unwrap()
        .append(biscuit_auth::BlockBuilder::new().code(code).unwrap())
        .unwrap()
        .to_base64()
        .unwrap()
}

/// An admin token that expired `ago` before now.
pub fn expired_admin(key: &KeyPair, ago: Duration) -> String {
    use biscuit_auth::builder_ext::BuilderExt;
    biscuit_auth::Biscuit::builder()
        .code(r#"role("admin");"#)
        .unwrap()
        .check_expiration_date(std::time::SystemTime::now() - ago)
        .build(key)
        .unwrap()
        .to_base64()
        .unwrap()
}

/// An admin token signed by a root key no server here trusts.
pub fn forged_admin() -> String {
    mint(
        &KeyPair::new(),
        &MintRequest {
            admin: true,
            ..Default::default()
        },
    )
    .unwrap()
}
