//! Configuration: built-in defaults -> TOML file -> `LINKID_SECTION__KEY` env vars.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::domain::Protocol;

mod database_url;
mod problem;
mod webhooks;

pub use database_url::{DatabaseUrl, Host, Password, PostgresUrl, SslMode};
pub use problem::{ConfigError, Origin, Problem, Sources};
pub use webhooks::{
    read_secret_file, ReceiverUrl, SigningSecret, SigningSecrets, Start, Webhook, WebhookConfig,
    WebhookDeliveryConfig, WebhookUrl,
};

/// The shipped `config.toml`, which is also the built-in defaults layer.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.toml");

/// Where the server looks for a config file when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// The config file the Debian package installs: read when none is named
/// and there is no `./config.toml`, so commands run by hand on an
/// installed host use the service's files.
pub const INSTALLED_CONFIG_PATH: &str = "/etc/linkid/config.toml";

/// The environment variable that gives `linkid conform` its token: it
/// shares the `LINKID_` prefix but is no configuration key.
pub const CONFORM_TOKEN_VARIABLE: &str = "LINKID_CONFORM_TOKEN";

/// The whole configuration, as read from every layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub rate_limit: RateLimitConfig,
    pub cors: CorsConfig,
    pub events: EventsConfig,
    #[serde(default)]
    pub identity_providers: Vec<IdentityProviderConfig>,
    /// `[[webhooks]]`: receivers the change feed is pushed to.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    pub webhook_delivery: WebhookDeliveryConfig,
    /// Where the configuration came from, for messages and the start-up log.
    #[serde(skip)]
    pub sources: Sources,
}

/// `[events]`: the change feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Days to keep events; 0 keeps them for ever.
    pub retention_days: u32,
    /// Event streams and long polls open at once; past it, 503.
    pub max_streams: u32,
    /// Seconds between heartbeat comments on an event stream.
    pub heartbeat_secs: u64,
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus text at `GET /metrics`.
    pub enabled: bool,
    /// Answer `/metrics` only to loopback clients (others get a 404).
    pub loopback_only: bool,
}

/// `[rate_limit]`; a rate of 0 turns that limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Failed authentications per client address per minute (brute force).
    pub failed_auth_per_minute: u32,
    /// Failed authentications a client address may make at once.
    pub failed_auth_burst: u32,
    /// Requests per token per second.
    pub per_token_per_second: u32,
    /// Requests a token may make at once (0: the per-second rate).
    pub per_token_burst: u32,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// `[cors]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins (`https://admin.example.com`) whose pages may call the API; empty turns CORS off.
    pub allowed_origins: Vec<String>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub addr: ListenAddr,
    /// On shutdown, how long requests in their handlers may take to finish.
    pub shutdown_timeout_secs: u64,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout_secs: u64,
    /// How long an idle keep-alive connection waits for its next request.
    pub keep_alive_timeout_secs: u64,
    /// How long a client may take to send a request's body, once its headers are in.
    pub body_timeout_secs: u64,
    /// Connections served at once (clamped below the process's file limit).
    pub max_connections: u64,
    /// How long a client may leave the server's bytes unread before its
    /// connection is closed.
    pub write_timeout_secs: u64,
    /// The most bytes of answers, over all connections, that may wait for
    /// clients to read them.
    pub max_unsent_bytes: u64,
}

/// `server.addr`: an IP address and port, or a host name and port resolved
/// once, when the configuration is read (its first IPv4 address, else its
/// first IPv6 one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    written: String,
    resolved: SocketAddr,
}

impl ListenAddr {
    /// The address to listen on.
    pub fn socket_addr(&self) -> SocketAddr {
        self.resolved
    }
}

impl std::str::FromStr for ListenAddr {
    /// `what is wrong — the fix`.
    type Err = String;

    fn from_str(text: &str) -> Result<ListenAddr, String> {
        let written = text.to_string();
        if let Ok(resolved) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr { written, resolved });
        }
        let example = |port: &str| {
            format!("use an IP address, e.g. 127.0.0.1:{port} for this machine only or 0.0.0.0:{port} for every interface")
        };
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("`{text}` has no port — {}", example("8080")));
        };
        let Ok(port_number) = port.parse::<u16>() else {
            return Err(format!(
                "`{text}` does not end in a port number (0-65535) — {}",
                example("8080")
            ));
        };
        if host.is_empty() || host.starts_with('[') {
            return Err(format!("`{text}` is not an address — {}", example(port)));
        }
        use std::net::ToSocketAddrs;
        let addrs: Vec<SocketAddr> = (host, port_number)
            .to_socket_addrs()
            .map_err(|e| {
                format!(
                    "the host name in `{text}` does not resolve ({e}) — {}",
                    example(port)
                )
            })?
            .collect();
        let resolved = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| {
                format!(
                    "the host name in `{text}` has no address — {}",
                    example(port)
                )
            })?;
        Ok(ListenAddr { written, resolved })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.written.parse::<SocketAddr>() == Ok(self.resolved) {
            write!(f, "{}", self.resolved)
        } else {
            write!(f, "{} (resolves to {})", self.written, self.resolved)
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.written)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The SQLite file, used when `url` is unset.
    pub path: PathBuf,
    /// A PostgreSQL URL: when set, everything lives in that database instead.
    #[serde(default)]
    pub url: Option<DatabaseUrl>,
    pub pool_size: u32,
    /// Group commit (SQLite, and PostgreSQL per instance): most writes in
    /// one transaction.
    pub max_batch: usize,
    /// SQLite: the most memory the row cache may use; 0 = plain reads (no
    /// row cache, no read transaction held between reads, no WAL-index
    /// peek).
    pub row_cache_bytes: u64,
    /// PostgreSQL: the longest a statement, a wait for a pooled connection
    /// or a new connection may take before the request fails with a 503.
    pub statement_timeout_secs: u64,
    /// The instant every change is stamped with instead of now: set by
    /// `linkid dev --clock`, not a configuration key.
    #[serde(skip)]
    pub clock: Option<std::time::SystemTime>,
}

impl DatabaseConfig {
    /// The PostgreSQL URL, when one is set (an empty one is unset).
    pub fn postgres_url(&self) -> Option<&DatabaseUrl> {
        self.url.as_ref().filter(|url| !url.is_empty())
    }

    /// The statement timeout, as a duration.
    pub fn statement_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.statement_timeout_secs)
    }

    /// Problems with the `[database]` keys, each naming its key.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.pool_size == 0 {
            problems.push(Problem::new(
                "database.pool_size",
                "is 0",
                "set it to 1 or more",
            ));
        }
        if self.max_batch == 0 {
            problems.push(Problem::new(
                "database.max_batch",
                "is 0",
                "set it to 1 or more",
            ));
        }
        if !(1..=3600).contains(&self.statement_timeout_secs) {
            problems.push(Problem::new(
                "database.statement_timeout_secs",
                format!("is {}", self.statement_timeout_secs),
                "set it to 1-3600 seconds (a few seconds suits most installs)",
            ));
        }
        let Some(url) = self.postgres_url() else {
            if self.path.as_os_str().is_empty() {
                problems.push(Problem::new(
                    "database.path",
                    "is empty",
                    "set it to a file path",
                ));
            }
            problems.extend(file_problems("database.path", &self.path));
            return problems;
        };
        match url.parse() {
            Err(why) => problems.push(Problem::new(
                "database.url",
                format!("is not a PostgreSQL URL: {why}"),
                "write it as e.g. postgres://linkid:PASSWORD@db.example.com:5432/linkid?sslmode=verify-full&sslrootcert=/etc/linkid/db-ca.pem",
            )),
            Ok(parsed) => {
                let verifies = matches!(parsed.ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull);
                match &parsed.ssl_root_cert {
                    None if verifies => problems.push(Problem::new(
                        "database.url",
                        format!("has sslmode={} but no sslrootcert", parsed.ssl_mode.as_str()),
                        "add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
                    )),
                    Some(file) if !file.is_file() => problems.push(Problem::new(
                        "database.url",
                        format!("sslrootcert {} is not a file", file.display()),
                        "point it at the PEM file of the CA that signed the server's certificate",
                    )),
                    Some(file) => {
                        if let Err(e) = std::fs::File::open(file) {
                            problems.push(Problem::new(
                                "database.url",
                                format!("sslrootcert {} cannot be read ({e})", file.display()),
                                "fix its permissions",
                            ));
                        }
                    }
                    None => {}
                }
            }
        }
        problems
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub private_key_file: PathBuf,
    #[serde(default)]
    pub public_key: Option<String>,
    /// Verified tokens kept in memory, at most.
    pub token_cache_size: usize,
    /// Bytes those tokens may take in memory (estimated), at most.
    pub token_cache_bytes: u64,
    /// The longest token accepted, in bytes of its base64 text.
    pub max_token_bytes: usize,
    /// The most blocks a token may have (the authority block and attenuations).
    pub max_blocks: usize,
    /// The most facts a token may hold, over all its blocks.
    pub max_facts: usize,
    /// The most rules and check queries a token may hold, over all its blocks.
    pub max_rules: usize,
}

/// The smallest `auth.token_cache_bytes`: room for a few dozen tokens.
const MIN_TOKEN_CACHE_BYTES: u64 = 1024 * 1024;

/// The smallest `server.max_unsent_bytes`: room for the largest answers.
const MIN_UNSENT_BYTES: u64 = 8 * 1024 * 1024;

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// `log.format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One `[[identity_providers]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProviderConfig {
    pub id: String,
    pub display_name: String,
    pub protocol: Protocol,
    #[serde(default = "default_linkable")]
    pub linkable: bool,
    /// Whether this provider's `linked_user_id`s are compared ignoring case
    /// (`00uABC` and `00uabc` are one remote identity); off by default.
    #[serde(default)]
    pub case_insensitive_ids: bool,
}

fn default_linkable() -> bool {
    true
}

/// The built-in defaults as a layer of their own, so that messages can name them.
struct BuiltIn;

impl figment::Provider for BuiltIn {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(problem::BUILT_IN)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(DEFAULT_CONFIG_TOML).data()
    }
}

/// The levels `log.level` takes, alone or per target (`warn,linkid=debug`).
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

impl Config {
    /// Reads the layers. `path` is the `--config` option; `LINKID_CONFIG` is
    /// its fallback, then `./config.toml` if it exists, then
    /// `/etc/linkid/config.toml` if that exists.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let named = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("LINKID_CONFIG").map(PathBuf::from));
        let mut read = vec![problem::BUILT_IN.to_string()];
        let mut figment = Figment::from(BuiltIn);
        let file = match named {
            Some(file) => {
                let file = absolute(&file);
                if !file.is_file() {
                    let problem = Problem::new(
                        "",
                        format!(
                            "the config file {} does not exist or is not a file",
                            file.display()
                        ),
                        "pass an existing file with --config or LINKID_CONFIG",
                    );
                    return Err(ConfigError {
                        read,
                        ..ConfigError::one(problem)
                    });
                }
                let how = if path.is_some() {
                    "--config"
                } else {
                    "LINKID_CONFIG"
                };
                read.push(format!("{} ({how})", file.display()));
                Some(file)
            }
            None => match unnamed_file(Path::new("."), Path::new(INSTALLED_CONFIG_PATH)) {
                Ok((file, what)) => {
                    read.push(what);
                    file
                }
                Err(problem) => {
                    return Err(ConfigError {
                        read,
                        ..ConfigError::one(problem)
                    })
                }
            },
        };
        if let Some(file) = &file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let mut variables: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| {
                name.starts_with("LINKID_")
                    && name != "LINKID_CONFIG"
                    && name != CONFORM_TOKEN_VARIABLE
            })
            .collect();
        variables.sort();
        read.extend(variables);
        let figment = figment.merge(
            Env::prefixed("LINKID_")
                .filter(|key| {
                    !key.as_str().eq_ignore_ascii_case("config")
                        && !CONFORM_TOKEN_VARIABLE
                            .strip_prefix("LINKID_")
                            .is_some_and(|name| key.as_str().eq_ignore_ascii_case(name))
                })
                .split("__"),
        );
        Self::checked(figment, read, file)
    }

    /// The built-in defaults alone, for a command that reads no config file.
    pub fn defaults() -> Result<Config, ConfigError> {
        Self::checked(
            Figment::from(BuiltIn),
            vec![problem::BUILT_IN.to_string()],
            None,
        )
    }

    /// Extracts and checks a configuration from any figment (tests use this).
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        Self::checked(figment, Vec::new(), None)
    }

    /// Reports every problem of every layer at once (see `problem::extract`).
    fn checked(
        figment: Figment,
        read: Vec<String>,
        file: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let defaults = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .find_value("")
            .expect("the built-in defaults parse");
        let extracted = problem::extract::<Config>(&figment, &defaults);
        let sources = Sources::new(read.clone(), file, extracted.origins);
        let mut problems = extracted.problems;
        if let Some(config) = &extracted.value {
            // A mended value is the default, not the user's: checking it
            // would only repeat the problem.
            let mended = &extracted.mended;
            problems.extend(config.problems().into_iter().filter(|p| {
                !mended.iter().any(|m| {
                    p.key == *m
                        || p.key.starts_with(&format!("{m}."))
                        || p.key.starts_with(&format!("{m}["))
                })
            }));
        }
        match extracted.value {
            Some(mut config) if problems.is_empty() => {
                config.sources = sources;
                // Relative paths stay relative to the working directory;
                // messages and logs show where that put them.
                if !config.database.path.as_os_str().is_empty() {
                    config.database.path = absolute(&config.database.path);
                }
                if !config.auth.private_key_file.as_os_str().is_empty() {
                    config.auth.private_key_file = absolute(&config.auth.private_key_file);
                }
                for webhook in &mut config.webhooks {
                    webhook.secret_file = absolute(&webhook.secret_file);
                }
                if let Some(file) = &mut config.webhook_delivery.ca_file {
                    *file = absolute(file);
                }
                Ok(config)
            }
            _ => Err(ConfigError { problems, read }.located(&sources)),
        }
    }

    /// The `[[webhooks]]`, checked and with their secrets read, for the
    /// delivery engine. The configuration was checked when it was read, so
    /// an error here means a secret file changed since.
    pub fn webhooks(&self) -> Result<Vec<Webhook>, ConfigError> {
        let mut parsed = Vec::new();
        let mut problems = Vec::new();
        for (i, webhook) in self.webhooks.iter().enumerate() {
            match webhook.parse(i, &self.identity_providers) {
                Ok(webhook) => parsed.push(webhook),
                Err(found) => problems.extend(found),
            }
        }
        if problems.is_empty() {
            Ok(parsed)
        } else {
            Err(ConfigError {
                problems,
                read: Vec::new(),
            }
            .located(&self.sources))
        }
    }

    /// Checks that types alone cannot express.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = self.database.problems();
        problems.extend(webhooks::problems(&self.webhooks, &self.identity_providers));
        problems.extend(self.webhook_delivery.problems());
        let one_or_more = "set it to 1 or more";
        for (key, value) in [
            (
                "server.header_read_timeout_secs",
                self.server.header_read_timeout_secs,
            ),
            (
                "server.keep_alive_timeout_secs",
                self.server.keep_alive_timeout_secs,
            ),
            ("server.body_timeout_secs", self.server.body_timeout_secs),
            ("server.max_connections", self.server.max_connections),
            ("server.write_timeout_secs", self.server.write_timeout_secs),
        ] {
            if value == 0 {
                problems.push(Problem::new(key, "is 0", one_or_more));
            }
        }
        if let Some(key) = &self.auth.public_key {
            if let Err(e) = key.parse::<biscuit_auth::PublicKey>() {
                problems.push(Problem::new(
                    "auth.public_key",
                    format!("is not a public key ({e})"),
                    "use the text form \"ed25519/<64 hex digits>\"",
                ));
            }
        }
        for (key, value) in [
            ("max_token_bytes", self.auth.max_token_bytes),
            ("max_blocks", self.auth.max_blocks),
            ("max_facts", self.auth.max_facts),
            ("max_rules", self.auth.max_rules),
        ] {
            if value == 0 {
                problems.push(Problem::new(
                    format!("auth.{key}"),
                    "is 0, which would refuse every token",
                    "set it to 1 or more (see config.toml for the default)",
                ));
            }
        }
        if self.auth.token_cache_bytes < MIN_TOKEN_CACHE_BYTES {
            problems.push(Problem::new(
                "auth.token_cache_bytes",
                format!("is {}", self.auth.token_cache_bytes),
                format!("set it to {MIN_TOKEN_CACHE_BYTES} (1 MiB) or more"),
            ));
        }
        if self.server.max_unsent_bytes < MIN_UNSENT_BYTES {
            problems.push(Problem::new(
                "server.max_unsent_bytes",
                format!("is {}", self.server.max_unsent_bytes),
                format!(
                    "set it to {MIN_UNSENT_BYTES} (8 MiB) or more: the largest answer (a page of 1000 events) can take 5 MiB"
                ),
            ));
        }
        if self.auth.public_key.is_none() && self.auth.private_key_file.as_os_str().is_empty() {
            problems.push(Problem::new(
                "auth.private_key_file",
                "is empty and auth.public_key is unset",
                "set one of them",
            ));
        }
        problems.extend(log_level_problem(&self.log.level));
        if self.events.max_streams == 0 {
            problems.push(Problem::new(
                "events.max_streams",
                "is 0",
                "set it to 1 or more (each open stream or long poll holds one)",
            ));
        }
        if !(1..=3600).contains(&self.events.heartbeat_secs) {
            problems.push(Problem::new(
                "events.heartbeat_secs",
                format!("is {}", self.events.heartbeat_secs),
                "set it between 1 and 3600 (15 is usual)",
            ));
        }
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            if !is_origin(origin) {
                problems.push(Problem::new(
                    format!("cors.allowed_origins[{i}]"),
                    format!("{origin:?} is not an origin"),
                    "use scheme://host[:port], e.g. \"https://admin.example.com\"",
                ));
            }
        }
        if !self.auth.private_key_file.as_os_str().is_empty() {
            problems.extend(file_problems(
                "auth.private_key_file",
                &self.auth.private_key_file,
            ));
        }
        let mut seen = HashSet::new();
        for (i, idp) in self.identity_providers.iter().enumerate() {
            // Requests name providers in NFC: an id in another form could
            // never be named.
            if crate::domain::ProviderId::parse(&idp.id).map_or(true, |id| id.as_str() != idp.id) {
                problems.push(Problem::new(
                    format!("identity_providers[{i}].id"),
                    format!("{:?} is not a provider id", idp.id),
                    "use 1-255 characters without control or invisible characters, in Unicode NFC",
                ));
            }
            if idp.display_name.trim().is_empty() {
                problems.push(Problem::new(
                    format!("identity_providers[{i}].display_name"),
                    "is empty",
                    "give the provider a name",
                ));
            }
            if !seen.insert(idp.id.as_str()) {
                problems.push(Problem::new(
                    format!("identity_providers[{i}].id"),
                    format!("{:?} is used twice", idp.id),
                    "provider ids must be unique",
                ));
            }
        }
        problems
    }
}

impl Config {
    /// How each configured provider compares its remote ids, for the store.
    pub fn id_rules(&self) -> crate::domain::IdRules {
        crate::domain::IdRules::ignoring_case_at(
            self.identity_providers
                .iter()
                .filter(|p| p.case_insensitive_ids)
                .map(|p| p.id.clone()),
        )
    }
}

/// `log.level`: levels, alone or per target; a word that is not a level
/// would parse as a target name and silently turn logging off.
fn log_level_problem(filter: &str) -> Option<Problem> {
    let levels = LOG_LEVELS.join(", ");
    let fix = format!("use one of {levels} (or per target, e.g. `warn,linkid=debug`)");
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Some(Problem::new("log.level", "is empty", fix));
    }
    for directive in directives {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let fix = match problem::closest(&level.to_ascii_lowercase(), &LOG_LEVELS) {
                Some(near) => format!("did you mean `{near}`? The levels are {levels}"),
                None => fix,
            };
            return Some(Problem::new(
                "log.level",
                format!("`{level}` is not a level"),
                fix,
            ));
        }
    }
    if let Err(e) = filter.parse::<tracing_subscriber::EnvFilter>() {
        return Some(Problem::new(
            "log.level",
            format!("`{filter}` is not a level filter ({e})"),
            fix,
        ));
    }
    None
}

/// `path` made absolute against the working directory (not resolving links).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The config file read when none is named — `config.toml` in `dir` (the
/// working directory), else `installed` (`/etc/linkid/config.toml`), else
/// none — and what the `read:` line says of it. An installed config this
/// user may not read is a problem, not a reason to carry on without it: the
/// command would use other files than the service.
fn unnamed_file(dir: &Path, installed: &Path) -> Result<(Option<PathBuf>, String), Problem> {
    let local = absolute(&dir.join(DEFAULT_CONFIG_PATH));
    let dir = absolute(dir);
    if local.is_file() {
        let what = local.display().to_string();
        return Ok((Some(local), what));
    }
    let readable = match std::fs::metadata(installed) {
        Ok(meta) if meta.is_file() => std::fs::File::open(installed).map(drop),
        Ok(_) => Err(std::io::ErrorKind::NotFound.into()),
        Err(e) => Err(e),
    };
    match readable {
        Ok(()) => Ok((
            Some(installed.to_path_buf()),
            format!(
                "{} (installed; no {DEFAULT_CONFIG_PATH} in {})",
                installed.display(),
                dir.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Problem::new(
            "",
            format!(
                "there is no {DEFAULT_CONFIG_PATH} in {}, and the installed config {} cannot be read ({e})",
                dir.display(),
                installed.display()
            ),
            "run the command as the linkid user (sudo -u linkid linkid ...), or name a config with --config",
        )),
        Err(_) => Ok((
            None,
            format!(
                "no config file ({DEFAULT_CONFIG_PATH} is not in {}, {} does not exist)",
                dir.display(),
                installed.display()
            ),
        )),
    }
}

/// `scheme://host[:port]` with nothing after it.
fn is_origin(text: &str) -> bool {
    let Ok(uri) = text.parse::<warp::http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http" | "https"))
        && uri.authority().is_some()
        && uri
            .path_and_query()
            .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
        && !text.ends_with('/')
}

/// Why no file can be created at `path`, if none can: its directory must
/// exist or be creatable, and take new files. Probed by creating (and
/// removing) a temporary file in the nearest directory that exists, so a
/// read-only mount or a pseudo file system such as /proc is caught too.
pub fn creation_problem(key: &str, path: &Path) -> Option<Problem> {
    let mut dir = path.parent();
    while let Some(candidate) = dir {
        let candidate = if candidate.as_os_str().is_empty() {
            Path::new(".")
        } else {
            candidate
        };
        if candidate.exists() {
            if !candidate.is_dir() {
                return Some(Problem::new(
                    key,
                    format!(
                        "{} cannot be created: {} is not a directory",
                        path.display(),
                        candidate.display()
                    ),
                    "point it at a path in a directory",
                ));
            }
            let probe = candidate.join(format!(
                ".linkid-check-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe);
            return match created {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                    None
                }
                Err(e) => Some(Problem::new(
                    key,
                    format!(
                        "{} cannot be created: no new file can be made in {} ({e})",
                        path.display(),
                        candidate.display()
                    ),
                    "point it at a directory the server's user can write",
                )),
            };
        }
        dir = candidate.parent();
    }
    None
}

/// A file the server reads or creates: if it exists it must be a readable
/// file; if not, the nearest existing directory above it must be a directory.
fn file_problems(key: &str, path: &Path) -> Vec<Problem> {
    if path.exists() {
        if !path.is_file() {
            return vec![Problem::new(
                key,
                format!("{} is not a file", path.display()),
                "point it at a file path",
            )];
        }
        if let Err(e) = std::fs::File::open(path) {
            return vec![Problem::new(
                key,
                format!("{} cannot be read ({e})", path.display()),
                "fix its permissions or ownership",
            )];
        }
        return vec![];
    }
    let mut ancestor = path.parent();
    while let Some(dir) = ancestor {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if dir.exists() {
            if !dir.is_dir() {
                return vec![Problem::new(
                    key,
                    format!(
                        "{} cannot be created: {} is not a directory",
                        path.display(),
                        dir.display()
                    ),
                    "point it at a path in a directory",
                )];
            }
            return vec![];
        }
        ancestor = dir.parent();
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_timeout_or_connection_limit_is_refused_naming_its_key() {
        for key in [
            "header_read_timeout_secs",
            "keep_alive_timeout_secs",
            "body_timeout_secs",
            "max_connections",
            "write_timeout_secs",
        ] {
            let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
                .merge((format!("server.{key}"), 0))
                .merge(("database.path", "linkid.db"));

            let error = Config::from_figment(figment).unwrap_err();

            assert!(
                error
                    .problems
                    .iter()
                    .any(|p| p.key == format!("server.{key}") && p.what == "is 0"),
                "{error}"
            );
        }
    }

    /// The shipped defaults with one key changed.
    fn with(key: &str, value: u64) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .merge(("database.path", dir.path().join("linkid.db")))
            .merge(("auth.private_key_file", dir.path().join("root.key")))
            .merge((key, value));
        Config::from_figment(figment)
    }

    #[test]
    fn the_token_caps_refuse_zero_naming_the_key() {
        for key in ["max_token_bytes", "max_blocks", "max_facts", "max_rules"] {
            let error = with(&format!("auth.{key}"), 0).unwrap_err();
            assert!(
                error
                    .problems
                    .iter()
                    .any(|p| p.key == format!("auth.{key}") && p.what.starts_with("is 0")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_token_cache_under_one_mebibyte_is_refused() {
        let error = with("auth.token_cache_bytes", 4096).unwrap_err();
        assert!(
            error.to_string().contains("auth.token_cache_bytes"),
            "{error}"
        );
        assert!(with("auth.token_cache_bytes", 1024 * 1024).is_ok());
    }

    #[test]
    fn a_token_cap_of_one_is_allowed() {
        let config = with("auth.max_blocks", 1).unwrap();
        assert_eq!(config.auth.max_blocks, 1);
    }

    fn problems_with(database: &str) -> Vec<String> {
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .merge(Toml::string(&format!("[database]\n{database}")));
        match Config::from_figment(figment) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(Problem::to_string).collect(),
        }
    }

    #[test]
    fn a_postgres_url_replaces_the_sqlite_path_and_is_checked() {
        assert!(problems_with("url = \"postgres://u:pw@db:5432/linkid\"\npath = \"\"").is_empty());
        assert!(
            problems_with("url = \"\"").is_empty(),
            "an empty url is unset"
        );

        let cases = [
            ("url = \"mysql://u:pw-7q@db/linkid\"", "database.url"),
            (
                "url = \"postgres://u:pw-7q@db/l?sslmode=verify-full\"",
                "sslrootcert",
            ),
            (
                "url = \"postgres://u:pw-7q@db/l?sslmode=verify-ca&sslrootcert=/nonexistent.pem\"",
                "/nonexistent.pem",
            ),
            (
                "statement_timeout_secs = 0",
                "database.statement_timeout_secs",
            ),
        ];
        for (database, names) in cases {
            let problems = problems_with(database).join("\n");

            assert!(problems.contains(names), "{database}: {problems}");
            assert!(!problems.contains("pw-7q"), "{database}: {problems}");
        }
    }

    #[test]
    fn a_config_toml_in_the_working_directory_comes_before_the_installed_one() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("etc-linkid-config.toml");
        std::fs::write(&installed, "").unwrap();
        std::fs::write(dir.path().join("config.toml"), "").unwrap();

        let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

        assert_eq!(file, Some(dir.path().join("config.toml")));
        assert_eq!(what, dir.path().join("config.toml").display().to_string());
    }

    #[test]
    fn without_a_config_toml_the_installed_one_is_read_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("etc-linkid-config.toml");
        std::fs::write(&installed, "").unwrap();

        let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

        assert_eq!(file, Some(installed.clone()));
        assert_eq!(
            what,
            format!(
                "{} (installed; no config.toml in {})",
                installed.display(),
                dir.path().display()
            )
        );
    }

    #[test]
    fn with_neither_file_no_config_file_is_read_and_both_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("etc-linkid-config.toml");

        let (file, what) = unnamed_file(dir.path(), &installed).unwrap();

        assert_eq!(file, None);
        assert_eq!(
            what,
            format!(
                "no config file (config.toml is not in {}, {} does not exist)",
                dir.path().display(),
                installed.display()
            )
        );
    }

    #[test]
    fn webhooks_are_read_with_their_secrets_and_shown_without_credentials() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("crm.whsec");
        std::fs::write(&secret, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML)).merge(Toml::string(&format!(
            "[[webhooks]]\nid = \"crm\"\nurl = \"https://hook:pw-7q@crm.internal/x\"\nsecret_file = {:?}\nproviders = [\"okta\"]\n",
            secret.display().to_string()
        )));

        let config = Config::from_figment(figment).unwrap();
        let webhooks = config.webhooks().unwrap();

        assert_eq!(config.webhook_delivery.timeout_secs, 10);
        assert_eq!(config.webhook_delivery.max_backoff_secs, 300);
        assert_eq!(webhooks.len(), 1);
        assert_eq!(webhooks[0].start, Start::Now);
        assert_eq!(webhooks[0].url.to_string(), "https://crm.internal/x");
        for shown in [
            format!("{config:?}"),
            format!("{webhooks:?}"),
            serde_json::to_string(&config).unwrap(),
        ] {
            assert!(!shown.contains("pw-7q"), "{shown}");
            assert!(!shown.contains("C2FV"), "{shown}");
        }
    }

    #[test]
    fn the_config_shows_its_url_without_the_password() {
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .merge(("database.url", "postgres://u:pw-7q@db/linkid"));
        let config = Config::from_figment(figment).unwrap();

        assert!(!format!("{config:?}").contains("pw-7q"));
        assert!(!serde_json::to_string(&config).unwrap().contains("pw-7q"));
        assert_eq!(
            config.database.postgres_url().unwrap().to_string(),
            "postgres://u@db:5432/linkid"
        );
    }
}
