//! The SQLite backend, the embedded default: `SqliteStore` implements the
//! storage contract (`Backend`) on one database file, split by concern the
//! way lldap splits its SQL backend:
//!
//! - `schema.rs`: the schema's versions and their upgrades (with the NFC
//!   step), and the comparison keys brought to the configured rules;
//! - `queries.rs`: the SQL and its row mapping, shared by the rest;
//! - `writer.rs`: the one writer thread, its group commit (one transaction
//!   and one fsync for every write waiting) and its watch on the file;
//! - `reads.rs`: the read path — short reads inline on the async threads,
//!   plain or fast (`row_cache.rs`, `wal_stamp.rs`; `database.row_cache_bytes`
//!   chooses), and long reads on a pool;
//! - `admin.rs`: seed, backup, export and import, beside a running server;
//!   `lock.rs`: one server per file;
//! - `webhooks.rs`: where each webhook stands (the delivery engine's ledger).
//!
//! This file opens the database and maps each operation to those parts.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, ErrorCode};
use tokio::sync::watch;

use super::{Answer, Backend, Reply};
use super::{LinkOutcome, SearchPage, SearchQuery, StoreError};
use crate::config::{DatabaseConfig, Problem};
use crate::domain::{
    Actor, Event, IdRules, LinkRecord, NewLink, ProviderId, UserId, WebhookStanding,
};

pub(crate) mod admin;
pub(crate) mod lock;
mod queries;
mod reads;
mod row_cache;
mod schema;
mod wal_stamp;
mod webhooks;
mod writer;

pub(crate) use reads::end_inline_reads;
pub(crate) use schema::SCHEMA_VERSION;

use queries::newest_event_in;
use reads::Reads;
use row_cache::Read;
use writer::{Health, WriterHandle};

const PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;";

/// The SQLite store: one writer thread, and the read path.
pub struct SqliteStore {
    path: PathBuf,
    writer: WriterHandle,
    reads: Reads,
    /// The newest committed event's seq (see `Backend::newest_event`); the
    /// writer moves it after each commit.
    newest_event: Arc<watch::Sender<i64>>,
    /// A server's hold on the file (see `lock`); released by `close`.
    serving: Mutex<Option<lock::ServingLock>>,
    /// How each provider compares remote ids (the keys follow it).
    rules: IdRules,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, upgrades its schema,
    /// brings the keys to `rules` and starts the writer thread.
    pub fn open(config: &DatabaseConfig, rules: &IdRules) -> anyhow::Result<SqliteStore> {
        let path = config.path.as_path();
        let mut conn = open_writer(path)?;
        schema::migrate(&mut conn, path, rules)?;
        conn.set_prepared_statement_cache_capacity(32);
        let health = Arc::new(Health::default());
        let reads = Reads::open(
            path,
            config.pool_size,
            config.row_cache_bytes,
            health.clone(),
        )?;
        let newest = newest_event_in(&conn).context("cannot read the change feed")?;
        let newest_event = Arc::new(watch::Sender::new(newest));
        let writer = WriterHandle::start(
            conn,
            path,
            config.clock,
            config.max_batch,
            health,
            newest_event.clone(),
        )?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer,
            reads,
            newest_event,
            serving: Mutex::new(None),
            rules: rules.clone(),
        })
    }

    /// Opens the database for a server: first takes the file's serving
    /// lock, so that a second server on it refuses to start.
    pub fn open_serving(config: &DatabaseConfig, rules: &IdRules) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the database directory {}", dir.display())
            })?;
        }
        let serving = lock::ServingLock::acquire(&config.path)?;
        let store = Self::open(config, rules)?;
        *store.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(serving);
        Ok(store)
    }

    /// Reads the newest event's seq on a pooled connection (it may be
    /// another process's).
    async fn read_newest_event(&self) -> Result<i64, StoreError> {
        self.reads.pooled(newest_event_in).await
    }
}

impl Backend for SqliteStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// One index seek, inline, through the row cache.
    fn list<'a>(&'a self, user: &'a UserId) -> Reply<'a, Vec<LinkRecord>> {
        let read = Read::Links {
            user: user.as_str(),
        };
        Answer::ready(
            self.reads
                .cached(read, |conn| queries::links_of(conn, user.as_str())),
        )
    }

    /// A job for the writer (as is every write): answered once its batch
    /// is durably committed.
    fn link(&self, user: UserId, link: NewLink, actor: Actor) -> Reply<'_, LinkOutcome> {
        let key = self
            .rules
            .key(link.provider_id.as_str(), link.linked_user_id.as_str());
        self.writer
            .submit(move |conn, stamp| queries::link_in(conn, &user, &link, &key, &actor, stamp))
    }

    fn unlink(&self, user: UserId, provider: ProviderId, actor: Actor) -> Reply<'_, LinkRecord> {
        self.writer
            .submit(move |conn, stamp| queries::unlink_in(conn, &user, &provider, &actor, stamp))
    }

    /// With both filters it is one seek on the `one_user_per_remote_identity`
    /// index, inline (through the row cache for a first page); with the
    /// provider alone it walks `links_by_provider`, and without filters the
    /// `user_id` index, off the async threads (a page may walk a thousand
    /// rows).
    fn search(&self, mut query: SearchQuery) -> Reply<'_, SearchPage> {
        // From here on the remote id is its comparison key: the lookup
        // (and the row cache) finds it in any form the provider's rule
        // equates.
        if let (Some(provider), Some(remote)) = (&query.provider_id, &query.linked_user_id) {
            query.linked_user_id = Some(self.rules.key(provider, remote));
        }
        if let (Some(provider), Some(remote), None) =
            (&query.provider_id, &query.linked_user_id, &query.after_user)
        {
            let read = Read::Lookup { provider, remote };
            let links = self
                .reads
                .cached(read, |conn| Ok(queries::search_in(conn, &query)?.links));
            Answer::ready(links.map(|links| SearchPage {
                more: links.len() > query.limit as usize,
                links,
            }))
        } else if query.provider_id.is_some() && query.linked_user_id.is_some() {
            Answer::ready(self.reads.inline(|conn| queries::search_in(conn, &query)))
        } else {
            Answer::boxed(
                self.reads
                    .pooled(move |conn| queries::search_in(conn, &query)),
            )
        }
    }

    fn events(&self, after: i64, limit: u32) -> Reply<'_, Vec<Event>> {
        Answer::boxed(async move {
            let (pruned_through, events) = self
                .reads
                .pooled(move |conn| {
                    // One read transaction: the pruning mark and the events agree.
                    conn.execute_batch("BEGIN")?;
                    let read = queries::events_after(conn, after, limit);
                    conn.execute_batch("COMMIT")?;
                    read
                })
                .await?;
            if after < pruned_through {
                return Err(StoreError::EventsExpired { pruned_through });
            }
            Ok(events)
        })
    }

    fn newest_event(&self) -> watch::Receiver<i64> {
        self.newest_event.subscribe()
    }

    /// Reads the newest event, which another process (`linkid import`) may
    /// have committed.
    fn refresh(&self) -> Reply<'_, ()> {
        Answer::boxed(async move {
            let newest = self.read_newest_event().await?;
            self.newest_event.send_if_modified(|seen| {
                let newer = newest > *seen;
                if newer {
                    *seen = newest;
                }
                newer
            });
            Ok(())
        })
    }

    fn reread_newest_event(&self) -> Reply<'_, ()> {
        Answer::boxed(async move {
            let newest = self.read_newest_event().await?;
            self.newest_event.send_replace(newest);
            Ok(())
        })
    }

    fn prune_events(&self, cutoff: String) -> Reply<'_, u64> {
        self.writer
            .submit(move |conn, _| queries::prune_events_in(conn, &cutoff))
    }

    fn revoke(&self, ids: Vec<String>) -> Reply<'_, usize> {
        self.writer
            .submit(move |conn, stamp| queries::revoke_in(conn, &ids, stamp))
    }

    fn revoked_since(&self, after: i64) -> Reply<'_, (Vec<String>, i64)> {
        Answer::boxed(
            self.reads
                .pooled(move |conn| queries::revoked_after(conn, after)),
        )
    }

    fn count(&self) -> Reply<'_, i64> {
        Answer::boxed(self.reads.pooled(queries::count_links))
    }

    /// A read first: the engine asks every few seconds, and only a
    /// webhook's first sight writes.
    fn webhook_standing(&self, webhook: String, start_after: i64) -> Reply<'_, WebhookStanding> {
        Answer::boxed(async move {
            let id = webhook.clone();
            if let Some(standing) = self
                .reads
                .pooled(move |conn| webhooks::standing_of(conn, &id))
                .await?
            {
                return Ok(standing);
            }
            self.writer
                .submit(move |conn, _| webhooks::standing_in(conn, &webhook, start_after))
                .await
        })
    }

    fn save_webhook_standing(&self, standing: WebhookStanding, _holder: String) -> Reply<'_, bool> {
        self.writer
            .submit(move |conn, _| webhooks::save_in(conn, &standing))
    }

    /// One server at a time opens the file (see `lock`): it holds every lease.
    fn lease_webhook(&self, _webhook: String, _holder: String, _ttl: Duration) -> Reply<'_, bool> {
        Answer::ready(Ok(true))
    }

    fn release_webhook(&self, _webhook: String, _holder: String) -> Reply<'_, ()> {
        Answer::ready(Ok(()))
    }

    fn replay_webhook(&self, webhook: String, after: i64) -> Reply<'_, WebhookStanding> {
        self.writer
            .submit(move |conn, _| webhooks::replay_in(conn, &webhook, after))
    }

    fn enable_webhook(&self, webhook: String) -> Reply<'_, Option<WebhookStanding>> {
        self.writer
            .submit(move |conn, _| webhooks::enable_in(conn, &webhook))
    }

    fn webhook_standings(&self) -> Reply<'_, Vec<(WebhookStanding, i64)>> {
        Answer::boxed(self.reads.pooled(webhooks::standings_in))
    }

    /// Whether the database answers: the file is the one opened, the writer
    /// can write (tried for real after a failure), and the file opens and
    /// reads afresh.
    fn ready(&self) -> Answer<'_, Result<(), String>> {
        Answer::boxed(async move {
            self.writer.probe().await?;
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || {
                let conn = Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                conn.busy_timeout(Duration::from_secs(2))
                    .map_err(|e| e.to_string())?;
                conn.query_row("SELECT count(*) FROM linked_identities LIMIT 1", [], |_| {
                    Ok(())
                })
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
            })
            .await
            .map_err(|e| format!("the readiness check died: {e}"))?
        })
    }

    /// Open and idle pooled read connections.
    fn pool_state(&self) -> (u32, u32) {
        self.reads.pool_state()
    }

    /// Writes what is queued, checkpoints the WAL and stops the writer.
    fn close(&self) -> Answer<'_, ()> {
        Answer::boxed(async move {
            self.writer.close().await;
            // The next server may start as soon as this one has checkpointed.
            self.serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        })
    }
}

/// Checks, changing nothing, that a server could open the database at
/// `path`: an existing file must be a SQLite database this binary can read
/// and write, and its directory must take new files (the WAL); a missing
/// one must be creatable. Returns the pid of a server using it now.
pub(crate) fn check(path: &Path) -> Result<Option<u32>, Vec<Problem>> {
    const KEY: &str = "database.path";
    let shown = path.display();
    if !path.exists() {
        return match crate::config::creation_problem(KEY, path) {
            Some(problem) => Err(vec![problem]),
            None => Ok(None),
        };
    }
    if !path.is_file() {
        return Err(vec![Problem::new(
            KEY,
            format!("{shown} is not a file"),
            "point it at a file path",
        )]);
    }
    let mut problems = Vec::new();
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        problems.push(Problem::new(
            KEY,
            format!("{shown} cannot be opened for writing ({e})"),
            "let the server's user read and write it (chown, chmod 600)",
        ));
        return Err(problems);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    problems.extend(crate::config::creation_problem(
        KEY,
        &dir.join(".linkid-wal-check"),
    ));
    // This may be the process's first connection.
    configure_sqlite();
    let version = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|conn| {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
            conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        });
    match version {
        // (`migrate` refuses it too, through `refuse_newer`, at start.)
        Ok(version) if version > SCHEMA_VERSION => problems.push(Problem::new(
            KEY,
            format!(
                "{shown} has schema version {version}, newer than this linkid's schema version {SCHEMA_VERSION}"
            ),
            "run the newer linkid that wrote it, or restore a backup made by this one",
        )),
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::NotADatabase => {
            problems.push(Problem::new(
                KEY,
                format!("{shown} is not a SQLite database"),
                "point it at linkid's database file, or at a path where none exists yet",
            ));
        }
        Err(e) => problems.push(Problem::new(
            KEY,
            format!("{shown} cannot be read as a database ({e})"),
            "check the file and its permissions",
        )),
    }
    if problems.is_empty() {
        Ok(lock::ServingLock::holder(path))
    } else {
        Err(problems)
    }
}

/// Turns off SQLite's memory statistics, once, before the process's first
/// connection (every place that may open it first calls this): with them
/// on, every allocation SQLite makes takes a global mutex that all
/// connections share. (Too late — another connection came first — it
/// changes nothing and says so with an error code we ignore.)
fn configure_sqlite() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int, as passed; before
        // sqlite3_initialize SQLite is not in use by any other thread
        // through this process's connections, and after it the call is a
        // refused no-op (SQLITE_MISUSE).
        unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            );
        }
    });
}

/// Opens the database for writing, creating the file (0600) and its
/// directory when missing, in WAL mode.
pub(super) fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    configure_sqlite();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the database directory {}", dir.display()))?;
    }
    if !path.exists() {
        // Links are personal data: only the service's user reads them
        // (SQLite gives the -wal and -shm files the same mode).
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create database.path {}", path.display()))
            }
        }
    }
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open database.path {}", path.display()))?;
    conn.execute_batch(PRAGMAS)
        .context("cannot configure the database")?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .context("cannot switch the database to WAL")?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "the database refused WAL mode"
    );
    Ok(conn)
}
