//! Where each webhook stands, on PostgreSQL, and who delivers for it: the
//! `webhook_standings` rows the delivery engine reads and saves, and the
//! `webhook_leases` that let one instance at a time deliver a webhook.
//!
//! A lease runs until `until` by the database's clock (`clock_timestamp()`,
//! so instances whose clocks disagree still agree on it). Taking one is a
//! single upsert whose `WHERE` sees the latest row under its lock: of
//! instances racing for a lapsed lease, exactly one gets it. A save is
//! refused while another holder's lease runs, so an instance that lost its
//! lease without knowing cannot overwrite the new holder's progress.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Object;
use tokio_postgres::Row;

use super::fault::{Fault, OrFault};
use crate::domain::{WebhookStanding, WebhookState};
use crate::store::StoreError;

/// A standing's columns, in `standing_from_row`'s order.
macro_rules! standing_columns {
    () => {
        "webhook, state, delivered_seq, attempts, last_attempt_at, last_status, last_error, \
         next_attempt_at, generation"
    };
}

/// The stored standing of `webhook`, if any.
pub(super) async fn standing_of(
    client: &Object,
    webhook: &str,
) -> Result<Option<WebhookStanding>, Fault> {
    let statement = client
        .prepare_cached(concat!(
            "SELECT ",
            standing_columns!(),
            " FROM webhook_standings WHERE webhook = $1"
        ))
        .await
        .or_fault("cannot prepare the webhook standing query")?;
    let row = client
        .query_opt(&statement, &[&webhook])
        .await
        .or_fault("cannot read a webhook's standing")?;
    row.as_ref().map(standing_from_row).transpose()
}

/// The standing of `webhook`, stored first when there is none.
pub(super) async fn standing_in(
    client: &Object,
    webhook: &str,
    start_after: i64,
) -> Result<WebhookStanding, Fault> {
    if let Some(standing) = standing_of(client, webhook).await? {
        return Ok(standing);
    }
    client
        .execute(
            "INSERT INTO webhook_standings (webhook, state, delivered_seq, attempts, generation) \
             VALUES ($1, 'ACTIVE', $2, 0, 0) ON CONFLICT (webhook) DO NOTHING",
            &[&webhook, &start_after],
        )
        .await
        .or_fault("cannot store a webhook's first standing")?;
    standing_of(client, webhook).await?.ok_or_else(|| {
        Fault::Store(anyhow::anyhow!("a webhook's standing vanished as it was stored").into())
    })
}

/// Stores `standing` unless its generation is no longer the stored one or
/// another holder's lease runs; true when stored.
pub(super) async fn save_in(
    client: &Object,
    standing: &WebhookStanding,
    holder: &str,
) -> Result<bool, Fault> {
    let statement = client
        .prepare_cached(
            "UPDATE webhook_standings SET state = $2, delivered_seq = $3, attempts = $4, \
             last_attempt_at = $5, last_status = $6, last_error = $7, next_attempt_at = $8 \
             WHERE webhook = $1 AND generation = $9 AND NOT EXISTS ( \
                 SELECT 1 FROM webhook_leases WHERE webhook = $1 AND holder <> $10 \
                 AND until > clock_timestamp())",
        )
        .await
        .or_fault("cannot prepare the webhook save")?;
    let attempts = i32::try_from(standing.attempts).unwrap_or(i32::MAX);
    let status = standing.last_status.map(i32::from);
    let changed = client
        .execute(
            &statement,
            &[
                &standing.webhook,
                &standing.state.as_str(),
                &standing.delivered_seq,
                &attempts,
                &standing.last_attempt_at,
                &status,
                &standing.last_error,
                &standing.next_attempt_at,
                &standing.generation,
                &holder,
            ],
        )
        .await
        .or_fault("cannot save a webhook's standing")?;
    Ok(changed == 1)
}

/// Takes or renews `holder`'s lease on `webhook` for `ttl`; false while
/// another holder's runs.
pub(super) async fn lease_in(
    client: &Object,
    webhook: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, Fault> {
    let statement = client
        .prepare_cached(
            "INSERT INTO webhook_leases AS lease (webhook, holder, until) \
             VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (webhook) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE lease.holder = excluded.holder OR lease.until <= clock_timestamp() \
             RETURNING true",
        )
        .await
        .or_fault("cannot prepare the webhook lease")?;
    let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX) as f64;
    let granted = client
        .query_opt(&statement, &[&webhook, &holder, &millis])
        .await
        .or_fault("cannot take a webhook's lease")?;
    Ok(granted.is_some())
}

/// Ends `holder`'s lease on `webhook`, if it holds it.
pub(super) async fn release_in(client: &Object, webhook: &str, holder: &str) -> Result<(), Fault> {
    client
        .execute(
            "DELETE FROM webhook_leases WHERE webhook = $1 AND holder = $2",
            &[&webhook, &holder],
        )
        .await
        .or_fault("cannot release a webhook's lease")?;
    Ok(())
}

/// `linkid webhooks replay` (see `Backend::replay_webhook`).
pub(super) async fn replay_in(
    client: &Object,
    webhook: &str,
    after: i64,
) -> Result<WebhookStanding, Fault> {
    let row = client
        .query_one(
            concat!(
                "INSERT INTO webhook_standings AS s (webhook, state, delivered_seq, attempts, generation) \
                 VALUES ($1, 'ACTIVE', $2, 0, 1) \
                 ON CONFLICT (webhook) DO UPDATE SET state = 'ACTIVE', delivered_seq = $2, \
                     attempts = 0, last_attempt_at = NULL, last_status = NULL, last_error = NULL, \
                     next_attempt_at = NULL, generation = s.generation + 1 \
                 RETURNING ",
                standing_columns!()
            ),
            &[&webhook, &after],
        )
        .await
        .or_fault("cannot replay a webhook")?;
    standing_from_row(&row)
}

/// `linkid webhooks enable` (see `Backend::enable_webhook`).
pub(super) async fn enable_in(
    client: &Object,
    webhook: &str,
) -> Result<Option<WebhookStanding>, Fault> {
    client
        .execute(
            "UPDATE webhook_standings SET state = 'ACTIVE', attempts = 0, next_attempt_at = NULL, \
             generation = generation + 1 WHERE webhook = $1 AND state = 'DISABLED'",
            &[&webhook],
        )
        .await
        .or_fault("cannot enable a webhook")?;
    standing_of(client, webhook).await
}

/// Every stored standing with the events after it (see
/// `Backend::webhook_standings`).
pub(super) async fn standings_in(client: &Object) -> Result<Vec<(WebhookStanding, i64)>, Fault> {
    let rows = client
        .query(
            concat!(
                "SELECT ",
                standing_columns!(),
                ", (SELECT count(*) FROM events WHERE seq > delivered_seq) \
                 FROM webhook_standings ORDER BY webhook COLLATE \"C\""
            ),
            &[],
        )
        .await
        .or_fault("cannot read the webhooks' standings")?;
    rows.iter()
        .map(|row| Ok((standing_from_row(row)?, row.get::<_, i64>(9))))
        .collect()
}

/// A `webhook_standings` row, in `standing_columns!` order.
fn standing_from_row(row: &Row) -> Result<WebhookStanding, Fault> {
    let state: String = row.get(1);
    let state = WebhookState::parse(&state).ok_or_else(|| {
        Fault::Store(StoreError::from(anyhow::anyhow!(
            "a webhook standing has an unknown state {state:?}"
        )))
    })?;
    let attempts: i32 = row.get(3);
    let status: Option<i32> = row.get(5);
    Ok(WebhookStanding {
        webhook: row.get(0),
        state,
        delivered_seq: row.get(2),
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_attempt_at: row.get::<_, Option<SystemTime>>(4),
        last_status: status.and_then(|s| u16::try_from(s).ok()),
        last_error: row.get(6),
        next_attempt_at: row.get::<_, Option<SystemTime>>(7),
        generation: row.get(8),
    })
}
