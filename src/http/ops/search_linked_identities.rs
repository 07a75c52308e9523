//! `GET /api/admin/users/v4/linked-identities[?provider_id=&linked_user_id=&limit=&cursor=]`:
//! every link in pages, and the login-time reverse lookup (both filters).

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::params::Fields;
use super::{add_path, authorize, OperationFile, SYSTEM_OF_RECORD};
use crate::auth::Bearer;
use crate::domain::{LinkRecord, Operation, Right};
use crate::http::answer::{page_slot, PageSlot};
use crate::http::filters::{path0, query_and_bearer};
use crate::http::error_answers::{invalid, server_busy, store_unavailable, Answer, Use};
use crate::http::problem::{ApiError, FieldError};
use crate::http::query::{Cursor, Params, DEFAULT_LIMIT, MAX_LIMIT};
use crate::http::{answer, AppState};
use crate::store::SearchQuery;

const OPERATION: Operation = Operation::SearchLinkedIdentities;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_search_linked_identities>(doc, SYSTEM_OF_RECORD);
        super::add_schema::<LinkPage>(doc);
    },
    answers,
};

pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path0(OPERATION)
        .and(warp::get())
        .and(query_and_bearer(state, OPERATION))
        .and_then(search_linked_identities)
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
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
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
async fn search_linked_identities(
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
    let response = answer::json(
        StatusCode::OK,
        &LinkPage {
            linked_identities: page.links,
            next_cursor,
        },
    );
    Ok(PageSlot::ride_with(slot, response))
}

fn parse_search(query: &str) -> Fields<SearchQuery> {
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

fn answers() -> Vec<Use> {
    vec![
        Use::Own(Answer::new(
            "ValidationFailedProblem",
            vec![invalid(
                parse_search("linked_user_id=00u1a2b3c4&limit=5000&cursor=bWFkZS11cA")
                    .err()
                    .unwrap_or_default(),
            )],
        )),
        Use::Own(Answer::new(
            "SearchUnavailableProblem",
            vec![store_unavailable(), server_busy()],
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(query: &str) -> Vec<String> {
        parse_search(query)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_search_has_defaults_and_takes_its_filters() {
        let all = parse_search("").unwrap();
        let lookup = parse_search("provider_id=okta&linked_user_id=00u1&limit=5").unwrap();

        assert_eq!((all.provider_id, all.limit), (None, DEFAULT_LIMIT));
        assert_eq!(lookup.provider_id.as_deref(), Some("okta"));
        assert_eq!(lookup.linked_user_id.as_deref(), Some("00u1"));
        assert_eq!(lookup.limit, 5);
    }

    #[test]
    fn a_remote_id_without_its_provider_and_a_limit_out_of_range_are_named() {
        assert_eq!(fields("linked_user_id=00u1"), ["linked_user_id"]);
        assert_eq!(fields("limit=0"), ["limit"]);
        assert_eq!(fields("limit=1001"), ["limit"]);
        assert_eq!(fields("limit=1&limit=2"), ["limit"]);
    }

    #[test]
    fn a_cursor_is_taken_only_from_a_search_with_the_same_filters() {
        let cursor = Cursor {
            provider_id: Some("okta".into()),
            linked_user_id: None,
            after_user: "u-9".into(),
        }
        .encode();

        let next = parse_search(&format!("provider_id=okta&cursor={cursor}")).unwrap();

        assert_eq!(next.after_user.as_deref(), Some("u-9"));
        assert_eq!(fields(&format!("provider_id=azure-ad&cursor={cursor}")), ["cursor"]);
        assert_eq!(fields("cursor=not-a-cursor"), ["cursor"]);
    }
}
