//! An exact cache of short reads: a user's links, and the login-time
//! reverse lookup. Each answer is kept with the WAL-index header
//! (`WalStamp`) taken just before it was read, and is served only while the
//! header is still the same: a commit by anyone — this server's writer,
//! `linkid import`, a `sqlite3` shell — changes the header before it
//! returns, so a cached answer is never older than the newest commit.
//!
//! Bounded in bytes; entries made stale by a commit are replaced when next
//! read and otherwise age out. When reads hardly ever hit (far more keys
//! than fit, read at random), keeping every answer only costs: then a full
//! cache admits one answer in `SAMPLE_MISSES`, enough to notice when the
//! reads come back to keys that fit.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use super::WalStamp;
use crate::domain::LinkRecord;

/// What the cache holds: at most this many bytes of keys and records.
pub(crate) const CAPACITY_BYTES: u64 = 4 * 1024 * 1024;

/// Reads per look at the hit rate.
const WINDOW: u32 = 1024;
/// A full cache admits every answer while at least one read in this many
/// hits.
const WORTHWHILE: u32 = 8;
/// Otherwise it admits one miss in this many.
const SAMPLE_MISSES: u32 = 16;

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
    /// Reads and hits in the current window (approximate under races).
    reads: AtomicU32,
    hits: AtomicU32,
    /// Whether the last window hit often enough to keep every answer.
    worthwhile: AtomicBool,
    /// Answers kept, for the tests.
    #[cfg(test)]
    admitted: AtomicU32,
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
            reads: AtomicU32::new(0),
            hits: AtomicU32::new(0),
            worthwhile: AtomicBool::new(true),
            #[cfg(test)]
            admitted: AtomicU32::new(0),
        }
    }

    /// The answer read when the header was `now`, if kept.
    pub(crate) fn get(&self, read: &Read<'_>, now: WalStamp) -> Option<Vec<LinkRecord>> {
        let found = self
            .entries
            .get(&read.key())
            .filter(|entry| entry.stamp == now)
            .map(|entry| entry.links.to_vec());
        let hits = if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.hits.load(Ordering::Relaxed)
        };
        if self.reads.fetch_add(1, Ordering::Relaxed) + 1 >= WINDOW {
            self.worthwhile
                .store(hits * WORTHWHILE >= WINDOW, Ordering::Relaxed);
            self.reads.store(0, Ordering::Relaxed);
            self.hits.store(0, Ordering::Relaxed);
        }
        found
    }

    /// Keeps an answer read after the header was `before` (or, when the
    /// cache is full and hardly ever hit, one in `SAMPLE_MISSES`).
    pub(crate) fn put(&self, read: &Read<'_>, before: WalStamp, links: &[LinkRecord]) {
        let admit = self.worthwhile.load(Ordering::Relaxed)
            || self.entries.weight() < self.entries.capacity() / 10 * 9
            || self
                .reads
                .load(Ordering::Relaxed)
                .is_multiple_of(SAMPLE_MISSES);
        if admit {
            #[cfg(test)]
            self.admitted.fetch_add(1, Ordering::Relaxed);
            self.entries.insert(
                read.key(),
                Entry {
                    stamp: before,
                    links: links.into(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(user: &str) -> LinkRecord {
        LinkRecord {
            user_id: user.into(),
            provider_id: "okta".into(),
            linked_user_id: format!("r-{user}"),
            linked_username: format!("{user}@example.com"),
            created_at: "2026-01-02T03:04:05Z".into(),
            updated_at: "2026-01-02T03:04:05Z".into(),
        }
    }

    fn stamp(n: u32) -> WalStamp {
        WalStamp::made_up(n)
    }

    #[test]
    fn an_answer_is_served_only_under_the_header_it_was_read_after() {
        let cache = RowCache::new(CAPACITY_BYTES);
        let read = Read::Links { user: "u-1" };
        assert!(cache.get(&read, stamp(1)).is_none());
        cache.put(&read, stamp(1), &[link("u-1")]);
        assert_eq!(cache.get(&read, stamp(1)).unwrap()[0].user_id, "u-1");
        assert!(cache.get(&read, stamp(2)).is_none(), "a commit since");
        // The lookup's key never collides with a list's, nor with another
        // split of the same characters.
        assert!(cache
            .get(
                &Read::Lookup {
                    provider: "u-",
                    remote: "1"
                },
                stamp(1)
            )
            .is_none());
        cache.put(
            &Read::Lookup {
                provider: "ab",
                remote: "c",
            },
            stamp(1),
            &[],
        );
        assert!(cache
            .get(
                &Read::Lookup {
                    provider: "a",
                    remote: "bc"
                },
                stamp(1)
            )
            .is_none());
    }

    #[test]
    fn a_full_cache_that_is_hardly_ever_hit_admits_few_answers_and_recovers() {
        let cache = RowCache::new(64 * 1024);
        let mut user = 0;
        let mut read_new = |cache: &RowCache| {
            user += 1;
            let name = format!("user-{user}");
            let read = Read::Links { user: &name };
            if cache.get(&read, stamp(1)).is_none() {
                cache.put(&read, stamp(1), &[link(&name)]);
            }
        };
        // Every read a new key: the cache fills, then stops keeping each.
        for _ in 0..4 * WINDOW {
            read_new(&cache);
        }
        assert!(!cache.worthwhile.load(Ordering::Relaxed));
        let before = cache.admitted.load(Ordering::Relaxed);
        for _ in 0..WINDOW {
            read_new(&cache);
        }
        let admitted = cache.admitted.load(Ordering::Relaxed) - before;
        assert!(
            admitted <= WINDOW / SAMPLE_MISSES * 2,
            "{admitted} of {WINDOW} misses kept"
        );
        assert!(admitted > 0, "none kept: the cache could never recover");
        // The same few keys again and again: they hit, and all are kept.
        for round in 0..4 * WINDOW {
            let name = format!("hot-{}", round % 8);
            let read = Read::Links { user: &name };
            if cache.get(&read, stamp(1)).is_none() {
                cache.put(&read, stamp(1), &[link(&name)]);
            }
        }
        assert!(cache.worthwhile.load(Ordering::Relaxed));
        for n in 0..8 {
            let name = format!("hot-{n}");
            assert!(cache.get(&Read::Links { user: &name }, stamp(1)).is_some());
        }
    }
}
