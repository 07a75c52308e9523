//! The URLs linkid builds (a new link's `Location`): each path segment
//! written so that every client reads it back as the one value it holds.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Every byte but RFC 3986's unreserved characters (ALPHA / DIGIT / "-" /
/// "." / "_" / "~").
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as one URL path segment: each character outside the unreserved
/// set percent-encoded (a `/`, `\`, `%`, `?`, `#`, space, any non-ASCII),
/// and a segment that is exactly `.` or `..` written `%2E` / `%2E%2E`,
/// which RFC 3986's reference resolution (§5.2.4, remove_dot_segments)
/// leaves alone where it would drop a bare one or climb over it.
pub(super) fn path_segment(text: &str) -> String {
    match text {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => utf8_percent_encode(text, NOT_UNRESERVED).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreserved_characters_stay_and_everything_else_is_percent_encoded() {
        assert_eq!(path_segment("u-42_a.b~c"), "u-42_a.b~c");
        assert_eq!(path_segment("a b"), "a%20b");
        assert_eq!(path_segment(r"a\b"), "a%5Cb");
        assert_eq!(path_segment("a/b?c#d%e"), "a%2Fb%3Fc%23d%25e");
        assert_eq!(path_segment("ü"), "%C3%BC");
        assert_eq!(
            path_segment("a;b=c&d+e@f:g!h$i'j(k)l*m,n"),
            "a%3Bb%3Dc%26d%2Be%40f%3Ag%21h%24i%27j%28k%29l%2Am%2Cn"
        );
    }

    #[test]
    fn dot_segments_are_encoded_so_that_resolution_keeps_them() {
        assert_eq!(path_segment("."), "%2E");
        assert_eq!(path_segment(".."), "%2E%2E");
        // Only a whole segment of dots is a dot segment.
        assert_eq!(path_segment("..."), "...");
        assert_eq!(path_segment(".a"), ".a");
    }
}
