//! Group commit on PostgreSQL: the links and deletes that reach this
//! instance while others are being written wait in one queue and are
//! written together, up to `database.max_batch` in one transaction
//! (`batch.rs`), so the feed's lock and the commit's WAL flush are paid
//! once per batch rather than once per write. With `max_batch = 1` there
//! is no writer: each write is its own transaction (`link_in`).
//!
//! One batch at a time per instance: while it commits, the queue fills for
//! the next. More in flight would not commit sooner — every batch of every
//! instance waits for the feed's lock, held until its commit is flushed —
//! and would cut the queue into smaller batches (measured: two instances
//! with two batches in flight each wrote less than one instance). Every
//! write is answered only after its batch's commit.
//!
//! A batch that fails is not the end of its writes: one PostgreSQL chose to
//! break a deadlock, or a serialization failure, runs again whole; any
//! other error that is not an outage (a row PostgreSQL refused, a bug)
//! runs each write of the batch alone, so one bad write fails alone. An
//! outage (unreachable, shutting down, a timeout) answers every write of
//! the batch with it, as it would answer each alone.

use tokio::sync::{mpsc, oneshot};

use super::batch::{self, LinkWrite, UnlinkWrite};
use super::fault::{is_deadlock, Fault};
use super::PostgresStore;
use crate::domain::LinkRecord;
use crate::store::{Answer, LinkOutcome, Reply, StoreError};

/// How many times a batch that lost a deadlock runs again before its
/// writes are run one by one.
const BATCH_ATTEMPTS: usize = 4;

type Sender<T> = oneshot::Sender<Result<T, StoreError>>;

enum Message {
    Link(LinkWrite, Sender<LinkOutcome>),
    Unlink(UnlinkWrite, Sender<LinkRecord>),
    /// Answer once every write before it is answered; stop.
    Close(oneshot::Sender<()>),
}

/// The queue in front of this instance's batches.
#[derive(Clone)]
pub(super) struct Writer {
    queue: mpsc::UnboundedSender<Message>,
}

/// What a write answers when the writer stopped before running it.
fn writer_stopped<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("the writer has stopped".into()))
}

impl Writer {
    /// Starts the writer task on `store` (a handle without a writer).
    pub(super) fn start(store: PostgresStore, max_batch: usize) -> Writer {
        let (queue, inbox) = mpsc::unbounded_channel();
        tokio::spawn(run(store, inbox, max_batch));
        Writer { queue }
    }

    pub(super) fn link(&self, write: LinkWrite) -> Reply<'static, LinkOutcome> {
        let (reply, answer) = oneshot::channel();
        // A writer that stopped drops the reply: `writer_stopped`.
        let _ = self.queue.send(Message::Link(write, reply));
        Answer::sent(answer, writer_stopped)
    }

    pub(super) fn unlink(&self, write: UnlinkWrite) -> Reply<'static, LinkRecord> {
        let (reply, answer) = oneshot::channel();
        let _ = self.queue.send(Message::Unlink(write, reply));
        Answer::sent(answer, writer_stopped)
    }

    /// Waits until every write asked for so far is answered; later ones
    /// are `Unavailable`.
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

/// Writes waiting together, each with where its answer goes.
#[derive(Default)]
struct Batch {
    links: Vec<(LinkWrite, Sender<LinkOutcome>)>,
    unlinks: Vec<(UnlinkWrite, Sender<LinkRecord>)>,
}

impl Batch {
    fn len(&self) -> usize {
        self.links.len() + self.unlinks.len()
    }

    /// Adds a write; hands back a `Close`.
    fn add(&mut self, message: Message) -> Option<oneshot::Sender<()>> {
        match message {
            Message::Link(write, reply) => self.links.push((write, reply)),
            Message::Unlink(write, reply) => self.unlinks.push((write, reply)),
            Message::Close(done) => return Some(done),
        }
        None
    }
}

/// Takes what waits, up to `max_batch`, and writes it; again.
async fn run(store: PostgresStore, mut inbox: mpsc::UnboundedReceiver<Message>, max_batch: usize) {
    while let Some(first) = inbox.recv().await {
        let mut batch = Batch::default();
        let mut close = batch.add(first);
        while close.is_none() && batch.len() < max_batch {
            match inbox.try_recv() {
                Ok(message) => close = batch.add(message),
                Err(_) => break,
            }
        }
        if batch.len() > 0 {
            write(&store, batch).await;
        }
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
    }
}

/// Writes a batch and answers each of its writes.
async fn write(store: &PostgresStore, batch: Batch) {
    let (links, link_replies): (Vec<_>, Vec<_>) = batch.links.into_iter().unzip();
    let (unlinks, unlink_replies): (Vec<_>, Vec<_>) = batch.unlinks.into_iter().unzip();
    let mut attempts = 0;
    let mut deadlocked = false;
    let failed = loop {
        attempts += 1;
        let client = match store.client().await {
            Ok(client) => client,
            Err(error) => break error,
        };
        let outcome = store.within(batch::apply(&client, &links, &unlinks)).await;
        match outcome {
            Ok(Ok(applied)) => {
                drop(client);
                store.committed(applied.newest_event);
                for (reply, outcome) in link_replies.into_iter().zip(applied.links) {
                    let _ = reply.send(outcome);
                }
                for (reply, outcome) in unlink_replies.into_iter().zip(applied.unlinks) {
                    let _ = reply.send(outcome);
                }
                return;
            }
            Ok(Err(fault)) if retried(&fault) => {
                deadlocked = true;
                if attempts < BATCH_ATTEMPTS {
                    continue;
                }
                break store
                    .settle(client, Ok(Err::<(), _>(fault)))
                    .err()
                    .unwrap_or_else(unexplained);
            }
            outcome => {
                deadlocked = false;
                let outcome = outcome.map(|r| r.map(drop));
                break store
                    .settle(client, outcome)
                    .err()
                    .unwrap_or_else(unexplained);
            }
        }
    };
    // An outage answers everyone at once (each alone would wait for it).
    let alone = links.len() + unlinks.len() > 1
        && (deadlocked || matches!(failed, StoreError::Internal(_)));
    if alone {
        tracing::warn!(error = ?failed, "a write batch failed; its writes run one at a time");
        let singles = links
            .into_iter()
            .zip(link_replies)
            .map(|one| Batch {
                links: vec![one],
                unlinks: Vec::new(),
            })
            .chain(unlinks.into_iter().zip(unlink_replies).map(|one| Batch {
                links: Vec::new(),
                unlinks: vec![one],
            }));
        for single in singles {
            Box::pin(write(store, single)).await;
        }
        return;
    }
    for reply in link_replies {
        let _ = reply.send(Err(failed.clone()));
    }
    for reply in unlink_replies {
        let _ = reply.send(Err(failed.clone()));
    }
}

/// `settle` of a failure that came back as a success.
fn unexplained() -> StoreError {
    anyhow::anyhow!("a failed write batch was settled as a success").into()
}

/// A failure after which the same batch may well succeed: PostgreSQL broke
/// a deadlock or a serialization conflict by failing it.
fn retried(fault: &Fault) -> bool {
    is_deadlock(fault)
        || matches!(fault, Fault::Postgres { error, .. }
            if error.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE))
}
