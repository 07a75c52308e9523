//! One run against one server: what its checks share (the server, the
//! judge, the providers found, the users made and the links tried, for the
//! cleanup) and the words the checks are written in — make a user, link,
//! list, delete, expect a status, an error code, these links.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use reqwest::Method;
use serde_json::Value;

use super::exchange::{self, Answer, Api, Body, Request, Unanswered};
use super::schema::{self, Judge};
use super::Level;
use crate::domain::{LinkRequest, Operation};

/// Why a check stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The server broke the contract: what was expected, what came.
    Fail(String),
    /// The check could not run here, and why.
    Skip(String),
}

impl From<Unanswered> for Stop {
    fn from(unanswered: Unanswered) -> Stop {
        Stop::Fail(unanswered.to_string())
    }
}

/// What a check returns.
pub(crate) type Checked = Result<(), Stop>;

/// A link by its three fields, as sent and as expected back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Link {
    pub provider_id: String,
    pub linked_user_id: String,
    pub linked_username: String,
}

impl Link {
    /// The link of `user` to `provider` that a check makes by default.
    pub(crate) fn of(user: &str, provider: &str) -> Link {
        Link {
            provider_id: provider.to_string(),
            linked_user_id: format!("{user}-remote"),
            linked_username: format!("{user}@conform.example"),
        }
    }

    /// Its link request body: the server's own request type.
    pub(crate) fn body(&self) -> Value {
        let request = LinkRequest {
            provider_id: self.provider_id.clone(),
            linked_user_id: self.linked_user_id.clone(),
            linked_username: self.linked_username.clone(),
        };
        serde_json::to_value(request).unwrap_or_default()
    }

    /// Read back from an identity object, when its three fields are strings.
    fn read(identity: &Value) -> Option<Link> {
        let field = |name: &str| identity.get(name)?.as_str().map(str::to_string);
        Some(Link {
            provider_id: field("provider_id")?,
            linked_user_id: field("linked_user_id")?,
            linked_username: field("linked_username")?,
        })
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({})",
            self.provider_id, self.linked_user_id, self.linked_username
        )
    }
}

/// One run's shared state.
pub(crate) struct Run {
    pub api: Api,
    pub judge: Judge,
    /// The run id in every user's name.
    pub id: String,
    /// The linkable providers the provider list named, or why there are none.
    pub providers: Result<Vec<String>, String>,
    next_user: AtomicUsize,
    /// Every user made, with every provider a link of theirs was tried to:
    /// what the cleanup deletes. Written before each request is sent, so
    /// that a request cut off by Ctrl-C is cleaned up too.
    ledger: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Run {
    /// A run against `api`, judged by `judge`.
    pub(crate) fn new(api: Api, judge: Judge, id: String) -> Run {
        Run {
            api,
            judge,
            id,
            providers: Err("the provider list was not read".to_string()),
            next_user: AtomicUsize::new(1),
            ledger: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the run judges at `full`.
    pub(crate) fn full(&self) -> bool {
        self.judge.level() == Level::Full
    }

    /// A new user of this run's own, `conform-<run id>-<n>`.
    pub(crate) fn user(&self) -> String {
        let n = self.next_user.fetch_add(1, Ordering::Relaxed);
        let user = format!("conform-{}-{n}", self.id);
        self.ledger().entry(user.clone()).or_default();
        user
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that a link of `user` to `provider` may be made (before it is
    /// tried), for the cleanup.
    pub(crate) fn note(&self, user: &str, provider: &str) {
        self.ledger()
            .entry(user.to_string())
            .or_default()
            .insert(provider.to_string());
    }

    /// Every user made so far, with the providers tried for each.
    pub(crate) fn users(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.ledger().clone()
    }

    /// The first linkable provider, or a skip saying why there is none.
    pub(crate) fn provider(&self) -> Result<String, Stop> {
        match &self.providers {
            Ok(providers) => providers.first().cloned().ok_or_else(|| {
                Stop::Skip("the provider list names no linkable provider".to_string())
            }),
            Err(why) => Err(Stop::Skip(format!("no provider to link to: {why}"))),
        }
    }

    /// A second linkable provider, or a skip saying why there is none.
    pub(crate) fn second_provider(&self) -> Result<String, Stop> {
        self.provider()?;
        match &self.providers {
            Ok(providers) if providers.len() > 1 => Ok(providers[1].clone()),
            _ => Err(Stop::Skip(
                "the provider list names only one linkable provider, and this check needs two"
                    .to_string(),
            )),
        }
    }

    /// Sends a request.
    pub(crate) async fn send(&self, request: Request<'_>) -> Result<Answer, Stop> {
        Ok(self.api.send(request).await?)
    }

    /// `POST …/users/{user}/linked-identities{query}` with this body.
    pub(crate) async fn post_link(
        &self,
        user: &str,
        body: Body,
        query: &str,
    ) -> Result<Answer, Stop> {
        if let Body::Json(value) = &body {
            if let Some(provider) = value.get("provider_id").and_then(Value::as_str) {
                self.note(user, provider);
            }
        }
        let mut request = Request::new(
            Method::POST,
            exchange::target(Operation::LinkIdentity, &[("user_id", user)], query),
        );
        request.body = Some(body);
        self.send(request).await
    }

    /// Links `user` as `link` says.
    pub(crate) async fn link(&self, user: &str, link: &Link, query: &str) -> Result<Answer, Stop> {
        self.post_link(user, Body::Json(link.body()), query).await
    }

    /// Links `user` as `link` says, as the setup of a check: anything but
    /// 200 or 201 fails the check.
    pub(crate) async fn linked(&self, user: &str, link: &Link) -> Result<Answer, Stop> {
        let answer = self.link(user, link, "").await?;
        if !matches!(answer.status, 200 | 201) {
            return Err(Stop::Fail(format!(
                "setup: expected linking {user} to {link} to succeed, got {}",
                answer.describe()
            )));
        }
        Ok(answer)
    }

    /// `GET …/users/{user}/linked-identities{query}`.
    pub(crate) async fn list(&self, user: &str, query: &str) -> Result<Answer, Stop> {
        self.send(Request::new(
            Method::GET,
            exchange::target(Operation::ListLinkedIdentities, &[("user_id", user)], query),
        ))
        .await
    }

    /// `GET …/users/{user}/linked-identities/{provider}{query}`.
    pub(crate) async fn get(
        &self,
        user: &str,
        provider: &str,
        query: &str,
    ) -> Result<Answer, Stop> {
        self.send(Request::new(
            Method::GET,
            exchange::target(
                Operation::GetLinkedIdentity,
                &[("user_id", user), ("provider_id", provider)],
                query,
            ),
        ))
        .await
    }

    /// `DELETE …/users/{user}/linked-identities/{provider}`.
    pub(crate) async fn delete(&self, user: &str, provider: &str) -> Result<Answer, Stop> {
        self.send(Request::new(
            Method::DELETE,
            exchange::target(
                Operation::DeleteLinkedIdentity,
                &[("user_id", user), ("provider_id", provider)],
                "",
            ),
        ))
        .await
    }

    /// Fails unless the answer has this status.
    pub(crate) fn expect_status(&self, answer: &Answer, status: u16, why: &str) -> Checked {
        if answer.status == status {
            Ok(())
        } else {
            Err(Stop::Fail(format!(
                "expected {status} {why}, got {}",
                answer.describe()
            )))
        }
    }

    /// The answer's body, judged as `operation`'s answer at the run's level.
    pub(crate) fn judged(&self, operation: Operation, answer: &Answer) -> Result<Value, Stop> {
        self.judge.body(operation, answer).map_err(|fault| {
            Stop::Fail(format!(
                "{} answered {}: {fault}",
                answer.request, answer.status
            ))
        })
    }

    /// Fails unless the answer is the error `status` with `code`: at `seed`,
    /// the code as a string value anywhere in a JSON body; at `full`, the
    /// problem's `code`, and the body fits the document.
    pub(crate) fn expect_error(
        &self,
        operation: Operation,
        answer: &Answer,
        status: u16,
        code: &str,
        why: &str,
    ) -> Checked {
        let expected = || format!("expected {status} {code} {why}, got {}", answer.describe());
        if answer.status != status {
            return Err(Stop::Fail(expected()));
        }
        let body = answer
            .json()
            .map_err(|fault| Stop::Fail(format!("{} ({fault})", expected())))?;
        let carried = if self.full() {
            body.get("code").and_then(Value::as_str) == Some(code)
        } else {
            holds_exactly(&body, code)
        };
        if !carried {
            return Err(Stop::Fail(expected()));
        }
        if self.full() {
            self.judged(operation, answer)?;
        }
        Ok(())
    }

    /// Where the seed names no status: fails unless the answer is a client
    /// error (4xx), carrying `code` (as for `expect_error` at `seed`) when
    /// one is given.
    pub(crate) fn expect_refusal(&self, answer: &Answer, code: Option<&str>, why: &str) -> Checked {
        let carried =
            code.is_none_or(|code| answer.json().is_ok_and(|body| holds_exactly(&body, code)));
        if (400..500).contains(&answer.status) && carried {
            return Ok(());
        }
        Err(Stop::Fail(format!(
            "expected a refusal (4xx){} {why}, got {}",
            code.map(|code| format!(" with {code}")).unwrap_or_default(),
            answer.describe()
        )))
    }

    /// The identities in a list answer's body: at `full` its
    /// `linked_identities`, at `seed` every object holding a `provider_id`.
    pub(crate) fn identities(&self, body: &Value) -> Vec<Value> {
        if self.full() {
            body.get("linked_identities")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        } else {
            schema::objects_with(body, "provider_id")
                .into_iter()
                .cloned()
                .collect()
        }
    }

    /// Fails unless `identity` is `link`.
    pub(crate) fn expect_identity(
        &self,
        answer: &Answer,
        identity: &Value,
        link: &Link,
    ) -> Checked {
        match Link::read(identity) {
            Some(found) if found == *link => Ok(()),
            _ => Err(Stop::Fail(format!(
                "expected the identity {link}, got {}",
                answer.describe()
            ))),
        }
    }

    /// Fails unless `user`'s list answers 200 with exactly these links.
    pub(crate) async fn expect_links(&self, user: &str, links: &[&Link], why: &str) -> Checked {
        let answer = self.list(user, "").await?;
        self.expect_status(&answer, 200, &format!("listing {user}"))?;
        let body = self.judged(Operation::ListLinkedIdentities, &answer)?;
        let mut found: Vec<Option<Link>> = self.identities(&body).iter().map(Link::read).collect();
        let mut expected: Vec<Option<Link>> = links.iter().map(|l| Some((*l).clone())).collect();
        found.sort();
        expected.sort();
        if found == expected {
            return Ok(());
        }
        let shown = |links: &[Option<Link>]| {
            if links.is_empty() {
                "no link".to_string()
            } else {
                links
                    .iter()
                    .map(|l| {
                        l.as_ref().map_or(
                            "an identity without the seed's fields".to_string(),
                            Link::to_string,
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        Err(Stop::Fail(format!(
            "expected {user} to have {} {why}, the list has {} ({})",
            shown(&expected),
            shown(&found),
            answer.describe()
        )))
    }
}

/// Whether `body` holds the string `text`, exactly, as a value somewhere.
fn holds_exactly(body: &Value, text: &str) -> bool {
    match body {
        Value::String(s) => s == text,
        Value::Object(members) => members.values().any(|v| holds_exactly(v, text)),
        Value::Array(items) => items.iter().any(|v| holds_exactly(v, text)),
        _ => false,
    }
}
