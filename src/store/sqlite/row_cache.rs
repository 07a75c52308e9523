//! An exact cache of short reads: a user's links, and the login-time
//! reverse lookup. Each answer is kept with the WAL-index header
//! (`WalStamp`) taken just before it was read, and is served only while the
//! header is still the same: a commit by anyone — this server's writer,
//! `linkid import`, a `sqlite3` shell — changes the header before it
//! returns, so a cached answer is never older than the newest commit.
//!
//! Bounded in bytes (`database.row_cache_bytes`, which counts each
//! answer's packed bytes plus its share of the table; 0 turns the cache off
//! with the rest of the fast read path, see `reads.rs`); entries made stale
//! by a commit are replaced when next read and otherwise age out. When
//! reads hardly ever hit (far more keys than fit, read at random), keeping
//! every answer only costs: then a full cache admits one answer in
//! `SAMPLE_MISSES`, enough to notice when the reads come back to keys that
//! fit.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use super::wal_stamp::WalStamp;
use crate::domain::LinkRecord;

/// Reads per look at the hit rate.
const WINDOW: u32 = 1024;
/// A full cache admits every answer while at least one read in this many
/// hits.
const WORTHWHILE: u32 = 8;
/// Otherwise it admits one miss in this many.
const SAMPLE_MISSES: u32 = 16;

/// The answer to one read, as of a header: its key and its records packed
/// in one allocation, so that reading it back touches a few neighbouring
/// cache lines rather than a dozen scattered strings.
#[derive(Clone)]
struct Entry {
    stamp: WalStamp,
    /// The key, then the records: lengths as `u32` little-endian, each
    /// followed by its bytes (see `pack`).
    packed: Arc<[u8]>,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<u64, Entry> for Weight {
    fn weight(&self, _hash: &u64, entry: &Entry) -> u64 {
        // The packed bytes, the entry in the cache's table, the Arc's counts.
        (entry.packed.len() + 96) as u64
    }
}

/// Cached short reads of one database, by the hash of their key (the key
/// itself is packed with the answer and compared on every hit).
pub(crate) struct RowCache {
    entries: quick_cache::sync::Cache<u64, Entry, Weight>,
    hasher: foldhash::fast::RandomState,
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
    Links {
        user: &'a str,
    },
    /// `remote` is the remote id's comparison key (`IdRules::key`), what
    /// the lookup's query seeks: every spelling the provider's rule equates
    /// (`00uABC`, `00uabc` where case is ignored) is one entry with one
    /// answer, and no spelling can be served another's.
    Lookup {
        provider: &'a str,
        remote: &'a str,
    },
}

impl Read<'_> {
    /// The cache key: the two kinds and the lookup's two parts never
    /// collide (the provider's length comes first).
    fn key_into(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Read::Links { user } => {
                out.push(b'u');
                out.extend_from_slice(user.as_bytes());
            }
            Read::Lookup { provider, remote } => {
                out.push(b'r');
                out.extend_from_slice(&(provider.len() as u32).to_le_bytes());
                out.extend_from_slice(provider.as_bytes());
                out.extend_from_slice(remote.as_bytes());
            }
        }
    }
}

/// Appends a length-prefixed field.
fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// A key and its records in one buffer.
fn pack(key: &[u8], links: &[LinkRecord]) -> Arc<[u8]> {
    let mut out = Vec::with_capacity(
        8 + key.len()
            + links
                .iter()
                .map(|l| {
                    24 + l.user_id.len()
                        + l.provider_id.len()
                        + l.linked_user_id.len()
                        + l.linked_username.len()
                        + l.created_at.len()
                        + l.updated_at.len()
                })
                .sum::<usize>(),
    );
    put_field(&mut out, key);
    out.extend_from_slice(&(links.len() as u32).to_le_bytes());
    for l in links {
        for field in [
            &l.user_id,
            &l.provider_id,
            &l.linked_user_id,
            &l.linked_username,
            &l.created_at,
            &l.updated_at,
        ] {
            put_field(&mut out, field.as_bytes());
        }
    }
    out.into()
}

/// Reads `pack`'s buffer back.
struct Unpack<'a>(&'a [u8]);

impl<'a> Unpack<'a> {
    fn count(&mut self) -> Option<usize> {
        let (n, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*n) as usize)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.count()?;
        let (field, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(field)
    }

    fn text(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }

    /// The records, if the buffer holds `key`'s answer.
    fn links_for(mut self, key: &[u8]) -> Option<Vec<LinkRecord>> {
        if self.bytes()? != key {
            return None;
        }
        let n = self.count()?;
        let mut links = Vec::with_capacity(n);
        for _ in 0..n {
            links.push(LinkRecord {
                user_id: self.text()?,
                provider_id: self.text()?,
                linked_user_id: self.text()?,
                linked_username: self.text()?,
                created_at: self.text()?,
                updated_at: self.text()?,
            });
        }
        Some(links)
    }
}

thread_local! {
    /// The key being looked up, built here rather than allocated per read.
    static KEY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
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
            hasher: foldhash::fast::RandomState::default(),
            reads: AtomicU32::new(0),
            hits: AtomicU32::new(0),
            worthwhile: AtomicBool::new(true),
            #[cfg(test)]
            admitted: AtomicU32::new(0),
        }
    }

    /// The answer read when the header was `now`, if kept.
    pub(crate) fn get(&self, read: &Read<'_>, now: WalStamp) -> Option<Vec<LinkRecord>> {
        let found = KEY.with(|key| {
            let mut key = key.borrow_mut();
            read.key_into(&mut key);
            let entry = self
                .entries
                .get(&std::hash::BuildHasher::hash_one(&self.hasher, &key[..]))?;
            if entry.stamp != now {
                return None;
            }
            Unpack(&entry.packed).links_for(&key)
        });
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
            let mut key = Vec::new();
            read.key_into(&mut key);
            self.entries.insert(
                std::hash::BuildHasher::hash_one(&self.hasher, &key[..]),
                Entry {
                    stamp: before,
                    packed: pack(&key, links),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `database.row_cache_bytes`'s default.
    const CAPACITY_BYTES: u64 = 4 * 1024 * 1024;

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
    fn records_come_back_from_their_packing_whole_and_only_for_their_key() {
        let mut unicode = link("ü-1");
        unicode.linked_username = "Zoë 🦀 \u{0}".into();
        let links = [link("u-1"), unicode];
        let packed = pack(b"key", &links);
        assert_eq!(Unpack(&packed).links_for(b"key").unwrap(), links);
        assert!(Unpack(&packed).links_for(b"kez").is_none());
        assert_eq!(Unpack(&pack(b"k", &[])).links_for(b"k").unwrap(), []);
        // A cut buffer reads as nothing, not as a panic.
        assert!(Unpack(&packed[..packed.len() - 1])
            .links_for(b"key")
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
