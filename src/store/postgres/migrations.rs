//! The PostgreSQL schema's versions and the upgrade that start-up runs:
//! in order, in one transaction, under an advisory lock, so that instances
//! started together on an empty database all come up (one creates the
//! schema; the others wait for it and find it done).

use anyhow::Context;
use deadpool_postgres::Object;

use super::LOCK_NAMESPACE;

/// Each schema version's upgrade from the one before, in order:
/// `MIGRATIONS[i]` makes version `i + 1`. Released versions never change.
/// schema.postgres.sql shows the result; a test holds the two together.
pub(super) const MIGRATIONS: [&str; 2] = [
    // 1: links and revocations.
    "CREATE TABLE linked_identities (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id         text NOT NULL,
        provider_id     text NOT NULL,
        linked_user_id  text NOT NULL,
        linked_username text NOT NULL,
        created_at      timestamptz NOT NULL,
        updated_at      timestamptz NOT NULL,
        CONSTRAINT one_link_per_user UNIQUE (user_id),
        CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_id)
    );
    CREATE FUNCTION linkid_next_seq(sequence regclass) RETURNS bigint
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(1818848875, sequence::oid::integer);
        RETURN nextval(sequence);
    END
    $$;
    CREATE TABLE revoked_tokens (
        seq           bigint PRIMARY KEY,
        revocation_id text NOT NULL UNIQUE,
        revoked_at    timestamptz NOT NULL
    );
    CREATE SEQUENCE revoked_tokens_seq AS bigint OWNED BY revoked_tokens.seq;
    CREATE FUNCTION linkid_revoke(revocation text) RETURNS boolean
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM revoked_tokens WHERE revocation_id = revocation) THEN
            RETURN false;
        END IF;
        INSERT INTO revoked_tokens (seq, revocation_id, revoked_at)
        VALUES (linkid_next_seq('revoked_tokens_seq'), revocation, now())
        ON CONFLICT (revocation_id) DO NOTHING;
        RETURN FOUND;
    END
    $$;",
    // 2: search in user_id byte order (as SQLite compares), the change
    // feed. Links made before it enter the feed as LINKED events by
    // `upgrade`, so that replaying the feed from the start rebuilds them.
    "CREATE INDEX links_by_user ON linked_identities (user_id COLLATE \"C\");
    CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id COLLATE \"C\");
    CREATE TABLE events (
        seq             bigint PRIMARY KEY,
        type            text NOT NULL CHECK (type IN ('LINKED', 'UPDATED', 'UNLINKED')),
        occurred_at     timestamptz NOT NULL,
        user_id         text NOT NULL,
        provider_id     text NOT NULL,
        linked_user_id  text NOT NULL,
        linked_username text NOT NULL,
        actor           text NOT NULL,
        subject         text,
        request_id      text
    );
    CREATE SEQUENCE events_seq AS bigint OWNED BY events.seq;
    CREATE TABLE feed_state (
        singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        pruned_through bigint NOT NULL
    );
    INSERT INTO feed_state (pruned_through) VALUES (0);
    INSERT INTO events (seq, type, occurred_at, user_id, provider_id, linked_user_id, linked_username, actor)
        SELECT linkid_next_seq('events_seq'), 'LINKED', created_at, user_id, provider_id,
               linked_user_id, linked_username, 'upgrade'
        FROM (SELECT * FROM linked_identities ORDER BY id) AS existing;",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Where the version is kept: one row, made before the first migration.
const VERSION_TABLE: &str = "CREATE TABLE linkid_schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   integer NOT NULL
)";

/// Upgrades the schema to `SCHEMA_VERSION` in one transaction, or refuses
/// a database written by a newer linkid. `database` names it in messages.
pub(super) async fn migrate(client: &mut Object, database: &str) -> anyhow::Result<()> {
    let tx = client
        .transaction()
        .await
        .context("cannot begin the schema check")?;
    // An upgrade may rewrite big tables, and waiting here for another
    // instance's upgrade is expected: no statement timeout.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .context("cannot configure the schema check")?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_NAMESPACE])
        .await
        .context("cannot take the schema lock")?;
    let tables = tx
        .query_one(
            "SELECT to_regclass('linkid_schema_version') IS NOT NULL, \
                    to_regclass('linked_identities') IS NOT NULL",
            &[],
        )
        .await
        .context("cannot read the schema")?;
    let (has_version, has_links): (bool, bool) = (tables.get(0), tables.get(1));
    let version = if has_version {
        let row = tx
            .query_opt("SELECT version FROM linkid_schema_version", &[])
            .await
            .context("cannot read the schema version")?;
        row.map_or(0, |r| i64::from(r.get::<_, i32>(0)))
    } else {
        anyhow::ensure!(
            !has_links,
            "the database at {database} has a linked_identities table but no linkid schema version: it belongs to something else; give linkid a database of its own"
        );
        tx.batch_execute(VERSION_TABLE)
            .await
            .context("cannot create the schema version table (does the role own the database, or may it create tables in its schema?)")?;
        0
    };
    super::super::refuse_newer(version, SCHEMA_VERSION, database)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    for (done, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration)
            .await
            .with_context(|| format!("cannot upgrade the schema to version {}", done + 1))?;
    }
    tx.execute(
        "INSERT INTO linkid_schema_version (version) VALUES ($1) \
         ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
        &[&(SCHEMA_VERSION as i32)],
    )
    .await
    .context("cannot record the schema version")?;
    tx.commit()
        .await
        .context("cannot commit the schema upgrade")?;
    if version == 0 {
        tracing::info!(version = SCHEMA_VERSION, "created the database schema");
    } else {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "upgraded the database schema"
        );
    }
    Ok(())
}
