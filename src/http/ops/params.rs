//! The path segments and the query parameter that several operations take
//! — `user_id`, `provider_id`, `embed` — parsed at the edge into the
//! domain's types, every problem reported at once.

use percent_encoding::percent_decode_str;

use crate::domain::{Embed, ProviderId, UserId};
use crate::http::error_answers::invalid;
use crate::http::problem::{ApiError, FieldError};

/// The user of the operations on one user's links, for the document (the
/// handlers take it as [`UserId`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "it only describes the parameter in the document")]
pub(super) struct UserPath {
    /// Unique identifier of a user. Stored and compared in Unicode NFC;
    /// control, bidirectional formatting and invisible characters (Unicode
    /// Cf, Zl, Zp and default-ignorable code points) are refused.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$",
        example = "u-42"
    )]
    user_id: String,
}

/// The provider of one link, for the document (the handlers take it as
/// [`ProviderId`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "it only describes the parameter in the document")]
pub(super) struct ProviderPath {
    /// Identifier of the linked identity provider: the unique alias assigned to it in the configuration.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$",
        example = "okta"
    )]
    provider_id: String,
}

pub(crate) type Fields<T> = Result<T, Vec<FieldError>>;

/// Both results, or every field error from either, as one validation error.
pub(super) fn gather<A, B>(a: Fields<A>, b: Fields<B>) -> Fields<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => {
            let mut errors = a.err().unwrap_or_default();
            errors.extend(b.err().unwrap_or_default());
            Err(errors)
        }
    }
}

fn decode_segment(field: &str, raw: &str) -> Fields<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| vec![FieldError::new(field, "must be percent-encoded UTF-8")])
}

pub(super) fn parse_user(raw: &str) -> Fields<UserId> {
    let text = decode_segment("user_id", raw)?;
    UserId::parse(&text).map_err(|why| vec![FieldError::new("user_id", why)])
}

pub(super) fn parse_provider(raw: &str) -> Fields<ProviderId> {
    let text = decode_segment("provider_id", raw)?;
    ProviderId::parse(&text).map_err(|why| vec![FieldError::new("provider_id", why)])
}

/// `embed` values: repeated and/or comma-separated; only `ACTIONS` exists.
pub(super) fn parse_embed(query: &str) -> Fields<bool> {
    let mut actions = false;
    let mut errors = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "embed" {
            continue;
        }
        for item in value.split(',') {
            match serde_json::from_value::<Embed>(serde_json::Value::String(item.to_owned())) {
                Ok(Embed::Actions) => actions = true,
                Err(_) => errors.push(FieldError::new(
                    "embed",
                    format!("{item:?} is not an embed option; the only one is ACTIONS"),
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(actions)
    } else {
        Err(errors)
    }
}

/// The validation problem the document shows for a bad user and `embed`.
pub(super) fn bad_user_and_embed() -> ApiError {
    let mut errors = parse_user("u%0042").err().unwrap_or_default();
    errors.extend(parse_embed("embed=EVERYTHING").err().unwrap_or_default());
    invalid(errors)
}

/// The validation problem the document shows for a bad provider segment.
pub(super) fn bad_user_and_provider() -> ApiError {
    let mut errors = parse_user("u-42").err().unwrap_or_default();
    errors.extend(parse_provider("ok%00ta").err().unwrap_or_default());
    invalid(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_decoded_then_parsed() {
        assert_eq!(
            parse_user("ada%2Flovelace").unwrap().as_str(),
            "ada/lovelace"
        );
        assert_eq!(parse_user("%2E%2E").unwrap().as_str(), "..");
        assert_eq!(parse_provider("okta").unwrap().as_str(), "okta");
    }

    #[test]
    fn a_bad_segment_is_named_by_its_field() {
        let field = |r: Fields<UserId>| r.unwrap_err()[0].field.clone();
        assert_eq!(field(parse_user("%FF")), "user_id");
        assert_eq!(field(parse_user("a%00b")), "user_id");
        assert_eq!(
            parse_provider("ok%E2%80%8Bta").unwrap_err()[0].field,
            "provider_id"
        );
    }

    #[test]
    fn embed_takes_actions_repeated_or_comma_separated_and_names_the_rest() {
        assert_eq!(parse_embed(""), Ok(false));
        assert_eq!(parse_embed("embed=ACTIONS"), Ok(true));
        assert_eq!(
            parse_embed("embed=ACTIONS,ACTIONS&embed=ACTIONS&other=x"),
            Ok(true)
        );
        let errors = parse_embed("embed=actions,&embed=ALL").unwrap_err();
        assert_eq!(errors.len(), 3);
        assert!(errors.iter().all(|e| e.field == "embed"));
    }

    #[test]
    fn gather_keeps_every_error_of_both() {
        let a: Fields<u8> = Err(vec![FieldError::new("a", "x")]);
        let b: Fields<u8> = Err(vec![FieldError::new("b", "y")]);

        let both = gather(a, b).unwrap_err();

        assert_eq!(both.len(), 2);
        assert_eq!(gather(Ok::<_, Vec<FieldError>>(1), Ok(2)), Ok((1, 2)));
    }
}
