//! One group-commit transaction on PostgreSQL: the links and deletes that
//! reached one instance together, applied with a few multi-row statements
//! and committed once, each write keeping the outcome it would have alone.
//!
//! A batch is serialised as: its deletes, then its links, in the order they
//! were asked for — a valid order for writes that were concurrent. In round
//! trips, with statements pipelined (tokio-postgres sends what is awaited
//! together on one connection without waiting between them):
//!
//! 1. `BEGIN`, every delete (one `DELETE … USING unnest(…)`) and every link
//!    (one `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`): the
//!    insert decides who wins, as `link_in` does for one link, and a link
//!    that either uniqueness rule stops inserts nothing instead of failing
//!    the statement.
//! 2. Only for the links that inserted nothing: the committed state is read
//!    in SQLite's order, one link at a time (`settle_link`), which answers
//!    `Existing`, an update of the username, `UserAlreadyLinked` or
//!    `IdentityAlreadyLinked` exactly as a lone link would be answered.
//! 3. The batch's events (one multi-row insert, taking the feed's lock once,
//!    as the transaction's last statement) and `COMMIT`.
//!
//! Rows are sent sorted by user, so that two instances' batches take their
//! row locks in one order; a deadlock that still happens (the remote
//! identities' index, a writer that is not linkid) fails the batch, which
//! the writer runs again.

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use super::fault::{Fault, OrFault};
use super::queries::{record_from_row, rfc3339};
use crate::domain::{Actor, EventType, LinkRecord, NewLink, ProviderId, UserId};
use crate::store::{LinkOutcome, StoreError};

/// How many times a link whose state changed under it while it was being
/// settled (a row deleted or renamed by another instance) reads it again.
const SETTLE_ATTEMPTS: usize = 16;

/// A link asked for, as `Backend::link` takes it (`key`: the remote id's
/// comparison key).
pub(super) struct LinkWrite {
    pub(super) user: UserId,
    pub(super) link: NewLink,
    pub(super) key: String,
    pub(super) actor: Actor,
}

/// A delete asked for, as `Backend::unlink` takes it.
pub(super) struct UnlinkWrite {
    pub(super) user: UserId,
    pub(super) provider: ProviderId,
    pub(super) actor: Actor,
}

/// What a committed batch answers: an outcome per write, in the order
/// given, and the newest event's seq.
pub(super) struct Applied {
    pub(super) links: Vec<Result<LinkOutcome, StoreError>>,
    pub(super) unlinks: Vec<Result<LinkRecord, StoreError>>,
    pub(super) newest_event: Option<i64>,
}

/// Applies the writes in one transaction and commits it. On any error the
/// transaction is rolled back and nothing of the batch is written.
pub(super) async fn apply(
    client: &Object,
    links: &[LinkWrite],
    unlinks: &[UnlinkWrite],
) -> Result<Applied, Fault> {
    let applied = apply_in_transaction(client, links, unlinks).await;
    if applied.is_err() {
        // (On a broken connection this fails too; the pool drops it.)
        let _ = client.batch_execute("ROLLBACK").await;
    }
    applied
}

/// The statements of a batch, prepared once per connection.
struct Statements {
    delete: Statement,
    insert: Statement,
    events: Statement,
}

async fn prepare(client: &Object) -> Result<Statements, Fault> {
    let (delete, insert, events) = tokio::try_join!(
        client.prepare_cached(concat!(
            "DELETE FROM linked_identities AS l \
             USING unnest($1::text[], $2::text[]) WITH ORDINALITY AS d(u, p, n) \
             WHERE l.user_id = d.u AND l.provider_id = d.p \
             RETURNING ",
            record_columns!(),
            ", d.n"
        )),
        client.prepare_cached(
            "INSERT INTO linked_identities \
             (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
             SELECT u, p, r, k, n, now(), now() \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS w(u, p, r, k, n) \
             ON CONFLICT DO NOTHING \
             RETURNING user_id, provider_id, linked_user_key, linked_username, created_at",
        ),
        // Seqs are taken before any event is written: the first from
        // `linkid_next_seq`, which takes the feed's lock until the commit,
        // the others from the sequence under that lock (one plpgsql call
        // per batch, not per event); then given out in ascending order to
        // the events in batch order.
        client.prepare_cached(
            "WITH first AS MATERIALIZED (SELECT linkid_next_seq('events_seq') AS seq), \
             taken AS MATERIALIZED (\
                 SELECT seq FROM first \
                 UNION ALL SELECT nextval('events_seq') \
                 FROM first, generate_series(2, cardinality($1::text[]))), \
             numbered AS (SELECT seq, row_number() OVER (ORDER BY seq) AS n FROM taken) \
             INSERT INTO events (seq, type, occurred_at, user_id, provider_id, linked_user_id, \
                                 linked_username, actor, subject, request_id) \
             SELECT numbered.seq, e.type, now(), e.user_id, e.provider_id, e.linked_user_id, \
                    e.linked_username, e.actor, e.subject, e.request_id \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                         $7::text[], $8::text[]) \
                  WITH ORDINALITY AS e(type, user_id, provider_id, linked_user_id, linked_username, \
                                       actor, subject, request_id, n) \
             JOIN numbered USING (n) \
             RETURNING seq",
        ),
    )
    .or_fault("cannot prepare the batch's statements")?;
    Ok(Statements {
        delete,
        insert,
        events,
    })
}

/// A change to record in the feed.
struct Change<'a> {
    kind: EventType,
    link: LinkRecord,
    actor: &'a Actor,
}

async fn apply_in_transaction(
    client: &Object,
    links: &[LinkWrite],
    unlinks: &[UnlinkWrite],
) -> Result<Applied, Fault> {
    let statements = prepare(client).await?;

    let mut unlink_order: Vec<usize> = (0..unlinks.len()).collect();
    unlink_order.sort_by_key(|&i| (unlinks[i].user.as_str(), unlinks[i].provider.as_str()));
    let mut link_order: Vec<usize> = (0..links.len()).collect();
    link_order.sort_by_key(|&i| links[i].user.as_str());

    let delete = async {
        if unlinks.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<&str> = unlink_order
            .iter()
            .map(|&i| unlinks[i].user.as_str())
            .collect();
        let providers: Vec<&str> = unlink_order
            .iter()
            .map(|&i| unlinks[i].provider.as_str())
            .collect();
        client
            .query(&statements.delete, &[&users, &providers])
            .await
    };
    let insert = async {
        if links.is_empty() {
            return Ok(Vec::new());
        }
        let column = |get: fn(&LinkWrite) -> &str| -> Vec<&str> {
            link_order.iter().map(|&i| get(&links[i])).collect()
        };
        client
            .query(
                &statements.insert,
                &[
                    &column(|w| w.user.as_str()),
                    &column(|w| w.link.provider_id.as_str()),
                    &column(|w| w.link.linked_user_id.as_str()),
                    &column(|w| w.key.as_str()),
                    &column(|w| w.link.linked_username.as_str()),
                ],
            )
            .await
    };
    // One round trip: the three are sent before the first answer is read.
    // Generic plans: a custom plan per batch (PostgreSQL's default for
    // statements whose arrays vary in size) cost more than the batch.
    let (begun, deleted, inserted) = tokio::join!(
        client.batch_execute("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan"),
        delete,
        insert
    );
    begun.or_fault("cannot begin a batch")?;
    let deleted = deleted.or_fault("cannot delete links")?;
    let inserted = inserted.or_fault("cannot insert links")?;

    let mut changes = Vec::new();
    let mut unlinked: Vec<Option<Result<LinkRecord, StoreError>>> = vec![None; unlinks.len()];
    let mut deleted: Vec<(usize, LinkRecord)> = deleted
        .iter()
        .map(|row| {
            let n: i64 = row.get(6);
            (unlink_order[n as usize - 1], record_from_row(row))
        })
        .collect();
    deleted.sort_by_key(|(i, _)| *i);
    for (i, record) in deleted {
        changes.push(Change {
            kind: EventType::Unlinked,
            link: record.clone(),
            actor: &unlinks[i].actor,
        });
        unlinked[i] = Some(Ok(record));
    }
    let unlinks_answered: Vec<Result<LinkRecord, StoreError>> = unlinked
        .into_iter()
        .zip(unlinks)
        .map(|(outcome, write)| {
            outcome.unwrap_or_else(|| {
                Err(StoreError::NotFound {
                    user_id: write.user.as_str().to_owned(),
                    provider_id: write.provider.as_str().to_owned(),
                })
            })
        })
        .collect();

    let mut linked: Vec<Option<Result<LinkOutcome, StoreError>>> = vec![None; links.len()];
    for row in &inserted {
        let (user, provider, key, username): (&str, &str, &str, &str) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        // The first write of these values that has no outcome yet: a
        // write asked twice in one batch inserts once, and the second
        // finds the first's link (`Existing`) below.
        let Some(&i) = link_order.iter().find(|&&i| {
            let w = &links[i];
            linked[i].is_none()
                && w.user.as_str() == user
                && w.link.provider_id.as_str() == provider
                && w.key == key
                && w.link.linked_username.as_str() == username
        }) else {
            return Err(Fault::Store(
                anyhow::anyhow!("the batch inserted a link nobody asked for").into(),
            ));
        };
        let stamp = rfc3339(row.get(4));
        let created = links[i].record(stamp.clone(), stamp);
        linked[i] = Some(Ok(LinkOutcome::Created(created)));
    }
    // Events in batch order: the links that inserted, then those settled.
    for (i, outcome) in linked.iter().enumerate() {
        if let Some(Ok(LinkOutcome::Created(created))) = outcome {
            changes.push(Change {
                kind: EventType::Linked,
                link: created.clone(),
                actor: &links[i].actor,
            });
        }
    }
    for i in 0..links.len() {
        if linked[i].is_none() {
            linked[i] = Some(settle_link(client, &links[i], &mut changes).await?);
        }
    }

    let record = async {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let kinds: Vec<&str> = changes.iter().map(|c| c.kind.as_str()).collect();
        let text = |get: for<'c> fn(&'c Change<'c>) -> &'c str| -> Vec<&str> {
            changes.iter().map(get).collect()
        };
        let optional = |get: for<'c> fn(&'c Change<'c>) -> Option<&'c str>| -> Vec<Option<&str>> {
            changes.iter().map(get).collect()
        };
        client
            .query(
                &statements.events,
                &[
                    &kinds,
                    &text(|c| c.link.user_id.as_str()),
                    &text(|c| c.link.provider_id.as_str()),
                    &text(|c| c.link.linked_user_id.as_str()),
                    &text(|c| c.link.linked_username.as_str()),
                    &text(|c| c.actor.actor.as_str()),
                    &optional(|c| c.actor.subject.as_deref()),
                    &optional(|c| c.actor.request_id.as_deref()),
                ],
            )
            .await
    };
    // One round trip: a failed insert makes PostgreSQL end the COMMIT as a
    // rollback, and its error is the batch's.
    let (recorded, committed) = tokio::join!(record, client.batch_execute("COMMIT"));
    let recorded = recorded.or_fault("cannot record the batch's events")?;
    committed.or_fault("cannot commit a batch")?;
    Ok(Applied {
        links: linked
            .into_iter()
            .map(|outcome| outcome.expect("every link of the batch was answered"))
            .collect(),
        unlinks: unlinks_answered,
        newest_event: recorded.iter().map(|row| row.get::<_, i64>(0)).max(),
    })
}

impl LinkWrite {
    /// The link as asked, with these times.
    fn record(&self, created_at: String, updated_at: String) -> LinkRecord {
        LinkRecord {
            user_id: self.user.as_str().to_owned(),
            provider_id: self.link.provider_id.as_str().to_owned(),
            linked_user_id: self.link.linked_user_id.as_str().to_owned(),
            linked_username: self.link.linked_username.as_str().to_owned(),
            created_at,
            updated_at,
        }
    }
}

/// Answers a link that inserted nothing, from the state committed (or
/// written earlier in this batch), in SQLite's order: the user's own link
/// first, then the remote identity's owner. A username update is made here
/// and its event added to `changes`. A refusal is the write's outcome, not
/// the batch's error.
async fn settle_link<'a>(
    client: &Object,
    write: &'a LinkWrite,
    changes: &mut Vec<Change<'a>>,
) -> Result<Result<LinkOutcome, StoreError>, Fault> {
    let (user, provider, key, username) = (
        write.user.as_str(),
        write.link.provider_id.as_str(),
        write.key.as_str(),
        write.link.linked_username.as_str(),
    );
    let (current, owner, update, insert) = tokio::try_join!(
        client.prepare_cached(concat!(
            "SELECT ",
            record_columns!(),
            ", linked_user_key FROM linked_identities WHERE user_id = $1"
        )),
        client.prepare_cached(
            "SELECT 1 FROM linked_identities WHERE provider_id = $1 AND linked_user_key = $2",
        ),
        client.prepare_cached(
            "UPDATE linked_identities SET linked_username = $4, updated_at = now() \
             WHERE user_id = $1 AND provider_id = $2 AND linked_user_key = $3 \
             AND linked_username <> $4 RETURNING created_at, updated_at, linked_user_id",
        ),
        client.prepare_cached(
            "INSERT INTO linked_identities \
             (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
             VALUES ($1, $2, $3, $5, $4, now(), now()) \
             ON CONFLICT DO NOTHING RETURNING created_at",
        ),
    )
    .or_fault("cannot prepare the link's statements")?;
    for _ in 0..SETTLE_ATTEMPTS {
        // Both reads in one round trip.
        let mine_params: [&(dyn ToSql + Sync); 1] = [&user];
        let owner_params: [&(dyn ToSql + Sync); 2] = [&provider, &key];
        let (mine, owned) = tokio::join!(
            client.query_opt(&current, &mine_params),
            client.query_opt(&owner, &owner_params),
        );
        let mine = mine.or_fault("cannot read the user's link")?;
        let owned = owned.or_fault("cannot read the remote identity's owner")?;
        if let Some(row) = mine {
            let current_key: String = row.get(6);
            let current = record_from_row(&row);
            if current.provider_id != provider || current_key != key {
                return Ok(Err(StoreError::UserAlreadyLinked {
                    current: Box::new(current),
                }));
            }
            if current.linked_username == username {
                return Ok(Ok(LinkOutcome::Existing(current)));
            }
            if let Some(row) = client
                .query_opt(&update, &[&user, &provider, &key, &username])
                .await
                .or_fault("cannot update the linked username")?
            {
                let updated = LinkRecord {
                    linked_user_id: row.get(2),
                    ..write.record(rfc3339(row.get(0)), rfc3339(row.get(1)))
                };
                changes.push(Change {
                    kind: EventType::Updated,
                    link: updated.clone(),
                    actor: &write.actor,
                });
                return Ok(Ok(LinkOutcome::Existing(updated)));
            }
            // Deleted or renamed since it was read: read again.
            continue;
        }
        if owned.is_some() {
            return Ok(Err(StoreError::IdentityAlreadyLinked {
                provider_id: provider.to_owned(),
                linked_user_id: write.link.linked_user_id.as_str().to_owned(),
            }));
        }
        let remote = write.link.linked_user_id.as_str();
        if let Some(row) = client
            .query_opt(&insert, &[&user, &provider, &remote, &username, &key])
            .await
            .or_fault("cannot insert a link")?
        {
            let stamp = rfc3339(row.get(0));
            let created = write.record(stamp.clone(), stamp);
            changes.push(Change {
                kind: EventType::Linked,
                link: created.clone(),
                actor: &write.actor,
            });
            return Ok(Ok(LinkOutcome::Created(created)));
        }
        // The row that stood in the way is gone, or another took its
        // place: read again.
    }
    Ok(Err(StoreError::Unavailable(
        "the link changed under concurrent requests too many times; retry".into(),
    )))
}
