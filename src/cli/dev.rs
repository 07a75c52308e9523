//! `linkid dev`: the Linked Identities API on a laptop in one command. A
//! throwaway server with a database and key in a new temporary directory
//! (or `--data DIR`, kept), optional fixtures in the export format, and an
//! admin token printed once to the terminal. Ctrl-C or SIGTERM stops it,
//! removes the temporary directory and exits 0.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::auth::{self, MintRequest, RootKey};
use crate::config::Config;
use crate::http::dev::DevControls;
use crate::startup::{self, Application};

/// `linkid dev`'s options.
pub(super) struct Options {
    /// Keep the data here instead of in a temporary directory.
    pub data: Option<PathBuf>,
    /// Links to load at start (JSON Lines, the export format).
    pub fixtures: Option<PathBuf>,
    /// Print the token even when stdout is not a terminal.
    pub print_token: bool,
    /// Stamp every change with this instant instead of now.
    pub clock: Option<std::time::SystemTime>,
}

/// The database and key file names inside the data directory.
const DATABASE: &str = "linkid.db";
const KEY: &str = "root.key";

pub(super) async fn run(mut config: Config, options: Options) -> anyhow::Result<()> {
    // Dropped on every way out, removing the directory and all in it.
    let (dir, temporary) = match &options.data {
        Some(dir) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create --data {}", dir.display()))?;
            (std::path::absolute(dir)?, None)
        }
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("linkid-dev-")
                .tempdir()
                .context("cannot create a temporary directory (set TMPDIR to a writable one)")?;
            (temporary.path().to_path_buf(), Some(temporary))
        }
    };
    let _log = crate::telemetry::init_tracing(&config.log);
    if config.auth.public_key.take().is_some() {
        tracing::warn!("linkid dev ignores auth.public_key: it signs its own tokens");
    }
    // Always a SQLite file of its own, even where serve uses PostgreSQL.
    if config.database.url.take().is_some() {
        tracing::warn!("linkid dev ignores database.url: its data is a SQLite file of its own");
    }
    config.database.path = dir.join(DATABASE);
    config.auth.private_key_file = dir.join(KEY);
    config.database.clock = options.clock;
    // Fuzzers check that auth is enforced by probing without a token, and
    // the next request with one would be throttled: off, unless set.
    let throttled = !config
        .sources
        .is_built_in("rate_limit.failed_auth_per_minute");
    if !throttled {
        config.rate_limit.failed_auth_per_minute = 0;
    }
    let fixtures = match &options.fixtures {
        Some(file) => bytes::Bytes::from(
            std::fs::read(file)
                .with_context(|| format!("cannot read --fixtures {}", file.display()))?,
        ),
        None => bytes::Bytes::new(),
    };
    tracing::info!(
        data = %dir.display(),
        "linkid dev: {}",
        if temporary.is_some() { "temporary data, removed when it stops" } else { "data kept in --data" }
    );

    let controls = DevControls {
        fixtures,
        database: config.database.clone(),
        rules: config.id_rules(),
        providers: config
            .identity_providers
            .iter()
            .map(|p| p.id.clone())
            .collect(),
        documented: crate::http::openapi::documented,
    };
    let app = Application::build_with(&config, Some(controls)).await?;
    if let Some(file) = &options.fixtures {
        let report = super::import_file(&config, file, false)
            .await
            .with_context(|| format!("cannot load --fixtures {}", file.display()))?;
        tracing::info!(fixtures = %file.display(), "loaded: {}", report.summary());
    }
    let key = RootKey::load(&config.auth)?.context("the root key vanished after start")?;
    let base = format!("http://{}", reachable(app.local_addr()));
    tracing::info!(addr = %app.local_addr(), "listening; docs at /docs");

    // stdout, not the log: the terminal is the one place a token belongs.
    println!("linkid dev: serving {base} — docs at {base}/docs");
    println!(
        "data: {} ({})",
        dir.display(),
        if temporary.is_some() {
            "temporary: removed when linkid dev stops"
        } else {
            "kept"
        }
    );
    println!("API={base}{}", crate::domain::API_PREFIX);
    if options.print_token || std::io::stdout().is_terminal() {
        let admin = MintRequest {
            admin: true,
            subject: Some("linkid dev".to_string()),
            ..MintRequest::default()
        };
        println!("TOKEN={}", auth::mint(key.signing_key()?, &admin)?);
        println!("try: curl -H \"Authorization: Bearer $TOKEN\" $API/users/identity-providers");
    } else {
        println!(
            "no token printed: stdout is not a terminal (pass --print-token to print one here), or mint one with:"
        );
        println!("  {}", mint_command(&dir.join(KEY)));
    }
    if !throttled {
        println!("failed authentications are not rate-limited (fuzzers probe without a token)");
    }
    if let Some(clock) = options.clock {
        println!(
            "clock: every change is stamped {}",
            humantime::format_rfc3339_seconds(clock)
        );
    }
    println!("controls: Prefer: code=NNN[, example=CODE] | Prefer: delay=MS | POST /_dev/reset (see linkid dev --help)");
    println!("Ctrl-C stops it.");

    app.run_until_stopped(startup::shutdown_signal()).await?;
    if let Some(temporary) = temporary {
        let path = temporary.path().to_path_buf();
        temporary
            .close()
            .with_context(|| format!("cannot remove {}", path.display()))?;
        tracing::info!(data = %path.display(), "removed the temporary data");
    }
    Ok(())
}

/// The command that mints an admin token for this data directory.
fn mint_command(key: &Path) -> String {
    format!(
        "LINKID_AUTH__PRIVATE_KEY_FILE={} linkid token mint --admin",
        key.display()
    )
}

/// An address a browser on this machine can open: the loopback address
/// when the server listens on every interface.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}
