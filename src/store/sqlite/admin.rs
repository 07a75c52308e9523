//! Admin work on a SQLite database outside the request path: synthetic
//! links for benchmarks, and online backups.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection, TransactionBehavior};

use super::open_writer;
use super::queries::{link_of_user, now, owner_of, record_event, record_from_row, OrStore};
use super::schema::migrate;
use crate::domain::{Actor, EventType, IdRules, LinkRecord, UserId};
use crate::store::transfer::{
    run_import, write_line, Conflict, ImportOptions, ImportReport, LineOutcome, Source,
};
use crate::store::StoreError;

/// Loads `count` synthetic links (users `seed-user-N`, spread over
/// `providers`) in large transactions, for benchmarks and demos. Existing
/// rows are kept; returns how many were added. `progress` gets the number done.
pub fn seed(
    path: &Path,
    rules: &IdRules,
    count: u64,
    providers: &[String],
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        !providers.is_empty(),
        "no identity providers to seed links with"
    );
    let mut conn = open_writer(path)?;
    migrate(&mut conn, path, rules)?;
    let stamp = now();
    let mut added = 0;
    let mut done = 0;
    while done < count {
        let chunk = (count - done).min(50_000);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO linked_identities \
                 (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            )?;
            for i in done..done + chunk {
                let provider = &providers[(i % providers.len() as u64) as usize];
                let remote = format!("seed-remote-{i}");
                added += insert.execute(params![
                    format!("seed-user-{i}"),
                    provider,
                    remote,
                    rules.key(provider, &remote),
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

/// Writes every link as JSON Lines in `user_id` order from one read
/// transaction (one snapshot while servers write); returns how many.
pub fn export(
    path: &Path,
    rules: &IdRules,
    mut out: Box<dyn std::io::Write + Send>,
) -> anyhow::Result<u64> {
    anyhow::ensure!(path.is_file(), "there is no database at {}", path.display());
    let mut conn = open_writer(path)?;
    migrate(&mut conn, path, rules)?;
    let tx = conn
        .transaction()
        .context("cannot begin a read transaction")?;
    let mut stmt = tx.prepare(
        "SELECT user_id, provider_id, linked_user_id, linked_username, created_at, updated_at \
         FROM linked_identities ORDER BY user_id",
    )?;
    let mut rows = stmt.query([])?;
    let mut written = 0;
    while let Some(row) = rows.next()? {
        write_line(&mut *out, &record_from_row(row)?).context("cannot write the export")?;
        written += 1;
    }
    out.flush().context("cannot write the export")?;
    Ok(written)
}

/// Applies a JSON Lines file in one transaction, with every change's event
/// (actor `import`); commits only when no line had a problem and this is
/// not a dry run. Servers on the same file keep serving reads meanwhile;
/// their writes wait for the commit (up to their busy timeout).
pub fn import(
    path: &Path,
    source: Source,
    mut options: ImportOptions,
) -> anyhow::Result<ImportReport> {
    let mut conn = open_writer(path)?;
    migrate(&mut conn, path, &options.rules)?;
    // A server's write batch holds the lock briefly: wait for it.
    conn.busy_timeout(std::time::Duration::from_secs(60))?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("cannot lock the database for the import")?;
    if options.replace {
        // The rowid of an emptied table starts again at 1: so does the feed.
        tx.execute_batch(
            "DELETE FROM linked_identities; DELETE FROM events; \
             UPDATE feed_state SET pruned_through = 0;",
        )
        .context("cannot empty the database")?;
    }
    let stamp = crate::store::transfer::stamp(options.clock);
    let actor = Actor::import();
    let rules = options.rules.clone();
    let mut report = run_import(source, &mut options, 1024, |lines| {
        lines
            .iter()
            .map(|line| {
                let key = rules.key(&line.provider_id, &line.linked_user_id);
                Ok(import_line(&tx, line, &key, &actor, &stamp)?)
            })
            .collect()
    })?;
    if report.problems == 0 && !options.dry_run {
        tx.commit().context("cannot commit the import")?;
        report.applied = true;
    }
    Ok(report)
}

/// Applies one line; `key` is its remote id's comparison key.
fn import_line(
    conn: &Connection,
    line: &LinkRecord,
    key: &str,
    actor: &Actor,
    stamp: &str,
) -> Result<Result<LineOutcome, Conflict>, StoreError> {
    let user = UserId::parse(&line.user_id).map_err(|why| anyhow::anyhow!("user_id {why}"))?;
    if let Some((current, current_key)) = link_of_user(conn, &user)? {
        if current.provider_id != line.provider_id || current_key != key {
            return Ok(Err(Conflict::UserAlreadyLinked {
                current: Box::new(current),
            }));
        }
        if current.linked_username == line.linked_username {
            return Ok(Ok(LineOutcome::Unchanged));
        }
        conn.prepare_cached(
            "UPDATE linked_identities SET linked_username = ?2, updated_at = ?3 WHERE user_id = ?1",
        )
        .and_then(|mut s| s.execute(params![line.user_id, line.linked_username, line.updated_at]))
        .or_store("cannot update a link")?;
        // The stored remote id stays as first given (a case-insensitive
        // provider's line may spell it in another case).
        let updated = LinkRecord {
            linked_username: line.linked_username.clone(),
            updated_at: line.updated_at.clone(),
            ..current
        };
        record_event(conn, EventType::Updated, &updated, actor, stamp)?;
        return Ok(Ok(LineOutcome::Updated));
    }
    if let Some(owner) = owner_of(conn, &line.provider_id, key)? {
        return Ok(Err(Conflict::IdentityAlreadyLinked { owner }));
    }
    conn.prepare_cached(
        "INSERT INTO linked_identities \
         (user_id, provider_id, linked_user_id, linked_user_key, linked_username, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            line.user_id,
            line.provider_id,
            line.linked_user_id,
            key,
            line.linked_username,
            line.created_at,
            line.updated_at
        ])
    })
    .or_store("cannot insert a link")?;
    record_event(conn, EventType::Linked, line, actor, stamp)?;
    Ok(Ok(LineOutcome::Created))
}
