//! `providers.list` and `links.*`: the four operations of the seed text,
//! and what linkid adds to them (GET one, `Location`, the 409, exact
//! validation).

use reqwest::Method;
use serde_json::{json, Value};

use super::{actions, fail, no_such_provider, providers_request};
use crate::conform::exchange::{target, Answer, Body, Request};
use crate::conform::run::{Checked, Link, Run, Stop};
use crate::conform::schema::{self, SEED_FIELDS};
use crate::domain::{Operation, MAX_TEXT_CHARS};

pub(super) async fn providers_list(run: &Run) -> Checked {
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

pub(super) async fn links_list_empty(run: &Run) -> Checked {
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

pub(super) async fn links_create(run: &Run) -> Checked {
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

pub(super) async fn links_retry(run: &Run) -> Checked {
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

pub(super) async fn links_embed_actions(run: &Run) -> Checked {
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

pub(super) async fn links_user_already_linked(run: &Run) -> Checked {
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

pub(super) async fn links_invalid_provider(run: &Run) -> Checked {
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

pub(super) async fn links_missing_field(run: &Run) -> Checked {
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

pub(super) async fn links_delete(run: &Run) -> Checked {
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

pub(super) async fn links_retry_new_username(run: &Run) -> Checked {
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

pub(super) async fn links_identity_already_linked(run: &Run) -> Checked {
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

pub(super) async fn links_location(run: &Run) -> Checked {
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

pub(super) async fn links_get(run: &Run) -> Checked {
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

pub(super) async fn links_delete_missing(run: &Run) -> Checked {
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

pub(super) async fn links_invalid_body(run: &Run) -> Checked {
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
