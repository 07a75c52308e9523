//! `database.url`: a PostgreSQL connection URL, read as libpq reads one
//! (`postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=FILE`).
//!
//! `tokio_postgres::Config` parses the URL: user, password, hosts, ports,
//! database and the parameters it knows. This module adds only what it
//! lacks: libpq's `verify-ca` and `verify-full` with `sslrootcert` (checked
//! by `store::postgres::tls`), a `port` parameter for the hosts that name
//! none, the list of parameters linkid understands, and types whose `Debug`,
//! `Display` and `Serialize` leave the password out, so printing a config, a
//! store description or an error can never show it.

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize, Serializer};
use tokio_postgres::config::TargetSessionAttrs;

/// The port PostgreSQL listens on when the URL names none.
pub const DEFAULT_PORT: u16 = 5432;

/// The query parameters linkid understands; any other is refused by name.
const PARAMETERS: [&str; 10] = [
    "sslmode",
    "sslrootcert",
    "application_name",
    "target_session_attrs",
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "connect_timeout",
];

/// `database.url` as configured. Its `Debug`, `Display` and `Serialize`
/// never include the password.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(text: impl Into<String>) -> DatabaseUrl {
        DatabaseUrl(text.into())
    }

    /// Unset: an empty value (e.g. `LINKID_DATABASE__URL=`) keeps SQLite.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// The URL's parts; the error says what is wrong without quoting the URL.
    pub fn parse(&self) -> Result<PostgresUrl, String> {
        PostgresUrl::parse(self.0.trim())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parse() {
            Ok(url) => url.fmt(f),
            Err(_) => f.write_str("(an invalid PostgreSQL URL)"),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.to_string())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A password whose `Debug` hides it, for users of `linkid::config`.
/// (linkid's own connection takes the password from the parsed
/// `tokio_postgres::Config`, whose `Debug` hides it too.)
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// The password itself, for a connection's authentication only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// How the connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it, without checking its certificate (libpq's default).
    Prefer,
    /// Always; the certificate's chain is checked only against `sslrootcert` when given.
    Require,
    /// Always, with the chain checked against `sslrootcert`.
    VerifyCa,
    /// Always, with the chain checked against `sslrootcert` and the host name against the certificate.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err("sslmode=allow is not supported: use disable, prefer, require, verify-ca or verify-full".into()),
            other => Err(format!(
                "sslmode={other:?} is not a mode: use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The mode tokio-postgres knows: `verify-*` are `require` plus the
    /// certificate check that the TLS connector makes.
    fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }
}

/// One server to try: a host name, an IP address or (starting with `/`) a
/// unix socket directory, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub port: u16,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.port)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

/// A parsed `database.url`.
#[derive(Clone)]
pub struct PostgresUrl {
    /// Everything but the certificate check, as tokio-postgres reads it
    /// (its `Debug` hides the password); the store adds its own settings.
    pub connection: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    /// The CA certificate(s) (PEM) that the server's certificate must chain to.
    pub ssl_root_cert: Option<PathBuf>,
}

impl PostgresUrl {
    /// Parses `postgres[ql]://[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`.
    ///
    /// Beyond tokio-postgres, as linkid always has: the scheme's case does
    /// not matter; an unencoded `@` belongs to the password unless it is
    /// the authority's last; `host=` replaces the URL's hosts; `port=` is
    /// the port of the hosts that name none.
    pub fn parse(text: &str) -> Result<PostgresUrl, String> {
        let rest = ["postgresql://", "postgres://"]
            .iter()
            .find_map(|scheme| {
                text.get(..scheme.len())
                    .filter(|s| s.eq_ignore_ascii_case(scheme))
                    .map(|_| &text[scheme.len()..])
            })
            .ok_or("it must start with postgres:// (postgres://user:password@host:port/dbname)")?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        let (userinfo, mut hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };

        let (mut ssl_mode, mut ssl_root_cert, mut port) = (SslMode::Prefer, None, None);
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "the parameter {:?} has no value (write key=value)",
                    clip(pair)
                )
            })?;
            match decode(key, "a parameter name")?.as_str() {
                "sslmode" => ssl_mode = SslMode::parse(&decode(value, "the parameter sslmode")?)?,
                "sslrootcert" => {
                    ssl_root_cert = Some(PathBuf::from(decode(value, "the parameter sslrootcert")?))
                }
                "host" => hosts = value,
                "port" => port = Some(value),
                known if PARAMETERS.contains(&known) => passed.push(escape(pair)),
                unknown => {
                    return Err(format!(
                        "the parameter {:?} is not one linkid understands: use {}",
                        clip(unknown),
                        PARAMETERS.join(", ")
                    ))
                }
            }
        }
        // (No hosts at all is not one empty host.)
        let hosts = Some(hosts).filter(|h| !h.is_empty()).into_iter();
        let hosts = hosts
            .flat_map(|h| h.split(','))
            .map(|host| {
                if host.starts_with('[') && !host.contains(']') {
                    return Err("an IPv6 host lacks its closing ]");
                }
                let names_port = host.rsplit_once(']').map_or(host, |(_, p)| p).contains(':');
                Ok(match port {
                    Some(port) if !names_port => format!("{host}:{port}"),
                    _ => host.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // tokio-postgres splits at the first `@`, `/` and `?`, and decodes
        // every part: it is handed each of them but the authority's `@`
        // encoded.
        let userinfo = userinfo.map_or(String::new(), |u| escape(u) + "@");
        let path = path.map_or(String::new(), |p| "/".to_owned() + &escape(p));
        let url = format!(
            "postgres://{userinfo}{}{path}?{}",
            escape(&hosts.join(",")),
            passed.join("&")
        );
        let mut connection: tokio_postgres::Config = url.parse().map_err(|e| driver_error(&e))?;
        connection.ssl_mode(ssl_mode.driver_mode());
        let url = PostgresUrl {
            connection,
            ssl_mode,
            ssl_root_cert,
        };

        let hosts = url.hosts();
        if hosts.is_empty() {
            return Err("it names no host: write postgres://user:password@host:port/dbname".into());
        }
        if hosts.iter().any(|h| h.name.is_empty()) {
            return Err("a host is empty: write host[:port], separated by commas".into());
        }
        if hosts.iter().any(|h| h.port == 0) {
            return Err("the port \"0\" is not a port number (1-65535)".into());
        }
        if url.connection.get_target_session_attrs() == TargetSessionAttrs::ReadOnly {
            return Err(
                "target_session_attrs=\"read-only\" is not supported: use read-write or any".into(),
            );
        }
        Ok(url)
    }

    /// The servers to try, in order (at least one), each with its port.
    pub fn hosts(&self) -> Vec<Host> {
        let ports = self.connection.get_ports();
        self.connection
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| Host {
                name: match host {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                },
                // (tokio-postgres' own rule: a lone port is every host's.)
                port: ports
                    .get(i)
                    .or(ports.first())
                    .copied()
                    .unwrap_or(DEFAULT_PORT),
            })
            .collect()
    }

    /// The role, when the URL names one.
    pub fn user(&self) -> Option<&str> {
        self.connection.get_user().filter(|u| !u.is_empty())
    }

    /// The database, when the URL names one.
    pub fn dbname(&self) -> Option<&str> {
        self.connection.get_dbname().filter(|d| !d.is_empty())
    }
}

impl fmt::Display for PostgresUrl {
    /// The URL without its password, for people (logs, `/readyz`, `check-config`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PART: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        const PATH: &percent_encoding::AsciiSet = &PART.remove(b'/');
        let encode = |text: &str| percent_encoding::utf8_percent_encode(text, PART).to_string();
        f.write_str("postgres://")?;
        if let Some(user) = self.user() {
            write!(f, "{}@", encode(user))?;
        }
        let hosts: Vec<String> = self
            .hosts()
            .iter()
            .map(|h| {
                if h.name.starts_with('/') {
                    format!("{}:{}", encode(&h.name), h.port)
                } else {
                    h.to_string()
                }
            })
            .collect();
        f.write_str(&hosts.join(","))?;
        if let Some(dbname) = self.dbname() {
            write!(f, "/{}", encode(dbname))?;
        }
        let mut params = Vec::new();
        if self.ssl_mode != SslMode::Prefer {
            params.push(format!("sslmode={}", self.ssl_mode.as_str()));
        }
        if let Some(root) = &self.ssl_root_cert {
            // (A path reads better with its slashes.)
            let path = percent_encoding::utf8_percent_encode(&root.display().to_string(), PATH)
                .to_string();
            params.push(format!("sslrootcert={path}"));
        }
        if self.connection.get_target_session_attrs() == TargetSessionAttrs::ReadWrite {
            params.push("target_session_attrs=read-write".into());
        }
        if !params.is_empty() {
            write!(f, "?{}", params.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({:?})", self.to_string())
    }
}

/// `text` with each `@`, `/` and `?` percent-encoded, so that tokio-postgres
/// does not split at them.
fn escape(text: &str) -> String {
    text.replace('@', "%40")
        .replace('/', "%2F")
        .replace('?', "%3F")
}

/// tokio-postgres' reason (e.g. "invalid value for option `port`"), which
/// names the part that is wrong and never quotes it.
fn driver_error(error: &tokio_postgres::Error) -> String {
    std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string)
}

/// Percent-decodes one part; `what` names it in the error.
fn decode(text: &str, what: &str) -> Result<String, String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

/// A bit of the URL quoted back, cut short.
fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_url_gives_every_part() {
        let url = PostgresUrl::parse(
            "postgres://linkid:s%40cr%2Fet@db.example.com:6543/links?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=a",
        )
        .unwrap();

        assert_eq!(url.user(), Some("linkid"));
        assert_eq!(url.connection.get_password(), Some(&b"s@cr/et"[..]));
        assert_eq!(
            url.hosts(),
            [Host {
                name: "db.example.com".into(),
                port: 6543
            }]
        );
        assert_eq!(url.dbname(), Some("links"));
        assert_eq!(url.ssl_mode, SslMode::VerifyFull);
        assert_eq!(url.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(url.connection.get_application_name(), Some("a"));
    }

    #[test]
    fn defaults_are_libpqs() {
        let url = PostgresUrl::parse("postgresql://h").unwrap();

        assert_eq!(url.hosts()[0].port, DEFAULT_PORT);
        assert_eq!(url.ssl_mode, SslMode::Prefer);
        assert!(
            url.user().is_none()
                && url.connection.get_password().is_none()
                && url.dbname().is_none()
        );
    }

    #[test]
    fn several_hosts_ipv6_and_a_socket_directory_parse() {
        let url = PostgresUrl::parse("postgres://u@a:1,[::1]:2,b/d?port=7").unwrap();
        let socket = PostgresUrl::parse("postgres:///d?host=%2Fvar%2Frun%2Fpostgresql").unwrap();

        let hosts: Vec<String> = url.hosts().iter().map(Host::to_string).collect();
        assert_eq!(hosts, ["a:1", "[::1]:2", "b:7"]);
        assert_eq!(socket.hosts()[0].name, "/var/run/postgresql");
    }

    #[test]
    fn a_host_parameter_replaces_the_urls_hosts_and_may_be_a_plain_path() {
        let url = PostgresUrl::parse("postgres://u@a:1/d?host=/run/pg,b&port=6").unwrap();

        assert_eq!(
            url.hosts(),
            [
                Host {
                    name: "/run/pg".into(),
                    port: 6
                },
                Host {
                    name: "b".into(),
                    port: 6
                }
            ]
        );
    }

    #[test]
    fn an_unencoded_at_sign_belongs_to_the_password_or_the_parameter_it_is_in() {
        let url =
            PostgresUrl::parse("POSTGRES://u:p@ss@h/d@b?application_name=a@b&user=v").unwrap();

        assert_eq!(url.connection.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(url.hosts()[0].name, "h");
        assert_eq!(url.dbname(), Some("d@b"));
        assert_eq!(url.connection.get_application_name(), Some("a@b"));
        assert_eq!(url.user(), Some("v"));
    }

    #[test]
    fn target_session_attrs_read_write_is_kept_and_shown() {
        let url =
            PostgresUrl::parse("postgres://db1:5432,db2:5432/l?target_session_attrs=read-write")
                .unwrap();

        assert_eq!(
            url.connection.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            url.to_string(),
            "postgres://db1:5432,db2:5432/l?target_session_attrs=read-write"
        );
    }

    #[test]
    fn the_ssl_mode_reaches_the_driver_as_one_it_knows() {
        let mode = |text: &str| {
            PostgresUrl::parse(&format!("postgres://h?sslmode={text}"))
                .unwrap()
                .connection
                .get_ssl_mode()
        };
        use tokio_postgres::config::SslMode as Driver;

        assert_eq!(mode("disable"), Driver::Disable);
        assert_eq!(mode("prefer"), Driver::Prefer);
        for verifies in ["require", "verify-ca", "verify-full"] {
            assert_eq!(mode(verifies), Driver::Require, "{verifies}");
        }
    }

    #[test]
    fn display_debug_and_serialize_leave_the_password_out() {
        let text = "postgres://linkid:hunter2-secret@127.0.0.1:5433/db?password=other-secret&sslmode=require";
        let url = DatabaseUrl::new(text);

        let shown = [
            url.to_string(),
            format!("{url:?}"),
            format!("{:?}", url.parse().unwrap()),
            format!("{:?}", url.parse().unwrap().connection),
            serde_json::to_string(&url).unwrap(),
        ];

        for shown in shown {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("other-secret"), "{shown}");
        }
        assert_eq!(
            url.to_string(),
            "postgres://linkid@127.0.0.1:5433/db?sslmode=require"
        );
    }

    #[test]
    fn errors_name_the_problem_and_never_quote_the_password() {
        let cases = [
            ("mysql://u:pw-secret@h/d", "postgres://"),
            ("postgres://u:pw-secret@h:99999/d", "port"),
            ("postgres://u:pw-secret@h:0/d", "port"),
            ("postgres://u:pw-secret@h/d?port=x", "port"),
            ("postgres://u:pw-secret@h/d?sslmode=allow", "allow"),
            ("postgres://u:pw-secret@h/d?sslmode=bogus", "sslmode"),
            ("postgres://u:pw-secret@h/d?sslcert=x", "sslcert"),
            (
                "postgres://u:pw-secret@h/d?connect_timeout=x",
                "connect_timeout",
            ),
            (
                "postgres://u:pw-secret@h/d?target_session_attrs=read-only",
                "target_session_attrs",
            ),
            ("postgres://u:pw-secret@/d", "no host"),
            ("postgres://u:pw-secret@a,,b/d", "empty"),
            ("postgres://u:pw-secret@[::1/d", "]"),
            ("postgres://u:pw-secret@[::1]x/d", "host"),
            ("postgres://u%FF:pw-secret@h/d", "utf-8"),
            ("postgres://u:pw-secret@h/d?password", "no value"),
        ];
        for (text, names) in cases {
            let error = PostgresUrl::parse(text).unwrap_err();

            assert!(error.to_lowercase().contains(names), "{text}: {error}");
            assert!(!error.contains("pw-secret"), "{text}: {error}");
            assert!(!error.contains("secret"), "{text}: {error}");
        }
        assert_eq!(
            DatabaseUrl::new("postgres://u:pw-secret@h:x/d").to_string(),
            "(an invalid PostgreSQL URL)"
        );
    }

    #[test]
    fn an_empty_url_is_unset() {
        assert!(DatabaseUrl::new(" ").is_empty());
        assert!(!DatabaseUrl::new("postgres://h").is_empty());
    }
}
