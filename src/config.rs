//! Configuration: built-in defaults -> TOML file -> `LINKID_SECTION__KEY` env vars.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::domain::Protocol;

mod checks;
mod database_url;
mod load;
mod problem;
mod webhooks;

#[cfg(test)]
mod tests;

pub use checks::creation_problem;
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
