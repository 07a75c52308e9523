//! Tests that need a PostgreSQL server: `LINKID_TEST_PG_URL` (see
//! scripts/pg-cluster.sh). Without one they are skipped, unless the suite
//! runs on PostgreSQL (`LINKID_TEST_BACKEND=postgres`): then they fail.

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::migrations::{MIGRATIONS, SCHEMA_VERSION};
use super::LOCK_NAMESPACE;
use crate::config::{DatabaseConfig, DatabaseUrl};
use crate::domain::IdRules;
use crate::store::Store;

fn test_server() -> Option<String> {
    match std::env::var("LINKID_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("LINKID_TEST_BACKEND").as_deref() == Ok("postgres") => {
            panic!("LINKID_TEST_BACKEND=postgres needs LINKID_TEST_PG_URL (scripts/pg-cluster.sh)")
        }
        _ => {
            eprintln!("skipped: no PostgreSQL server (LINKID_TEST_PG_URL is unset)");
            None
        }
    }
}

/// `url` naming the database `dbname` instead.
fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{dbname}{query}", &base[..authority_end])
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The rows of `sql`, each as its values joined by " | ".
async fn rows(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
            _ => None,
        })
        .collect()
}

/// What a schema is, whatever the SQL text's layout and comments: columns,
/// constraints, indexes, sequences and whom they belong to, functions.
async fn shape_of(client: &Client) -> Vec<String> {
    let mut shape = Vec::new();
    for sql in [
        "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, \
                identity_generation \
         FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "SELECT s.relname, format_type(q.seqtypid, NULL), d.deptype, d.refobjid::regclass::text, \
                d.refobjsubid \
         FROM pg_class s JOIN pg_sequence q ON q.seqrelid = s.oid \
         LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid \
                               AND d.deptype IN ('a', 'i') \
         WHERE s.relnamespace = 'public'::regnamespace ORDER BY 1",
        "SELECT proname, pg_get_function_arguments(oid), pg_get_function_result(oid), \
                btrim(regexp_replace(prosrc, '\\s+', ' ', 'g')) \
         FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    ] {
        shape.extend(rows(client, sql).await);
    }
    shape
}

#[tokio::test]
async fn the_migrations_make_exactly_schema_postgres_sql() {
    let Some(server) = test_server() else {
        return;
    };
    let admin = connect(&server).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (migrated_db, fresh_db) = (
        format!("linkid_u_{suffix}_m"),
        format!("linkid_u_{suffix}_f"),
    );
    for name in [&migrated_db, &fresh_db] {
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
    }

    let config = DatabaseConfig {
        path: "unused.db".into(),
        url: Some(DatabaseUrl::new(with_dbname(&server, &migrated_db))),
        pool_size: 1,
        max_batch: 1,
        row_cache_bytes: 0,
        statement_timeout_secs: 5,
        clock: None,
    };
    let store = Store::open(&config, &IdRules::default()).await.unwrap();
    store.close().await;
    // Opening again finds the schema current and changes nothing.
    Store::open(&config, &IdRules::default())
        .await
        .unwrap()
        .close()
        .await;
    let migrated = connect(&with_dbname(&server, &migrated_db)).await;
    let fresh = connect(&with_dbname(&server, &fresh_db)).await;
    // schema.postgres.sql is for people: the test holds the migrations to it.
    fresh
        .batch_execute(include_str!("../../../schema.postgres.sql"))
        .await
        .unwrap();

    // ... and a database made from it by hand is one linkid takes as current.
    let by_hand = DatabaseConfig {
        url: Some(DatabaseUrl::new(with_dbname(&server, &fresh_db))),
        ..config.clone()
    };
    Store::open(&by_hand, &IdRules::default())
        .await
        .unwrap()
        .close()
        .await;

    let (want, got) = (shape_of(&fresh).await, shape_of(&migrated).await);
    let version = rows(&migrated, "SELECT version FROM linkid_schema_version").await;
    let written = rows(&fresh, "SELECT version FROM linkid_schema_version").await;
    drop((migrated, fresh));
    for name in [&migrated_db, &fresh_db] {
        admin
            .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
            .await
            .unwrap();
    }
    assert_eq!(got, want);
    assert!(want.len() > 20, "the shape covers the schema: {want:#?}");
    assert_eq!(version, [SCHEMA_VERSION.to_string()]);
    assert_eq!(written, version, "schema.postgres.sql records its version");
}

#[test]
fn the_append_lock_in_sql_is_linkids_lock_namespace() {
    assert!(MIGRATIONS[0].contains(&format!("pg_advisory_xact_lock({LOCK_NAMESPACE}, ")));
    assert!(include_str!("../../../schema.postgres.sql")
        .contains(&format!("pg_advisory_xact_lock({LOCK_NAMESPACE}, ")));
}

/// A new database on the test server, made to schema version 2 as linkid
/// wrote it (`MIGRATIONS[..2]`), holding `links` (user, provider, remote
/// id, username) made before version 2 and one revocation; its URL.
async fn version_2_database(admin: &Client, server: &str, links: &[[&str; 4]]) -> String {
    let name = format!(
        "linkid_u_{}_v2",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap();
    let url = with_dbname(server, &name);
    let client = connect(&url).await;
    client
        .batch_execute(
            "CREATE TABLE linkid_schema_version (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                version   integer NOT NULL
            );
            INSERT INTO linkid_schema_version (version) VALUES (2);",
        )
        .await
        .unwrap();
    client.batch_execute(MIGRATIONS[0]).await.unwrap();
    for [user, provider, remote, username] in links {
        client
            .execute(
                "INSERT INTO linked_identities (user_id, provider_id, linked_user_id, \
                 linked_username, created_at, updated_at) VALUES ($1, $2, $3, $4, now(), now())",
                &[user, provider, remote, username],
            )
            .await
            .unwrap();
    }
    client.batch_execute(MIGRATIONS[1]).await.unwrap();
    client
        .batch_execute("SELECT linkid_revoke('revoked-before-the-upgrade')")
        .await
        .unwrap();
    url
}

fn config_for(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        path: "unused.db".into(),
        url: Some(DatabaseUrl::new(url.to_owned())),
        pool_size: 1,
        max_batch: 1,
        row_cache_bytes: 0,
        statement_timeout_secs: 5,
        clock: None,
    }
}

#[tokio::test]
async fn a_version_2_database_upgrades_to_nfc_and_folds_keys_with_links_revocations_and_events_kept(
) {
    let Some(server) = test_server() else {
        return;
    };
    let admin = connect(&server).await;
    let url = version_2_database(
        &admin,
        &server,
        &[
            [
                "jose\u{301}",
                "corporate-saml",
                "CN=Jose\u{301}",
                "jose\u{301}@example.com",
            ],
            ["u-2", "azure-ad", "AAD-Guid-ABC", "grace@example.com"],
            ["u-3", "okta", "00uABC", "abc@example.com"],
            ["u-4", "okta", "00uabc", "abc.lower@example.com"],
        ],
    )
    .await;

    let store = Store::open(&config_for(&url), &IdRules::ignoring_case_at(["azure-ad"]))
        .await
        .unwrap();
    store.close().await;
    // Opening again with the same rules changes nothing.
    Store::open(&config_for(&url), &IdRules::ignoring_case_at(["azure-ad"]))
        .await
        .unwrap()
        .close()
        .await;

    let client = connect(&url).await;
    let links = rows(
        &client,
        "SELECT user_id, linked_user_id, linked_user_key, linked_username FROM linked_identities ORDER BY id",
    )
    .await;
    let events = rows(
        &client,
        "SELECT seq, type, user_id, actor FROM events ORDER BY seq",
    )
    .await;
    let revoked = rows(&client, "SELECT revocation_id FROM revoked_tokens").await;
    let version = rows(&client, "SELECT version FROM linkid_schema_version").await;
    let folding = rows(
        &client,
        "SELECT provider_id FROM case_insensitive_providers",
    )
    .await;
    drop(client);
    admin
        .batch_execute(&format!(
            "DROP DATABASE \"{}\" WITH (FORCE)",
            url.rsplit('/').next().unwrap()
        ))
        .await
        .unwrap();
    assert_eq!(
        links,
        [
            "jos\u{E9} | CN=Jos\u{E9} | CN=Jos\u{E9} | jos\u{E9}@example.com",
            "u-2 | AAD-Guid-ABC | aad-guid-abc | grace@example.com",
            "u-3 | 00uABC | 00uABC | abc@example.com",
            "u-4 | 00uabc | 00uabc | abc.lower@example.com",
        ]
    );
    assert_eq!(
        events,
        [
            "1 | LINKED | jose\u{301} | upgrade",
            "2 | LINKED | u-2 | upgrade",
            "3 | LINKED | u-3 | upgrade",
            "4 | LINKED | u-4 | upgrade",
            "5 | UNLINKED | jose\u{301} | upgrade",
            "6 | LINKED | jos\u{E9} | upgrade",
        ]
    );
    assert_eq!(revoked, ["revoked-before-the-upgrade"]);
    assert_eq!(version, [SCHEMA_VERSION.to_string()]);
    assert_eq!(folding, ["azure-ad"]);
}

#[tokio::test]
async fn an_open_that_would_make_two_links_one_is_refused_naming_both_and_changes_nothing() {
    let Some(server) = test_server() else {
        return;
    };
    let admin = connect(&server).await;
    let url = version_2_database(
        &admin,
        &server,
        &[
            ["jose\u{301}", "okta", "00u1", "n"],
            ["jos\u{E9}", "okta", "00u2", "n"],
            ["u-3", "azure-ad", "00uABC", "n"],
            ["u-4", "azure-ad", "00uabc", "n"],
        ],
    )
    .await;

    let nfc = Store::open(&config_for(&url), &IdRules::default())
        .await
        .err()
        .expect("refused")
        .to_string();
    // With the NFC clash gone, folding azure-ad's ids clashes.
    connect(&url)
        .await
        .batch_execute("DELETE FROM linked_identities WHERE linked_user_id = '00u2'")
        .await
        .unwrap();
    let fold = Store::open(&config_for(&url), &IdRules::ignoring_case_at(["azure-ad"]))
        .await
        .err()
        .expect("refused")
        .to_string();

    let client = connect(&url).await;
    let version = rows(&client, "SELECT version FROM linkid_schema_version").await;
    let users = rows(&client, "SELECT user_id FROM linked_identities ORDER BY id").await;
    drop(client);
    admin
        .batch_execute(&format!(
            "DROP DATABASE \"{}\" WITH (FORCE)",
            url.rsplit('/').next().unwrap()
        ))
        .await
        .unwrap();
    for named in [r#""jose\u{301}""#, r#""jos\u{e9}""#, "NFC"] {
        assert!(nfc.contains(named), "{named} in {nfc}");
    }
    for named in [
        "azure-ad",
        "u-3",
        "u-4",
        "00uABC",
        "00uabc",
        "case_insensitive_ids",
    ] {
        assert!(fold.contains(named), "{named} in {fold}");
    }
    assert_eq!(version, ["2"], "nothing was changed");
    assert_eq!(users, ["jose\u{301}", "u-3", "u-4"]);
}

#[test]
fn the_connection_has_linkids_defaults_where_the_url_names_none() {
    let timeout = std::time::Duration::from_secs(5);
    let bare = DatabaseUrl::new("postgres://h/d").parse().unwrap();
    let named = DatabaseUrl::new(
        "postgres://u:pw@h/d?application_name=app&connect_timeout=9&sslmode=verify-ca&sslrootcert=/ca.pem",
    )
    .parse()
    .unwrap();

    let bare = super::connection_config(&bare, timeout);
    let named = super::connection_config(&named, timeout);

    let user = std::env::var("USER").unwrap_or_else(|_| "postgres".into());
    assert_eq!(bare.get_user(), Some(user.as_str()));
    assert_eq!(bare.get_application_name(), Some("linkid"));
    assert_eq!(bare.get_connect_timeout(), Some(&timeout));
    assert_eq!(named.get_user(), Some("u"));
    assert_eq!(named.get_password(), Some(&b"pw"[..]));
    assert_eq!(named.get_application_name(), Some("app"));
    assert_eq!(
        named.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(9))
    );
    assert_eq!(
        named.get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    for config in [bare, named] {
        assert_eq!(config.get_options(), Some("-c statement_timeout=5000"));
    }
}
