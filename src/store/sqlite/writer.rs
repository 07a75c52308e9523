//! The SQLite writer: one thread owns the one write connection and runs
//! every write that is waiting in one transaction (group commit), answering
//! each request only after that transaction's commit is durable (WAL with
//! `synchronous = FULL` syncs the log on every commit). Outcomes stay exact
//! per request: refusals are decided before a job writes, and a job that
//! fails half done makes the batch run again with a savepoint per job (see
//! `apply_batch`).
//!
//! A job is any write: a closure run on the batch's transaction, with the
//! sending end of a reply channel typed by its answer (`Writer::submit`).
//! The writer knows no operation by name; each answers its own type.
//!
//! The writer also watches the file: a database file deleted or replaced
//! under the server, a full disk or a read-only one makes writes fail as
//! `Unavailable` or `Full` (never a success that a restart would lose), and
//! service resumes by itself when the cause is gone. What it learns is kept
//! in `Health`, which reads and readiness consult.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use super::queries::{newest_event_in, OrStore};
use super::schema::SCHEMA_VERSION;
use crate::store::{Answer, Reply, StoreError};

/// What the writer has learned about the file and its disk; reads and
/// readiness consult it.
#[derive(Default)]
pub(super) struct Health {
    /// The file at `database.path` is no longer the one this store opened.
    file_gone: AtomicBool,
    /// Why writes fail for a cause outside any request (a full or read-only
    /// disk), until one succeeds again.
    writes_failing: Mutex<Option<StoreError>>,
}

impl Health {
    /// `Unavailable` while the file at the path is not the one opened.
    pub(super) fn file_there(&self) -> Result<(), StoreError> {
        if self.file_gone.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(FILE_GONE.into()));
        }
        Ok(())
    }

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

/// How often an idle writer looks at the file.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// What a job answers when the writer stopped before running it.
fn writer_stopped<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("the writer has stopped".into()))
}

/// A write waiting for the writer, of whatever kind.
trait Queued: Send {
    /// Runs the write on the batch's transaction (again, when the batch is
    /// retried with savepoints) and keeps its outcome; answers its error,
    /// if it failed.
    fn apply(&mut self, conn: &Connection, stamp: &str) -> Result<(), &StoreError>;

    /// Sends the kept outcome once the batch is committed (`Ok`), or the
    /// batch's error.
    fn answer(self: Box<Self>, batch: Result<(), StoreError>);
}

/// One write and where its typed answer goes.
struct Job<W, T> {
    write: W,
    reply: oneshot::Sender<Result<T, StoreError>>,
    /// The outcome of the last `apply`, sent by `answer`.
    outcome: Option<Result<T, StoreError>>,
}

impl<W, T> Queued for Job<W, T>
where
    W: Fn(&Connection, &str) -> Result<T, StoreError> + Send,
    T: Send,
{
    fn apply(&mut self, conn: &Connection, stamp: &str) -> Result<(), &StoreError> {
        self.outcome
            .insert((self.write)(conn, stamp))
            .as_ref()
            .map(drop)
    }

    fn answer(self: Box<Self>, batch: Result<(), StoreError>) {
        let Job { reply, outcome, .. } = *self;
        let answer = batch.and_then(|()| {
            outcome.unwrap_or_else(|| {
                Err(anyhow::anyhow!(
                    "the writer committed a batch without running one of its writes"
                )
                .into())
            })
        });
        let _ = reply.send(answer);
    }
}

enum Message {
    Write(Box<dyn Queued>),
    /// Whether writes can succeed now: answered after any batch in
    /// progress, with a real write when the last one failed.
    Probe(oneshot::Sender<Result<(), String>>),
    /// Finish what is queued, checkpoint the WAL into the database, stop.
    Close(oneshot::Sender<()>),
}

/// The store's end of the writer: where writes are sent.
pub(super) struct WriterHandle {
    messages: mpsc::Sender<Message>,
}

impl WriterHandle {
    /// Starts the writer thread on `conn`, the open and migrated write
    /// connection to the file at `path`.
    pub(super) fn start(
        conn: Connection,
        path: &Path,
        clock: Option<SystemTime>,
        max_batch: usize,
        health: Arc<Health>,
        newest_event: Arc<watch::Sender<i64>>,
    ) -> anyhow::Result<WriterHandle> {
        let identity = FileIdentity::of(path)
            .with_context(|| format!("database.path {} vanished at start", path.display()))?;
        let (messages, receiver) = mpsc::channel();
        let writer = Writer {
            conn,
            clock,
            path: path.to_path_buf(),
            identity,
            health,
            newest_event,
        };
        std::thread::Builder::new()
            .name("linkid-writer".into())
            .spawn(move || writer.run(receiver, max_batch))
            .context("cannot start the writer thread")?;
        Ok(WriterHandle { messages })
    }

    /// Queues `write`, which the writer runs on a batch's transaction (more
    /// than once if the batch is retried, so it must not keep state), and
    /// answers its outcome once that transaction is durably committed.
    pub(super) fn submit<W, T>(&self, write: W) -> Reply<'static, T>
    where
        W: Fn(&Connection, &str) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            write,
            reply,
            outcome: None,
        };
        match self.messages.send(Message::Write(Box::new(job))) {
            Ok(()) => Answer::sent(answer, writer_stopped),
            Err(_) => Answer::ready(writer_stopped()),
        }
    }

    /// Whether writes can succeed now (see `Writer::probe`), within 2 s.
    pub(super) async fn probe(&self) -> Result<(), String> {
        let (reply, answered) = oneshot::channel();
        self.messages
            .send(Message::Probe(reply))
            .map_err(|_| "the writer has stopped".to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), answered).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err("the writer has stopped".into()),
            Err(_) => Err("the writer is stuck: no answer in 2 s".into()),
        }
    }

    /// Writes what is queued, checkpoints the WAL and stops the writer.
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.messages.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
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

    fn write_batch(&mut self, mut batch: Vec<Box<dyn Queued>>) {
        metrics::histogram!("linkid_write_batch_size").record(batch.len() as f64);
        // Checked after the commit too: a write into a file that is no
        // longer at the path would be gone at the next start.
        let outcome = self
            .check_file()
            .and_then(|()| apply_batch(&mut self.conn, &mut batch, self.clock))
            .and_then(|()| self.check_file());
        match outcome {
            Ok(()) => {
                self.health.set_writes_failing(None);
                // Committed: long polls may see the new events now.
                if let Ok(newest) = newest_event_in(&self.conn) {
                    self.newest_event.send_if_modified(|seen| {
                        let newer = newest > *seen;
                        *seen = newest.max(*seen);
                        newer
                    });
                }
                for job in batch {
                    job.answer(Ok(()));
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
                    job.answer(Err(error.clone()));
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
    batch: &mut [Box<dyn Queued>],
    clock: Option<SystemTime>,
) -> Result<(), StoreError> {
    if apply_batch_with(conn, batch, false, clock)? {
        return Ok(());
    }
    // With savepoints every job's failure is its own: never `false`.
    if apply_batch_with(conn, batch, true, clock)? {
        return Ok(());
    }
    Err(anyhow::anyhow!("a batch with savepoints was given up").into())
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

/// `apply_batch` with or without a savepoint per job, keeping each job's
/// outcome in the job; `false` when, without them, a job failed in a way
/// that may have left it half done (nothing is committed then).
fn apply_batch_with(
    conn: &mut Connection,
    batch: &mut [Box<dyn Queued>],
    savepoints: bool,
    clock: Option<SystemTime>,
) -> Result<bool, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_store("cannot begin a write transaction")?;
    let stamp = crate::store::transfer::stamp(clock);
    // Savepoints through prepared statements: parsed once, not per write.
    let step = |sql: &str, what: &'static str| -> Result<(), StoreError> {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .or_store(what)
    };
    for job in batch.iter_mut() {
        if savepoints {
            step("SAVEPOINT write", "cannot open a savepoint")?;
        }
        match job.apply(&tx, &stamp) {
            Err(error @ (StoreError::Full(_) | StoreError::Unavailable(_))) => {
                return Err(error.clone())
            }
            Ok(()) if savepoints => step("RELEASE write", "cannot release a savepoint")?,
            Err(_) if savepoints => {
                step("ROLLBACK TO write", "cannot roll back a savepoint")?;
                step("RELEASE write", "cannot release a savepoint")?;
            }
            Err(error) if !writes_nothing(error) => return Ok(false),
            _ => {}
        }
    }
    tx.commit().or_store("cannot commit a write transaction")?;
    Ok(true)
}
