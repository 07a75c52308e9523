//! `linkid webhooks status | replay | enable`: where each configured
//! webhook stands, read from the database and changed there (DESIGN
//! "Webhooks"). A running server notices a replay or an enable within a
//! few seconds (a new generation, see `webhooks::ledger`); these commands
//! run beside it, as `linkid token revoke` does.

use std::time::SystemTime;

use clap::Subcommand;
use serde::Serialize;

use crate::config::{Config, Start, WebhookConfig};
use crate::domain::{WebhookStanding, WebhookState};
use crate::store::{Store, StoreError};

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Show each configured webhook: its state, the last seq delivered,
    /// how many events wait, its attempts, last answer and next attempt.
    #[command(
        after_help = "Examples:\n  linkid webhooks status\n  linkid webhooks status --json | jq '.[] | select(.state != \"ACTIVE\")'\n\n--json prints an array of {\"id\", \"url\", \"state\", \"delivered_seq\", \"pending\",\n\"attempts\", \"last_attempt_at\", \"last_status\", \"last_error\", \"next_attempt_at\"}\n(the URL without credentials; times RFC 3339 UTC or null)."
    )]
    Status {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Rewind a webhook: it resumes, ACTIVE, with the first event after SEQ
    /// (a running server acts on it within 5 seconds). Also un-sticks an
    /// EXPIRED webhook (replay it after the pruning mark, or after now).
    #[command(
        after_help = "Examples:\n  linkid webhooks replay crm --after 1200     (send 1201 and on again)\n  linkid webhooks replay crm --after 0        (from the oldest event kept)"
    )]
    Replay {
        /// The webhook's id (`[[webhooks]] id`).
        id: String,
        /// The last seq counted as delivered; delivery resumes after it.
        #[arg(long, value_name = "SEQ")]
        after: i64,
    },
    /// Re-enable a DISABLED webhook (its receiver answered 410 Gone): it
    /// resumes with the event that got the 410 (a running server acts on it
    /// within 5 seconds).
    #[command(after_help = "Example:\n  linkid webhooks enable crm")]
    Enable {
        /// The webhook's id (`[[webhooks]] id`).
        id: String,
    },
}

/// One webhook as `status --json` shows it (DESIGN's field names).
#[derive(Debug, Serialize)]
struct Shown {
    id: String,
    /// Without credentials.
    url: String,
    state: &'static str,
    delivered_seq: i64,
    /// Events in the feed after `delivered_seq` (before the filters).
    pending: i64,
    attempts: u32,
    last_attempt_at: Option<String>,
    last_status: Option<u16>,
    last_error: Option<String>,
    next_attempt_at: Option<String>,
}

pub(super) async fn run(config: &Config, command: WebhooksCommand) -> anyhow::Result<()> {
    let store = Store::open(&config.database, &config.id_rules()).await?;
    let outcome = match command {
        WebhooksCommand::Status { json } => status(config, &store, json).await,
        WebhooksCommand::Replay { id, after } => {
            configured(config, &id)?;
            anyhow::ensure!(after >= 0, "--after takes a seq, 0 or more");
            let standing = store.replay_webhook(id.clone(), after).await?;
            println!(
                "replayed {id}: it resumes with the first event after seq {} (generation {})",
                standing.delivered_seq, standing.generation
            );
            Ok(())
        }
        WebhooksCommand::Enable { id } => {
            configured(config, &id)?;
            enable(&store, id).await
        }
    };
    store.close().await;
    outcome
}

/// `enable`, saying what it did: only a `DISABLED` webhook changes.
async fn enable(store: &Store, id: String) -> anyhow::Result<()> {
    let before = store
        .webhook_standings()
        .await?
        .into_iter()
        .find(|(s, _)| s.webhook == id)
        .map(|(s, _)| s.state);
    match before {
        Some(WebhookState::Disabled) => {
            if let Some(s) = store.enable_webhook(id.clone()).await? {
                println!(
                    "{id} is {}: it resumes with the first event after seq {}",
                    s.state.as_str(),
                    s.delivered_seq
                );
            }
        }
        Some(WebhookState::Expired) => println!(
            "{id} is EXPIRED, not DISABLED: nothing to enable (an EXPIRED webhook resumes with `linkid webhooks replay {id} --after SEQ`)"
        ),
        Some(state) => println!("{id} is {}, not DISABLED: nothing to enable", state.as_str()),
        None => println!(
            "{id} has no standing yet (no server has delivered it): nothing to enable"
        ),
    }
    Ok(())
}

/// Refuses an id that no `[[webhooks]]` entry has.
fn configured<'a>(config: &'a Config, id: &str) -> anyhow::Result<&'a WebhookConfig> {
    config.webhooks.iter().find(|w| w.id == id).ok_or_else(|| {
        let known: Vec<&str> = config.webhooks.iter().map(|w| w.id.as_str()).collect();
        anyhow::anyhow!(
            "no webhook {id:?} is configured (configured: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )
    })
}

async fn status(config: &Config, store: &Store, json: bool) -> anyhow::Result<()> {
    let stored = store.webhook_standings().await?;
    let mut shown = Vec::new();
    for webhook in &config.webhooks {
        let (standing, pending) = match stored.iter().find(|(s, _)| s.webhook == webhook.id) {
            Some((standing, pending)) => (standing.clone(), *pending),
            None => not_started(store, webhook).await?,
        };
        shown.push(Shown {
            id: webhook.id.clone(),
            url: webhook.url.to_string(),
            state: standing.state.as_str(),
            delivered_seq: standing.delivered_seq,
            pending,
            attempts: standing.attempts,
            last_attempt_at: standing.last_attempt_at.map(rfc3339),
            last_status: standing.last_status,
            last_error: standing.last_error,
            next_attempt_at: standing.next_attempt_at.map(rfc3339),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    if shown.is_empty() {
        println!("no webhooks are configured ([[webhooks]] in the configuration)");
    }
    for w in &shown {
        println!("{}  {}  {}", w.id, w.state, w.url);
        println!(
            "  delivered through seq {}, {} event{} waiting",
            w.delivered_seq,
            w.pending,
            if w.pending == 1 { "" } else { "s" }
        );
        if let Some(at) = &w.last_attempt_at {
            let answer = match (w.last_status, &w.last_error) {
                (_, Some(error)) => error.clone(),
                (Some(status), None) => format!("HTTP {status}"),
                (None, None) => "delivered".to_string(),
            };
            println!("  last attempt {at}: {answer}");
        }
        if w.attempts > 0 {
            println!(
                "  {} failed attempt{} at the next event",
                w.attempts,
                if w.attempts == 1 { "" } else { "s" }
            );
        }
        if let Some(at) = &w.next_attempt_at {
            println!("  next attempt {at}");
        }
        match w.state {
            "DISABLED" => println!("  the receiver answered 410 Gone: `linkid webhooks enable {}` resumes with that event", w.id),
            "EXPIRED" => println!("  events it had not received were pruned (events.retention_days): `linkid webhooks replay {} --after SEQ` resumes it", w.id),
            _ => {}
        }
    }
    Ok(())
}

/// What a webhook no server has started yet would start from (not stored:
/// `start = "now"` means the feed's end when a server first sees it).
async fn not_started(
    store: &Store,
    webhook: &WebhookConfig,
) -> anyhow::Result<(WebhookStanding, i64)> {
    store.refresh().await?;
    let newest = *store.newest_event().borrow();
    let start = match Start::parse(&webhook.start) {
        Some(Start::Beginning) => match store.events(0, 1).await {
            Ok(_) => 0,
            Err(StoreError::EventsExpired { pruned_through }) => pruned_through,
            Err(other) => return Err(other.into()),
        },
        _ => newest,
    };
    Ok((
        WebhookStanding::new(webhook.id.clone(), start),
        (newest - start).max(0),
    ))
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
