//! `GET /api/admin/users/v4/users/{user_id}/linked-identities[?embed=ACTIONS]`:
//! a user's linked identities and, with `embed=ACTIONS`, what this bearer
//! may do to them.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::params::{gather, parse_embed, parse_user, UserPath};
use super::{add_path, authorize, identity_actions, OperationFile, LINKED_IDENTITIES};
use crate::auth::{Access, Bearer};
use crate::domain::{Embed, LinkedIdentity, LinkedIdentityList, ListAction, Operation, Right};
use crate::http::filters::{path1, query_and_bearer};
use crate::http::error_answers::{Answer, Use};
use crate::http::problem::ApiError;
use crate::http::{answer, AppState};

const OPERATION: Operation = Operation::ListLinkedIdentities;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_list_linked_identities>(doc, LINKED_IDENTITIES);
        super::add_schema::<LinkedIdentityList>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path1(OPERATION)
        .and(warp::get())
        .and(query_and_bearer(state, OPERATION))
        .and_then(list_linked_identities)
}

/// List linked identities for user.
///
/// Lists all identities of remote identity providers linked to a user.
#[utoipa::path(
    get,
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn list_linked_identities(
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
    Ok(answer::json(StatusCode::OK, &list))
}

fn answers() -> Vec<Use> {
    vec![
        Use::Own(Answer::new(
            "ValidationFailedProblem",
            vec![super::params::bad_user_and_embed()],
        )),
        Use::Shared("StoreUnavailable"),
    ]
}
