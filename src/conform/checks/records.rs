//! `search.reverse-lookup` and `events.feed`: the system of record, as a
//! login and an auditor use it.

use reqwest::Method;

use super::{fail, no_such_provider};
use crate::conform::exchange::{query, target, Request};
use crate::conform::run::{Checked, Link, Run, Stop};
use crate::domain::Operation;

pub(super) async fn search_reverse_lookup(run: &Run) -> Checked {
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

pub(super) async fn events_feed(run: &Run) -> Checked {
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
