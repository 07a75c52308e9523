//! The API's vocabulary, below every other module: identifiers parsed at the
//! edge, the table of operations, and the JSON shapes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The prefix every API operation lives under.
pub const API_PREFIX: &str = "/api/admin/users/v4";

/// The most characters an identifier or username may have.
pub const MAX_TEXT_CHARS: usize = 255;

/// `check_text`'s rule as the OpenAPI document's `pattern` states it (the
/// attributes repeat it; a test holds them to this, and this to
/// `check_text`). Only the Basic Multilingual Plane: a character class over
/// code points above it is written differently in ECMA-262 and in Python, the
/// contract tools' two dialects. Above it the format characters (tags and
/// variation selectors U+E0000-E0FFF, U+1D173-1D17A, U+1BCA0-1BCA3,
/// U+13430-1343F, U+110BD, U+110CD) are refused too.
pub const TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$";

/// Why a text value was refused, phrased to follow the field's name. The
/// rule is checked on the text as it is; `normalize_text` checks its NFC form.
pub fn check_text(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("must be at most {MAX_TEXT_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    if let Some(c) = value.chars().find(|&c| is_bidi_control(c)) {
        return Err(format!(
            "must not contain bidirectional formatting characters (it holds U+{:04X})",
            u32::from(c)
        ));
    }
    if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
        return Err(format!(
            "must not contain invisible or formatting characters (it holds U+{:04X}); \
             they make different ids look the same",
            u32::from(c)
        ));
    }
    Ok(())
}

/// The value in Unicode NFC, if it keeps `check_text`'s rule: the form in
/// which identifiers and usernames are compared, stored and answered, so
/// that `josé` typed composed or decomposed is one id.
pub fn normalize_text(value: &str) -> Result<String, String> {
    let nfc = nfc(value);
    check_text(&nfc)?;
    Ok(nfc)
}

/// Unicode NFC (canonical composition) of `text`.
pub fn nfc(text: &str) -> String {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfc()
        .normalize(text)
        .into_owned()
}

/// Unicode's bidirectional formatting characters — the explicit embeddings,
/// overrides and isolates, and the implicit marks LRM, RLM and ALM: in an id
/// or a username they can make what an admin reads differ from what is stored.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// Characters that show nothing, or nothing of their own: format characters
/// (general category Cf: zero-width spaces and joiners, the soft hyphen, tag
/// characters, ...), the line and paragraph separators (Zl, Zp), and every
/// Default_Ignorable_Code_Point (variation selectors, Hangul fillers, ...).
/// Two ids that differ only by them look the same to a person. The tables
/// are ICU4X's (`icu_properties`), generated from the Unicode Character
/// Database.
fn is_invisible(c: char) -> bool {
    use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory};
    let category = icu_properties::CodePointMapData::<GeneralCategory>::new().get(c);
    matches!(
        category,
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) || icu_properties::CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

/// How each identity provider compares `linked_user_id`s: exactly (the
/// default), or ignoring case (`case_insensitive_ids = true`), where
/// `00uABC` and `00uabc` are one remote identity. Built from the
/// configuration; the store keeps a comparison key per link by it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRules {
    case_insensitive: std::collections::BTreeSet<String>,
}

impl IdRules {
    /// The rules with these providers' ids compared ignoring case.
    pub fn ignoring_case_at<I, S>(providers: I) -> IdRules
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        IdRules {
            case_insensitive: providers.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether `provider` compares its ids ignoring case.
    pub fn ignores_case(&self, provider: &str) -> bool {
        self.case_insensitive.contains(provider)
    }

    /// The providers whose ids are compared ignoring case, in order.
    pub fn case_insensitive_providers(&self) -> impl Iterator<Item = &str> {
        self.case_insensitive.iter().map(String::as_str)
    }

    /// What a remote id is compared by at `provider`: the id itself (in
    /// NFC, as stored), or its case fold.
    pub fn key(&self, provider: &str, linked_user_id: &str) -> String {
        if self.ignores_case(provider) {
            case_fold(linked_user_id)
        } else {
            nfc(linked_user_id)
        }
    }
}

/// Unicode's canonical caseless form (full case folding of the canonical
/// decomposition, Unicode §3.13 D145), recomposed to NFC: two texts are the
/// same ignoring case exactly when their folds are equal (`ß` and `SS`,
/// `Σ`, `σ` and `ς`, `Å` written either way).
pub fn case_fold(text: &str) -> String {
    let nfd = icu_normalizer::DecomposingNormalizerBorrowed::new_nfd().normalize(text);
    let folded = icu_casemap::CaseMapperBorrowed::new().fold_string(&nfd);
    nfc(&folded)
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Accepts 1-255 characters without control, bidi formatting or
            /// invisible characters, and keeps them in NFC.
            pub fn parse(value: &str) -> Result<Self, String> {
                normalize_text(value).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

text_newtype!(
    /// A local user's identifier (the `user_id` path segment).
    UserId
);
text_newtype!(
    /// An identity provider's alias, as configured.
    ProviderId
);
text_newtype!(
    /// The user's identifier at the remote identity provider.
    LinkedUserId
);
text_newtype!(
    /// The user's login name or e-mail at the remote identity provider.
    LinkedUsername
);

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
    fn text_values_refuse_control_and_bidi_characters() {
        assert!(UserId::parse("u-42").is_ok());
        assert!(UserId::parse("ada/lovelace ünïcode").is_ok());
        assert_eq!(UserId::parse("").unwrap_err(), "must not be empty");
        assert!(UserId::parse("a\u{0}b").is_err());
        assert!(UserId::parse("a\u{85}b").is_err());
        for bidi in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            assert!(UserId::parse(&format!("admin{bidi}")).is_err(), "{bidi:?}");
        }
        assert!(UserId::parse(&"é".repeat(255)).is_ok());
        assert!(UserId::parse(&"é".repeat(256)).is_err());
    }

    #[test]
    fn invisible_format_and_ignorable_characters_are_refused_naming_the_code_point() {
        let refused = [
            '\u{200B}',  // zero width space (Cf)
            '\u{200C}',  // zero width non-joiner (Cf)
            '\u{200D}',  // zero width joiner (Cf)
            '\u{200E}',  // left-to-right mark
            '\u{200F}',  // right-to-left mark
            '\u{061C}',  // Arabic letter mark
            '\u{2028}',  // line separator (Zl)
            '\u{2029}',  // paragraph separator (Zp)
            '\u{2060}',  // word joiner (Cf)
            '\u{FEFF}',  // byte order mark (Cf)
            '\u{00AD}',  // soft hyphen (Cf)
            '\u{034F}',  // combining grapheme joiner (default ignorable, Mn)
            '\u{115F}',  // Hangul choseong filler (default ignorable, Lo)
            '\u{1160}',  // Hangul jungseong filler
            '\u{3164}',  // Hangul filler
            '\u{FFA0}',  // halfwidth Hangul filler
            '\u{180B}',  // Mongolian free variation selector one
            '\u{180E}',  // Mongolian vowel separator (Cf)
            '\u{180F}',  // Mongolian free variation selector four
            '\u{FE00}',  // variation selector 1
            '\u{FE0F}',  // variation selector 16
            '\u{E0001}', // language tag
            '\u{E0041}', // tag Latin capital letter A
            '\u{E0100}', // variation selector 17
            '\u{E0FFF}', // the last reserved default ignorable
            '\u{1D173}', // musical symbol begin beam (Cf)
            '\u{110BD}', // Kaithi number sign (Cf)
        ];
        for c in refused {
            let why = UserId::parse(&format!("ada{c}")).unwrap_err();
            assert!(
                why.contains(&format!("U+{:04X}", u32::from(c))),
                "{c:?}: {why}"
            );
        }
        // Visible characters near them stay allowed.
        for fine in ["ada lovelace", "zoë", "a·b", "東京", "🦀", "ﾊ", "x\u{0301}"] {
            assert!(UserId::parse(fine).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn ids_and_usernames_are_kept_in_nfc_whichever_form_they_came_in() {
        let composed = UserId::parse("jos\u{E9}").unwrap();
        let decomposed = UserId::parse("jose\u{301}").unwrap();
        assert_eq!(composed, decomposed);
        assert_eq!(decomposed.as_str(), "jos\u{E9}");
        assert_eq!(
            LinkedUsername::parse("A\u{30A}ngstr\u{F6}m")
                .unwrap()
                .as_str(),
            "\u{C5}ngstr\u{F6}m"
        );
        // 255 characters decomposed are 510 before composition: the limit
        // counts what is stored.
        assert!(UserId::parse(&"e\u{301}".repeat(255)).is_ok());
        assert_eq!(
            normalize_text("\u{212B}").unwrap(),
            "\u{C5}",
            "the angstrom sign is the letter"
        );
    }

    #[test]
    fn case_insensitive_providers_compare_ids_by_their_case_fold() {
        let rules = IdRules::ignoring_case_at(["azure-ad"]);
        assert_eq!(
            rules.key("azure-ad", "00uABC"),
            rules.key("azure-ad", "00uabc")
        );
        assert_ne!(rules.key("okta", "00uABC"), rules.key("okta", "00uabc"));
        assert_eq!(rules.key("okta", "Jose\u{301}"), "Jos\u{E9}");
        for (a, b) in [
            ("Stra\u{DF}e", "STRASSE"),
            ("\u{3A3}\u{391}\u{3A3}", "\u{3C3}\u{3B1}\u{3C2}"),
            ("A\u{30A}", "\u{E5}"),
            ("\u{212B}", "\u{E5}"),
            ("Jos\u{C9}", "jose\u{301}"),
        ] {
            assert_eq!(case_fold(a), case_fold(b), "{a:?} {b:?}");
        }
        assert_eq!(case_fold("00uABC"), "00uabc");
        assert!(rules.ignores_case("azure-ad") && !rules.ignores_case("okta"));
        assert_eq!(
            IdRules::default(),
            IdRules::ignoring_case_at(Vec::<String>::new())
        );
    }

    /// Every character `check_text` refuses in the Basic Multilingual Plane,
    /// as a regular expression character class body.
    fn refused_bmp_class() -> String {
        let refused =
            |c: u32| char::from_u32(c).is_some_and(|c| check_text(&c.to_string()).is_err());
        let escape = |c: u32| {
            if c < 0x100 {
                format!("\\x{c:02X}")
            } else {
                format!("\\u{c:04X}")
            }
        };
        let mut class = String::new();
        let mut c = 0;
        while c <= 0xFFFF {
            if !refused(c) {
                c += 1;
                continue;
            }
            let start = c;
            while c < 0xFFFF && refused(c + 1) {
                c += 1;
            }
            class.push_str(&escape(start));
            if c > start {
                class.push('-');
                class.push_str(&escape(c));
            }
            c += 1;
        }
        class
    }

    #[test]
    fn the_documents_pattern_refuses_exactly_what_check_text_refuses_in_the_bmp() {
        let pattern = format!("^[^{}]+$", refused_bmp_class());
        assert_eq!(TEXT_PATTERN, pattern);
    }

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
