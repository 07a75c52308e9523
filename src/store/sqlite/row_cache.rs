//! An exact cache of short reads: a user's links, and the login-time
//! reverse lookup. Each answer is kept with the WAL-index header
//! (`WalStamp`) taken just before it was read, and is served only while the
//! header is still the same: a commit by anyone — this server's writer,
//! `linkid import`, a `sqlite3` shell — changes the header before it
//! returns, so a cached answer is never older than the newest commit.
//!
//! Bounded in bytes; entries made stale by a commit are replaced when next
//! read and otherwise age out.

use std::sync::Arc;

use super::WalStamp;
use crate::domain::LinkRecord;

/// What the cache holds: at most this many bytes of keys and records.
pub(crate) const CAPACITY_BYTES: u64 = 8 * 1024 * 1024;

/// The answer to one read, as of a header.
#[derive(Clone)]
struct Entry {
    stamp: WalStamp,
    links: Arc<[LinkRecord]>,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<String, Entry> for Weight {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        let links: usize = entry
            .links
            .iter()
            .map(|l| {
                std::mem::size_of::<LinkRecord>()
                    + l.user_id.len()
                    + l.provider_id.len()
                    + l.linked_user_id.len()
                    + l.linked_username.len()
                    + l.created_at.len()
                    + l.updated_at.len()
            })
            .sum();
        (64 + key.len() + links) as u64
    }
}

/// Cached short reads of one database.
pub(crate) struct RowCache {
    entries: quick_cache::sync::Cache<String, Entry, Weight>,
}

/// What was read: a user's links, or who holds a remote identity.
pub(crate) enum Read<'a> {
    Links { user: &'a str },
    Lookup { provider: &'a str, remote: &'a str },
}

impl Read<'_> {
    /// The cache key: the two kinds and the lookup's two parts never
    /// collide (the provider's length comes first).
    fn key(&self) -> String {
        match self {
            Read::Links { user } => format!("u{user}"),
            Read::Lookup { provider, remote } => {
                format!("r{}:{provider}{remote}", provider.len())
            }
        }
    }
}

impl RowCache {
    pub(crate) fn new(capacity_bytes: u64) -> RowCache {
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((capacity_bytes / 512) as usize)
            .weight_capacity(capacity_bytes)
            .build()
            .expect("the cache options are complete");
        RowCache {
            entries: quick_cache::sync::Cache::with_options(
                options,
                Weight,
                Default::default(),
                Default::default(),
            ),
        }
    }

    /// The answer read when the header was `now`, if kept.
    pub(crate) fn get(&self, read: &Read<'_>, now: WalStamp) -> Option<Vec<LinkRecord>> {
        self.entries
            .get(&read.key())
            .filter(|entry| entry.stamp == now)
            .map(|entry| entry.links.to_vec())
    }

    /// Keeps an answer read after the header was `before`.
    pub(crate) fn put(&self, read: &Read<'_>, before: WalStamp, links: &[LinkRecord]) {
        self.entries.insert(
            read.key(),
            Entry {
                stamp: before,
                links: links.into(),
            },
        );
    }
}
