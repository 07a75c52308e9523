//! One attempt at one message: the HTTP POST and what its answer means.
//!
//! The client (reqwest, rustls with ring) follows no redirect, bounds the
//! whole attempt — connecting, sending and the answer — by
//! `webhook_delivery.timeout_secs`, and reads at most 64 KiB of an answer:
//! a receiver's answer is input, and it can be anything. A 2xx is a
//! delivery; 410 Gone says the receiver wants no more; everything else is
//! a failure the schedule retries. What an attempt says of itself
//! (`Attempt::detail`) never holds the URL's credentials.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use base64::Engine as _;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use super::message::Message;
use crate::config::{ReceiverUrl, SigningSecrets};

/// The most of an answer's body that is read; the rest is left unread.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The most of an answer's body quoted in `last_error`.
const EXCERPT_CHARS: usize = 200;

/// How an attempt ended; its `label` is the metrics' `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// 410 Gone: the receiver asks for no more.
    Gone,
    /// Another answer than 2xx, 3xx or 410.
    Rejected,
    /// A 3xx answer: redirects are not followed.
    Redirected,
    /// No answer within the timeout.
    Timeout,
    /// No connection: refused, no route, no such host, a TLS failure.
    Unreachable,
    /// Any other failure (the connection closed before an answer, ...).
    Failed,
}

impl Outcome {
    /// The `outcome` label of `linkid_webhook_deliveries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Gone => "gone",
            Outcome::Rejected => "rejected",
            Outcome::Redirected => "redirected",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Failed => "failed",
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: Outcome,
    /// The answer's status, when an answer came.
    pub status: Option<u16>,
    /// Why it failed, in words, for `last_error` and the log.
    pub detail: Option<String>,
    /// The answer's `Retry-After`, in seconds, when it gave one.
    pub retry_after: Option<Duration>,
}

impl Attempt {
    fn failed(outcome: Outcome, detail: String) -> Attempt {
        Attempt {
            outcome,
            status: None,
            detail: Some(detail),
            retry_after: None,
        }
    }
}

/// Sends messages: one client for every webhook, so connections to a
/// receiver are kept and reused between its events.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    timeout: Duration,
}

impl Sender {
    /// A sender whose attempts take at most `timeout`, trusting the
    /// system's roots and the certificates in `ca_file`.
    pub fn new(timeout: Duration, ca_file: Option<&Path>) -> anyhow::Result<Sender> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("linkid-webhooks/", env!("CARGO_PKG_VERSION")));
        if let Some(file) = ca_file {
            let pem = std::fs::read(file).with_context(|| {
                format!("webhook_delivery.ca_file {} cannot be read", file.display())
            })?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "webhook_delivery.ca_file {} is not PEM certificates",
                    file.display()
                )
            })? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .context("cannot make the webhooks' HTTP client")?;
        Ok(Sender { client, timeout })
    }

    /// POSTs `message` to `url`, signed with `secrets` at this moment.
    pub async fn send(
        &self,
        url: &ReceiverUrl,
        secrets: &SigningSecrets,
        message: &Message,
    ) -> Attempt {
        let attempt = self.attempt(url, secrets, message).await;
        Attempt {
            detail: attempt.detail.map(|d| scrub(d, url)),
            ..attempt
        }
    }

    async fn attempt(
        &self,
        url: &ReceiverUrl,
        secrets: &SigningSecrets,
        message: &Message,
    ) -> Attempt {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // reqwest moves a user name and password in the URL to an
        // Authorization: Basic header, and out of its errors' URL.
        let request = self
            .client
            .post(url.expose().clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", message.id())
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", message.signature(secrets, timestamp))
            .body(message.body().clone());
        // reqwest's own timeout covers the same; this one also bounds the
        // body read below, whatever the client does.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let no_answer = || {
            Attempt::failed(
                Outcome::Timeout,
                format!("no answer within {}", shown(self.timeout)),
            )
        };
        let response = match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => return no_answer(),
            Ok(Err(error)) if error.is_timeout() => return no_answer(),
            Ok(Err(error)) => {
                let outcome = if error.is_connect() {
                    Outcome::Unreachable
                } else {
                    Outcome::Failed
                };
                return Attempt::failed(outcome, transport_error(error));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // A 2xx is a delivery even if its body then stalls: the receiver
        // has said yes. The body is read (to 64 KiB) so that the connection
        // can be reused, and quoted when the answer is a failure.
        let body = tokio::time::timeout_at(deadline, read_capped(response))
            .await
            .unwrap_or_default();
        judge(status, &body, retry_after)
    }
}

/// What an answer means.
fn judge(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Attempt {
    let code = status.as_u16();
    let said = match status.canonical_reason() {
        Some(reason) => format!("answered {code} {reason}"),
        None => format!("answered {code}"),
    };
    let (outcome, detail) = if status.is_success() {
        (Outcome::Delivered, None)
    } else if status == StatusCode::GONE {
        (
            Outcome::Gone,
            Some(format!(
                "{said}: the receiver wants no more deliveries, so the webhook is disabled until `linkid webhooks enable`"
            )),
        )
    } else if status.is_redirection() {
        (
            Outcome::Redirected,
            Some(format!(
                "{said}, a redirect: redirects are not followed; set the webhook's url to where it leads"
            )),
        )
    } else {
        let excerpt = excerpt(body);
        (
            Outcome::Rejected,
            Some(if excerpt.is_empty() {
                said
            } else {
                format!("{said}: {excerpt}")
            }),
        )
    };
    Attempt {
        outcome,
        status: Some(code),
        detail,
        retry_after,
    }
}

/// Reads at most `MAX_ANSWER_BYTES` of the body; a read error ends it.
async fn read_capped(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ANSWER_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    body
}

/// `Retry-After` in seconds (the date form is not used by receivers worth
/// the code).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The start of an answer's body on one line, for people: printable
/// characters only, at most `EXCERPT_CHARS` of them.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for (i, c) in text
        .split_whitespace()
        .flat_map(|word| word.chars().chain([' ']))
        .enumerate()
    {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out.trim_end().to_string()
}

/// A transport error's cause chain, without the URL.
fn transport_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut parts = vec![error.to_string()];
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&error);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// `text` with every credential of `url` blanked: an error or an answer
/// that happens to quote one (or the Basic authorization made of them)
/// must not carry it to a log or the database.
fn scrub(mut text: String, url: &ReceiverUrl) -> String {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.expose().username());
    let password = url.expose().password().map(decode);
    let basic = password.as_ref().map(|password| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    });
    let mut forms: Vec<String> = url.credentials().map(str::to_string).collect();
    forms.extend([Some(user), password, basic].into_iter().flatten());
    // Shorter ones are no secret, and blanking every `a` would garble the text.
    for form in forms {
        if form.chars().count() >= 3 && text.contains(&form) {
            text = text.replace(&form, "***");
        }
    }
    text
}

/// `10 s`, `250 ms`.
fn shown(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_receiver::{Answer, Receiver};
    use super::*;
    use crate::domain::{Event, EventType};

    fn secrets() -> SigningSecrets {
        SigningSecrets::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap()
    }

    fn message(seq: i64) -> Message {
        Message::new(&Event {
            seq,
            event_type: EventType::Linked,
            occurred_at: "2026-01-01T00:00:00Z".into(),
            user_id: "u-1".into(),
            provider_id: "okta".into(),
            linked_user_id: "r-1".into(),
            linked_username: "u1@example.com".into(),
            actor: "t".into(),
            subject: None,
            request_id: None,
        })
        .unwrap()
    }

    fn sender(timeout_ms: u64) -> Sender {
        Sender::new(Duration::from_millis(timeout_ms), None).unwrap()
    }

    async fn send_to(receiver: &Receiver, timeout_ms: u64) -> Attempt {
        sender(timeout_ms)
            .send(&receiver.url(), &secrets(), &message(3))
            .await
    }

    #[tokio::test]
    async fn a_2xx_is_a_delivery_of_a_signed_json_post() {
        let receiver = Receiver::start(|_| Answer::status(204)).await;

        let attempt = send_to(&receiver, 5000).await;

        assert_eq!(attempt.outcome, Outcome::Delivered);
        assert_eq!(attempt.status, Some(204));
        let request = &receiver.requests()[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("webhook-id"), Some("evt_3"));
        let timestamp: i64 = request
            .header("webhook-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            request.header("webhook-signature").unwrap(),
            super::super::message::sign(
                secrets().iter().next().unwrap().expose(),
                "evt_3",
                timestamp,
                &request.body
            )
        );
        assert_eq!(request.body, message(3).body().to_vec());
    }

    #[tokio::test]
    async fn a_500_is_rejected_with_the_start_of_its_answer_quoted() {
        let receiver =
            Receiver::start(|_| Answer::status(500).body("database\nis down\u{7}")).await;

        let attempt = send_to(&receiver, 5000).await;

        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert_eq!(attempt.status, Some(500));
        assert_eq!(
            attempt.detail.as_deref(),
            Some("answered 500 Internal Server Error: database is down")
        );
    }

    #[tokio::test]
    async fn a_redirect_is_a_failure_and_is_not_followed() {
        let target = Receiver::start(|_| Answer::status(200)).await;
        let location = target.url().to_string();
        let receiver =
            Receiver::start(move |_| Answer::status(307).header("location", &location)).await;

        let attempt = send_to(&receiver, 5000).await;

        assert_eq!(attempt.outcome, Outcome::Redirected);
        assert_eq!(attempt.status, Some(307));
        assert!(target.requests().is_empty(), "the redirect was followed");
    }

    #[tokio::test]
    async fn a_410_says_gone_and_retry_after_is_read() {
        let gone = Receiver::start(|_| Answer::status(410)).await;
        let busy = Receiver::start(|_| Answer::status(503).header("retry-after", "7")).await;

        let gone = send_to(&gone, 5000).await;
        let busy = send_to(&busy, 5000).await;

        assert_eq!(gone.outcome, Outcome::Gone);
        assert_eq!(busy.outcome, Outcome::Rejected);
        assert_eq!(busy.retry_after, Some(Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_times_out() {
        let receiver = Receiver::start(|_| Answer::Hang).await;

        let started = std::time::Instant::now();
        let attempt = send_to(&receiver, 300).await;

        assert_eq!(attempt.outcome, Outcome::Timeout);
        assert_eq!(attempt.detail.as_deref(), Some("no answer within 300 ms"));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let url = crate::config::WebhookUrl::new(format!("http://{closed}/hook"))
            .parse()
            .unwrap();

        let attempt = sender(5000).send(&url, &secrets(), &message(1)).await;

        assert_eq!(attempt.outcome, Outcome::Unreachable, "{attempt:?}");
        assert!(attempt.detail.is_some());
    }

    #[tokio::test]
    async fn an_endless_answer_is_read_to_64_kib_and_no_further() {
        let receiver = Receiver::start(|_| Answer::Endless(500)).await;

        let attempt = send_to(&receiver, 10_000).await;

        // Reading on would have met the timeout instead.
        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert!(attempt.detail.unwrap().chars().count() < EXCERPT_CHARS + 40);
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_sent_as_basic_auth_and_never_said() {
        let receiver = Receiver::start(|request| {
            // A receiver that quotes what it was sent.
            let auth = request.header("authorization").unwrap_or("").to_string();
            Answer::status(401).body(&format!("bad credentials hook:pw-7q {auth}"))
        })
        .await;
        let mut url = receiver.url().expose().clone();
        url.set_username("hook").unwrap();
        url.set_password(Some("pw-7q")).unwrap();
        let url = crate::config::WebhookUrl::new(url.to_string())
            .parse()
            .unwrap();

        let attempt = sender(5000).send(&url, &secrets(), &message(1)).await;

        let request = &receiver.requests()[0];
        let authorization = request.header("authorization").unwrap();
        assert_eq!(authorization, "Basic aG9vazpwdy03cQ==");
        let detail = attempt.detail.unwrap();
        assert!(!detail.contains("pw-7q"), "{detail}");
        assert!(!detail.contains("aG9vazpwdy03cQ"), "{detail}");
        assert!(detail.contains("bad credentials"), "{detail}");
    }

    #[test]
    fn an_excerpt_is_one_printable_line_of_at_most_200_characters() {
        assert_eq!(excerpt(b"  a\r\n\tb  "), "a b");
        assert_eq!(excerpt(&[0xff, b'x']), "\u{fffd}x");
        let long = excerpt("é".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), EXCERPT_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
