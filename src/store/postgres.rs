//! The PostgreSQL backend, for several linkid instances on one database:
//! one function per operation, on a pool of async connections (no thread
//! hop). Everything shared lives in the database — links, revocations, the
//! schema version — so every rule holds across instances:
//!
//! - Both uniqueness rules are UNIQUE constraints, so the insert decides
//!   who wins: exactly one request. A loser (no row inserted, or SQLSTATE
//!   23505 on one of the two constraints, known by name) reads the
//!   committed state in SQLite's order and answers from it; which
//!   constraint PostgreSQL names under a race is not the answer.
//! - Revocations get their `seq` from `linkid_next_seq`, which holds an
//!   advisory lock from taking the value until commit: values become
//!   visible in `seq` order, so polling `seq > last_seen` never skips one.
//! - Each request is bounded by `database.statement_timeout_secs` (the
//!   server cancels a statement past it; the pool bounds waits and
//!   connects; a connection that does not answer is dropped), and a
//!   database that cannot be reached, is shutting down or times out is
//!   `Unavailable`: a 503, and service resumes by itself when it is back.
//!
//! Every reason given names the hosts (the URL without its password where
//! a whole URL is shown), never the password.
//!
//! This file opens the pool and implements the storage contract
//! (`Backend`), each operation a transaction of its own — except links and
//! deletes with `database.max_batch` > 1, which `writer.rs` writes together
//! (group commit) with `batch.rs`'s statements; `queries.rs` holds the
//! link's race-proof insert for a write alone and the row mapping, `fault.rs` how
//! the driver's errors are carried, `migrations.rs` the schema, `admin.rs`
//! seed, export and import, `tls.rs` the TLS connector, `webhooks.rs` where
//! each webhook stands and the lease that lets one instance deliver it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use tokio::sync::watch;

use super::{Answer, Backend, Reply};
use super::{LinkOutcome, SearchPage, SearchQuery, StoreError};
use crate::config::{DatabaseConfig, PostgresUrl};
use crate::domain::{
    Actor, Event, EventType, IdRules, LinkRecord, NewLink, ProviderId, UserId, WebhookStanding,
};

/// linkid's advisory locks are `(LOCK_NAMESPACE, n)`: n = 0 for schema
/// upgrades, a sequence's oid for appends in commit order (see
/// `linkid_next_seq` in the migrations, which spells the same number).
const LOCK_NAMESPACE: i32 = 0x6c69_6e6b; // "link"

/// A `LinkRecord`'s columns, in `record_from_row`'s order (a macro, so
/// that queries are `concat!`ed once, at compile time).
macro_rules! record_columns {
    () => {
        "user_id, provider_id, linked_user_id, linked_username, created_at, updated_at"
    };
}

pub(crate) mod admin;
mod batch;
mod fault;
mod migrations;
mod queries;
mod tls;
mod webhooks;
mod writer;

use batch::{LinkWrite, UnlinkWrite};
use fault::{Fault, OrFault};
use queries::{event_from_row, link_in, record_event, record_from_row};
use writer::Writer;

/// The PostgreSQL store: a pool of connections to one database. Cloned
/// (sharing the pool and the newest event) for the writer task.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    url: PostgresUrl,
    /// `database.statement_timeout_secs`.
    timeout: Duration,
    /// The newest committed event's seq (see `Backend::newest_event`).
    newest_event: Arc<watch::Sender<i64>>,
    /// How each provider compares remote ids (the keys follow it).
    rules: IdRules,
    /// Group commit for links and deletes (`database.max_batch` > 1); the
    /// writer's own handle has none.
    writer: Option<Writer>,
}

impl PostgresStore {
    /// Connects, and creates or upgrades the schema and brings the keys to
    /// `rules`, under the schema lock.
    pub async fn open(
        config: &DatabaseConfig,
        rules: &IdRules,
        url: &PostgresUrl,
    ) -> anyhow::Result<PostgresStore> {
        let timeout = config.statement_timeout();
        let manager = Manager::from_config(
            connection_config(url, timeout),
            tls::connector(url)?,
            ManagerConfig {
                // A connection the server closed (a restart, a pause) is
                // noticed when it is taken from the pool and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .context("cannot build the connection pool")?;
        let store = PostgresStore {
            pool,
            url: url.clone(),
            timeout,
            newest_event: Arc::new(watch::Sender::new(0)),
            rules: rules.clone(),
            writer: None,
        };
        let mut client = store
            .pool
            .get()
            .await
            .map_err(|e| store.pool_error(e))
            .with_context(|| format!("cannot open the database at {url}"))?;
        migrations::migrate(&mut client, &url.to_string(), rules).await?;
        drop(client);
        store.refresh().await?;
        let writer = (config.max_batch > 1).then(|| Writer::start(store.clone(), config.max_batch));
        Ok(PostgresStore { writer, ..store })
    }

    /// Tells long polls about an event this process committed (or saw).
    fn committed(&self, seq: Option<i64>) {
        if let Some(seq) = seq {
            self.newest_event.send_if_modified(|seen| {
                let newer = seq > *seen;
                if newer {
                    *seen = seq;
                }
                newer
            });
        }
    }
}

impl Backend for PostgresStore {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn list<'a>(&'a self, user: &'a UserId) -> Reply<'a, Vec<LinkRecord>> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let listed = async {
                let statement = client
                    .prepare_cached(concat!(
                        "SELECT ",
                        record_columns!(),
                        " FROM linked_identities WHERE user_id = $1 ORDER BY id"
                    ))
                    .await
                    .or_fault("cannot prepare the list query")?;
                let rows = client
                    .query(&statement, &[&user.as_str()])
                    .await
                    .or_fault("cannot list the user's links")?;
                Ok(rows.iter().map(record_from_row).collect())
            };
            let outcome = self.within(listed).await;
            self.settle(client, outcome)
        })
    }

    /// The insert decides who wins (see `link_in`, and `batch.rs` for a
    /// link written in a batch).
    fn link(&self, user: UserId, link: NewLink, actor: Actor) -> Reply<'_, LinkOutcome> {
        let key = self
            .rules
            .key(link.provider_id.as_str(), link.linked_user_id.as_str());
        if let Some(writer) = &self.writer {
            return writer.link(LinkWrite {
                user,
                link,
                key,
                actor,
            });
        }
        Answer::boxed(async move {
            let mut client = self.client().await?;
            let linked = link_in(&mut client, &user, &link, &key, &actor);
            let outcome = self.within(linked).await;
            let (outcome, seq) = match outcome {
                Ok(Ok((outcome, seq))) => (Ok(Ok(outcome)), seq),
                Ok(Err(fault)) => (Ok(Err(fault)), None),
                Err(elapsed) => (Err(elapsed), None),
            };
            self.committed(seq);
            self.settle(client, outcome)
        })
    }

    fn unlink(&self, user: UserId, provider: ProviderId, actor: Actor) -> Reply<'_, LinkRecord> {
        if let Some(writer) = &self.writer {
            return writer.unlink(UnlinkWrite {
                user,
                provider,
                actor,
            });
        }
        Answer::boxed(async move {
            let mut client = self.client().await?;
            let deleted = async {
                let tx = client
                    .transaction()
                    .await
                    .or_fault("cannot begin a transaction")?;
                let statement = tx
                    .prepare_cached(concat!(
                        "DELETE FROM linked_identities WHERE user_id = $1 AND provider_id = $2 \
                         RETURNING ",
                        record_columns!()
                    ))
                    .await
                    .or_fault("cannot prepare the delete")?;
                let row = tx
                    .query_opt(&statement, &[&user.as_str(), &provider.as_str()])
                    .await
                    .or_fault("cannot delete a link")?;
                let Some(row) = row else {
                    tx.rollback().await.or_fault("cannot roll back")?;
                    return Err(Fault::Store(StoreError::NotFound {
                        user_id: user.as_str().to_owned(),
                        provider_id: provider.as_str().to_owned(),
                    }));
                };
                let deleted = record_from_row(&row);
                let seq = record_event(&tx, EventType::Unlinked, &deleted, &actor).await?;
                tx.commit().await.or_fault("cannot commit the delete")?;
                Ok((deleted, seq))
            };
            let outcome = self.within(deleted).await;
            if let Ok(Ok((_, seq))) = &outcome {
                self.committed(Some(*seq));
            }
            let outcome = outcome.map(|r| r.map(|(deleted, _)| deleted));
            self.settle(client, outcome)
        })
    }

    /// `user_id` compared in the "C" collation, as SQLite does. Each form is
    /// one index walk:
    /// `one_user_per_remote_identity` for the lookup, `links_by_provider`,
    /// `links_by_user`. The lookup is by the remote id's comparison key.
    fn search(&self, query: SearchQuery) -> Reply<'_, SearchPage> {
        Answer::boxed(async move {
            let key = match (&query.provider_id, &query.linked_user_id) {
                (Some(provider), Some(remote)) => Some(self.rules.key(provider, remote)),
                _ => None,
            };
            let client = self.client().await?;
            let searched = async {
                let after = query.after_user.clone().unwrap_or_default();
                let fetch = i64::from(query.limit) + 1;
                let rows = match (&query.provider_id, &key) {
                    (Some(provider), Some(remote)) => {
                        let statement = client
                            .prepare_cached(concat!(
                                "SELECT ",
                                record_columns!(),
                                " FROM linked_identities WHERE provider_id = $1 AND linked_user_key = $2 \
                                 AND user_id COLLATE \"C\" > $3"
                            ))
                            .await
                            .or_fault("cannot prepare the lookup")?;
                        client.query(&statement, &[provider, remote, &after]).await
                    }
                    (Some(provider), None) => {
                        let statement = client
                            .prepare_cached(concat!(
                                "SELECT ",
                                record_columns!(),
                                " FROM linked_identities WHERE provider_id = $1 \
                                 AND user_id COLLATE \"C\" > $2 ORDER BY user_id COLLATE \"C\" LIMIT $3"
                            ))
                            .await
                            .or_fault("cannot prepare the search")?;
                        client.query(&statement, &[provider, &after, &fetch]).await
                    }
                    _ => {
                        let statement = client
                            .prepare_cached(concat!(
                                "SELECT ",
                                record_columns!(),
                                " FROM linked_identities WHERE user_id COLLATE \"C\" > $1 \
                                 ORDER BY user_id COLLATE \"C\" LIMIT $2"
                            ))
                            .await
                            .or_fault("cannot prepare the search")?;
                        client.query(&statement, &[&after, &fetch]).await
                    }
                }
                .or_fault("cannot search links")?;
                let mut links: Vec<LinkRecord> = rows.iter().map(record_from_row).collect();
                let more = links.len() > query.limit as usize;
                links.truncate(query.limit as usize);
                Ok(SearchPage { links, more })
            };
            let outcome = self.within(searched).await;
            self.settle(client, outcome)
        })
    }

    /// The pruning mark is read in the events' snapshot.
    fn events(&self, after: i64, limit: u32) -> Reply<'_, Vec<Event>> {
        Answer::boxed(async move {
            let mut client = self.client().await?;
            let read = async {
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .or_fault("cannot begin a read")?;
                let pruned: i64 = tx
                    .query_one("SELECT pruned_through FROM feed_state", &[])
                    .await
                    .or_fault("cannot read the pruning mark")?
                    .get(0);
                let statement = tx
                    .prepare_cached(
                        "SELECT seq, type, occurred_at, user_id, provider_id, linked_user_id, \
                         linked_username, actor, subject, request_id \
                         FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    )
                    .await
                    .or_fault("cannot prepare the feed query")?;
                let rows = tx
                    .query(&statement, &[&after, &i64::from(limit)])
                    .await
                    .or_fault("cannot read events")?;
                tx.commit().await.or_fault("cannot end the read")?;
                if after < pruned {
                    return Err(Fault::Store(StoreError::EventsExpired {
                        pruned_through: pruned,
                    }));
                }
                rows.iter().map(event_from_row).collect()
            };
            let outcome = self.within(read).await;
            self.settle(client, outcome)
        })
    }

    fn newest_event(&self) -> watch::Receiver<i64> {
        self.newest_event.subscribe()
    }

    fn refresh(&self) -> Reply<'_, ()> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let read = async {
                let row = client
                    .query_one("SELECT coalesce(max(seq), 0) FROM events", &[])
                    .await
                    .or_fault("cannot read the newest event")?;
                Ok(row.get::<_, i64>(0))
            };
            let outcome = self.within(read).await;
            let newest = self.settle(client, outcome)?;
            self.committed(Some(newest));
            Ok(())
        })
    }

    /// `refresh`: PostgreSQL's feed never starts again (`replace_all` is
    /// for SQLite only).
    fn reread_newest_event(&self) -> Reply<'_, ()> {
        self.refresh()
    }

    fn prune_events(&self, cutoff: String) -> Reply<'_, u64> {
        Answer::boxed(async move {
            let cutoff = humantime::parse_rfc3339(&cutoff)
                .map_err(|e| StoreError::from(anyhow::anyhow!("a bad pruning cutoff: {e}")))?;
            let mut client = self.client().await?;
            let pruned = async {
                let tx = client
                    .transaction()
                    .await
                    .or_fault("cannot begin the pruning")?;
                let through: Option<i64> = tx
                    .query_one(
                        "SELECT max(seq) FROM events WHERE occurred_at < $1",
                        &[&cutoff],
                    )
                    .await
                    .or_fault("cannot find old events")?
                    .get(0);
                let Some(through) = through else {
                    return Ok(0);
                };
                let deleted = tx
                    .execute("DELETE FROM events WHERE seq <= $1", &[&through])
                    .await
                    .or_fault("cannot prune events")?;
                tx.execute(
                    "UPDATE feed_state SET pruned_through = greatest(pruned_through, $1)",
                    &[&through],
                )
                .await
                .or_fault("cannot record the pruning")?;
                tx.commit().await.or_fault("cannot commit the pruning")?;
                Ok(deleted)
            };
            let outcome = self.within(pruned).await;
            self.settle(client, outcome)
        })
    }

    /// In one transaction. `linkid_revoke` takes each `seq` under the append
    /// lock (see the module comment), so no poller can miss one.
    fn revoke(&self, ids: Vec<String>) -> Reply<'_, usize> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let revoked = async {
                let row = client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE linkid_revoke(id)) FROM unnest($1::text[]) AS id",
                        &[&ids],
                    )
                    .await
                    .or_fault("cannot record a revocation")?;
                Ok(row.get::<_, i64>(0) as usize)
            };
            let outcome = self.within(revoked).await;
            self.settle(client, outcome)
        })
    }

    /// The mark is a `seq`: a smaller one never becomes visible after a
    /// larger one, so nothing at or below the newest seen can appear later.
    fn revoked_since(&self, after: i64) -> Reply<'_, (Vec<String>, i64)> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let read = async {
                let statement = client
                    .prepare_cached(
                        "SELECT seq, revocation_id FROM revoked_tokens WHERE seq > $1 ORDER BY seq",
                    )
                    .await
                    .or_fault("cannot prepare the revocation query")?;
                let rows = client
                    .query(&statement, &[&after])
                    .await
                    .or_fault("cannot read revocations")?;
                let newest = rows.last().map_or(after, |r| r.get(0));
                Ok((rows.iter().map(|r| r.get(1)).collect(), newest))
            };
            let outcome = self.within(read).await;
            self.settle(client, outcome)
        })
    }

    fn count(&self) -> Reply<'_, i64> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let counted = async {
                let row = client
                    .query_one("SELECT count(*) FROM linked_identities", &[])
                    .await
                    .or_fault("cannot count links")?;
                Ok(row.get(0))
            };
            let outcome = self.within(counted).await;
            self.settle(client, outcome)
        })
    }

    fn webhook_standing(&self, webhook: String, start_after: i64) -> Reply<'_, WebhookStanding> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self
                .within(webhooks::standing_in(&client, &webhook, start_after))
                .await;
            self.settle(client, outcome)
        })
    }

    fn save_webhook_standing(&self, standing: WebhookStanding, holder: String) -> Reply<'_, bool> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self
                .within(webhooks::save_in(&client, &standing, &holder))
                .await;
            self.settle(client, outcome)
        })
    }

    /// By the database's clock (see `webhooks`).
    fn lease_webhook(&self, webhook: String, holder: String, ttl: Duration) -> Reply<'_, bool> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self
                .within(webhooks::lease_in(&client, &webhook, &holder, ttl))
                .await;
            self.settle(client, outcome)
        })
    }

    fn release_webhook(&self, webhook: String, holder: String) -> Reply<'_, ()> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self
                .within(webhooks::release_in(&client, &webhook, &holder))
                .await;
            self.settle(client, outcome)
        })
    }

    fn replay_webhook(&self, webhook: String, after: i64) -> Reply<'_, WebhookStanding> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self
                .within(webhooks::replay_in(&client, &webhook, after))
                .await;
            self.settle(client, outcome)
        })
    }

    fn enable_webhook(&self, webhook: String) -> Reply<'_, Option<WebhookStanding>> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self.within(webhooks::enable_in(&client, &webhook)).await;
            self.settle(client, outcome)
        })
    }

    fn webhook_standings(&self) -> Reply<'_, Vec<(WebhookStanding, i64)>> {
        Answer::boxed(async move {
            let client = self.client().await?;
            let outcome = self.within(webhooks::standings_in(&client)).await;
            self.settle(client, outcome)
        })
    }

    /// A standby (read-only) is not ready.
    fn ready(&self) -> Answer<'_, Result<(), String>> {
        Answer::boxed(async move {
            let client = self.client().await.map_err(|e| e.to_string())?;
            let probed = async {
                let row = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .or_fault("the readiness query failed")?;
                Ok(row.get::<_, bool>(0))
            };
            let outcome = self.within(probed).await;
            match self.settle(client, outcome) {
                Ok(false) => Ok(()),
                Ok(true) => Err(format!(
                    "the database at {} is a read-only standby: point database.url at the primary (or add target_session_attrs=read-write)",
                    self.url
                )),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn pool_state(&self) -> (u32, u32) {
        let status = self.pool.status();
        (status.size as u32, status.available as u32)
    }

    /// Lets the writer finish what it was asked, then closes the pool.
    fn close(&self) -> Answer<'_, ()> {
        Answer::boxed(async move {
            if let Some(writer) = &self.writer {
                writer.close().await;
            }
            self.pool.close();
        })
    }
}

/// The driver's connection settings for `url`: the URL's, with linkid's
/// defaults where it names none. The statement timeout is set for every
/// session, so the server itself cancels a stuck statement.
fn connection_config(url: &PostgresUrl, timeout: Duration) -> tokio_postgres::Config {
    let mut config = url.connection.clone();
    if url.user().is_none() {
        config.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
    }
    if config.get_application_name().is_none() {
        config.application_name("linkid");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    // A peer that stops acknowledging (a dead host, a cut network) closes
    // the connection instead of leaving it to hang.
    config.tcp_user_timeout(timeout + Duration::from_secs(1));
    config.keepalives_idle(Duration::from_secs(30));
    config.options(format!("-c statement_timeout={}", timeout.as_millis()));
    config
}

#[cfg(test)]
mod tests;
