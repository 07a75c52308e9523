//! `POST /api/admin/users/v4/users/{user_id}/linked-identities[?embed=ACTIONS]`:
//! links a remote identity to a user (201 with `Location`, or 200 when the
//! user already has exactly this link), and the body's parser.

use std::sync::Arc;

use bytes::Bytes;
use warp::http::header::{HeaderValue, LOCATION};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::params::{gather, parse_embed, parse_user, Fields, UserPath};
use super::{actor, add_path, authorize, identity_actions, OperationFile, LINKED_IDENTITIES};
use crate::auth::{Access, Bearer};
use crate::domain::{
    Embed, JsonMembers, LinkedIdentity, LinkedUserId, LinkedUsername, NewLink, Operation,
    ProviderId, Right, API_PREFIX,
};
use crate::http::context::RequestId;
use crate::http::filters::{json_body, path1, query_and_bearer, request_id};
use crate::http::error_answers::{invalid, Answer, Use};
use crate::http::problem::{ApiError, FieldError};
use crate::http::{answer, AppState};
use crate::store::{LinkOutcome, StoreError};

const OPERATION: Operation = Operation::LinkIdentity;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_link_identity>(doc, LINKED_IDENTITIES);
        super::add_schema::<LinkedIdentity>(doc);
        super::add_schema::<crate::domain::LinkRequest>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path1(OPERATION)
        .and(warp::post())
        .and(query_and_bearer(state, OPERATION))
        .and(json_body())
        .and(request_id())
        .and_then(link_identity)
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
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn link_identity(
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
    let mut response = answer::json(status, &identity);
    if status == StatusCode::CREATED {
        let location = format!(
            "{API_PREFIX}/users/{}/linked-identities/{}",
            crate::http::url::path_segment(user.as_str()),
            crate::http::url::path_segment(&identity.provider_id)
        );
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(LOCATION, value);
        }
    }
    Ok(response)
}

/// A link request body whose fields are well-formed (the provider is
/// checked against the configuration later).
struct LinkFields {
    provider_id: String,
    linked_user_id: LinkedUserId,
    linked_username: LinkedUsername,
}

const LINK_FIELDS: [&str; 3] = ["provider_id", "linked_user_id", "linked_username"];

/// The outer error is a body that is not JSON at all; the inner one lists
/// each field that is wrong.
fn parse_link_body(body: &[u8]) -> Result<Fields<LinkFields>, ApiError> {
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

fn answers() -> Vec<Use> {
    let body = br#"{"provider_id": "okta", "linked_username": "ada@example.com", "nickname": "ada"}"#;
    let bad_body = match parse_link_body(body) {
        Ok(Err(errors)) => invalid(errors),
        _ => unreachable!("the example body has bad fields"),
    };
    let malformed = match parse_link_body(br#"{"provider_id": "okta""#) {
        Err(error) => error,
        Ok(_) => unreachable!("the example body is malformed"),
    };
    vec![
        Use::Own(Answer::new(
            "LinkBadRequestProblem",
            vec![
                bad_body,
                malformed,
                ApiError::InvalidIdentityProvider("github".into()),
                ApiError::UserAlreadyLinked {
                    user_id: "u-42".into(),
                    provider_id: Some("azure-ad".into()),
                },
            ],
        )),
        Use::Shared("RequestTimeout"),
        Use::Own(Answer::new(
            "IdentityAlreadyLinkedProblem",
            vec![ApiError::IdentityAlreadyLinked {
                provider_id: "okta".into(),
                linked_user_id: "00u1a2b3c4".into(),
            }],
        )),
        Use::Shared("PayloadTooLarge"),
        Use::Shared("UnsupportedMediaType"),
        Use::Shared("StoreUnavailable"),
        Use::Shared("StorageFull"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(body: &str) -> Vec<(String, String)> {
        match parse_link_body(body.as_bytes()) {
            Ok(Err(errors)) => errors.into_iter().map(|e| (e.field, e.message)).collect(),
            Ok(Ok(_)) => vec![],
            Err(error) => panic!("not JSON: {error}"),
        }
    }

    #[test]
    fn a_well_formed_body_parses_into_its_three_fields() {
        let fields = parse_link_body(
            br#"{"provider_id": "okta", "linked_user_id": "00u1", "linked_username": "ada"}"#,
        )
        .unwrap()
        .unwrap();

        assert_eq!(fields.provider_id, "okta");
        assert_eq!(fields.linked_user_id.as_str(), "00u1");
        assert_eq!(fields.linked_username.as_str(), "ada");
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let found = errors(
            r#"{"provider_id": null, "linked_user_id": 7, "nickname": "x", "linked_username": ""}"#,
        );
        let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();

        assert_eq!(
            fields,
            ["nickname", "provider_id", "linked_user_id", "linked_username"],
            "{found:?}"
        );
    }

    #[test]
    fn a_key_given_twice_is_refused_and_not_json_is_malformed() {
        let twice = errors(
            r#"{"provider_id": "a", "provider_id": "b", "linked_user_id": "r", "linked_username": "n"}"#,
        );

        assert_eq!(twice, [("provider_id".to_string(), "appears more than once".to_string())]);
        assert!(parse_link_body(b"{").is_err());
        assert_eq!(errors("[1, 2]")[0].0, "body");
    }
}
