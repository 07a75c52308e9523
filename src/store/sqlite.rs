//! The SQLite backend, the embedded default: one function per operation.
//!
//! Reads run on a pooled connection in `spawn_blocking`. Writes go to one
//! writer thread, which runs every write that is waiting in one transaction
//! (each in its own savepoint, so outcomes stay exact per request) and
//! answers each request only after that transaction's commit is durable:
//! WAL with `synchronous = FULL` syncs the log on every commit.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::SystemTime;

use anyhow::Context;
use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::oneshot;

use super::{LinkOutcome, StoreError};
use crate::config::DatabaseConfig;
use crate::domain::{LinkRecord, NewLink, ProviderId, UserId};

pub(crate) mod admin;

/// The schema, applied at every start.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// The SQLite store: a pool of readers and one writer thread.
#[derive(Clone)]
pub struct SqliteStore {
    readers: Pool<SqliteConnectionManager>,
    writer: mpsc::Sender<Message>,
    path: PathBuf,
}

enum WriteOp {
    Link { user: UserId, link: NewLink },
    Unlink { user: UserId, provider: ProviderId },
    Revoke { ids: Vec<String> },
}

enum WriteResult {
    Link(LinkOutcome),
    Unlink(LinkRecord),
    Revoke(usize),
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

enum Message {
    Write(WriteJob),
    /// Answered at once (after any batch in progress): the writer is alive.
    Ping(oneshot::Sender<()>),
    /// Finish what is queued, checkpoint the WAL into the database, stop.
    Close(oneshot::Sender<()>),
}

const PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;";

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies the schema and
    /// starts the writer thread.
    pub fn open(config: &DatabaseConfig) -> anyhow::Result<SqliteStore> {
        let (path, pool_size, max_batch) =
            (config.path.as_path(), config.pool_size, config.max_batch);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the database directory {}", dir.display())
            })?;
        }
        if !path.exists() {
            // Links are personal data: only the service's user reads them
            // (SQLite gives the -wal and -shm files the same mode).
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create database.path {}", path.display()))?;
        }
        let mut writer = Connection::open(path)
            .with_context(|| format!("cannot open database.path {}", path.display()))?;
        writer
            .execute_batch(PRAGMAS)
            .context("cannot configure the database")?;
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .context("cannot switch the database to WAL")?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "the database refused WAL mode"
        );
        writer
            .execute_batch(SCHEMA)
            .context("cannot apply schema.sql")?;
        writer.set_prepared_statement_cache_capacity(32);

        let manager = SqliteConnectionManager::file(path)
            .with_init(|c| c.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;"));
        let readers = Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(1))
            // r2d2's default check prepares a statement on every checkout.
            .test_on_check_out(false)
            .build(manager)
            .context("cannot open the read connections")?;

        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("linkid-writer".into())
            .spawn(move || run_writer(&mut writer, receiver, max_batch))
            .context("cannot start the writer thread")?;
        Ok(SqliteStore {
            readers,
            writer: sender,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A user's linked identities, oldest first.
    pub async fn list(&self, user: &UserId) -> Result<Vec<LinkRecord>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
                 FROM linked_identities WHERE user_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([user.as_str()], record_from_row)?;
            rows.collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    /// Links a remote identity to a user (see `LinkOutcome`).
    pub async fn link(&self, user: UserId, link: NewLink) -> Result<LinkOutcome, StoreError> {
        match self.write(WriteOp::Link { user, link }).await? {
            WriteResult::Link(outcome) => Ok(outcome),
            _ => unreachable!("the writer answers a link with a link"),
        }
    }

    /// Deletes a user's link to a provider, returning what was deleted.
    pub async fn unlink(
        &self,
        user: UserId,
        provider: ProviderId,
    ) -> Result<LinkRecord, StoreError> {
        match self.write(WriteOp::Unlink { user, provider }).await? {
            WriteResult::Unlink(identity) => Ok(identity),
            _ => unreachable!("the writer answers an unlink with an unlink"),
        }
    }

    /// Records revocation ids; returns how many were new.
    pub async fn revoke(&self, ids: Vec<String>) -> Result<usize, StoreError> {
        match self.write(WriteOp::Revoke { ids }).await? {
            WriteResult::Revoke(n) => Ok(n),
            _ => unreachable!("the writer answers a revoke with a revoke"),
        }
    }

    /// Revocation ids recorded after `after` (a sequence number), and the newest sequence number.
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

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<T> {
            let conn = pool.get().context("no read connection")?;
            f(&conn).context("read query failed")
        })
        .await
        .context("the read task died")?;
        Ok(result?)
    }

    /// Whether the database answers: the writer thread responds, and the
    /// file opens and reads afresh. The error says why not.
    pub async fn ready(&self) -> Result<(), String> {
        let (pong, answered) = oneshot::channel();
        self.writer
            .send(Message::Ping(pong))
            .map_err(|_| "the writer has stopped".to_string())?;
        match tokio::time::timeout(std::time::Duration::from_secs(2), answered).await {
            Ok(Ok(())) => {}
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
            conn.busy_timeout(std::time::Duration::from_secs(2))
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
    }

    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Message::Write(WriteJob { op, reply }))
            .map_err(|_| anyhow::anyhow!("the writer thread has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the writer thread dropped a request"))?
    }
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

fn run_writer(conn: &mut Connection, messages: mpsc::Receiver<Message>, max_batch: usize) {
    let mut closing = None;
    while closing.is_none() {
        let mut batch = Vec::new();
        match messages.recv() {
            Ok(Message::Write(job)) => batch.push(job),
            Ok(Message::Ping(pong)) => {
                let _ = pong.send(());
            }
            Ok(Message::Close(done)) => closing = Some(done),
            Err(_) => break,
        }
        while closing.is_none() && !batch.is_empty() && batch.len() < max_batch {
            match messages.try_recv() {
                Ok(Message::Write(job)) => batch.push(job),
                Ok(Message::Ping(pong)) => {
                    let _ = pong.send(());
                }
                Ok(Message::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("linkid_write_batch_size").record(batch.len() as f64);
        match apply_batch(conn, &batch) {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(error) => {
                tracing::error!(error = ?error, writes = batch.len(), "a write transaction failed");
                let shared = StoreError::from(error);
                for job in batch {
                    let _ = job.reply.send(Err(shared.clone()));
                }
            }
        }
    }
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(error = ?e, "cannot checkpoint the database");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs a batch in one transaction, each write in a savepoint. The outer
/// error is a failure of the transaction itself (nothing was committed).
fn apply_batch(
    conn: &mut Connection,
    batch: &[WriteJob],
) -> anyhow::Result<Vec<Result<WriteResult, StoreError>>> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("cannot begin a write transaction")?;
    let stamp = now();
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let mut sp = tx.savepoint().context("cannot open a savepoint")?;
        let result = match &job.op {
            WriteOp::Link { user, link } => link_in(&sp, user, link, &stamp).map(WriteResult::Link),
            WriteOp::Unlink { user, provider } => {
                unlink_in(&sp, user, provider).map(WriteResult::Unlink)
            }
            WriteOp::Revoke { ids } => revoke_in(&sp, ids, &stamp).map(WriteResult::Revoke),
        };
        if result.is_ok() {
            sp.commit().context("cannot release a savepoint")?;
        } else {
            sp.rollback().context("cannot roll back a savepoint")?;
        }
        results.push(result);
    }
    tx.commit().context("cannot commit a write transaction")?;
    Ok(results)
}

fn link_in(
    conn: &Connection,
    user: &UserId,
    link: &NewLink,
    stamp: &str,
) -> Result<LinkOutcome, StoreError> {
    // The writer holds the database's write lock for the whole batch, so
    // what these reads find stays true until the insert: each rule is told
    // apart by its own query, and the UNIQUE constraints stay the backstop.
    if let Some(mut current) = link_of_user(conn, user)? {
        if current.provider_id != link.provider_id.as_str()
            || current.linked_user_id != link.linked_user_id.as_str()
        {
            return Err(StoreError::UserAlreadyLinked {
                current: Box::new(current),
            });
        }
        if current.linked_username != link.linked_username.as_str() {
            conn.prepare_cached(
                "UPDATE linked_identities SET linked_username = ?2, updated_at = ?3 WHERE user_id = ?1",
            )
            .and_then(|mut s| s.execute(params![user.as_str(), link.linked_username.as_str(), stamp]))
            .context("cannot update the linked username")?;
            current.linked_username = link.linked_username.as_str().to_owned();
            current.updated_at = stamp.to_owned();
        }
        return Ok(LinkOutcome::Existing(current));
    }
    let owner: Option<String> = conn
        .prepare_cached(
            "SELECT user_id FROM linked_identities WHERE provider_id = ?1 AND linked_user_id = ?2",
        )
        .and_then(|mut s| {
            s.query_row(
                [link.provider_id.as_str(), link.linked_user_id.as_str()],
                |r| r.get(0),
            )
            .optional()
        })
        .context("cannot read the remote identity's owner")?;
    if owner.is_some() {
        return Err(StoreError::IdentityAlreadyLinked {
            provider_id: link.provider_id.as_str().to_owned(),
            linked_user_id: link.linked_user_id.as_str().to_owned(),
        });
    }
    conn.prepare_cached(
        "INSERT INTO linked_identities \
         (user_id, provider_id, linked_user_id, linked_username, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            user.as_str(),
            link.provider_id.as_str(),
            link.linked_user_id.as_str(),
            link.linked_username.as_str(),
            stamp
        ])
    })
    .context("cannot insert a link")?;
    Ok(LinkOutcome::Created(LinkRecord {
        user_id: user.as_str().to_owned(),
        provider_id: link.provider_id.as_str().to_owned(),
        linked_user_id: link.linked_user_id.as_str().to_owned(),
        linked_username: link.linked_username.as_str().to_owned(),
        created_at: stamp.to_owned(),
        updated_at: stamp.to_owned(),
    }))
}

fn link_of_user(conn: &Connection, user: &UserId) -> Result<Option<LinkRecord>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
             FROM linked_identities WHERE user_id = ?1",
        )
        .and_then(|mut s| s.query_row([user.as_str()], record_from_row).optional())
        .context("cannot read the user's link")?)
}

fn unlink_in(
    conn: &Connection,
    user: &UserId,
    provider: &ProviderId,
) -> Result<LinkRecord, StoreError> {
    conn.prepare_cached(
        "DELETE FROM linked_identities WHERE user_id = ?1 AND provider_id = ?2 \
         RETURNING user_id, provider_id, linked_user_id, linked_username, created_at, updated_at",
    )
    .and_then(|mut s| {
        s.query_row([user.as_str(), provider.as_str()], record_from_row)
            .optional()
    })
    .context("cannot delete a link")?
    .ok_or_else(|| StoreError::NotFound {
        user_id: user.as_str().to_owned(),
        provider_id: provider.as_str().to_owned(),
    })
}

fn revoke_in(conn: &Connection, ids: &[String], stamp: &str) -> Result<usize, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO revoked_tokens (revocation_id, revoked_at) VALUES (?1, ?2)",
        )
        .context("cannot prepare a revocation")?;
    let mut added = 0;
    for id in ids {
        added += stmt
            .execute(params![id, stamp])
            .context("cannot record a revocation")?;
    }
    Ok(added)
}
