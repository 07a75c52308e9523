//! `links.race` and `links.race-identity`: both uniqueness rules hold under
//! concurrent requests, one winner each.

use futures_util::future::join_all;

use super::fail;
use crate::conform::exchange::Answer;
use crate::conform::run::{Checked, Link, Run, Stop};
use crate::domain::Operation;

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

pub(super) async fn links_race(run: &Run) -> Checked {
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

pub(super) async fn links_race_identity(run: &Run) -> Checked {
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
