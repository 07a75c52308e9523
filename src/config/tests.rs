//! The configuration's unit tests: limits, files, URLs and webhooks.

use figment::providers::{Format, Toml};
use figment::Figment;

use super::load::unnamed_file;
use super::*;

#[test]
fn a_zero_timeout_or_connection_limit_is_refused_naming_its_key() {
    for key in [
        "header_read_timeout_secs",
        "keep_alive_timeout_secs",
        "body_timeout_secs",
        "max_connections",
        "write_timeout_secs",
    ] {
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .merge((format!("server.{key}"), 0))
            .merge(("database.path", "linkid.db"));

        let error = Config::from_figment(figment).unwrap_err();

        assert!(
            error
                .problems
                .iter()
                .any(|p| p.key == format!("server.{key}") && p.what == "is 0"),
            "{error}"
        );
    }
}

/// The shipped defaults with one key changed.
fn with(key: &str, value: u64) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .merge(("database.path", dir.path().join("linkid.db")))
        .merge(("auth.private_key_file", dir.path().join("root.key")))
        .merge((key, value));
    Config::from_figment(figment)
}

#[test]
fn the_token_caps_refuse_zero_naming_the_key() {
    for key in ["max_token_bytes", "max_blocks", "max_facts", "max_rules"] {
        let error = with(&format!("auth.{key}"), 0).unwrap_err();
        assert!(
            error
                .problems
                .iter()
                .any(|p| p.key == format!("auth.{key}") && p.what.starts_with("is 0")),
            "{error}"
        );
    }
}

#[test]
fn a_token_cache_under_one_mebibyte_is_refused() {
    let error = with("auth.token_cache_bytes", 4096).unwrap_err();
    assert!(
        error.to_string().contains("auth.token_cache_bytes"),
        "{error}"
    );
    assert!(with("auth.token_cache_bytes", 1024 * 1024).is_ok());
}

#[test]
fn a_token_cap_of_one_is_allowed() {
    let config = with("auth.max_blocks", 1).unwrap();
    assert_eq!(config.auth.max_blocks, 1);
}

fn problems_with(database: &str) -> Vec<String> {
    let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .merge(Toml::string(&format!("[database]\n{database}")));
    match Config::from_figment(figment) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(Problem::to_string).collect(),
    }
}

#[test]
fn a_postgres_url_replaces_the_sqlite_path_and_is_checked() {
    assert!(problems_with("url = \"postgres://u:pw@db:5432/linkid\"\npath = \"\"").is_empty());
    assert!(
        problems_with("url = \"\"").is_empty(),
        "an empty url is unset"
    );

    let cases = [
        ("url = \"mysql://u:pw-7q@db/linkid\"", "database.url"),
        (
            "url = \"postgres://u:pw-7q@db/l?sslmode=verify-full\"",
            "sslrootcert",
        ),
        (
            "url = \"postgres://u:pw-7q@db/l?sslmode=verify-ca&sslrootcert=/nonexistent.pem\"",
            "/nonexistent.pem",
        ),
        (
            "statement_timeout_secs = 0",
            "database.statement_timeout_secs",
        ),
    ];
    for (database, names) in cases {
        let problems = problems_with(database).join("\n");

        assert!(problems.contains(names), "{database}: {problems}");
        assert!(!problems.contains("pw-7q"), "{database}: {problems}");
    }
}

#[test]
fn a_config_toml_in_the_working_directory_comes_before_the_installed_one() {
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("etc-linkid-config.toml");
    std::fs::write(&installed, "").unwrap();
    std::fs::write(dir.path().join("config.toml"), "").unwrap();

    let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

    assert_eq!(file, Some(dir.path().join("config.toml")));
    assert_eq!(what, dir.path().join("config.toml").display().to_string());
}

#[test]
fn without_a_config_toml_the_installed_one_is_read_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("etc-linkid-config.toml");
    std::fs::write(&installed, "").unwrap();

    let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

    assert_eq!(file, Some(installed.clone()));
    assert_eq!(
        what,
        format!(
            "{} (installed; no config.toml in {})",
            installed.display(),
            dir.path().display()
        )
    );
}

#[test]
fn with_neither_file_no_config_file_is_read_and_both_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("etc-linkid-config.toml");

    let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

    assert_eq!(file, None);
    assert_eq!(
        what,
        format!(
            "no config file (config.toml is not in {}, {} does not exist)",
            dir.path().display(),
            installed.display()
        )
    );
}

#[test]
fn webhooks_are_read_with_their_secrets_and_shown_without_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("crm.whsec");
    std::fs::write(&secret, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML)).merge(Toml::string(&format!(
        "[[webhooks]]\nid = \"crm\"\nurl = \"https://hook:pw-7q@crm.internal/x\"\nsecret_file = {:?}\nproviders = [\"okta\"]\n",
        secret.display().to_string()
    )));

    let config = Config::from_figment(figment).unwrap();
    let webhooks = config.webhooks().unwrap();

    assert_eq!(config.webhook_delivery.timeout_secs, 10);
    assert_eq!(config.webhook_delivery.max_backoff_secs, 300);
    assert_eq!(webhooks.len(), 1);
    assert_eq!(webhooks[0].start, Start::Now);
    assert_eq!(webhooks[0].url.to_string(), "https://crm.internal/x");
    for shown in [
        format!("{config:?}"),
        format!("{webhooks:?}"),
        serde_json::to_string(&config).unwrap(),
    ] {
        assert!(!shown.contains("pw-7q"), "{shown}");
        assert!(!shown.contains("C2FV"), "{shown}");
    }
}

#[test]
fn the_config_shows_its_url_without_the_password() {
    let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .merge(("database.url", "postgres://u:pw-7q@db/linkid"));
    let config = Config::from_figment(figment).unwrap();

    assert!(!format!("{config:?}").contains("pw-7q"));
    assert!(!serde_json::to_string(&config).unwrap().contains("pw-7q"));
    assert_eq!(
        config.database.postgres_url().unwrap().to_string(),
        "postgres://u@db:5432/linkid"
    );
}
