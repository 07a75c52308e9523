//! The root key: read from `auth.public_key` or the key file, or generated
//! into the key file (0600) on first start; a key file others can read is
//! refused, as ssh refuses one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use biscuit_auth::{KeyPair, PublicKey};

use crate::config::{AuthConfig, ConfigError, Problem};

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
