//! `auth.*`: without a token, and with a malformed or forged one, every
//! operation is 401 and changes nothing.

use reqwest::Method;

use super::{any_provider, fail, providers_request};
use crate::conform::exchange::{target, Answer, Auth, Body, Request};
use crate::conform::run::{Checked, Link, Run, Stop};
use crate::domain::Operation;

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

pub(super) async fn auth_missing_token(run: &Run) -> Checked {
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

pub(super) async fn auth_invalid_token(run: &Run) -> Checked {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_token_is_a_well_formed_biscuit() {
        let token = forged_token().unwrap();
        assert!(biscuit_auth::UnverifiedBiscuit::from_base64(&token).is_ok());
    }
}
