//! `linkid dev`'s controls for client tests. Only `linkid dev` has them
//! (`serve` ignores every one), and only requests that authenticated use
//! them — without a valid token the answer is the real 401:
//!
//! - `Prefer: code=NNN` answers the operation's documented error for that
//!   status — its documented problem body (with this request's id) and
//!   headers — and changes nothing; `example=CODE` picks one of several
//!   errors of a status by its problem code (the document names its
//!   examples by code). A success status is answered for real.
//! - `Prefer: delay=MS` (at most 30 000) answers after that long.
//! - `POST /_dev/reset` (a token that may do everything) puts the data back
//!   to what `linkid dev` started with: its fixtures, or nothing; the
//!   change feed starts again at 1.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use super::context::{Head, Header};
use super::problem::{ApiError, FieldError};
use crate::config::DatabaseConfig;
use crate::domain::{IdRules, Operation};

/// The longest `Prefer: delay=` honoured, in milliseconds.
pub const MAX_DELAY_MS: u64 = 30_000;

/// What `linkid dev` gives its server, which turns its controls on.
pub struct DevControls {
    /// The fixtures it started with (the export format; empty: none).
    pub fixtures: Bytes,
    /// Where its data lives, for the reset.
    pub database: DatabaseConfig,
    /// How its providers compare remote ids.
    pub rules: IdRules,
    /// Every configured provider id (fixtures may name any of them).
    pub providers: HashSet<String>,
    /// What the document says each operation answers (`openapi::documented`).
    pub documented: fn(Operation) -> Documented,
}

/// What the document says an operation answers.
#[derive(Debug, Clone)]
pub struct Documented {
    /// Every status it documents, ascending.
    pub statuses: Vec<u16>,
    /// Every error answer, one per example, in the document's order.
    pub errors: Vec<ApiError>,
}

/// What a request's `Prefer` headers ask of `linkid dev`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Preferences {
    pub code: Option<u16>,
    pub example: Option<String>,
    pub delay: Option<Duration>,
}

/// The preferences in `Prefer` values (RFC 7240: `token=value` items
/// separated by commas or semicolons, values maybe quoted); preferences
/// linkid dev does not know are ignored, as the RFC says.
pub(super) fn parse_preferences<'a>(
    values: impl Iterator<Item = &'a str>,
) -> Result<Preferences, Vec<FieldError>> {
    let mut found = Preferences::default();
    let mut errors = Vec::new();
    for item in values.flat_map(|v| v.split([',', ';'])) {
        let Some((name, value)) = item.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "code" => match value.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => found.code = Some(code),
                _ => errors.push(FieldError::new(
                    "Prefer",
                    format!("code={value:?} is not an HTTP status"),
                )),
            },
            "example" => found.example = Some(value.to_owned()),
            "delay" => match value.parse::<u64>() {
                Ok(ms) if ms <= MAX_DELAY_MS => found.delay = Some(Duration::from_millis(ms)),
                _ => errors.push(FieldError::new(
                    "Prefer",
                    format!(
                        "delay={value:?} must be a number of milliseconds, 0 to {MAX_DELAY_MS}"
                    ),
                )),
            },
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(errors)
    }
}

/// Runs a request's preferences: waits its delay, then answers the error
/// it asks for, if it asks for one (`Err`), or lets the request go on.
pub(super) async fn apply(
    dev: &DevControls,
    operation: Operation,
    head: &Head,
) -> Result<(), ApiError> {
    let Some(value) = head.header(Header::Prefer) else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let preferences =
        parse_preferences(std::iter::once(text.as_ref())).map_err(ApiError::Validation)?;
    if let Some(delay) = preferences.delay {
        tokio::time::sleep(delay).await;
    }
    let Some(code) = preferences.code else {
        return Ok(());
    };
    let documented = (dev.documented)(operation);
    match forced(&documented, operation, code, preferences.example.as_deref())? {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The documented error that `Prefer: code=` (and `example=`) picks;
/// nothing to force for a documented success status; an error naming what
/// the operation documents for anything else.
fn forced(
    documented: &Documented,
    operation: Operation,
    code: u16,
    example: Option<&str>,
) -> Result<Option<ApiError>, ApiError> {
    let statuses = &documented.statuses;
    let refuse = |message: String| ApiError::Validation(vec![FieldError::new("Prefer", message)]);
    let listed = statuses
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if !statuses.contains(&code) {
        return Err(refuse(format!(
            "code={code} is not an answer of {}; it documents {listed}",
            operation.id()
        )));
    }
    let errors: Vec<&ApiError> = documented
        .errors
        .iter()
        .filter(|error| error.status().as_u16() == code)
        .collect();
    if errors.is_empty() {
        // A success: the real answer is the one to give.
        return Ok(None);
    }
    match example {
        None => Ok(Some(errors[0].clone())),
        Some(name) => errors
            .iter()
            .find(|error| error.code().as_str() == name)
            .map(|error| Some((*error).clone()))
            .ok_or_else(|| {
                let names: Vec<&str> = errors.iter().map(|e| e.code().as_str()).collect();
                refuse(format!(
                    "example={name:?} is not an example of {code} for {}; its examples are {}",
                    operation.id(),
                    names.join(", ")
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_are_read_from_every_value_whatever_the_separators() {
        let parsed = parse_preferences(
            [
                "code=400, example=USER_ALREADY_LINKED",
                "respond-async; delay=\"250\"",
            ]
            .into_iter(),
        )
        .unwrap();

        assert_eq!(
            parsed,
            Preferences {
                code: Some(400),
                example: Some("USER_ALREADY_LINKED".into()),
                delay: Some(Duration::from_millis(250)),
            }
        );
    }

    #[test]
    fn a_bad_code_or_delay_is_named_and_unknown_preferences_are_ignored() {
        assert_eq!(
            parse_preferences(["return=minimal"].into_iter()),
            Ok(Preferences::default())
        );
        let errors = parse_preferences(["code=abc, delay=30001"].into_iter()).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(errors.iter().all(|e| e.field == "Prefer"));
        assert!(parse_preferences(["code=99"].into_iter()).is_err());
    }

    #[test]
    fn a_forced_code_picks_the_documented_example_by_its_problem_code() {
        let documented = Documented {
            statuses: vec![200, 201, 400, 401],
            errors: vec![
                ApiError::Validation(vec![FieldError::new("body", "must be a JSON object")]),
                ApiError::UserAlreadyLinked {
                    user_id: "u-42".into(),
                    provider_id: None,
                },
                ApiError::MissingToken,
                ApiError::InvalidToken("expired".into()),
            ],
        };
        let force = |code, example| forced(&documented, Operation::LinkIdentity, code, example);

        let first = force(400, None).unwrap().unwrap();
        let picked = force(400, Some("USER_ALREADY_LINKED")).unwrap().unwrap();
        let invalid = force(401, Some("INVALID_TOKEN")).unwrap().unwrap();

        assert_eq!(first.code().as_str(), "VALIDATION_FAILED");
        assert_eq!(picked.code().as_str(), "USER_ALREADY_LINKED");
        assert_eq!(invalid.code().as_str(), "INVALID_TOKEN");
        assert!(
            matches!(force(201, None), Ok(None)),
            "a success is answered for real"
        );
        assert!(force(404, None).is_err(), "not documented");
        assert!(force(400, Some("NOPE")).is_err(), "no such example");
    }
}
