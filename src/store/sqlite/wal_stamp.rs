//! Whether anyone committed to the database since a moment, without a
//! lock: the header of SQLite's WAL index (the `-shm` file every connection
//! to a WAL database maps), which every commit, from any process, rewrites
//! before it returns.
//!
//! The WAL index is SQLite's protocol between the processes that share a
//! database, so its layout holds across SQLite versions
//! (<https://sqlite.org/walformat.html>, "The WAL-Index Header"): two copies
//! of a 48-byte header at offset 0 and 48. A commit writes the second copy,
//! then the first; a reader that finds them equal has a whole header. The
//! header holds a transaction counter, the WAL's last frame, its salts and
//! checksums, so two moments with equal headers have no commit between
//! them. Nothing here interprets it beyond its version field: headers are
//! compared as bytes.
//!
//! While this process has the database open, no other process re-creates
//! or truncates the `-shm` file (SQLite does that only when it is the
//! file's only user), so the mapping stays valid.
//!
//! Only the fast read path uses it (see `reads.rs`). Where it cannot be had
//! — no `-shm` file (not WAL mode), one too short, an unknown version, a
//! failed mapping — `WalIndex::open` answers `None` and the store reads on
//! the plain path, each read in a transaction of its own; while a commit is
//! rewriting the header, `stamp` answers `None` and that one read does the
//! same. `database.row_cache_bytes = 0` never maps it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

/// A WAL-index header: equal stamps mean no commit in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalStamp([u32; HEADER_WORDS]);

#[cfg(test)]
impl WalStamp {
    /// A stamp made up for tests of what compares stamps.
    pub(crate) fn made_up(n: u32) -> WalStamp {
        WalStamp([n; HEADER_WORDS])
    }
}

const HEADER_WORDS: usize = 12;
const HEADER_BYTES: usize = HEADER_WORDS * 4;
/// `iVersion` of every WAL index since SQLite 3.7.0.
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// A read-only mapping of a database's WAL-index header.
pub(crate) struct WalIndex {
    header: NonNull<u32>,
    len: usize,
    /// Kept open for the mapping's life (not needed by it, but it names
    /// what is mapped when debugging with `/proc/PID/maps`).
    _file: File,
}

// SAFETY: the mapping is read-only shared memory, read with volatile loads
// only; nothing here hands out references into it.
unsafe impl Send for WalIndex {}
unsafe impl Sync for WalIndex {}

impl WalIndex {
    /// Maps the WAL index of the database at `path`, which a connection of
    /// this process has open in WAL mode. `None` when there is none (the
    /// database is not in WAL mode) or it has an unknown version: then
    /// every read begins its own transaction, as SQLite would.
    pub(crate) fn open(path: &Path) -> Option<WalIndex> {
        let mut name = path.as_os_str().to_owned();
        name.push("-shm");
        let file = File::open(name).ok()?;
        if file.metadata().ok()?.len() < 2 * HEADER_BYTES as u64 {
            return None;
        }
        let len = 2 * HEADER_BYTES;
        // SAFETY: a fresh read-only shared mapping of an open file, at
        // least `len` bytes long; checked for failure below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return None;
        }
        let index = WalIndex {
            header: NonNull::new(at.cast::<u32>())?,
            len,
            _file: file,
        };
        index
            .stamp()
            .filter(|stamp| stamp.0[0] == WAL_INDEX_VERSION)
            .map(|_| index)
    }

    /// The header now, or `None` while a commit is rewriting it (the two
    /// copies differ): then the caller must assume a commit.
    pub(crate) fn stamp(&self) -> Option<WalStamp> {
        let read = |copy: usize| {
            let mut words = [0u32; HEADER_WORDS];
            for (i, word) in words.iter_mut().enumerate() {
                // SAFETY: within the mapping (two headers of HEADER_WORDS
                // words); volatile because another process writes it.
                *word = unsafe {
                    self.header
                        .as_ptr()
                        .add(copy * HEADER_WORDS + i)
                        .read_volatile()
                };
            }
            words
        };
        let first = read(0);
        // The first copy is written last: read it first, then the second.
        fence(Ordering::Acquire);
        let second = read(1);
        fence(Ordering::Acquire);
        (first == second).then_some(WalStamp(first))
    }
}

impl Drop for WalIndex {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe {
            libc::munmap(self.header.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn every_commit_from_any_connection_changes_the_stamp_and_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let ours = Connection::open(&path).unwrap();
        ours.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let index = WalIndex::open(&path).expect("a WAL index");
        let before = index.stamp().unwrap();
        let _: i64 = ours
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(index.stamp().unwrap(), before, "a read is no commit");

        // Another connection, as another process would.
        let other = Connection::open(&path).unwrap();
        other.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let after_insert = index.stamp().unwrap();
        assert_ne!(after_insert, before);

        // A checkpoint that restarts the WAL, then a commit: still new.
        other
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t VALUES (2);")
            .unwrap();
        let after_restart = index.stamp().unwrap();
        assert_ne!(after_restart, after_insert);
        assert_ne!(after_restart, before);
    }

    #[test]
    fn a_database_not_in_wal_mode_has_no_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
        assert!(WalIndex::open(&path).is_none());
    }
}
