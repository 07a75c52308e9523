//! The checks, one table of them: each has a stable dotted id, the level
//! it belongs to and a line saying what it checks (the README lists them,
//! with the sentence of the seed text each `seed` check comes from). Each
//! check makes users of its own (`conform-<run id>-<n>`), so one fault
//! fails one check, not every check after it. At `full` the `seed` checks
//! also hold the answers to linkid's exact shapes (problem details, codes,
//! headers, the document's schemas).

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};

use super::exchange::{query, target, Answer, Auth, Body, Request};
use super::run::{Checked, Link, Run, Stop};
use super::schema::{self, SEED_FIELDS};
use super::Level;
use crate::domain::{Operation, MAX_TEXT_CHARS};

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
            Check::AuthMissingToken => auth_missing_token(run).await,
            Check::AuthInvalidToken => auth_invalid_token(run).await,
            Check::ProvidersList => providers_list(run).await,
            Check::LinksListEmpty => links_list_empty(run).await,
            Check::LinksCreate => links_create(run).await,
            Check::LinksRetry => links_retry(run).await,
            Check::LinksEmbedActions => links_embed_actions(run).await,
            Check::LinksUserAlreadyLinked => links_user_already_linked(run).await,
            Check::LinksInvalidProvider => links_invalid_provider(run).await,
            Check::LinksMissingField => links_missing_field(run).await,
            Check::LinksDelete => links_delete(run).await,
            Check::LinksRetryNewUsername => links_retry_new_username(run).await,
            Check::LinksIdentityAlreadyLinked => links_identity_already_linked(run).await,
            Check::LinksLocation => links_location(run).await,
            Check::LinksGet => links_get(run).await,
            Check::LinksDeleteMissing => links_delete_missing(run).await,
            Check::LinksInvalidBody => links_invalid_body(run).await,
            Check::ErrorsProblemDetails => errors_problem_details(run).await,
            Check::HeadersRequestId => headers_request_id(run).await,
            Check::SearchReverseLookup => search_reverse_lookup(run).await,
            Check::EventsFeed => events_feed(run).await,
            Check::LinksRace => links_race(run).await,
            Check::LinksRaceIdentity => links_race_identity(run).await,
        }
    }
}

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

/// One request for each of the four operations, on `user` and `link`,
/// with `auth`.
fn the_four<'a>(
    run: &Run,
    user: &str,
    link: &Link,
    auth: Auth<'a>,
) -> Vec<(Operation, Request<'a>)> {
    run.note(user, &link.provider_id);
    let with = |operation: Operation, method: Method, params: &[(&str, &str)]| {
        let mut request = Request::new(method, target(operation, params, ""));
        request.auth = auth;
        request
    };
    let mut post = with(Operation::LinkIdentity, Method::POST, &[("user_id", user)]);
    post.body = Some(Body::Json(link.body()));
    vec![
        (
            Operation::ListIdentityProviders,
            with(Operation::ListIdentityProviders, Method::GET, &[]),
        ),
        (
            Operation::ListLinkedIdentities,
            with(
                Operation::ListLinkedIdentities,
                Method::GET,
                &[("user_id", user)],
            ),
        ),
        (Operation::LinkIdentity, post),
        (
            Operation::DeleteLinkedIdentity,
            with(
                Operation::DeleteLinkedIdentity,
                Method::DELETE,
                &[("user_id", user), ("provider_id", &link.provider_id)],
            ),
        ),
    ]
}

/// A well-formed admin token signed by a key of its own, which no server
/// under judgement trusts.
fn forged_token() -> Option<String> {
    let keypair = biscuit_auth::KeyPair::new();
    biscuit_auth::Biscuit::builder()
        .code(r#"role("admin");"#)
        .ok()?
        .build(&keypair)
        .ok()?
        .to_base64()
        .ok()
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

/// Fails unless a 401 has the `WWW-Authenticate` challenge linkid sends:
/// `Bearer`, with `error="invalid_token"` exactly when a token was sent.
fn expect_challenge(answer: &Answer, invalid_token: bool) -> Checked {
    let challenge = answer.header("www-authenticate").unwrap_or("");
    let bearer = challenge
        .trim_start()
        .get(..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"));
    let names_error = challenge.contains("invalid_token");
    if bearer && names_error == invalid_token {
        return Ok(());
    }
    fail(format!(
        "expected WWW-Authenticate: Bearer{} on a 401 {}, got {:?} ({})",
        if invalid_token {
            " error=\"invalid_token\""
        } else {
            ""
        },
        if invalid_token {
            "with an invalid token"
        } else {
            "without a token"
        },
        challenge,
        answer.describe()
    ))
}

async fn auth_missing_token(run: &Run) -> Checked {
    let user = run.user();
    let link = Link::of(&user, &any_provider(run));
    for (operation, request) in the_four(run, &user, &link, Auth::Without) {
        let answer = run.send(request).await?;
        run.expect_status(&answer, 401, "without a token")?;
        if run.full() {
            run.expect_error(
                operation,
                &answer,
                401,
                "UNAUTHENTICATED",
                "without a token",
            )?;
            expect_challenge(&answer, false)?;
        }
    }
    run.expect_links(&user, &[], "after requests without a token")
        .await
}

async fn auth_invalid_token(run: &Run) -> Checked {
    let user = run.user();
    let link = Link::of(&user, &any_provider(run));
    let forged = forged_token()
        .ok_or_else(|| Stop::Skip("cannot make a token signed by another key".to_string()))?;
    let malformed = format!("conform-{}-not-a-token", run.id);
    let mut requests = the_four(run, &user, &link, Auth::Bearer(&forged));
    let mut malformed_request = providers_request();
    malformed_request.auth = Auth::Bearer(&malformed);
    requests.push((Operation::ListIdentityProviders, malformed_request));
    for (operation, request) in requests {
        let answer = run.send(request).await?;
        run.expect_status(&answer, 401, "with a malformed or forged token")?;
        if run.full() {
            run.expect_error(
                operation,
                &answer,
                401,
                "INVALID_TOKEN",
                "with a malformed or forged token",
            )?;
            expect_challenge(&answer, true)?;
        }
    }
    run.expect_links(&user, &[], "after requests with invalid tokens")
        .await
}

async fn providers_list(run: &Run) -> Checked {
    let answer = run.send(providers_request()).await?;
    run.expect_status(&answer, 200, "for the provider list")?;
    let body = run.judged(Operation::ListIdentityProviders, &answer)?;
    let named = if run.full() {
        body["identity_providers"].as_array().map_or(0, Vec::len)
    } else {
        schema::objects_with(&body, "provider_id").len()
    };
    if named == 0 {
        return fail(format!(
            "expected the provider list to name a provider_id (configure a linkable provider to judge this server), got {}",
            answer.describe()
        ));
    }
    Ok(())
}

async fn links_list_empty(run: &Run) -> Checked {
    let user = run.user();
    let answer = run.list(&user, "").await?;
    run.expect_status(&answer, 200, "listing a user who was never linked")?;
    let body = run.judged(Operation::ListLinkedIdentities, &answer)?;
    if !run.identities(&body).is_empty() {
        return fail(format!(
            "expected no identity for a user who was never linked, got {}",
            answer.describe()
        ));
    }
    if run.full() && body.get("actions").is_some() {
        return fail(format!(
            "expected no actions without embed=ACTIONS, got {}",
            answer.describe()
        ));
    }
    Ok(())
}

async fn links_create(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    let answer = run.link(&user, &link, "").await?;
    run.expect_status(&answer, 201, "for a new link")?;
    let body = run.judged(Operation::LinkIdentity, &answer)?;
    run.expect_identity(&answer, &body, &link)?;
    if run.full() && body.get("actions").is_some() {
        return fail(format!(
            "expected no actions without embed=ACTIONS, got {}",
            answer.describe()
        ));
    }
    run.expect_links(&user, &[&link], "after linking").await
}

async fn links_retry(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    let first = run.linked(&user, &link).await?;
    let answer = run.link(&user, &link, "").await?;
    run.expect_status(&answer, 200, "for the same link again")?;
    let body = run.judged(Operation::LinkIdentity, &answer)?;
    run.expect_identity(&answer, &body, &link)?;
    if run.full() {
        let created = first.json().ok().map(|b| b["created_at"].clone());
        if created.is_some_and(|c| c != body["created_at"]) {
            return fail(format!(
                "expected the retry to keep created_at, got {}",
                answer.describe()
            ));
        }
    }
    run.expect_links(&user, &[&link], "after a retry").await
}

async fn links_embed_actions(run: &Run) -> Checked {
    const EMBED: &str = "?embed=ACTIONS";
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);

    let answer = run.list(&user, EMBED).await?;
    run.expect_status(&answer, 200, "listing with embed=ACTIONS")?;
    let body = run.judged(Operation::ListLinkedIdentities, &answer)?;
    let offered = if run.full() {
        actions(&body) == Some(vec!["CREATE".to_string()])
    } else {
        schema::holds_string(&body, "CREATE")
    };
    if !offered {
        return fail(format!(
            "expected the list of a user without a link to offer CREATE with embed=ACTIONS, got {}",
            answer.describe()
        ));
    }

    let answer = run.link(&user, &link, EMBED).await?;
    run.expect_status(&answer, 201, "for a new link with embed=ACTIONS")?;
    let body = run.judged(Operation::LinkIdentity, &answer)?;
    run.expect_identity(&answer, &body, &link)?;
    let offered = if run.full() {
        actions(&body) == Some(vec!["DELETE".to_string()])
    } else {
        schema::holds_string(&body, "DELETE")
    };
    if !offered {
        return fail(format!(
            "expected the new identity to offer DELETE with embed=ACTIONS, got {}",
            answer.describe()
        ));
    }

    let answer = run.list(&user, EMBED).await?;
    run.expect_status(&answer, 200, "listing with embed=ACTIONS")?;
    let body = run.judged(Operation::ListLinkedIdentities, &answer)?;
    let identities = run.identities(&body);
    let offered = match identities.as_slice() {
        [identity] if run.full() => {
            actions(identity) == Some(vec!["DELETE".to_string()])
                && actions(&body) == Some(Vec::new())
        }
        [identity] => schema::holds_string(identity, "DELETE"),
        _ => false,
    };
    if !offered {
        return fail(format!(
            "expected one identity offering DELETE{} with embed=ACTIONS, got {}",
            if run.full() {
                ", and no CREATE for a linked user,"
            } else {
                ""
            },
            answer.describe()
        ));
    }

    if run.full() {
        let answer = run.list(&user, "").await?;
        run.expect_status(&answer, 200, "listing without embed")?;
        let body = run.judged(Operation::ListLinkedIdentities, &answer)?;
        if actions(&body).is_some() || run.identities(&body).iter().any(|i| actions(i).is_some()) {
            return fail(format!(
                "expected no actions without embed=ACTIONS, got {}",
                answer.describe()
            ));
        }
    }
    Ok(())
}

async fn links_user_already_linked(run: &Run) -> Checked {
    let provider = run.provider()?;
    let second = run.second_provider()?;
    let user = run.user();
    let first = Link::of(&user, &provider);
    run.linked(&user, &first).await?;
    let other = Link {
        provider_id: second,
        linked_user_id: format!("{user}-remote-2"),
        linked_username: format!("{user}-2@conform.example"),
    };
    let answer = run.link(&user, &other, "").await?;
    run.expect_error(
        Operation::LinkIdentity,
        &answer,
        400,
        "USER_ALREADY_LINKED",
        "for a link to a second provider",
    )?;
    if run.full() {
        let same_provider = Link {
            provider_id: provider,
            linked_user_id: format!("{user}-remote-3"),
            linked_username: format!("{user}-3@conform.example"),
        };
        let answer = run.link(&user, &same_provider, "").await?;
        run.expect_error(
            Operation::LinkIdentity,
            &answer,
            400,
            "USER_ALREADY_LINKED",
            "for a second link to the same provider",
        )?;
    }
    run.expect_links(&user, &[&first], "after the refused links")
        .await
}

async fn links_invalid_provider(run: &Run) -> Checked {
    let user = run.user();
    let link = Link::of(&user, &no_such_provider(run));
    let answer = run.link(&user, &link, "").await?;
    let why = "for a provider_id that is no provider";
    if run.full() {
        run.expect_error(
            Operation::LinkIdentity,
            &answer,
            400,
            "INVALID_IDENTITY_PROVIDER",
            why,
        )?;
    } else {
        run.expect_refusal(&answer, Some("INVALID_IDENTITY_PROVIDER"), why)?;
    }
    run.expect_links(&user, &[], "after a link to no provider")
        .await
}

async fn links_missing_field(run: &Run) -> Checked {
    let provider = run.provider()?;
    for field in SEED_FIELDS {
        let user = run.user();
        let mut body = Link::of(&user, &provider).body();
        if let Some(members) = body.as_object_mut() {
            members.remove(field);
        }
        let answer = run.post_link(&user, Body::Json(body), "").await?;
        let why = format!("for a link request without {field}");
        if run.full() {
            expect_validation(run, &answer, field, &why)?;
        } else {
            run.expect_refusal(&answer, None, &why)?;
        }
        run.expect_links(&user, &[], &format!("after a link request without {field}"))
            .await?;
    }
    Ok(())
}

/// Fails unless the answer is 400 VALIDATION_FAILED naming `field` in its
/// `errors`.
fn expect_validation(run: &Run, answer: &Answer, field: &str, why: &str) -> Checked {
    run.expect_error(
        Operation::LinkIdentity,
        answer,
        400,
        "VALIDATION_FAILED",
        why,
    )?;
    let named = answer.json().ok().is_some_and(|body| {
        body["errors"]
            .as_array()
            .is_some_and(|errors| errors.iter().any(|e| e["field"] == field))
    });
    if !named {
        return fail(format!(
            "expected 400 VALIDATION_FAILED naming {field} in errors {why}, got {}",
            answer.describe()
        ));
    }
    Ok(())
}

async fn links_delete(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    run.linked(&user, &link).await?;
    let answer = run.delete(&user, &provider).await?;
    run.expect_status(&answer, 200, "for deleting a link")?;
    let body = run.judged(Operation::DeleteLinkedIdentity, &answer)?;
    if run.full() {
        run.expect_identity(&answer, &body, &link)?;
    } else if let Some(identity) = schema::objects_with(&body, "provider_id").first() {
        run.expect_identity(&answer, identity, &link)?;
    }
    run.expect_links(&user, &[], "after deleting the link")
        .await?;
    if run.full() {
        let answer = run.link(&user, &link, "").await?;
        run.expect_status(&answer, 201, "for linking again after the delete")?;
    }
    Ok(())
}

async fn links_retry_new_username(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    run.linked(&user, &link).await?;
    let renamed = Link {
        linked_username: format!("{user}-renamed@conform.example"),
        ..link
    };
    let answer = run.link(&user, &renamed, "").await?;
    run.expect_status(&answer, 200, "for the same link with a new linked_username")?;
    let body = run.judged(Operation::LinkIdentity, &answer)?;
    run.expect_identity(&answer, &body, &renamed)?;
    run.expect_links(&user, &[&renamed], "after a new linked_username")
        .await
}

async fn links_identity_already_linked(run: &Run) -> Checked {
    let provider = run.provider()?;
    let owner = run.user();
    let link = Link::of(&owner, &provider);
    run.linked(&owner, &link).await?;
    let other = run.user();
    let taken = Link {
        linked_username: format!("{other}@conform.example"),
        ..link.clone()
    };
    let answer = run.link(&other, &taken, "").await?;
    run.expect_error(
        Operation::LinkIdentity,
        &answer,
        409,
        "IDENTITY_ALREADY_LINKED",
        "for a remote identity linked to another user",
    )?;
    run.expect_links(&other, &[], "after a link to another user's identity")
        .await?;
    run.expect_links(&owner, &[&link], "after another user tried its identity")
        .await
}

async fn links_location(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    let answer = run.link(&user, &link, "").await?;
    run.expect_status(&answer, 201, "for a new link")?;
    let Some(location) = answer.header("location") else {
        return fail(format!(
            "expected a Location header on a 201, got none ({})",
            answer.describe()
        ));
    };
    let from = target(Operation::LinkIdentity, &[("user_id", &user)], "");
    let resolved = run.api.target_of(&from, location).map_err(Stop::Fail)?;
    let got = run.send(Request::new(Method::GET, resolved)).await?;
    run.expect_status(&got, 200, &format!("for GET of the Location {location:?}"))?;
    let body = run.judged(Operation::GetLinkedIdentity, &got)?;
    run.expect_identity(&got, &body, &link)
}

async fn links_get(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    run.linked(&user, &link).await?;
    let answer = run.get(&user, &provider, "").await?;
    run.expect_status(&answer, 200, "for GET of a link")?;
    let body = run.judged(Operation::GetLinkedIdentity, &answer)?;
    run.expect_identity(&answer, &body, &link)?;
    if actions(&body).is_some() {
        return fail(format!(
            "expected no actions without embed=ACTIONS, got {}",
            answer.describe()
        ));
    }
    let answer = run.get(&user, &provider, "?embed=ACTIONS").await?;
    run.expect_status(&answer, 200, "for GET of a link with embed=ACTIONS")?;
    let body = run.judged(Operation::GetLinkedIdentity, &answer)?;
    if actions(&body) != Some(vec!["DELETE".to_string()]) {
        return fail(format!(
            "expected the identity to offer DELETE with embed=ACTIONS, got {}",
            answer.describe()
        ));
    }
    let other = run.user();
    let answer = run.get(&other, &provider, "").await?;
    run.expect_error(
        Operation::GetLinkedIdentity,
        &answer,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
        "for GET of a link the user does not have",
    )
}

async fn links_delete_missing(run: &Run) -> Checked {
    let provider = run.provider()?;
    let never = run.user();
    let answer = run.delete(&never, &provider).await?;
    run.expect_error(
        Operation::DeleteLinkedIdentity,
        &answer,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
        "for deleting a link the user never had",
    )?;
    let answer = run.delete(&never, &no_such_provider(run)).await?;
    run.expect_error(
        Operation::DeleteLinkedIdentity,
        &answer,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
        "for deleting a link to a provider that does not exist",
    )?;
    let user = run.user();
    run.linked(&user, &Link::of(&user, &provider)).await?;
    let answer = run.delete(&user, &provider).await?;
    run.expect_status(&answer, 200, "for deleting a link")?;
    let answer = run.delete(&user, &provider).await?;
    run.expect_error(
        Operation::DeleteLinkedIdentity,
        &answer,
        404,
        "LINKED_IDENTITY_NOT_FOUND",
        "for deleting the same link twice",
    )
}

async fn links_invalid_body(run: &Run) -> Checked {
    let provider = run.provider()?;
    let json_body = |user: &str, change: &dyn Fn(&mut Value)| {
        let mut body = Link::of(user, &provider).body();
        change(&mut body);
        body
    };

    let user = run.user();
    let body = json_body(&user, &|b| b["linked_user_id"] = json!(42));
    let answer = run.post_link(&user, Body::Json(body), "").await?;
    expect_validation(
        run,
        &answer,
        "linked_user_id",
        "for a number as linked_user_id",
    )?;
    run.expect_links(&user, &[], "after a refused link").await?;

    let user = run.user();
    let body = json_body(&user, &|b| b["conform_unknown"] = json!(true));
    let answer = run.post_link(&user, Body::Json(body), "").await?;
    expect_validation(run, &answer, "conform_unknown", "for an unknown field")?;
    run.expect_links(&user, &[], "after a refused link").await?;

    let user = run.user();
    let long = "x".repeat(MAX_TEXT_CHARS + 1);
    let body = json_body(&user, &|b| b["linked_username"] = json!(long));
    let answer = run.post_link(&user, Body::Json(body), "").await?;
    expect_validation(
        run,
        &answer,
        "linked_username",
        "for a linked_username of 256 characters",
    )?;
    run.expect_links(&user, &[], "after a refused link").await?;

    let user = run.user();
    run.note(&user, &provider);
    let malformed = format!("{{\"provider_id\": \"{provider}\", ");
    let answer = run
        .post_link(
            &user,
            Body::Raw {
                content_type: "application/json",
                bytes: malformed.into_bytes(),
            },
            "",
        )
        .await?;
    run.expect_error(
        Operation::LinkIdentity,
        &answer,
        400,
        "MALFORMED_JSON",
        "for a body that is not JSON",
    )?;
    run.expect_links(&user, &[], "after a refused link").await?;

    let user = run.user();
    run.note(&user, &provider);
    let text = Link::of(&user, &provider).body().to_string();
    let answer = run
        .post_link(
            &user,
            Body::Raw {
                content_type: "text/plain",
                bytes: text.into_bytes(),
            },
            "",
        )
        .await?;
    run.expect_error(
        Operation::LinkIdentity,
        &answer,
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "for a body sent as text/plain",
    )?;
    run.expect_links(&user, &[], "after a refused link").await?;

    let user = run.user();
    run.note(&user, &provider);
    let padding = " ".repeat(17 * 1024);
    let large = format!("{}{padding}", Link::of(&user, &provider).body());
    let answer = run
        .post_link(
            &user,
            Body::Raw {
                content_type: "application/json",
                bytes: large.into_bytes(),
            },
            "",
        )
        .await?;
    run.expect_error(
        Operation::LinkIdentity,
        &answer,
        413,
        "PAYLOAD_TOO_LARGE",
        "for a 17 KiB body",
    )?;
    run.expect_links(&user, &[], "after a refused link").await
}

async fn errors_problem_details(run: &Run) -> Checked {
    let mut without = providers_request();
    without.auth = Auth::Without;
    let unauthenticated = run.send(without).await?;
    run.expect_status(&unauthenticated, 401, "without a token")?;

    let user = run.user();
    let refused = run
        .link(&user, &Link::of(&user, &no_such_provider(run)), "")
        .await?;
    run.expect_status(&refused, 400, "for a provider_id that is no provider")?;

    let missing = run.get(&user, &any_provider(run), "").await?;
    run.expect_status(&missing, 404, "for GET of a link the user does not have")?;

    for answer in [&unauthenticated, &refused, &missing] {
        let problem = || {
            format!(
                "{} is not problem details as linkid sends them",
                answer.describe()
            )
        };
        if answer.media_type().as_deref() != Some("application/problem+json") {
            return fail(format!(
                "expected Content-Type application/problem+json, got {:?}: {}",
                answer.header("content-type").unwrap_or(""),
                problem()
            ));
        }
        let body = answer
            .json()
            .map_err(|fault| Stop::Fail(format!("{fault}: {}", problem())))?;
        let text = |name: &str| body[name].as_str().filter(|t| !t.trim().is_empty());
        let upper_case = text("code").is_some_and(|code| {
            code.starts_with(|c: char| c.is_ascii_uppercase())
                && code
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
        let faults: Vec<&str> = [
            (
                body["status"].as_u64() != Some(u64::from(answer.status)),
                "status is not the HTTP status",
            ),
            (text("title").is_none(), "no title"),
            (text("detail").is_none(), "no detail"),
            (!upper_case, "code is not an upper-case code"),
            (
                text("request_id").is_none() || text("request_id") != answer.header("x-request-id"),
                "request_id is not the x-request-id header",
            ),
        ]
        .into_iter()
        .filter_map(|(fault, what)| fault.then_some(what))
        .collect();
        if !faults.is_empty() {
            return fail(format!("{}: {}", faults.join(", "), problem()));
        }
    }
    Ok(())
}

async fn headers_request_id(run: &Run) -> Checked {
    let sent = format!("conform-{}-request-id", run.id);
    let mut with_id = providers_request();
    with_id.request_id = Some(&sent);
    let answer = run.send(with_id).await?;
    run.expect_status(&answer, 200, "for the provider list")?;
    if answer.header("x-request-id") != Some(sent.as_str()) {
        return fail(format!(
            "expected x-request-id {sent:?} echoed, got {:?} ({})",
            answer.header("x-request-id").unwrap_or(""),
            answer.describe()
        ));
    }
    let user = run.user();
    let mut without = providers_request();
    without.auth = Auth::Without;
    let mut missing = Request::new(
        Method::GET,
        target(
            Operation::GetLinkedIdentity,
            &[("user_id", &user), ("provider_id", &any_provider(run))],
            "",
        ),
    );
    missing.request_id = Some(&sent);
    let answers = [
        run.send(providers_request()).await?,
        run.send(without).await?,
        run.send(missing).await?,
    ];
    for answer in &answers {
        if answer
            .header("x-request-id")
            .is_none_or(|id| id.trim().is_empty())
        {
            return fail(format!(
                "expected an x-request-id header on every answer, got none on {}",
                answer.describe()
            ));
        }
    }
    if answers[2].header("x-request-id") != Some(sent.as_str()) {
        return fail(format!(
            "expected x-request-id {sent:?} echoed on an error, got {:?} ({})",
            answers[2].header("x-request-id").unwrap_or(""),
            answers[2].describe()
        ));
    }
    Ok(())
}

async fn search_reverse_lookup(run: &Run) -> Checked {
    let provider = run.provider()?;
    let user = run.user();
    let link = Link::of(&user, &provider);
    run.linked(&user, &link).await?;
    let search = |pairs: &[(&str, &str)]| {
        Request::new(
            Method::GET,
            target(Operation::SearchLinkedIdentities, &[], &query(pairs)),
        )
    };

    let answer = run
        .send(search(&[
            ("provider_id", &provider),
            ("linked_user_id", &link.linked_user_id),
        ]))
        .await?;
    run.expect_status(&answer, 200, "for the reverse lookup of a linked identity")?;
    let body = run.judged(Operation::SearchLinkedIdentities, &answer)?;
    let items = body["linked_identities"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match items.as_slice() {
        [item] if item["user_id"] == user.as_str() => run.expect_identity(&answer, item, &link)?,
        _ => {
            return fail(format!(
                "expected the reverse lookup to find exactly {user}, got {}",
                answer.describe()
            ))
        }
    }

    let unknown = format!("{}-unknown", link.linked_user_id);
    let answer = run
        .send(search(&[
            ("provider_id", &provider),
            ("linked_user_id", &unknown),
        ]))
        .await?;
    run.expect_status(
        &answer,
        200,
        "for the reverse lookup of an identity nobody has",
    )?;
    let body = run.judged(Operation::SearchLinkedIdentities, &answer)?;
    if body["linked_identities"]
        .as_array()
        .is_none_or(|items| !items.is_empty())
    {
        return fail(format!(
            "expected an empty list for an identity nobody has, got {}",
            answer.describe()
        ));
    }

    let answer = run
        .send(search(&[("linked_user_id", &link.linked_user_id)]))
        .await?;
    run.expect_error(
        Operation::SearchLinkedIdentities,
        &answer,
        400,
        "VALIDATION_FAILED",
        "for linked_user_id without provider_id",
    )
}

/// Whether the change feed holds an event after `after` (an expired
/// `after` counts: events followed it).
async fn feed_moves_past(run: &Run, after: u64) -> Result<bool, Stop> {
    let request = Request::new(
        Method::GET,
        target(
            Operation::ListEvents,
            &[],
            &query(&[("after", &after.to_string()), ("limit", "1"), ("wait", "0")]),
        ),
    );
    let answer = run.send(request).await?;
    match answer.status {
        200 => {
            let body = run.judged(Operation::ListEvents, &answer)?;
            Ok(body["events"].as_array().is_some_and(|e| !e.is_empty()))
        }
        410 => Ok(true),
        _ => fail(format!(
            "expected 200 for the change feed, got {}",
            answer.describe()
        )),
    }
}

/// The change feed's last `seq` now, found in about 2·log2(seq) requests
/// of one event each, however long the feed.
async fn feed_end(run: &Run) -> Result<u64, Stop> {
    if !feed_moves_past(run, 0).await? {
        return Ok(0);
    }
    let (mut below, mut at_or_past) = (0u64, 1u64);
    while feed_moves_past(run, at_or_past).await? {
        below = at_or_past;
        at_or_past = at_or_past
            .checked_mul(2)
            .filter(|n| *n < 1 << 62)
            .ok_or_else(|| {
                Stop::Fail("the change feed has events past every seq asked for".to_string())
            })?;
    }
    while at_or_past - below > 1 {
        let middle = below + (at_or_past - below) / 2;
        if feed_moves_past(run, middle).await? {
            below = middle;
        } else {
            at_or_past = middle;
        }
    }
    Ok(at_or_past)
}

async fn events_feed(run: &Run) -> Checked {
    /// Pages of 1000 events read at most, looking for this run's.
    const MAX_PAGES: usize = 50;
    let provider = run.provider()?;
    let end = feed_end(run).await?;

    let user = run.user();
    let link = Link::of(&user, &provider);
    run.linked(&user, &link).await?;
    let retry = run.link(&user, &link, "").await?;
    run.expect_status(&retry, 200, "for the same link again")?;
    let renamed = Link {
        linked_username: format!("{user}-renamed@conform.example"),
        ..link.clone()
    };
    let answer = run.link(&user, &renamed, "").await?;
    run.expect_status(&answer, 200, "for the same link with a new linked_username")?;
    let answer = run.delete(&user, &provider).await?;
    run.expect_status(&answer, 200, "for deleting a link")?;
    let refused = run
        .link(&user, &Link::of(&user, &no_such_provider(run)), "")
        .await?;
    run.expect_status(&refused, 400, "for a provider_id that is no provider")?;

    let mut after = end;
    let mut seen: Vec<(String, String, String, String)> = Vec::new();
    for _ in 0..MAX_PAGES {
        let request = Request::new(
            Method::GET,
            target(
                Operation::ListEvents,
                &[],
                &query(&[
                    ("after", &after.to_string()),
                    ("limit", "1000"),
                    ("wait", "0"),
                ]),
            ),
        );
        let answer = run.send(request).await?;
        run.expect_status(&answer, 200, "for the change feed")?;
        let body = run.judged(Operation::ListEvents, &answer)?;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            break;
        }
        for event in &events {
            let seq = event["seq"].as_u64().unwrap_or(0);
            if seq <= after {
                return fail(format!(
                    "expected events in ascending seq after {after}, got seq {seq} ({})",
                    answer.describe()
                ));
            }
            after = seq;
            if event["user_id"] == user.as_str() {
                let text = |name: &str| event[name].as_str().unwrap_or("?").to_string();
                seen.push((
                    text("type"),
                    text("provider_id"),
                    text("linked_user_id"),
                    text("linked_username"),
                ));
            }
        }
        if body["next_after"].as_u64() != Some(after) {
            return fail(format!(
                "expected next_after to be the last event's seq {after}, got {}",
                answer.describe()
            ));
        }
    }
    let event = |kind: &str, username: &str| {
        (
            kind.to_string(),
            provider.clone(),
            link.linked_user_id.clone(),
            username.to_string(),
        )
    };
    let expected = vec![
        event("LINKED", &link.linked_username),
        event("UPDATED", &renamed.linked_username),
        event("UNLINKED", &renamed.linked_username),
    ];
    if seen != expected {
        let shown = |events: &[(String, String, String, String)]| {
            events
                .iter()
                .map(|(kind, _, _, username)| format!("{kind} ({username})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return fail(format!(
            "expected the feed after seq {end} to show {user}'s {} and nothing for the retry or the refused link, got {}",
            shown(&expected),
            if seen.is_empty() { "none".to_string() } else { shown(&seen) }
        ));
    }
    Ok(())
}

/// The statuses of answers, counted: `201 ×1, 400 ×15`.
fn statuses(answers: &[Answer]) -> String {
    let mut counts: std::collections::BTreeMap<u16, usize> = std::collections::BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.status).or_default() += 1;
    }
    counts
        .iter()
        .map(|(status, n)| format!("{status} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many requests each race sends at once.
const RACERS: usize = 16;

async fn links_race(run: &Run) -> Checked {
    let provider = run.provider()?;
    let second = run.second_provider().unwrap_or_else(|_| provider.clone());
    let user = run.user();
    let same = Link::of(&user, &provider);
    let links: Vec<Link> = (0..RACERS)
        .map(|i| {
            if i % 2 == 0 {
                same.clone()
            } else {
                Link {
                    provider_id: if i % 4 == 1 {
                        second.clone()
                    } else {
                        provider.clone()
                    },
                    linked_user_id: format!("{user}-remote-{i}"),
                    linked_username: format!("{user}-{i}@conform.example"),
                }
            }
        })
        .collect();
    let answers: Vec<Answer> = join_all(links.iter().map(|link| run.link(&user, link, "")))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let rule = "expected one 201 and the rest 200 (the same link) or 400 USER_ALREADY_LINKED";
    let winners: Vec<usize> = (0..RACERS).filter(|i| answers[*i].status == 201).collect();
    let [winner] = winners[..] else {
        return fail(format!(
            "{RACERS} concurrent links for one user: {rule}, got {}",
            statuses(&answers)
        ));
    };
    let won = &links[winner];
    let body = run.judged(Operation::LinkIdentity, &answers[winner])?;
    run.expect_identity(&answers[winner], &body, won)?;
    for (link, answer) in links.iter().zip(&answers) {
        if answer.status == 201 {
            continue;
        }
        if link == won {
            run.expect_status(answer, 200, "for the winning link sent again")?;
            let body = run.judged(Operation::LinkIdentity, answer)?;
            run.expect_identity(answer, &body, won)?;
        } else {
            run.expect_error(
                Operation::LinkIdentity,
                answer,
                400,
                "USER_ALREADY_LINKED",
                "for a link that lost the race",
            )
            .map_err(|stop| match stop {
                Stop::Fail(why) => Stop::Fail(format!("{why} (all: {})", statuses(&answers))),
                skip => skip,
            })?;
        }
    }
    run.expect_links(&user, &[won], "after the race").await
}

async fn links_race_identity(run: &Run) -> Checked {
    let provider = run.provider()?;
    let users: Vec<String> = (0..RACERS).map(|_| run.user()).collect();
    let remote = format!("{}-shared", users[0]);
    let links: Vec<Link> = users
        .iter()
        .map(|user| Link {
            provider_id: provider.clone(),
            linked_user_id: remote.clone(),
            linked_username: format!("{user}@conform.example"),
        })
        .collect();
    let answers: Vec<Answer> = join_all(
        users
            .iter()
            .zip(&links)
            .map(|(user, link)| run.link(user, link, "")),
    )
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let winners: Vec<usize> = (0..RACERS).filter(|i| answers[*i].status == 201).collect();
    let [winner] = winners[..] else {
        return fail(format!(
            "{RACERS} users linking one remote identity at once: expected one 201 and the rest 409 IDENTITY_ALREADY_LINKED, got {}",
            statuses(&answers)
        ));
    };
    for (i, answer) in answers.iter().enumerate() {
        if i != winner {
            run.expect_error(
                Operation::LinkIdentity,
                answer,
                409,
                "IDENTITY_ALREADY_LINKED",
                "for a user that lost the race for a remote identity",
            )?;
        }
    }
    for (i, user) in users.iter().enumerate() {
        let expected: Vec<&Link> = if i == winner {
            vec![&links[i]]
        } else {
            Vec::new()
        };
        run.expect_links(user, &expected, "after the race for one remote identity")
            .await?;
    }
    Ok(())
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

    #[test]
    fn a_forged_token_is_a_well_formed_biscuit() {
        let token = forged_token().unwrap();
        assert!(biscuit_auth::UnverifiedBiscuit::from_base64(&token).is_ok());
    }
}
