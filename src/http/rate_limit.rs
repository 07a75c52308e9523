//! Rate limits (governor): failed authentications per client (an IPv4
//! address, an IPv6 /64, or the name a proxy gave it), and requests per
//! token. Either is off when its rate is 0.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::context::Client;
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

/// What a client's failed authentications count against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Bucket {
    V4(Ipv4Addr),
    /// The first 64 bits: one subscriber's network, whose addresses the
    /// subscriber can rotate at will.
    V6Network(u64),
    Named(Box<str>),
}

impl Bucket {
    fn of(client: &Client) -> Bucket {
        match client {
            Client::Address(ip) => match ip.to_canonical() {
                IpAddr::V4(v4) => Bucket::V4(v4),
                IpAddr::V6(v6) => Bucket::V6Network((u128::from(v6) >> 64) as u64),
            },
            Client::Named(name) => Bucket::Named(name.as_str().into()),
        }
    }
}

/// The server's rate limits.
pub struct RateLimits {
    failed_auth: Option<Limit<Bucket>>,
    /// Clients that used up their failed authentications, until when.
    blocked: quick_cache::sync::Cache<Bucket, Instant>,
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

    /// Refuses a client that has used up its failed authentications,
    /// before its token is even looked at.
    pub fn check_address(&self, client: Option<&Client>) -> Result<(), RateLimited> {
        let (Some(limit), Some(client)) = (&self.failed_auth, client) else {
            return Ok(());
        };
        match self.blocked.get(&Bucket::of(client)) {
            Some(until) if until > Instant::now() => {
                Err(limit.error(FAILED_AUTH, until - Instant::now()))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication; past the limit, the client is
    /// blocked and this request is answered 429 too.
    pub fn failed_authentication(&self, client: Option<&Client>) -> Option<RateLimited> {
        let (Some(limit), Some(client)) = (&self.failed_auth, client) else {
            return None;
        };
        let bucket = Bucket::of(client);
        let wait = limit.take(&bucket).err()?;
        self.blocked.insert(bucket, Instant::now() + wait);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(address: &str) -> Bucket {
        Bucket::of(&Client::Address(address.parse().unwrap()))
    }

    #[test]
    fn ipv6_clients_count_per_64_and_ipv4_per_address() {
        assert_eq!(
            bucket("2001:db8:1:2::1"),
            bucket("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:3::1"));
        assert_ne!(bucket("203.0.113.7"), bucket("203.0.113.8"));
        assert_eq!(bucket("::ffff:203.0.113.7"), bucket("203.0.113.7"));
        assert_eq!(
            Bucket::of(&Client::Named("unknown".into())),
            Bucket::Named("unknown".into())
        );
    }

    #[test]
    fn rotating_addresses_in_one_64_share_one_failed_authentication_budget() {
        let limits = RateLimits::new(&RateLimitConfig {
            failed_auth_per_minute: 60,
            failed_auth_burst: 2,
            per_token_per_second: 0,
            per_token_burst: 0,
            trusted_proxies: vec![],
        });
        let from = |address: &str| Client::Address(address.parse().unwrap());

        assert!(limits
            .failed_authentication(Some(&from("2001:db8::1")))
            .is_none());
        assert!(limits
            .failed_authentication(Some(&from("2001:db8::2")))
            .is_none());
        let tripped = limits.failed_authentication(Some(&from("2001:db8::3")));

        assert!(tripped.is_some());
        assert!(limits.check_address(Some(&from("2001:db8::4"))).is_err());
        assert!(limits.check_address(Some(&from("2001:db8:0:1::1"))).is_ok());
    }
}
