//! What a webhook's entry holds that must not be shown: the receiver's URL
//! (its `Display`, `Debug` and `Serialize` leave out a user name and
//! password) and the signing secrets (read from their file, which must be
//! 0600; their `Debug` shows none of them).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize, Serializer};

use crate::config::Problem;

/// A secret file larger than this is not one (a mistyped path such as
/// `/dev/zero` must not be read for ever).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Standard Webhooks: a symmetric secret is 24 to 64 random bytes
/// (192 to 512 bits).
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The fix named for a malformed or missing secret.
const SECRET_FIX: &str = "write one secret a line as whsec_<base64 of 24-64 random bytes>, e.g. `echo whsec_$(openssl rand -base64 32) > FILE && chmod 600 FILE`";

/// `url` as written. Its `Debug`, `Display` and `Serialize` leave out any
/// user name and password in it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct WebhookUrl(String);

impl WebhookUrl {
    pub fn new(text: impl Into<String>) -> WebhookUrl {
        WebhookUrl(text.into())
    }

    /// Not given (the entry lacks `url`).
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// The URL, checked; the error says what is wrong without quoting it.
    pub fn parse(&self) -> Result<ReceiverUrl, String> {
        let url = url::Url::parse(self.0.trim()).map_err(|e| format!("is not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "has the scheme `{}`; webhooks are delivered over http or https",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".to_string());
        }
        Ok(ReceiverUrl(url))
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parse() {
            Ok(url) => url.fmt(f),
            Err(_) => f.write_str("(an invalid URL)"),
        }
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({:?})", self.to_string())
    }
}

impl Serialize for WebhookUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A receiver's URL, checked: http or https with a host. `Display` and
/// `Debug` show it without credentials; only the HTTP client sees them.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceiverUrl(url::Url);

impl ReceiverUrl {
    /// The whole URL, credentials included: for the request alone.
    pub fn expose(&self) -> &url::Url {
        &self.0
    }

    /// The user name and password in the URL, when it has them (so that
    /// an error text that happens to quote one can be cleaned).
    pub fn credentials(&self) -> impl Iterator<Item = &str> {
        [Some(self.0.username()), self.0.password()]
            .into_iter()
            .flatten()
            .filter(|c| !c.is_empty())
    }
}

impl fmt::Display for ReceiverUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        // Both only fail for URLs that cannot have credentials at all.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for ReceiverUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReceiverUrl({:?})", self.to_string())
    }
}

/// One signing secret (the bytes behind `whsec_`). Shown nowhere.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// The key itself, for the HMAC alone.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

/// A webhook's secrets, in the file's order: each signs every delivery, so
/// a receiver can move to a new one while the old one still verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningSecrets(Vec<SigningSecret>);

impl SigningSecrets {
    /// Reads a secret file's text: each non-empty line that is not a `#`
    /// comment is `whsec_<base64>` of 24 to 64 bytes. The error names the
    /// line, never its text.
    pub fn parse(text: &str) -> Result<SigningSecrets, String> {
        let mut secrets = Vec::new();
        for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = line
                .strip_prefix("whsec_")
                .and_then(|encoded| {
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .ok()
                })
                .ok_or_else(|| format!("line {number} is not whsec_<base64>"))?;
            if !SECRET_BYTES.contains(&bytes.len()) {
                return Err(format!(
                    "the secret on line {number} is {} bytes; Standard Webhooks secrets are {} to {} bytes",
                    bytes.len(),
                    SECRET_BYTES.start(),
                    SECRET_BYTES.end()
                ));
            }
            secrets.push(SigningSecret(bytes));
        }
        if secrets.is_empty() {
            return Err("no line holds a whsec_ secret".to_string());
        }
        Ok(SigningSecrets(secrets))
    }

    /// Every secret, the file's first line first.
    pub fn iter(&self) -> impl Iterator<Item = &SigningSecret> {
        self.0.iter()
    }
}

/// Reads a webhook's secret file, or says what is wrong with it (`key` is
/// the entry's `secret_file` key). Like the root key, a file that group or
/// others may read is refused, not used.
pub fn read_secret_file(key: &str, path: &Path) -> Result<SigningSecrets, Problem> {
    let shown = path.display();
    let unreadable = |e: std::io::Error| {
        Problem::new(
            key,
            format!("{shown} cannot be read ({e})"),
            "point it at the webhook's secret file, readable by the server's user (chmod 600 as its owner)",
        )
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(Problem::new(
            key,
            format!("{shown} is not a file"),
            SECRET_FIX,
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(Problem::new(
            key,
            format!("{shown} is larger than 64 KiB, so it is no secret file"),
            SECRET_FIX,
        ));
    }
    let secrets = std::str::from_utf8(&bytes)
        .map_err(|_| "it is not UTF-8 text".to_string())
        .and_then(SigningSecrets::parse)
        .map_err(|why| Problem::new(key, format!("{shown}: {why}"), SECRET_FIX))?;
    // As ssh does with a private key: a secret others can read is no secret.
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Problem::new(
            key,
            format!(
                "{shown} is readable by group or others (mode {:o})",
                mode & 0o777
            ),
            format!("run `chmod 600 {shown}`"),
        ));
    }
    Ok(secrets)
}
