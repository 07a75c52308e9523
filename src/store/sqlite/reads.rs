//! The SQLite read path. Short reads — a user's links, the login-time
//! reverse lookup, an index seek that returns a row or two — run inline, on
//! the async thread that asks, on that thread's own connection: the
//! hand-off to a blocking thread and back costs several times what SQLite
//! takes to answer from its page cache. Reads that may walk many rows (a
//! page of a search, the feed, revocations, a count) run on a pooled
//! connection in `spawn_blocking`, each in a transaction of its own.
//!
//! A short read takes one of two paths, chosen when the store opens:
//!
//! - **The plain path** (`database.row_cache_bytes = 0`): the read's one
//!   statement runs on the thread's connection in autocommit mode, so
//!   SQLite begins a read transaction when the statement starts and ends it
//!   when the statement is done. Its snapshot is taken after the read was
//!   asked for, so it holds every commit answered before; nothing is kept
//!   from one read to the next. This is SQLite used as documented, and the
//!   path to compare the fast one against.
//! - **The fast path** (the default): the thread's connection keeps its
//!   read transaction open from one read to the next for as long as nobody
//!   commits, and the answers to the list and the lookup are kept in an
//!   exact row cache (`row_cache.rs`, `database.row_cache_bytes` at most),
//!   served while nobody commits. "Nobody commits" is read without a lock
//!   from the header of SQLite's WAL index, mapped from the `-shm` file
//!   (`wal_stamp.rs`). This assumes SQLite's WAL-index protocol
//!   (<https://sqlite.org/walformat.html>): every commit, from any process,
//!   rewrites the header before it returns, and while this process has the
//!   database open the `-shm` file is not re-created, so the mapping stays
//!   the one SQLite writes. A read stamps the header before its snapshot is
//!   taken, so an answer kept under a stamp is never older than the newest
//!   commit while the header still shows that stamp.
//!
//! How the fast path falls back: when the WAL index cannot be mapped (no
//! `-shm` file, an unknown WAL-index version) the store takes the plain path
//! for its whole life; when the header is being rewritten at the moment of a
//! read (its two copies differ) that one read takes the plain path. A
//! thread that goes idle ends its held transaction (`end_inline_reads`), so
//! an idle server holds no snapshot that would keep the WAL from being
//! reset.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;

use super::queries::OrStore;
use super::row_cache::{Read, RowCache};
use super::wal_stamp::{WalIndex, WalStamp};
use super::writer::Health;
use crate::domain::LinkRecord;
use crate::store::StoreError;

/// What every read connection runs first.
const READER_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;";

/// Numbers the stores of this process (see `Reads::store`).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

/// The most inline read connections one thread keeps (one per store; more
/// only in a process that opens many stores, such as the tests).
const INLINE_READERS_PER_THREAD: usize = 4;

thread_local! {
    /// This thread's own read connections, one per store: a short read runs
    /// on the async thread that asks for it.
    static INLINE_READERS: RefCell<Vec<InlineReader>> = const { RefCell::new(Vec::new()) };
}

/// One thread's read connection to one store.
struct InlineReader {
    store: u64,
    conn: Connection,
    /// When this connection has a read transaction open (the fast path
    /// only): the WAL-index header from just before it began. While the
    /// header is unchanged nobody has committed since, so the transaction's
    /// snapshot is the newest state and the next read may use it too,
    /// sparing SQLite's per-transaction locking (a system call and a mutex
    /// every other thread's reads contend for).
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

/// What the fast path keeps: the mapped WAL-index header that tells whether
/// anyone committed, and the answers read since.
struct FastPath {
    wal: WalIndex,
    rows: RowCache,
}

/// One store's reads: its pool, and how its short reads are served.
pub(super) struct Reads {
    /// Tells this store's inline read connections from other stores' (tests
    /// run many in one process).
    store: u64,
    path: PathBuf,
    pool: Pool<SqliteConnectionManager>,
    /// The writer's news of the file: no read of a file gone from the path.
    health: Arc<Health>,
    /// `None`: the plain path.
    fast: Option<FastPath>,
}

impl Reads {
    /// The reads of the database at `path`, which the writer has open in
    /// WAL mode: `pool_size` pooled connections, and the fast path when
    /// `row_cache_bytes` is not 0 and the WAL index can be mapped.
    pub(super) fn open(
        path: &Path,
        pool_size: u32,
        row_cache_bytes: u64,
        health: Arc<Health>,
    ) -> anyhow::Result<Reads> {
        let manager =
            SqliteConnectionManager::file(path).with_init(|c| c.execute_batch(READER_PRAGMAS));
        let pool = Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(1))
            // r2d2's default check prepares a statement on every checkout.
            .test_on_check_out(false)
            .build(manager)
            .context("cannot open the read connections")?;
        let fast = match row_cache_bytes {
            0 => None,
            bytes => {
                let wal = WalIndex::open(path);
                if wal.is_none() {
                    tracing::info!(
                        path = %path.display(),
                        "the database's WAL index cannot be mapped: reads take the plain path"
                    );
                }
                wal.map(|wal| FastPath {
                    wal,
                    rows: RowCache::new(bytes),
                })
            }
        };
        Ok(Reads {
            store: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            pool,
            health,
            fast,
        })
    }

    /// Whether short reads take the fast path.
    #[cfg(test)]
    pub(super) fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// A short read whose answer the row cache may keep: on the fast path,
    /// the kept answer while nobody has committed since it was read, else
    /// `inline`'s (kept for next time).
    pub(super) fn cached(
        &self,
        read: Read<'_>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<Vec<LinkRecord>>,
    ) -> Result<Vec<LinkRecord>, StoreError> {
        self.health.file_there()?;
        let Some(fast) = &self.fast else {
            return self.on_thread(None, f);
        };
        let before = fast.wal.stamp();
        if let Some(links) = before.and_then(|now| fast.rows.get(&read, now)) {
            return Ok(links);
        }
        let links = self.on_thread(before, f)?;
        if let Some(before) = before {
            fast.rows.put(&read, before, &links);
        }
        Ok(links)
    }

    /// Runs a short read (one statement) inline, on this thread's own
    /// connection. Reads that may walk many rows use `pooled`.
    pub(super) fn inline<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.health.file_there()?;
        let now = self.fast.as_ref().and_then(|fast| fast.wal.stamp());
        self.on_thread(now, f)
    }

    /// Runs `f` on this thread's connection to this store (opened on first
    /// use). `now` is the WAL-index header the caller took just before, on
    /// the fast path; `None` is the plain path: `f` runs in autocommit mode,
    /// in a read transaction of SQLite's own that ends with the statement.
    fn on_thread<T>(
        &self,
        now: Option<WalStamp>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        INLINE_READERS.with(|readers| {
            let mut readers = readers.borrow_mut();
            let at = match readers.iter().position(|r| r.store == self.store) {
                Some(at) => at,
                None => {
                    let conn = Connection::open(&self.path)
                        .and_then(|c| c.execute_batch(READER_PRAGMAS).map(|()| c))
                        .or_store("cannot open a read connection")?;
                    if readers.len() >= INLINE_READERS_PER_THREAD {
                        readers.remove(0);
                    }
                    readers.push(InlineReader {
                        store: self.store,
                        conn,
                        open_since: None,
                    });
                    readers.len() - 1
                }
            };
            let reader = &mut readers[at];
            let Some(now) = now else {
                // The plain path: nothing held before, nothing held after.
                reader.end();
                return f(&reader.conn).or_store("a read query failed");
            };
            if reader.open_since != Some(now) {
                reader.end();
                // Deferred: the snapshot is taken by the first read, after
                // `now`, so it holds every commit `now` shows.
                reader
                    .conn
                    .prepare_cached("BEGIN")
                    .and_then(|mut begin| begin.execute([]))
                    .or_store("cannot begin a read")?;
                reader.open_since = Some(now);
            }
            let read = f(&reader.conn);
            if read.is_err() {
                reader.end();
            }
            read.or_store("a read query failed")
        })
    }

    /// Runs a read that may walk many rows on a pooled connection, off the
    /// async threads.
    pub(super) async fn pooled<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.health.file_there()?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool
                .get()
                .map_err(|e| StoreError::Unavailable(format!("no read connection: {e}")))?;
            f(&conn).or_store("a read query failed")
        })
        .await
        .context("the read task died")?
    }

    /// Open and idle pooled connections.
    pub(super) fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, state.idle_connections)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::SqliteStore;
    use crate::config::DatabaseConfig;
    use crate::domain::{IdRules, UserId};
    use crate::store::{Backend, SearchQuery};

    /// `database.row_cache_bytes`'s default.
    const DEFAULT_BYTES: u64 = 4 * 1024 * 1024;

    fn open(dir: &tempfile::TempDir, row_cache_bytes: u64) -> SqliteStore {
        let config = DatabaseConfig {
            path: dir.path().join("linkid.db"),
            url: None,
            pool_size: 2,
            max_batch: 256,
            row_cache_bytes,
            statement_timeout_secs: 5,
            clock: None,
        };
        SqliteStore::open(&config, &IdRules::default()).unwrap()
    }

    /// Another connection to the store's file, as another process would
    /// have: it never waits for a lock.
    fn other(dir: &tempfile::TempDir) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(dir.path().join("linkid.db")).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        conn
    }

    fn insert(conn: &rusqlite::Connection, user: &str, username: &str) {
        conn.execute(
            "INSERT INTO linked_identities (user_id, provider_id, linked_user_id, linked_user_key, \
             linked_username, created_at, updated_at) \
             VALUES (?1, 'okta', ?1, ?1, ?2, '2026-01-02T03:04:05Z', '2026-01-02T03:04:05Z')",
            [user, username],
        )
        .unwrap();
    }

    /// Whether a checkpoint that resets the WAL is kept from finishing by a
    /// reader's snapshot.
    fn wal_held(conn: &rusqlite::Connection) -> bool {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 1
    }

    /// Short reads are inline: the runtime runs them on this thread, whose
    /// connection they use.
    fn on_this_thread<T>(work: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    }

    fn usernames(store: &SqliteStore, user: &str) -> Vec<String> {
        let user = UserId::parse(user).unwrap();
        on_this_thread(store.list(&user))
            .unwrap()
            .into_iter()
            .map(|l| l.linked_username)
            .collect()
    }

    fn looked_up(store: &SqliteStore, remote: &str) -> Vec<String> {
        let query = SearchQuery {
            provider_id: Some("okta".into()),
            linked_user_id: Some(remote.into()),
            limit: 10,
            ..Default::default()
        };
        on_this_thread(store.search(query))
            .unwrap()
            .links
            .into_iter()
            .map(|l| l.linked_username)
            .collect()
    }

    #[test]
    fn a_row_cache_of_0_bytes_is_the_plain_path_and_the_default_the_fast_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!open(&dir, 0).reads.is_fast());
        assert!(open(&dir, DEFAULT_BYTES).reads.is_fast());
    }

    #[test]
    fn a_plain_read_holds_no_snapshot_once_it_has_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 0);
        let other = other(&dir);
        insert(&other, "u-1", "one");

        assert_eq!(usernames(&store, "u-1"), ["one"]);
        assert_eq!(looked_up(&store, "u-1"), ["one"]);

        assert!(!wal_held(&other), "a plain read kept its snapshot");
    }

    #[test]
    fn a_fast_read_holds_its_snapshot_until_the_thread_idles() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, DEFAULT_BYTES);
        let other = other(&dir);
        insert(&other, "u-1", "one");

        assert_eq!(usernames(&store, "u-1"), ["one"]);

        assert!(wal_held(&other), "the fast path holds the snapshot it read");
        super::end_inline_reads();
        assert!(!wal_held(&other));
    }

    #[test]
    fn both_paths_read_another_connections_commit_at_once() {
        for bytes in [0, DEFAULT_BYTES] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir, bytes);
            let other = other(&dir);
            insert(&other, "u-1", "one");
            // Read twice: whatever the path keeps, it has kept.
            for _ in 0..2 {
                assert_eq!(usernames(&store, "u-1"), ["one"], "{bytes} bytes");
                assert_eq!(looked_up(&store, "u-1"), ["one"], "{bytes} bytes");
            }

            other
                .execute(
                    "UPDATE linked_identities SET linked_username = 'renamed'",
                    [],
                )
                .unwrap();

            assert_eq!(usernames(&store, "u-1"), ["renamed"], "{bytes} bytes");
            assert_eq!(looked_up(&store, "u-1"), ["renamed"], "{bytes} bytes");
            super::end_inline_reads();
        }
    }
}
