//! One server per SQLite file. `linkid serve` holds an exclusive lock on
//! `<database>.lock` (beside the database) for as long as it serves, and
//! writes its pid there, so that a second server on the same file refuses
//! to start naming the first. CLI commands (revoke, export, import, backup)
//! never take it: they share the file with a running server through
//! SQLite's own locking.
//!
//! The lock is `flock(2)` on a file of its own: the kernel drops it when the
//! process ends however it ends, so a crash leaves no stale lock (the file
//! stays, with the old pid, and the next server takes it over). It is never
//! the database file itself, whose locks belong to SQLite.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock of one serving process on one database file.
pub(crate) struct ServingLock {
    /// Held open for the lock's life: closing it releases the lock.
    _file: File,
}

/// Where the lock for `database` lives.
pub(crate) fn path_for(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl ServingLock {
    /// Takes the lock for `database`, or says which process holds it.
    pub(crate) fn acquire(database: &Path) -> anyhow::Result<ServingLock> {
        let path = path_for(database);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the lock file {} ({e})", path.display()))?;
        // A moment's grace: `check-config` looks at the lock with a
        // shared lock of its own, briefly.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if tries < 4 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => {
                    let holder = match read_pid(&mut file) {
                        Some(pid) => format!("pid {pid}"),
                        None => "a process that has not written its pid yet".to_string(),
                    };
                    anyhow::bail!(
                        "database.path {} is in use by another linkid server ({holder}; lock file {}) — stop that server first, or give this one its own database.path",
                        database.display(),
                        path.display()
                    );
                }
                Err(TryLockError::Error(e)) => {
                    anyhow::bail!("cannot lock {} ({e})", path.display())
                }
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(ServingLock { _file: file })
    }

    /// The pid of the server serving `database` now, if one is.
    pub(crate) fn holder(database: &Path) -> Option<u32> {
        let mut file = File::open(path_for(database)).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(TryLockError::WouldBlock) => read_pid(&mut file),
            Err(TryLockError::Error(_)) => None,
        }
    }
}

/// The pid the holder wrote, waiting briefly for one that has just taken
/// the lock to write it.
fn read_pid(file: &mut File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
