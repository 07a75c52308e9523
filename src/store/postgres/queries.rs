//! The PostgreSQL backend's queries that are more than one statement: the
//! link's race-proof insert and its reading of the committed state, the
//! feed's append in commit order, and the row mapping every query shares.

use std::time::SystemTime;

use deadpool_postgres::Object;
use tokio_postgres::Row;

use super::fault::{breaks_a_link_rule, is_deadlock, Fault, OrFault};
use crate::domain::{Actor, Event, EventType, LinkRecord, NewLink, UserId};
use crate::store::{LinkOutcome, StoreError};

/// How many times a link tries again (after losing a race to a row that
/// then went away, or a deadlock) before giving up with a 503.
const LINK_ATTEMPTS: usize = 16;

/// SQLite's rules in SQLite's order: the user's own link decides first
/// (the same link is `Existing`, another is `UserAlreadyLinked`), then the
/// remote identity's owner (`IdentityAlreadyLinked`). The insert decides
/// atomically whether this request makes the link; when it does not, the
/// committed state is read again in that order, because which constraint
/// PostgreSQL reports under a race is not the answer: the same link sent
/// twice at once can fail on one_user_per_remote_identity while the right
/// answer for the second is the first's link, `Existing`. A change and its
/// event commit together; the event's seq comes back for the long polls.
///
/// The remote identity is its comparison `key` (`IdRules::key`): a retry
/// that spells a case-insensitive provider's id in another case is the same
/// link, whose stored id stays as first given.
pub(super) async fn link_in(
    client: &mut Object,
    user: &UserId,
    link: &NewLink,
    key: &str,
    actor: &Actor,
) -> Result<(LinkOutcome, Option<i64>), Fault> {
    let (provider, remote, username) = (
        link.provider_id.as_str(),
        link.linked_user_id.as_str(),
        link.linked_username.as_str(),
    );
    let record = |created_at: String, updated_at: String| LinkRecord {
        user_id: user.as_str().to_owned(),
        provider_id: provider.to_owned(),
        linked_user_id: remote.to_owned(),
        linked_username: username.to_owned(),
        created_at,
        updated_at,
    };
    for _ in 0..LINK_ATTEMPTS {
        // A user who has a link (committed, or committing now: PostgreSQL
        // waits for it) makes this insert do nothing; a remote identity
        // that another row holds makes it fail with 23505 on
        // one_user_per_remote_identity.
        let tx = client
            .transaction()
            .await
            .or_fault("cannot begin a transaction")?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO linked_identities \
                 (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
                 VALUES ($1, $2, $3, $5, $4, now(), now()) \
                 ON CONFLICT ON CONSTRAINT one_link_per_user DO NOTHING \
                 RETURNING created_at",
            )
            .await
            .or_fault("cannot prepare the link insert")?;
        let inserted = tx
            .query_opt(
                &insert,
                &[&user.as_str(), &provider, &remote, &username, &key],
            )
            .await
            .or_fault("cannot insert a link");
        match inserted {
            Ok(Some(row)) => {
                let stamp = rfc3339(row.get(0));
                let created = record(stamp.clone(), stamp);
                let seq = record_event(&tx, EventType::Linked, &created, actor).await?;
                tx.commit().await.or_fault("cannot commit a link")?;
                return Ok((LinkOutcome::Created(created), Some(seq)));
            }
            Ok(None) => tx.rollback().await.or_fault("cannot roll back")?,
            // Either rule: the state decides below.
            Err(fault) if breaks_a_link_rule(&fault) => {
                tx.rollback().await.or_fault("cannot roll back")?
            }
            // Chosen to break a deadlock with another writer (one that
            // does not insert as this one does): nothing was written.
            Err(fault) if is_deadlock(&fault) => {
                tx.rollback().await.or_fault("cannot roll back")?;
                continue;
            }
            Err(fault) => return Err(fault),
        }

        let current = client
            .prepare_cached(concat!(
                "SELECT ",
                record_columns!(),
                ", linked_user_key FROM linked_identities WHERE user_id = $1"
            ))
            .await
            .or_fault("cannot prepare the link query")?;
        if let Some(row) = client
            .query_opt(&current, &[&user.as_str()])
            .await
            .or_fault("cannot read the user's link")?
        {
            let current_key: String = row.get(6);
            let current = record_from_row(&row);
            if current.provider_id != provider || current_key != key {
                return Err(StoreError::UserAlreadyLinked {
                    current: Box::new(current),
                }
                .into());
            }
            if current.linked_username == username {
                return Ok((LinkOutcome::Existing(current), None));
            }
            let tx = client
                .transaction()
                .await
                .or_fault("cannot begin a transaction")?;
            let update = tx
                .prepare_cached(
                    "UPDATE linked_identities SET linked_username = $4, updated_at = now() \
                     WHERE user_id = $1 AND provider_id = $2 AND linked_user_key = $3 \
                     AND linked_username <> $4 RETURNING created_at, updated_at, linked_user_id",
                )
                .await
                .or_fault("cannot prepare the username update")?;
            if let Some(row) = tx
                .query_opt(&update, &[&user.as_str(), &provider, &key, &username])
                .await
                .or_fault("cannot update the linked username")?
            {
                let updated = LinkRecord {
                    linked_user_id: row.get(2),
                    ..record(rfc3339(row.get(0)), rfc3339(row.get(1)))
                };
                let seq = record_event(&tx, EventType::Updated, &updated, actor).await?;
                tx.commit().await.or_fault("cannot commit the update")?;
                return Ok((LinkOutcome::Existing(updated), Some(seq)));
            }
            // Deleted, or renamed by another request, since it was read:
            // read again.
            tx.rollback().await.or_fault("cannot roll back")?;
            continue;
        }
        let owner = client
            .prepare_cached(
                "SELECT 1 FROM linked_identities WHERE provider_id = $1 AND linked_user_key = $2",
            )
            .await
            .or_fault("cannot prepare the owner query")?;
        if client
            .query_opt(&owner, &[&provider, &key])
            .await
            .or_fault("cannot read the remote identity's owner")?
            .is_some()
        {
            return Err(StoreError::IdentityAlreadyLinked {
                provider_id: provider.to_owned(),
                linked_user_id: remote.to_owned(),
            }
            .into());
        }
        // The row that stood in the way is gone: try again.
    }
    Err(StoreError::Unavailable(
        "the link changed under concurrent requests too many times; retry".into(),
    )
    .into())
}

/// Records a change in the feed as the transaction's last statement: its
/// seq comes from `linkid_next_seq`, whose lock is held until the commit,
/// so seqs become visible in commit order. Returns the seq.
pub(super) async fn record_event(
    tx: &deadpool_postgres::Transaction<'_>,
    kind: EventType,
    link: &LinkRecord,
    actor: &Actor,
) -> Result<i64, Fault> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO events (seq, type, occurred_at, user_id, provider_id, linked_user_id, \
             linked_username, actor, subject, request_id) \
             VALUES (linkid_next_seq('events_seq'), $1, now(), $2, $3, $4, $5, $6, $7, $8) \
             RETURNING seq",
        )
        .await
        .or_fault("cannot prepare the event insert")?;
    let row = tx
        .query_one(
            &statement,
            &[
                &kind.as_str(),
                &link.user_id,
                &link.provider_id,
                &link.linked_user_id,
                &link.linked_username,
                &actor.actor,
                &actor.subject,
                &actor.request_id,
            ],
        )
        .await
        .or_fault("cannot record an event")?;
    Ok(row.get(0))
}

/// An `events` row, in the feed query's column order.
pub(super) fn event_from_row(row: &Row) -> Result<Event, Fault> {
    let kind: String = row.get(1);
    let event_type = EventType::parse(&kind)
        .ok_or_else(|| Fault::Store(anyhow::anyhow!("an event of unknown type {kind:?}").into()))?;
    Ok(Event {
        seq: row.get(0),
        event_type,
        occurred_at: rfc3339(row.get(2)),
        user_id: row.get(3),
        provider_id: row.get(4),
        linked_user_id: row.get(5),
        linked_username: row.get(6),
        actor: row.get(7),
        subject: row.get(8),
        request_id: row.get(9),
    })
}

/// A link's six columns, in `record_columns!`'s order.
pub(super) fn record_from_row(row: &Row) -> LinkRecord {
    LinkRecord {
        user_id: row.get(0),
        provider_id: row.get(1),
        linked_user_id: row.get(2),
        linked_username: row.get(3),
        created_at: rfc3339(row.get(4)),
        updated_at: rfc3339(row.get(5)),
    }
}

/// A stored time as RFC 3339 UTC with seconds, as the SQLite backend writes.
pub(super) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}
