use crate::cli::{get, linkid, mint, Server};
use crate::helpers::{backend, Backend};
use tempfile::TempDir;

#[test]
fn an_invalid_config_stops_start_up_naming_the_key() {
    let dir = TempDir::new().unwrap();
    let cases = [
        ("[server]\naddr = \"not-an-address\"\n", "server.addr"),
        ("[auth]\npublic_key = \"ed25519/zz\"\n", "auth.public_key"),
        ("[database]\npool_size = 0\n", "database.pool_size"),
        ("[server]\nadress = \"127.0.0.1:1\"\n", "adress"),
        ("[[identity_providers]]\nid = \"a\"\ndisplay_name = \"A\"\nprotocol = \"OIDC\"\n[[identity_providers]]\nid = \"a\"\ndisplay_name = \"B\"\nprotocol = \"SAML\"\n", "identity_providers[1].id"),
        ("[[identity_providers]]\nid = \"a\"\ndisplay_name = \"A\"\nprotocol = \"LDAP\"\n", "protocol"),
    ];
    for (text, key) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();

        let output = linkid(dir.path(), &["--config", file.to_str().unwrap(), "serve"]);

        assert_eq!(output.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "the message names {key}: {stderr}");
    }
}

#[test]
fn a_missing_config_file_named_on_the_command_line_is_an_error() {
    let dir = TempDir::new().unwrap();

    let output = linkid(dir.path(), &["--config", "nope.toml", "serve"]);

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope.toml"));
}

#[tokio::test]
async fn the_config_file_and_env_vars_layer_over_the_defaults() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("custom.toml"),
        "[database]\npath = \"./elsewhere/db.sqlite\"\n\n[[identity_providers]]\nid = \"only\"\ndisplay_name = \"Only one\"\nprotocol = \"SAML\"\nlinkable = true\n",
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("LINKID_CONFIG", "custom.toml"),
            ("LINKID_AUTH__PRIVATE_KEY_FILE", "./keys/k"),
        ],
    );
    let output = crate::cli::command(dir.path())
        .env("LINKID_CONFIG", "custom.toml")
        .env("LINKID_AUTH__PRIVATE_KEY_FILE", "./keys/k")
        .args(["token", "mint", "--admin"])
        .output()
        .unwrap();
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let body: serde_json::Value = get(
        &server,
        "/api/admin/users/v4/users/identity-providers",
        &token,
    )
    .await
    .json()
    .await
    .unwrap();

    assert_eq!(body["identity_providers"][0]["provider_id"], "only");
    // (On PostgreSQL, LINKID_DATABASE__URL takes the place of database.path.)
    assert_eq!(
        dir.path().join("elsewhere/db.sqlite").exists(),
        backend() == Backend::Sqlite
    );
    assert!(dir.path().join("keys/k").exists());
}

#[tokio::test]
async fn a_server_with_only_the_public_key_verifies_tokens_minted_elsewhere() {
    let issuer = TempDir::new().unwrap();
    let verifier = TempDir::new().unwrap();
    let token = mint(issuer.path(), &["--admin"]);
    let key = std::fs::read_to_string(issuer.path().join("data/root.key")).unwrap();
    let private: biscuit_auth::PrivateKey = key.trim().parse().unwrap();
    let public = biscuit_auth::KeyPair::from(&private).public().to_string();
    let stranger = mint(verifier.path(), &["--admin"]);
    std::fs::remove_file(verifier.path().join("data/root.key")).unwrap();

    let server = Server::start(verifier.path(), &[("LINKID_AUTH__PUBLIC_KEY", &public)]);
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/admin/users/v4/users/identity-providers",
        server.base
    );

    assert_eq!(
        client
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(&url)
            .bearer_auth(&stranger)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(
        !verifier.path().join("data/root.key").exists(),
        "no key is generated when a public key is configured"
    );
}

#[test]
fn a_key_file_with_bare_hex_is_accepted() {
    let dir = TempDir::new().unwrap();
    let keypair = biscuit_auth::KeyPair::new();
    std::fs::write(
        dir.path().join("bare.key"),
        keypair.private().to_bytes_hex(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("bare.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let run = |args: &[&str]| {
        crate::cli::command(dir.path())
            .env("LINKID_AUTH__PRIVATE_KEY_FILE", "bare.key")
            .args(args)
            .output()
            .unwrap()
    };

    let minted = run(&["token", "mint", "--admin"]);
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let verified = biscuit_auth::Biscuit::from_base64(&token, keypair.public());

    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    assert!(verified.is_ok(), "the token is signed by the bare-hex key");
}

#[test]
fn a_private_key_readable_by_others_stops_start_up_with_the_fix_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::TempDir::new().unwrap();
    crate::cli::mint(dir.path(), &["--admin"]);
    let key = dir.path().join("data/root.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    for args in [&["serve"][..], &["token", "mint", "--admin"][..]] {
        let output = crate::cli::linkid(dir.path(), args);

        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("chmod 600"), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "no token is printed");
    }
}
