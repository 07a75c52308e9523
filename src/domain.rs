//! The API's vocabulary, below every other module: identifiers parsed at the
//! edge (`text`), the table of operations, and the JSON shapes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod text;

pub use text::{
    case_fold, check_text, nfc, normalize_text, IdRules, LinkedUserId, LinkedUsername, ProviderId,
    UserId, MAX_TEXT_CHARS, TEXT_PATTERN,
};

/// The prefix every API operation lives under.
pub const API_PREFIX: &str = "/api/admin/users/v4";

/// What a token may be granted: the values of the authorizer's
/// `operation($op)` fact and of a token's `right($op)` facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    IdentityProvidersList,
    LinkedIdentitiesList,
    LinkedIdentitiesCreate,
    LinkedIdentitiesDelete,
    LinkedIdentitiesSearch,
    EventsList,
}

impl Right {
    pub const ALL: [Right; 6] = [
        Right::IdentityProvidersList,
        Right::LinkedIdentitiesList,
        Right::LinkedIdentitiesCreate,
        Right::LinkedIdentitiesDelete,
        Right::LinkedIdentitiesSearch,
        Right::EventsList,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Right::IdentityProvidersList => "identity_providers:list",
            Right::LinkedIdentitiesList => "linked_identities:list",
            Right::LinkedIdentitiesCreate => "linked_identities:create",
            Right::LinkedIdentitiesDelete => "linked_identities:delete",
            Right::LinkedIdentitiesSearch => "linked_identities:search",
            Right::EventsList => "events:list",
        }
    }

    pub fn parse(text: &str) -> Option<Right> {
        Right::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// The one table of API operations: the router, the metrics labels, the
/// 405 `Allow` header, the OpenAPI document and the authorizer all read it,
/// so a new operation is added here and in its handler, nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ListIdentityProviders,
    ListLinkedIdentities,
    LinkIdentity,
    GetLinkedIdentity,
    DeleteLinkedIdentity,
    SearchLinkedIdentities,
    ListEvents,
}

/// One row of the operations table.
#[derive(Debug, Clone, Copy)]
pub struct OperationSpec {
    /// The OpenAPI `operationId`, also the metrics label.
    pub id: &'static str,
    pub method: &'static str,
    /// The route template, as the OpenAPI document writes it.
    pub route: &'static str,
    /// The right the authorizer is asked about.
    pub right: Right,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::ListIdentityProviders,
        Operation::ListLinkedIdentities,
        Operation::LinkIdentity,
        Operation::GetLinkedIdentity,
        Operation::DeleteLinkedIdentity,
        Operation::SearchLinkedIdentities,
        Operation::ListEvents,
    ];

    pub const fn spec(self) -> OperationSpec {
        const fn row(
            id: &'static str,
            method: &'static str,
            route: &'static str,
            right: Right,
        ) -> OperationSpec {
            OperationSpec {
                id,
                method,
                route,
                right,
            }
        }
        match self {
            Operation::ListIdentityProviders => row(
                "listIdentityProviders",
                "GET",
                "/api/admin/users/v4/users/identity-providers",
                Right::IdentityProvidersList,
            ),
            Operation::ListLinkedIdentities => row(
                "listLinkedIdentities",
                "GET",
                "/api/admin/users/v4/users/{user_id}/linked-identities",
                Right::LinkedIdentitiesList,
            ),
            Operation::LinkIdentity => row(
                "linkIdentity",
                "POST",
                "/api/admin/users/v4/users/{user_id}/linked-identities",
                Right::LinkedIdentitiesCreate,
            ),
            Operation::GetLinkedIdentity => row(
                "getLinkedIdentity",
                "GET",
                "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
                Right::LinkedIdentitiesList,
            ),
            Operation::DeleteLinkedIdentity => row(
                "deleteLinkedIdentity",
                "DELETE",
                "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
                Right::LinkedIdentitiesDelete,
            ),
            Operation::SearchLinkedIdentities => row(
                "searchLinkedIdentities",
                "GET",
                "/api/admin/users/v4/linked-identities",
                Right::LinkedIdentitiesSearch,
            ),
            Operation::ListEvents => row(
                "listEvents",
                "GET",
                "/api/admin/users/v4/linked-identities/events",
                Right::EventsList,
            ),
        }
    }

    pub fn id(self) -> &'static str {
        self.spec().id
    }

    pub fn right(self) -> Right {
        self.spec().right
    }
}

/// A link request after validation.
#[derive(Debug, Clone)]
pub struct NewLink {
    pub provider_id: ProviderId,
    pub linked_user_id: LinkedUserId,
    pub linked_username: LinkedUsername,
}

/// One stored link: the user and the identity. The search answer's item,
/// and one line of `linkid export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "user_id": "u-42",
    "provider_id": "okta",
    "linked_user_id": "00u1a2b3c4",
    "linked_username": "ada@example.com",
    "created_at": "2026-11-29T10:00:00Z",
    "updated_at": "2026-11-29T10:00:00Z"
}))]
pub struct LinkRecord {
    /// The local user.
    pub user_id: String,
    /// The identity provider's alias.
    pub provider_id: String,
    /// The user's identifier at the identity provider.
    pub linked_user_id: String,
    /// The user's login name at the identity provider.
    pub linked_username: String,
    /// When the link was made (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When the link last changed (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub updated_at: String,
}

impl LinkRecord {
    /// The identity as the user-scoped operations show it (no `user_id`).
    pub fn into_identity(self) -> LinkedIdentity {
        LinkedIdentity {
            provider_id: self.provider_id,
            linked_user_id: self.linked_user_id,
            linked_username: self.linked_username,
            created_at: self.created_at,
            updated_at: self.updated_at,
            actions: None,
        }
    }
}

/// Who made a change, for the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The token's log id (as in the request log), or `import`.
    pub actor: String,
    /// The token's `subject` fact, if it has one.
    pub subject: Option<String>,
    /// The request's id; none for imports.
    pub request_id: Option<String>,
}

impl Actor {
    /// `linkid import`'s changes.
    pub fn import() -> Actor {
        Actor {
            actor: "import".into(),
            subject: None,
            request_id: None,
        }
    }
}

/// What a change did to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    /// A new link.
    Linked,
    /// The username of an existing link changed.
    Updated,
    /// A link was deleted.
    Unlinked,
}

impl EventType {
    /// Every type, in the order the API lists them.
    pub const ALL: [EventType; 3] = [EventType::Linked, EventType::Updated, EventType::Unlinked];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Linked => "LINKED",
            EventType::Updated => "UPDATED",
            EventType::Unlinked => "UNLINKED",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

/// One change, as the change feed tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "seq": 42,
    "type": "LINKED",
    "occurred_at": "2026-11-29T10:00:00Z",
    "user_id": "u-42",
    "provider_id": "okta",
    "linked_user_id": "00u1a2b3c4",
    "linked_username": "ada@example.com",
    "actor": "6f1c0e1d2a3b4c5d",
    "subject": "provisioning-bot",
    "request_id": "5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10"
}))]
pub struct Event {
    /// The event's place in the feed: ascending in commit order.
    pub seq: i64,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the change was committed (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub occurred_at: String,
    pub user_id: String,
    pub provider_id: String,
    pub linked_user_id: String,
    /// The username after the change (before it, for UNLINKED).
    pub linked_username: String,
    /// Who changed it: the token's log id (as in the request log), or `import`.
    pub actor: String,
    /// The token's `subject` fact, when it has one.
    pub subject: Option<String>,
    /// The request that made the change; null for imports.
    pub request_id: Option<String>,
}

/// The protocol an identity provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Protocol {
    #[serde(rename = "OIDC")]
    Oidc,
    #[serde(rename = "SAML")]
    Saml,
}

/// An identity provider a user can be linked to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"provider_id": "okta", "display_name": "Okta", "protocol": "OIDC"}))]
pub struct IdentityProvider {
    /// The provider's alias, used as `provider_id` everywhere.
    pub provider_id: String,
    /// A name to show to people.
    pub display_name: String,
    pub protocol: Protocol,
}

/// The linkable identity providers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IdentityProviderList {
    pub identity_providers: Vec<IdentityProvider>,
}

/// An action the presented token may perform on one linked identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum IdentityAction {
    #[serde(rename = "DELETE")]
    Delete,
}

/// An action the presented token may perform on a user's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ListAction {
    #[serde(rename = "CREATE")]
    Create,
}

/// An account at a remote identity provider linked to a local user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "provider_id": "okta",
    "linked_user_id": "00u1a2b3c4",
    "linked_username": "ada@example.com",
    "created_at": "2026-11-29T10:00:00Z",
    "updated_at": "2026-11-29T10:00:00Z"
}))]
pub struct LinkedIdentity {
    /// The identity provider's alias.
    pub provider_id: String,
    /// The user's identifier at the identity provider.
    pub linked_user_id: String,
    /// The user's login name at the identity provider.
    pub linked_username: String,
    /// When the link was made (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When the link last changed (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// With `embed=ACTIONS` only: what the presented token may do to this identity now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub actions: Option<Vec<IdentityAction>>,
}

/// A user's linked identities.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkedIdentityList {
    pub linked_identities: Vec<LinkedIdentity>,
    /// With `embed=ACTIONS` only: what the presented token may do to this list now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub actions: Option<Vec<ListAction>>,
}

/// The body of a link request. Every field is required; no others are allowed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "provider_id": "okta",
    "linked_user_id": "00u1a2b3c4",
    "linked_username": "ada@example.com"
}))]
pub struct LinkRequest {
    /// The alias of a configured, linkable identity provider: one of the
    /// `provider_id`s that `listIdentityProviders` returns. The set depends on
    /// the server's configuration, so it is not an `enum` here; any other value
    /// is a 400 `INVALID_IDENTITY_PROVIDER`.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$"
    )]
    pub provider_id: String,
    /// The user's identifier at the identity provider: stored as given, in
    /// Unicode NFC, and compared ignoring case at a provider configured with
    /// `case_insensitive_ids`. Control, bidirectional formatting and
    /// invisible characters (Unicode Cf, Zl, Zp and default-ignorable code
    /// points) are refused.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$"
    )]
    pub linked_user_id: String,
    /// The user's login name or e-mail at the identity provider.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$"
    )]
    pub linked_username: String,
}

/// A JSON object's members in order, duplicates kept, so that every
/// problem — a member named twice among them — can be reported by name
/// (serde_json's own maps keep the last of two).
pub struct JsonMembers(pub Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for JsonMembers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = JsonMembers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<JsonMembers, M::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    members.push(entry);
                }
                Ok(JsonMembers(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// What to embed in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Embed {
    #[serde(rename = "ACTIONS")]
    Actions,
}

/// Where a webhook's delivery stands: `linkid webhooks status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WebhookState {
    /// Delivering, or waiting for the next event.
    Active,
    /// The last attempt failed; the next is scheduled.
    Retrying,
    /// The receiver answered 410 Gone: nothing is sent until it is enabled.
    Disabled,
    /// The event it waits on was pruned by retention before it was delivered.
    Expired,
}

impl WebhookState {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookState::Active => "ACTIVE",
            WebhookState::Retrying => "RETRYING",
            WebhookState::Disabled => "DISABLED",
            WebhookState::Expired => "EXPIRED",
        }
    }

    pub fn parse(text: &str) -> Option<WebhookState> {
        [
            WebhookState::Active,
            WebhookState::Retrying,
            WebhookState::Disabled,
            WebhookState::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// Where one webhook stands, as kept in the database so that a restart
/// resumes there. The delivery engine (`webhooks`) writes it, the store
/// keeps it and the CLI shows it, so it lives here, below all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookStanding {
    /// The webhook's id (`[[webhooks]] id`).
    pub webhook: String,
    pub state: WebhookState,
    /// Every event up to this `seq` was delivered or skipped by the
    /// webhook's filters; the next attempt is at the first one after it.
    pub delivered_seq: i64,
    /// Failed attempts at that next event (0 once one is delivered).
    pub attempts: u32,
    pub last_attempt_at: Option<std::time::SystemTime>,
    /// The last answer's status; none when no answer came.
    pub last_status: Option<u16>,
    /// Why the last attempt failed, in words (never a secret or URL credentials).
    pub last_error: Option<String>,
    /// When the next attempt is due, while `RETRYING`.
    pub next_attempt_at: Option<std::time::SystemTime>,
    /// Bumped by an operator's replay or enable: the engine's writes apply
    /// only to the generation they read, so neither is overwritten.
    pub generation: i64,
}

impl WebhookStanding {
    /// A webhook seen for the first time: active, with everything up to
    /// `delivered_seq` counted as delivered.
    pub fn new(webhook: impl Into<String>, delivered_seq: i64) -> WebhookStanding {
        WebhookStanding {
            webhook: webhook.into(),
            state: WebhookState::Active,
            delivered_seq,
            attempts: 0,
            last_attempt_at: None,
            last_status: None,
            last_error: None,
            next_attempt_at: None,
            generation: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_distinct_id_and_method_per_route() {
        let mut seen = std::collections::HashSet::new();
        for op in Operation::ALL {
            let spec = op.spec();
            assert!(seen.insert(spec.id), "{}", spec.id);
            assert!(seen.insert(Box::leak(
                format!("{} {}", spec.method, spec.route).into_boxed_str()
            )));
            assert!(spec.route.starts_with(API_PREFIX));
        }
    }
}
