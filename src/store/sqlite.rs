//! The SQLite backend, the embedded default: one function per operation.
//!
//! Short reads (a user's links, one link, the reverse lookup) run inline on
//! the async thread's own connection, through an exact row cache for the
//! list and the lookup (see `read_inline`, `row_cache`); reads that may walk
//! many rows run on a pooled connection in `spawn_blocking`. Writes go to
//! one writer thread, which runs every write that is waiting in one
//! transaction (outcomes stay exact per request; see `apply_batch`) and
//! answers each request only after that transaction's commit is durable:
//! WAL with `synchronous = FULL` syncs the log on every commit.
//!
//! The writer also watches the file: a database file deleted or replaced
//! under the server, a full disk or a read-only one makes writes fail as
//! `Unavailable` or `Full` (never a success that a restart would lose), and
//! service resumes by itself when the cause is gone.

use std::cell::RefCell;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::oneshot;

use tokio::sync::watch;

use super::keys;
use super::{LinkOutcome, SearchPage, SearchQuery, StoreError};
use crate::config::{DatabaseConfig, Problem};
use crate::domain::{Actor, Event, EventType, IdRules, LinkRecord, NewLink, ProviderId, UserId};

pub(crate) mod admin;
pub(crate) mod lock;
mod row_cache;
mod wal_stamp;

use row_cache::{Read, RowCache};
use wal_stamp::{WalIndex, WalStamp};

/// Each schema version's upgrade from the one before, in order:
/// `MIGRATIONS[i]` makes version `i + 1`. Released versions never change.
const MIGRATIONS: [&str; 3] = [
    // 1: release 0.1.0 (which recorded no version): links and revocations.
    "CREATE TABLE linked_identities (
        id              INTEGER PRIMARY KEY,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        CONSTRAINT one_link_per_user UNIQUE (user_id),
        CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_id)
    ) STRICT;
    CREATE TABLE revoked_tokens (
        seq           INTEGER PRIMARY KEY,
        revocation_id TEXT NOT NULL UNIQUE,
        revoked_at    TEXT NOT NULL
    ) STRICT;",
    // 2: search by provider, the change feed. Links made before it enter
    // the feed as LINKED events by `upgrade`, so that replaying the feed
    // from the start rebuilds every stored link. (A seq is the rowid, one
    // more than the newest; pruning always keeps the newest event, so a
    // seq is never handed out twice.)
    "CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id);
    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY,
        type            TEXT NOT NULL CHECK (type IN ('LINKED', 'UPDATED', 'UNLINKED')),
        occurred_at     TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        actor           TEXT NOT NULL,
        subject         TEXT,
        request_id      TEXT
    ) STRICT;
    CREATE TABLE feed_state (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        pruned_through INTEGER NOT NULL
    ) STRICT;
    INSERT INTO feed_state (id, pruned_through) VALUES (1, 0);
    INSERT INTO events (type, occurred_at, user_id, provider_id, linked_user_id, linked_username, actor)
        SELECT 'LINKED', created_at, user_id, provider_id, linked_user_id, linked_username, 'upgrade'
        FROM linked_identities ORDER BY id;",
    // 3: remote ids compared by a stored key (the id itself, or its case
    // fold at a provider with case_insensitive_ids), unique per provider in
    // place of the id; which providers fold, as last applied. SQLite
    // changes a UNIQUE constraint by rebuilding the table (rowids kept).
    // `upgrade_to_nfc` then puts the stored texts in NFC, and `apply_rules`
    // folds the keys the configuration asks for.
    "CREATE TABLE linked_identities_v3 (
        id              INTEGER PRIMARY KEY,
        user_id         TEXT NOT NULL,
        provider_id     TEXT NOT NULL,
        linked_user_id  TEXT NOT NULL,
        linked_user_key TEXT NOT NULL,
        linked_username TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        CONSTRAINT one_link_per_user UNIQUE (user_id),
        CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_key)
    ) STRICT;
    INSERT INTO linked_identities_v3 (id, user_id, provider_id, linked_user_id, linked_user_key,
                                      linked_username, created_at, updated_at)
        SELECT id, user_id, provider_id, linked_user_id, linked_user_id, linked_username,
               created_at, updated_at
        FROM linked_identities ORDER BY id;
    DROP TABLE linked_identities;
    ALTER TABLE linked_identities_v3 RENAME TO linked_identities;
    CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id);
    CREATE TABLE case_insensitive_providers (
        provider_id TEXT PRIMARY KEY
    ) STRICT;",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The SQLite store: a pool of readers and one writer thread.
#[derive(Clone)]
pub struct SqliteStore {
    /// Tells this store's inline read connections from other stores' (tests
    /// run many in one process).
    id: u64,
    readers: Pool<SqliteConnectionManager>,
    writer: mpsc::Sender<Message>,
    path: PathBuf,
    health: Arc<Health>,
    /// The newest committed event's seq (see `Store::newest_event`).
    newest_event: Arc<watch::Sender<i64>>,
    /// A server's hold on the file (see `lock`); released by `close`.
    serving: Arc<Mutex<Option<lock::ServingLock>>>,
    /// The file's WAL index, which tells whether anyone committed (see
    /// `read_inline`); `None` when it cannot be mapped.
    wal: Option<Arc<WalIndex>>,
    /// Short reads' answers, served while nobody has committed since.
    rows: Arc<RowCache>,
    /// How each provider compares remote ids (the keys follow it).
    rules: Arc<IdRules>,
}

/// What the writer has learned about the file and its disk; reads and
/// readiness consult it.
#[derive(Default)]
struct Health {
    /// The file at `database.path` is no longer the one this store opened.
    file_gone: AtomicBool,
    /// Why writes fail for a cause outside any request (a full or read-only
    /// disk), until one succeeds again.
    writes_failing: Mutex<Option<StoreError>>,
}

impl Health {
    fn writes_failing(&self) -> Option<StoreError> {
        self.writes_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_writes_failing(&self, cause: Option<StoreError>) {
        *self
            .writes_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = cause;
    }
}

/// Which file a path names: a file deleted and re-created, or replaced by
/// a rename, has another identity even at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        std::fs::metadata(path).ok().map(|m| FileIdentity {
            device: m.dev(),
            inode: m.ino(),
        })
    }
}

const FILE_GONE: &str =
    "the database file was deleted or replaced while linkid ran; put it back or restart linkid";

enum WriteOp {
    Link {
        user: UserId,
        link: NewLink,
        /// The remote id's comparison key (`IdRules::key`).
        key: String,
        actor: Actor,
    },
    Unlink {
        user: UserId,
        provider: ProviderId,
        actor: Actor,
    },
    Revoke {
        ids: Vec<String>,
    },
    PruneEvents {
        cutoff: String,
    },
}

enum WriteResult {
    Link(LinkOutcome),
    Unlink(LinkRecord),
    Revoke(usize),
    PruneEvents(u64),
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

enum Message {
    Write(WriteJob),
    /// Whether writes can succeed now: answered after any batch in
    /// progress, with a real write when the last one failed.
    Probe(oneshot::Sender<Result<(), String>>),
    /// Finish what is queued, checkpoint the WAL into the database, stop.
    Close(oneshot::Sender<()>),
}

const PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;";

/// What every read connection runs first.
const READER_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;";

/// Numbers the stores of this process (see `SqliteStore::id`).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

/// The most inline read connections one thread keeps (one per store; more
/// only in a process that opens many stores, such as the tests).
const INLINE_READERS_PER_THREAD: usize = 4;

thread_local! {
    /// This thread's own read connections, one per store: a short read runs
    /// on the async thread that asks for it (see `SqliteStore::read_inline`).
    static INLINE_READERS: RefCell<Vec<InlineReader>> = const { RefCell::new(Vec::new()) };
}

/// One thread's read connection to one store.
struct InlineReader {
    store: u64,
    conn: Connection,
    /// When this connection has a read transaction open: the WAL-index
    /// header from just before it began. While the header is unchanged
    /// nobody has committed since, so the transaction's snapshot is the
    /// newest state and the next read may use it too, sparing SQLite's
    /// per-transaction locking (a system call and a mutex every other
    /// thread's reads contend for).
    open_since: Option<WalStamp>,
}

impl InlineReader {
    /// Ends the open read transaction, if any.
    fn end(&mut self) {
        if self.open_since.take().is_some() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Ends this thread's open inline read transactions. The runtime calls it
/// when a worker thread goes idle, so that an idle thread's snapshot does
/// not keep the WAL from being reset.
pub(crate) fn end_inline_reads() {
    let _ = INLINE_READERS.try_with(|readers| {
        if let Ok(mut readers) = readers.try_borrow_mut() {
            readers.iter_mut().for_each(InlineReader::end);
        }
    });
}

/// How often an idle writer looks at the file.
const FILE_CHECK: Duration = Duration::from_secs(1);

impl SqliteStore {
    /// Opens (creating if needed) the database file, upgrades its schema,
    /// brings the keys to `rules` and starts the writer thread.
    pub fn open(config: &DatabaseConfig, rules: &IdRules) -> anyhow::Result<SqliteStore> {
        let (path, pool_size, max_batch) =
            (config.path.as_path(), config.pool_size, config.max_batch);
        let mut writer = open_writer(path)?;
        migrate(&mut writer, path, rules)?;
        writer.set_prepared_statement_cache_capacity(32);
        let identity = FileIdentity::of(path)
            .with_context(|| format!("database.path {} vanished at start", path.display()))?;

        let manager =
            SqliteConnectionManager::file(path).with_init(|c| c.execute_batch(READER_PRAGMAS));
        let readers = Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(1))
            // r2d2's default check prepares a statement on every checkout.
            .test_on_check_out(false)
            .build(manager)
            .context("cannot open the read connections")?;

        let health = Arc::new(Health::default());
        let newest = newest_event_in(&writer).context("cannot read the change feed")?;
        let newest_event = Arc::new(watch::Sender::new(newest));
        let (sender, receiver) = mpsc::channel();
        let writer_state = Writer {
            conn: writer,
            clock: config.clock,
            path: path.to_path_buf(),
            identity,
            health: health.clone(),
            newest_event: newest_event.clone(),
        };
        std::thread::Builder::new()
            .name("linkid-writer".into())
            .spawn(move || writer_state.run(receiver, max_batch))
            .context("cannot start the writer thread")?;
        Ok(SqliteStore {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            readers,
            writer: sender,
            path: path.to_path_buf(),
            health,
            newest_event,
            serving: Arc::new(Mutex::new(None)),
            wal: WalIndex::open(path).map(Arc::new),
            rows: Arc::new(RowCache::new(row_cache::CAPACITY_BYTES)),
            rules: Arc::new(rules.clone()),
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A user's linked identities, oldest first (one index seek, inline).
    pub async fn list(&self, user: &UserId) -> Result<Vec<LinkRecord>, StoreError> {
        let read = Read::Links {
            user: user.as_str(),
        };
        self.read_cached(read, |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
                 FROM linked_identities WHERE user_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([user.as_str()], record_from_row)?;
            rows.collect::<Result<Vec<_>, _>>()
        })
    }

    /// Links a remote identity to a user (see `LinkOutcome`).
    pub async fn link(
        &self,
        user: UserId,
        link: NewLink,
        actor: Actor,
    ) -> Result<LinkOutcome, StoreError> {
        let key = self
            .rules
            .key(link.provider_id.as_str(), link.linked_user_id.as_str());
        match self
            .write(WriteOp::Link {
                user,
                link,
                key,
                actor,
            })
            .await?
        {
            WriteResult::Link(outcome) => Ok(outcome),
            _ => unreachable!("the writer answers a link with a link"),
        }
    }

    /// Deletes a user's link to a provider, returning what was deleted.
    pub async fn unlink(
        &self,
        user: UserId,
        provider: ProviderId,
        actor: Actor,
    ) -> Result<LinkRecord, StoreError> {
        match self
            .write(WriteOp::Unlink {
                user,
                provider,
                actor,
            })
            .await?
        {
            WriteResult::Unlink(identity) => Ok(identity),
            _ => unreachable!("the writer answers an unlink with an unlink"),
        }
    }

    /// One page of all links in `user_id` order (byte order: the same on
    /// every backend). With both filters it is one seek on the
    /// `one_user_per_remote_identity` index; with the provider alone it
    /// walks `links_by_provider`, and without filters the `user_id` index.
    pub async fn search(&self, mut query: SearchQuery) -> Result<SearchPage, StoreError> {
        // From here on the remote id is its comparison key: the lookup
        // (and the row cache) finds it in any form the provider's rule
        // equates.
        if let (Some(provider), Some(remote)) = (&query.provider_id, &query.linked_user_id) {
            query.linked_user_id = Some(self.rules.key(provider, remote));
        }
        // The lookup is one seek: inline. A page may walk a thousand rows:
        // off the async threads.
        if let (Some(provider), Some(remote), None) =
            (&query.provider_id, &query.linked_user_id, &query.after_user)
        {
            let read = Read::Lookup { provider, remote };
            let links = self.read_cached(read, |conn| Ok(search_in(conn, &query)?.links))?;
            Ok(SearchPage {
                more: links.len() > query.limit as usize,
                links,
            })
        } else if query.provider_id.is_some() && query.linked_user_id.is_some() {
            self.read_inline(|conn| search_in(conn, &query))
        } else {
            self.read(move |conn| search_in(conn, &query)).await
        }
    }
    /// Up to `limit` events after `after`, in `seq` order.
    pub async fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let (pruned_through, events) = self
            .read(move |conn| {
                // One read transaction: the pruning mark and the events agree.
                conn.execute_batch("BEGIN")?;
                let read = (|| {
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
                })();
                conn.execute_batch("COMMIT")?;
                read
            })
            .await?;
        if after < pruned_through {
            return Err(StoreError::EventsExpired { pruned_through });
        }
        Ok(events)
    }

    pub fn newest_event(&self) -> watch::Receiver<i64> {
        self.newest_event.subscribe()
    }

    /// Reads the newest event, which another process (`linkid import`) may
    /// have committed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let newest = self.read(newest_event_in).await?;
        self.newest_event.send_if_modified(|seen| {
            let newer = newest > *seen;
            if newer {
                *seen = newest;
            }
            newer
        });
        Ok(())
    }

    /// Reads the newest event and takes it as it is, also when it is older
    /// than the one known (after `replace_all` started the feed again).
    pub async fn reread_newest_event(&self) -> Result<(), StoreError> {
        let newest = self.read(newest_event_in).await?;
        self.newest_event.send_replace(newest);
        Ok(())
    }

    /// Deletes events that occurred before `cutoff`; returns how many.
    pub async fn prune_events(&self, cutoff: String) -> Result<u64, StoreError> {
        match self.write(WriteOp::PruneEvents { cutoff }).await? {
            WriteResult::PruneEvents(n) => Ok(n),
            _ => unreachable!("the writer answers a prune with a prune"),
        }
    }

    /// Records revocation ids; returns how many were new.
    pub async fn revoke(&self, ids: Vec<String>) -> Result<usize, StoreError> {
        match self.write(WriteOp::Revoke { ids }).await? {
            WriteResult::Revoke(n) => Ok(n),
            _ => unreachable!("the writer answers a revoke with a revoke"),
        }
    }

    /// Revocation ids recorded after `after` (a sequence number), and the
    /// newest sequence number. One writer at a time commits, in `seq`
    /// order, so nothing below the newest seen can appear later.
    pub async fn revoked_since(&self, after: i64) -> Result<(Vec<String>, i64), StoreError> {
        self.read(move |conn| {
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
        })
        .await
    }

    /// A short read through the row cache: the kept answer while nobody
    /// has committed since it was read, else `read_inline`'s.
    fn read_cached(
        &self,
        read: Read<'_>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<Vec<LinkRecord>>,
    ) -> Result<Vec<LinkRecord>, StoreError> {
        if self.health.file_gone.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(FILE_GONE.into()));
        }
        let before = self.wal.as_ref().and_then(|wal| wal.stamp());
        if let Some(links) = before.and_then(|now| self.rows.get(&read, now)) {
            return Ok(links);
        }
        let links = self.read_inline_as_of(before, f)?;
        if let Some(before) = before {
            self.rows.put(&read, before, &links);
        }
        Ok(links)
    }

    /// Runs a short read — an index seek that returns a row or two — on
    /// this thread's own connection, inline: the hand-off to a blocking
    /// thread and back costs several times what SQLite takes to answer from
    /// its page cache. Reads that may walk many rows use `read`.
    ///
    /// The thread's connection keeps its read transaction open from one
    /// read to the next for as long as nobody commits (the WAL index's
    /// header is unchanged), so every read still sees every commit made
    /// before it began, by this process or any other.
    fn read_inline<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        if self.health.file_gone.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(FILE_GONE.into()));
        }
        self.read_inline_as_of(self.wal.as_ref().and_then(|wal| wal.stamp()), f)
    }

    /// `read_inline` with the WAL-index header the caller took just before
    /// (`None`: unknown, so the read begins its own transaction).
    fn read_inline_as_of<T>(
        &self,
        now: Option<WalStamp>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        INLINE_READERS.with(|readers| {
            let mut readers = readers.borrow_mut();
            let at = match readers.iter().position(|r| r.store == self.id) {
                Some(at) => at,
                None => {
                    let conn = Connection::open(&self.path)
                        .and_then(|c| c.execute_batch(READER_PRAGMAS).map(|()| c))
                        .or_store("cannot open a read connection")?;
                    if readers.len() >= INLINE_READERS_PER_THREAD {
                        readers.remove(0);
                    }
                    readers.push(InlineReader {
                        store: self.id,
                        conn,
                        open_since: None,
                    });
                    readers.len() - 1
                }
            };
            let reader = &mut readers[at];
            if now.is_none() || reader.open_since != now {
                reader.end();
                if let Some(now) = now {
                    // Deferred: the snapshot is taken by the first read,
                    // after `now`, so it holds every commit `now` shows.
                    reader
                        .conn
                        .prepare_cached("BEGIN")
                        .and_then(|mut begin| begin.execute([]))
                        .or_store("cannot begin a read")?;
                    reader.open_since = Some(now);
                }
            }
            let read = f(&reader.conn);
            if read.is_err() {
                reader.end();
            }
            read.or_store("a read query failed")
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if self.health.file_gone.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(FILE_GONE.into()));
        }
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool
                .get()
                .map_err(|e| StoreError::Unavailable(format!("no read connection: {e}")))?;
            f(&conn).or_store("a read query failed")
        })
        .await
        .context("the read task died")?
    }

    /// Whether the database answers: the file is the one opened, the writer
    /// can write (tried for real after a failure), and the file opens and
    /// reads afresh. The error says why not.
    pub async fn ready(&self) -> Result<(), String> {
        let (reply, answered) = oneshot::channel();
        self.writer
            .send(Message::Probe(reply))
            .map_err(|_| "the writer has stopped".to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), answered).await {
            Ok(Ok(outcome)) => outcome?,
            Ok(Err(_)) => return Err("the writer has stopped".into()),
            Err(_) => return Err("the writer is stuck: no answer in 2 s".into()),
        }
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
    }

    /// How many links are stored.
    pub async fn count(&self) -> Result<i64, StoreError> {
        self.read(|conn| conn.query_row("SELECT count(*) FROM linked_identities", [], |r| r.get(0)))
            .await
    }

    /// Open and idle read connections.
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.readers.state();
        (state.connections, state.idle_connections)
    }

    /// Writes what is queued, checkpoints the WAL and stops the writer;
    /// later writes fail. Called once the server has drained.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.writer.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
        // The next server may start as soon as this one has checkpointed.
        self.serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Message::Write(WriteJob { op, reply }))
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?
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
fn open_writer(path: &Path) -> anyhow::Result<Connection> {
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

/// Upgrades the schema to `SCHEMA_VERSION` and brings the comparison keys
/// to `rules` (`apply_rules`), in one transaction: a refusal changes
/// nothing. Refuses a database written by a newer linkid.
fn migrate(conn: &mut Connection, path: &Path, rules: &IdRules) -> anyhow::Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("cannot lock the database to check its schema")?;
    let recorded: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .context("cannot read the schema version")?;
    let has_links: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'linked_identities'",
            [],
            |r| r.get(0),
        )
        .context("cannot read the schema")?;
    // Release 0.1.0 wrote version 1's tables and no version number.
    let version = if recorded == 0 && has_links {
        1
    } else {
        recorded
    };
    super::refuse_newer(version, SCHEMA_VERSION, &path.display().to_string())?;
    let upgrading = recorded != SCHEMA_VERSION;
    if upgrading {
        for (done, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let to = done + 1;
            tx.execute_batch(migration)
                .with_context(|| format!("cannot upgrade the schema to version {to}"))?;
            if to == 3 {
                upgrade_to_nfc(&tx)?;
            }
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .context("cannot record the schema version")?;
    }
    apply_rules(&tx, rules)?;
    tx.commit().context("cannot commit the schema upgrade")?;
    if upgrading && has_links {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "upgraded the database schema"
        );
    }
    Ok(())
}

/// Schema 3's step in Rust: every stored id and username in NFC (see
/// `keys::in_nfc`), read in chunks of the rows that hold any non-ASCII
/// (ASCII is NFC already). A link that changes enters the feed as it
/// changed, by actor `upgrade`: UNLINKED in its old form and LINKED in the
/// new when an id changed (so that a consumer keyed by ids follows), else
/// UPDATED. Two links that NFC makes one stop the upgrade, named.
fn upgrade_to_nfc(conn: &Connection) -> anyhow::Result<()> {
    const NOT_ASCII: &str =
        "SELECT id, user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
         FROM linked_identities WHERE id > ?1 AND ( \
             length(user_id) <> length(CAST(user_id AS BLOB)) \
             OR length(provider_id) <> length(CAST(provider_id AS BLOB)) \
             OR length(linked_user_id) <> length(CAST(linked_user_id AS BLOB)) \
             OR length(linked_username) <> length(CAST(linked_username AS BLOB))) \
         ORDER BY id LIMIT 1000";
    let stamp = now();
    let actor = Actor {
        actor: "upgrade".into(),
        subject: None,
        request_id: None,
    };
    let mut after = 0;
    loop {
        let rows: Vec<(i64, LinkRecord)> = conn
            .prepare(NOT_ASCII)?
            .query_map([after], |r| {
                Ok((
                    r.get(0)?,
                    LinkRecord {
                        user_id: r.get(1)?,
                        provider_id: r.get(2)?,
                        linked_user_id: r.get(3)?,
                        linked_username: r.get(4)?,
                        created_at: r.get(5)?,
                        updated_at: r.get(6)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()
            .context("cannot read the links to put in NFC")?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(());
        };
        after = last;
        for (id, old) in rows {
            let Some(new) = keys::in_nfc(&old) else {
                continue;
            };
            let same_user: Option<String> = conn
                .query_row(
                    "SELECT user_id FROM linked_identities WHERE user_id = ?1 AND id <> ?2",
                    params![new.user_id, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = same_user {
                anyhow::bail!(keys::nfc_collision("user_id", &old.user_id, &other));
            }
            let same_remote: Option<String> = conn
                .query_row(
                    "SELECT linked_user_id FROM linked_identities \
                     WHERE provider_id = ?1 AND linked_user_key = ?2 AND id <> ?3",
                    params![new.provider_id, new.linked_user_id, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = same_remote {
                let field = format!("linked_user_id at {:?}", new.provider_id);
                anyhow::bail!(keys::nfc_collision(&field, &old.linked_user_id, &other));
            }
            conn.execute(
                "UPDATE linked_identities SET user_id = ?2, provider_id = ?3, linked_user_id = ?4, \
                 linked_user_key = ?4, linked_username = ?5 WHERE id = ?1",
                params![
                    id,
                    new.user_id,
                    new.provider_id,
                    new.linked_user_id,
                    new.linked_username
                ],
            )
            .context("cannot put a link in NFC")?;
            if (&new.user_id, &new.provider_id, &new.linked_user_id)
                == (&old.user_id, &old.provider_id, &old.linked_user_id)
            {
                record_event(conn, EventType::Updated, &new, &actor, &stamp)?;
            } else {
                record_event(conn, EventType::Unlinked, &old, &actor, &stamp)?;
                record_event(conn, EventType::Linked, &new, &actor, &stamp)?;
            }
        }
    }
}

/// Brings the comparison keys to `rules`: the keys of each provider whose
/// rule differs from the one recorded are recomputed (`keys::rekey`, which
/// refuses a change that would make two links one), and the rules are
/// recorded. Nothing to do, and no write, when they are unchanged.
fn apply_rules(conn: &Connection, rules: &IdRules) -> anyhow::Result<()> {
    let recorded: Vec<String> = conn
        .prepare("SELECT provider_id FROM case_insensitive_providers")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .context("cannot read which providers compare ids ignoring case")?;
    let changed = keys::changed_providers(&recorded, rules);
    if changed.is_empty() {
        return Ok(());
    }
    for provider in &changed {
        let links: Vec<keys::Keyed> = conn
            .prepare(
                "SELECT id, user_id, linked_user_id, linked_user_key FROM linked_identities \
                 WHERE provider_id = ?1",
            )?
            .query_map([provider], |r| {
                Ok(keys::Keyed {
                    id: r.get(0)?,
                    user_id: r.get(1)?,
                    linked_user_id: r.get(2)?,
                    linked_user_key: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()
            .context("cannot read a provider's links")?;
        let changes = keys::rekey(provider, &links, rules).map_err(anyhow::Error::msg)?;
        let mut update =
            conn.prepare("UPDATE linked_identities SET linked_user_key = ?2 WHERE id = ?1")?;
        for (id, key) in &changes {
            update
                .execute(params![id, key])
                .context("cannot store a comparison key")?;
        }
        tracing::info!(
            provider = %provider,
            case_insensitive_ids = rules.ignores_case(provider),
            links = changes.len(),
            "recomputed the comparison keys of a provider whose case_insensitive_ids changed"
        );
    }
    conn.execute("DELETE FROM case_insensitive_providers", [])?;
    for provider in rules.case_insensitive_providers() {
        conn.execute(
            "INSERT INTO case_insensitive_providers (provider_id) VALUES (?1)",
            [provider],
        )?;
    }
    Ok(())
}

fn search_in(conn: &Connection, query: &SearchQuery) -> rusqlite::Result<SearchPage> {
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

fn newest_event_in(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM events")?
        .query_row([], |r| r.get(0))
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
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
fn record_event(
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

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<LinkRecord> {
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
fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Turns SQLite's errors into the store's: a full or read-only disk and a
/// failing or vanished file are the database being unavailable, not a bug.
trait OrStore<T> {
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

/// The writer thread's state: the one write connection and what it watches.
struct Writer {
    conn: Connection,
    /// The instant every change is stamped with (`linkid dev --clock`).
    clock: Option<SystemTime>,
    path: PathBuf,
    identity: FileIdentity,
    health: Arc<Health>,
    newest_event: Arc<watch::Sender<i64>>,
}

impl Writer {
    fn run(mut self, messages: mpsc::Receiver<Message>, max_batch: usize) {
        let mut closing = None;
        while closing.is_none() {
            let mut batch = Vec::new();
            match messages.recv_timeout(FILE_CHECK) {
                Ok(Message::Write(job)) => batch.push(job),
                Ok(Message::Probe(reply)) => {
                    let _ = reply.send(self.probe());
                }
                Ok(Message::Close(done)) => closing = Some(done),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.check_file();
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while closing.is_none() && !batch.is_empty() && batch.len() < max_batch {
                match messages.try_recv() {
                    Ok(Message::Write(job)) => batch.push(job),
                    Ok(Message::Probe(reply)) => {
                        let _ = reply.send(self.probe());
                    }
                    Ok(Message::Close(done)) => closing = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_batch(batch);
            }
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = ?e, "cannot checkpoint the database");
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Whether the path still names the file this store opened; records
    /// the answer for readers.
    fn check_file(&self) -> Result<(), StoreError> {
        let same = FileIdentity::of(&self.path) == Some(self.identity);
        let was_gone = self.health.file_gone.swap(!same, Ordering::Relaxed);
        match (same, was_gone) {
            (false, false) => tracing::error!(path = %self.path.display(), "{FILE_GONE}"),
            (true, true) => {
                tracing::info!(path = %self.path.display(), "the database file is back")
            }
            _ => {}
        }
        if same {
            Ok(())
        } else {
            Err(StoreError::Unavailable(FILE_GONE.into()))
        }
    }

    fn write_batch(&mut self, batch: Vec<WriteJob>) {
        metrics::histogram!("linkid_write_batch_size").record(batch.len() as f64);
        // Checked after the commit too: a write into a file that is no
        // longer at the path would be gone at the next start.
        let outcome = self
            .check_file()
            .and_then(|()| apply_batch(&mut self.conn, &batch, self.clock))
            .and_then(|results| self.check_file().map(|()| results));
        match outcome {
            Ok(results) => {
                self.health.set_writes_failing(None);
                // Committed: long polls may see the new events now.
                if let Ok(newest) = newest_event_in(&self.conn) {
                    self.newest_event.send_if_modified(|seen| {
                        let newer = newest > *seen;
                        *seen = newest.max(*seen);
                        newer
                    });
                }
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(error) => {
                match &error {
                    StoreError::Full(why) | StoreError::Unavailable(why) => {
                        tracing::warn!(writes = batch.len(), "a write transaction failed: {why}");
                        self.health.set_writes_failing(Some(error.clone()));
                    }
                    _ => {
                        tracing::error!(error = ?error, writes = batch.len(), "a write transaction failed")
                    }
                }
                for job in batch {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Whether a write can succeed now; after a failed write, tries a real
    /// (empty) one, so readiness recovers when the disk does.
    fn probe(&mut self) -> Result<(), String> {
        self.check_file()
            .map_err(|_| format!("database.path {}: {FILE_GONE}", self.path.display()))?;
        if let Some(failure) = self.health.writes_failing() {
            let written = self
                .conn
                .execute_batch(&format!(
                    "BEGIN IMMEDIATE; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .or_store("the write probe failed");
            if written.is_err() {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(failure.to_string());
            }
            self.health.set_writes_failing(None);
        }
        Ok(())
    }
}

/// Runs a batch in one transaction; each job's outcome is its own. The
/// outer error fails the whole batch (nothing was committed): the
/// transaction itself failed, or one write met a full, read-only or
/// vanished database. Jobs run without savepoints first: a refusal
/// (`UserAlreadyLinked`, `IdentityAlreadyLinked`, `NotFound`) is decided
/// before a job writes anything, so only another failure can leave a job
/// half done — then the whole transaction is rolled back and the batch runs
/// again with a savepoint per job, which undoes just the failed one. (A
/// savepoint per job costs a copy of every page the job touches.)
fn apply_batch(
    conn: &mut Connection,
    batch: &[WriteJob],
    clock: Option<SystemTime>,
) -> Result<Vec<Result<WriteResult, StoreError>>, StoreError> {
    match apply_batch_with(conn, batch, false, clock)? {
        Some(results) => Ok(results),
        // With savepoints every job's failure is its own: never `None`.
        None => apply_batch_with(conn, batch, true, clock)?
            .ok_or_else(|| anyhow::anyhow!("a batch with savepoints was given up").into()),
    }
}

/// Whether a job's failure is known to leave nothing written.
fn writes_nothing(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::UserAlreadyLinked { .. }
            | StoreError::IdentityAlreadyLinked { .. }
            | StoreError::NotFound { .. }
    )
}

/// `apply_batch` with or without a savepoint per job; `None` when, without
/// them, a job failed in a way that may have left it half done (nothing is
/// committed then).
fn apply_batch_with(
    conn: &mut Connection,
    batch: &[WriteJob],
    savepoints: bool,
    clock: Option<SystemTime>,
) -> Result<Option<Vec<Result<WriteResult, StoreError>>>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_store("cannot begin a write transaction")?;
    let stamp = super::transfer::stamp(clock);
    let mut results = Vec::with_capacity(batch.len());
    // Savepoints through prepared statements: parsed once, not per write.
    let step = |sql: &str, what: &'static str| -> Result<(), StoreError> {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .or_store(what)
    };
    for job in batch {
        if savepoints {
            step("SAVEPOINT write", "cannot open a savepoint")?;
        }
        let result = match &job.op {
            WriteOp::Link {
                user,
                link,
                key,
                actor,
            } => link_in(&tx, user, link, key, actor, &stamp).map(WriteResult::Link),
            WriteOp::Unlink {
                user,
                provider,
                actor,
            } => unlink_in(&tx, user, provider, actor, &stamp).map(WriteResult::Unlink),
            WriteOp::Revoke { ids } => revoke_in(&tx, ids, &stamp).map(WriteResult::Revoke),
            WriteOp::PruneEvents { cutoff } => {
                prune_events_in(&tx, cutoff).map(WriteResult::PruneEvents)
            }
        };
        match &result {
            Err(error @ (StoreError::Full(_) | StoreError::Unavailable(_))) => {
                return Err(error.clone())
            }
            Ok(_) if savepoints => step("RELEASE write", "cannot release a savepoint")?,
            Err(_) if savepoints => {
                step("ROLLBACK TO write", "cannot roll back a savepoint")?;
                step("RELEASE write", "cannot release a savepoint")?;
            }
            Err(error) if !writes_nothing(error) => return Ok(None),
            _ => {}
        }
        results.push(result);
    }
    tx.commit().or_store("cannot commit a write transaction")?;
    Ok(Some(results))
}

fn link_in(
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
fn owner_of(conn: &Connection, provider: &str, key: &str) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(
        "SELECT user_id FROM linked_identities WHERE provider_id = ?1 AND linked_user_key = ?2",
    )
    .and_then(|mut s| s.query_row([provider, key], |r| r.get(0)).optional())
    .or_store("cannot read the remote identity's owner")
}

/// The user's link and its remote id's comparison key, if any.
fn link_of_user(
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

fn unlink_in(
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
fn prune_events_in(conn: &Connection, cutoff: &str) -> Result<u64, StoreError> {
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

fn revoke_in(conn: &Connection, ids: &[String], stamp: &str) -> Result<usize, StoreError> {
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
    use super::*;

    /// Each table's columns (name, type, not null, key), whatever the SQL
    /// text's layout and comments.
    fn shape_of(conn: &Connection) -> Vec<String> {
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tables
            .into_iter()
            .map(|name| {
                let mut columns: Vec<String> = conn
                    .prepare(&format!(
                        "SELECT name, type, \"notnull\", pk FROM pragma_table_info('{name}')"
                    ))
                    .unwrap()
                    .query_map([], |r| {
                        Ok(format!(
                            "{}:{}:{}:{}",
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?
                        ))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                columns.sort();
                format!("{name}({})", columns.join(","))
            })
            .collect()
    }

    #[test]
    fn the_migrations_make_exactly_schema_sql() {
        let mut migrated = Connection::open_in_memory().unwrap();
        migrate(&mut migrated, Path::new(":memory:"), &IdRules::default()).unwrap();
        let fresh = Connection::open_in_memory().unwrap();
        // schema.sql is for people: a test holds the migrations to it.
        fresh
            .execute_batch(include_str!("../../schema.sql"))
            .unwrap();

        assert_eq!(shape_of(&migrated), shape_of(&fresh));
        let indexes = |conn: &Connection| -> Vec<String> {
            conn.prepare("SELECT tbl_name || ':' || count(*) FROM sqlite_master WHERE type = 'index' GROUP BY tbl_name ORDER BY 1")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(indexes(&migrated), indexes(&fresh));
        let version: i64 = migrated
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

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

    #[test]
    fn a_database_newer_than_the_binary_is_refused_naming_both_versions() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
            .unwrap();

        let error = migrate(&mut conn, Path::new("x.db"), &IdRules::default())
            .unwrap_err()
            .to_string();

        assert!(
            error.contains(&format!("version {}", SCHEMA_VERSION + 5)),
            "{error}"
        );
        assert!(
            error.contains(&format!("version {SCHEMA_VERSION}")),
            "{error}"
        );
    }
}
