//! The SQLite schema and its upgrades: every version's migration, in
//! order, from release 0.1.0's tables to `SCHEMA_VERSION`, the NFC step of
//! version 3 (which SQL cannot do), and bringing the remote ids' comparison
//! keys to the configured rules. `schema.sql` is the same schema for people
//! to read; a test holds the two together.

use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::queries::{now, record_event};
use crate::domain::{Actor, EventType, IdRules, LinkRecord};
use crate::store::keys;

/// Each schema version's upgrade from the one before, in order:
/// `MIGRATIONS[i]` makes version `i + 1`. Released versions never change.
const MIGRATIONS: [&str; 4] = [
    // 1: release 0.1.0 (which recorded no version): links and revocations.
    "CREATE TABLE linked_identities (
        id              INTEGER PRIMARY KEY,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        CONSTRAINT one_link_per_user UNIQUE (user_id),
        CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_id)
    ) STRICT;
    CREATE TABLE revoked_tokens (
        seq           INTEGER PRIMARY KEY,
        revocation_id TEXT NOT NULL UNIQUE,
        revoked_at    TEXT NOT NULL
    ) STRICT;",
    // 2: search by provider, the change feed. Links made before it enter
    // the feed as LINKED events by `upgrade`, so that replaying the feed
    // from the start rebuilds every stored link. (A seq is the rowid, one
    // more than the newest; pruning always keeps the newest event, so a
    // seq is never handed out twice.)
    "CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id);
    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY,
        type            TEXT NOT NULL CHECK (type IN ('LINKED', 'UPDATED', 'UNLINKED')),
        occurred_at     TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        actor           TEXT NOT NULL,
        subject         TEXT,
        request_id      TEXT
    ) STRICT;
    CREATE TABLE feed_state (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        pruned_through INTEGER NOT NULL
    ) STRICT;
    INSERT INTO feed_state (id, pruned_through) VALUES (1, 0);
    INSERT INTO events (type, occurred_at, user_id, provider_id, linked_user_id, linked_username, actor)
        SELECT 'LINKED', created_at, user_id, provider_id, linked_user_id, linked_username, 'upgrade'
        FROM linked_identities ORDER BY id;",
    // 3: remote ids compared by a stored key (the id itself, or its case
    // fold at a provider with case_insensitive_ids), unique per provider in
    // place of the id; which providers fold, as last applied. SQLite
    // changes a UNIQUE constraint by rebuilding the table (rowids kept).
    // `upgrade_to_nfc` then puts the stored texts in NFC, and `apply_rules`
    // folds the keys the configuration asks for.
    "CREATE TABLE linked_identities_v3 (
        id              INTEGER PRIMARY KEY,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_user_key TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        CONSTRAINT one_link_per_user UNIQUE (user_id),
        CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_key)
    ) STRICT;
    INSERT INTO linked_identities_v3 (id, user_id, provider_id, linked_user_id, linked_user_key,
                                      linked_username, created_at, updated_at)
        SELECT id, user_id, provider_id, linked_user_id, linked_user_id, linked_username,
               created_at, updated_at
        FROM linked_identities ORDER BY id;
    DROP TABLE linked_identities;
    ALTER TABLE linked_identities_v3 RENAME TO linked_identities;
    CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id);
    CREATE TABLE case_insensitive_providers (
        provider_id TEXT PRIMARY KEY
    ) STRICT;",
    // 4: where each webhook stands (`domain::WebhookStanding`), so that a
    // restart resumes its delivery. Times are RFC 3339 UTC. No lease: one
    // server at a time opens a SQLite file.
    "CREATE TABLE webhook_standings (
        webhook         TEXT PRIMARY KEY,
        state           TEXT NOT NULL CHECK (state IN ('ACTIVE', 'RETRYING', 'DISABLED', 'EXPIRED')),
        delivered_seq   INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        last_attempt_at TEXT,
        last_status     INTEGER,
        last_error      TEXT,
        next_attempt_at TEXT,
        generation      INTEGER NOT NULL
    ) STRICT;",
];

/// The schema version this binary writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Upgrades the schema to `SCHEMA_VERSION` and brings the comparison keys
/// to `rules` (`apply_rules`), in one transaction: a refusal changes
/// nothing. Refuses a database written by a newer linkid.
pub(super) fn migrate(conn: &mut Connection, path: &Path, rules: &IdRules) -> anyhow::Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("cannot lock the database to check its schema")?;
    let recorded: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .context("cannot read the schema version")?;
    let has_links: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'linked_identities'",
            [],
            |r| r.get(0),
        )
        .context("cannot read the schema")?;
    // Release 0.1.0 wrote version 1's tables and no version number.
    let version = if recorded == 0 && has_links {
        1
    } else {
        recorded
    };
    crate::store::refuse_newer(version, SCHEMA_VERSION, &path.display().to_string())?;
    let upgrading = recorded != SCHEMA_VERSION;
    if upgrading {
        for (done, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let to = done + 1;
            tx.execute_batch(migration)
                .with_context(|| format!("cannot upgrade the schema to version {to}"))?;
            if to == 3 {
                upgrade_to_nfc(&tx)?;
            }
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .context("cannot record the schema version")?;
    }
    apply_rules(&tx, rules)?;
    tx.commit().context("cannot commit the schema upgrade")?;
    if upgrading && has_links {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "upgraded the database schema"
        );
    }
    Ok(())
}

/// Schema 3's step in Rust: every stored id and username in NFC (see
/// `keys::in_nfc`), read in chunks of the rows that hold any non-ASCII
/// (ASCII is NFC already). A link that changes enters the feed as it
/// changed, by actor `upgrade`: UNLINKED in its old form and LINKED in the
/// new when an id changed (so that a consumer keyed by ids follows), else
/// UPDATED. Two links that NFC makes one stop the upgrade, named.
fn upgrade_to_nfc(conn: &Connection) -> anyhow::Result<()> {
    const NOT_ASCII: &str =
        "SELECT id, user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
         FROM linked_identities WHERE id > ?1 AND ( \
             length(user_id) <> length(CAST(user_id AS BLOB)) \
             OR length(provider_id) <> length(CAST(provider_id AS BLOB)) \
             OR length(linked_user_id) <> length(CAST(linked_user_id AS BLOB)) \
             OR length(linked_username) <> length(CAST(linked_username AS BLOB))) \
         ORDER BY id LIMIT 1000";
    let stamp = now();
    let actor = Actor {
        actor: "upgrade".into(),
        subject: None,
        request_id: None,
    };
    let mut after = 0;
    loop {
        let rows: Vec<(i64, LinkRecord)> = conn
            .prepare(NOT_ASCII)?
            .query_map([after], |r| {
                Ok((
                    r.get(0)?,
                    LinkRecord {
                        user_id: r.get(1)?,
                        provider_id: r.get(2)?,
                        linked_user_id: r.get(3)?,
                        linked_username: r.get(4)?,
                        created_at: r.get(5)?,
                        updated_at: r.get(6)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()
            .context("cannot read the links to put in NFC")?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(());
        };
        after = last;
        for (id, old) in rows {
            let Some(new) = keys::in_nfc(&old) else {
                continue;
            };
            let same_user: Option<String> = conn
                .query_row(
                    "SELECT user_id FROM linked_identities WHERE user_id = ?1 AND id <> ?2",
                    params![new.user_id, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = same_user {
                anyhow::bail!(keys::nfc_collision("user_id", &old.user_id, &other));
            }
            let same_remote: Option<String> = conn
                .query_row(
                    "SELECT linked_user_id FROM linked_identities \
                     WHERE provider_id = ?1 AND linked_user_key = ?2 AND id <> ?3",
                    params![new.provider_id, new.linked_user_id, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = same_remote {
                let field = format!("linked_user_id at {:?}", new.provider_id);
                anyhow::bail!(keys::nfc_collision(&field, &old.linked_user_id, &other));
            }
            conn.execute(
                "UPDATE linked_identities SET user_id = ?2, provider_id = ?3, linked_user_id = ?4, \
                 linked_user_key = ?4, linked_username = ?5 WHERE id = ?1",
                params![
                    id,
                    new.user_id,
                    new.provider_id,
                    new.linked_user_id,
                    new.linked_username
                ],
            )
            .context("cannot put a link in NFC")?;
            if (&new.user_id, &new.provider_id, &new.linked_user_id)
                == (&old.user_id, &old.provider_id, &old.linked_user_id)
            {
                record_event(conn, EventType::Updated, &new, &actor, &stamp)?;
            } else {
                record_event(conn, EventType::Unlinked, &old, &actor, &stamp)?;
                record_event(conn, EventType::Linked, &new, &actor, &stamp)?;
            }
        }
    }
}

/// Brings the comparison keys to `rules`: the keys of each provider whose
/// rule differs from the one recorded are recomputed (`keys::rekey`, which
/// refuses a change that would make two links one), and the rules are
/// recorded. Nothing to do, and no write, when they are unchanged.
fn apply_rules(conn: &Connection, rules: &IdRules) -> anyhow::Result<()> {
    let recorded: Vec<String> = conn
        .prepare("SELECT provider_id FROM case_insensitive_providers")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .context("cannot read which providers compare ids ignoring case")?;
    let changed = keys::changed_providers(&recorded, rules);
    if changed.is_empty() {
        return Ok(());
    }
    for provider in &changed {
        let links: Vec<keys::Keyed> = conn
            .prepare(
                "SELECT id, user_id, linked_user_id, linked_user_key FROM linked_identities \
                 WHERE provider_id = ?1",
            )?
            .query_map([provider], |r| {
                Ok(keys::Keyed {
                    id: r.get(0)?,
                    user_id: r.get(1)?,
                    linked_user_id: r.get(2)?,
                    linked_user_key: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()
            .context("cannot read a provider's links")?;
        let changes = keys::rekey(provider, &links, rules).map_err(anyhow::Error::msg)?;
        let mut update =
            conn.prepare("UPDATE linked_identities SET linked_user_key = ?2 WHERE id = ?1")?;
        for (id, key) in &changes {
            update
                .execute(params![id, key])
                .context("cannot store a comparison key")?;
        }
        tracing::info!(
            provider = %provider,
            case_insensitive_ids = rules.ignores_case(provider),
            links = changes.len(),
            "recomputed the comparison keys of a provider whose case_insensitive_ids changed"
        );
    }
    conn.execute("DELETE FROM case_insensitive_providers", [])?;
    for provider in rules.case_insensitive_providers() {
        conn.execute(
            "INSERT INTO case_insensitive_providers (provider_id) VALUES (?1)",
            [provider],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each table's columns (name, type, not null, key), whatever the SQL
    /// text's layout and comments.
    fn shape_of(conn: &Connection) -> Vec<String> {
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tables
            .into_iter()
            .map(|name| {
                let mut columns: Vec<String> = conn
                    .prepare(&format!(
                        "SELECT name, type, \"notnull\", pk FROM pragma_table_info('{name}')"
                    ))
                    .unwrap()
                    .query_map([], |r| {
                        Ok(format!(
                            "{}:{}:{}:{}",
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?
                        ))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                columns.sort();
                format!("{name}({})", columns.join(","))
            })
            .collect()
    }

    #[test]
    fn the_migrations_make_exactly_schema_sql() {
        let mut migrated = Connection::open_in_memory().unwrap();
        migrate(&mut migrated, Path::new(":memory:"), &IdRules::default()).unwrap();
        let fresh = Connection::open_in_memory().unwrap();
        // schema.sql is for people: a test holds the migrations to it.
        fresh
            .execute_batch(include_str!("../../../schema.sql"))
            .unwrap();

        assert_eq!(shape_of(&migrated), shape_of(&fresh));
        let indexes = |conn: &Connection| -> Vec<String> {
            conn.prepare("SELECT tbl_name || ':' || count(*) FROM sqlite_master WHERE type = 'index' GROUP BY tbl_name ORDER BY 1")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(indexes(&migrated), indexes(&fresh));
        let version: i64 = migrated
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_database_newer_than_the_binary_is_refused_naming_both_versions() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
            .unwrap();

        let error = migrate(&mut conn, Path::new("x.db"), &IdRules::default())
            .unwrap_err()
            .to_string();

        assert!(
            error.contains(&format!("version {}", SCHEMA_VERSION + 5)),
            "{error}"
        );
        assert!(
            error.contains(&format!("version {SCHEMA_VERSION}")),
            "{error}"
        );
    }
}
