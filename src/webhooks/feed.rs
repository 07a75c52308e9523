//! What the engine reads: the change feed, a bounded page at a time, and
//! a signal when a newer event commits.
//!
//! `EventFeed` is what the engine asks of the store — phase 2 adapts
//! `Store::events` (with `StoreError::EventsExpired` as
//! `FeedError::Expired`) and `Store::newest_event`. `MemoryFeed` is a feed
//! in memory, for tests.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::domain::{Event, EventType};

/// Why events could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    /// Retention pruned events right after the one asked for.
    #[error("events up to {pruned_through} were pruned")]
    Expired { pruned_through: i64 },
    /// The store cannot be read now; the engine retries.
    #[error("the change feed is unavailable: {0}")]
    Unavailable(String),
}

/// The change feed, in commit order.
pub trait EventFeed: Send + Sync + 'static {
    /// Up to `limit` events after `after`, ascending by `seq`;
    /// `FeedError::Expired` when retention pruned some of the events
    /// right after `after`.
    fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Event>, FeedError>> + Send;

    /// The newest committed event's `seq`, changing as events commit.
    fn newest(&self) -> watch::Receiver<i64>;
}

/// A change feed in memory: for tests.
#[derive(Debug)]
pub struct MemoryFeed {
    inner: Mutex<MemoryFeedInner>,
    newest: watch::Sender<i64>,
}

#[derive(Debug, Default)]
struct MemoryFeedInner {
    events: VecDeque<Event>,
    pruned_through: i64,
    unavailable: bool,
}

impl Default for MemoryFeed {
    fn default() -> Self {
        MemoryFeed::new()
    }
}

impl MemoryFeed {
    pub fn new() -> MemoryFeed {
        MemoryFeed {
            inner: Mutex::default(),
            newest: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryFeedInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change to `user_id`'s link to `provider_id` and returns its seq.
    pub fn record(&self, event_type: EventType, user_id: &str, provider_id: &str) -> i64 {
        let mut inner = self.lock();
        let seq = inner.events.back().map_or(inner.pruned_through, |e| e.seq) + 1;
        inner.events.push_back(Event {
            seq,
            event_type,
            occurred_at: format!("2026-01-01T00:00:{:02}Z", seq % 60),
            user_id: user_id.to_string(),
            provider_id: provider_id.to_string(),
            linked_user_id: format!("remote-{user_id}"),
            linked_username: format!("{user_id}@example.com"),
            actor: "test".to_string(),
            subject: Some("webhook-tests".to_string()),
            request_id: None,
        });
        drop(inner);
        self.newest.send_replace(seq);
        seq
    }

    /// Retention: forgets every event up to `seq`.
    pub fn prune_through(&self, seq: i64) {
        let mut inner = self.lock();
        inner.events.retain(|e| e.seq > seq);
        inner.pruned_through = inner.pruned_through.max(seq);
    }

    /// Every event kept, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// Makes every read fail (true) or work again (false).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }
}

impl EventFeed for MemoryFeed {
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>, FeedError> {
        let inner = self.lock();
        if inner.unavailable {
            return Err(FeedError::Unavailable(
                "the memory feed is set unavailable".into(),
            ));
        }
        if after < inner.pruned_through {
            return Err(FeedError::Expired {
                pruned_through: inner.pruned_through,
            });
        }
        Ok(inner
            .events
            .iter()
            .filter(|e| e.seq > after)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    fn newest(&self) -> watch::Receiver<i64> {
        self.newest.subscribe()
    }
}
