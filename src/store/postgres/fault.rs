//! How a PostgreSQL operation stops: an outcome the store reports as it is,
//! or a driver error still to be classified (`PostgresStore::settle` turns
//! it into a `StoreError`, knowing the hosts and the timeout), and the
//! driver's errors that decide a link's race; and the store's own steps
//! around each operation: a pooled connection, the time limit, and how a
//! driver or pool error becomes a `StoreError`.

use std::time::Duration;

use deadpool_postgres::{Object, PoolError, TimeoutType};
use tokio_postgres::error::SqlState;

use super::PostgresStore;

use crate::store::StoreError;

/// A driver error in words, with its causes (which never hold the password:
/// the driver never repeats it).
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let words = cause.to_string();
        if !text.contains(&words) {
            text = format!("{text}: {words}");
        }
        source = cause.source();
    }
    text
}

/// Why an operation stopped: an outcome the store reports as it is, or a
/// driver error still to be classified.
pub(super) enum Fault {
    Store(StoreError),
    Postgres {
        error: tokio_postgres::Error,
        what: &'static str,
    },
}

impl From<StoreError> for Fault {
    fn from(error: StoreError) -> Self {
        Fault::Store(error)
    }
}

pub(super) trait OrFault<T> {
    fn or_fault(self, what: &'static str) -> Result<T, Fault>;
}

impl<T> OrFault<T> for Result<T, tokio_postgres::Error> {
    fn or_fault(self, what: &'static str) -> Result<T, Fault> {
        self.map_err(|error| Fault::Postgres { error, what })
    }
}

/// The uniqueness rules of schema.sql, by constraint name.
const LINK_RULES: [&str; 2] = ["one_link_per_user", "one_user_per_remote_identity"];

/// Whether the fault is a violation of one of the link rules: SQLSTATE
/// 23505 on one of their constraints (never judged by message text). Any
/// other unique violation is a bug.
pub(super) fn breaks_a_link_rule(fault: &Fault) -> bool {
    let Fault::Postgres { error, .. } = fault else {
        return false;
    };
    error.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION
            && db
                .constraint()
                .is_some_and(|name| LINK_RULES.contains(&name))
    })
}

/// Whether PostgreSQL chose this transaction to break a deadlock.
pub(super) fn is_deadlock(fault: &Fault) -> bool {
    matches!(fault, Fault::Postgres { error, .. }
        if error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

impl PostgresStore {
    /// A pooled connection, within the timeout.
    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// Runs `work` within the statement timeout, plus a margin for the
    /// server's own cancellation to arrive first.
    pub(super) async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Fault>>,
    ) -> Result<Result<T, Fault>, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.timeout + Duration::from_secs(1), work).await
    }

    /// Maps what `work` on `client` gave. A connection that did not answer
    /// in time, or broke, is dropped rather than handed to the next request.
    pub(super) fn settle<T>(
        &self,
        client: Object,
        outcome: Result<Result<T, Fault>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Fault::Store(error))) => Err(error),
            Ok(Err(Fault::Postgres { error, what })) => {
                if error.is_closed() || error.as_db_error().is_none() {
                    drop(Object::take(client));
                }
                Err(self.postgres_error(error, what))
            }
            Err(_) => {
                drop(Object::take(client));
                Err(StoreError::Unavailable(format!(
                    "the database at {} did not answer within {}s (database.statement_timeout_secs)",
                    self.hosts(),
                    self.timeout.as_secs()
                )))
            }
        }
    }

    /// The hosts of the URL, for messages.
    pub(super) fn hosts(&self) -> String {
        let hosts: Vec<String> = self.url.hosts().iter().map(|h| h.to_string()).collect();
        hosts.join(",")
    }

    pub(super) fn pool_error(&self, error: PoolError) -> StoreError {
        let secs = self.timeout.as_secs();
        let hosts = self.hosts();
        match error {
            PoolError::Timeout(TimeoutType::Wait) => StoreError::Unavailable(format!(
                "no database connection was free within {secs}s (database.pool_size connections are all busy)"
            )),
            PoolError::Timeout(TimeoutType::Create) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {hosts}: no answer within {secs}s"
            )),
            PoolError::Timeout(TimeoutType::Recycle) => StoreError::Unavailable(format!(
                "the connection to PostgreSQL at {hosts} did not answer within {secs}s"
            )),
            PoolError::Backend(error) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {hosts}: {}",
                describe(&error)
            )),
            PoolError::Closed => StoreError::Unavailable("the database connections are closed".into()),
            other => anyhow::anyhow!("the connection pool failed: {other}").into(),
        }
    }

    /// Turns a statement's error into the store's: an unreachable, stopping,
    /// overloaded or slow database is `Unavailable`, a full disk is `Full`.
    pub(super) fn postgres_error(
        &self,
        error: tokio_postgres::Error,
        what: &'static str,
    ) -> StoreError {
        let hosts = self.hosts();
        let Some(db) = error.as_db_error() else {
            let broken = error.is_closed()
                || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>());
            if !broken {
                // (A value the driver cannot convert: a bug, not an outage.)
                return anyhow::Error::new(error).context(what).into();
            }
            return StoreError::Unavailable(format!(
                "the connection to PostgreSQL at {hosts} was lost: {}",
                describe(&error)
            ));
        };
        let code = db.code();
        let class = &code.code()[..2];
        if *code == SqlState::QUERY_CANCELED {
            StoreError::Unavailable(format!(
                "PostgreSQL at {hosts} did not finish a statement within {}s (database.statement_timeout_secs)",
                self.timeout.as_secs()
            ))
        } else if *code == SqlState::DISK_FULL {
            StoreError::Full(format!("PostgreSQL at {hosts}: {}", db.message()))
        } else if matches!(class, "08" | "53" | "57" | "58")
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            StoreError::Unavailable(format!(
                "PostgreSQL at {hosts}: {} (SQLSTATE {})",
                db.message(),
                code.code()
            ))
        } else {
            anyhow::Error::new(error).context(what).into()
        }
    }
}
