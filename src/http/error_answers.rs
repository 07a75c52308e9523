//! The error answers the document gives an operation: the problems each
//! can carry, an example each, and the examples several share. The
//! operations' files say which answers they give; `openapi` makes them
//! into the document's responses and schemas.

use warp::http::StatusCode;

use super::problem::{ApiError, FieldError, ProblemCode};

/// One error response: the problems it can carry, one example each, all
/// with one status.
pub(crate) struct Answer {
    /// Its schema's name: `Problem` with `code` narrowed to these problems'
    /// codes, so that a generated client has a type to switch on.
    pub(super) schema: &'static str,
    pub(super) examples: Vec<ApiError>,
}

impl Answer {
    pub(crate) fn new(schema: &'static str, examples: Vec<ApiError>) -> Self {
        Answer { schema, examples }
    }

    pub(super) fn status(&self) -> StatusCode {
        self.examples[0].status()
    }

    pub(super) fn codes(&self) -> Vec<ProblemCode> {
        let mut codes: Vec<ProblemCode> = Vec::new();
        for error in &self.examples {
            if !codes.contains(&error.code()) {
                codes.push(error.code());
            }
        }
        codes
    }
}

/// How an operation documents an error status: by reference to a shared
/// answer in `components/responses` (by name), or with its own.
pub(crate) enum Use {
    Shared(&'static str),
    Own(Answer),
}

pub(crate) fn store_unavailable() -> ApiError {
    ApiError::StoreUnavailable(
        "the database file was deleted or replaced while linkid ran; put it back or restart linkid"
            .into(),
    )
}

/// A page refused while answers wait for clients that do not read them.
pub(crate) fn server_busy() -> ApiError {
    ApiError::ServerBusy { held: 33_000_000 }
}

/// What the parsers say about bad input, as a validation problem.
pub(crate) fn invalid(errors: Vec<FieldError>) -> ApiError {
    assert!(!errors.is_empty(), "an example of bad input has errors");
    ApiError::Validation(errors)
}
