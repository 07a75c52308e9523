//! When the next attempt is due, and what each outcome makes of a
//! webhook's standing — pure functions, so that every transition is tested
//! without a clock or a network.
//!
//! After the n-th failed attempt at an event, the next waits
//! `first · 2^(n-1)`, at most `max` (`webhook_delivery.max_backoff_secs`),
//! jittered down to as little as half of that so that webhooks failing
//! together do not retry together; a receiver's `Retry-After` can only
//! lengthen the wait, never past `max`.

use std::time::{Duration, SystemTime};

use super::deliver::{Attempt, Outcome};
use crate::domain::{WebhookStanding, WebhookState};

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure (before jitter).
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed attempts (1 or more), with
    /// `jitter` in [0, 1] taking off up to half of it.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let doubling = failures.saturating_sub(1).min(31);
        let full = self
            .first
            .checked_mul(1 << doubling)
            .unwrap_or(self.max)
            .min(self.max);
        full.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// The wait after `failures` failed attempts, with a random jitter.
    pub fn next(&self, failures: u32) -> Duration {
        self.delay(failures, rand::random::<f64>())
    }
}

/// The standing after an attempt at event `seq`, made when every event up
/// to `cursor` had been delivered or skipped; a retry waits by `backoff`
/// with `jitter` (see `Backoff::delay`).
pub fn after_attempt(
    standing: &WebhookStanding,
    (cursor, seq): (i64, i64),
    attempt: &Attempt,
    now: SystemTime,
    (backoff, jitter): (&Backoff, f64),
) -> WebhookStanding {
    let attempted = WebhookStanding {
        last_attempt_at: Some(now),
        last_status: attempt.status,
        last_error: attempt.detail.clone(),
        next_attempt_at: None,
        ..standing.clone()
    };
    match attempt.outcome {
        Outcome::Delivered => WebhookStanding {
            state: WebhookState::Active,
            delivered_seq: seq,
            attempts: 0,
            ..attempted
        },
        // It resumes with this event when enabled.
        Outcome::Gone => WebhookStanding {
            state: WebhookState::Disabled,
            delivered_seq: cursor,
            attempts: standing.attempts + 1,
            ..attempted
        },
        Outcome::Rejected
        | Outcome::Redirected
        | Outcome::Timeout
        | Outcome::Unreachable
        | Outcome::Failed => {
            let attempts = standing.attempts + 1;
            let mut delay = backoff.delay(attempts, jitter);
            if let Some(asked) = attempt.retry_after {
                delay = delay.max(asked.min(backoff.max));
            }
            WebhookStanding {
                state: WebhookState::Retrying,
                delivered_seq: cursor,
                attempts,
                next_attempt_at: Some(now + delay),
                ..attempted
            }
        }
    }
}

/// The standing once retention pruned the event it waits on (every event
/// through `pruned_through`) before it was delivered.
pub fn expired(standing: &WebhookStanding, pruned_through: i64) -> WebhookStanding {
    WebhookStanding {
        state: WebhookState::Expired,
        next_attempt_at: None,
        last_error: Some(format!(
            "events {}-{pruned_through} were pruned by retention before they were delivered; `linkid webhooks replay {} --after {pruned_through}` resumes with the oldest event kept",
            standing.delivered_seq + 1,
            standing.webhook
        )),
        ..standing.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(300),
    };

    fn attempt(outcome: Outcome, status: Option<u16>) -> Attempt {
        Attempt {
            outcome,
            status,
            detail: (outcome != Outcome::Delivered).then(|| "why".to_string()),
            retry_after: None,
        }
    }

    fn retrying(attempts: u32) -> WebhookStanding {
        WebhookStanding {
            state: WebhookState::Retrying,
            attempts,
            ..WebhookStanding::new("crm", 4)
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    const NO_JITTER: (&Backoff, f64) = (&BACKOFF, 0.0);

    #[test]
    fn the_wait_doubles_from_one_second_up_to_the_cap() {
        let waits: Vec<u64> = (1..=11).map(|n| BACKOFF.delay(n, 0.0).as_secs()).collect();

        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(BACKOFF.delay(u32::MAX, 0.0), BACKOFF.max);
        assert_eq!(BACKOFF.delay(0, 0.0), BACKOFF.first);
    }

    #[test]
    fn jitter_takes_off_at_most_half_and_random_waits_stay_in_bounds() {
        assert_eq!(BACKOFF.delay(3, 1.0), Duration::from_secs(2));
        for failures in 1..40 {
            let full = BACKOFF.delay(failures, 0.0);
            let waits: Vec<Duration> = (0..50).map(|_| BACKOFF.next(failures)).collect();

            assert!(
                waits.iter().all(|w| *w <= full && *w >= full / 2),
                "{waits:?}"
            );
            assert!(waits.iter().any(|w| *w != waits[0]), "jittered: {waits:?}");
        }
    }

    #[test]
    fn a_2xx_delivers_the_event_and_clears_the_failures() {
        let after = after_attempt(
            &retrying(3),
            (4, 5),
            &attempt(Outcome::Delivered, Some(200)),
            NOW,
            NO_JITTER,
        );

        assert_eq!(after.state, WebhookState::Active);
        assert_eq!(after.delivered_seq, 5);
        assert_eq!(after.attempts, 0);
        assert_eq!(after.last_status, Some(200));
        assert_eq!(after.last_error, None);
        assert_eq!(after.next_attempt_at, None);
    }

    #[test]
    fn a_500_a_redirect_a_timeout_or_a_refusal_retries_the_same_event_later() {
        for (outcome, status) in [
            (Outcome::Rejected, Some(500)),
            (Outcome::Redirected, Some(302)),
            (Outcome::Timeout, None),
            (Outcome::Unreachable, None),
            (Outcome::Failed, None),
        ] {
            let after = after_attempt(
                &retrying(2),
                (4, 5),
                &attempt(outcome, status),
                NOW,
                NO_JITTER,
            );

            assert_eq!(after.state, WebhookState::Retrying, "{outcome:?}");
            assert_eq!(after.delivered_seq, 4, "{outcome:?}");
            assert_eq!(after.attempts, 3, "{outcome:?}");
            assert_eq!(after.last_status, status);
            assert_eq!(after.last_error.as_deref(), Some("why"));
            assert_eq!(after.next_attempt_at, Some(NOW + Duration::from_secs(4)));
        }
    }

    #[test]
    fn events_skipped_before_a_failure_count_as_delivered() {
        let after = after_attempt(
            &WebhookStanding::new("crm", 4),
            (9, 10),
            &attempt(Outcome::Rejected, Some(500)),
            NOW,
            NO_JITTER,
        );

        assert_eq!(after.delivered_seq, 9);
        assert_eq!(after.attempts, 1);
    }

    #[test]
    fn retry_after_lengthens_the_wait_up_to_the_cap_and_never_shortens_it() {
        let asked = |seconds| Attempt {
            retry_after: Some(Duration::from_secs(seconds)),
            ..attempt(Outcome::Rejected, Some(503))
        };
        let wait = |seconds| {
            let after = after_attempt(&retrying(3), (4, 5), &asked(seconds), NOW, NO_JITTER);
            after
                .next_attempt_at
                .unwrap()
                .duration_since(NOW)
                .unwrap()
                .as_secs()
        };

        assert_eq!(wait(60), 60);
        assert_eq!(wait(1), 8);
        assert_eq!(wait(86_400), 300);
    }

    #[test]
    fn a_410_disables_the_webhook_before_the_event_that_got_it() {
        let after = after_attempt(
            &retrying(1),
            (4, 5),
            &attempt(Outcome::Gone, Some(410)),
            NOW,
            NO_JITTER,
        );

        assert_eq!(after.state, WebhookState::Disabled);
        assert_eq!(after.delivered_seq, 4);
        assert_eq!(after.next_attempt_at, None);
        assert_eq!(after.last_status, Some(410));
    }

    #[test]
    fn an_expired_webhook_says_which_events_were_lost_and_how_to_resume() {
        let after = expired(&retrying(7), 20);

        assert_eq!(after.state, WebhookState::Expired);
        assert_eq!(after.delivered_seq, 4);
        assert_eq!(after.next_attempt_at, None);
        let error = after.last_error.unwrap();
        assert!(error.contains("events 5-20"), "{error}");
        assert!(
            error.contains("linkid webhooks replay crm --after 20"),
            "{error}"
        );
    }
}
