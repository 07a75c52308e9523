use crate::cli::{get, linkid, mint, output_within, Server};
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

/// The lines of a configuration report that name a problem: `origin:key: what — fix`.
fn problem_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| line.contains(" — "))
        .map(str::to_owned)
        .collect()
}

fn run_with_env(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    // These are about files and the configuration: always on SQLite.
    let mut command = crate::cli::command(dir);
    command
        .env_remove("LINKID_DATABASE__URL")
        .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
        .args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    output_within(command, std::time::Duration::from_secs(30))
}

#[test]
fn every_problem_of_a_file_is_listed_at_once_as_file_key_what_and_fix() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("typos.toml");
    std::fs::write(
        &file,
        "[server]\nadress = \"127.0.0.1:9000\"\n\n[database]\npool_sise = 4\nmax_batch = \"lots\"\n\n[auth]\nprivate_key = \"./k\"\n\n[log]\nlevel = \"verbose\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let output = run_with_env(
        dir.path(),
        &[
            ("LINKID_SERVER__ADRR", "127.0.0.1:1"),
            ("LINKID_EVENTS__RETENTION_DAYS", "3"),
        ],
        &["--config", file, "check-config"],
    );

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines = problem_lines(&stderr);
    for (start, contains) in [
        (format!("{file}:server.adress: "), "did you mean `addr`?"),
        (
            format!("{file}:database.pool_sise: "),
            "did you mean `pool_size`?",
        ),
        (
            format!("{file}:auth.private_key: "),
            "did you mean `private_key_file`?",
        ),
        (format!("{file}:database.max_batch: "), "\"lots\""),
        (format!("{file}:log.level: "), "verbose"),
        (
            "env LINKID_SERVER__ADRR (server.adrr): ".to_string(),
            "did you mean `LINKID_SERVER__ADDR`?",
        ),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&start) && l.contains(contains)),
            "a line `{start}… {contains}` in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), 6, "one line per problem:\n{stderr}");
    for internal in ["default.", "``", "SERVER.ADRR", "for key"] {
        assert!(
            !stderr.contains(internal),
            "no figment internals ({internal}):\n{stderr}"
        );
    }
    let read = stderr
        .lines()
        .find(|l| l.starts_with("read: "))
        .unwrap_or_else(|| panic!("a `read:` line:\n{stderr}"));
    assert!(read.contains(file), "{read}");
    assert!(read.contains("LINKID_EVENTS__RETENTION_DAYS"), "{read}");
    assert!(read.contains("LINKID_SERVER__ADRR"), "{read}");
}

#[test]
fn a_mistyped_log_level_is_refused_naming_the_valid_levels() {
    let dir = TempDir::new().unwrap();

    for args in [&["check-config"][..], &["serve"][..]] {
        let output = run_with_env(dir.path(), &[("LINKID_LOG__LEVEL", "verbose")], args);

        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = problem_lines(&stderr).join("\n");
        assert!(line.contains("LINKID_LOG__LEVEL"), "{stderr}");
        for level in ["error", "warn", "info", "debug", "trace"] {
            assert!(line.contains(level), "names {level}: {stderr}");
        }
    }
    let fine = run_with_env(
        dir.path(),
        &[("LINKID_LOG__LEVEL", "warn,linkid=debug")],
        &["check-config"],
    );
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
}

#[test]
fn a_broken_database_url_is_refused_naming_the_key_and_the_fix_never_the_password() {
    let dir = TempDir::new().unwrap();
    let password = "hunter2-9c4e";
    let broken = [
        format!("mysql://linkid:{password}@db/linkid"),
        format!("postgres://linkid:{password}@db:99999/linkid"),
        format!("postgres://linkid:{password}@[::1/linkid"),
        format!("postgres://linkid:{password}@db/linkid?sslmode=allow"),
        format!("postgres://linkid:{password}@db/linkid?sslcert=/x.pem"),
        format!("postgres://linkid:{password}@db/linkid?connect_timeout=soon"),
        format!("postgres://linkid@db/linkid?password={password}&target_session_attrs=read-only"),
    ];
    for url in broken {
        for command in ["check-config", "serve"] {
            let output = run_with_env(dir.path(), &[("LINKID_DATABASE__URL", &url)], &[command]);

            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command} {url}: {stderr}");
            let problem = problem_lines(&stderr).join("\n");
            assert!(
                problem.contains("(database.url): is not a PostgreSQL URL")
                    && problem.contains("write it as e.g. postgres://"),
                "{command} {url}: {stderr}"
            );
            assert!(!stderr.contains(password), "{command} {url}: {stderr}");
            assert!(
                !String::from_utf8_lossy(&output.stdout).contains(password),
                "{command} {url}"
            );
        }
    }
}

/// What a case puts in its directory before the config is read.
type Prepare = fn(&std::path::Path);

/// A webhook secret file, `crm.whsec`, as it should be (mode 0600).
fn write_webhook_secret(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("crm.whsec");
    std::fs::write(&file, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_webhook_entry_with_keys_missing_or_mistyped_is_reported_with_the_rest_of_the_file() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("linkid.toml");
    std::fs::write(
        &file,
        "[[webhooks]]\nid = \"crm\"\nsecret = \"x\"\nevents = \"LINKED\"\n\n[log]\nlevel = \"verbose\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let output = run_with_env(dir.path(), &[], &["--config", file, "check-config"]);

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let keys: Vec<String> = problem_lines(&stderr)
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("{file}:")))
        .filter_map(|l| l.split_once(": ").map(|(key, _)| key.to_string()))
        .collect();
    assert_eq!(
        keys,
        [
            "log.level",
            "webhooks[0].events",
            "webhooks[0].secret",
            "webhooks[0].secret_file",
            "webhooks[0].url"
        ],
        "{stderr}"
    );
}

#[test]
fn a_webhook_is_checked_without_showing_its_url_credentials() {
    let dir = TempDir::new().unwrap();
    write_webhook_secret(dir.path());
    let file = dir.path().join("linkid.toml");
    let secret_file = dir.path().join("crm.whsec");
    let config = |url: &str, events: &str| {
        format!(
            "[[webhooks]]\nid = \"crm\"\nurl = \"{url}\"\nsecret_file = \"{}\"\nevents = {events}\n",
            secret_file.display()
        )
    };
    std::fs::write(
        &file,
        config("https://hook:pw-7q@crm.internal/x", "[\"LINKED\"]"),
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let good = run_with_env(dir.path(), &[], &["--config", file, "check-config"]);
    std::fs::write(
        file,
        config("https://hook:pw-7q@crm.internal:99999/x", "[\"LINKD\"]"),
    )
    .unwrap();
    let bad = run_with_env(dir.path(), &[], &["--config", file, "check-config"]);

    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:webhooks[0].url: "))),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `LINKED`?"), "{stderr}");
    for output in [&good.stdout, &good.stderr, &bad.stdout, &bad.stderr] {
        assert!(!String::from_utf8_lossy(output).contains("pw-7q"));
    }
}

/// Each case: what to write into the config (with `{dir}` for the case's
/// directory), what to prepare there, and the key its problem names.
#[test]
fn check_config_catches_what_serve_catches_and_both_exit_2() {
    use std::os::unix::fs::PermissionsExt;
    let cases: [(&str, &str, Prepare); 11] = [
        (
            "[auth]\nprivate_key_file = \"/etc/passwd\"\n",
            "auth.private_key_file",
            |_| {},
        ),
        (
            "[database]\npath = \"/proc/x/y.db\"\n",
            "database.path",
            |_| {},
        ),
        (
            "[auth]\nprivate_key_file = \"{dir}/shared.key\"\n",
            "auth.private_key_file",
            |dir| {
                let key = biscuit_auth::KeyPair::new().private().to_prefixed_string();
                std::fs::write(dir.join("shared.key"), key).unwrap();
                std::fs::set_permissions(
                    dir.join("shared.key"),
                    std::fs::Permissions::from_mode(0o644),
                )
                .unwrap();
            },
        ),
        (
            "[auth]\nprivate_key_file = \"{dir}/key-dir\"\n",
            "auth.private_key_file",
            |dir| {
                std::fs::create_dir(dir.join("key-dir")).unwrap();
            },
        ),
        (
            "[database]\npath = \"{dir}/notes.txt\"\n",
            "database.path",
            |dir| {
                std::fs::write(
                    dir.join("notes.txt"),
                    "not a database, just notes\n".repeat(200),
                )
                .unwrap();
            },
        ),
        ("[log]\nlevel = \"verbose\"\n", "log.level", |_| {}),
        (
            "[[webhooks]]\nid = \"crm\"\nurl = \"ftp://crm.internal/x\"\nsecret_file = \"{dir}/crm.whsec\"\n",
            "webhooks[0].url",
            write_webhook_secret,
        ),
        (
            "[[webhooks]]\nid = \"crm\"\nurl = \"https://crm.internal/x\"\nsecret_file = \"{dir}/none.whsec\"\n",
            "webhooks[0].secret_file",
            |_| {},
        ),
        (
            "[[webhooks]]\nid = \"crm\"\nurl = \"https://crm.internal/x\"\nsecret_file = \"{dir}/crm.whsec\"\n",
            "webhooks[0].secret_file",
            |dir| {
                write_webhook_secret(dir);
                std::fs::set_permissions(
                    dir.join("crm.whsec"),
                    std::fs::Permissions::from_mode(0o644),
                )
                .unwrap();
            },
        ),
        (
            "[[webhooks]]\nid = \"crm\"\nurl = \"https://a/\"\nsecret_file = \"{dir}/crm.whsec\"\n\n[[webhooks]]\nid = \"crm\"\nurl = \"https://b/\"\nsecret_file = \"{dir}/crm.whsec\"\n",
            "webhooks[1].id",
            write_webhook_secret,
        ),
        (
            "[[webhooks]]\nid = \"crm\"\nurl = \"https://crm.internal/x\"\nsecret_file = \"{dir}/crm.whsec\"\nevents = [\"LINK\"]\nproviders = [\"okta\"]\n",
            "webhooks[0].events[0]",
            write_webhook_secret,
        ),
    ];
    for (text, key, prepare) in cases {
        let dir = TempDir::new().unwrap();
        prepare(dir.path());
        let file = dir.path().join("linkid.toml");
        std::fs::write(&file, text.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let file = file.to_str().unwrap();

        let checked = run_with_env(dir.path(), &[], &["--config", file, "check-config"]);
        let served = run_with_env(dir.path(), &[], &["--config", file, "serve"]);

        let checked_text = String::from_utf8_lossy(&checked.stderr);
        let served_text = String::from_utf8_lossy(&served.stderr);
        assert_eq!(
            checked.status.code(),
            Some(2),
            "check-config, {text}: {checked_text}"
        );
        assert_eq!(
            served.status.code(),
            Some(2),
            "serve, {text}: {served_text}"
        );
        let problems = problem_lines(&checked_text);
        assert!(
            problems
                .iter()
                .any(|l| l.starts_with(&format!("{file}:{key}: "))),
            "{text}: {checked_text}"
        );
        assert_eq!(
            problems,
            problem_lines(&served_text),
            "{text}: the same report"
        );
    }
}

#[tokio::test]
async fn a_host_name_in_server_addr_is_resolved_at_start() {
    let dir = TempDir::new().unwrap();

    let checked = run_with_env(
        dir.path(),
        &[("LINKID_SERVER__ADDR", "localhost:0")],
        &["check-config"],
    );
    let server = Server::start(dir.path(), &[("LINKID_SERVER__ADDR", "localhost:0")]);
    let unknown = run_with_env(
        dir.path(),
        &[("LINKID_SERVER__ADDR", "no-such-host.invalid:8080")],
        &["check-config"],
    );

    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        text.contains("localhost:0 (resolves to 127.0.0.1:0)"),
        "{text}"
    );
    let token = mint(dir.path(), &["--admin"]);
    let response = get(
        &server,
        "/api/admin/users/v4/users/identity-providers",
        &token,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(unknown.status.code(), Some(2));
    let problems = problem_lines(&String::from_utf8_lossy(&unknown.stderr)).join("\n");
    assert!(
        problems.starts_with("env LINKID_SERVER__ADDR (server.addr): "),
        "{problems}"
    );
    assert!(problems.contains("no-such-host.invalid"), "{problems}");
    assert!(problems.contains("IP address"), "{problems}");
}

#[tokio::test]
async fn the_config_key_and_database_paths_are_shown_absolute_at_start_and_in_check_config() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[log]\nlevel = \"info\"\n").unwrap();
    let root = dir.path().canonicalize().unwrap();
    let config = root.join("config.toml");
    let key = root.join("data/root.key");
    let database = root.join("data/linkid.db");

    let checked = run_with_env(dir.path(), &[], &["check-config"]);
    let server = Server::start(dir.path(), &[]);

    let text = String::from_utf8_lossy(&checked.stdout);
    let log = server.log();
    for path in [&config, &key, &database] {
        let path = path.to_str().unwrap();
        assert!(text.contains(path), "check-config shows {path}: {text}");
        if path != database.to_str().unwrap() || backend() == Backend::Sqlite {
            assert!(log.contains(path), "the start-up log shows {path}: {log}");
        }
    }
}
