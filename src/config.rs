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

pub use database_url::{DatabaseUrl, Host, Password, PostgresUrl, SslMode};

/// The shipped `config.toml`, which is also the built-in defaults layer.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.toml");

/// Where the server looks for a config file when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

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
    pub addr: SocketAddr,
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
    /// SQLite's group commit: most writes in one transaction.
    pub max_batch: usize,
    /// PostgreSQL: the longest a statement, a wait for a pooled connection
    /// or a new connection may take before the request fails with a 503.
    pub statement_timeout_secs: u64,
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
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pool_size == 0 {
            problems.push("database.pool_size is 0: set it to 1 or more".to_string());
        }
        if self.max_batch == 0 {
            problems.push("database.max_batch is 0: set it to 1 or more".to_string());
        }
        if !(1..=3600).contains(&self.statement_timeout_secs) {
            problems.push(format!(
                "database.statement_timeout_secs is {}: set it to 1-3600 seconds (a few seconds suits most installs)",
                self.statement_timeout_secs
            ));
        }
        let Some(url) = self.postgres_url() else {
            if self.path.as_os_str().is_empty() {
                problems.push("database.path is empty: set it to a file path".to_string());
            }
            problems.extend(file_problems("database.path", &self.path));
            return problems;
        };
        match url.parse() {
            Err(why) => problems.push(format!(
                "database.url is not a PostgreSQL URL: {why} (e.g. postgres://linkid:PASSWORD@db.example.com:5432/linkid?sslmode=verify-full&sslrootcert=/etc/linkid/db-ca.pem)"
            )),
            Ok(parsed) => {
                let verifies = matches!(parsed.ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull);
                match &parsed.ssl_root_cert {
                    None if verifies => problems.push(format!(
                        "database.url has sslmode={} but no sslrootcert: add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
                        parsed.ssl_mode.as_str()
                    )),
                    Some(file) if !file.is_file() => problems.push(format!(
                        "database.url sslrootcert {} is not a file: point it at the PEM file of the CA that signed the server's certificate",
                        file.display()
                    )),
                    Some(file) => {
                        if let Err(e) = std::fs::File::open(file) {
                            problems.push(format!(
                                "database.url sslrootcert {} cannot be read ({e}): fix its permissions",
                                file.display()
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
}

fn default_linkable() -> bool {
    true
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the layers. `path` is the `--config` option; `LINKID_CONFIG` is
    /// its fallback, then `./config.toml` if it exists.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let named = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("LINKID_CONFIG").map(PathBuf::from));
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML));
        match named {
            Some(file) => {
                if !file.is_file() {
                    return Err(ConfigError {
                        problems: vec![format!(
                            "config file {} does not exist or is not a file: pass an existing file with --config or LINKID_CONFIG",
                            file.display()
                        )],
                    });
                }
                figment = figment.merge(Toml::file_exact(file));
            }
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_PATH))
            }
            None => {}
        }
        let figment = figment.merge(
            Env::prefixed("LINKID_")
                .filter(|key| !key.as_str().eq_ignore_ascii_case("config"))
                .split("__"),
        );
        Self::from_figment(figment)
    }

    /// Extracts and checks a configuration from any figment (tests use this).
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|errors| ConfigError {
            problems: errors.into_iter().map(|e| e.to_string()).collect(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Checks that types alone cannot express.
    fn problems(&self) -> Vec<String> {
        let mut problems = self.database.problems();
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
        ] {
            if value == 0 {
                problems.push(format!("{key} is 0: set it to 1 or more"));
            }
        }
        if let Some(key) = &self.auth.public_key {
            if let Err(e) = key.parse::<biscuit_auth::PublicKey>() {
                problems.push(format!(
                    "auth.public_key is not a public key ({e}): use the text form \"ed25519/<64 hex digits>\""
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
                problems.push(format!(
                    "auth.{key} is 0, which would refuse every token: set it to 1 or more (see config.toml for the default)"
                ));
            }
        }
        if self.auth.token_cache_bytes < MIN_TOKEN_CACHE_BYTES {
            problems.push(format!(
                "auth.token_cache_bytes is {}: set it to {MIN_TOKEN_CACHE_BYTES} (1 MiB) or more",
                self.auth.token_cache_bytes
            ));
        }
        if self.auth.public_key.is_none() && self.auth.private_key_file.as_os_str().is_empty() {
            problems.push(
                "auth.private_key_file is empty and auth.public_key is unset: set one of them"
                    .to_string(),
            );
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            problems.push(format!(
                "log.level {:?} is not a level filter: use error, warn, info, debug or trace",
                self.log.level
            ));
        }
        if self.events.max_streams == 0 {
            problems.push(
                "events.max_streams is 0: set it to 1 or more (each open stream or long poll holds one)"
                    .to_string(),
            );
        }
        if !(1..=3600).contains(&self.events.heartbeat_secs) {
            problems.push(format!(
                "events.heartbeat_secs is {}: set it between 1 and 3600 (15 is usual)",
                self.events.heartbeat_secs
            ));
        }
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            if !is_origin(origin) {
                problems.push(format!(
                    "cors.allowed_origins[{i}] {origin:?} is not an origin: use scheme://host[:port], e.g. \"https://admin.example.com\""
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
            if crate::domain::ProviderId::parse(&idp.id).is_err() {
                problems.push(format!(
                    "identity_providers[{i}].id {:?} must be 1-255 characters without control characters",
                    idp.id
                ));
            }
            if idp.display_name.trim().is_empty() {
                problems.push(format!(
                    "identity_providers[{i}].display_name is empty: give the provider a name"
                ));
            }
            if !seen.insert(idp.id.as_str()) {
                problems.push(format!(
                    "identity_providers[{i}].id {:?} is used twice: provider ids must be unique",
                    idp.id
                ));
            }
        }
        problems
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

/// A file the server reads or creates: if it exists it must be a readable
/// file; if not, the nearest existing directory above it must be a directory.
fn file_problems(key: &str, path: &Path) -> Vec<String> {
    if path.exists() {
        if !path.is_file() {
            return vec![format!(
                "{key} {} is not a file: point it at a file path",
                path.display()
            )];
        }
        if let Err(e) = std::fs::File::open(path) {
            return vec![format!(
                "{key} {} cannot be read ({e}): fix its permissions or ownership",
                path.display()
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
                return vec![format!(
                    "{key} {} cannot be created: {} is not a directory",
                    path.display(),
                    dir.display()
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
        ] {
            let figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
                .merge((format!("server.{key}"), 0))
                .merge(("database.path", "linkid.db"));

            let error = Config::from_figment(figment).unwrap_err();

            assert!(
                error
                    .problems
                    .iter()
                    .any(|p| p.contains(&format!("server.{key} is 0"))),
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
                    .any(|p| p.starts_with(&format!("auth.{key} is 0"))),
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
            Err(e) => e.problems,
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
