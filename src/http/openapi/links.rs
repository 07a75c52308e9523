//! The links between operations in the document: which answer's fields a
//! client (or schemathesis' stateful phase) feeds into which next request.

use serde_json::json;
use utoipa::openapi::link::{Link, LinkBuilder};

use crate::domain::Operation;

/// A link in the document: which response's fields a client (or
/// schemathesis' stateful phase) feeds into which next request.
struct DocLink {
    from: Operation,
    statuses: &'static [&'static str],
    name: &'static str,
    to: Operation,
    parameters: &'static [(&'static str, LinkValue)],
    /// The next request's body, when the link sets it.
    request_body: Option<&'static str>,
    description: &'static str,
}

/// A link parameter: a runtime expression, or a fixed value (written as a
/// string, as Spectral's schema of the link object wants; a query value is
/// text on the wire anyway).
#[derive(Clone, Copy)]
enum LinkValue {
    Expression(&'static str),
    Fixed(&'static str),
}

const USER: (&str, LinkValue) = ("user_id", LinkValue::Expression("$request.path.user_id"));
const PROVIDER: (&str, LinkValue) = (
    "provider_id",
    LinkValue::Expression("$response.body#/provider_id"),
);
const LINKED_USER: (&str, LinkValue) = (
    "linked_user_id",
    LinkValue::Expression("$response.body#/linked_user_id"),
);
/// A feed read that a link leads to never long-polls.
const NO_WAIT: (&str, LinkValue) = ("wait", LinkValue::Fixed("0"));
const CREATED: &[&str] = &["201", "200"];

/// From a new link to everything about it (reading, listing and deleting
/// it, the login-time lookup, the change feed, the retry), on along the
/// feed, and from a deleted link to what is left of it (a 404, an empty
/// lookup).
///
/// Every chain begins where schemathesis' stateful phase begins scenarios,
/// so that one run follows every link. It starts them at operations that
/// have links, and only at the "reliable" ones when there are any: a POST,
/// or a GET without path parameters, whose inputs some response produces.
/// None of these is: `linkIdentity` needs a user nothing produces,
/// `listEvents` a `Last-Event-ID` nothing produces, and the other two have
/// path parameters. So scenarios start at all four (schemathesis 4.32's
/// rules; its "API Links" line counts what a run followed). No link leaves the
/// search: it would be reliable (a new link produces its filters) and the
/// one place scenarios start, and no link out of a new link would ever be
/// followed (as happened when the feed was linked from the search).
const LINKS: &[DocLink] = &[
    DocLink {
        from: Operation::LinkIdentity,
        statuses: CREATED,
        name: "GetLinkedIdentity",
        to: Operation::GetLinkedIdentity,
        parameters: &[USER, PROVIDER],
        request_body: None,
        description: "The identity just linked (where `Location` points).",
    },
    DocLink {
        from: Operation::LinkIdentity,
        statuses: CREATED,
        name: "ListLinkedIdentities",
        to: Operation::ListLinkedIdentities,
        parameters: &[USER],
        request_body: None,
        description: "The user's linked identities.",
    },
    DocLink {
        from: Operation::LinkIdentity,
        statuses: CREATED,
        name: "DeleteLinkedIdentity",
        to: Operation::DeleteLinkedIdentity,
        parameters: &[USER, PROVIDER],
        request_body: None,
        description: "Delete the identity just linked.",
    },
    DocLink {
        from: Operation::LinkIdentity,
        statuses: CREATED,
        name: "LookUpLinkedIdentity",
        to: Operation::SearchLinkedIdentities,
        parameters: &[PROVIDER, LINKED_USER],
        request_body: None,
        description:
            "The login-time reverse lookup of the remote identity just linked: it finds this user.",
    },
    DocLink {
        from: Operation::LinkIdentity,
        statuses: CREATED,
        name: "ListEvents",
        to: Operation::ListEvents,
        parameters: &[NO_WAIT],
        request_body: None,
        description: "The change feed: a new link is a `LINKED` event there, a new username an `UPDATED` one.",
    },
    DocLink {
        from: Operation::LinkIdentity,
        statuses: &["201"],
        name: "RetryLinkIdentity",
        to: Operation::LinkIdentity,
        parameters: &[USER],
        request_body: Some("$request.body"),
        description:
            "The same link again, as a client retries: an idempotent 200 with the stored identity.",
    },
    DocLink {
        from: Operation::GetLinkedIdentity,
        statuses: &["200"],
        name: "DeleteLinkedIdentity",
        to: Operation::DeleteLinkedIdentity,
        parameters: &[USER, PROVIDER],
        request_body: None,
        description: "Delete this identity.",
    },
    DocLink {
        from: Operation::DeleteLinkedIdentity,
        statuses: &["200"],
        name: "GetLinkedIdentity",
        to: Operation::GetLinkedIdentity,
        parameters: &[USER, PROVIDER],
        request_body: None,
        description: "The identity just deleted: a 404 `LINKED_IDENTITY_NOT_FOUND` now.",
    },
    DocLink {
        from: Operation::DeleteLinkedIdentity,
        statuses: &["200"],
        name: "LookUpLinkedIdentity",
        to: Operation::SearchLinkedIdentities,
        parameters: &[PROVIDER, LINKED_USER],
        request_body: None,
        description: "The login-time reverse lookup of the remote identity just unlinked: it finds no one now.",
    },
    DocLink {
        from: Operation::ListEvents,
        statuses: &["200"],
        name: "NextEvents",
        to: Operation::ListEvents,
        parameters: &[
            ("after", LinkValue::Expression("$response.body#/next_after")),
            NO_WAIT,
        ],
        request_body: None,
        description: "The next page of the change feed.",
    },
];

/// The links that start at `op`'s `status` answer, by name.
pub(super) fn starting_at(op: Operation, status: &str) -> Vec<(&'static str, Link)> {
    LINKS
        .iter()
        .filter(|link| link.from == op && link.statuses.contains(&status))
        .map(|link| {
            let mut built = LinkBuilder::new()
                .operation_id(link.to.id())
                .description(link.description);
            for (parameter, value) in link.parameters {
                let (LinkValue::Expression(text) | LinkValue::Fixed(text)) = value;
                built = built.parameter(*parameter, json!(text));
            }
            if let Some(body) = link.request_body {
                built = built.request_body(Some(json!(body)));
            }
            (link.name, built.build())
        })
        .collect()
}
