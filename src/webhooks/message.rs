//! One event as a Standard Webhooks 1.0 message: its id, its body and the
//! signatures of each attempt.
//!
//! The body is `{"type", "timestamp", "data"}` with `data` the event object
//! exactly as the change feed serializes it. The signature is HMAC-SHA256
//! over `{id}.{timestamp}.{body}`, base64, prefixed `v1,` — one per secret,
//! space-separated, so that a receiver rotating its secret verifies with
//! either. The id (`evt_<seq>`) and the body are the same on every
//! attempt; only the timestamp, and so the signature, change.

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::config::SigningSecrets;
use crate::domain::{Event, EventType};

/// The message's type, Standard Webhooks style (`group.event`).
pub fn message_type(event_type: EventType) -> &'static str {
    match event_type {
        EventType::Linked => "linked_identity.linked",
        EventType::Updated => "linked_identity.updated",
        EventType::Unlinked => "linked_identity.unlinked",
    }
}

/// The body, in the order Standard Webhooks shows it.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    message_type: &'static str,
    timestamp: &'a str,
    data: &'a Event,
}

/// One event, ready to send.
#[derive(Debug, Clone)]
pub struct Message {
    id: String,
    seq: i64,
    body: Bytes,
}

impl Message {
    /// The message for `event`.
    pub fn new(event: &Event) -> Result<Message, serde_json::Error> {
        let body = serde_json::to_vec(&Payload {
            message_type: message_type(event.event_type),
            timestamp: &event.occurred_at,
            data: event,
        })?;
        Ok(Message {
            id: format!("evt_{}", event.seq),
            seq: event.seq,
            body: Bytes::from(body),
        })
    }

    /// `webhook-id`: `evt_<seq>`, the receiver's idempotency key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The event's place in the feed.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// The JSON body, as signed.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// `webhook-signature` for an attempt at `timestamp` (Unix seconds).
    pub fn signature(&self, secrets: &SigningSecrets, timestamp: i64) -> String {
        secrets
            .iter()
            .map(|secret| sign(secret.expose(), &self.id, timestamp, &self.body))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length; Err is unreachable.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let encoded = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> Event {
        Event {
            seq,
            event_type: EventType::Unlinked,
            occurred_at: "2026-11-29T10:00:00Z".into(),
            user_id: "u-42".into(),
            provider_id: "okta".into(),
            linked_user_id: "00u1a2b3c4".into(),
            linked_username: "ada@example.com".into(),
            actor: "6f1c0e1d2a3b4c5d".into(),
            subject: None,
            request_id: Some("5f0c6f0e".into()),
        }
    }

    #[test]
    fn the_standard_webhooks_reference_vector_signs_alike() {
        // The test vector of the Standard Webhooks reference libraries
        // (libraries/rust/src/lib.rs, `test_sign`, and the other languages').
        let secrets = SigningSecrets::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let key = secrets.iter().next().unwrap().expose();

        let signature = sign(
            key,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );

        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn the_body_is_type_timestamp_and_the_feeds_event_object_byte_for_byte() {
        let event = event(7);

        let message = Message::new(&event).unwrap();

        let feed_json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            std::str::from_utf8(message.body()).unwrap(),
            format!(
                r#"{{"type":"linked_identity.unlinked","timestamp":"2026-11-29T10:00:00Z","data":{feed_json}}}"#
            )
        );
        assert_eq!(message.id(), "evt_7");
    }

    #[test]
    fn every_secret_signs_one_space_separated_signature() {
        let old = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([9u8; 32])
        );
        let secrets =
            SigningSecrets::parse(&format!("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\n{old}"))
                .unwrap();
        let message = Message::new(&event(1)).unwrap();

        let header = message.signature(&secrets, 1_700_000_000);

        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
        assert_ne!(
            header,
            message.signature(&secrets, 1_700_000_001),
            "each attempt's timestamp is signed"
        );
    }

    #[test]
    fn the_types_name_the_change() {
        let names = EventType::ALL.map(message_type);
        assert_eq!(
            names,
            [
                "linked_identity.linked",
                "linked_identity.updated",
                "linked_identity.unlinked"
            ]
        );
    }
}
