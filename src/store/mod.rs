//! The storage seam: one contract (`Backend`, in `backend.rs`, every
//! operation documented once), whatever the backend. `sqlite.rs` (the
//! embedded default) and `postgres.rs` (many instances on one database)
//! implement it, and they and the files under them are the only ones that
//! name their driver; everything above speaks `Store` (a handle to either),
//! `StoreError` and the domain's records. The admin work that runs beside a
//! server (seed, backup, export, import) is the free functions here.

use std::sync::Arc;

use crate::config::{ConfigError, DatabaseConfig, PostgresUrl};
use crate::domain::{IdRules, LinkRecord};

mod backend;
mod keys;
pub(crate) mod postgres;
pub(crate) mod sqlite;
pub mod transfer;

pub use backend::{Answer, Backend, Reply};

/// Ends the calling thread's open inline read transactions (SQLite keeps
/// one open between reads while nobody commits). The server's runtime calls
/// it whenever a worker thread goes idle.
pub fn end_inline_reads() {
    sqlite::end_inline_reads();
}

/// Every way a store operation can fail, in the store's own words; the HTTP
/// layer maps each to a status once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The user already has a link, to another identity.
    #[error("the user is already linked to {}", current.provider_id)]
    UserAlreadyLinked { current: Box<LinkRecord> },
    /// The remote identity is linked to another user.
    #[error("the remote identity {linked_user_id:?} at {provider_id:?} is already linked to another user")]
    IdentityAlreadyLinked {
        provider_id: String,
        linked_user_id: String,
    },
    /// The user has no link to that provider.
    #[error("user {user_id:?} has no link to provider {provider_id:?}")]
    NotFound {
        user_id: String,
        provider_id: String,
    },
    /// The database cannot be used now (unreachable, file gone, read-only);
    /// retrying later may succeed.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The events after the one asked for were pruned by retention.
    #[error("events up to {pruned_through} were pruned")]
    EventsExpired { pruned_through: i64 },
    /// The disk holding the database is full.
    #[error("the database's disk is full: {0}")]
    Full(String),
    /// Anything else: a bug or a fault worth a log line.
    #[error("a database operation failed")]
    Internal(#[source] Arc<anyhow::Error>),
}

impl From<anyhow::Error> for StoreError {
    fn from(error: anyhow::Error) -> Self {
        StoreError::Internal(Arc::new(error))
    }
}

/// What linking did.
#[derive(Debug, Clone)]
pub enum LinkOutcome {
    /// A new link was made.
    Created(LinkRecord),
    /// The user already had exactly this link; the username may have changed.
    Existing(LinkRecord),
}

/// Refuses a database whose schema is newer than this binary knows: it was
/// written by a later linkid, and this one would misread it.
pub(crate) fn refuse_newer(found: i64, supported: i64, database: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        found <= supported,
        "the database at {database} has schema version {found}, newer than this linkid's schema version {supported}: run the newer linkid that wrote it (or restore a backup made by this one)"
    );
    Ok(())
}

/// What start-up will find at the database, checked without changing it.
#[derive(Debug, Clone)]
pub struct DatabaseCheck {
    /// Whether start-up will create the SQLite file.
    pub created_at_start: bool,
    /// The pid of a server using the SQLite file now.
    pub in_use_by: Option<u32>,
}

/// Checks, changing nothing, that a server could open the configured
/// SQLite database; every problem is a configuration problem. (PostgreSQL
/// is not dialled: its URL was checked with the configuration, and an
/// unreachable server is an outage, not a configuration problem.)
pub fn check(config: &DatabaseConfig) -> Result<DatabaseCheck, ConfigError> {
    if config.postgres_url().is_some() {
        return Ok(DatabaseCheck {
            created_at_start: false,
            in_use_by: None,
        });
    }
    let created_at_start = !config.path.exists();
    match sqlite::check(&config.path) {
        Ok(in_use_by) => Ok(DatabaseCheck {
            created_at_start,
            in_use_by,
        }),
        Err(problems) => Err(ConfigError {
            problems,
            read: Vec::new(),
        }),
    }
}

/// The parsed `database.url`, when PostgreSQL is configured.
fn postgres_url(config: &DatabaseConfig) -> anyhow::Result<Option<PostgresUrl>> {
    config
        .postgres_url()
        .map(|url| {
            url.parse()
                .map_err(|why| anyhow::anyhow!("database.url is not a PostgreSQL URL: {why}"))
        })
        .transpose()
}

/// Loads `count` synthetic links (users `seed-user-N`, spread over
/// `providers`), for benchmarks and demos; returns how many were added.
pub async fn seed(
    config: &DatabaseConfig,
    rules: &IdRules,
    count: u64,
    providers: Vec<String>,
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<u64> {
    match postgres_url(config)? {
        Some(url) => postgres::admin::seed(config, rules, &url, count, &providers, progress).await,
        None => {
            let (path, rules) = (config.path.clone(), rules.clone());
            tokio::task::spawn_blocking(move || {
                sqlite::admin::seed(&path, &rules, count, &providers, progress)
            })
            .await?
        }
    }
}

/// Copies the database to a new file `destination` from one consistent
/// snapshot while servers write. `progress` gets (done, total). SQLite
/// only: PostgreSQL has pg_dump.
pub fn backup(
    config: &DatabaseConfig,
    destination: &std::path::Path,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<()> {
    if let Some(url) = postgres_url(config)? {
        anyhow::bail!(
            "the database is PostgreSQL ({url}): `linkid backup` copies a SQLite file; back PostgreSQL up with pg_dump instead, e.g. pg_dump --format=custom --file=linkid.dump \"$LINKID_DATABASE__URL\" (restore into an empty database with pg_restore)"
        );
    }
    sqlite::admin::backup(&config.path, destination, progress)
}

/// A search of all links, in `user_id` order: optional filters, the page
/// size, and the last `user_id` of the previous page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchQuery {
    pub provider_id: Option<String>,
    /// Only with `provider_id`: the login-time reverse lookup (compared by
    /// the provider's rule, see `IdRules::key`).
    pub linked_user_id: Option<String>,
    pub after_user: Option<String>,
    pub limit: u32,
}

/// One page of a search, and whether more follow it.
#[derive(Debug, Clone)]
pub struct SearchPage {
    pub links: Vec<LinkRecord>,
    pub more: bool,
}

/// Writes every link as JSON Lines, in `user_id` order, from one
/// consistent snapshot; returns how many.
pub async fn export(
    config: &DatabaseConfig,
    rules: &IdRules,
    out: Box<dyn std::io::Write + Send>,
) -> anyhow::Result<u64> {
    if let Some(url) = postgres_url(config)? {
        return postgres::admin::export(config, rules, &url, out).await;
    }
    let (path, rules) = (config.path.clone(), rules.clone());
    tokio::task::spawn_blocking(move || sqlite::admin::export(&path, &rules, out)).await?
}

/// Applies a JSON Lines file of links as one all-or-nothing transaction
/// (see `transfer`).
pub async fn import(
    config: &DatabaseConfig,
    source: transfer::Source,
    options: transfer::ImportOptions,
) -> anyhow::Result<transfer::ImportReport> {
    if let Some(url) = postgres_url(config)? {
        anyhow::ensure!(
            !options.replace,
            "replacing every link is for linkid dev's SQLite file only"
        );
        return postgres::admin::import(config, &url, source, options).await;
    }
    let path = config.path.clone();
    tokio::task::spawn_blocking(move || sqlite::admin::import(&path, source, options)).await?
}

/// Makes the links of a JSON Lines text (the export format) all there is,
/// in one transaction: every other link and every event goes, and the
/// feed starts again at 1 with the text's links. For `linkid dev`'s reset
/// (SQLite only); a bad text changes nothing and says why.
pub async fn replace_all(
    config: &DatabaseConfig,
    rules: &IdRules,
    providers: std::collections::HashSet<String>,
    links: bytes::Bytes,
) -> anyhow::Result<transfer::ImportReport> {
    let problems = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = transfer::ImportOptions {
        dry_run: false,
        providers,
        rules: rules.clone(),
        progress: Box::new(|_| {}),
        problem: {
            let problems = problems.clone();
            Box::new(move |problem| {
                let mut problems = problems.lock().unwrap_or_else(|e| e.into_inner());
                if problems.len() < 5 {
                    problems.push(problem);
                }
            })
        },
        replace: true,
        clock: config.clock,
    };
    let source: transfer::Source = Box::new(std::io::Cursor::new(links));
    let report = import(config, source, options).await?;
    let problems = problems.lock().unwrap_or_else(|e| e.into_inner());
    anyhow::ensure!(
        report.applied,
        "nothing was replaced: {}",
        problems.join("; ")
    );
    Ok(report)
}

/// A handle to the database: cheap to clone, shared by all requests. It
/// dereferences to the backend, so every operation of the contract
/// (`Backend`) is a method call on it: `store.list(&user).await`.
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl std::ops::Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// Opens the configured database (PostgreSQL when `database.url` is
    /// set, else the SQLite file), creating and upgrading its schema. The
    /// links' comparison keys follow `rules`: a provider whose rule changed
    /// since the database was last opened has its keys recomputed (or, if
    /// that would make two links one, the open fails naming them).
    pub async fn open(config: &DatabaseConfig, rules: &IdRules) -> anyhow::Result<Store> {
        Ok(match postgres_url(config)? {
            Some(url) => Store(Arc::new(
                postgres::PostgresStore::open(config, rules, &url).await?,
            )),
            None => Store(Arc::new(sqlite::SqliteStore::open(config, rules)?)),
        })
    }

    /// Opens the database for a server, which holds it until `close`: a
    /// second server on the same SQLite file refuses to start, naming the
    /// first one's pid. (CLI commands use `open`, beside a server.)
    pub async fn open_serving(config: &DatabaseConfig, rules: &IdRules) -> anyhow::Result<Store> {
        Ok(match postgres_url(config)? {
            // Any number of instances share one PostgreSQL database.
            Some(url) => Store(Arc::new(
                postgres::PostgresStore::open(config, rules, &url).await?,
            )),
            None => Store(Arc::new(sqlite::SqliteStore::open_serving(config, rules)?)),
        })
    }

    /// Opens the database if it exists, without creating a SQLite file.
    pub async fn open_existing(
        config: &DatabaseConfig,
        rules: &IdRules,
    ) -> anyhow::Result<Option<Store>> {
        if config.postgres_url().is_none() && !config.path.exists() {
            return Ok(None);
        }
        Self::open(config, rules).await.map(Some)
    }
}
