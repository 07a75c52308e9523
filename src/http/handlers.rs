//! One handler per operation: parse the edge, authorize, call the store.

use std::sync::Arc;

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use warp::http::header::{HeaderValue, LOCATION};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::context::RequestId;
use super::problem::{ApiError, FieldError};
use super::query::{Cursor, Params, DEFAULT_LIMIT, MAX_LIMIT, MAX_WAIT_SECS};
use super::AppState;
use crate::auth::{Access, Bearer};
use crate::domain::{
    Actor, Embed, Event, IdentityAction, IdentityProvider, IdentityProviderList, JsonMembers,
    LinkRecord, LinkedIdentity, LinkedIdentityList, LinkedUserId, LinkedUsername, ListAction,
    NewLink, ProviderId, Right, UserId, API_PREFIX,
};
use crate::store::{LinkOutcome, SearchQuery, StoreError};

/// The user of the operations on one user's links, for the document (the
/// handlers take it as [`UserId`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "it only describes the parameter in the document")]
struct UserPath {
    /// Unique identifier of a user. Stored and compared in Unicode NFC;
    /// control, bidirectional formatting and invisible characters (Unicode
    /// Cf, Zl, Zp and default-ignorable code points) are refused.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$",
        example = "u-42"
    )]
    user_id: String,
}

/// The provider of one link, for the document (the handlers take it as
/// [`ProviderId`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "it only describes the parameter in the document")]
struct ProviderPath {
    /// Identifier of the linked identity provider: the unique alias assigned to it in the configuration.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$",
        example = "okta"
    )]
    provider_id: String,
}

/// List linkable identity providers.
///
/// Provides a list of configured identity providers that can be linked to a user.
#[utoipa::path(
    get,
    path = "/api/admin/users/v4/users/identity-providers",
    operation_id = "listIdentityProviders",
    tag = "Linked Identities",
    responses(
        (status = 200, description = "The linkable identity providers (the default configuration's, in this example).", body = IdentityProviderList,
            example = json!({"identity_providers": [
                {"provider_id": "azure-ad", "display_name": "Azure AD", "protocol": "OIDC"},
                {"provider_id": "okta", "display_name": "Okta", "protocol": "OIDC"},
                {"provider_id": "corporate-saml", "display_name": "Corporate SAML", "protocol": "SAML"}
            ]})),
    ),
    security(("bearer" = []))
)]
pub async fn list_identity_providers(
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    authorize(&state, &bearer, Right::IdentityProvidersList, None, None).await?;
    let list = IdentityProviderList {
        identity_providers: state
            .linkable_providers()
            .map(|p| IdentityProvider {
                provider_id: p.id.clone(),
                display_name: p.display_name.clone(),
                protocol: p.protocol,
            })
            .collect(),
    };
    Ok(json_response(StatusCode::OK, &list))
}

/// List linked identities for user.
///
/// Lists all identities of remote identity providers linked to a user.
#[utoipa::path(
    get,
    path = "/api/admin/users/v4/users/{user_id}/linked-identities",
    operation_id = "listLinkedIdentities",
    tag = "Linked Identities",
    params(
        UserPath,
        ("embed" = Option<Vec<Embed>>, Query, description = "Options for embedding additional data: `ACTIONS` includes the actions this bearer may perform now on each identity (`DELETE`) and on the list (`CREATE`). Comma-separated (`embed=ACTIONS`); repeating the parameter (`embed=ACTIONS&embed=ACTIONS`) is accepted too. An unknown or empty value is a 400.", style = Form, explode = false, min_items = 1),
    ),
    responses(
        (status = 200, description = "The user's linked identities (empty when none).", body = LinkedIdentityList,
            examples(
                ("plain" = (summary = "Without embed", value = json!({"linked_identities": [{"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}]}))),
                ("with_actions" = (summary = "With embed=ACTIONS", value = json!({"linked_identities": [{"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
                    "actions": ["DELETE"]}], "actions": []}))),
                ("with_actions_unlinked" = (summary = "With embed=ACTIONS, a user without links", value = json!({"linked_identities": [], "actions": ["CREATE"]})))
            )),
    ),
    security(("bearer" = []))
)]
pub async fn list_linked_identities(
    raw_user: String,
    query: String,
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    let (user, embed) =
        gather(parse_user(&raw_user), parse_embed(&query)).map_err(ApiError::from)?;
    authorize(
        &state,
        &bearer,
        Right::LinkedIdentitiesList,
        Some(user.as_str()),
        None,
    )
    .await?;
    let mut identities: Vec<LinkedIdentity> = state
        .store
        .list(&user)
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .map(|record| record.into_identity())
        .collect();
    let mut list_actions = None;
    if embed {
        for identity in &mut identities {
            identity.actions = Some(identity_actions(&state, &bearer, &user, identity).await);
        }
        let mut may_create = false;
        if identities.is_empty() {
            for provider in state.linkable_providers() {
                let access = Access {
                    right: Right::LinkedIdentitiesCreate,
                    user: Some(user.as_str()),
                    provider: Some(&provider.id),
                };
                if state.authority.allows(&bearer, access).await {
                    may_create = true;
                    break;
                }
            }
        }
        list_actions = Some(if may_create {
            vec![ListAction::Create]
        } else {
            vec![]
        });
    }
    let list = LinkedIdentityList {
        linked_identities: identities,
        actions: list_actions,
    };
    Ok(json_response(StatusCode::OK, &list))
}

/// Link identity to user.
///
/// Links an identity of a remote identity provider to a user. A user may be
/// linked to one identity provider at a time: linking another one fails with
/// `USER_ALREADY_LINKED`. Repeating the same link is a 200 (the username is
/// updated if it changed). A remote identity linked to another user is a 409
/// `IDENTITY_ALREADY_LINKED`.
#[utoipa::path(
    post,
    path = "/api/admin/users/v4/users/{user_id}/linked-identities",
    operation_id = "linkIdentity",
    tag = "Linked Identities",
    params(
        UserPath,
        ("embed" = Option<Vec<Embed>>, Query, description = "Options for embedding additional data: `ACTIONS` includes the actions this bearer may perform now on the identity (`DELETE`). Comma-separated (`embed=ACTIONS`); repeating the parameter (`embed=ACTIONS&embed=ACTIONS`) is accepted too. An unknown or empty value is a 400.", style = Form, explode = false, min_items = 1),
    ),
    request_body(content = crate::domain::LinkRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The identity was linked; `Location` is its URL (getLinkedIdentity).", body = LinkedIdentity,
            examples(
                ("plain" = (summary = "Without embed", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}))),
                ("with_actions" = (summary = "With embed=ACTIONS", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
                    "actions": ["DELETE"]})))
            )),
        (status = 200, description = "The user already had exactly this link; the stored identity (with the username updated if it changed).", body = LinkedIdentity,
            examples(
                ("plain" = (summary = "Without embed", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}))),
                ("with_actions" = (summary = "With embed=ACTIONS", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
                    "actions": ["DELETE"]})))
            )),
    ),
    security(("bearer" = []))
)]
pub async fn link_identity(
    raw_user: String,
    query: String,
    state: Arc<AppState>,
    bearer: Bearer,
    body: Bytes,
    request: RequestId,
) -> Result<Response, Rejection> {
    let fields = parse_link_body(&body)?;
    let (user, (embed, fields)) =
        gather(parse_user(&raw_user), gather(parse_embed(&query), fields))
            .map_err(ApiError::from)?;
    authorize(
        &state,
        &bearer,
        Right::LinkedIdentitiesCreate,
        Some(user.as_str()),
        Some(&fields.provider_id),
    )
    .await?;
    let provider = state
        .linkable_providers()
        .find(|p| p.id == fields.provider_id)
        .and_then(|p| ProviderId::parse(&p.id).ok())
        .ok_or_else(|| ApiError::InvalidIdentityProvider(fields.provider_id.clone()))?;
    let link = NewLink {
        provider_id: provider,
        linked_user_id: fields.linked_user_id,
        linked_username: fields.linked_username,
    };
    let (status, record) = match state
        .store
        .link(user.clone(), link, actor(&bearer, request))
        .await
    {
        Ok(LinkOutcome::Created(record)) => (StatusCode::CREATED, record),
        Ok(LinkOutcome::Existing(record)) => (StatusCode::OK, record),
        Err(StoreError::UserAlreadyLinked { current }) => {
            // The answer names the user's current provider only to a bearer
            // who could read that link anyway.
            let readable = Access {
                right: Right::LinkedIdentitiesList,
                user: Some(user.as_str()),
                provider: Some(&current.provider_id),
            };
            let provider_id = state
                .authority
                .allows(&bearer, readable)
                .await
                .then_some(current.provider_id);
            return Err(ApiError::UserAlreadyLinked {
                user_id: current.user_id,
                provider_id,
            }
            .into());
        }
        Err(error) => return Err(ApiError::from(error).into()),
    };
    let mut identity = record.into_identity();
    if embed {
        identity.actions = Some(identity_actions(&state, &bearer, &user, &identity).await);
    }
    let mut response = json_response(status, &identity);
    if status == StatusCode::CREATED {
        let location = format!(
            "{API_PREFIX}/users/{}/linked-identities/{}",
            super::url::path_segment(user.as_str()),
            super::url::path_segment(&identity.provider_id)
        );
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(LOCATION, value);
        }
    }
    Ok(response)
}

/// Get linked identity.
///
/// One linked identity of a user: where a new link's `Location` points.
/// Links to providers that are no longer configured can be read too.
#[utoipa::path(
    get,
    path = "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
    operation_id = "getLinkedIdentity",
    tag = "Linked Identities",
    params(
        UserPath,
        ProviderPath,
        ("embed" = Option<Vec<Embed>>, Query, description = "Options for embedding additional data: `ACTIONS` includes the actions this bearer may perform now on the identity (`DELETE`). Comma-separated (`embed=ACTIONS`); repeating the parameter (`embed=ACTIONS&embed=ACTIONS`) is accepted too. An unknown or empty value is a 400.", style = Form, explode = false, min_items = 1),
    ),
    responses(
        (status = 200, description = "The linked identity.", body = LinkedIdentity,
            examples(
                ("plain" = (summary = "Without embed", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}))),
                ("with_actions" = (summary = "With embed=ACTIONS", value = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
                    "actions": ["DELETE"]})))
            )),
    ),
    security(("bearer" = []))
)]
pub async fn get_linked_identity(
    raw_user: String,
    raw_provider: String,
    query: String,
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    let ((user, provider), embed) = gather(
        gather(parse_user(&raw_user), parse_provider(&raw_provider)),
        parse_embed(&query),
    )
    .map_err(ApiError::from)?;
    authorize(
        &state,
        &bearer,
        Right::LinkedIdentitiesList,
        Some(user.as_str()),
        Some(provider.as_str()),
    )
    .await?;
    // A user has at most one link, so the user's list is the lookup.
    let mut identity = state
        .store
        .list(&user)
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .find(|record| record.provider_id == provider.as_str())
        .ok_or_else(|| ApiError::LinkedIdentityNotFound {
            user_id: user.as_str().to_owned(),
            provider_id: provider.as_str().to_owned(),
        })?
        .into_identity();
    if embed {
        identity.actions = Some(identity_actions(&state, &bearer, &user, &identity).await);
    }
    Ok(json_response(StatusCode::OK, &identity))
}

/// Delete linked identity.
///
/// Deletes a linked identity of a remote identity provider from a user. Links
/// to providers that are no longer configured can be deleted too.
#[utoipa::path(
    delete,
    path = "/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
    operation_id = "deleteLinkedIdentity",
    tag = "Linked Identities",
    params(
        UserPath,
        ProviderPath,
    ),
    responses(
        (status = 200, description = "The link was deleted; the body is the deleted identity.", body = LinkedIdentity,
            example = json!({"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"})),
    ),
    security(("bearer" = []))
)]
pub async fn delete_linked_identity(
    raw_user: String,
    raw_provider: String,
    state: Arc<AppState>,
    bearer: Bearer,
    request: RequestId,
) -> Result<Response, Rejection> {
    let (user, provider) =
        gather(parse_user(&raw_user), parse_provider(&raw_provider)).map_err(ApiError::from)?;
    authorize(
        &state,
        &bearer,
        Right::LinkedIdentitiesDelete,
        Some(user.as_str()),
        Some(provider.as_str()),
    )
    .await?;
    let identity = state
        .store
        .unlink(user, provider, actor(&bearer, request))
        .await
        .map_err(ApiError::from)?
        .into_identity();
    Ok(json_response(StatusCode::OK, &identity))
}

/// Whether the bearer may do `right` to this user's link at this provider
/// now: the authorizer's answer, as the API's error when it is no.
async fn authorize(
    state: &AppState,
    bearer: &Bearer,
    right: Right,
    user: Option<&str>,
    provider: Option<&str>,
) -> Result<(), ApiError> {
    state
        .authority
        .authorize(
            bearer,
            Access {
                right,
                user,
                provider,
            },
        )
        .await
        .map_err(ApiError::from)
}

/// Who is making a change, as the change feed records it.
fn actor(bearer: &Bearer, request: RequestId) -> Actor {
    Actor {
        actor: bearer.log_id().to_owned(),
        subject: bearer.subject().map(str::to_owned),
        request_id: Some(request.0),
    }
}

/// The actions the bearer may perform on one identity now.
async fn identity_actions(
    state: &AppState,
    bearer: &Bearer,
    user: &UserId,
    identity: &LinkedIdentity,
) -> Vec<IdentityAction> {
    let may_delete = state
        .authority
        .allows(
            bearer,
            Access {
                right: Right::LinkedIdentitiesDelete,
                user: Some(user.as_str()),
                provider: Some(&identity.provider_id),
            },
        )
        .await;
    if may_delete {
        vec![IdentityAction::Delete]
    } else {
        vec![]
    }
}

pub(super) type Fields<T> = Result<T, Vec<FieldError>>;

/// Both results, or every field error from either, as one validation error.
fn gather<A, B>(a: Fields<A>, b: Fields<B>) -> Fields<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => {
            let mut errors = a.err().unwrap_or_default();
            errors.extend(b.err().unwrap_or_default());
            Err(errors)
        }
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> Self {
        ApiError::Validation(errors)
    }
}

fn decode_segment(field: &str, raw: &str) -> Fields<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| vec![FieldError::new(field, "must be percent-encoded UTF-8")])
}

pub(super) fn parse_user(raw: &str) -> Fields<UserId> {
    let text = decode_segment("user_id", raw)?;
    UserId::parse(&text).map_err(|why| vec![FieldError::new("user_id", why)])
}

pub(super) fn parse_provider(raw: &str) -> Fields<ProviderId> {
    let text = decode_segment("provider_id", raw)?;
    ProviderId::parse(&text).map_err(|why| vec![FieldError::new("provider_id", why)])
}

/// `embed` values: repeated and/or comma-separated; only `ACTIONS` exists.
pub(super) fn parse_embed(query: &str) -> Fields<bool> {
    let mut actions = false;
    let mut errors = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "embed" {
            continue;
        }
        for item in value.split(',') {
            match serde_json::from_value::<Embed>(serde_json::Value::String(item.to_owned())) {
                Ok(Embed::Actions) => actions = true,
                Err(_) => errors.push(FieldError::new(
                    "embed",
                    format!("{item:?} is not an embed option; the only one is ACTIONS"),
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(actions)
    } else {
        Err(errors)
    }
}

/// A link request body whose fields are well-formed (the provider is
/// checked against the configuration later).
pub(super) struct LinkFields {
    provider_id: String,
    linked_user_id: LinkedUserId,
    linked_username: LinkedUsername,
}

const LINK_FIELDS: [&str; 3] = ["provider_id", "linked_user_id", "linked_username"];

/// The outer error is a body that is not JSON at all; the inner one lists
/// each field that is wrong.
pub(super) fn parse_link_body(body: &[u8]) -> Result<Fields<LinkFields>, ApiError> {
    let members = match serde_json::from_slice::<JsonMembers>(body) {
        Ok(members) => members.0,
        Err(e) if e.is_data() => {
            return Ok(Err(vec![FieldError::new("body", "must be a JSON object")]));
        }
        Err(e) => return Err(ApiError::MalformedJson(e.to_string())),
    };
    let mut errors = Vec::new();
    for (i, (name, _)) in members.iter().enumerate() {
        if !LINK_FIELDS.contains(&name.as_str()) {
            errors.push(FieldError::new(
                name.clone(),
                "is not a known field; the fields are provider_id, linked_user_id and linked_username",
            ));
        } else if members[..i].iter().any(|(earlier, _)| earlier == name) {
            errors.push(FieldError::new(name.clone(), "appears more than once"));
        }
    }
    let mut text = |field: &str| -> Option<String> {
        match members
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, v)| v)
        {
            None => errors.push(FieldError::new(field, "is required")),
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(serde_json::Value::Null) => {
                errors.push(FieldError::new(field, "must be a string, not null"))
            }
            Some(_) => errors.push(FieldError::new(field, "must be a string")),
        }
        None
    };
    // Matched against the configured ids, which are NFC.
    let provider_id = text("provider_id").map(|p| crate::domain::nfc(&p));
    let linked_user_id = text("linked_user_id");
    let linked_username = text("linked_username");
    let linked_user_id = linked_user_id.and_then(|v| {
        LinkedUserId::parse(&v)
            .map_err(|why| errors.push(FieldError::new("linked_user_id", why)))
            .ok()
    });
    let linked_username = linked_username.and_then(|v| {
        LinkedUsername::parse(&v)
            .map_err(|why| errors.push(FieldError::new("linked_username", why)))
            .ok()
    });
    Ok(match (provider_id, linked_user_id, linked_username) {
        (Some(provider_id), Some(linked_user_id), Some(linked_username)) if errors.is_empty() => {
            Ok(LinkFields {
                provider_id,
                linked_user_id,
                linked_username,
            })
        }
        _ => Err(errors),
    })
}

/// `POST /_dev/reset` (`linkid dev` only): the data as `linkid dev` started,
/// for a bearer that may do everything; 204.
pub async fn dev_reset(state: Arc<AppState>, bearer: Bearer) -> Result<Response, Rejection> {
    let Some(dev) = &state.dev else {
        return Err(warp::reject::not_found());
    };
    for right in Right::ALL {
        authorize(&state, &bearer, right, None, None).await?;
    }
    crate::store::replace_all(
        &dev.database,
        &dev.rules,
        dev.providers.clone(),
        dev.fixtures.clone(),
    )
    .await
    .map_err(ApiError::from)?;
    state
        .store
        .reread_newest_event()
        .await
        .map_err(ApiError::from)?;
    let mut response = Response::new(bytes::Bytes::new().into());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// `GET /readyz`: 200 while the database answers, else 503 `NOT_READY` with the reason.
pub async fn readyz(state: Arc<AppState>) -> Result<Response, Rejection> {
    state.store.ready().await.map_err(ApiError::NotReady)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"status": "ready"}),
    ))
}

/// `GET /metrics`: Prometheus text, when enabled and (by default) only to
/// loopback clients (behind trusted proxies, the forwarded client).
pub async fn metrics(
    state: Arc<AppState>,
    client: Option<super::context::Client>,
) -> Result<Response, Rejection> {
    let local = client
        .as_ref()
        .is_some_and(super::context::Client::is_loopback);
    if !state.metrics.enabled || (state.metrics.loopback_only && !local) {
        return Err(warp::reject::not_found());
    }
    let links = state.store.count().await.map_err(ApiError::from)?;
    let (connections, idle) = state.store.pool_state();
    metrics::gauge!("linkid_links_stored").set(links as f64);
    metrics::gauge!("linkid_db_pool_connections").set(connections);
    metrics::gauge!("linkid_db_pool_idle_connections").set(idle);
    metrics::gauge!("linkid_token_cache_entries").set(state.authority.cached_tokens() as f64);
    metrics::gauge!("linkid_token_cache_bytes").set(state.authority.cached_token_bytes() as f64);
    metrics::gauge!("linkid_unsent_answer_bytes").set(state.unsent.held() as f64);
    let mut response = Response::new(crate::telemetry::prometheus().render().into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// A JSON response with a status.
fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    super::answer::json(status, value)
}

/// A page of all links.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LinkPage {
    /// Links in `user_id` order (byte order of their UTF-8).
    pub linked_identities: Vec<LinkRecord>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Search linked identities.
///
/// Every link, in pages, optionally only those at one identity provider.
/// With `provider_id` and `linked_user_id` it is the login-time reverse
/// lookup: which local user owns this remote identity (zero or one item,
/// never a 404). Paging is by key: a walk never repeats an item and never
/// skips one that existed for the whole walk, also while others write.
#[utoipa::path(
    get,
    path = "/api/admin/users/v4/linked-identities",
    operation_id = "searchLinkedIdentities",
    tag = "System of record",
    params(
        ("provider_id" = Option<String>, Query, description = "Only links to this identity provider.", min_length = 1, max_length = 255, pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$", example = "okta"),
        ("linked_user_id" = Option<String>, Query, description = "With `provider_id` only (without it the answer is a 400): the remote identity to look up.", min_length = 1, max_length = 255, pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$", example = "00u1a2b3c4"),
        ("limit" = Option<u32>, Query, description = "Links per page, 1 to 1000.", minimum = 1, maximum = 1000, example = 100),
        ("cursor" = Option<String>, Query, description = "`next_cursor` from the previous page of the same search (same `provider_id` and `linked_user_id`), as it is. It is opaque: any other value is a 400 naming `cursor`.", min_length = 1, max_length = 2048, pattern = r"^[A-Za-z0-9_-]+$"),
    ),
    responses(
        (status = 200, description = "One page of links, and the cursor of the next.", body = LinkPage,
            example = json!({"linked_identities": [{"user_id": "u-42", "provider_id": "okta",
                "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}],
                "next_cursor": null})),
    ),
    security(("bearer" = []))
)]
pub async fn search_linked_identities(
    query: String,
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    let search = parse_search(&query).map_err(ApiError::from)?;
    authorize(
        &state,
        &bearer,
        Right::LinkedIdentitiesSearch,
        None,
        search.provider_id.as_deref(),
    )
    .await?;
    // The reverse lookup answers one row; any other search may answer a
    // thousand.
    let slot = match (&search.provider_id, &search.linked_user_id) {
        (Some(_), Some(_)) => None,
        _ => Some(page_slot(&state).await?),
    };
    let page = state
        .store
        .search(search.clone())
        .await
        .map_err(ApiError::from)?;
    let next_cursor = match (page.more, page.links.last()) {
        (true, Some(last)) => Some(
            Cursor {
                provider_id: search.provider_id,
                linked_user_id: search.linked_user_id,
                after_user: last.user_id.clone(),
            }
            .encode(),
        ),
        _ => None,
    };
    let response = json_response(
        StatusCode::OK,
        &LinkPage {
            linked_identities: page.links,
            next_cursor,
        },
    );
    Ok(PageSlot::ride_with(slot, response))
}

/// Room to build one answer of many rows (a search page, a feed page):
/// few are built at once, each holding its slot until the answer is
/// counted against the budget of unsent answers, so that clients that ask
/// for big pages and never read them cannot make the server build
/// hundreds at once. While that budget is full, a page is refused before
/// any work (503 `SERVER_BUSY`).
#[derive(Clone)]
pub(super) struct PageSlot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl PageSlot {
    /// The answer, carrying the slot until the server has counted it (an
    /// extension is dropped when hyper takes the response).
    fn ride_with(slot: Option<PageSlot>, mut response: Response) -> Response {
        if let Some(slot) = slot {
            response.extensions_mut().insert(slot);
        }
        response
    }
}

async fn page_slot(state: &AppState) -> Result<PageSlot, ApiError> {
    let busy = || ApiError::ServerBusy {
        held: state.unsent.held(),
    };
    if state.unsent.is_full() {
        return Err(busy());
    }
    let permit = state
        .pages
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    if state.unsent.is_full() {
        return Err(busy());
    }
    Ok(PageSlot {
        _permit: Arc::new(permit),
    })
}

pub(super) fn parse_search(query: &str) -> Fields<SearchQuery> {
    let params = Params::parse(query);
    let mut errors = Vec::new();
    let provider_id = params.text("provider_id", &mut errors);
    let linked_user_id = params.text("linked_user_id", &mut errors);
    if linked_user_id.is_some() && params.one("provider_id", &mut Vec::new()).is_none() {
        errors.push(FieldError::new(
            "linked_user_id",
            "needs provider_id: a remote identity is unique only at its provider",
        ));
    }
    let limit = params.number(
        "limit",
        1..=i64::from(MAX_LIMIT),
        i64::from(DEFAULT_LIMIT),
        &mut errors,
    );
    let mut after_user = None;
    if let Some(text) = params.one("cursor", &mut errors) {
        match Cursor::decode(text) {
            Ok(cursor)
                if cursor.provider_id == provider_id
                    && cursor.linked_user_id == linked_user_id =>
            {
                after_user = Some(cursor.after_user)
            }
            Ok(_) => errors.push(FieldError::new(
                "cursor",
                "belongs to a search with other filters; repeat that search's provider_id and linked_user_id, or start again without a cursor",
            )),
            Err(why) => errors.push(FieldError::new("cursor", why)),
        }
    }
    if errors.is_empty() {
        Ok(SearchQuery {
            provider_id,
            linked_user_id,
            after_user,
            limit: limit as u32,
        })
    } else {
        Err(errors)
    }
}

/// A page of the change feed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Events in ascending `seq` (commit order).
    pub events: Vec<Event>,
    /// Ask again with `after` set to this: the last event's `seq`, or the
    /// `after` asked for when there were none.
    pub next_after: i64,
}

/// The feed's query: where to start, how many, how long to wait.
pub(super) struct FeedQuery {
    after: i64,
    limit: u32,
    wait: std::time::Duration,
}

pub(super) fn parse_feed(query: &str) -> Fields<FeedQuery> {
    let params = Params::parse(query);
    let mut errors = Vec::new();
    let after = params.number("after", 0..=i64::MAX, 0, &mut errors);
    let limit = params.number(
        "limit",
        1..=i64::from(MAX_LIMIT),
        i64::from(DEFAULT_LIMIT),
        &mut errors,
    );
    let wait = params.number("wait", 0..=MAX_WAIT_SECS as i64, 0, &mut errors);
    if errors.is_empty() {
        Ok(FeedQuery {
            after,
            limit: limit as u32,
            wait: std::time::Duration::from_secs(wait as u64),
        })
    } else {
        Err(errors)
    }
}

/// List changes (the change feed).
///
/// Every change to a link (`LINKED`, `UPDATED`, `UNLINKED`) made by a
/// request, an import or any instance, recorded in the same transaction as
/// the change, in commit order. A consumer that always asks again with
/// `after=next_after` sees every change exactly once. `wait` long-polls:
/// the answer comes as soon as an event after `after` exists, or empty when
/// the time is up. With `Accept: text/event-stream` the same events stream
/// as server-sent events (`id:` the seq, `event:` the type, `data:` the
/// JSON), resuming after `Last-Event-ID` (or `after`), with a heartbeat
/// comment every `events.heartbeat_secs`.
#[utoipa::path(
    get,
    path = "/api/admin/users/v4/linked-identities/events",
    operation_id = "listEvents",
    tag = "System of record",
    params(
        ("after" = Option<i64>, Query, description = "Only events with a greater `seq` (the previous answer's `next_after`).", minimum = 0, example = 0),
        ("limit" = Option<u32>, Query, description = "Events per answer, 1 to 1000.", minimum = 1, maximum = 1000, example = 100),
        ("wait" = Option<u32>, Query, description = "Seconds to wait for an event when there is none yet (long poll), 0 to 60. With nothing to send, the answer comes only when `wait` is up: a client's read timeout (and a fuzzer's response-time limit) must be longer than `wait`.", minimum = 0, maximum = 60, example = 0),
        ("Last-Event-ID" = Option<i64>, Header, description = "With `Accept: text/event-stream`: resume after this seq (what an EventSource sends when it reconnects); it wins over `after`. Checked on every request.", minimum = 0, nullable = false),
    ),
    responses(
        (status = 200, description = "Events after `after`, and where to continue.",
            content(
                (EventPage = "application/json", example = json!({"events": [{"seq": 1, "type": "LINKED",
                    "occurred_at": "2026-11-29T10:00:00Z", "user_id": "u-42", "provider_id": "okta",
                    "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "actor": "6f1c0e1d2a3b4c5d", "subject": "provisioning-bot",
                    "request_id": "5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10"}], "next_after": 1})),
                (String = "text/event-stream", example = json!("id: 1\nevent: LINKED\ndata: {\"seq\":1,\"type\":\"LINKED\",\"occurred_at\":\"2026-11-29T10:00:00Z\",\"user_id\":\"u-42\",\"provider_id\":\"okta\",\"linked_user_id\":\"00u1a2b3c4\",\"linked_username\":\"ada@example.com\",\"actor\":\"6f1c0e1d2a3b4c5d\",\"subject\":null,\"request_id\":\"5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10\"}\n\n")),
            )),
    ),
    security(("bearer" = []))
)]
pub async fn list_events(
    query: String,
    accept: Option<HeaderValue>,
    last_event_id: Option<HeaderValue>,
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    let feed = parse_feed(&query).map_err(ApiError::from)?;
    let resume = match last_event_id
        .as_ref()
        .map(|v| v.to_str().map(str::parse::<i64>))
    {
        None => None,
        Some(Ok(Ok(seq))) if seq >= 0 => Some(seq),
        Some(_) => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "Last-Event-ID",
                "must be the seq of an event (a whole number, 0 or more)",
            )])
            .into())
        }
    };
    authorize(&state, &bearer, Right::EventsList, None, None).await?;
    let streaming = accept
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if streaming {
        return stream_events(state, bearer, resume.unwrap_or(feed.after)).await;
    }
    let mut slot = Some(page_slot(&state).await?);
    let mut events = state
        .store
        .events(feed.after, feed.limit)
        .await
        .map_err(ApiError::from)?;
    if events.is_empty() && !feed.wait.is_zero() {
        // Nothing is built while it waits.
        slot = None;
        let _permit = state
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyStreams)?;
        let mut token = TokenWatch::new(&state, &bearer);
        let woke = tokio::select! {
            woke = wait_for_event(&state, feed.after, feed.wait) => woke,
            lapsed = token.lapsed() => return Err(lapsed.into()),
        };
        // What the token may see is decided when the answer is, not when
        // the wait began.
        token.check().await?;
        if woke {
            slot = Some(page_slot(&state).await?);
            events = state
                .store
                .events(feed.after, feed.limit)
                .await
                .map_err(ApiError::from)?;
        }
    }
    let next_after = events.last().map_or(feed.after, |e| e.seq);
    let response = json_response(StatusCode::OK, &EventPage { events, next_after });
    Ok(PageSlot::ride_with(slot, response))
}

/// How often, at the least, a stream or a long poll checks that its token
/// still allows it; a revocation reaching this server makes it check at once.
const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream's or a long poll's hold on its token, which may expire or be
/// revoked while the request lives: checked at least every
/// `RECHECK_EVERY`, whenever revocations arrive, and whenever asked.
struct TokenWatch {
    state: Arc<AppState>,
    bearer: Bearer,
    /// `None` once the revocation list is gone (the server is stopping).
    revocations: Option<tokio::sync::watch::Receiver<u64>>,
    every: tokio::time::Interval,
}

impl TokenWatch {
    fn new(state: &Arc<AppState>, bearer: &Bearer) -> TokenWatch {
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        TokenWatch {
            state: state.clone(),
            bearer: bearer.clone(),
            revocations: Some(state.authority.revocations()),
            every,
        }
    }

    /// Whether the token still allows reading the feed: not revoked, not
    /// expired, still authorized.
    async fn check(&self) -> Result<(), ApiError> {
        let access = Access {
            right: Right::EventsList,
            user: None,
            provider: None,
        };
        self.state
            .authority
            .recheck(&self.bearer, access)
            .await
            .map_err(ApiError::from)
    }

    /// Resolves, with the reason, once the token no longer allows reading
    /// the feed.
    async fn lapsed(&mut self) -> ApiError {
        loop {
            let revoked = async {
                match &mut self.revocations {
                    Some(revocations) => revocations.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.every.tick() => {}
                arrived = revoked => if !arrived { self.revocations = None },
            }
            if let Err(lapsed) = self.check().await {
                return lapsed;
            }
        }
    }
}

/// Waits until an event after `after` is committed (true), the time is up
/// or the server is stopping (false).
async fn wait_for_event(state: &AppState, after: i64, wait: std::time::Duration) -> bool {
    let mut newest = state.store.newest_event();
    let mut stopping = state.stopping.clone();
    tokio::select! {
        seen = tokio::time::timeout(wait, newest.wait_for(|seq| *seq > after)) => {
            matches!(seen, Ok(Ok(_)))
        }
        _ = stopping.wait_for(|stopping| *stopping) => false,
    }
}

/// Events a stream reads from the store at a time, and hands to the
/// response at most: with the response's own buffer, what a stream whose
/// client stops reading holds (a few hundred KiB at the most).
const STREAM_BATCH: u32 = 64;
const STREAM_BUFFER: usize = 16;

/// The feed as server-sent events from `after` on, until the client goes
/// away, its token expires or is revoked (a last comment says so), the
/// store fails (the client resumes with `Last-Event-ID`) or the server
/// stops.
async fn stream_events(
    state: Arc<AppState>,
    bearer: Bearer,
    after: i64,
) -> Result<Response, Rejection> {
    let permit = state
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyStreams)?;
    // A stream that starts among pruned events says so before it starts.
    let first = state
        .store
        .events(after, STREAM_BATCH)
        .await
        .map_err(ApiError::from)?;
    let heartbeat = std::time::Duration::from_secs(state.events.heartbeat_secs);
    // A task reads the store and hands events over, so the response's
    // stream holds only the channel; the task (and its stream slot) ends
    // when the client goes away, the token lapses, the store fails or the
    // server stops.
    let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut token = TokenWatch::new(&state, &bearer);
        let mut after = after;
        let mut batch = first;
        loop {
            for event in batch.drain(..) {
                if let Err(lapsed) = token.check().await {
                    let _ = sender.send(last_word(&lapsed)).await;
                    return;
                }
                after = event.seq;
                if sender.send(sse_event(&event)).await.is_err() {
                    return;
                }
            }
            loop {
                if *state.stopping.borrow() {
                    return;
                }
                tokio::select! {
                    woke = wait_for_event(&state, after, std::time::Duration::from_secs(3600)) => {
                        if woke { break }
                    }
                    lapsed = token.lapsed() => {
                        let _ = sender.send(last_word(&lapsed)).await;
                        return;
                    }
                    () = sender.closed() => return,
                }
            }
            batch = match state.store.events(after, STREAM_BATCH).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(error = %error, "an event stream ended: the store failed");
                    return;
                }
            };
        }
    });
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(event), receiver))
    });
    let stream = warp::sse::keep_alive()
        .interval(heartbeat)
        .text("heartbeat")
        .stream(events);
    Ok(warp::sse::reply(stream).into_response())
}

/// One change as a server-sent event.
fn sse_event(event: &Event) -> warp::sse::Event {
    warp::sse::Event::default()
        .id(event.seq.to_string())
        .event(event.event_type.as_str())
        .data(serde_json::to_string(event).unwrap_or_default())
}

/// The comment that ends a stream whose token no longer allows it, e.g.
/// `:closed: the bearer token is expired`.
fn last_word(lapsed: &ApiError) -> warp::sse::Event {
    warp::sse::Event::default().comment(format!("closed: {lapsed}"))
}
