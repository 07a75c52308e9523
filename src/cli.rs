//! Command-line interface: `serve` (the default), `token ...` and `openapi`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::{self, MintRequest, Right, RootKey};
use crate::config::Config;
use crate::startup::{self, Application};
use crate::store::Store;

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
    /// Print the OpenAPI document (JSON) on stdout.
    #[command(after_help = "Example:\n  linkid openapi > openapi/openapi.json")]
    Openapi,
}

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
        /// Expire the token after this long, e.g. 30s, 15m, 1h, 7d (default: never).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Who the token is for (a person or a system); the change feed
        /// names it as each change's `subject`.
        #[arg(long, value_name = "NAME")]
        subject: Option<String>,
    },
    /// Show a token's blocks, checks and revocation ids.
    #[command(after_help = "Example:\n  linkid token inspect \"$TOKEN\"")]
    Inspect {
        /// The token (base64).
        token: String,
    },
    /// Revoke a token and every token attenuated from it; a running server
    /// refuses it within a second.
    #[command(after_help = "Example:\n  linkid token revoke \"$TOKEN\"")]
    Revoke {
        /// The token (base64).
        token: String,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 30s, 15m, 1h, 7d)"))
}

/// Runs the parsed command line.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            let linkable = config
                .identity_providers
                .iter()
                .filter(|p| p.linkable)
                .count();
            println!("configuration is valid");
            println!("  server.addr      {}", config.server.addr);
            match config.database.postgres_url() {
                // (Display leaves the password out.)
                Some(url) => println!("  database.url     {url}"),
                None => println!("  database.path    {}", config.database.path.display()),
            }
            match &config.auth.public_key {
                Some(key) => println!("  tokens verified  with auth.public_key {key}"),
                None => println!(
                    "  tokens verified  with the key in {}{}",
                    config.auth.private_key_file.display(),
                    if config.auth.private_key_file.exists() {
                        ""
                    } else {
                        " (generated on first start)"
                    }
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
            crate::telemetry::init_tracing(&config.log);
            let app = Application::build(&config).await?;
            tracing::info!(addr = %app.local_addr(), "listening; docs at /docs");
            app.run_until_stopped(startup::shutdown_signal()).await
        }
        Command::Openapi => {
            print!("{}", crate::http::openapi::document_json());
            Ok(())
        }
        Command::Token(command) => run_token(&config, command).await,
        Command::Export { out } => {
            let sink: Box<dyn std::io::Write + Send> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(create_private(path)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let written = crate::store::export(&config.database, sink).await?;
            eprintln!("exported {written} links");
            Ok(())
        }
        Command::Import { file, dry_run } => run_import(&config, &file, dry_run).await,
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
            let added = crate::store::seed(&config.database, links, providers, move |done| {
                bar.set_position(done)
            })
            .await?;
            eprintln!("added {added} links");
            Ok(())
        }
    }
}

async fn run_token(config: &Config, command: TokenCommand) -> anyhow::Result<()> {
    let key = RootKey::load_or_create(&config.auth)?;
    if let Some(path) = &key.generated {
        eprintln!("generated a new root key at {} (mode 0600)", path.display());
    }
    match command {
        TokenCommand::Mint {
            admin,
            rights,
            user,
            ttl,
            subject,
        } => {
            let request = MintRequest {
                admin,
                rights: rights.iter().filter_map(|r| Right::parse(r)).collect(),
                user,
                ttl,
                subject,
            };
            println!("{}", auth::mint(key.signing_key()?, &request)?);
        }
        TokenCommand::Inspect { token } => print!("{}", auth::inspect(key.public, &token)?),
        TokenCommand::Revoke { token } => {
            let ids = auth::revocation_ids(key.public, &token)?;
            // The last block's id belongs to this token and to every token
            // attenuated from it, and to no token it was attenuated from.
            let own = ids.last().cloned().context("the token has no blocks")?;
            let store = Store::open(&config.database).await?;
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

async fn run_import(config: &Config, file: &std::path::Path, dry_run: bool) -> anyhow::Result<()> {
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
        progress: Box::new(move |bytes| {
            if let Some(bar) = &progress_bar {
                bar.set_position(bytes);
            }
        }),
        problem: Box::new(move |problem| match &problem_bar {
            Some(bar) => bar.suspend(|| eprintln!("{problem}")),
            None => eprintln!("{problem}"),
        }),
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
    if dry_run {
        println!("dry run, nothing applied: would have {}", report.summary());
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}
