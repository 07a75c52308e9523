//! The API's types: identifiers parsed at the edge, and the JSON shapes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::Protocol;

/// The most characters an identifier or username may have.
pub const MAX_TEXT_CHARS: usize = 255;

/// Why a text value was refused, phrased to follow the field's name.
pub fn check_text(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err("must be at most 255 characters");
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Accepts 1-255 characters without control characters.
            pub fn parse(value: &str) -> Result<Self, &'static str> {
                check_text(value).map(|()| Self(value.to_owned()))
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

/// A link request after validation.
#[derive(Debug, Clone)]
pub struct NewLink {
    pub provider_id: ProviderId,
    pub linked_user_id: LinkedUserId,
    pub linked_username: LinkedUsername,
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
    pub actions: Option<Vec<IdentityAction>>,
}

/// A user's linked identities.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkedIdentityList {
    pub linked_identities: Vec<LinkedIdentity>,
    /// With `embed=ACTIONS` only: what the presented token may do to this list now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub provider_id: String,
    /// The user's identifier at the identity provider.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub linked_user_id: String,
    /// The user's login name or e-mail at the identity provider.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub linked_username: String,
}

/// What to embed in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Embed {
    #[serde(rename = "ACTIONS")]
    Actions,
}
