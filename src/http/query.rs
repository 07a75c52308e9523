//! Query-string values: the search's and the feed's parameters and the
//! opaque search cursor. Pure parsers, each problem named by its field.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::problem::FieldError;
use crate::domain::normalize_text;

/// The largest page the search and the feed return.
pub const MAX_LIMIT: u32 = 1000;
/// The page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 100;
/// The longest a long poll may wait, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// A query string's parameters, each at most once.
pub struct Params<'a> {
    pairs: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
}

impl<'a> Params<'a> {
    pub fn parse(query: &'a str) -> Params<'a> {
        Params {
            pairs: form_urlencoded::parse(query.as_bytes()).collect(),
        }
    }

    /// The value of `name`, if given once; given twice is a problem.
    pub fn one(&self, name: &str, errors: &mut Vec<FieldError>) -> Option<&str> {
        let mut values = self.pairs.iter().filter(|(key, _)| key == name);
        let first = values.next()?;
        if values.next().is_some() {
            errors.push(FieldError::new(name, "appears more than once"));
            return None;
        }
        Some(&first.1)
    }

    /// A whole number in `range`, or `default` when absent.
    pub fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
        errors: &mut Vec<FieldError>,
    ) -> i64 {
        let Some(text) = self.one(name, errors) else {
            return default;
        };
        match text.parse::<i64>() {
            Ok(n) if range.contains(&n) => n,
            _ => {
                errors.push(FieldError::new(
                    name,
                    format!(
                        "must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                ));
                default
            }
        }
    }

    /// An identifier (1–255 characters, no control or invisible
    /// characters), in NFC.
    pub fn text(&self, name: &str, errors: &mut Vec<FieldError>) -> Option<String> {
        let value = self.one(name, errors)?;
        match normalize_text(value) {
            Ok(value) => Some(value),
            Err(why) => {
                errors.push(FieldError::new(name, why));
                None
            }
        }
    }
}

/// Where a search page ended, bound to the filters it was made for, so a
/// cursor from another search is refused rather than misread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub provider_id: Option<String>,
    pub linked_user_id: Option<String>,
    pub after_user: String,
}

const CURSOR_VERSION: &str = "c1";

impl Cursor {
    /// The opaque text clients send back as `cursor`.
    pub fn encode(&self) -> String {
        let body = serde_json::json!([
            CURSOR_VERSION,
            self.provider_id,
            self.linked_user_id,
            self.after_user
        ])
        .to_string();
        let mut bytes = body.into_bytes();
        bytes.extend_from_slice(&fnv1a(&bytes).to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A cursor this server made, or why not.
    pub fn decode(text: &str) -> Result<Cursor, &'static str> {
        const MALFORMED: &str =
            "is not a cursor this server made; pass next_cursor from the previous page as it is";
        if text.len() > 2048 {
            return Err(MALFORMED);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| MALFORMED)?;
        let (body, sum) = bytes
            .split_at_checked(bytes.len().checked_sub(8).ok_or(MALFORMED)?)
            .ok_or(MALFORMED)?;
        if fnv1a(body).to_be_bytes() != sum {
            return Err(MALFORMED);
        }
        let (version, provider_id, linked_user_id, after_user): (
            String,
            Option<String>,
            Option<String>,
            String,
        ) = serde_json::from_slice(body).map_err(|_| MALFORMED)?;
        if version != CURSOR_VERSION {
            return Err(MALFORMED);
        }
        Ok(Cursor {
            provider_id,
            linked_user_id,
            after_user,
        })
    }
}

/// A checksum that tells a cursor damaged in transit from one we made.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_a_damaged_one_is_refused() {
        let cursor = Cursor {
            provider_id: Some("okta".into()),
            linked_user_id: None,
            after_user: "ünï/👩".into(),
        };
        let text = cursor.encode();
        assert_eq!(Cursor::decode(&text), Ok(cursor));
        let mut damaged = text.clone().into_bytes();
        damaged[3] = if damaged[3] == b'A' { b'B' } else { b'A' };
        assert!(Cursor::decode(std::str::from_utf8(&damaged).unwrap()).is_err());
        for bad in ["", "x", "!!!", &"A".repeat(3000)] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_are_checked_against_their_range_and_repeats_refused() {
        let mut errors = Vec::new();
        let params = Params::parse("limit=0&after=-1&wait=61&x=1&x=2&good=7");
        assert_eq!(params.number("limit", 1..=1000, 100, &mut errors), 100);
        assert_eq!(params.number("after", 0..=i64::MAX, 0, &mut errors), 0);
        assert_eq!(params.number("wait", 0..=60, 0, &mut errors), 0);
        assert_eq!(params.number("good", 0..=10, 0, &mut errors), 7);
        assert_eq!(params.number("absent", 0..=10, 3, &mut errors), 3);
        assert_eq!(params.one("x", &mut errors), None);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["limit", "after", "wait", "x"]);
    }
}
