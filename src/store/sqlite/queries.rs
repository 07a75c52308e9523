//! The SQLite backend's SQL and row mapping, shared by the writer, the read
//! path and the admin commands: one function per query, each taking the
//! connection (or transaction) it runs on. The writes assume they run in the
//! writer's transaction, which holds the database's write lock (see
//! `link_in`); the reads run in whatever read transaction the caller chose.

use std::time::SystemTime;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use crate::domain::{Actor, Event, EventType, LinkRecord, NewLink, ProviderId, UserId};
use crate::store::{LinkOutcome, SearchPage, SearchQuery, StoreError};

/// A user's links, oldest first: one seek on `one_link_per_user`.
pub(super) fn links_of(conn: &Connection, user: &str) -> rusqlite::Result<Vec<LinkRecord>> {
    conn.prepare_cached(
        "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
         FROM linked_identities WHERE user_id = ?1 ORDER BY id",
    )?
    .query_map([user], record_from_row)?
    .collect()
}

/// The pruning mark and up to `limit` events after `after`, in `seq`
/// order. The caller runs it in one read transaction, so the two agree.
pub(super) fn events_after(
    conn: &Connection,
    after: i64,
    limit: u32,
) -> rusqlite::Result<(i64, Vec<Event>)> {
    let pruned: i64 = conn
        .prepare_cached("SELECT pruned_through FROM feed_state")?
        .query_row([], |r| r.get(0))?;
    let events = conn
        .prepare_cached(
            "SELECT seq, type, occurred_at, user_id, provider_id, linked_user_id, \
             linked_username, actor, subject, request_id \
             FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?
        .query_map(params![after, limit], event_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pruned, events))
}

/// Revocation ids recorded after `after` (a sequence number), and the
/// newest sequence number. One writer at a time commits, in `seq` order, so
/// nothing below the newest seen can appear later.
pub(super) fn revoked_after(conn: &Connection, after: i64) -> rusqlite::Result<(Vec<String>, i64)> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, revocation_id FROM revoked_tokens WHERE seq > ?1 ORDER BY seq",
    )?;
    let mut newest = after;
    let mut ids = Vec::new();
    let mut rows = stmt.query([after])?;
    while let Some(row) = rows.next()? {
        newest = row.get(0)?;
        ids.push(row.get(1)?);
    }
    Ok((ids, newest))
}

/// How many links are stored.
pub(super) fn count_links(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT count(*) FROM linked_identities", [], |r| r.get(0))
}

/// One page of a search (see `Backend::search`); the lookup's
/// `linked_user_id` is already the remote id's comparison key.
pub(super) fn search_in(conn: &Connection, query: &SearchQuery) -> rusqlite::Result<SearchPage> {
    let after = query.after_user.clone().unwrap_or_default();
    let fetch = i64::from(query.limit) + 1;
    let mut links = match (&query.provider_id, &query.linked_user_id) {
        (Some(provider), Some(remote)) => conn
            .prepare_cached(LOOKUP)?
            .query_map(params![provider, remote, after], record_from_row)?
            .collect::<Result<Vec<_>, _>>()?,
        (Some(provider), None) => conn
            .prepare_cached(PAGE_OF_PROVIDER)?
            .query_map(params![provider, after, fetch], record_from_row)?
            .collect::<Result<Vec<_>, _>>()?,
        _ => conn
            .prepare_cached(PAGE)?
            .query_map(params![after, fetch], record_from_row)?
            .collect::<Result<Vec<_>, _>>()?,
    };
    let more = links.len() > query.limit as usize;
    links.truncate(query.limit as usize);
    Ok(SearchPage { links, more })
}

/// The login-time reverse lookup, by comparison key: one seek on
/// `one_user_per_remote_identity`.
const LOOKUP: &str =
    "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
     FROM linked_identities WHERE provider_id = ?1 AND linked_user_key = ?2 AND user_id > ?3";
/// A page of one provider's links, walking `links_by_provider`.
const PAGE_OF_PROVIDER: &str =
    "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
     FROM linked_identities WHERE provider_id = ?1 AND user_id > ?2 ORDER BY user_id LIMIT ?3";
/// A page of all links, walking the `user_id` index.
const PAGE: &str =
    "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
     FROM linked_identities WHERE user_id > ?1 ORDER BY user_id LIMIT ?2";

/// The newest event's `seq`, 0 when there is none.
pub(super) fn newest_event_in(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM events")?
        .query_row([], |r| r.get(0))
}

/// An `events` row, in `events_after`'s column order.
pub(super) fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
    let kind: String = row.get(1)?;
    Ok(Event {
        seq: row.get(0)?,
        event_type: EventType::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown event type {kind:?}").into(),
            )
        })?,
        occurred_at: row.get(2)?,
        user_id: row.get(3)?,
        provider_id: row.get(4)?,
        linked_user_id: row.get(5)?,
        linked_username: row.get(6)?,
        actor: row.get(7)?,
        subject: row.get(8)?,
        request_id: row.get(9)?,
    })
}

/// Records a change in the feed, in the change's own transaction.
pub(super) fn record_event(
    conn: &Connection,
    kind: EventType,
    link: &LinkRecord,
    actor: &Actor,
    stamp: &str,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO events (type, occurred_at, user_id, provider_id, linked_user_id, \
         linked_username, actor, subject, request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            kind.as_str(),
            stamp,
            link.user_id,
            link.provider_id,
            link.linked_user_id,
            link.linked_username,
            actor.actor,
            actor.subject,
            actor.request_id
        ])
    })
    .or_store("cannot record an event")?;
    Ok(conn.last_insert_rowid())
}

/// A link's six columns, in the order every link query selects them.
pub(super) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<LinkRecord> {
    Ok(LinkRecord {
        user_id: row.get(0)?,
        provider_id: row.get(1)?,
        linked_user_id: row.get(2)?,
        linked_username: row.get(3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
    })
}

/// Now as RFC 3339 UTC with seconds.
pub(super) fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Turns SQLite's errors into the store's: a full or read-only disk and a
/// failing or vanished file are the database being unavailable, not a bug.
pub(super) trait OrStore<T> {
    fn or_store(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> OrStore<T> for rusqlite::Result<T> {
    fn or_store(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|error| {
            let unavailable = |why: &str| StoreError::Unavailable(why.to_owned());
            match error.sqlite_error_code() {
                Some(ErrorCode::DiskFull) => {
                    StoreError::Full("no space is left on the database's disk".into())
                }
                Some(ErrorCode::ReadOnly) => unavailable("the database is read-only"),
                Some(ErrorCode::SystemIoFailure) => {
                    unavailable("the database's disk failed a read or write")
                }
                Some(ErrorCode::CannotOpen) => unavailable("the database file cannot be opened"),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                    unavailable("the database is locked by another process")
                }
                _ => anyhow::Error::new(error).context(what).into(),
            }
        })
    }
}

/// Links a remote identity (by its comparison `key`) to a user, with its
/// event: `Backend::link`'s rules, decided before anything is written.
pub(super) fn link_in(
    conn: &Connection,
    user: &UserId,
    link: &NewLink,
    key: &str,
    actor: &Actor,
    stamp: &str,
) -> Result<LinkOutcome, StoreError> {
    // The writer holds the database's write lock for the whole batch, so
    // what these reads find stays true until the insert: each rule is told
    // apart by its own query, and the UNIQUE constraints stay the backstop.
    // The same remote identity is the same key (at a case-insensitive
    // provider, `00uABC` and `00uabc`): the stored id is kept as first given.
    if let Some((mut current, current_key)) = link_of_user(conn, user)? {
        if current.provider_id != link.provider_id.as_str() || current_key != key {
            return Err(StoreError::UserAlreadyLinked {
                current: Box::new(current),
            });
        }
        if current.linked_username != link.linked_username.as_str() {
            conn.prepare_cached(
                "UPDATE linked_identities SET linked_username = ?2, updated_at = ?3 WHERE user_id = ?1",
            )
            .and_then(|mut s| s.execute(params![user.as_str(), link.linked_username.as_str(), stamp]))
            .or_store("cannot update the linked username")?;
            current.linked_username = link.linked_username.as_str().to_owned();
            current.updated_at = stamp.to_owned();
            record_event(conn, EventType::Updated, &current, actor, stamp)?;
        }
        return Ok(LinkOutcome::Existing(current));
    }
    if owner_of(conn, link.provider_id.as_str(), key)?.is_some() {
        return Err(StoreError::IdentityAlreadyLinked {
            provider_id: link.provider_id.as_str().to_owned(),
            linked_user_id: link.linked_user_id.as_str().to_owned(),
        });
    }
    conn.prepare_cached(
        "INSERT INTO linked_identities \
         (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            user.as_str(),
            link.provider_id.as_str(),
            link.linked_user_id.as_str(),
            key,
            link.linked_username.as_str(),
            stamp
        ])
    })
    .or_store("cannot insert a link")?;
    let created = LinkRecord {
        user_id: user.as_str().to_owned(),
        provider_id: link.provider_id.as_str().to_owned(),
        linked_user_id: link.linked_user_id.as_str().to_owned(),
        linked_username: link.linked_username.as_str().to_owned(),
        created_at: stamp.to_owned(),
        updated_at: stamp.to_owned(),
    };
    record_event(conn, EventType::Linked, &created, actor, stamp)?;
    Ok(LinkOutcome::Created(created))
}

/// The user a remote identity (by its comparison key) is linked to, if any.
pub(super) fn owner_of(
    conn: &Connection,
    provider: &str,
    key: &str,
) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(
        "SELECT user_id FROM linked_identities WHERE provider_id = ?1 AND linked_user_key = ?2",
    )
    .and_then(|mut s| s.query_row([provider, key], |r| r.get(0)).optional())
    .or_store("cannot read the remote identity's owner")
}

/// The user's link and its remote id's comparison key, if any.
pub(super) fn link_of_user(
    conn: &Connection,
    user: &UserId,
) -> Result<Option<(LinkRecord, String)>, StoreError> {
    conn.prepare_cached(
        "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at, \
         linked_user_key FROM linked_identities WHERE user_id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([user.as_str()], |row| {
            Ok((record_from_row(row)?, row.get(6)?))
        })
        .optional()
    })
    .or_store("cannot read the user's link")
}

/// Deletes a user's link to a provider, with its event; `NotFound`
/// (nothing written) when there is none.
pub(super) fn unlink_in(
    conn: &Connection,
    user: &UserId,
    provider: &ProviderId,
    actor: &Actor,
    stamp: &str,
) -> Result<LinkRecord, StoreError> {
    let deleted = conn
        .prepare_cached(
            "DELETE FROM linked_identities WHERE user_id = ?1 AND provider_id = ?2 \
         RETURNING user_id, provider_id, linked_user_id, linked_username, created_at, updated_at",
        )
        .and_then(|mut s| {
            s.query_row([user.as_str(), provider.as_str()], record_from_row)
                .optional()
        })
        .or_store("cannot delete a link")?
        .ok_or_else(|| StoreError::NotFound {
            user_id: user.as_str().to_owned(),
            provider_id: provider.as_str().to_owned(),
        })?;
    record_event(conn, EventType::Unlinked, &deleted, actor, stamp)?;
    Ok(deleted)
}

/// Deletes events older than `cutoff` and remembers the newest one deleted,
/// so a consumer asking for them learns they are gone. The newest event of
/// all is kept whatever its age: the next seq is one more than it, and a
/// seq must never be handed out twice.
pub(super) fn prune_events_in(conn: &Connection, cutoff: &str) -> Result<u64, StoreError> {
    let through: Option<i64> = conn
        .prepare_cached(
            "SELECT max(seq) FROM events WHERE occurred_at < ?1 \
             AND seq < (SELECT max(seq) FROM events)",
        )
        .and_then(|mut s| s.query_row([cutoff], |r| r.get(0)))
        .or_store("cannot find old events")?;
    let Some(through) = through else {
        return Ok(0);
    };
    let deleted = conn
        .prepare_cached("DELETE FROM events WHERE seq <= ?1")
        .and_then(|mut s| s.execute([through]))
        .or_store("cannot prune events")?;
    conn.prepare_cached("UPDATE feed_state SET pruned_through = max(pruned_through, ?1)")
        .and_then(|mut s| s.execute([through]))
        .or_store("cannot record the pruning")?;
    Ok(deleted as u64)
}

/// Records revocation ids; returns how many were new.
pub(super) fn revoke_in(
    conn: &Connection,
    ids: &[String],
    stamp: &str,
) -> Result<usize, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO revoked_tokens (revocation_id, revoked_at) VALUES (?1, ?2)",
        )
        .or_store("cannot prepare a revocation")?;
    let mut added = 0;
    for id in ids {
        added += stmt
            .execute(params![id, stamp])
            .or_store("cannot record a revocation")?;
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::schema::migrate;
    use super::*;
    use crate::domain::IdRules;

    #[test]
    fn searches_are_index_seeks_never_scans_or_sorts() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:"), &IdRules::default()).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let values = ["a", "b", "c"];
            let count = stmt.parameter_count();
            stmt.query_map(rusqlite::params_from_iter(&values[..count]), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .join("; ")
        };

        let lookup = plan(LOOKUP);
        assert!(
            lookup.contains("USING INDEX sqlite_autoindex_linked_identities_2 (provider_id=? AND linked_user_key=?)"),
            "{lookup}"
        );
        let by_provider = plan(PAGE_OF_PROVIDER);
        assert!(
            by_provider.contains("USING INDEX links_by_provider (provider_id=? AND user_id>?)"),
            "{by_provider}"
        );
        let all = plan(PAGE);
        assert!(
            all.contains("USING INDEX sqlite_autoindex_linked_identities_1 (user_id>?)"),
            "{all}"
        );
        for plan in [lookup, by_provider, all] {
            assert!(
                !plan.contains("SCAN") && !plan.contains("TEMP B-TREE"),
                "{plan}"
            );
        }
    }

    #[test]
    fn pruning_keeps_the_newest_event_so_no_seq_is_handed_out_twice() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:"), &IdRules::default()).unwrap();
        let link = LinkRecord {
            user_id: "u".into(),
            provider_id: "okta".into(),
            linked_user_id: "r".into(),
            linked_username: "n".into(),
            created_at: "2020-01-01T00:00:00Z".into(),
            updated_at: "2020-01-01T00:00:00Z".into(),
        };
        let old = "2020-01-01T00:00:00Z";
        for _ in 0..3 {
            record_event(&conn, EventType::Linked, &link, &Actor::import(), old).unwrap();
        }

        let pruned = prune_events_in(&conn, "2021-01-01T00:00:00Z").unwrap();
        let next = record_event(&conn, EventType::Unlinked, &link, &Actor::import(), old).unwrap();

        assert_eq!(pruned, 2, "all are old, the newest is kept");
        assert_eq!(next, 4, "the next seq follows the newest ever handed out");
    }
}
