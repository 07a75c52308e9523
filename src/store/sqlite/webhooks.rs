//! Where each webhook stands, on SQLite: the `webhook_standings` rows the
//! delivery engine reads and saves and `linkid webhooks` shows and
//! changes (`Backend::webhook_standing` and the rest). Writes run on the
//! writer's batch like every other write; reads on a pooled connection.
//!
//! There is no lease here: one server at a time opens a SQLite file (see
//! `lock`), so that server delivers every webhook. Commands beside it
//! (`replay`, `enable`) only bump a standing's `generation`, which the
//! server's next `save` of an older generation sees.

use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::queries::OrStore;
use crate::domain::{WebhookStanding, WebhookState};
use crate::store::StoreError;

/// A standing's columns, in `standing_from_row`'s order.
const COLUMNS: &str = "webhook, state, delivered_seq, attempts, last_attempt_at, last_status, \
                       last_error, next_attempt_at, generation";

/// The stored standing of `webhook`, if any.
pub(super) fn standing_of(
    conn: &Connection,
    webhook: &str,
) -> rusqlite::Result<Option<WebhookStanding>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM webhook_standings WHERE webhook = ?1"
    ))?
    .query_row([webhook], standing_from_row)
    .optional()
}

/// The standing of `webhook`, stored first as `WebhookStanding::new` when
/// there is none.
pub(super) fn standing_in(
    conn: &Connection,
    webhook: &str,
    start_after: i64,
) -> Result<WebhookStanding, StoreError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO webhook_standings (webhook, state, delivered_seq, attempts, generation) \
         VALUES (?1, 'ACTIVE', ?2, 0, 0)",
    )
    .and_then(|mut s| s.execute(params![webhook, start_after]))
    .or_store("cannot store a webhook's first standing")?;
    standing_of(conn, webhook)
        .or_store("cannot read a webhook's standing")?
        .ok_or_else(|| anyhow::anyhow!("a webhook's standing vanished as it was stored").into())
}

/// Stores `standing` when its generation is still the stored one; true
/// when it was stored.
pub(super) fn save_in(conn: &Connection, standing: &WebhookStanding) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE webhook_standings SET state = ?2, delivered_seq = ?3, attempts = ?4, \
             last_attempt_at = ?5, last_status = ?6, last_error = ?7, next_attempt_at = ?8 \
             WHERE webhook = ?1 AND generation = ?9",
        )
        .and_then(|mut s| {
            s.execute(params![
                standing.webhook,
                standing.state.as_str(),
                standing.delivered_seq,
                standing.attempts,
                standing.last_attempt_at.map(time_text),
                standing.last_status,
                standing.last_error,
                standing.next_attempt_at.map(time_text),
                standing.generation,
            ])
        })
        .or_store("cannot save a webhook's standing")?;
    Ok(changed == 1)
}

/// `linkid webhooks replay`: the webhook resumes after `after`, `ACTIVE`
/// and with its history cleared, in a new generation (stored first when
/// it has no standing yet).
pub(super) fn replay_in(
    conn: &Connection,
    webhook: &str,
    after: i64,
) -> Result<WebhookStanding, StoreError> {
    conn.prepare_cached(
        "INSERT INTO webhook_standings (webhook, state, delivered_seq, attempts, generation) \
         VALUES (?1, 'ACTIVE', ?2, 0, 1) \
         ON CONFLICT (webhook) DO UPDATE SET state = 'ACTIVE', delivered_seq = ?2, attempts = 0, \
             last_attempt_at = NULL, last_status = NULL, last_error = NULL, \
             next_attempt_at = NULL, generation = generation + 1",
    )
    .and_then(|mut s| s.execute(params![webhook, after]))
    .or_store("cannot replay a webhook")?;
    standing_of(conn, webhook)
        .or_store("cannot read a webhook's standing")?
        .ok_or_else(|| anyhow::anyhow!("a replayed webhook's standing vanished").into())
}

/// `linkid webhooks enable`: a `DISABLED` webhook becomes `ACTIVE` in a
/// new generation, resuming with the refused event; the standing after.
pub(super) fn enable_in(
    conn: &Connection,
    webhook: &str,
) -> Result<Option<WebhookStanding>, StoreError> {
    conn.prepare_cached(
        "UPDATE webhook_standings SET state = 'ACTIVE', attempts = 0, next_attempt_at = NULL, \
         generation = generation + 1 WHERE webhook = ?1 AND state = 'DISABLED'",
    )
    .and_then(|mut s| s.execute([webhook]))
    .or_store("cannot enable a webhook")?;
    standing_of(conn, webhook).or_store("cannot read a webhook's standing")
}

/// Every stored standing, by id, with the events after its `delivered_seq`.
pub(super) fn standings_in(conn: &Connection) -> rusqlite::Result<Vec<(WebhookStanding, i64)>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS}, (SELECT count(*) FROM events WHERE seq > delivered_seq) \
         FROM webhook_standings ORDER BY webhook"
    ))?;
    let rows = statement.query_map([], |row| Ok((standing_from_row(row)?, row.get(9)?)))?;
    rows.collect()
}

/// A `webhook_standings` row, in `COLUMNS` order.
fn standing_from_row(row: &Row<'_>) -> rusqlite::Result<WebhookStanding> {
    let state: String = row.get(1)?;
    Ok(WebhookStanding {
        webhook: row.get(0)?,
        state: WebhookState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown webhook state {state:?}").into(),
            )
        })?,
        delivered_seq: row.get(2)?,
        attempts: row.get(3)?,
        last_attempt_at: time_from(row, 4)?,
        last_status: row.get(5)?,
        last_error: row.get(6)?,
        next_attempt_at: time_from(row, 7)?,
        generation: row.get(8)?,
    })
}

/// A time as stored: RFC 3339 UTC with milliseconds.
fn time_text(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn time_from(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<SystemTime>> {
    let text: Option<String> = row.get(column)?;
    text.map(|text| {
        humantime::parse_rfc3339(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e.into())
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::schema::migrate;
    use super::*;
    use crate::domain::IdRules;

    fn database() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:"), &IdRules::default()).unwrap();
        conn
    }

    #[test]
    fn a_standing_is_stored_once_and_saved_only_in_its_generation() {
        let conn = database();
        let mut first = standing_in(&conn, "crm", 7).unwrap();
        assert_eq!(standing_in(&conn, "crm", 99).unwrap(), first);

        first.state = WebhookState::Retrying;
        first.attempts = 2;
        first.last_status = Some(500);
        first.last_error = Some("HTTP 500".into());
        first.last_attempt_at =
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123));
        assert!(save_in(&conn, &first).unwrap());
        assert_eq!(standing_of(&conn, "crm").unwrap().unwrap(), first);

        let replayed = replay_in(&conn, "crm", 3).unwrap();
        assert!(!save_in(&conn, &first).unwrap(), "an older generation");
        assert_eq!(replayed.generation, 1);
        assert_eq!(
            replayed,
            WebhookStanding {
                generation: 1,
                ..WebhookStanding::new("crm", 3)
            }
        );
    }

    #[test]
    fn enable_moves_only_a_disabled_webhook() {
        let conn = database();
        let mut standing = standing_in(&conn, "crm", 0).unwrap();
        assert_eq!(enable_in(&conn, "crm").unwrap().unwrap().generation, 0);
        standing.state = WebhookState::Disabled;
        standing.last_status = Some(410);
        save_in(&conn, &standing).unwrap();

        let enabled = enable_in(&conn, "crm").unwrap().unwrap();

        assert_eq!(enabled.state, WebhookState::Active);
        assert_eq!(enabled.generation, 1);
        assert_eq!(enabled.last_status, Some(410), "the history stays");
        assert_eq!(enable_in(&conn, "unknown").unwrap(), None);
    }
}
