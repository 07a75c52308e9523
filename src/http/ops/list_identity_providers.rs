//! `GET /api/admin/users/v4/users/identity-providers`: the configured
//! identity providers a user can be linked to.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::{add_path, authorize, OperationFile, LINKED_IDENTITIES};
use crate::auth::Bearer;
use crate::domain::{IdentityProvider, IdentityProviderList, Operation, Right};
use crate::http::filters::{bearer, path0};
use crate::http::error_answers::Use;
use crate::http::{answer, AppState};

const OPERATION: Operation = Operation::ListIdentityProviders;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_list_identity_providers>(doc, LINKED_IDENTITIES);
        super::add_schema::<IdentityProviderList>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path0(OPERATION)
        .and(warp::get())
        .and(bearer(state, OPERATION))
        .and_then(list_identity_providers)
}

/// List linkable identity providers.
///
/// Provides a list of configured identity providers that can be linked to a user.
#[utoipa::path(
    get,
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn list_identity_providers(
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
    Ok(answer::json(StatusCode::OK, &list))
}

/// It reads only the configuration: nothing but what every operation
/// answers can go wrong.
fn answers() -> Vec<Use> {
    vec![]
}
