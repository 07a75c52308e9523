//! Rate limits (governor): failed authentications per client address, and
//! requests per token. Either is off when its rate is 0.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimitConfig;

struct Limit<K: std::hash::Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    burst: u32,
    window: Duration,
}

impl<K: std::hash::Hash + Eq + Clone> Limit<K> {
    fn new(per: Duration, rate: u32, burst: u32) -> Option<Limit<K>> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        let quota = Quota::with_period(per / rate.get())?.allow_burst(burst);
        Some(Limit {
            limiter: RateLimiter::keyed(quota),
            burst: burst.get(),
            window: per,
        })
    }

    /// Takes one cell; how long to wait when none is left.
    fn take(&self, key: &K) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn error(&self, what: &'static str, wait: Duration) -> RateLimited {
        RateLimited {
            what,
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            limit: self.burst,
            window_secs: self.window.as_secs(),
        }
    }
}

/// A request refused by a limit, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// What was counted, in words: "failed authentications from this address".
    pub what: &'static str,
    /// Seconds until the next request is allowed.
    pub retry_after: u64,
    /// The requests allowed at once.
    pub limit: u32,
    pub window_secs: u64,
}

/// The server's rate limits.
pub struct RateLimits {
    failed_auth: Option<Limit<IpAddr>>,
    /// Addresses that used up their failed authentications, until when.
    blocked: quick_cache::sync::Cache<IpAddr, Instant>,
    per_token: Option<Limit<String>>,
}

const FAILED_AUTH: &str = "failed authentications from this address";
const TOKEN_REQUESTS: &str = "requests with this token";

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> RateLimits {
        RateLimits {
            failed_auth: Limit::new(
                Duration::from_secs(60),
                config.failed_auth_per_minute,
                config.failed_auth_burst,
            ),
            blocked: quick_cache::sync::Cache::new(10_000),
            per_token: Limit::new(
                Duration::from_secs(1),
                config.per_token_per_second,
                config.per_token_burst,
            ),
        }
    }

    /// Refuses an address that has used up its failed authentications,
    /// before its token is even looked at.
    pub fn check_address(&self, address: Option<IpAddr>) -> Result<(), RateLimited> {
        let (Some(limit), Some(address)) = (&self.failed_auth, address) else {
            return Ok(());
        };
        match self.blocked.get(&address) {
            Some(until) if until > Instant::now() => {
                Err(limit.error(FAILED_AUTH, until - Instant::now()))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication; past the limit, the address is
    /// blocked and this request is answered 429 too.
    pub fn failed_authentication(&self, address: Option<IpAddr>) -> Option<RateLimited> {
        let (Some(limit), Some(address)) = (&self.failed_auth, address) else {
            return None;
        };
        let wait = limit.take(&address).err()?;
        self.blocked.insert(address, Instant::now() + wait);
        Some(limit.error(FAILED_AUTH, wait))
    }

    /// Counts a request by an authenticated token.
    pub fn check_token(&self, token: &str) -> Result<(), RateLimited> {
        let Some(limit) = &self.per_token else {
            return Ok(());
        };
        if limit.limiter.len() > 100_000 {
            limit.limiter.retain_recent();
        }
        limit
            .take(&token.to_owned())
            .map_err(|wait| limit.error(TOKEN_REQUESTS, wait))
    }

    /// Forgets keys whose quota is full again; call now and then.
    pub fn forget_idle(&self) {
        for limit in self.failed_auth.iter() {
            limit.limiter.retain_recent();
        }
        for limit in self.per_token.iter() {
            limit.limiter.retain_recent();
        }
    }
}
