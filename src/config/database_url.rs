//! `database.url`: a PostgreSQL connection URL, read as libpq reads one
//! (`postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=FILE`).
//!
//! The URL holds a password, so the text is kept in a type whose `Debug`,
//! `Display` and `Serialize` leave the password out: printing a config, a
//! store description or an error can never show it. Parsing is pure and
//! names no driver; the PostgreSQL store builds its connection from the
//! parts.

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize, Serializer};

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

/// A password: shown nowhere, handed only to the connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// The password itself, for the connection's authentication only.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    /// Tried in order until one accepts the connection (at least one).
    pub hosts: Vec<Host>,
    /// The role; PostgreSQL's default is the operating-system user.
    pub user: Option<String>,
    pub password: Option<Password>,
    /// The database; PostgreSQL's default is the role's name.
    pub dbname: Option<String>,
    pub ssl_mode: SslMode,
    /// The CA certificate(s) (PEM) that the server's certificate must chain to.
    pub ssl_root_cert: Option<PathBuf>,
    pub application_name: Option<String>,
    /// `target_session_attrs=read-write`: skip hosts that are read-only standbys.
    pub read_write_only: bool,
    /// Seconds to wait for a connection (libpq's `connect_timeout`); 0 or
    /// unset: `database.statement_timeout_secs`.
    pub connect_timeout_secs: Option<u64>,
}

impl PostgresUrl {
    /// Parses `postgres[ql]://[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`.
    pub fn parse(text: &str) -> Result<PostgresUrl, String> {
        let rest = ["postgresql://", "postgres://"]
            .iter()
            .find_map(|scheme| {
                text.get(..scheme.len())
                    .filter(|s| s.eq_ignore_ascii_case(scheme))
                    .map(|_| &text[scheme.len()..])
            })
            .ok_or("it must start with postgres:// (postgres://user:password@host:port/dbname)")?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        let (userinfo, hostspec) = match authority.rsplit_once('@') {
            Some((userinfo, hostspec)) => (Some(userinfo), hostspec),
            None => (None, authority),
        };

        let mut url = PostgresUrl {
            hosts: Vec::new(),
            user: None,
            password: None,
            dbname: None,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            application_name: None,
            read_write_only: false,
            connect_timeout_secs: None,
        };
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            url.user = Some(decode(user, "the user name")?).filter(|u| !u.is_empty());
            if let Some(password) = password {
                // The password's own text never goes into a message.
                let password = decode(password, "the password")?;
                url.password = Some(Password(password));
            }
        }
        let mut hosts = parse_hosts(hostspec)?;
        if let Some(path) = path {
            url.dbname = Some(decode(path, "the database name")?).filter(|d| !d.is_empty());
        }

        let mut port_param = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "the parameter {:?} has no value (write key=value)",
                    clip(pair)
                )
            })?;
            let key = decode(key, "a parameter name")?;
            if !PARAMETERS.contains(&key.as_str()) {
                return Err(format!(
                    "the parameter {:?} is not one linkid understands: use {}",
                    clip(&key),
                    PARAMETERS.join(", ")
                ));
            }
            if key == "password" {
                url.password = Some(Password(decode(value, "the password")?));
                continue;
            }
            let value = decode(value, &format!("the parameter {key}"))?;
            match key.as_str() {
                "sslmode" => url.ssl_mode = SslMode::parse(&value)?,
                "sslrootcert" => url.ssl_root_cert = Some(PathBuf::from(value)),
                "application_name" => url.application_name = Some(value),
                "target_session_attrs" => {
                    url.read_write_only = match value.as_str() {
                        "read-write" => true,
                        "any" => false,
                        other => {
                            return Err(format!(
                                "target_session_attrs={:?} is not supported: use read-write or any",
                                clip(other)
                            ))
                        }
                    }
                }
                "host" => hosts = parse_hosts(&value)?,
                "port" => port_param = Some(parse_port(&value)?),
                "user" => url.user = Some(value).filter(|u| !u.is_empty()),
                "dbname" => url.dbname = Some(value).filter(|d| !d.is_empty()),
                "connect_timeout" => {
                    url.connect_timeout_secs = Some(value.parse().map_err(|_| {
                        format!(
                            "connect_timeout={:?} is not a number of seconds",
                            clip(&value)
                        )
                    })?)
                    .filter(|&s| s > 0)
                }
                _ => unreachable!("every known parameter is handled"),
            }
        }
        if hosts.is_empty() {
            return Err("it names no host: write postgres://user:password@host:port/dbname".into());
        }
        url.hosts = hosts
            .into_iter()
            .map(|(name, port)| Host {
                name,
                port: port.or(port_param).unwrap_or(DEFAULT_PORT),
            })
            .collect();
        Ok(url)
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
        if let Some(user) = &self.user {
            write!(f, "{}@", encode(user))?;
        }
        let hosts: Vec<String> = self
            .hosts
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
        if let Some(dbname) = &self.dbname {
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
        if self.read_write_only {
            params.push("target_session_attrs=read-write".into());
        }
        if !params.is_empty() {
            write!(f, "?{}", params.join("&"))?;
        }
        Ok(())
    }
}

/// `host[:port]` items separated by commas; IPv6 addresses in brackets.
fn parse_hosts(spec: &str) -> Result<Vec<(String, Option<u16>)>, String> {
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|item| {
            let (host, port) = if let Some(bracketed) = item.strip_prefix('[') {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or("an IPv6 host lacks its closing ]")?;
                let port = match after {
                    "" => None,
                    _ => Some(
                        after
                            .strip_prefix(':')
                            .ok_or("after an [IPv6] host only :port may follow")?,
                    ),
                };
                (host, port)
            } else {
                match item.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (item, None),
                }
            };
            let host = decode(host, "a host")?;
            if host.is_empty() {
                return Err("a host is empty: write host[:port], separated by commas".to_string());
            }
            let port = port.map(parse_port).transpose()?;
            Ok((host, port))
        })
        .collect()
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("the port {:?} is not a port number (1-65535)", clip(text)))
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

        assert_eq!(url.user.as_deref(), Some("linkid"));
        assert_eq!(url.password.as_ref().unwrap().expose(), "s@cr/et");
        assert_eq!(
            url.hosts,
            [Host {
                name: "db.example.com".into(),
                port: 6543
            }]
        );
        assert_eq!(url.dbname.as_deref(), Some("links"));
        assert_eq!(url.ssl_mode, SslMode::VerifyFull);
        assert_eq!(url.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(url.application_name.as_deref(), Some("a"));
    }

    #[test]
    fn defaults_are_libpqs() {
        let url = PostgresUrl::parse("postgresql://h").unwrap();

        assert_eq!(url.hosts[0].port, DEFAULT_PORT);
        assert_eq!(url.ssl_mode, SslMode::Prefer);
        assert!(url.user.is_none() && url.password.is_none() && url.dbname.is_none());
    }

    #[test]
    fn several_hosts_ipv6_and_a_socket_directory_parse() {
        let url = PostgresUrl::parse("postgres://u@a:1,[::1]:2,b/d?port=7").unwrap();
        let socket = PostgresUrl::parse("postgres:///d?host=%2Fvar%2Frun%2Fpostgresql").unwrap();

        let hosts: Vec<String> = url.hosts.iter().map(Host::to_string).collect();
        assert_eq!(hosts, ["a:1", "[::1]:2", "b:7"]);
        assert_eq!(socket.hosts[0].name, "/var/run/postgresql");
    }

    #[test]
    fn display_debug_and_serialize_leave_the_password_out() {
        let text = "postgres://linkid:hunter2-secret@127.0.0.1:5433/db?password=other-secret&sslmode=require";
        let url = DatabaseUrl::new(text);

        let shown = [
            url.to_string(),
            format!("{url:?}"),
            format!("{:?}", url.parse().unwrap()),
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
            ("postgres://u:pw-secret@h/d?sslmode=allow", "allow"),
            ("postgres://u:pw-secret@h/d?sslmode=bogus", "sslmode"),
            ("postgres://u:pw-secret@h/d?sslcert=x", "sslcert"),
            ("postgres://u:pw-secret@/d", "no host"),
            ("postgres://u:pw-secret@[::1/d", "]"),
        ];
        for (text, names) in cases {
            let error = PostgresUrl::parse(text).unwrap_err();

            assert!(error.contains(names), "{text}: {error}");
            assert!(!error.contains("pw-secret"), "{text}: {error}");
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
