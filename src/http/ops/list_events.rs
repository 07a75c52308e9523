//! `GET /api/admin/users/v4/linked-identities/events[?after=&limit=&wait=]`:
//! the change feed — a page, a long poll, or (with `Accept:
//! text/event-stream`) server-sent events. A long poll or a stream lives
//! longer than its token may: it checks the token again while it lives
//! (`TokenWatch`), and it holds few events for a client that stops reading.

use std::sync::Arc;

use warp::http::header::HeaderValue;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::params::Fields;
use super::{add_path, authorize, OperationFile, SYSTEM_OF_RECORD};
use crate::auth::{Access, Bearer};
use crate::domain::{Event, Operation, Right};
use crate::http::answer::{page_slot, PageSlot};
use crate::http::context::{optional_header, query, Header};
use crate::http::filters::{bearer, path0};
use crate::http::error_answers::{invalid, server_busy, store_unavailable, Answer, Use};
use crate::http::problem::{ApiError, FieldError};
use crate::http::query::{Params, DEFAULT_LIMIT, MAX_LIMIT, MAX_WAIT_SECS};
use crate::http::{answer, AppState};

const OPERATION: Operation = Operation::ListEvents;

pub(super) const FILE: OperationFile = OperationFile {
    operation: OPERATION,
    document: |doc| {
        add_path::<__path_list_events>(doc, SYSTEM_OF_RECORD);
        super::add_schema::<EventPage>(doc);
    },
    answers,
};

/// (with `Accept: text/event-stream`, resuming after `Last-Event-ID`)
pub(super) fn route(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path0(OPERATION)
        .and(warp::get())
        .and(query())
        .and(optional_header(Header::Accept))
        .and(optional_header(Header::LastEventId))
        .and(bearer(state, OPERATION))
        .and_then(list_events)
}

/// A page of the change feed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Events in ascending `seq` (commit order).
    pub events: Vec<Event>,
    /// Ask again with `after` set to this: the last event's `seq`, or the
    /// `after` asked for when there were none.
    pub next_after: i64,
}

/// The feed's query: where to start, how many, how long to wait.
struct FeedQuery {
    after: i64,
    limit: u32,
    wait: std::time::Duration,
}

fn parse_feed(query: &str) -> Fields<FeedQuery> {
    let params = Params::parse(query);
    let mut errors = Vec::new();
    let after = params.number("after", 0..=i64::MAX, 0, &mut errors);
    let limit = params.number(
        "limit",
        1..=i64::from(MAX_LIMIT),
        i64::from(DEFAULT_LIMIT),
        &mut errors,
    );
    let wait = params.number("wait", 0..=MAX_WAIT_SECS as i64, 0, &mut errors);
    if errors.is_empty() {
        Ok(FeedQuery {
            after,
            limit: limit as u32,
            wait: std::time::Duration::from_secs(wait as u64),
        })
    } else {
        Err(errors)
    }
}

/// List changes (the change feed).
///
/// Every change to a link (`LINKED`, `UPDATED`, `UNLINKED`) made by a
/// request, an import or any instance, recorded in the same transaction as
/// the change, in commit order. A consumer that always asks again with
/// `after=next_after` sees every change exactly once. `wait` long-polls:
/// the answer comes as soon as an event after `after` exists, or empty when
/// the time is up. With `Accept: text/event-stream` the same events stream
/// as server-sent events (`id:` the seq, `event:` the type, `data:` the
/// JSON), resuming after `Last-Event-ID` (or `after`), with a heartbeat
/// comment every `events.heartbeat_secs`.
#[utoipa::path(
    get,
    path = OPERATION.spec().route,
    operation_id = OPERATION.spec().id,
    params(
        ("after" = Option<i64>, Query, description = "Only events with a greater `seq` (the previous answer's `next_after`).", minimum = 0, example = 0),
        ("limit" = Option<u32>, Query, description = "Events per answer, 1 to 1000.", minimum = 1, maximum = 1000, example = 100),
        ("wait" = Option<u32>, Query, description = "Seconds to wait for an event when there is none yet (long poll), 0 to 60. With nothing to send, the answer comes only when `wait` is up: a client's read timeout (and a fuzzer's response-time limit) must be longer than `wait`.", minimum = 0, maximum = 60, example = 0),
        ("Last-Event-ID" = Option<i64>, Header, description = "With `Accept: text/event-stream`: resume after this seq (what an EventSource sends when it reconnects); it wins over `after`. Checked on every request.", minimum = 0, nullable = false),
    ),
    responses(
        (status = 200, description = "Events after `after`, and where to continue.",
            content(
                (EventPage = "application/json", example = json!({"events": [{"seq": 1, "type": "LINKED",
                    "occurred_at": "2026-11-29T10:00:00Z", "user_id": "u-42", "provider_id": "okta",
                    "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com",
                    "actor": "6f1c0e1d2a3b4c5d", "subject": "provisioning-bot",
                    "request_id": "5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10"}], "next_after": 1})),
                (String = "text/event-stream", example = json!("id: 1\nevent: LINKED\ndata: {\"seq\":1,\"type\":\"LINKED\",\"occurred_at\":\"2026-11-29T10:00:00Z\",\"user_id\":\"u-42\",\"provider_id\":\"okta\",\"linked_user_id\":\"00u1a2b3c4\",\"linked_username\":\"ada@example.com\",\"actor\":\"6f1c0e1d2a3b4c5d\",\"subject\":null,\"request_id\":\"5f0c6f0e-8f5e-4a8e-9a3c-2b1f7d4e6a10\"}\n\n")),
            )),
    ),
    security(("bearer" = []))
)]
async fn list_events(
    query: String,
    accept: Option<HeaderValue>,
    last_event_id: Option<HeaderValue>,
    state: Arc<AppState>,
    bearer: Bearer,
) -> Result<Response, Rejection> {
    let feed = parse_feed(&query).map_err(ApiError::from)?;
    let resume = match last_event_id
        .as_ref()
        .map(|v| v.to_str().map(str::parse::<i64>))
    {
        None => None,
        Some(Ok(Ok(seq))) if seq >= 0 => Some(seq),
        Some(_) => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "Last-Event-ID",
                "must be the seq of an event (a whole number, 0 or more)",
            )])
            .into())
        }
    };
    authorize(&state, &bearer, Right::EventsList, None, None).await?;
    let streaming = accept
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if streaming {
        return stream_events(state, bearer, resume.unwrap_or(feed.after)).await;
    }
    let mut slot = Some(page_slot(&state).await?);
    let mut events = state
        .store
        .events(feed.after, feed.limit)
        .await
        .map_err(ApiError::from)?;
    if events.is_empty() && !feed.wait.is_zero() {
        // Nothing is built while it waits.
        slot = None;
        let _permit = state
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyStreams)?;
        let mut token = TokenWatch::new(&state, &bearer);
        let woke = tokio::select! {
            woke = wait_for_event(&state, feed.after, feed.wait) => woke,
            lapsed = token.lapsed() => return Err(lapsed.into()),
        };
        // What the token may see is decided when the answer is, not when
        // the wait began.
        token.check().await?;
        if woke {
            slot = Some(page_slot(&state).await?);
            events = state
                .store
                .events(feed.after, feed.limit)
                .await
                .map_err(ApiError::from)?;
        }
    }
    let next_after = events.last().map_or(feed.after, |e| e.seq);
    let response = answer::json(StatusCode::OK, &EventPage { events, next_after });
    Ok(PageSlot::ride_with(slot, response))
}

/// How often, at the least, a stream or a long poll checks that its token
/// still allows it; a revocation reaching this server makes it check at once.
const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream's or a long poll's hold on its token, which may expire or be
/// revoked while the request lives: checked at least every
/// `RECHECK_EVERY`, whenever revocations arrive, and whenever asked.
struct TokenWatch {
    state: Arc<AppState>,
    bearer: Bearer,
    /// `None` once the revocation list is gone (the server is stopping).
    revocations: Option<tokio::sync::watch::Receiver<u64>>,
    every: tokio::time::Interval,
}

impl TokenWatch {
    fn new(state: &Arc<AppState>, bearer: &Bearer) -> TokenWatch {
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        TokenWatch {
            state: state.clone(),
            bearer: bearer.clone(),
            revocations: Some(state.authority.revocations()),
            every,
        }
    }

    /// Whether the token still allows reading the feed: not revoked, not
    /// expired, still authorized.
    async fn check(&self) -> Result<(), ApiError> {
        let access = Access {
            right: Right::EventsList,
            user: None,
            provider: None,
        };
        self.state
            .authority
            .recheck(&self.bearer, access)
            .await
            .map_err(ApiError::from)
    }

    /// Resolves, with the reason, once the token no longer allows reading
    /// the feed.
    async fn lapsed(&mut self) -> ApiError {
        loop {
            let revoked = async {
                match &mut self.revocations {
                    Some(revocations) => revocations.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.every.tick() => {}
                arrived = revoked => if !arrived { self.revocations = None },
            }
            if let Err(lapsed) = self.check().await {
                return lapsed;
            }
        }
    }
}

/// Waits until an event after `after` is committed (true), the time is up
/// or the server is stopping (false).
async fn wait_for_event(state: &AppState, after: i64, wait: std::time::Duration) -> bool {
    let mut newest = state.store.newest_event();
    let mut stopping = state.stopping.clone();
    tokio::select! {
        seen = tokio::time::timeout(wait, newest.wait_for(|seq| *seq > after)) => {
            matches!(seen, Ok(Ok(_)))
        }
        _ = stopping.wait_for(|stopping| *stopping) => false,
    }
}

/// Events a stream reads from the store at a time, and hands to the
/// response at most: with the response's own buffer, what a stream whose
/// client stops reading holds (a few hundred KiB at the most).
const STREAM_BATCH: u32 = 64;
const STREAM_BUFFER: usize = 16;

/// The feed as server-sent events from `after` on, until the client goes
/// away, its token expires or is revoked (a last comment says so), the
/// store fails (the client resumes with `Last-Event-ID`) or the server
/// stops.
async fn stream_events(
    state: Arc<AppState>,
    bearer: Bearer,
    after: i64,
) -> Result<Response, Rejection> {
    let permit = state
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyStreams)?;
    // A stream that starts among pruned events says so before it starts.
    let first = state
        .store
        .events(after, STREAM_BATCH)
        .await
        .map_err(ApiError::from)?;
    let heartbeat = std::time::Duration::from_secs(state.events.heartbeat_secs);
    // A task reads the store and hands events over, so the response's
    // stream holds only the channel; the task (and its stream slot) ends
    // when the client goes away, the token lapses, the store fails or the
    // server stops.
    let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut token = TokenWatch::new(&state, &bearer);
        let mut after = after;
        let mut batch = first;
        loop {
            for event in batch.drain(..) {
                if let Err(lapsed) = token.check().await {
                    let _ = sender.send(last_word(&lapsed)).await;
                    return;
                }
                after = event.seq;
                if sender.send(sse_event(&event)).await.is_err() {
                    return;
                }
            }
            loop {
                if *state.stopping.borrow() {
                    return;
                }
                tokio::select! {
                    woke = wait_for_event(&state, after, std::time::Duration::from_secs(3600)) => {
                        if woke { break }
                    }
                    lapsed = token.lapsed() => {
                        let _ = sender.send(last_word(&lapsed)).await;
                        return;
                    }
                    () = sender.closed() => return,
                }
            }
            batch = match state.store.events(after, STREAM_BATCH).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(error = %error, "an event stream ended: the store failed");
                    return;
                }
            };
        }
    });
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(event), receiver))
    });
    let stream = warp::sse::keep_alive()
        .interval(heartbeat)
        .text("heartbeat")
        .stream(events);
    Ok(warp::sse::reply(stream).into_response())
}

/// One change as a server-sent event.
fn sse_event(event: &Event) -> warp::sse::Event {
    warp::sse::Event::default()
        .id(event.seq.to_string())
        .event(event.event_type.as_str())
        .data(serde_json::to_string(event).unwrap_or_default())
}

/// The comment that ends a stream whose token no longer allows it, e.g.
/// `:closed: the bearer token is expired`.
fn last_word(lapsed: &ApiError) -> warp::sse::Event {
    warp::sse::Event::default().comment(format!("closed: {lapsed}"))
}


fn answers() -> Vec<Use> {
    vec![
        Use::Own(Answer::new(
            "ValidationFailedProblem",
            vec![invalid(
                parse_feed("after=-1&wait=120")
                    .err()
                    .unwrap_or_default(),
            )],
        )),
        Use::Own(Answer::new(
            "EventsExpiredProblem",
            vec![ApiError::EventsExpired { pruned_through: 41 }],
        )),
        Use::Own(Answer::new(
            "EventsUnavailableProblem",
            vec![ApiError::TooManyStreams, store_unavailable(), server_busy()],
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_query_has_defaults_and_bounds() {
        let plain = parse_feed("").unwrap();
        let tail = parse_feed("after=41&limit=7&wait=60").unwrap();
        let wrong: Vec<String> = parse_feed("after=-1&limit=0&wait=61")
            .err()
            .unwrap()
            .into_iter()
            .map(|e| e.field)
            .collect();

        assert_eq!((plain.after, plain.limit, plain.wait.as_secs()), (0, DEFAULT_LIMIT, 0));
        assert_eq!((tail.after, tail.limit, tail.wait.as_secs()), (41, 7, 60));
        assert_eq!(wrong, ["after", "limit", "wait"]);
    }
}
