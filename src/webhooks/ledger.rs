//! The engine's memory: where each webhook stands, and who delivers for it.
//!
//! `WebhookLedger` is the whole of what the engine asks of a database; the
//! SQLite and PostgreSQL stores implement it (phase 2), and `MemoryLedger`
//! here is the same contract in memory, for tests. Two rules keep
//! deliveries at least once and never lost:
//!
//! - **Generations.** An operator's `replay` or `enable` bumps the
//!   standing's `generation`; the engine's `save` applies only to the
//!   generation it read (else `Saved::Superseded`, and it reads again), so
//!   a delivery finishing at that moment cannot undo the operator's change.
//! - **Leases.** One holder at a time delivers for a webhook: it takes the
//!   lease for a few seconds and renews it while it delivers; a holder
//!   that dies stops renewing, and another takes over when the lease runs
//!   out. `save` refuses a holder whose lease another has taken.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::{WebhookStanding, WebhookState};

/// The database cannot be reached or failed; the engine retries.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the webhook ledger is unavailable: {0}")]
pub struct LedgerError(pub String);

/// What became of a `save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Stored.
    Written,
    /// Not stored: an operator changed the standing since it was read, or
    /// another holder took the lease. Read it again.
    Superseded,
}

/// Where webhooks stand, kept where a restart (or another instance) finds it.
pub trait WebhookLedger: Send + Sync + 'static {
    /// The webhook's standing. When it has none yet, an `ACTIVE` one that
    /// has delivered everything up to `start_after` is stored first; when
    /// several callers race, the first one stored is everyone's.
    fn standing(
        &self,
        webhook: &str,
        start_after: i64,
    ) -> impl Future<Output = Result<WebhookStanding, LedgerError>> + Send;

    /// Stores `standing` in place of the stored one, unless its
    /// `generation` is no longer the stored one or another holder than
    /// `holder` holds an unexpired lease on the webhook.
    fn save(
        &self,
        standing: &WebhookStanding,
        holder: &str,
    ) -> impl Future<Output = Result<Saved, LedgerError>> + Send;

    /// Gives `holder` the webhook's lease until `ttl` from now, when no
    /// one else holds an unexpired one (renewing it when `holder` does);
    /// false when another holder's lease is still running. A store that
    /// only one process can open may always answer true.
    fn try_lease(
        &self,
        webhook: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, LedgerError>> + Send;

    /// Ends `holder`'s lease, if it holds it, so another may take over at once.
    fn release(
        &self,
        webhook: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// `linkid webhooks replay ID --after SEQ`: the webhook resumes with
    /// the first event after `after`, `ACTIVE`, its attempts and schedule
    /// cleared, in a new generation. `None` when it has no standing yet.
    /// (The engine never calls this; the command does.)
    fn replay(
        &self,
        webhook: &str,
        after: i64,
    ) -> impl Future<Output = Result<Option<WebhookStanding>, LedgerError>> + Send;

    /// `linkid webhooks enable ID`: a `DISABLED` webhook becomes `ACTIVE`
    /// in a new generation and resumes with the event that was refused;
    /// any other standing is left as it is. Returns the standing after,
    /// `None` when it has none. (The engine never calls this.)
    fn enable(
        &self,
        webhook: &str,
    ) -> impl Future<Output = Result<Option<WebhookStanding>, LedgerError>> + Send;
}

/// A lease as `MemoryLedger` keeps it.
#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    until: Instant,
}

/// `WebhookLedger` in memory: for tests, and for seeing the contract whole.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<MemoryLedgerInner>,
}

#[derive(Debug, Default)]
struct MemoryLedgerInner {
    standings: HashMap<String, WebhookStanding>,
    leases: HashMap<String, Lease>,
    /// While true every call fails, as a database that is down does.
    unavailable: bool,
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    /// The stored standing, if any (what `linkid webhooks status` would read).
    pub fn get(&self, webhook: &str) -> Option<WebhookStanding> {
        self.lock().standings.get(webhook).cloned()
    }

    /// Who holds an unexpired lease on the webhook, if anyone.
    pub fn lease_holder(&self, webhook: &str) -> Option<String> {
        self.lock()
            .leases
            .get(webhook)
            .filter(|lease| lease.until > Instant::now())
            .map(|lease| lease.holder.clone())
    }

    /// Makes every call fail (true) or work again (false).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryLedgerInner> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> Result<std::sync::MutexGuard<'_, MemoryLedgerInner>, LedgerError> {
        let inner = self.lock();
        if inner.unavailable {
            return Err(LedgerError("the memory ledger is set unavailable".into()));
        }
        Ok(inner)
    }
}

impl MemoryLedgerInner {
    fn held_by_another(&self, webhook: &str, holder: &str) -> bool {
        self.leases
            .get(webhook)
            .is_some_and(|lease| lease.holder != holder && lease.until > Instant::now())
    }

    fn bump(
        &mut self,
        webhook: &str,
        change: impl FnOnce(&mut WebhookStanding),
    ) -> Option<WebhookStanding> {
        let standing = self.standings.get_mut(webhook)?;
        change(standing);
        Some(standing.clone())
    }
}

impl WebhookLedger for MemoryLedger {
    async fn standing(
        &self,
        webhook: &str,
        start_after: i64,
    ) -> Result<WebhookStanding, LedgerError> {
        let mut inner = self.open()?;
        Ok(inner
            .standings
            .entry(webhook.to_string())
            .or_insert_with(|| WebhookStanding::new(webhook, start_after))
            .clone())
    }

    async fn save(&self, standing: &WebhookStanding, holder: &str) -> Result<Saved, LedgerError> {
        let mut inner = self.open()?;
        if inner.held_by_another(&standing.webhook, holder) {
            return Ok(Saved::Superseded);
        }
        match inner.standings.get_mut(&standing.webhook) {
            Some(stored) if stored.generation == standing.generation => {
                *stored = standing.clone();
                Ok(Saved::Written)
            }
            _ => Ok(Saved::Superseded),
        }
    }

    async fn try_lease(
        &self,
        webhook: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, LedgerError> {
        let mut inner = self.open()?;
        if inner.held_by_another(webhook, holder) {
            return Ok(false);
        }
        inner.leases.insert(
            webhook.to_string(),
            Lease {
                holder: holder.to_string(),
                until: Instant::now() + ttl,
            },
        );
        Ok(true)
    }

    async fn release(&self, webhook: &str, holder: &str) -> Result<(), LedgerError> {
        let mut inner = self.open()?;
        if inner
            .leases
            .get(webhook)
            .is_some_and(|l| l.holder == holder)
        {
            inner.leases.remove(webhook);
        }
        Ok(())
    }

    async fn replay(
        &self,
        webhook: &str,
        after: i64,
    ) -> Result<Option<WebhookStanding>, LedgerError> {
        let mut inner = self.open()?;
        Ok(inner.bump(webhook, |standing| {
            *standing = WebhookStanding {
                generation: standing.generation + 1,
                ..WebhookStanding::new(webhook, after)
            };
        }))
    }

    async fn enable(&self, webhook: &str) -> Result<Option<WebhookStanding>, LedgerError> {
        let mut inner = self.open()?;
        Ok(inner.bump(webhook, |standing| {
            if standing.state == WebhookState::Disabled {
                standing.state = WebhookState::Active;
                standing.attempts = 0;
                standing.next_attempt_at = None;
                standing.generation += 1;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn the_first_standing_stored_wins_and_later_starts_are_ignored() {
        let ledger = MemoryLedger::new();

        let first = ledger.standing("crm", 41).await.unwrap();
        let again = ledger.standing("crm", 99).await.unwrap();

        assert_eq!(first.delivered_seq, 41);
        assert_eq!(again, first);
    }

    #[tokio::test]
    async fn a_save_from_an_older_generation_is_superseded_by_a_replay() {
        let ledger = MemoryLedger::new();
        let mut read = ledger.standing("crm", 10).await.unwrap();

        ledger.replay("crm", 3).await.unwrap();
        read.delivered_seq = 11;
        let saved = ledger.save(&read, "a").await.unwrap();

        assert_eq!(saved, Saved::Superseded);
        assert_eq!(ledger.get("crm").unwrap().delivered_seq, 3);
        assert_eq!(ledger.get("crm").unwrap().generation, 1);
    }

    #[tokio::test]
    async fn one_holder_at_a_time_holds_a_lease_until_it_lapses_or_is_released() {
        let ledger = MemoryLedger::new();
        let standing = ledger.standing("crm", 0).await.unwrap();

        assert!(ledger.try_lease("crm", "a", TTL).await.unwrap());
        assert!(!ledger.try_lease("crm", "b", TTL).await.unwrap());
        assert_eq!(
            ledger.save(&standing, "b").await.unwrap(),
            Saved::Superseded
        );
        assert!(ledger.try_lease("crm", "a", TTL).await.unwrap(), "a renews");
        ledger.release("crm", "a").await.unwrap();
        assert!(ledger.try_lease("crm", "b", Duration::ZERO).await.unwrap());
        assert!(
            ledger.try_lease("crm", "a", TTL).await.unwrap(),
            "b's lease lapsed at once"
        );
    }

    #[tokio::test]
    async fn enable_changes_only_a_disabled_webhook() {
        let ledger = MemoryLedger::new();
        let mut standing = ledger.standing("crm", 0).await.unwrap();
        standing.state = WebhookState::Retrying;
        ledger.save(&standing, "a").await.unwrap();

        let retrying = ledger.enable("crm").await.unwrap().unwrap();
        standing.state = WebhookState::Disabled;
        ledger.save(&standing, "a").await.unwrap();
        let enabled = ledger.enable("crm").await.unwrap().unwrap();

        assert_eq!(retrying.generation, 0);
        assert_eq!(enabled.state, WebhookState::Active);
        assert_eq!(enabled.generation, 1);
        assert_eq!(ledger.enable("unknown").await.unwrap(), None);
    }
}
