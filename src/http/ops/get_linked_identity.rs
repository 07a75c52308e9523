//! `GET /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}[?embed=ACTIONS]`:
//! one linked identity, where a new link's `Location` points.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::params::{
    bad_user_and_provider, gather, parse_embed, parse_provider, parse_user, ProviderPath, UserPath,
};
use super::{add_path, authorize, identity_actions, OperationFile, LINKED_IDENTITIES};
use crate::auth::Bearer;
use crate::domain::{Embed, LinkedIdentity, Operation, Right};
use crate::http::filters::{path2, query_and_bearer};
use crate::http::error_answers::{Answer, Use};
use crate::http::problem::ApiError;
use crate::http::{answer, AppState};

const OPERATION: Operation = Operation::GetLinkedIdentity;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_get_linked_identity>(doc, LINKED_IDENTITIES);
        super::add_schema::<LinkedIdentity>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path2(OPERATION)
        .and(warp::get())
        .and(query_and_bearer(state, OPERATION))
        .and_then(get_linked_identity)
}

/// Get linked identity.
///
/// One linked identity of a user: where a new link's `Location` points.
/// Links to providers that are no longer configured can be read too.
#[utoipa::path(
    get,
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn get_linked_identity(
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
    Ok(answer::json(StatusCode::OK, &identity))
}

fn answers() -> Vec<Use> {
    vec![
        Use::Own(Answer::new(
            "ValidationFailedProblem",
            vec![bad_user_and_provider()],
        )),
        Use::Shared("LinkedIdentityNotFound"),
        Use::Shared("StoreUnavailable"),
    ]
}
