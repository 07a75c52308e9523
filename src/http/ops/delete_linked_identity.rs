//! `DELETE /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}`:
//! deletes a user's link to a provider, answering the deleted identity.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::params::{bad_user_and_provider, gather, parse_provider, parse_user, ProviderPath, UserPath};
use super::{actor, add_path, authorize, OperationFile, LINKED_IDENTITIES};
use crate::auth::Bearer;
use crate::domain::{LinkedIdentity, Operation, Right};
use crate::http::context::RequestId;
use crate::http::filters::{bearer, path2, request_id};
use crate::http::error_answers::{Answer, Use};
use crate::http::problem::ApiError;
use crate::http::{answer, AppState};

const OPERATION: Operation = Operation::DeleteLinkedIdentity;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_delete_linked_identity>(doc, LINKED_IDENTITIES);
        super::add_schema::<LinkedIdentity>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path2(OPERATION)
        .and(warp::delete())
        .and(bearer(state, OPERATION))
        .and(request_id())
        .and_then(delete_linked_identity)
}

/// Delete linked identity.
///
/// Deletes a linked identity of a remote identity provider from a user. Links
/// to providers that are no longer configured can be deleted too.
#[utoipa::path(
    delete,
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn delete_linked_identity(
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
        Use::Shared("StorageFull"),
    ]
}
