//! The API's operations, one file each: its route (its path from the
//! operations table, its method, then the bearer, so that a wrong path is a
//! 404 and not a 401), its handler, its path in the OpenAPI document and
//! the error answers it documents, and its parsing with unit tests beside
//! it. The operations' table itself — id, method, route, right — is
//! `domain::Operation`, which the authorizer and the metrics read too.
//!
//! This file lists the operation files, in the order requests try them
//! (the reads a busy install makes most, first), and holds what several of
//! them share: asking the authorizer, the actor of a change, the actions
//! `embed=ACTIONS` shows. A new operation is a row in `domain::Operation`'s
//! table, a file here and its name in `operations!` below, and a method of
//! `store::Backend` (the README's "Contributing" says so too).

use std::sync::Arc;

use warp::reply::Response;
use warp::{Filter, Rejection};

use super::context::RequestId;
use super::error_answers::Use;
use super::problem::ApiError;
use super::AppState;
use crate::auth::{Access, Bearer};
use crate::domain::{Actor, IdentityAction, LinkedIdentity, Operation, Right, UserId};

mod params;

/// What an operation's file gives the document.
pub(crate) struct OperationFile {
    pub operation: Operation,
    /// Adds its path (and the schemas its answers name) to the document.
    pub document: fn(&mut utoipa::openapi::OpenApi),
    /// The error answers it documents besides those every operation has.
    pub answers: fn() -> Vec<Use>,
}

/// Declares the operation files, and from that one list the route of every
/// operation (tried in the order given) and the table of their files.
macro_rules! operations {
    ($($name:ident),+ $(,)?) => {
        $(mod $name;)+

        /// Every operation's route, tried in the order of the list.
        pub(super) fn routes(
            state: &Arc<AppState>,
        ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
            operations!(@chain state; $($name),+)
        }

        /// Every operation's file.
        pub(crate) const FILES: &[OperationFile] = &[$($name::FILE),+];
    };
    (@chain $state:ident; $first:ident $(, $rest:ident)*) => {
        $first::route($state)$(.or($rest::route($state)).unify())*
    };
}

operations!(
    list_linked_identities,
    search_linked_identities,
    get_linked_identity,
    list_identity_providers,
    link_identity,
    delete_linked_identity,
    list_events,
);

/// The file of an operation.
pub(crate) fn file(operation: Operation) -> &'static OperationFile {
    FILES
        .iter()
        .find(|file| file.operation == operation)
        .expect("every operation has a file (a test checks it)")
}

/// The document's tags: where an operation is listed.
const LINKED_IDENTITIES: &str = "Linked Identities";
const SYSTEM_OF_RECORD: &str = "System of record";

/// Adds the path its `#[utoipa::path]` describes to the document, under `tag`.
fn add_path<P: utoipa::Path>(doc: &mut utoipa::openapi::OpenApi, tag: &str) {
    let mut operation = P::operation();
    operation.tags = Some(vec![tag.to_string()]);
    doc.paths
        .add_path_operation(P::path(), P::methods(), operation);
}

/// Adds a schema an operation's answers name, and those it names, to the
/// document's components.
fn add_schema<T: utoipa::ToSchema>(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert(T::name().into_owned(), T::schema());
    let mut named = Vec::new();
    T::schemas(&mut named);
    components.schemas.extend(named);
}

/// Whether the bearer may do `right` to this user's link at this provider
/// now: the authorizer's answer, as the API's error when it is no.
pub(super) async fn authorize(
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
pub(super) fn actor(bearer: &Bearer, request: RequestId) -> Actor {
    Actor {
        actor: bearer.log_id().to_owned(),
        subject: bearer.subject().map(str::to_owned),
        request_id: Some(request.0),
    }
}

/// The actions the bearer may perform on one identity now.
pub(super) async fn identity_actions(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_of_the_table_has_exactly_one_file() {
        for operation in Operation::ALL {
            let files = FILES.iter().filter(|f| f.operation == operation).count();
            assert_eq!(files, 1, "{operation:?}");
        }
        assert_eq!(FILES.len(), Operation::ALL.len());
    }

    #[test]
    fn each_files_document_path_is_its_table_row() {
        for file in FILES {
            let mut doc = utoipa::openapi::OpenApi::default();
            (file.document)(&mut doc);
            let spec = file.operation.spec();
            let item = doc.paths.paths.get(spec.route).expect(spec.route);
            let value = serde_json::to_value(item).unwrap();
            let operation = &value[spec.method.to_ascii_lowercase()];
            assert_eq!(operation["operationId"], spec.id, "{}", spec.route);
        }
    }
}
