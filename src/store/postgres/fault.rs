//! How a PostgreSQL operation stops: an outcome the store reports as it is,
//! or a driver error still to be classified (`PostgresStore::settle` turns
//! it into a `StoreError`, knowing the hosts and the timeout), and the
//! driver's errors that decide a link's race.

use tokio_postgres::error::SqlState;

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
