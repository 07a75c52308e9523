//! The storage contract, stated once: what every backend promises for each
//! operation, under concurrency too, and which `StoreError`s it answers
//! with. `sqlite::SqliteStore` and `postgres::PostgresStore` implement it;
//! everything above the store calls it through a `Store` handle.
//!
//! Three promises hold for every operation, on every backend:
//!
//! - **Durable before answered.** A write is answered only once its
//!   transaction's commit is durable (SQLite: the WAL is synced, with
//!   `synchronous = FULL`; PostgreSQL: the server acknowledged the commit).
//!   A write that fails is not half done: its change and its event commit
//!   together or not at all.
//! - **Reads are never stale.** A read sees every write answered before the
//!   read began — by this process or by any other (`linkid import`, an
//!   operator's SQL shell, another instance on the same database).
//! - **Outages are not bugs.** A database that cannot be reached, is
//!   read-only, vanished or timed out is `Unavailable` (retrying later may
//!   succeed, and service resumes by itself when the cause is gone); a full
//!   disk is `Full`. `Internal` is kept for what is worth a log line.
//!
//! Why the methods return `Reply` and not `async fn`: the trait is used as
//! `dyn Backend` (one handle type for both backends, and a new operation is
//! one method here plus its two implementations), and an `async fn` cannot
//! be called through `dyn`. Boxing every call's future (what `async_trait`
//! does) would put an allocation on the hottest path of all, the SQLite
//! list and reverse lookup, which answer inline on the caller's thread in a
//! few microseconds. A `Reply` is a concrete future: such a read hands back
//! its answer already made (no allocation), a SQLite write hands back the
//! receiving end of its typed reply channel, and only what waits anyway —
//! a hand-off to a blocking thread, a PostgreSQL round trip — is boxed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::{LinkOutcome, SearchPage, SearchQuery, StoreError};
use crate::domain::{Actor, Event, LinkRecord, NewLink, ProviderId, UserId, WebhookStanding};

/// What a store operation answers with, as a future (see `Answer`).
pub type Reply<'a, T> = Answer<'a, Result<T, StoreError>>;

/// The storage contract. Every method is safe to call from many tasks at
/// once; the promises in the module comment hold for each.
pub trait Backend: Send + Sync {
    /// Where the data lives, for people: a file path, or a URL without its
    /// password.
    fn describe(&self) -> String;

    /// A user's linked identities, oldest first (at most one today).
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn list<'a>(&'a self, user: &'a UserId) -> Reply<'a, Vec<LinkRecord>>;

    /// Links a remote identity to a user, recording the change's event
    /// (`LINKED`, or `UPDATED` when only the username changed) in the same
    /// transaction.
    ///
    /// The remote identity is its comparison key (`IdRules::key`): at a
    /// provider that ignores case, `00uABC` and `00uabc` are one identity,
    /// and the stored id stays as first given. The user's own link decides
    /// first, then the identity's owner:
    ///
    /// - the user has this very link: `LinkOutcome::Existing`, with the
    ///   username updated if it changed;
    /// - the user has another link (another provider, or another identity
    ///   at this one): `UserAlreadyLinked`, naming it;
    /// - another user holds the identity: `IdentityAlreadyLinked`;
    /// - else `LinkOutcome::Created`.
    ///
    /// Under concurrency, across processes and instances, both uniqueness
    /// rules have one winner: of requests racing to give a user a link, or
    /// an identity a user, exactly one makes it, and every other is
    /// answered from the state that winner committed, in the order above.
    ///
    /// Errors: `UserAlreadyLinked`, `IdentityAlreadyLinked`, `Unavailable`,
    /// `Full`, `Internal`.
    fn link(&self, user: UserId, link: NewLink, actor: Actor) -> Reply<'_, LinkOutcome>;

    /// Deletes a user's link to a provider and answers what was deleted,
    /// recording its `UNLINKED` event in the same transaction. Of racing
    /// deletes of one link, exactly one deletes it; the others are
    /// `NotFound`.
    ///
    /// Errors: `NotFound`, `Unavailable`, `Full`, `Internal`.
    fn unlink(&self, user: UserId, provider: ProviderId, actor: Actor) -> Reply<'_, LinkRecord>;

    /// One page of all links in `user_id` order, compared byte by byte (the
    /// same order on every backend), after `query.after_user`; `more` says
    /// whether another page follows. With `provider_id` and
    /// `linked_user_id` it is the login-time reverse lookup, which finds the
    /// identity in any spelling its provider's rule equates. Every form is
    /// one index walk, never a scan.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn search(&self, query: SearchQuery) -> Reply<'_, SearchPage>;

    /// Up to `limit` events after the `seq` `after`, in `seq` order. Events
    /// become visible in `seq` order (commit order), so a consumer that
    /// asks again after the last `seq` it saw never misses one.
    ///
    /// Errors: `EventsExpired` when retention pruned events right after
    /// `after` (`after` is below the pruning mark), `Unavailable`,
    /// `Internal`.
    fn events(&self, after: i64, limit: u32) -> Reply<'_, Vec<Event>>;

    /// The newest committed event's `seq`, which long polls wait on: moved
    /// forward by this process's own writes once they are committed, and by
    /// `refresh` for what other processes committed.
    fn newest_event(&self) -> watch::Receiver<i64>;

    /// Reads what other processes committed since the last call (the newest
    /// event, for `newest_event`, which only moves forward); the server
    /// calls it a few times a second.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn refresh(&self) -> Reply<'_, ()>;

    /// `refresh`, also taking a newest event older than the one known:
    /// after `store::replace_all` started the feed again at 1.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn reread_newest_event(&self) -> Reply<'_, ()>;

    /// Deletes the events that occurred before `cutoff` (RFC 3339 UTC) and
    /// answers how many; later asking for events at or before the newest
    /// deleted is `EventsExpired`. A `seq` is never handed out twice: SQLite,
    /// whose next `seq` follows the newest event, keeps the newest whatever
    /// its age.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal` (a cutoff that is not RFC
    /// 3339).
    fn prune_events(&self, cutoff: String) -> Reply<'_, u64>;

    /// Records revocation ids (once each: a repeated id changes nothing)
    /// and answers how many were new.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn revoke(&self, ids: Vec<String>) -> Reply<'_, usize>;

    /// The revocation ids recorded after the mark `after`, in the order
    /// recorded, and the new mark. Marks become visible in order (commit
    /// order), so polling with the mark answered never skips an id.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn revoked_since(&self, after: i64) -> Reply<'_, (Vec<String>, i64)>;

    /// How many links are stored.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn count(&self) -> Reply<'_, i64>;

    /// Where `webhook` stands; when it has none yet, an `ACTIVE` standing
    /// that has delivered everything up to `start_after` is stored first
    /// (of callers racing, the first stored is everyone's).
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn webhook_standing(&self, webhook: String, start_after: i64) -> Reply<'_, WebhookStanding>;

    /// Stores `standing` in place of the stored one, answering true, unless
    /// its `generation` is no longer the stored one or (PostgreSQL) a holder
    /// other than `holder` holds an unexpired lease on the webhook: false.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn save_webhook_standing(&self, standing: WebhookStanding, holder: String) -> Reply<'_, bool>;

    /// Gives `holder` the webhook's delivery lease for `ttl` by the
    /// database's clock when no other holder's lease runs (renewing its
    /// own); false when another's does. SQLite, which one server opens at
    /// a time, always grants it.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn lease_webhook(&self, webhook: String, holder: String, ttl: Duration) -> Reply<'_, bool>;

    /// Ends `holder`'s lease on the webhook, if it holds it.
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn release_webhook(&self, webhook: String, holder: String) -> Reply<'_, ()>;

    /// `linkid webhooks replay`: the webhook resumes with the first event
    /// after `after`, `ACTIVE`, attempts and history cleared, in a new
    /// generation; stored so when it had no standing yet.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn replay_webhook(&self, webhook: String, after: i64) -> Reply<'_, WebhookStanding>;

    /// `linkid webhooks enable`: a `DISABLED` webhook becomes `ACTIVE` in a
    /// new generation, resuming with the event that was refused; any other
    /// is left as it is. The standing after; `None` when there is none.
    ///
    /// Errors: `Unavailable`, `Full`, `Internal`.
    fn enable_webhook(&self, webhook: String) -> Reply<'_, Option<WebhookStanding>>;

    /// Every stored standing, by webhook id, each with how many events
    /// the feed holds after its `delivered_seq` (before its filters).
    ///
    /// Errors: `Unavailable`, `Internal`.
    fn webhook_standings(&self) -> Reply<'_, Vec<(WebhookStanding, i64)>>;

    /// Whether the database answers reads and takes writes now; the error
    /// says why not, in words for `/readyz`.
    fn ready(&self) -> Answer<'_, Result<(), String>>;

    /// Open and idle connections, for the metrics.
    fn pool_state(&self) -> (u32, u32);

    /// Finishes the writes already asked for and releases the database (a
    /// server's hold on a SQLite file ends here); later operations fail as
    /// `Unavailable`. Called once the server has drained.
    fn close(&self) -> Answer<'_, ()>;
}

/// A future for a store operation's output `T`: already made, sent by
/// another thread, or still to be computed. Poll it once it is made, as any
/// future.
#[must_use = "a store operation's answer does nothing unless awaited"]
pub struct Answer<'a, T>(Made<'a, T>);

enum Made<'a, T> {
    /// Made before the call returned (a read answered inline); `None` once
    /// taken.
    Ready(Option<T>),
    /// To come on a channel; `stopped` makes the answer when the sender is
    /// dropped unanswered (the thread that would have answered stopped).
    Sent {
        receiver: oneshot::Receiver<T>,
        stopped: fn() -> T,
    },
    /// Work that waits anyway (a blocking hand-off, a network round trip).
    Boxed(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Answer<'a, T> {
    /// An answer made already.
    pub fn ready(value: T) -> Answer<'a, T> {
        Answer(Made::Ready(Some(value)))
    }

    /// The answer another thread sends on `receiver`; `stopped` gives it if
    /// that thread drops the sender without answering.
    pub fn sent(receiver: oneshot::Receiver<T>, stopped: fn() -> T) -> Answer<'a, T> {
        Answer(Made::Sent { receiver, stopped })
    }

    /// The answer of `work`, boxed: for what waits on a thread or a server
    /// anyway, where one allocation does not count.
    pub fn boxed(work: impl Future<Output = T> + Send + 'a) -> Answer<'a, T> {
        Answer(Made::Boxed(Box::pin(work)))
    }
}

impl<T: Unpin> Future for Answer<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Made::Ready(value) => Poll::Ready(
                value
                    .take()
                    .expect("an answer made already is awaited only once"),
            ),
            Made::Sent { receiver, stopped } => Pin::new(receiver)
                .poll(cx)
                .map(|sent| sent.unwrap_or_else(|_| stopped())),
            Made::Boxed(work) => work.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_comes_back_whichever_way_it_was_made() {
        assert_eq!(Answer::ready(1).await, 1);
        assert_eq!(Answer::boxed(async { 2 }).await, 2);
        let (sender, receiver) = oneshot::channel();
        sender.send(3).unwrap();
        assert_eq!(Answer::sent(receiver, || 0).await, 3);
        // The answering thread stopped: the stand-in answer.
        let (sender, receiver) = oneshot::channel::<i32>();
        drop(sender);
        assert_eq!(Answer::sent(receiver, || -1).await, -1);
    }
}
