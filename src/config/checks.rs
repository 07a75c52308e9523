//! What types alone cannot say: the checks of every key, each naming it.

use std::collections::HashSet;
use std::path::Path;

use super::problem;
use super::{webhooks, Config, DatabaseConfig, Problem, SslMode};

/// The smallest `auth.token_cache_bytes`: room for a few dozen tokens.
const MIN_TOKEN_CACHE_BYTES: u64 = 1024 * 1024;

/// The smallest `server.max_unsent_bytes`: room for the largest answers.
const MIN_UNSENT_BYTES: u64 = 8 * 1024 * 1024;

/// The levels `log.level` takes, alone or per target (`warn,linkid=debug`).
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

impl DatabaseConfig {
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

impl Config {
    /// Checks that types alone cannot express.
    pub(super) fn problems(&self) -> Vec<Problem> {
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
