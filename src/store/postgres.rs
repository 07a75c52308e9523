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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use tokio::sync::watch;

use super::{LinkOutcome, SearchPage, SearchQuery, StoreError};
use crate::config::{DatabaseConfig, PostgresUrl};
use crate::domain::{Actor, Event, EventType, IdRules, LinkRecord, NewLink, ProviderId, UserId};

pub(crate) mod admin;
mod migrations;
mod tls;

/// linkid's advisory locks are `(LOCK_NAMESPACE, n)`: n = 0 for schema
/// upgrades, a sequence's oid for appends in commit order (see
/// `linkid_next_seq` in the migrations, which spells the same number).
const LOCK_NAMESPACE: i32 = 0x6c69_6e6b; // "link"

/// How many times a link tries again (after losing a race to a row that
/// then went away, or a deadlock) before giving up with a 503.
const LINK_ATTEMPTS: usize = 16;

/// A `LinkRecord`'s columns, in `record_from_row`'s order (a macro, so
/// that queries are `concat!`ed once, at compile time).
macro_rules! record_columns {
    () => {
        "user_id, provider_id, linked_user_id, linked_username, created_at, updated_at"
    };
}

/// The PostgreSQL store: a pool of connections to one database.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    url: Arc<PostgresUrl>,
    /// `database.statement_timeout_secs`.
    timeout: Duration,
    /// The newest committed event's seq (see `Store::newest_event`).
    newest_event: Arc<watch::Sender<i64>>,
    /// How each provider compares remote ids (the keys follow it).
    rules: Arc<IdRules>,
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
            url: Arc::new(url.clone()),
            timeout,
            newest_event: Arc::new(watch::Sender::new(0)),
            rules: Arc::new(rules.clone()),
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
        Ok(store)
    }

    /// Where the data lives: the URL without its password.
    pub fn url(&self) -> &PostgresUrl {
        &self.url
    }

    /// A user's linked identities, oldest first.
    pub async fn list(&self, user: &UserId) -> Result<Vec<LinkRecord>, StoreError> {
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
    }

    /// Links a remote identity to a user (see `LinkOutcome`), with its event.
    pub async fn link(
        &self,
        user: UserId,
        link: NewLink,
        actor: Actor,
    ) -> Result<LinkOutcome, StoreError> {
        let key = self
            .rules
            .key(link.provider_id.as_str(), link.linked_user_id.as_str());
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
    }

    /// Deletes a user's link to a provider, returning what was deleted,
    /// with its event.
    pub async fn unlink(
        &self,
        user: UserId,
        provider: ProviderId,
        actor: Actor,
    ) -> Result<LinkRecord, StoreError> {
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
    }

    /// One page of all links in `user_id` order, compared byte by byte
    /// (the "C" collation) as SQLite does. Each form is one index walk:
    /// `one_user_per_remote_identity` for the lookup, `links_by_provider`,
    /// `links_by_user`. The lookup is by the remote id's comparison key.
    pub async fn search(&self, query: SearchQuery) -> Result<SearchPage, StoreError> {
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
    }

    /// Up to `limit` events after `after`, in `seq` order, with the pruning
    /// mark read in the same snapshot.
    pub async fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
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
    }

    pub fn newest_event(&self) -> watch::Receiver<i64> {
        self.newest_event.subscribe()
    }

    /// Reads the newest event, which another instance may have committed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
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
    }

    /// Deletes events that occurred before `cutoff`; returns how many.
    pub async fn prune_events(&self, cutoff: String) -> Result<u64, StoreError> {
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

    /// Records revocation ids in one transaction; returns how many were new.
    /// `linkid_revoke` takes each `seq` under the append lock (see the module
    /// comment), so no poller can miss one.
    pub async fn revoke(&self, ids: Vec<String>) -> Result<usize, StoreError> {
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
    }

    /// Revocation ids recorded after `after` (a `seq`), and the newest `seq`
    /// seen. A smaller `seq` never becomes visible after a larger one, so
    /// nothing at or below the newest can appear later.
    pub async fn revoked_since(&self, after: i64) -> Result<(Vec<String>, i64), StoreError> {
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
    }

    /// How many links are stored.
    pub async fn count(&self) -> Result<i64, StoreError> {
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
    }

    /// Whether the database answers and takes writes; the error says why not.
    pub async fn ready(&self) -> Result<(), String> {
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
    }

    /// Open and idle connections.
    pub fn pool_state(&self) -> (u32, u32) {
        let status = self.pool.status();
        (status.size as u32, status.available as u32)
    }

    /// Closes the pool; later operations fail as unavailable.
    pub async fn close(&self) {
        self.pool.close();
    }

    /// A pooled connection, within the timeout.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// Runs `work` within the statement timeout, plus a margin for the
    /// server's own cancellation to arrive first.
    async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Fault>>,
    ) -> Result<Result<T, Fault>, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.timeout + Duration::from_secs(1), work).await
    }

    /// Maps what `work` on `client` gave. A connection that did not answer
    /// in time, or broke, is dropped rather than handed to the next request.
    fn settle<T>(
        &self,
        client: Object,
        outcome: Result<Result<T, Fault>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Fault::Store(error))) => Err(error),
            Ok(Err(Fault::Postgres { error, what })) => {
                if error.is_closed() || error.as_db_error().is_none() {
                    drop(Object::take(client));
                }
                Err(self.postgres_error(error, what))
            }
            Err(_) => {
                drop(Object::take(client));
                Err(StoreError::Unavailable(format!(
                    "the database at {} did not answer within {}s (database.statement_timeout_secs)",
                    self.hosts(),
                    self.timeout.as_secs()
                )))
            }
        }
    }

    /// The hosts of the URL, for messages.
    fn hosts(&self) -> String {
        let hosts: Vec<String> = self.url.hosts().iter().map(|h| h.to_string()).collect();
        hosts.join(",")
    }

    fn pool_error(&self, error: PoolError) -> StoreError {
        let secs = self.timeout.as_secs();
        let hosts = self.hosts();
        match error {
            PoolError::Timeout(TimeoutType::Wait) => StoreError::Unavailable(format!(
                "no database connection was free within {secs}s (database.pool_size connections are all busy)"
            )),
            PoolError::Timeout(TimeoutType::Create) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {hosts}: no answer within {secs}s"
            )),
            PoolError::Timeout(TimeoutType::Recycle) => StoreError::Unavailable(format!(
                "the connection to PostgreSQL at {hosts} did not answer within {secs}s"
            )),
            PoolError::Backend(error) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {hosts}: {}",
                describe(&error)
            )),
            PoolError::Closed => StoreError::Unavailable("the database connections are closed".into()),
            other => anyhow::anyhow!("the connection pool failed: {other}").into(),
        }
    }

    /// Turns a statement's error into the store's: an unreachable, stopping,
    /// overloaded or slow database is `Unavailable`, a full disk is `Full`.
    fn postgres_error(&self, error: tokio_postgres::Error, what: &'static str) -> StoreError {
        let hosts = self.hosts();
        let Some(db) = error.as_db_error() else {
            let broken = error.is_closed()
                || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>());
            if !broken {
                // (A value the driver cannot convert: a bug, not an outage.)
                return anyhow::Error::new(error).context(what).into();
            }
            return StoreError::Unavailable(format!(
                "the connection to PostgreSQL at {hosts} was lost: {}",
                describe(&error)
            ));
        };
        let code = db.code();
        let class = &code.code()[..2];
        if *code == SqlState::QUERY_CANCELED {
            StoreError::Unavailable(format!(
                "PostgreSQL at {hosts} did not finish a statement within {}s (database.statement_timeout_secs)",
                self.timeout.as_secs()
            ))
        } else if *code == SqlState::DISK_FULL {
            StoreError::Full(format!("PostgreSQL at {hosts}: {}", db.message()))
        } else if matches!(class, "08" | "53" | "57" | "58")
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            StoreError::Unavailable(format!(
                "PostgreSQL at {hosts}: {} (SQLSTATE {})",
                db.message(),
                code.code()
            ))
        } else {
            anyhow::Error::new(error).context(what).into()
        }
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

/// A driver error in words, with its causes (which never hold the password:
/// the driver never repeats it).
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let words = cause.to_string();
        if !text.contains(&words) {
            text = format!("{text}: {words}");
        }
        source = cause.source();
    }
    text
}

/// Why an operation stopped: an outcome the store reports as it is, or a
/// driver error still to be classified.
enum Fault {
    Store(StoreError),
    Postgres {
        error: tokio_postgres::Error,
        what: &'static str,
    },
}

impl From<StoreError> for Fault {
    fn from(error: StoreError) -> Self {
        Fault::Store(error)
    }
}

trait OrFault<T> {
    fn or_fault(self, what: &'static str) -> Result<T, Fault>;
}

impl<T> OrFault<T> for Result<T, tokio_postgres::Error> {
    fn or_fault(self, what: &'static str) -> Result<T, Fault> {
        self.map_err(|error| Fault::Postgres { error, what })
    }
}

/// The uniqueness rules of schema.sql, by constraint name.
const LINK_RULES: [&str; 2] = ["one_link_per_user", "one_user_per_remote_identity"];

/// Whether the fault is a violation of one of the link rules: SQLSTATE
/// 23505 on one of their constraints (never judged by message text). Any
/// other unique violation is a bug.
fn breaks_a_link_rule(fault: &Fault) -> bool {
    let Fault::Postgres { error, .. } = fault else {
        return false;
    };
    error.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION
            && db
                .constraint()
                .is_some_and(|name| LINK_RULES.contains(&name))
    })
}

fn is_deadlock(fault: &Fault) -> bool {
    matches!(fault, Fault::Postgres { error, .. }
        if error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

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
async fn link_in(
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
async fn record_event(
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

fn event_from_row(row: &Row) -> Result<Event, Fault> {
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

fn record_from_row(row: &Row) -> LinkRecord {
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
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests;
