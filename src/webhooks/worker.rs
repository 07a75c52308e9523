//! One webhook's task: take its lease, then deliver its events one at a
//! time, in `seq` order, until the server stops.
//!
//! While it holds the lease the task runs two things side by side:
//! `deliver`, which reads a bounded page of the feed after the last event
//! delivered, skips what the webhook's filters pass over, sends the next
//! event and does not go past it before a 2xx, saving the standing after
//! every attempt; and `watch`, which renews the lease every few seconds
//! and notices an operator's `replay` or `enable` (a new generation). Either
//! one ending ends the other: a lost lease sends the task back to waiting
//! for it, a new generation makes it read its standing again. A lease
//! whose renewals fail is given up before it can lapse, so that two
//! instances never deliver for one webhook at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::deliver::{Attempt, Outcome, Sender};
use super::feed::{EventFeed, FeedError};
use super::ledger::{Saved, WebhookLedger};
use super::message::Message;
use super::schedule::{self, Backoff};
use super::DeliverySettings;
use crate::config::{Start, Webhook};
use crate::domain::{WebhookStanding, WebhookState};
use crate::telemetry;

/// A safety net under the feed's wake-ups: an idle webhook reads the feed
/// at least this often.
const IDLE_POLL: Duration = Duration::from_secs(30);

/// How a database or feed that fails is retried: soon, then every 30 s.
const STORE_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(30),
};

/// How long a stopping task may take to give its lease up.
pub(super) const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a delivery session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    /// The lease lapsed or another holder has it.
    LeaseLost,
    /// An operator changed the standing: read it again.
    Reload,
    /// A save was refused: the generation changed or the lease moved.
    Superseded,
}

/// What a renewal of the lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    Renewed,
    /// Another holder has it.
    Lost,
    /// The ledger failed or did not answer in time.
    Failed,
}

/// One webhook's delivery.
pub(super) struct Worker<L, F> {
    pub webhook: Webhook,
    pub settings: Arc<DeliverySettings>,
    pub sender: Sender,
    pub ledger: Arc<L>,
    pub feed: Arc<F>,
    /// This engine's name in the leases.
    pub holder: Arc<str>,
    /// When the lease was last granted or renewed (as asked: the lease runs
    /// from the moment the request left, or later).
    pub renewed: Mutex<Instant>,
}

impl<L: WebhookLedger, F: EventFeed> Worker<L, F> {
    /// Delivers until `stop` turns true (or its sender is dropped), then
    /// gives the lease up.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::select! {
            () = stopped => {}
            () = self.serve() => {}
        }
        let _ = tokio::time::timeout(
            RELEASE_TIMEOUT,
            self.ledger.release(&self.webhook.id, &self.holder),
        )
        .await;
        telemetry::webhook_pending(&self.webhook.id, 0);
    }

    /// Never returns: waits for the lease, delivers while it holds it.
    async fn serve(&self) {
        let start_after = self.start_after().await;
        loop {
            self.acquire().await;
            tracing::debug!(webhook = %self.webhook.id, "webhook lease taken");
            loop {
                let standing = self.load(start_after).await;
                let why = tokio::select! {
                    why = self.watch(standing.generation) => why,
                    why = self.deliver(standing) => why,
                };
                let lost = match why {
                    Interruption::Reload => false,
                    Interruption::LeaseLost => true,
                    // Keep delivering only if the lease is still ours.
                    Interruption::Superseded => self.renew().await != Renewal::Renewed,
                };
                if lost {
                    tracing::info!(webhook = %self.webhook.id, "another instance delivers this webhook now (its lease moved or could not be renewed)");
                    telemetry::webhook_pending(&self.webhook.id, 0);
                    break;
                }
            }
        }
    }

    /// Where the webhook starts when the ledger has never seen it.
    async fn start_after(&self) -> i64 {
        match self.webhook.start {
            Start::Now => *self.feed.newest().borrow(),
            // The oldest event kept: after what retention pruned.
            Start::Beginning => loop {
                match self.feed.events_after(0, 1).await {
                    Ok(_) => break 0,
                    Err(FeedError::Expired { pruned_through }) => break pruned_through,
                    Err(FeedError::Unavailable(why)) => {
                        tracing::warn!(webhook = %self.webhook.id, error = %why, "the change feed cannot be read; retrying");
                        tokio::time::sleep(STORE_BACKOFF.max).await;
                    }
                }
            },
        }
    }

    /// Waits until this engine holds the lease.
    async fn acquire(&self) {
        let mut failures = 0u32;
        loop {
            let asked = Instant::now();
            let granted = tokio::time::timeout(
                self.settings.check_every,
                self.ledger
                    .try_lease(&self.webhook.id, &self.holder, self.settings.lease_ttl),
            )
            .await;
            match granted {
                Ok(Ok(true)) => {
                    *self.lock_renewed() = asked;
                    return;
                }
                Ok(Ok(false)) => failures = 0,
                Ok(Err(error)) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(webhook = %self.webhook.id, error = %error, failures, "cannot take the webhook's lease; retrying");
                    }
                }
                Err(_) => failures += 1,
            }
            tokio::time::sleep(self.settings.check_every).await;
        }
    }

    /// Renews the lease once.
    async fn renew(&self) -> Renewal {
        let asked = Instant::now();
        let renewed = tokio::time::timeout_at(
            self.give_up_at(),
            self.ledger
                .try_lease(&self.webhook.id, &self.holder, self.settings.lease_ttl),
        )
        .await;
        match renewed {
            Ok(Ok(true)) => {
                *self.lock_renewed() = asked;
                Renewal::Renewed
            }
            Ok(Ok(false)) => Renewal::Lost,
            Ok(Err(_)) | Err(_) => Renewal::Failed,
        }
    }

    /// When to stop counting on the lease: half a check before it lapses.
    fn give_up_at(&self) -> Instant {
        let renewed = *self.lock_renewed();
        (renewed + self.settings.lease_ttl)
            .checked_sub(self.settings.check_every / 2)
            .unwrap_or(renewed)
    }

    fn lock_renewed(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.renewed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The webhook's standing, retried until the ledger answers.
    async fn load(&self, start_after: i64) -> WebhookStanding {
        let mut failures = 0u32;
        loop {
            match self.ledger.standing(&self.webhook.id, start_after).await {
                Ok(standing) => return standing,
                Err(error) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(webhook = %self.webhook.id, error = %error, "cannot read where the webhook stands; retrying");
                    }
                    tokio::time::sleep(STORE_BACKOFF.next(failures)).await;
                }
            }
        }
    }

    /// Renews the lease and looks for a new generation, every check,
    /// until one of them ends the session.
    async fn watch(&self, generation: i64) -> Interruption {
        loop {
            tokio::time::sleep(self.settings.check_every).await;
            match self.renew().await {
                Renewal::Renewed => {}
                Renewal::Lost => return Interruption::LeaseLost,
                // Another try is due after the next sleep; give up now if
                // the lease could lapse before it.
                Renewal::Failed => {
                    if Instant::now() + self.settings.check_every >= self.give_up_at() {
                        return Interruption::LeaseLost;
                    }
                }
            }
            let stored = tokio::time::timeout(
                self.settings.check_every,
                self.ledger.standing(&self.webhook.id, 0),
            )
            .await;
            if let Ok(Ok(stored)) = stored {
                if stored.generation != generation {
                    tracing::info!(webhook = %self.webhook.id, state = stored.state.as_str(), delivered_seq = stored.delivered_seq, "the webhook was replayed or enabled; resuming from there");
                    return Interruption::Reload;
                }
            }
        }
    }

    /// Delivers from `standing` on; returns only when interrupted.
    async fn deliver(&self, mut standing: WebhookStanding) -> Interruption {
        let mut newest = self.feed.newest();
        let mut cursor = standing.delivered_seq;
        let mut feed_failures = 0u32;
        'feed: loop {
            self.show_pending(&newest, cursor);
            if matches!(
                standing.state,
                WebhookState::Disabled | WebhookState::Expired
            ) {
                // Only an operator moves it on, and `watch` sees that.
                while newest.changed().await.is_ok() {
                    self.show_pending(&newest, cursor);
                }
                std::future::pending::<()>().await;
            }
            if let Some(due) = standing.next_attempt_at {
                // Capped: the time may have been set under a longer
                // max_backoff_secs, or before the clock was turned back.
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(self.settings.backoff.max);
                tokio::time::sleep(wait).await;
            }
            // A commit from here on wakes the wait for an empty page below.
            newest.borrow_and_update();
            let page = match self.feed.events_after(cursor, self.settings.batch).await {
                Ok(page) => {
                    feed_failures = 0;
                    page
                }
                Err(FeedError::Expired { pruned_through }) => {
                    standing.delivered_seq = cursor;
                    standing = schedule::expired(&standing, pruned_through);
                    tracing::error!(
                        webhook = %self.webhook.id,
                        error = standing.last_error.as_deref().unwrap_or_default(),
                        "webhook expired"
                    );
                    if let Err(why) = self.save(&standing).await {
                        return why;
                    }
                    continue;
                }
                Err(FeedError::Unavailable(why)) => {
                    feed_failures += 1;
                    if feed_failures.is_power_of_two() {
                        tracing::warn!(webhook = %self.webhook.id, error = %why, "the change feed cannot be read; retrying");
                    }
                    tokio::time::sleep(STORE_BACKOFF.next(feed_failures)).await;
                    continue;
                }
            };
            if page.is_empty() {
                if let Ok(Err(_closed)) = tokio::time::timeout(IDLE_POLL, newest.changed()).await {
                    tokio::time::sleep(IDLE_POLL).await;
                }
                continue;
            }
            for event in &page {
                if !self.webhook.wants(event) {
                    cursor = event.seq;
                    continue;
                }
                let attempt = match Message::new(event) {
                    Ok(message) => {
                        self.sender
                            .send(&self.webhook.url, &self.webhook.secrets, &message)
                            .await
                    }
                    Err(error) => Attempt {
                        outcome: Outcome::Failed,
                        status: None,
                        detail: Some(format!("the event cannot be written as JSON: {error}")),
                        retry_after: None,
                    },
                };
                telemetry::webhook_attempt(&self.webhook.id, attempt.outcome.label());
                let before = standing.state;
                standing = schedule::after_attempt(
                    &standing,
                    (cursor, event.seq),
                    &attempt,
                    SystemTime::now(),
                    (&self.settings.backoff, rand::random()),
                );
                self.log_attempt(before, &standing, event.seq, &attempt);
                if let Err(why) = self.save(&standing).await {
                    return why;
                }
                if standing.state != WebhookState::Active {
                    continue 'feed;
                }
                cursor = event.seq;
                self.show_pending(&newest, cursor);
            }
            // What the filters passed over, saved once a page so that a
            // restart does not read it again.
            if cursor != standing.delivered_seq {
                standing.delivered_seq = cursor;
                if let Err(why) = self.save(&standing).await {
                    return why;
                }
            }
        }
    }

    /// Saves `standing`, retrying while the ledger fails.
    async fn save(&self, standing: &WebhookStanding) -> Result<(), Interruption> {
        let mut failures = 0u32;
        loop {
            let saved = tokio::time::timeout(
                self.settings.check_every,
                self.ledger.save(standing, &self.holder),
            )
            .await;
            let error = match saved {
                Ok(Ok(Saved::Written)) => return Ok(()),
                Ok(Ok(Saved::Superseded)) => return Err(Interruption::Superseded),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "no answer in time".to_string(),
            };
            failures += 1;
            if failures.is_power_of_two() {
                tracing::warn!(webhook = %self.webhook.id, error = %error, "cannot record where the webhook stands; retrying");
            }
            tokio::time::sleep(STORE_BACKOFF.next(failures)).await;
        }
    }

    /// Events after the last one delivered or skipped, as a gauge.
    fn show_pending(&self, newest: &watch::Receiver<i64>, cursor: i64) {
        let pending = (*newest.borrow() - cursor).max(0);
        telemetry::webhook_pending(&self.webhook.id, pending as u64);
    }

    /// One line for each change of state, and for the 1st, 2nd, 4th, 8th …
    /// failure in a row, so that a dead receiver does not flood the log.
    fn log_attempt(
        &self,
        before: WebhookState,
        after: &WebhookStanding,
        seq: i64,
        attempt: &Attempt,
    ) {
        let webhook = &self.webhook.id;
        let url = &self.webhook.url;
        let outcome = attempt.outcome.label();
        let error = attempt.detail.as_deref().unwrap_or_default();
        match after.state {
            WebhookState::Active if before == WebhookState::Retrying => {
                tracing::info!(%webhook, seq, status = attempt.status, "webhook delivered after failed attempts");
            }
            WebhookState::Active => {
                tracing::debug!(%webhook, seq, status = attempt.status, "webhook delivered");
            }
            WebhookState::Disabled => {
                tracing::warn!(%webhook, %url, seq, error, "webhook disabled: the receiver answered 410 Gone; `linkid webhooks enable {webhook}` resumes with this event");
            }
            _ if after.attempts.is_power_of_two() => {
                let retry_in = after
                    .next_attempt_at
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default()
                    .as_secs();
                tracing::warn!(%webhook, %url, seq, attempts = after.attempts, outcome, error, retry_in_secs = retry_in, "webhook delivery failed; retrying");
            }
            _ => {
                tracing::debug!(%webhook, seq, attempts = after.attempts, outcome, error, "webhook delivery failed; retrying");
            }
        }
    }
}
