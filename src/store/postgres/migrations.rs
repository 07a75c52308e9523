//! The PostgreSQL schema's versions and the upgrade that start-up runs:
//! in order, in one transaction, under an advisory lock, so that instances
//! started together on an empty database all come up (one creates the
//! schema; the others wait for it and find it done).

use anyhow::Context;
use deadpool_postgres::{Object, Transaction};

use super::LOCK_NAMESPACE;
use crate::domain::{IdRules, LinkRecord};
use crate::store::keys;

/// Each schema version's upgrade from the one before, in order:
/// `MIGRATIONS[i]` makes version `i + 1`. Released versions never change.
/// schema.postgres.sql shows the result; a test holds the two together.
pub(super) const MIGRATIONS: [&str; 4] = [
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
    // 3: remote ids compared by a stored key (the id itself, or its case
    // fold at a provider with case_insensitive_ids), unique per provider in
    // place of the id (the constraint keeps its name); which providers
    // fold, as last applied. `upgrade_to_nfc` then puts the stored texts in
    // NFC, and `apply_rules` folds the keys the configuration asks for.
    "ALTER TABLE linked_identities ADD COLUMN linked_user_key text;
    UPDATE linked_identities SET linked_user_key = linked_user_id;
    ALTER TABLE linked_identities ALTER COLUMN linked_user_key SET NOT NULL;
    ALTER TABLE linked_identities DROP CONSTRAINT one_user_per_remote_identity;
    ALTER TABLE linked_identities
        ADD CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_key);
    CREATE TABLE case_insensitive_providers (
        provider_id text PRIMARY KEY
    );",
    // 4: where each webhook stands (`domain::WebhookStanding`), and who
    // delivers for it: one instance at a time holds a webhook's lease,
    // until `until` by the database's clock unless renewed.
    "CREATE TABLE webhook_standings (
        webhook         text PRIMARY KEY,
        state           text NOT NULL CHECK (state IN ('ACTIVE', 'RETRYING', 'DISABLED', 'EXPIRED')),
        delivered_seq   bigint NOT NULL,
        attempts        integer NOT NULL,
        last_attempt_at timestamptz,
        last_status     integer,
        last_error      text,
        next_attempt_at timestamptz,
        generation      bigint NOT NULL
    );
    CREATE TABLE webhook_leases (
        webhook text PRIMARY KEY,
        holder  text NOT NULL,
        until   timestamptz NOT NULL
    );",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Where the version is kept: one row, made before the first migration.
const VERSION_TABLE: &str = "CREATE TABLE linkid_schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   integer NOT NULL
)";

/// Upgrades the schema to `SCHEMA_VERSION` and brings the comparison keys
/// to `rules` (`apply_rules`), in one transaction: a refusal changes
/// nothing. Refuses a database written by a newer linkid. `database` names
/// it in messages.
pub(super) async fn migrate(
    client: &mut Object,
    database: &str,
    rules: &IdRules,
) -> anyhow::Result<()> {
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
    let upgrading = version != SCHEMA_VERSION;
    if upgrading {
        for (done, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let to = done + 1;
            tx.batch_execute(migration)
                .await
                .with_context(|| format!("cannot upgrade the schema to version {to}"))?;
            if to == 3 {
                upgrade_to_nfc(&tx).await?;
            }
        }
        tx.execute(
            "INSERT INTO linkid_schema_version (version) VALUES ($1) \
             ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
            &[&(SCHEMA_VERSION as i32)],
        )
        .await
        .context("cannot record the schema version")?;
    }
    apply_rules(&tx, rules).await?;
    tx.commit()
        .await
        .context("cannot commit the schema upgrade")?;
    if version == 0 {
        tracing::info!(version = SCHEMA_VERSION, "created the database schema");
    } else if upgrading {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "upgraded the database schema"
        );
    }
    Ok(())
}

/// Schema 3's step in Rust, as SQLite's `upgrade_to_nfc`: every stored id
/// and username in NFC, read in chunks of the rows that hold any
/// non-ASCII; a link that changes enters the feed as it changed (actor
/// `upgrade`); two links that NFC makes one stop the upgrade, named. The
/// normalization is linkid's own (ICU4X), not the server's `normalize()`,
/// so that every backend agrees.
async fn upgrade_to_nfc(tx: &Transaction<'_>) -> anyhow::Result<()> {
    let chunk = tx
        .prepare(
            "SELECT id, user_id, provider_id, linked_user_id, linked_username FROM linked_identities \
             WHERE id > $1 AND (octet_length(user_id) <> char_length(user_id) \
                 OR octet_length(provider_id) <> char_length(provider_id) \
                 OR octet_length(linked_user_id) <> char_length(linked_user_id) \
                 OR octet_length(linked_username) <> char_length(linked_username)) \
             ORDER BY id LIMIT 1000",
        )
        .await
        .context("cannot prepare the upgrade to NFC")?;
    let record_event = tx
        .prepare(
            "INSERT INTO events (seq, type, occurred_at, user_id, provider_id, linked_user_id, \
             linked_username, actor) \
             VALUES (linkid_next_seq('events_seq'), $1, now(), $2, $3, $4, $5, 'upgrade')",
        )
        .await
        .context("cannot prepare the upgrade's events")?;
    let mut after = 0_i64;
    loop {
        let rows = tx
            .query(&chunk, &[&after])
            .await
            .context("cannot read the links to put in NFC")?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.get(0);
        for row in &rows {
            let id: i64 = row.get(0);
            let old = LinkRecord {
                user_id: row.get(1),
                provider_id: row.get(2),
                linked_user_id: row.get(3),
                linked_username: row.get(4),
                created_at: String::new(),
                updated_at: String::new(),
            };
            let Some(new) = keys::in_nfc(&old) else {
                continue;
            };
            if let Some(other) = tx
                .query_opt(
                    "SELECT user_id FROM linked_identities WHERE user_id = $1 AND id <> $2",
                    &[&new.user_id, &id],
                )
                .await?
            {
                anyhow::bail!(keys::nfc_collision(
                    "user_id",
                    &old.user_id,
                    &other.get::<_, String>(0)
                ));
            }
            if let Some(other) = tx
                .query_opt(
                    "SELECT linked_user_id FROM linked_identities \
                     WHERE provider_id = $1 AND linked_user_key = $2 AND id <> $3",
                    &[&new.provider_id, &new.linked_user_id, &id],
                )
                .await?
            {
                let field = format!("linked_user_id at {:?}", new.provider_id);
                anyhow::bail!(keys::nfc_collision(
                    &field,
                    &old.linked_user_id,
                    &other.get::<_, String>(0)
                ));
            }
            tx.execute(
                "UPDATE linked_identities SET user_id = $2, provider_id = $3, linked_user_id = $4, \
                 linked_user_key = $4, linked_username = $5 WHERE id = $1",
                &[&id, &new.user_id, &new.provider_id, &new.linked_user_id, &new.linked_username],
            )
            .await
            .context("cannot put a link in NFC")?;
            let same_ids = (&new.user_id, &new.provider_id, &new.linked_user_id)
                == (&old.user_id, &old.provider_id, &old.linked_user_id);
            let changes: &[(&str, &LinkRecord)] = if same_ids {
                &[("UPDATED", &new)]
            } else {
                &[("UNLINKED", &old), ("LINKED", &new)]
            };
            for (kind, link) in changes {
                tx.execute(
                    &record_event,
                    &[
                        kind,
                        &link.user_id,
                        &link.provider_id,
                        &link.linked_user_id,
                        &link.linked_username,
                    ],
                )
                .await
                .context("cannot record the upgrade's events")?;
            }
        }
    }
}

/// Brings the comparison keys to `rules`, as SQLite's `apply_rules`: each
/// provider whose rule differs from the one recorded has its keys
/// recomputed (`keys::rekey` refuses a change that would make two links
/// one), and the rules are recorded. Runs under the schema lock, so
/// instances starting together do it once.
async fn apply_rules(tx: &Transaction<'_>, rules: &IdRules) -> anyhow::Result<()> {
    let recorded: Vec<String> = tx
        .query("SELECT provider_id FROM case_insensitive_providers", &[])
        .await
        .context("cannot read which providers compare ids ignoring case")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let changed = keys::changed_providers(&recorded, rules);
    if changed.is_empty() {
        return Ok(());
    }
    for provider in &changed {
        let links: Vec<keys::Keyed> = tx
            .query(
                "SELECT id, user_id, linked_user_id, linked_user_key FROM linked_identities \
                 WHERE provider_id = $1",
                &[provider],
            )
            .await
            .context("cannot read a provider's links")?
            .iter()
            .map(|r| keys::Keyed {
                id: r.get(0),
                user_id: r.get(1),
                linked_user_id: r.get(2),
                linked_user_key: r.get(3),
            })
            .collect();
        let changes = keys::rekey(provider, &links, rules).map_err(anyhow::Error::msg)?;
        let update = tx
            .prepare("UPDATE linked_identities SET linked_user_key = $2 WHERE id = $1")
            .await?;
        for (id, key) in &changes {
            tx.execute(&update, &[id, key])
                .await
                .context("cannot store a comparison key")?;
        }
        tracing::info!(
            provider = %provider,
            case_insensitive_ids = rules.ignores_case(provider),
            links = changes.len(),
            "recomputed the comparison keys of a provider whose case_insensitive_ids changed"
        );
    }
    let providers: Vec<&str> = rules.case_insensitive_providers().collect();
    tx.execute("DELETE FROM case_insensitive_providers", &[])
        .await?;
    tx.execute(
        "INSERT INTO case_insensitive_providers (provider_id) SELECT unnest($1::text[])",
        &[&providers],
    )
    .await
    .context("cannot record which providers compare ids ignoring case")?;
    Ok(())
}
