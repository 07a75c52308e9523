//! Command-line interface: `serve` (the default), `dev`, `token ...`, the
//! admin commands (`check-config`, `backup`, `export`, `import`, `seed`,
//! `webhooks ...`),
//! `openapi` and `conform`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::{self, MintRequest, Right, RootKey};
use crate::config::{Config, ConfigError};
use crate::startup::{self, Application};
use crate::store::Store;

mod dev;
mod webhooks;

pub use webhooks::WebhooksCommand;

/// linkid: a small, fast server for the Linked Identities admin API.
#[derive(Debug, Parser)]
#[command(
    name = "linkid",
    version,
    after_help = "Examples:\n  linkid                              serve with ./config.toml or the built-in defaults\n  linkid --config /etc/linkid.toml serve\n  linkid token mint --admin --ttl 1h  print an admin token valid for one hour\n  linkid openapi > openapi/openapi.json"
)]
pub struct Cli {
    /// Config file (default: ./config.toml if present; also LINKID_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The configuration the command runs with: `conform` judges another
    /// server, so it reads no config file (nor its problems), only the
    /// built-in defaults.
    pub fn configuration(&self) -> Result<Config, ConfigError> {
        match self.command {
            Some(Command::Conform(_)) => Config::defaults(),
            _ => Config::load(self.config.as_deref()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default when no command is given).
    #[command(after_help = "Example:\n  LINKID_SERVER__ADDR=0.0.0.0:8080 linkid serve")]
    Serve,
    /// Mint, inspect and revoke bearer tokens.
    #[command(
        subcommand,
        after_help = "Examples:\n  linkid token mint --admin --ttl 1h\n  linkid token inspect \"$TOKEN\"\n  linkid token revoke \"$TOKEN\""
    )]
    Token(TokenCommand),
    /// Copy the database to PATH while the server keeps serving (SQLite's
    /// online backup API; one consistent snapshot). On PostgreSQL, use pg_dump.
    #[command(
        after_help = "Example:\n  linkid backup /var/backups/linkid-$(date +%F).db\n\nRestore: stop the server, copy the backup over database.path (removing any\n-wal and -shm files beside it), start the server."
    )]
    Backup {
        /// Where to write the copy (must not exist yet).
        path: PathBuf,
    },
    /// Check the configuration and explain every problem; exit 0 when it is valid.
    #[command(
        name = "check-config",
        after_help = "Example:\n  linkid --config /etc/linkid/config.toml check-config"
    )]
    CheckConfig,
    /// Write every link as JSON Lines (one consistent snapshot, also while
    /// servers write), in user_id order.
    #[command(
        after_help = "Examples:\n  linkid export --out links.jsonl\n  linkid export | gzip > links.jsonl.gz\n\nEach line: {\"user_id\", \"provider_id\", \"linked_user_id\", \"linked_username\", \"created_at\", \"updated_at\"}"
    )]
    Export {
        /// Where to write (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Apply a JSON Lines file of links (the export format) as one
    /// all-or-nothing transaction; `-` reads stdin. Every bad line and every
    /// conflict is reported, and then nothing is applied (exit 1).
    #[command(
        after_help = "Examples:\n  linkid import links.jsonl --dry-run\n  linkid import links.jsonl\n  zcat links.jsonl.gz | linkid import -\n\nA line equal to a stored link is unchanged; a new linked_username is an update;\ncreated_at and updated_at are optional and kept as given. Changes enter the\nchange feed with actor \"import\"."
    )]
    Import {
        /// The file, or `-` for stdin.
        file: PathBuf,
        /// Check every line and report what would change; apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Load N synthetic links (users seed-user-0..N-1) into the database, for
    /// benchmarks and demos. Existing links are kept.
    #[command(after_help = "Example:\n  linkid seed --links 1000000")]
    Seed {
        /// How many links to load.
        #[arg(long, value_name = "N")]
        links: u64,
    },
    /// Run a throwaway server for local development: a temporary database
    /// and key (removed when it stops), optional fixtures, and an admin
    /// token printed once to the terminal.
    #[command(
        after_help = "Examples:\n  linkid dev\n  linkid dev --fixtures links.jsonl        (the `linkid export` format)\n  linkid dev --data ./dev-data             (keep the database and key for the next run)\n  LINKID_SERVER__ADDR=127.0.0.1:9000 linkid dev\n  linkid dev --clock 2026-01-01T00:00:00Z     (every time in every answer is this one)\n\nControls for client tests (linkid dev only, for requests with a valid token):\n  Prefer: code=503                         the operation's documented 503, nothing changed\n  Prefer: code=400, example=USER_ALREADY_LINKED   one of a status's documented errors\n  Prefer: delay=1500                       the real answer, 1.5 s late (at most 30000 ms)\n  POST /_dev/reset                         the data as it started (fixtures or empty), 204\nFailed authentications are not rate-limited (unless rate_limit.failed_auth_per_minute\nis set in the configuration): fuzzers probe without a token.\n\nIt reads the same configuration as `serve` (address, providers, environment),\nexcept where the data lives: database.path and auth.* are its own. The admin\ntoken is printed on stdout only when it is a terminal or with --print-token,\nnever in the log. Ctrl-C (or SIGTERM) stops it, removes the temporary data\nand exits 0."
    )]
    Dev {
        /// Keep the database and key in DIR (created if missing) instead of
        /// a temporary directory; a later run with the same DIR finds them.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Load links from FILE at start (JSON Lines, as `linkid export`
        /// writes and `linkid import` reads; all or nothing).
        #[arg(long, value_name = "FILE")]
        fixtures: Option<PathBuf>,
        /// Print the admin token on stdout even when it is not a terminal.
        #[arg(long)]
        print_token: bool,
        /// Stamp every change (created_at, updated_at, occurred_at) with
        /// this instant (RFC 3339, e.g. 2026-01-01T00:00:00Z) instead of
        /// now, so that answers compare byte for byte between runs.
        #[arg(long, value_name = "INSTANT", value_parser = parse_instant)]
        clock: Option<std::time::SystemTime>,
    },
    /// Where each webhook stands, and the operator's controls: `status`,
    /// `replay ID --after SEQ`, `enable ID` (DESIGN "Webhooks").
    #[command(
        subcommand,
        after_help = "Examples:\n  linkid webhooks status\n  linkid webhooks status --json\n  linkid webhooks replay crm --after 1200\n  linkid webhooks enable crm"
    )]
    Webhooks(WebhooksCommand),
    /// Print the OpenAPI document (JSON) on stdout.
    #[command(after_help = "Example:\n  linkid openapi > openapi/openapi.json")]
    Openapi,
    /// Judge a server that claims the Linked Identities API: named checks
    /// through the API alone, every answer validated against the document,
    /// one line a check, then `N passed, N failed, N skipped`. Exit 0: no
    /// check failed unexpectedly; 1: one did; 2: it could not run at all.
    #[command(after_help = crate::conform::help())]
    Conform(crate::conform::Args),
}

/// An RFC 3339 instant (`2026-01-01T00:00:00Z`).
fn parse_instant(text: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{e}: give an RFC 3339 instant, e.g. 2026-01-01T00:00:00Z"))
}

/// A command's exit status other than 0 or 1, chosen after it said why on
/// its own (`main` exits with it and prints nothing more).
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new token signed by the root key (only the token, on stdout).
    #[command(
        after_help = "Examples:\n  linkid token mint --admin\n  linkid token mint --right linked_identities:list --right identity_providers:list --ttl 30m\n  linkid token mint --admin --user u-42 --ttl 7d"
    )]
    Mint {
        /// Grant every operation (role("admin")).
        #[arg(long)]
        admin: bool,
        /// Grant one operation; repeat for more.
        #[arg(long = "right", value_name = "OP", value_parser = clap::builder::PossibleValuesParser::new(Right::ALL.map(Right::as_str)))]
        rights: Vec<String>,
        /// Restrict the token to one user's linked identities (listing providers stays allowed).
        #[arg(long, value_name = "USER_ID")]
        user: Option<String>,
        /// Expire the token after this long, at least 1s, e.g. 30s, 15m, 1h, 7d (default: never).
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Who the token is for (a person or a system); the change feed
        /// names it as each change's `subject`.
        #[arg(long, value_name = "NAME")]
        subject: Option<String>,
    },
    /// Say whether this server accepts a token (its first line: `verdict:
    /// valid`, `expired`, `revoked`, or signed by another key), and show its
    /// blocks, checks and revocation ids.
    #[command(
        after_help = "Examples:\n  linkid token inspect - <<< \"$TOKEN\"      (stdin: the token stays out of shell history and ps)\n  linkid token inspect \"$TOKEN\""
    )]
    Inspect {
        /// The token (base64), or `-` to read it from stdin.
        token: String,
    },
    /// Revoke a token and every token attenuated from it; a running server
    /// refuses it within a second.
    #[command(
        after_help = "Examples:\n  linkid token revoke - <<< \"$TOKEN\"       (stdin: the token stays out of shell history and ps)\n  linkid token revoke \"$TOKEN\""
    )]
    Revoke {
        /// The token (base64), or `-` to read it from stdin.
        token: String,
    },
}

/// A token's lifetime: biscuit times are whole seconds, so anything under
/// one second would mint a token that is expired at once.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 30s, 15m, 1h, 7d)"))?;
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "{text} would mint a token that is already expired: use 1s or more, or leave --ttl out for a token that does not expire"
        ));
    }
    Ok(ttl)
}

/// A token given on the command line, or `-` for one read from stdin
/// (which keeps it out of shell history and `ps`).
fn token_argument(text: String) -> anyhow::Result<String> {
    if text != "-" {
        return Ok(text);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the token from stdin")?;
    let token = line.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "no token on stdin (pass one line holding the token)"
    );
    Ok(token)
}

/// Runs the parsed command line. A configuration problem met on the way
/// (a key file that holds no key, say) is reported with its origin.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    let sources = config.sources.clone();
    run_command(cli, config)
        .await
        .map_err(|error| match error.downcast::<ConfigError>() {
            Ok(problem) => problem.located(&sources).into(),
            Err(other) => other,
        })
}

async fn run_command(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            let checked = startup::check(&config)?;
            let linkable = config
                .identity_providers
                .iter()
                .filter(|p| p.linkable)
                .count();
            println!("configuration is valid");
            println!("  read             {}", config.sources.read.join(", "));
            println!("  server.addr      {}", config.server.addr);
            let database = &checked.database;
            match config.database.postgres_url() {
                // (Display leaves the password out.)
                Some(url) => println!("  database.url     {url}"),
                None => println!(
                    "  database.path    {}{}",
                    config.database.path.display(),
                    match (database.created_at_start, database.in_use_by) {
                        (_, Some(pid)) => format!(" (in use by linkid serve, pid {pid})"),
                        (false, None) => String::new(),
                        (true, None) => " (created on first start)".to_string(),
                    }
                ),
            }
            match (&checked.key, &config.auth.public_key) {
                (Some(key), Some(_)) => {
                    println!("  tokens verified  with auth.public_key {}", key.public)
                }
                (Some(key), None) => println!(
                    "  tokens verified  with {} from {}",
                    key.public,
                    config.auth.private_key_file.display()
                ),
                (None, _) => println!(
                    "  tokens verified  with the key in {} (generated on first start)",
                    config.auth.private_key_file.display()
                ),
            }
            println!(
                "  providers        {} configured, {linkable} linkable",
                config.identity_providers.len()
            );
            Ok(())
        }
        Command::Backup { path } => {
            let database = config.database.clone();
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} pages")
                    .expect("the progress template parses"),
            );
            let destination = path.clone();
            let progress = bar.clone();
            tokio::task::spawn_blocking(move || {
                crate::store::backup(&database, &destination, |done, total| {
                    progress.set_length(total);
                    progress.set_position(done);
                })
            })
            .await??;
            bar.finish_and_clear();
            eprintln!(
                "backed up {} to {}",
                config.database.path.display(),
                path.display()
            );
            Ok(())
        }
        Command::Serve => {
            let _log = crate::telemetry::init_tracing(&config.log);
            let app = Application::build(&config).await?;
            tracing::info!(addr = %app.local_addr(), "listening; docs at /docs");
            app.run_until_stopped(startup::shutdown_signal()).await
        }
        Command::Openapi => {
            print!("{}", crate::http::openapi::document_json());
            Ok(())
        }
        Command::Conform(args) => match crate::conform::run(args).await {
            0 => Ok(()),
            status => Err(Exit(status).into()),
        },
        Command::Token(command) => run_token(&config, command).await,
        Command::Webhooks(command) => webhooks::run(&config, command).await,
        Command::Export { out } => {
            let sink: Box<dyn std::io::Write + Send> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(create_private(path)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let written = crate::store::export(&config.database, &config.id_rules(), sink).await?;
            eprintln!("exported {written} links");
            Ok(())
        }
        Command::Import { file, dry_run } => {
            let report = import_file(&config, &file, dry_run).await?;
            if dry_run {
                println!("dry run, nothing applied: would have {}", report.summary());
            } else {
                println!("{}", report.summary());
            }
            Ok(())
        }
        Command::Dev {
            data,
            fixtures,
            print_token,
            clock,
        } => {
            dev::run(
                config,
                dev::Options {
                    data,
                    fixtures,
                    print_token,
                    clock,
                },
            )
            .await
        }
        Command::Seed { links } => {
            let providers: Vec<String> = config
                .identity_providers
                .iter()
                .filter(|p| p.linkable)
                .map(|p| p.id.clone())
                .collect();
            let bar = indicatif::ProgressBar::new(links);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} links ({per_sec}, {eta} left)",
                )
                .expect("the progress template parses"),
            );
            let rules = config.id_rules();
            let added =
                crate::store::seed(&config.database, &rules, links, providers, move |done| {
                    bar.set_position(done)
                })
                .await?;
            eprintln!("added {added} links");
            Ok(())
        }
    }
}

async fn run_token(config: &Config, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Mint {
            admin,
            rights,
            user,
            ttl,
            subject,
        } => {
            let key = RootKey::load_or_create(&config.auth)?;
            if let Some(path) = &key.generated {
                eprintln!("generated a new root key at {} (mode 0600)", path.display());
            }
            let request = MintRequest {
                admin,
                rights: rights.iter().filter_map(|r| Right::parse(r)).collect(),
                user,
                ttl,
                subject,
            };
            println!("{}", auth::mint(key.signing_key()?, &request)?);
        }
        TokenCommand::Inspect { token } => {
            let token = token_argument(token)?;
            let key = existing_key(config)?;
            let revoked = Arc::new(auth::RevocationList::default());
            let database = match Store::open_existing(&config.database, &config.id_rules()).await? {
                Some(store) => {
                    let (ids, _) = store.revoked_since(0).await?;
                    store.close().await;
                    revoked.extend(ids);
                    format!("revocations in {}", config.database.path.display())
                }
                None => format!(
                    "no database yet at {}, so nothing is revoked",
                    config.database.path.display()
                ),
            };
            let authority = auth::Authority::new(key.public, revoked, &config.auth);
            let verdict = authority.authenticate(Some(format!("Bearer {token}").as_bytes()));
            let shown = auth::inspect(key.public, &token)?;
            match &verdict {
                Ok(_) => println!("verdict: valid"),
                Err(auth::AuthError::Invalid(why)) => println!("verdict: {why}"),
                Err(other) => println!("verdict: {other}"),
            }
            println!("checked against: root key {} and {database}", key.public);
            print!("{shown}");
        }
        TokenCommand::Revoke { token } => {
            let token = token_argument(token)?;
            let key = existing_key(config)?;
            let ids = auth::revocation_ids(key.public, &token)?;
            // The last block's id belongs to this token and to every token
            // attenuated from it, and to no token it was attenuated from.
            let own = ids.last().cloned().context("the token has no blocks")?;
            let store = Store::open(&config.database, &config.id_rules()).await?;
            let added = store.revoke(vec![own.clone()]).await?;
            store.close().await;
            if added == 0 {
                eprintln!("already revoked: {own}");
            } else {
                eprintln!("revoked: {own}");
            }
        }
    }
    Ok(())
}

/// The root key, which must exist already: no token can be valid (or
/// revoked) for a key that is only now generated.
fn existing_key(config: &Config) -> anyhow::Result<RootKey> {
    RootKey::load(&config.auth)?.with_context(|| {
        format!(
            "there is no root key yet at auth.private_key_file {}, so no token is valid here (`linkid token mint` or `linkid serve` generates it)",
            config.auth.private_key_file.display()
        )
    })
}

/// Creates a new file only this user can read (exports hold personal data).
fn create_private(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))
}

/// Applies a JSON Lines file of links (`-`: stdin) as one transaction,
/// reporting every problem on stderr; an error when there were any.
async fn import_file(
    config: &Config,
    file: &std::path::Path,
    dry_run: bool,
) -> anyhow::Result<crate::store::transfer::ImportReport> {
    use std::io::IsTerminal;
    let (source, size): (crate::store::transfer::Source, Option<u64>) = if file.as_os_str() == "-" {
        (Box::new(std::io::BufReader::new(std::io::stdin())), None)
    } else {
        let opened =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        let size = opened.metadata().ok().map(|m| m.len());
        (Box::new(std::io::BufReader::new(opened)), size)
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = match size {
            Some(size) => indicatif::ProgressBar::new(size).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
                )
                .expect("the progress template parses"),
            ),
            None => indicatif::ProgressBar::new_spinner(),
        };
        Some(bar)
    } else {
        None
    };
    let progress_bar = bar.clone();
    let problem_bar = bar.clone();
    let options = crate::store::transfer::ImportOptions {
        dry_run,
        providers: config
            .identity_providers
            .iter()
            .map(|p| p.id.clone())
            .collect(),
        rules: config.id_rules(),
        progress: Box::new(move |bytes| {
            if let Some(bar) = &progress_bar {
                bar.set_position(bytes);
            }
        }),
        problem: Box::new(move |problem| match &problem_bar {
            Some(bar) => bar.suspend(|| eprintln!("{problem}")),
            None => eprintln!("{problem}"),
        }),
        replace: false,
        clock: config.database.clock,
    };
    let report = crate::store::import(&config.database, source, options).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if report.problems > 0 {
        anyhow::bail!(
            "{} problem{} found: nothing was imported (it would have {})",
            report.problems,
            if report.problems == 1 { "" } else { "s" },
            report.summary()
        );
    }
    Ok(report)
}
