//! Admin work on a SQLite database outside the request path: synthetic
//! links for benchmarks, and online backups.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection, TransactionBehavior};

use super::{migrate, now, open_writer};

/// Loads `count` synthetic links (users `seed-user-N`, spread over
/// `providers`) in large transactions, for benchmarks and demos. Existing
/// rows are kept; returns how many were added. `progress` gets the number done.
pub fn seed(
    path: &Path,
    count: u64,
    providers: &[String],
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        !providers.is_empty(),
        "no identity providers to seed links with"
    );
    let mut conn = open_writer(path)?;
    migrate(&mut conn, path)?;
    let stamp = now();
    let mut added = 0;
    let mut done = 0;
    while done < count {
        let chunk = (count - done).min(50_000);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO linked_identities \
                 (user_id, provider_id, linked_user_id, linked_username, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )?;
            for i in done..done + chunk {
                let provider = &providers[(i % providers.len() as u64) as usize];
                added += insert.execute(params![
                    format!("seed-user-{i}"),
                    provider,
                    format!("seed-remote-{i}"),
                    format!("seed-user-{i}@example.com"),
                    stamp
                ])? as u64;
            }
        }
        tx.commit()?;
        done += chunk;
        progress(done);
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(added)
}

/// Copies the database at `source` to a new file `destination` with
/// SQLite's online backup API, from one consistent snapshot, while a server
/// may be writing. `progress` gets (pages done, pages in all).
pub fn backup(
    source: &Path,
    destination: &Path,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        source.is_file(),
        "there is no database at {}",
        source.display()
    );
    anyhow::ensure!(
        !destination.exists(),
        "{} already exists: choose a new path",
        destination.display()
    );
    let src = Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("cannot open {}", source.display()))?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;
    // A read transaction pins one snapshot: writers carry on in the WAL,
    // and the copy never restarts.
    src.execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;")?;
    // The copy is written to a new, uniquely named file beside the
    // destination, readable by this user only (links are personal data),
    // and moved into place only when whole; nothing else is touched.
    let directory = destination
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let partial = tempfile::Builder::new()
        .prefix(".linkid-backup-")
        .suffix(".partial")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(directory)
        .with_context(|| format!("cannot create a file in {}", directory.display()))?;
    {
        let mut dst = Connection::open(partial.path())
            .with_context(|| format!("cannot open {}", partial.path().display()))?;
        let copy = rusqlite::backup::Backup::new(&src, &mut dst)?;
        loop {
            let more = copy.step(1024)?;
            let p = copy.progress();
            let total = p.pagecount.max(0) as u64;
            progress(total - p.remaining.max(0) as u64, total);
            match more {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => {}
                rusqlite::backup::StepResult::Busy | rusqlite::backup::StepResult::Locked => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => {}
            }
        }
        drop(copy);
        dst.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))?;
        let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        anyhow::ensure!(
            check == "ok",
            "the copy failed its integrity check: {check}"
        );
    }
    src.execute_batch("COMMIT;")?;
    partial
        .persist_noclobber(destination)
        .with_context(|| format!("cannot move the copy to {}", destination.display()))?;
    Ok(())
}
