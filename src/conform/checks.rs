//! The checks, one table of them: each has a stable dotted id, the level
//! it belongs to and a line saying what it checks (the README lists them,
//! with the sentence of the seed text each `seed` check comes from). Each
//! check makes users of its own (`conform-<run id>-<n>`), so one fault
//! fails one check, not every check after it. At `full` the `seed` checks
//! also hold the answers to linkid's exact shapes (problem details, codes,
//! headers, the document's schemas).

use reqwest::Method;
use serde_json::Value;

use super::exchange::{target, Request};
use super::run::{Checked, Run, Stop};
use super::Level;
use crate::domain::Operation;

mod auth;
mod errors;
mod links;
mod races;
mod records;

/// One check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    AuthMissingToken,
    AuthInvalidToken,
    ProvidersList,
    LinksListEmpty,
    LinksCreate,
    LinksRetry,
    LinksEmbedActions,
    LinksUserAlreadyLinked,
    LinksInvalidProvider,
    LinksMissingField,
    LinksDelete,
    LinksRetryNewUsername,
    LinksIdentityAlreadyLinked,
    LinksLocation,
    LinksGet,
    LinksDeleteMissing,
    LinksInvalidBody,
    ErrorsProblemDetails,
    HeadersRequestId,
    SearchReverseLookup,
    EventsFeed,
    LinksRace,
    LinksRaceIdentity,
}

/// One row of the checks table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckSpec {
    /// The stable dotted id.
    pub id: &'static str,
    /// The lowest level that runs it.
    pub level: Level,
    /// What it checks, in a line.
    pub what: &'static str,
}

impl Check {
    /// Every check, in the order a run takes them.
    pub(crate) const ALL: [Check; 23] = [
        Check::AuthMissingToken,
        Check::AuthInvalidToken,
        Check::ProvidersList,
        Check::LinksListEmpty,
        Check::LinksCreate,
        Check::LinksRetry,
        Check::LinksEmbedActions,
        Check::LinksUserAlreadyLinked,
        Check::LinksInvalidProvider,
        Check::LinksMissingField,
        Check::LinksDelete,
        Check::LinksRetryNewUsername,
        Check::LinksIdentityAlreadyLinked,
        Check::LinksLocation,
        Check::LinksGet,
        Check::LinksDeleteMissing,
        Check::LinksInvalidBody,
        Check::ErrorsProblemDetails,
        Check::HeadersRequestId,
        Check::SearchReverseLookup,
        Check::EventsFeed,
        Check::LinksRace,
        Check::LinksRaceIdentity,
    ];

    /// Its row of the table.
    pub(crate) const fn spec(self) -> CheckSpec {
        const fn row(id: &'static str, level: Level, what: &'static str) -> CheckSpec {
            CheckSpec { id, level, what }
        }
        use Level::{Full, Seed};
        match self {
            Check::AuthMissingToken => row(
                "auth.missing-token",
                Seed,
                "each of the four operations without a token is 401 and changes nothing",
            ),
            Check::AuthInvalidToken => row(
                "auth.invalid-token",
                Seed,
                "a malformed token and one signed by another key are 401 on each operation, and change nothing",
            ),
            Check::ProvidersList => row(
                "providers.list",
                Seed,
                "the provider list is 200 and names at least one provider_id",
            ),
            Check::LinksListEmpty => row(
                "links.list-empty",
                Seed,
                "a user never linked lists no identity",
            ),
            Check::LinksCreate => row(
                "links.create",
                Seed,
                "a new link is 201 with the identity sent, and the list shows it",
            ),
            Check::LinksRetry => row(
                "links.retry",
                Seed,
                "the same link again is 200 with the same identity, and still one link",
            ),
            Check::LinksEmbedActions => row(
                "links.embed-actions",
                Seed,
                "embed=ACTIONS offers CREATE on an unlinked user's list and DELETE on each identity, also in the POST answer",
            ),
            Check::LinksUserAlreadyLinked => row(
                "links.user-already-linked",
                Seed,
                "linking a second provider is 400 USER_ALREADY_LINKED and keeps the first link",
            ),
            Check::LinksInvalidProvider => row(
                "links.invalid-provider",
                Seed,
                "a provider_id that is no provider is refused with INVALID_IDENTITY_PROVIDER (at full: 400) and links nothing",
            ),
            Check::LinksMissingField => row(
                "links.missing-field",
                Seed,
                "a link request without provider_id, linked_user_id or linked_username is refused (at full: 400 VALIDATION_FAILED naming it) and links nothing",
            ),
            Check::LinksDelete => row(
                "links.delete",
                Seed,
                "deleting a link is 200 and the list no longer shows it",
            ),
            Check::LinksRetryNewUsername => row(
                "links.retry-new-username",
                Full,
                "the same link with a new linked_username is 200 and updates it",
            ),
            Check::LinksIdentityAlreadyLinked => row(
                "links.identity-already-linked",
                Full,
                "a remote identity linked to another user is 409 IDENTITY_ALREADY_LINKED and links nothing",
            ),
            Check::LinksLocation => row(
                "links.location",
                Full,
                "a 201 has a Location that resolves (with the token) to the new identity",
            ),
            Check::LinksGet => row(
                "links.get",
                Full,
                "GET of one link is 200 with it (DELETE offered with embed=ACTIONS); of a missing one 404 LINKED_IDENTITY_NOT_FOUND",
            ),
            Check::LinksDeleteMissing => row(
                "links.delete-missing",
                Full,
                "deleting a link the user does not have (never, no longer, unknown provider) is 404 LINKED_IDENTITY_NOT_FOUND",
            ),
            Check::LinksInvalidBody => row(
                "links.invalid-body",
                Full,
                "a wrong type, an unknown field, a 256-character value, malformed JSON, a wrong Content-Type and a 17 KiB body are each refused (400 naming the field, 400, 415, 413) and link nothing",
            ),
            Check::ErrorsProblemDetails => row(
                "errors.problem-details",
                Full,
                "a 401, a 400 and a 404 are application/problem+json with status, title, detail, an upper-case code and the request_id of x-request-id",
            ),
            Check::HeadersRequestId => row(
                "headers.request-id",
                Full,
                "every answer, errors included, carries x-request-id, and a sane one sent is echoed",
            ),
            Check::SearchReverseLookup => row(
                "search.reverse-lookup",
                Full,
                "the reverse lookup by provider_id and linked_user_id finds the one user, an unknown identity is an empty list, linked_user_id alone is 400",
            ),
            Check::EventsFeed => row(
                "events.feed",
                Full,
                "the change feed shows this run's LINKED, UPDATED and UNLINKED in order, and nothing for a retry or a refused request",
            ),
            Check::LinksRace => row(
                "links.race",
                Full,
                "16 concurrent links for one user: exactly one 201, the rest 200 (the same link) or 400 USER_ALREADY_LINKED, one link stored",
            ),
            Check::LinksRaceIdentity => row(
                "links.race-identity",
                Full,
                "16 users linking one remote identity at once: exactly one 201, the rest 409 IDENTITY_ALREADY_LINKED",
            ),
        }
    }

    /// Its id.
    pub(crate) fn id(self) -> &'static str {
        self.spec().id
    }

    /// Runs it.
    pub(crate) async fn run(self, run: &Run) -> Checked {
        match self {
            Check::AuthMissingToken => auth::auth_missing_token(run).await,
            Check::AuthInvalidToken => auth::auth_invalid_token(run).await,
            Check::ProvidersList => links::providers_list(run).await,
            Check::LinksListEmpty => links::links_list_empty(run).await,
            Check::LinksCreate => links::links_create(run).await,
            Check::LinksRetry => links::links_retry(run).await,
            Check::LinksEmbedActions => links::links_embed_actions(run).await,
            Check::LinksUserAlreadyLinked => links::links_user_already_linked(run).await,
            Check::LinksInvalidProvider => links::links_invalid_provider(run).await,
            Check::LinksMissingField => links::links_missing_field(run).await,
            Check::LinksDelete => links::links_delete(run).await,
            Check::LinksRetryNewUsername => links::links_retry_new_username(run).await,
            Check::LinksIdentityAlreadyLinked => links::links_identity_already_linked(run).await,
            Check::LinksLocation => links::links_location(run).await,
            Check::LinksGet => links::links_get(run).await,
            Check::LinksDeleteMissing => links::links_delete_missing(run).await,
            Check::LinksInvalidBody => links::links_invalid_body(run).await,
            Check::ErrorsProblemDetails => errors::errors_problem_details(run).await,
            Check::HeadersRequestId => errors::headers_request_id(run).await,
            Check::SearchReverseLookup => records::search_reverse_lookup(run).await,
            Check::EventsFeed => records::events_feed(run).await,
            Check::LinksRace => races::links_race(run).await,
            Check::LinksRaceIdentity => races::links_race_identity(run).await,
        }
    }
}

/// Stops a check as failed: what was expected, what came.
fn fail<T>(message: String) -> Result<T, Stop> {
    Err(Stop::Fail(message))
}

/// The provider list request.
fn providers_request<'a>() -> Request<'a> {
    Request::new(
        Method::GET,
        target(Operation::ListIdentityProviders, &[], ""),
    )
}

/// A provider id that no server configures.
fn no_such_provider(run: &Run) -> String {
    format!("conform-{}-no-such-provider", run.id)
}

/// The provider to use where a check only needs some provider id.
fn any_provider(run: &Run) -> String {
    run.provider().unwrap_or_else(|_| no_such_provider(run))
}

/// The strings of an `actions` member, or None when it is absent.
fn actions(value: &Value) -> Option<Vec<String>> {
    value.get("actions").map(|actions| {
        actions
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|a| a.as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_ids_are_distinct_dotted_and_the_seed_ones_come_first() {
        let ids: Vec<&str> = Check::ALL.iter().map(|c| c.id()).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|id| id.contains('.')
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '-')));
        let first_full = Check::ALL
            .iter()
            .position(|c| c.spec().level == Level::Full)
            .unwrap();
        assert!(Check::ALL[first_full..]
            .iter()
            .all(|c| c.spec().level == Level::Full));
    }

    #[test]
    fn the_seed_level_has_the_checks_the_design_names() {
        let seed: Vec<&str> = Check::ALL
            .iter()
            .filter(|c| c.spec().level == Level::Seed)
            .map(|c| c.id())
            .collect();
        assert_eq!(
            seed,
            [
                "auth.missing-token",
                "auth.invalid-token",
                "providers.list",
                "links.list-empty",
                "links.create",
                "links.retry",
                "links.embed-actions",
                "links.user-already-linked",
                "links.invalid-provider",
                "links.missing-field",
                "links.delete",
            ]
        );
    }
}
