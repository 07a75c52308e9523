//! The delivery engine wired to the store: `webhooks` knows no store (its
//! arrows point down, to `domain` and `config`), so the two small adapters
//! it asks for live here, where both are in reach. `StoreFeed` is the
//! change feed (`Store::events`, with `EventsExpired` as
//! `FeedError::Expired`); `StoreLedger` is where webhooks stand and who
//! delivers them (`Store::webhook_standing` and the rest).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, ConfigError, Webhook};
use crate::domain::{Event, WebhookStanding};
use crate::store::{Store, StoreError};
use crate::webhooks::{self, EventFeed, FeedError, LedgerError, Saved, WebhookLedger};

/// What the engine needs from the configuration, read when the server is
/// built so that a secret file that changed since the check stops start-up.
pub(super) struct Delivery {
    webhooks: Vec<Webhook>,
    settings: webhooks::DeliverySettings,
}

impl Delivery {
    /// The configured webhooks with their secrets; `None` when there are none.
    pub(super) fn from_config(config: &Config) -> Result<Option<Delivery>, ConfigError> {
        if config.webhooks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Delivery {
            webhooks: config.webhooks()?,
            settings: webhooks::DeliverySettings::from_config(&config.webhook_delivery),
        }))
    }

    /// Starts delivering, from the store's feed and ledger.
    pub(super) fn start(self, store: &Store) -> anyhow::Result<webhooks::Engine> {
        webhooks::Engine::start(
            self.webhooks,
            self.settings,
            Arc::new(StoreLedger(store.clone())),
            Arc::new(StoreFeed(store.clone())),
        )
    }
}

/// The change feed, read from the store.
pub struct StoreFeed(pub Store);

impl EventFeed for StoreFeed {
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>, FeedError> {
        self.0.events(after, limit).await.map_err(|e| match e {
            StoreError::EventsExpired { pruned_through } => FeedError::Expired { pruned_through },
            other => FeedError::Unavailable(other.to_string()),
        })
    }

    fn newest(&self) -> watch::Receiver<i64> {
        self.0.newest_event()
    }
}

/// Where webhooks stand, kept in the store.
pub struct StoreLedger(pub Store);

/// The store's error as the ledger's: in words, with its causes.
fn ledger_error(error: StoreError) -> LedgerError {
    LedgerError(format!("{:#}", anyhow::Error::new(error)))
}

impl WebhookLedger for StoreLedger {
    async fn standing(
        &self,
        webhook: &str,
        start_after: i64,
    ) -> Result<WebhookStanding, LedgerError> {
        self.0
            .webhook_standing(webhook.to_string(), start_after)
            .await
            .map_err(ledger_error)
    }

    async fn save(&self, standing: &WebhookStanding, holder: &str) -> Result<Saved, LedgerError> {
        let stored = self
            .0
            .save_webhook_standing(standing.clone(), holder.to_string())
            .await
            .map_err(ledger_error)?;
        Ok(if stored {
            Saved::Written
        } else {
            Saved::Superseded
        })
    }

    async fn try_lease(
        &self,
        webhook: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, LedgerError> {
        self.0
            .lease_webhook(webhook.to_string(), holder.to_string(), ttl)
            .await
            .map_err(ledger_error)
    }

    async fn release(&self, webhook: &str, holder: &str) -> Result<(), LedgerError> {
        self.0
            .release_webhook(webhook.to_string(), holder.to_string())
            .await
            .map_err(ledger_error)
    }

    async fn replay(
        &self,
        webhook: &str,
        after: i64,
    ) -> Result<Option<WebhookStanding>, LedgerError> {
        self.0
            .replay_webhook(webhook.to_string(), after)
            .await
            .map(Some)
            .map_err(ledger_error)
    }

    async fn enable(&self, webhook: &str) -> Result<Option<WebhookStanding>, LedgerError> {
        self.0
            .enable_webhook(webhook.to_string())
            .await
            .map_err(ledger_error)
    }
}
