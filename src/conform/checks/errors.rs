//! `errors.problem-details` and `headers.request-id`: what every error and
//! every answer of linkid carries.

use reqwest::Method;

use super::{any_provider, fail, no_such_provider, providers_request};
use crate::conform::exchange::{target, Auth, Request};
use crate::conform::run::{Checked, Link, Run, Stop};
use crate::domain::Operation;

pub(super) async fn errors_problem_details(run: &Run) -> Checked {
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

pub(super) async fn headers_request_id(run: &Run) -> Checked {
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
