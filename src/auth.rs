//! Biscuit bearer tokens: authentication (caps, signature, revocation,
//! expiry, a price for the datalog before it runs), the verified-token
//! cache, and authorization. The root key is in `root_key`, minting and
//! inspecting in `tokens`, the work estimate in `work`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use biscuit_auth::builder::{fact, string, Check, Policy};
use biscuit_auth::error::{FailedCheck, Logic, RunLimit, Token as TokenError};
use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits, Biscuit, PublicKey, UnverifiedBiscuit};
use tokio::sync::Semaphore;

use crate::config::AuthConfig;
pub use crate::domain::Right;

mod root_key;
mod tokens;
mod work;

pub use root_key::RootKey;
pub use tokens::{inspect, mint, revocation_ids, MintRequest};

use work::{Estimate, ServerSide, INLINE_WORK, WORK_BUDGET};

/// Why a request's token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token was presented.
    #[error("no bearer token was presented")]
    Missing,
    /// The token is malformed, forged, expired or revoked: the text says which.
    #[error("the bearer token is {0}")]
    Invalid(Cow<'static, str>),
    /// A valid token without the right for this request.
    #[error("the bearer token does not allow this operation on this resource")]
    Forbidden,
}

impl AuthError {
    fn invalid(why: &'static str) -> AuthError {
        AuthError::Invalid(Cow::Borrowed(why))
    }

    /// A token over one of the `[auth]` caps: the text names the cap.
    fn over_cap(count: usize, what: &str, key: &str, cap: usize) -> AuthError {
        AuthError::Invalid(Cow::Owned(format!(
            "too large: {count} {what}; auth.{key} is {cap}"
        )))
    }

    /// A token whose datalog could take more than the work budget.
    fn too_complex(work: u64) -> AuthError {
        let steps = if work == u64::MAX {
            "an unbounded number of".to_string()
        } else {
            work.to_string()
        };
        AuthError::Invalid(Cow::Owned(format!(
            "too complex to authorize: its rules, checks and expressions could take {steps} steps; the limit is {WORK_BUDGET}"
        )))
    }

    /// A token that hit biscuit-auth's own limits while it ran.
    fn hit_limit(limit: &RunLimit) -> AuthError {
        AuthError::Invalid(Cow::Owned(format!("too complex to authorize: {limit}")))
    }
}

/// What a request asks to do, as the authorizer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub right: Right,
    pub user: Option<&'a str>,
    pub provider: Option<&'a str>,
}

/// Revocation ids (hex) the server refuses; refreshed from the database.
pub struct RevocationList {
    ids: RwLock<HashSet<String>>,
    /// Counts the changes, so that long-lived requests re-check their
    /// token the moment a revocation arrives.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for RevocationList {
    fn default() -> Self {
        RevocationList {
            ids: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl RevocationList {
    pub fn extend(&self, ids: impl IntoIterator<Item = String>) {
        let mut set = self.ids.write().unwrap_or_else(|e| e.into_inner());
        let before = set.len();
        set.extend(ids);
        if set.len() > before {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    fn contains_any(&self, ids: &[String]) -> bool {
        let set = self.ids.read().unwrap_or_else(|e| e.into_inner());
        !set.is_empty() && ids.iter().any(|id| set.contains(id))
    }
}

/// A token whose signature checked out, ready to be authorized. Cheap to
/// clone: verified tokens are shared through the cache.
#[derive(Clone)]
pub struct Bearer(Arc<VerifiedToken>);

struct VerifiedToken {
    /// The token as sent: its key in the cache.
    text: Arc<str>,
    token: Biscuit,
    revocation_ids: Vec<String>,
    /// The authority block's `subject("…")` fact: who holds the token.
    subject: Option<String>,
    /// Its time-only checks, ready to run against `time(now)` alone; `None`
    /// when it has none (it never expires).
    expiry: Option<AuthorizerBuilder>,
    /// The most steps one authorization of it can take.
    work: u64,
    /// Roughly what it holds in memory: its weight in the cache.
    heap_bytes: u64,
    /// Set once it is in the cache, so a hit does not insert it again.
    cached: AtomicBool,
    /// Which request facts its answer can depend on.
    depends: Depends,
    /// Answers already given (see `Depends`).
    decisions: Mutex<Vec<(DecisionKey, bool)>>,
}

/// What an authorization's answer can depend on besides the operation. The
/// answer is the token's datalog run with the request's facts; when no rule
/// or check of the token mentions `user`, `provider` or `time` (its
/// time-only checks aside: `check_current` runs those on every request),
/// those facts cannot change it, and an answer once given can be given
/// again without running the datalog. Revocation is checked on every
/// request all the same.
#[derive(Debug, Clone, Copy)]
struct Depends {
    user: bool,
    provider: bool,
    time: bool,
}

/// An access, reduced to the facts a token's answer can depend on.
type DecisionKey = (Right, Option<Box<str>>, Option<Box<str>>);

/// The most answers one token keeps; past it they are forgotten.
const MAX_DECISIONS: usize = 32;

impl VerifiedToken {
    /// The memo key of an access, or `None` when the answer may change
    /// with time.
    fn decision_key(&self, access: &Access<'_>) -> Option<DecisionKey> {
        if self.depends.time {
            return None;
        }
        Some((
            access.right,
            access.user.filter(|_| self.depends.user).map(Box::from),
            access
                .provider
                .filter(|_| self.depends.provider)
                .map(Box::from),
        ))
    }

    fn decided(&self, key: &DecisionKey) -> Option<bool> {
        let decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        decisions
            .iter()
            .find(|(known, _)| known == key)
            .map(|(_, allowed)| *allowed)
    }

    fn decide(&self, key: DecisionKey, allowed: bool) {
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if decisions.len() >= MAX_DECISIONS {
            decisions.clear();
        }
        decisions.push((key, allowed));
    }
}

impl Bearer {
    /// The root token's revocation id (its first block's), shared by every
    /// attenuation of it: the key for per-token limits.
    pub fn id(&self) -> &str {
        self.0.revocation_ids.first().map_or("", String::as_str)
    }

    /// Who the token was minted for (`linkid token mint --subject`), from
    /// its authority block only: an attenuation cannot claim another name.
    pub fn subject(&self) -> Option<&str> {
        self.0.subject.as_deref()
    }

    /// A short, non-secret name for the token in logs: its last revocation id's prefix.
    pub fn log_id(&self) -> &str {
        self.0
            .revocation_ids
            .last()
            .map(|id| &id[..id.len().min(16)])
            .unwrap_or("?")
    }
}

/// What a token may hold, from `[auth]`: checked before its datalog runs.
#[derive(Debug, Clone, Copy)]
struct Caps {
    max_token_bytes: usize,
    max_blocks: usize,
    max_facts: usize,
    max_rules: usize,
}

/// Verified tokens, weighed in bytes.
type TokenCache = quick_cache::sync::Cache<Arc<str>, Bearer, TokenWeight>;

/// A cached token's weight: its estimated bytes, and at least the cache's
/// byte bound divided by its entry bound, so that both bounds hold.
#[derive(Clone)]
struct TokenWeight {
    floor: u64,
}

impl quick_cache::Weighter<Arc<str>, Bearer> for TokenWeight {
    fn weight(&self, _text: &Arc<str>, bearer: &Bearer) -> u64 {
        bearer.0.heap_bytes.max(self.floor)
    }
}

/// Verifies bearer tokens and runs the authorizer.
pub struct Authority {
    root: PublicKey,
    revoked: Arc<RevocationList>,
    caps: Caps,
    limits: AuthorizerLimits,
    /// The server's policies, ready for a token and the request's facts.
    policies: AuthorizerBuilder,
    /// What the server's authorizer adds to a token, for pricing tokens.
    server: ServerSide,
    /// Verified tokens that passed an authorization, by their text: the
    /// signature is checked once per token.
    verified: TokenCache,
    /// Authorizations running on the blocking pool: one per core, so
    /// expensive tokens cannot take every thread.
    heavy: Arc<Semaphore>,
}

/// Facts the server's authorizer provides: `operation`, `user` and
/// `provider` where the request names them, and `time`.
const REQUEST_FACTS: [&str; 4] = ["operation", "user", "provider", "time"];

/// The longest string a request fact holds: a user or provider id of 255
/// characters of up to 4 bytes.
const REQUEST_FACT_BYTES: u64 = 1024;

const POLICIES: [&str; 3] = [
    r#"allow if role("admin")"#,
    "allow if operation($op), right($op)",
    "deny if true",
];

/// Facts rules may derive in one run, beyond the token's and the server's.
const DERIVED_FACTS: usize = 1000;

/// Datalog limits for every authorizer run: the second line behind the
/// caps and the work estimate, which keep honest runs far below them.
fn limits(caps: &Caps) -> AuthorizerLimits {
    AuthorizerLimits {
        max_facts: (caps.max_facts + REQUEST_FACTS.len() + DERIVED_FACTS) as u64,
        max_iterations: 100,
        // Wall-clock time, checked only between iterations and queries: the
        // default 1 ms (and even 50 ms) trips on a loaded two-core machine
        // and would refuse valid tokens.
        max_time: Duration::from_secs(1),
    }
}

impl Authority {
    /// Reads the caps and cache bounds from `[auth]`.
    pub fn new(root: PublicKey, revoked: Arc<RevocationList>, config: &AuthConfig) -> Authority {
        let caps = Caps {
            max_token_bytes: config.max_token_bytes,
            max_blocks: config.max_blocks,
            max_facts: config.max_facts,
            max_rules: config.max_rules,
        };
        let limits = limits(&caps);
        let policies: Vec<Policy> = POLICIES
            .iter()
            .map(|p| Policy::try_from(*p).expect("the built-in policies parse"))
            .collect();
        let builder = policies
            .iter()
            .fold(AuthorizerBuilder::new(), |b, p| {
                b.policy(p.clone())
                    .expect("the built-in policies are valid")
            })
            .set_limits(limits.clone());
        let server = ServerSide {
            facts: REQUEST_FACTS.to_vec(),
            fact_string_bytes: REQUEST_FACT_BYTES,
            queries: policies.into_iter().flat_map(|p| p.queries).collect(),
            max_facts: limits.max_facts,
            max_iterations: limits.max_iterations,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Authority {
            root,
            revoked,
            caps,
            limits,
            policies: builder,
            server,
            verified: token_cache(config, cores),
            heavy: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Checks the `Authorization` header: present, well-formed, within the
    /// caps, signed by the root key, not revoked, not expired, and cheap
    /// enough to authorize.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Bearer, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthError::invalid("malformed"))?;
        let (scheme, token) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Missing);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::invalid("empty"));
        }
        let caps = &self.caps;
        if token.len() > caps.max_token_bytes {
            let bytes = token.len();
            return Err(AuthError::over_cap(
                bytes,
                "bytes",
                "max_token_bytes",
                caps.max_token_bytes,
            ));
        }
        if let Some(bearer) = self.verified.get(token) {
            crate::telemetry::token_cache_hit();
            self.check_current(&bearer)?;
            return Ok(bearer);
        }
        crate::telemetry::token_cache_miss();
        let bearer = self.verify(token)?;
        self.check_current(&bearer)?;
        if bearer.0.work > WORK_BUDGET {
            tracing::warn!(token = %bearer.log_id(), work = bearer.0.work, "refused a token too complex to authorize");
            return Err(AuthError::too_complex(bearer.0.work));
        }
        Ok(bearer)
    }

    /// Decodes a token, checks its caps and signatures, and prices it.
    fn verify(&self, text: &str) -> Result<Bearer, AuthError> {
        let caps = &self.caps;
        let unverified =
            UnverifiedBiscuit::from_base64(text).map_err(|_| AuthError::invalid("malformed"))?;
        let blocks = unverified.block_count();
        if blocks > caps.max_blocks {
            return Err(AuthError::over_cap(
                blocks,
                "blocks",
                "max_blocks",
                caps.max_blocks,
            ));
        }
        let token = unverified.verify(self.root).map_err(|e| match e {
            // Its public key is no secret, and it shows at once which key
            // file (or directory) the server and the minter each used.
            biscuit_auth::error::Format::Signature(_) => AuthError::Invalid(Cow::Owned(format!(
                "not signed by this server's root key (it trusts {})",
                self.root
            ))),
            _ => AuthError::invalid("malformed"),
        })?;
        let (facts, rules, checks, _) = token
            .authorizer()
            .map_err(|_| AuthError::invalid("malformed"))?
            .dump();
        if facts.len() > caps.max_facts {
            return Err(AuthError::over_cap(
                facts.len(),
                "facts",
                "max_facts",
                caps.max_facts,
            ));
        }
        let rule_count = rules.len() + checks.iter().map(|c| c.queries.len()).sum::<usize>();
        if rule_count > caps.max_rules {
            return Err(AuthError::over_cap(
                rule_count,
                "rules and check queries",
                "max_rules",
                caps.max_rules,
            ));
        }
        let time_only: Vec<&Check> = checks.iter().filter(|c| check_is_time_only(c)).collect();
        let estimate = Estimate::of(
            &facts,
            &rules,
            &checks,
            &time_only,
            text.len(),
            &self.server,
        );
        if estimate.expiry_work > WORK_BUDGET {
            return Err(AuthError::too_complex(estimate.expiry_work));
        }
        let expiry = if time_only.is_empty() {
            None
        } else {
            let builder = time_only
                .into_iter()
                .try_fold(AuthorizerBuilder::new(), |b, c| b.check(c.clone()))
                .and_then(|b| b.code("allow if true;"))
                .map_err(|_| AuthError::invalid("malformed"))?;
            Some(builder.set_limits(self.limits.clone()))
        };
        let mentions = |name: &str| {
            rules.iter().any(|r| r.body.iter().any(|p| p.name == name))
                || checks
                    .iter()
                    .filter(|c| !check_is_time_only(c))
                    .flat_map(|c| &c.queries)
                    .any(|q| q.body.iter().any(|p| p.name == name))
        };
        let depends = Depends {
            user: mentions("user"),
            provider: mentions("provider"),
            time: mentions("time"),
        };
        Ok(Bearer(Arc::new(VerifiedToken {
            text: Arc::from(text),
            revocation_ids: token.revocation_identifiers().iter().map(hex).collect(),
            subject: subject_of(&token),
            expiry,
            work: estimate.work,
            heap_bytes: estimate.heap_bytes,
            cached: AtomicBool::new(false),
            depends,
            decisions: Mutex::new(Vec::new()),
            token,
        })))
    }

    /// Revocation and expiry: these can change between two uses of one
    /// token. Expiry runs the token's time-only checks against `time(now)`
    /// alone, never the rest of its datalog.
    fn check_current(&self, bearer: &Bearer) -> Result<(), AuthError> {
        let bearer = &bearer.0;
        if self.revoked.contains_any(&bearer.revocation_ids) {
            return Err(AuthError::invalid("revoked"));
        }
        if let Some(expiry) = &bearer.expiry {
            let outcome = expiry
                .clone()
                .time()
                .build_unauthenticated()
                .and_then(|mut a| a.authorize());
            match outcome {
                Ok(_) => {}
                Err(TokenError::RunLimit(limit)) => return Err(AuthError::hit_limit(&limit)),
                Err(_) => return Err(AuthError::invalid("expired")),
            }
        }
        Ok(())
    }

    /// Runs the authorizer for one access: `Forbidden` unless a policy
    /// allows it. Tokens that are not trivially cheap run on the blocking
    /// pool, a bounded number at once. A token that passes enters the cache.
    pub async fn authorize(&self, bearer: &Bearer, access: Access<'_>) -> Result<(), AuthError> {
        let key = bearer.0.decision_key(&access);
        if let Some(allowed) = key.as_ref().and_then(|key| bearer.0.decided(key)) {
            return if allowed {
                Ok(())
            } else {
                Err(AuthError::Forbidden)
            };
        }
        let outcome = match self.authorizer_for(access) {
            Ok(builder) if bearer.0.work <= INLINE_WORK => run(builder, bearer),
            Ok(builder) => self.run_blocking(builder, bearer).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(_) => {
                self.remember(bearer);
                if let Some(key) = key {
                    bearer.0.decide(key, true);
                }
                Ok(())
            }
            Err(TokenError::FailedLogic(Logic::Unauthorized { checks, .. }))
                if checks.iter().any(is_time_only) =>
            {
                Err(AuthError::invalid("expired"))
            }
            Err(TokenError::RunLimit(limit)) => {
                tracing::warn!(token = %bearer.log_id(), %limit, "a token hit the authorizer's limits");
                Err(AuthError::hit_limit(&limit))
            }
            Err(_) => {
                if let Some(key) = key {
                    bearer.0.decide(key, false);
                }
                Err(AuthError::Forbidden)
            }
        }
    }

    /// Runs one authorization on the blocking pool once a permit is free.
    /// The permit goes with the work, so a client that hangs up does not
    /// free it while the work still runs.
    async fn run_blocking(
        &self,
        builder: AuthorizerBuilder,
        bearer: &Bearer,
    ) -> Result<usize, TokenError> {
        let permit = self
            .heavy
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        metrics::counter!("linkid_authorizations_offloaded_total").increment(1);
        let bearer = bearer.clone();
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            span.in_scope(|| run(builder, &bearer))
        });
        match task.await {
            Ok(outcome) => outcome,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn remember(&self, bearer: &Bearer) {
        if !bearer.0.cached.swap(true, Ordering::Relaxed) {
            self.verified.insert(bearer.0.text.clone(), bearer.clone());
        }
    }

    /// How many verified tokens the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.verified.len()
    }

    /// How many bytes the cache holds, as it weighs them.
    pub fn cached_token_bytes(&self) -> u64 {
        self.verified.weight()
    }

    /// Whether a token that was accepted earlier still is, for this access,
    /// now: not revoked, not expired, and still authorized. Streams and
    /// long polls ask it while they live.
    pub async fn recheck(&self, bearer: &Bearer, access: Access<'_>) -> Result<(), AuthError> {
        self.check_current(bearer)?;
        self.authorize(bearer, access).await
    }

    /// Changes whenever new revocations arrive (see `recheck`).
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revoked.changes.subscribe()
    }

    /// Whether the bearer may perform this access now (for `embed=ACTIONS`).
    pub async fn allows(&self, bearer: &Bearer, access: Access<'_>) -> bool {
        self.authorize(bearer, access).await.is_ok()
    }

    fn authorizer_for(&self, access: Access<'_>) -> Result<AuthorizerBuilder, TokenError> {
        let mut builder = self
            .policies
            .clone()
            .time()
            .fact(fact("operation", &[string(access.right.as_str())]))?;
        if let Some(user) = access.user {
            builder = builder.fact(fact("user", &[string(user)]))?;
        }
        if let Some(provider) = access.provider {
            builder = builder.fact(fact("provider", &[string(provider)]))?;
        }
        Ok(builder)
    }
}

fn run(builder: AuthorizerBuilder, bearer: &Bearer) -> Result<usize, TokenError> {
    builder
        .build(&bearer.0.token)
        .and_then(|mut a| a.authorize())
}

/// The token cache: `auth.token_cache_bytes` by weight, split in shards
/// that each hold at least one token of the largest size.
fn token_cache(config: &AuthConfig, cores: usize) -> TokenCache {
    let entries = config.token_cache_size.max(1);
    let bytes = config.token_cache_bytes.max(1);
    let largest = 6 * 1024 + 64 * config.max_token_bytes as u64;
    let shards = (bytes / largest).clamp(1, 4 * cores as u64) as usize;
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(entries)
        .weight_capacity(bytes)
        .shards(shards)
        .build()
        .expect("the cache options are complete");
    quick_cache::sync::Cache::with_options(
        options,
        TokenWeight {
            floor: bytes / entries as u64,
        },
        Default::default(),
        Default::default(),
    )
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A check that looks only at `time` is an expiry (or not-before) bound:
/// failing it makes the token invalid, not merely short of a right.
fn is_time_only(failed: &FailedCheck) -> bool {
    let rule = match failed {
        FailedCheck::Block(b) => &b.rule,
        FailedCheck::Authorizer(a) => &a.rule,
    };
    Check::try_from(rule.as_str()).is_ok_and(|check| check_is_time_only(&check))
}

fn check_is_time_only(check: &Check) -> bool {
    !check.queries.is_empty()
        && check
            .queries
            .iter()
            .all(|query| !query.body.is_empty() && query.body.iter().all(|p| p.name == "time"))
}

/// The authority block's one `subject("…")` fact, if it has exactly one.
fn subject_of(token: &Biscuit) -> Option<String> {
    let source = token.print_block_source(0).ok()?;
    let block = biscuit_auth::BlockBuilder::new().code(source).ok()?;
    let mut subjects = block.facts.iter().filter_map(|fact| {
        let predicate = &fact.predicate;
        match predicate.terms.as_slice() {
            [biscuit_auth::builder::Term::Str(name)] if predicate.name == "subject" => {
                Some(name.clone())
            }
            _ => None,
        }
    });
    let subject = subjects.next()?;
    subjects.next().is_none().then_some(subject)
}
