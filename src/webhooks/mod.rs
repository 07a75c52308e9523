//! Webhooks: the change feed pushed to other systems, as Standard Webhooks
//! 1.0 (DESIGN "Webhooks: the change feed pushed to other systems").
//!
//! # What the engine assumes
//!
//! - **The feed is the outbox.** Every change is already an event, written
//!   in the same transaction as the change, with a `seq` that only grows in
//!   commit order (a smaller `seq` never appears after a larger one). So
//!   the engine only ever reads the feed after the last event it delivered:
//!   nothing uncommitted is sent and nothing committed is missed.
//! - **Per webhook, one event at a time.** Each webhook has a task of its
//!   own; it sends the first event after its `delivered_seq` that its
//!   filters want, and goes on only after a 2xx. A failure (any other
//!   answer, a redirect, a timeout, a refused connection) is retried with
//!   exponential backoff and jitter (`schedule`) for as long as the event is
//!   kept; 410 Gone disables the webhook; an event pruned before delivery
//!   makes it `EXPIRED`. A slow receiver holds up its own webhook only.
//! - **At least once.** The standing (`domain::WebhookStanding`) is saved
//!   after every attempt, before the next event is read, so a crash sends
//!   again at most the event in flight — with the same `webhook-id`.
//! - **Bounded.** A task holds one page of events (`DeliverySettings::batch`)
//!   and at most 64 KiB of an answer; it sleeps on the feed's `newest`
//!   signal rather than polling.
//! - **Secrets stay in their types.** The URL's credentials and the signing
//!   secrets live in `config::ReceiverUrl` and `config::SigningSecrets`,
//!   whose `Display`/`Debug` show neither; logs, `last_error` and metrics
//!   name a webhook by its id and show its URL without credentials.
//!
//! # How phase 2 plugs in
//!
//! The engine knows no store. It takes two small traits:
//!
//! - [`EventFeed`] — `events_after(after, limit)` and `newest()`: an adapter
//!   over `Store::events` (mapping `StoreError::EventsExpired` to
//!   `FeedError::Expired`, any other error to `FeedError::Unavailable`) and
//!   `Store::newest_event()`.
//! - [`WebhookLedger`] — a row per webhook holding a `WebhookStanding` (with
//!   its `generation`) and a lease (`holder`, `until`): `standing`
//!   (insert-if-absent, then read), `save` (one `UPDATE … WHERE generation
//!   = $g AND (lease is $holder's or has lapsed)`), `try_lease` / `release`
//!   (on PostgreSQL against the database's clock; on SQLite, which one
//!   process opens, `try_lease` may always grant), and `replay` / `enable`
//!   for the `linkid webhooks` commands, each bumping `generation`.
//!
//! Both traits speak only `domain` types, so the adapters live wherever the
//! store is reachable (`startup`), and start-up does:
//!
//! ```ignore
//! let engine = webhooks::Engine::start(
//!     config.webhooks()?,
//!     webhooks::DeliverySettings::from_config(&config.webhook_delivery),
//!     Arc::new(StoreLedger(store.clone())),
//!     Arc::new(StoreFeed(store.clone())),
//! )?;
//! // ... serve ...
//! engine.stop().await;
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Webhook, WebhookDeliveryConfig};
use crate::telemetry;

mod deliver;
mod feed;
mod ledger;
mod message;
mod schedule;
#[cfg(test)]
mod test_receiver;
#[cfg(test)]
mod tests;
mod worker;

pub use deliver::{Attempt, Outcome, MAX_ANSWER_BYTES};
pub use feed::{EventFeed, FeedError, MemoryFeed};
pub use ledger::{LedgerError, MemoryLedger, Saved, WebhookLedger};
pub use message::{message_type, sign, Message};
pub use schedule::Backoff;

/// How the engine delivers: `[webhook_delivery]` and the lease's timing.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// One attempt's limit, connecting and answering included.
    pub timeout: Duration,
    /// The waits between attempts at one event.
    pub backoff: Backoff,
    /// A private CA's PEM certificates, trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long a lease lasts unless renewed: another instance takes over
    /// a dead one's webhooks within `lease_ttl + check_every`.
    pub lease_ttl: Duration,
    /// How often a task renews its lease and looks for an operator's
    /// replay or enable (well under `lease_ttl`).
    pub check_every: Duration,
    /// Events read from the feed at a time.
    pub batch: u32,
}

impl DeliverySettings {
    /// The configured settings: a lease of 8 s renewed every 2 s, so
    /// that another instance takes over within 10 s (DESIGN: 15 s, with
    /// room for a loaded machine), and an operator's replay or enable acts
    /// within 2 s (DESIGN: 5 s).
    pub fn from_config(config: &WebhookDeliveryConfig) -> DeliverySettings {
        DeliverySettings {
            timeout: config.timeout(),
            backoff: Backoff {
                first: Duration::from_secs(1),
                max: config.max_backoff(),
            },
            ca_file: config.ca_file.clone(),
            lease_ttl: Duration::from_secs(8),
            check_every: Duration::from_secs(2),
            batch: 100,
        }
    }
}

/// The running webhooks: one task each, until `stop`.
#[derive(Debug)]
pub struct Engine {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    holder: Arc<str>,
}

impl Engine {
    /// Starts a task for each webhook (within a tokio runtime). Fails only
    /// when the HTTP client cannot be made (`ca_file` unreadable).
    pub fn start<L: WebhookLedger, F: EventFeed>(
        webhooks: Vec<Webhook>,
        settings: DeliverySettings,
        ledger: Arc<L>,
        feed: Arc<F>,
    ) -> anyhow::Result<Engine> {
        let sender = deliver::Sender::new(settings.timeout, settings.ca_file.as_deref())?;
        let settings = Arc::new(settings);
        let holder: Arc<str> = instance_name().into();
        let (stop, stopped) = watch::channel(false);
        let tasks = webhooks
            .into_iter()
            .map(|webhook| {
                telemetry::webhook_pending(&webhook.id, 0);
                tracing::info!(webhook = %webhook.id, url = %webhook.url, "delivering the change feed to a webhook");
                let worker = worker::Worker {
                    webhook,
                    settings: settings.clone(),
                    sender: sender.clone(),
                    ledger: ledger.clone(),
                    feed: feed.clone(),
                    holder: holder.clone(),
                    renewed: Mutex::new(tokio::time::Instant::now()),
                };
                tokio::spawn(worker.run(stopped.clone()))
            })
            .collect();
        Ok(Engine {
            stop,
            tasks,
            holder,
        })
    }

    /// This engine's name in the leases.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Stops every task and gives its lease up, so that another instance
    /// may take over at once. An attempt in flight is abandoned: whoever
    /// delivers next sends that event again, with the same `webhook-id`.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + worker::RELEASE_TIMEOUT * 2;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// `host/pid/random`: unique among the instances sharing a database, and
/// telling an operator who holds a lease.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &random[..8])
}
