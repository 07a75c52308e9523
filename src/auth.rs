//! Biscuit bearer tokens: the root key, authentication, authorization, minting.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use biscuit_auth::builder::{fact, string, Check};
use biscuit_auth::builder_ext::BuilderExt;
use biscuit_auth::error::{FailedCheck, Logic, Token as TokenError};
use biscuit_auth::{
    AuthorizerBuilder, AuthorizerLimits, Biscuit, BlockBuilder, KeyPair, PublicKey,
};

use crate::config::{AuthConfig, ConfigError, Problem};
pub use crate::domain::Right;

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
}

/// What a request asks to do, as the authorizer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub right: Right,
    pub user: Option<&'a str>,
    pub provider: Option<&'a str>,
}

/// The root key: the public half always, the private half where we hold it.
pub struct RootKey {
    pub public: PublicKey,
    pub keypair: Option<KeyPair>,
    /// Set when this call generated the key file.
    pub generated: Option<PathBuf>,
}

impl RootKey {
    /// Reads the configured key without creating anything: `None` when
    /// neither `auth.public_key` nor the key file exists yet. A key file
    /// that cannot be used is a configuration problem, every reason named.
    pub fn load(config: &AuthConfig) -> Result<Option<RootKey>, ConfigError> {
        let path = &config.private_key_file;
        let configured_public = config
            .public_key
            .as_deref()
            .map(|text| {
                text.parse::<PublicKey>().map_err(|e| {
                    ConfigError::one(Problem::new(
                        "auth.public_key",
                        format!("is not a public key ({e})"),
                        "use the text form \"ed25519/<64 hex digits>\"",
                    ))
                })
            })
            .transpose()?;
        let keypair = if !path.as_os_str().is_empty() && path.exists() {
            Some(read_key_file(path).map_err(ConfigError::one)?)
        } else {
            None
        };
        Ok(match (configured_public, keypair) {
            (Some(public), keypair) => Some(RootKey {
                public,
                keypair,
                generated: None,
            }),
            (None, Some(keypair)) => Some(RootKey {
                public: keypair.public(),
                keypair: Some(keypair),
                generated: None,
            }),
            (None, None) => None,
        })
    }

    /// Loads the key from the config, generating the key file on first use
    /// when neither `auth.public_key` nor the key file exists. Processes
    /// that start together agree: the first key put in place is everyone's.
    pub fn load_or_create(config: &AuthConfig) -> anyhow::Result<RootKey> {
        if let Some(key) = Self::load(config)? {
            return Ok(key);
        }
        let path = &config.private_key_file;
        let placed = write_key_file(path, &KeyPair::new())?;
        let key = Self::load(config)?.with_context(|| {
            format!(
                "auth.private_key_file {} vanished as it was created",
                path.display()
            )
        })?;
        Ok(RootKey {
            generated: placed.then(|| path.clone()),
            ..key
        })
    }

    /// The key pair, or why tokens cannot be minted here.
    pub fn signing_key(&self) -> anyhow::Result<&KeyPair> {
        self.keypair.as_ref().context(
            "no private key: auth.public_key is set and auth.private_key_file does not exist, \
             so tokens must be minted where the private key is",
        )
    }
}

/// Reads a key file, or says what is wrong with it.
fn read_key_file(path: &Path) -> Result<KeyPair, Problem> {
    const KEY: &str = "auth.private_key_file";
    let shown = path.display();
    let unreadable = |e: std::io::Error| {
        Problem::new(
            KEY,
            format!("{shown} cannot be read ({e})"),
            "let the server's user read it (chown, or chmod 600 as its owner)",
        )
    };
    let mode = fs::metadata(path).map_err(unreadable)?.permissions().mode();
    let bytes = fs::read(path).map_err(unreadable)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    // The prefixed form is what we write; bare hex is what other tools print.
    let private = text.parse::<biscuit_auth::PrivateKey>().or_else(|_| {
        biscuit_auth::PrivateKey::from_bytes_hex(text, biscuit_auth::builder::Algorithm::Ed25519)
    });
    let Ok(private) = private else {
        // Not a key at all: its mode is beside the point (no `chmod` advice
        // for /etc/passwd).
        return Err(Problem::new(
            KEY,
            format!("{shown} holds no private key"),
            "point it at linkid's key file (\"ed25519-private/<hex>\" or 64 hex digits), or at a path where none exists yet to generate one",
        ));
    };
    // As ssh does: a private key others can read is refused, not used.
    if mode & 0o077 != 0 {
        return Err(Problem::new(
            KEY,
            format!(
                "{shown} is readable by group or others (mode {:o})",
                mode & 0o777
            ),
            format!("run `chmod 600 {shown}`"),
        ));
    }
    Ok(KeyPair::from(&private))
}

/// Puts a new key file in place atomically: written in full to a temporary
/// file beside it, then linked to `path` only if nothing is there. Returns
/// whether this key was placed (false: another process's came first).
fn write_key_file(path: &Path, keypair: &KeyPair) -> Result<bool, ConfigError> {
    let cannot = |e: &dyn std::fmt::Display| {
        ConfigError::one(Problem::new(
            "auth.private_key_file",
            format!("{} cannot be created ({e})", path.display()),
            "point it at a path in a directory the server's user can write, or set auth.public_key",
        ))
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| cannot(&e))?;
    // tempfile creates it with mode 0600.
    let mut file = tempfile::Builder::new()
        .prefix(".root.key.")
        .tempfile_in(dir)
        .map_err(|e| cannot(&e))?;
    let text = keypair.private().to_prefixed_string();
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| cannot(&e))?;
    let placed = match file.persist_noclobber(path) {
        Ok(_) => true,
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(cannot(&e.error)),
    };
    // The new name must survive a crash as the key's contents do.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(placed)
}

/// Revocation ids (hex) the server refuses; refreshed from the database.
#[derive(Default)]
pub struct RevocationList {
    ids: RwLock<HashSet<String>>,
}

impl RevocationList {
    pub fn extend(&self, ids: impl IntoIterator<Item = String>) {
        let mut set = self.ids.write().unwrap_or_else(|e| e.into_inner());
        set.extend(ids);
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
    token: Biscuit,
    revocation_ids: Vec<String>,
    has_time_checks: bool,
    /// The authority block's `subject("…")` fact: who holds the token.
    subject: Option<String>,
}

impl Bearer {
    /// This token's own revocation id (its last block's): the key for
    /// per-token limits.
    pub fn id(&self) -> &str {
        self.0.revocation_ids.last().map_or("", String::as_str)
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

/// Verifies bearer tokens and runs the authorizer.
pub struct Authority {
    root: PublicKey,
    revoked: Arc<RevocationList>,
    policies: AuthorizerBuilder,
    /// Checks expiry alone: no request facts, allows everything else.
    validity: AuthorizerBuilder,
    /// Verified tokens by their text: the signature is checked once per token.
    verified: quick_cache::sync::Cache<String, Bearer>,
}

/// Datalog limits for every authorizer run.
fn limits() -> AuthorizerLimits {
    AuthorizerLimits {
        max_facts: 1000,
        max_iterations: 100,
        // Wall-clock time: the default 1 ms (and even 50 ms) trips on a
        // loaded two-core machine and would refuse valid tokens. The fact
        // and iteration limits bound the work.
        max_time: Duration::from_secs(2),
    }
}

const POLICIES: &str = r#"
    allow if role("admin");
    allow if operation($op), right($op);
    deny if true;
"#;

impl Authority {
    /// `cache_size` bounds how many verified tokens are kept.
    pub fn new(root: PublicKey, revoked: Arc<RevocationList>, cache_size: usize) -> Authority {
        let policies = AuthorizerBuilder::new()
            .code(POLICIES)
            .expect("the built-in policies parse")
            .set_limits(limits());
        let validity = AuthorizerBuilder::new()
            .code("allow if true;")
            .expect("the validity policy parses")
            .set_limits(limits());
        Authority {
            root,
            revoked,
            policies,
            validity,
            verified: quick_cache::sync::Cache::new(cache_size.max(1)),
        }
    }

    /// Checks the `Authorization` header: present, well-formed, signed by the
    /// root key, not revoked, not expired.
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
        if let Some(bearer) = self.verified.get(token) {
            metrics::counter!("linkid_token_cache_hits_total").increment(1);
            self.check_current(&bearer)?;
            return Ok(bearer);
        }
        metrics::counter!("linkid_token_cache_misses_total").increment(1);
        let text = token;
        let token = Biscuit::from_base64(text, self.root).map_err(|e| match e {
            // Its public key is no secret, and it shows at once which key
            // file (or directory) the server and the minter each used.
            TokenError::Format(biscuit_auth::error::Format::Signature(_)) => {
                AuthError::Invalid(Cow::Owned(format!(
                    "not signed by this server's root key (it trusts {})",
                    self.root
                )))
            }
            _ => AuthError::invalid("malformed"),
        })?;
        let bearer = Bearer(Arc::new(VerifiedToken {
            revocation_ids: token.revocation_identifiers().iter().map(hex).collect(),
            has_time_checks: has_time_only_checks(&token),
            subject: subject_of(&token),
            token,
        }));
        self.check_current(&bearer)?;
        self.verified.insert(text.to_owned(), bearer.clone());
        Ok(bearer)
    }

    /// Revocation and expiry: these can change between two uses of one token.
    fn check_current(&self, bearer: &Bearer) -> Result<(), AuthError> {
        let bearer = &bearer.0;
        if self.revoked.contains_any(&bearer.revocation_ids) {
            return Err(AuthError::invalid("revoked"));
        }
        if bearer.has_time_checks {
            let outcome = self
                .validity
                .clone()
                .time()
                .build(&bearer.token)
                .and_then(|mut a| a.authorize());
            if let Err(TokenError::FailedLogic(Logic::Unauthorized { checks, .. })) = &outcome {
                if checks.iter().any(is_time_only) {
                    return Err(AuthError::invalid("expired"));
                }
            }
        }
        Ok(())
    }

    /// Runs the authorizer for one access: `Forbidden` unless a policy allows it.
    pub fn authorize(&self, bearer: &Bearer, access: Access<'_>) -> Result<(), AuthError> {
        let outcome = self
            .authorizer_for(access)
            .and_then(|b| b.build(&bearer.0.token))
            .and_then(|mut a| a.authorize());
        match outcome {
            Ok(_) => Ok(()),
            Err(TokenError::FailedLogic(Logic::Unauthorized { checks, .. }))
                if checks.iter().any(is_time_only) =>
            {
                Err(AuthError::invalid("expired"))
            }
            Err(TokenError::RunLimit(limit)) => {
                tracing::warn!(token = %bearer.log_id(), %limit, "a token hit the authorizer's limits");
                Err(AuthError::Forbidden)
            }
            Err(_) => Err(AuthError::Forbidden),
        }
    }

    /// How many verified tokens the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.verified.len()
    }

    /// Whether the bearer may perform this access now (for `embed=ACTIONS`).
    pub fn allows(&self, bearer: &Bearer, access: Access<'_>) -> bool {
        self.authorize(bearer, access).is_ok()
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

fn has_time_only_checks(token: &Biscuit) -> bool {
    (0..token.block_count()).any(|i| {
        token
            .print_block_source(i)
            .ok()
            .and_then(|source| BlockBuilder::new().code(source).ok())
            .is_some_and(|block| block.checks.iter().any(check_is_time_only))
    })
}

/// The authority block's one `subject("…")` fact, if it has exactly one.
fn subject_of(token: &Biscuit) -> Option<String> {
    let source = token.print_block_source(0).ok()?;
    let block = BlockBuilder::new().code(source).ok()?;
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

/// What `linkid token mint` puts in a new token.
#[derive(Debug, Default, Clone)]
pub struct MintRequest {
    pub admin: bool,
    pub rights: Vec<Right>,
    pub user: Option<String>,
    pub ttl: Option<Duration>,
    /// Who the token is for: an authority fact `subject("…")`, which the
    /// change feed reports.
    pub subject: Option<String>,
}

/// Mints a token signed by the root key.
pub fn mint(keypair: &KeyPair, request: &MintRequest) -> anyhow::Result<String> {
    if !request.admin && request.rights.is_empty() {
        bail!("a token needs --admin or at least one --right");
    }
    let mut builder = Biscuit::builder();
    if request.admin {
        builder = builder.fact(fact("role", &[string("admin")]))?;
    }
    for right in &request.rights {
        builder = builder.fact(fact("right", &[string(right.as_str())]))?;
    }
    if let Some(subject) = &request.subject {
        crate::domain::check_text(subject).map_err(|why| anyhow::anyhow!("--subject {why}"))?;
        builder = builder.fact(fact("subject", &[string(subject)]))?;
    }
    if let Some(user) = &request.user {
        crate::domain::UserId::parse(user).map_err(|why| anyhow::anyhow!("--user {why}"))?;
        // Listing the providers names no user, and a user's own token needs it.
        builder = builder.code_with_params(
            r#"check if user({user}) or operation("identity_providers:list");"#,
            HashMap::from([("user".to_string(), string(user))]),
            HashMap::new(),
        )?;
    }
    if let Some(ttl) = request.ttl {
        builder = builder.check_expiration_date(SystemTime::now() + ttl);
    }
    Ok(builder.build(keypair)?.to_base64()?)
}

/// A token's revocation ids (hex), verified against the root key.
pub fn revocation_ids(root: PublicKey, token: &str) -> anyhow::Result<Vec<String>> {
    let token = Biscuit::from_base64(token.trim(), root)
        .context("the token is malformed or not signed by this root key")?;
    Ok(token.revocation_identifiers().iter().map(hex).collect())
}

/// A readable description of a token: its blocks and revocation ids.
pub fn inspect(root: PublicKey, token: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let token = token.trim();
    let (verified, blocks, ids) = match Biscuit::from_base64(token, root) {
        Ok(t) => {
            let blocks: Vec<String> = (0..t.block_count())
                .map(|i| t.print_block_source(i).unwrap_or_default())
                .collect();
            (true, blocks, t.revocation_identifiers())
        }
        Err(_) => {
            let t = biscuit_auth::UnverifiedBiscuit::from_base64(token)
                .context("the token is not a biscuit")?;
            let blocks: Vec<String> = (0..t.block_count())
                .map(|i| t.print_block_source(i).unwrap_or_default())
                .collect();
            (false, blocks, t.revocation_identifiers())
        }
    };
    let mut out = String::new();
    writeln!(
        out,
        "signature: {}",
        if verified {
            "valid for this server's root key"
        } else {
            "NOT valid for this server's root key"
        }
    )?;
    for (i, (source, id)) in blocks.iter().zip(&ids).enumerate() {
        writeln!(out, "block {i}:")?;
        writeln!(out, "  revocation id: {}", hex(id))?;
        for line in source.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "  {}", line.trim())?;
        }
    }
    Ok(out)
}
