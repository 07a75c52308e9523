//! `[[webhooks]]` and `[webhook_delivery]`: the receivers the change feed is
//! pushed to (DESIGN "Webhooks").
//!
//! An entry is read as written — strings — so that one bad value does not
//! hide the others: `WebhookConfig::parse` checks it whole and names every
//! problem with its key (`webhooks[0].url`), for `check-config` and `serve`
//! alike. What it makes, a [`Webhook`], is what the delivery engine takes:
//! a URL whose `Display` and `Debug` leave its credentials out, the signing
//! secrets read from their file (which must be 0600, as the root key's
//! is), whose `Debug` shows none of them, and the filters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod credentials;

pub use credentials::{read_secret_file, ReceiverUrl, SigningSecret, SigningSecrets, WebhookUrl};

use super::problem::closest;
use super::{IdentityProviderConfig, Problem};
use crate::domain::{Event, EventType};

/// The longest webhook id: it names the webhook's row and its metrics.
const MAX_ID_CHARS: usize = 64;

/// One `[[webhooks]]` entry, as written. Even the required keys have a
/// default (empty) here, and `parse` says they are missing: an entry of a
/// list has no built-in default to mend a bad value with, so a key that
/// serde found missing would stop the reading of the whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The webhook's name (`[a-z0-9-]`, unique): its state is kept and its
    /// metrics are labelled under it.
    #[serde(default)]
    pub id: String,
    /// Where events are POSTed: http or https.
    #[serde(default)]
    pub url: WebhookUrl,
    /// The signing secrets, `whsec_<base64>` one a line; every one signs.
    #[serde(default)]
    pub secret_file: PathBuf,
    /// The event types delivered (`LINKED`, `UPDATED`, `UNLINKED`); unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// The providers whose links' events are delivered; unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<String>>,
    /// Where a webhook the database has not seen yet starts: `now` or `beginning`.
    #[serde(default = "default_start")]
    pub start: String,
}

fn default_start() -> String {
    Start::Now.as_str().to_string()
}

/// `[webhook_delivery]`: how every webhook is delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDeliveryConfig {
    /// Seconds one attempt may take, connecting and answering included.
    pub timeout_secs: u64,
    /// The longest wait between two attempts at one event.
    pub max_backoff_secs: u64,
    /// PEM certificates of a private CA that receivers' certificates may
    /// chain to, besides the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl WebhookDeliveryConfig {
    /// The time one attempt may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The longest wait between two attempts.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.max_backoff_secs)
    }

    /// Problems with the `[webhook_delivery]` keys, each naming its key.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if !(1..=3600).contains(&self.timeout_secs) {
            problems.push(Problem::new(
                "webhook_delivery.timeout_secs",
                format!("is {}", self.timeout_secs),
                "set it to 1-3600 seconds (10 is usual; Standard Webhooks suggests 15-30)",
            ));
        }
        if !(1..=86_400).contains(&self.max_backoff_secs) {
            problems.push(Problem::new(
                "webhook_delivery.max_backoff_secs",
                format!("is {}", self.max_backoff_secs),
                "set it to 1-86400 seconds (300 is usual)",
            ));
        }
        if let Some(file) = &self.ca_file {
            problems.extend(ca_file_problem(file));
        }
        problems
    }
}

/// Why `file` is not a readable file of PEM certificates, if it is not.
fn ca_file_problem(file: &Path) -> Option<Problem> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    const KEY: &str = "webhook_delivery.ca_file";
    let shown = file.display();
    let fix = "point it at the PEM file of the CA that signed the receivers' certificates";
    if !file.is_file() {
        return Some(Problem::new(KEY, format!("{shown} is not a file"), fix));
    }
    let certificates = match CertificateDer::pem_file_iter(file) {
        Ok(iter) => iter.collect::<Result<Vec<_>, _>>(),
        Err(e) => {
            return Some(Problem::new(
                KEY,
                format!("{shown} cannot be read ({e})"),
                "fix its permissions",
            ))
        }
    };
    match certificates {
        Ok(found) if !found.is_empty() => None,
        Ok(_) => Some(Problem::new(
            KEY,
            format!("{shown} holds no PEM certificate"),
            fix,
        )),
        Err(e) => Some(Problem::new(
            KEY,
            format!("{shown} is not PEM certificates ({e})"),
            fix,
        )),
    }
}

/// Where a webhook the database has no record of begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After the newest event when a server first sees the webhook.
    Now,
    /// With the oldest event kept.
    Beginning,
}

impl Start {
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Now => "now",
            Start::Beginning => "beginning",
        }
    }

    /// `start` as written (`now` or `beginning`).
    pub fn parse(text: &str) -> Option<Start> {
        [Start::Now, Start::Beginning]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A webhook as the delivery engine takes it: checked, its secrets read.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `[a-z0-9-]`, unique: the key of its state and of its metrics.
    pub id: String,
    pub url: ReceiverUrl,
    pub secrets: SigningSecrets,
    /// The types delivered; `None`: every type.
    pub events: Option<Vec<EventType>>,
    /// The providers whose events are delivered; `None`: every provider.
    pub providers: Option<Vec<String>>,
    pub start: Start,
}

impl Webhook {
    /// Whether this webhook delivers `event` (or skips it, by its filters).
    pub fn wants(&self, event: &Event) -> bool {
        self.events
            .as_ref()
            .is_none_or(|types| types.contains(&event.event_type))
            && self
                .providers
                .as_ref()
                .is_none_or(|providers| providers.contains(&event.provider_id))
    }
}

impl WebhookConfig {
    /// The webhook this entry describes (`index` is its place in
    /// `[[webhooks]]`, for the keys), or every problem with it. Reads the
    /// secret file.
    pub fn parse(
        &self,
        index: usize,
        identity_providers: &[IdentityProviderConfig],
    ) -> Result<Webhook, Vec<Problem>> {
        let key = |name: &str| format!("webhooks[{index}].{name}");
        let mut problems = Vec::new();
        let missing = |name: &str, example: &str| {
            Problem::new(
                key(name),
                "is missing",
                format!("add it, e.g. `{name} = {example}`"),
            )
        };
        if self.id.is_empty() {
            problems.push(missing("id", "\"crm\""));
        } else if !is_webhook_id(&self.id) {
            problems.push(Problem::new(
                key("id"),
                format!("{:?} is not a webhook id", self.id),
                format!("use 1-{MAX_ID_CHARS} lowercase letters, digits and -, e.g. \"crm\""),
            ));
        }
        let url = if self.url.is_empty() {
            problems.push(missing("url", "\"https://crm.internal/hooks/linkid\""));
            None
        } else {
            self.url
                .parse()
                .map_err(|why| {
                    problems.push(Problem::new(
                        key("url"),
                        why,
                        "write it as http://host[:port]/path or https://host[:port]/path",
                    ))
                })
                .ok()
        };
        let secrets = if self.secret_file.as_os_str().is_empty() {
            problems.push(missing("secret_file", "\"/etc/linkid/crm.whsec\""));
            None
        } else {
            read_secret_file(&key("secret_file"), &self.secret_file)
                .map_err(|problem| problems.push(problem))
                .ok()
        };
        let events = self.events.as_ref().map(|names| {
            if names.is_empty() {
                problems.push(Problem::new(
                    key("events"),
                    "is empty, so nothing would be delivered",
                    "leave it out to deliver every type, or name some of LINKED, UPDATED, UNLINKED",
                ));
            }
            let known = EventType::ALL.map(EventType::as_str);
            names
                .iter()
                .enumerate()
                .filter_map(|(i, name)| {
                    let parsed = EventType::parse(name);
                    if parsed.is_none() {
                        let fix = match closest(name, &known) {
                            Some(near) => format!("did you mean `{near}`?"),
                            None => format!("use one of {}", known.join(", ")),
                        };
                        problems.push(Problem::new(
                            format!("webhooks[{index}].events[{i}]"),
                            format!("{name:?} is not an event type"),
                            fix,
                        ));
                    }
                    parsed
                })
                .collect::<Vec<_>>()
        });
        if let Some(names) = &self.providers {
            if names.is_empty() {
                problems.push(Problem::new(
                    key("providers"),
                    "is empty, so nothing would be delivered",
                    "leave it out to deliver every provider's events, or name some",
                ));
            }
            let known: Vec<&str> = identity_providers.iter().map(|p| p.id.as_str()).collect();
            for (i, name) in names.iter().enumerate() {
                if !known.contains(&name.as_str()) {
                    let fix = match closest(name, &known) {
                        Some(near) => format!("did you mean `{near}`?"),
                        None if known.is_empty() => {
                            "configure it under [[identity_providers]] first".to_string()
                        }
                        None => format!("use an [[identity_providers]] id: {}", known.join(", ")),
                    };
                    problems.push(Problem::new(
                        format!("webhooks[{index}].providers[{i}]"),
                        format!("{name:?} is not a configured identity provider"),
                        fix,
                    ));
                }
            }
        }
        let start = Start::parse(&self.start);
        if start.is_none() {
            problems.push(Problem::new(
                key("start"),
                format!("{:?} is not a start", self.start),
                "use \"now\" (the feed's end when a server first sees the webhook) or \"beginning\"",
            ));
        }
        match (url, secrets, events, start) {
            (Some(url), Some(secrets), events, Some(start)) if problems.is_empty() => Ok(Webhook {
                id: self.id.clone(),
                url,
                secrets,
                events,
                providers: self.providers.clone(),
                start,
            }),
            _ => Err(problems),
        }
    }
}

/// `[a-z0-9-]`, 1 to 64 characters.
fn is_webhook_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Every problem with the `[[webhooks]]` entries, duplicate ids included.
pub(crate) fn problems(
    webhooks: &[WebhookConfig],
    identity_providers: &[IdentityProviderConfig],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, webhook) in webhooks.iter().enumerate() {
        if let Err(found) = webhook.parse(i, identity_providers) {
            problems.extend(found);
        }
        if webhooks[..i].iter().any(|earlier| earlier.id == webhook.id) {
            problems.push(Problem::new(
                format!("webhooks[{i}].id"),
                format!("{:?} is used twice", webhook.id),
                "webhook ids must be unique: each one's state is kept under it",
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use base64::Engine as _;

    use super::*;

    /// The Standard Webhooks reference libraries' test secret (24 bytes).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    fn secret_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("hook.whsec");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn okta() -> Vec<IdentityProviderConfig> {
        vec![IdentityProviderConfig {
            id: "okta".into(),
            display_name: "Okta".into(),
            protocol: crate::domain::Protocol::Oidc,
            linkable: true,
            case_insensitive_ids: false,
        }]
    }

    fn entry(url: &str, secret_file: &Path) -> WebhookConfig {
        WebhookConfig {
            id: "crm".into(),
            url: WebhookUrl::new(url),
            secret_file: secret_file.to_path_buf(),
            events: None,
            providers: None,
            start: "now".into(),
        }
    }

    #[test]
    fn a_secret_file_holds_one_whsec_secret_a_line_with_comments_between() {
        let text = format!("# current\n{SECRET}\n\n# old, until June\nwhsec_{}\n", {
            base64::engine::general_purpose::STANDARD.encode([7u8; 64])
        });

        let secrets = SigningSecrets::parse(&text).unwrap();

        assert_eq!(secrets.iter().count(), 2);
        assert_eq!(secrets.iter().next().unwrap().expose().len(), 24);
    }

    #[test]
    fn a_secret_outside_24_to_64_bytes_or_without_its_prefix_is_refused_by_line() {
        let short = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([1u8; 23])
        );
        let long = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([1u8; 65])
        );
        for (text, says) in [
            (short.as_str(), "line 1"),
            (&format!("{SECRET}\n{long}"), "line 2"),
            ("C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "line 1 is not whsec_"),
            ("whsec_not base64!", "line 1 is not whsec_"),
            ("# only a comment\n", "no line holds a whsec_ secret"),
        ] {
            let why = SigningSecrets::parse(text).unwrap_err();

            assert!(why.contains(says), "{text:?}: {why}");
            assert!(!why.contains("C2FV"), "never the secret: {why}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let secrets = SigningSecrets::parse(SECRET).unwrap();

        let shown = format!("{secrets:?}");

        assert!(!shown.contains("C2FV"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn a_secret_file_readable_by_others_is_refused_with_chmod_600_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), SECRET, 0o640);

        let problem = read_secret_file("webhooks[0].secret_file", &path).unwrap_err();

        assert_eq!(problem.key, "webhooks[0].secret_file");
        assert!(problem.fix.contains("chmod 600"), "{problem}");
        assert!(!problem.to_string().contains("C2FV"), "{problem}");
    }

    #[test]
    fn a_missing_or_huge_secret_file_is_a_problem_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_secret_file("k", &dir.path().join("none")).unwrap_err();
        let device = read_secret_file("k", Path::new("/dev/zero")).unwrap_err();

        assert!(missing.what.contains("cannot be read"), "{missing}");
        assert!(device.what.contains("is not a file"), "{device}");
    }

    #[test]
    fn a_url_shows_without_its_credentials_everywhere() {
        let url = WebhookUrl::new("https://hook-user:pw-7q@crm.internal:8443/hooks/linkid?x=1");

        let parsed = url.parse().unwrap();

        assert_eq!(
            parsed.to_string(),
            "https://crm.internal:8443/hooks/linkid?x=1"
        );
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            format!("{parsed:?}"),
            serde_json::to_string(&url).unwrap(),
        ] {
            assert!(!shown.contains("pw-7q"), "{shown}");
            assert!(!shown.contains("hook-user"), "{shown}");
        }
        assert_eq!(parsed.expose().password(), Some("pw-7q"));
        assert_eq!(
            parsed.credentials().collect::<Vec<_>>(),
            ["hook-user", "pw-7q"]
        );
    }

    #[test]
    fn only_http_and_https_urls_with_a_host_are_receivers() {
        for (text, says) in [
            ("ftp://host/x", "scheme `ftp`"),
            ("mailto:ops@example.com", "scheme `mailto`"),
            ("crm.internal/hooks", "is not a URL"),
            ("http://:pw-7q@/x", "is not a URL"),
            ("https://", "is not a URL"),
        ] {
            let why = WebhookUrl::new(text).parse().unwrap_err();

            assert!(why.contains(says), "{text}: {why}");
            assert!(!why.contains("pw-7q"), "{text}: {why}");
        }
        assert!(WebhookUrl::new("http://127.0.0.1:9000/hook")
            .parse()
            .is_ok());
        assert!(WebhookUrl::new("http://[::1]:9000/").parse().is_ok());
    }

    #[test]
    fn ids_are_lowercase_letters_digits_and_dashes() {
        for good in ["crm", "sessions-2", "0"] {
            assert!(is_webhook_id(good), "{good}");
        }
        for bad in ["", "CRM", "crm_1", "crm.1", "crm hook", &"a".repeat(65)] {
            assert!(!is_webhook_id(bad), "{bad}");
        }
    }

    #[test]
    fn every_problem_of_an_entry_is_named_with_its_key_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = entry("ftp://u:pw-7q@crm/x", &dir.path().join("none.whsec"));
        bad.id = "CRM".into();
        bad.events = Some(vec!["LINKED".into(), "UNLINK".into()]);
        bad.providers = Some(vec!["okat".into()]);
        bad.start = "later".into();

        let problems = bad.parse(2, &okta()).unwrap_err();

        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "webhooks[2].id",
                "webhooks[2].url",
                "webhooks[2].secret_file",
                "webhooks[2].events[1]",
                "webhooks[2].providers[0]",
                "webhooks[2].start"
            ]
        );
        let text: Vec<String> = problems.iter().map(Problem::to_string).collect();
        let text = text.join("\n");
        assert!(text.contains("did you mean `UNLINKED`?"), "{text}");
        assert!(text.contains("did you mean `okta`?"), "{text}");
        assert!(!text.contains("pw-7q"), "{text}");
    }

    #[test]
    fn a_missing_id_url_or_secret_file_is_named_as_missing() {
        let mut bare = entry("", Path::new(""));
        bare.id = String::new();

        let problems = bare.parse(0, &okta()).unwrap_err();

        let shown: Vec<String> = problems.iter().map(Problem::to_string).collect();
        assert_eq!(
            shown,
            [
                "webhooks[0].id: is missing — add it, e.g. `id = \"crm\"`",
                "webhooks[0].url: is missing — add it, e.g. `url = \"https://crm.internal/hooks/linkid\"`",
                "webhooks[0].secret_file: is missing — add it, e.g. `secret_file = \"/etc/linkid/crm.whsec\"`",
            ]
        );
    }

    #[test]
    fn a_good_entry_becomes_a_webhook_that_filters_by_type_and_provider() {
        let dir = tempfile::tempdir().unwrap();
        let mut good = entry(
            "https://crm.internal/hooks",
            &secret_file(dir.path(), SECRET, 0o600),
        );
        good.events = Some(vec!["UNLINKED".into()]);
        good.providers = Some(vec!["okta".into()]);
        good.start = "beginning".into();
        let event = |event_type, provider: &str| Event {
            seq: 1,
            event_type,
            occurred_at: "2026-01-01T00:00:00Z".into(),
            user_id: "u-1".into(),
            provider_id: provider.into(),
            linked_user_id: "x".into(),
            linked_username: "x@example.com".into(),
            actor: "a".into(),
            subject: None,
            request_id: None,
        };

        let webhook = good.parse(0, &okta()).unwrap();

        assert_eq!(webhook.start, Start::Beginning);
        assert!(webhook.wants(&event(EventType::Unlinked, "okta")));
        assert!(!webhook.wants(&event(EventType::Linked, "okta")));
        assert!(!webhook.wants(&event(EventType::Unlinked, "azure-ad")));
    }

    #[test]
    fn duplicate_ids_are_named_at_the_second_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret_file(dir.path(), SECRET, 0o600);
        let hooks = [entry("http://a/", &file), entry("http://b/", &file)];

        let problems = problems(&hooks, &okta());

        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "webhooks[1].id");
    }

    #[test]
    fn empty_filters_are_refused_as_delivering_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut hook = entry("http://a/", &secret_file(dir.path(), SECRET, 0o600));
        hook.events = Some(vec![]);
        hook.providers = Some(vec![]);

        let problems = hook.parse(0, &okta()).unwrap_err();

        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["webhooks[0].events", "webhooks[0].providers"]);
    }

    #[test]
    fn delivery_timeouts_and_backoffs_of_zero_and_a_ca_file_without_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let delivery = WebhookDeliveryConfig {
            timeout_secs: 0,
            max_backoff_secs: 0,
            ca_file: Some(not_pem),
        };

        let problems = delivery.problems();

        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "webhook_delivery.timeout_secs",
                "webhook_delivery.max_backoff_secs",
                "webhook_delivery.ca_file"
            ]
        );
    }
}
