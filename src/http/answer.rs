//! JSON answers whose memory leaves with their bytes: an answer larger
//! than one chunk is written into separately allocated chunks and sent as
//! a stream of them (with its `Content-Length`), so that each chunk is
//! freed once the client's socket has taken it. A client that reads half
//! of a big page then holds half of it, as the budget of unsent answers
//! counts it (`unsent::Unsent`), not the whole allocation. And few answers
//! of many rows are built at once (`PageSlot`).

use std::io::Write;

use std::sync::Arc;

use bytes::Bytes;
use warp::http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::problem::ApiError;
use super::AppState;

/// The most bytes one chunk holds.
const CHUNK_BYTES: usize = 64 * 1024;

/// The size of an answer whose body is a stream of chunks (its body has no
/// exact size of its own): what the budget of unsent answers counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnswerSize(pub usize);

/// A JSON answer with this status.
pub(super) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let mut chunks = Chunks::default();
    let mut response = match serde_json::to_writer(&mut chunks, value) {
        Ok(()) => chunks.into_response(),
        Err(error) => {
            // Serializing our own types to memory cannot fail; if it did,
            // the client gets a 500 and the log says why.
            tracing::error!(error = %error, "an answer could not be serialized");
            let mut response = Response::new(Bytes::new().into());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return response;
        }
    };
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Bytes written into chunks of at most `CHUNK_BYTES`, each its own
/// allocation; the one being filled grows as a `Vec` does.
#[derive(Default)]
struct Chunks {
    full: Vec<Bytes>,
    current: Vec<u8>,
    total: usize,
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            if self.current.len() == CHUNK_BYTES {
                let chunk = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK_BYTES));
                self.full.push(Bytes::from(chunk));
            }
            let room = CHUNK_BYTES - self.current.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.current.extend_from_slice(now);
            rest = later;
        }
        self.total += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Chunks {
    fn into_response(mut self) -> Response {
        if self.full.is_empty() {
            // One chunk: a plain body, as small answers always are.
            return Response::new(Bytes::from(self.current).into());
        }
        self.full.push(Bytes::from(self.current));
        let total = self.total;
        let chunks = self.full.into_iter().map(Ok::<_, std::convert::Infallible>);
        let mut response = warp::reply::stream(futures_util::stream::iter(chunks)).into_response();
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(total));
        response.extensions_mut().insert(AnswerSize(total));
        response
    }
}

/// Room to build one answer of many rows (a search page, a feed page):
/// few are built at once, each holding its slot until the answer is
/// counted against the budget of unsent answers, so that clients that ask
/// for big pages and never read them cannot make the server build
/// hundreds at once. While that budget is full, a page is refused before
/// any work (503 `SERVER_BUSY`).
#[derive(Clone)]
pub(crate) struct PageSlot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl PageSlot {
    /// The answer, carrying the slot until the server has counted it (an
    /// extension is dropped when hyper takes the response).
    pub(crate) fn ride_with(slot: Option<PageSlot>, mut response: Response) -> Response {
        if let Some(slot) = slot {
            response.extensions_mut().insert(slot);
        }
        response
    }
}

pub(crate) async fn page_slot(state: &AppState) -> Result<PageSlot, ApiError> {
    let busy = || ApiError::ServerBusy {
        held: state.unsent.held(),
    };
    if state.unsent.is_full() {
        return Err(busy());
    }
    let permit = state
        .pages
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    if state.unsent.is_full() {
        return Err(busy());
    }
    Ok(PageSlot {
        _permit: Arc::new(permit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_cut_into_chunks_in_order_with_nothing_lost() {
        let text: Vec<u8> = (0..CHUNK_BYTES * 2 + 10).map(|i| (i % 251) as u8).collect();
        let mut chunks = Chunks::default();

        for piece in text.chunks(1000) {
            chunks.write_all(piece).unwrap();
        }

        assert_eq!(chunks.total, text.len());
        assert_eq!(chunks.full.len(), 2);
        assert!(chunks.full.iter().all(|c| c.len() == CHUNK_BYTES));
        let joined: Vec<u8> = chunks
            .full
            .iter()
            .flat_map(|c| c.iter().copied())
            .chain(chunks.current.iter().copied())
            .collect();
        assert_eq!(joined, text);
    }
}
