//! The budget of unsent answers: the bytes of answers made and not yet
//! taken by their clients' sockets, over all connections. The app counts
//! an answer in before sending it (and refuses one over 16 KiB that would
//! pass the limit: 503 `SERVER_BUSY`); each connection's socket counts the
//! bytes out as it takes them; a closed connection gives back what it held.
//! Big answers are sent in separately allocated chunks (see `answer`), so
//! what is counted is what is held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Answers up to this size are always sent, whatever the budget holds: a
/// client that does not read can hold one of them per connection at most,
/// and the small reads a login needs never wait on the big pages.
pub(crate) const SMALL_ANSWER_BYTES: usize = 16 * 1024;

/// The bytes of answers made but not yet taken by their clients' sockets,
/// over all connections, and the most there may be.
#[derive(Debug)]
pub(crate) struct Unsent {
    limit: usize,
    held: AtomicUsize,
}

impl Unsent {
    pub(crate) fn new(limit: usize) -> Unsent {
        Unsent {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Counts `bytes` in, unless they are more than `SMALL_ANSWER_BYTES`
    /// and would pass the limit; says whether they were.
    fn take(&self, bytes: usize) -> bool {
        if bytes <= SMALL_ANSWER_BYTES {
            self.held.fetch_add(bytes, Ordering::Relaxed);
            return true;
        }
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held.saturating_add(bytes) <= self.limit).then_some(held + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether no answer over `SMALL_ANSWER_BYTES` fits now.
    pub(crate) fn is_full(&self) -> bool {
        self.held() + SMALL_ANSWER_BYTES >= self.limit
    }

    /// The bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One connection's account with the [`Unsent`] budget, shared by the
/// connection (whose socket counts bytes out) and its requests' heads
/// (whose answers are counted in).
#[derive(Debug)]
pub(crate) struct UnsentAccount {
    budget: Arc<Unsent>,
    /// This connection's answer bytes counted in `budget` and not yet
    /// taken by its socket.
    held: AtomicUsize,
}

impl UnsentAccount {
    pub(crate) fn new(budget: Arc<Unsent>) -> UnsentAccount {
        UnsentAccount {
            budget,
            held: AtomicUsize::new(0),
        }
    }

    /// Counts an answer of `bytes` in; false when the budget has no room
    /// for it (it is larger than `SMALL_ANSWER_BYTES` and would pass it).
    pub(crate) fn take(&self, bytes: usize) -> bool {
        let taken = self.budget.take(bytes);
        if taken {
            self.held.fetch_add(bytes, Ordering::Relaxed);
        }
        taken
    }

    /// The socket took `written` bytes: the answer bytes among them leave
    /// the budget.
    pub(crate) fn sent(&self, written: usize) {
        let held = self.held.load(Ordering::Relaxed);
        if held > 0 && written > 0 {
            let sent = held.min(written);
            self.held.fetch_sub(sent, Ordering::Relaxed);
            self.budget.give_back(sent);
        }
    }

    /// The bytes held over all connections now.
    pub(crate) fn held_everywhere(&self) -> usize {
        self.budget.held()
    }
}

impl Drop for UnsentAccount {
    /// A closed connection's unsent answers are gone: out of the budget.
    fn drop(&mut self) {
        self.budget.give_back(*self.held.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_answers_always_count_in_and_big_ones_only_within_the_limit() {
        let budget = Arc::new(Unsent::new(100_000));
        let account = UnsentAccount::new(budget.clone());

        assert!(account.take(60_000));
        assert!(!account.take(50_000), "past the limit");
        assert!(
            account.take(SMALL_ANSWER_BYTES),
            "small, whatever the budget"
        );
        assert_eq!(budget.held(), 60_000 + SMALL_ANSWER_BYTES);

        account.sent(10_000);
        assert_eq!(budget.held(), 50_000 + SMALL_ANSWER_BYTES);
        drop(account);
        assert_eq!(budget.held(), 0, "a closed connection gives back the rest");
    }
}
