//! Identifiers and usernames as the API takes them: 1–255 characters,
//! nothing invisible or formatting, kept in Unicode NFC; the newtypes that
//! hold them once parsed; and the comparison key of a remote id, folded
//! at the providers that compare ids case-insensitively. The Unicode data
//! (properties, normalization, case folding) is ICU4X's.

/// The most characters an identifier or username may have.
pub const MAX_TEXT_CHARS: usize = 255;

/// `check_text`'s rule as the OpenAPI document's `pattern` states it (the
/// attributes repeat it; a test holds them to this, and this to
/// `check_text`). Only the Basic Multilingual Plane: a character class over
/// code points above it is written differently in ECMA-262 and in Python, the
/// contract tools' two dialects. Above it the format characters (tags and
/// variation selectors U+E0000-E0FFF, U+1D173-1D17A, U+1BCA0-1BCA3,
/// U+13430-1343F, U+110BD, U+110CD) are refused too.
pub const TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F\xAD\u034F\u0600-\u0605\u061C\u06DD\u070F\u0890-\u0891\u08E2\u115F-\u1160\u17B4-\u17B5\u180B-\u180F\u200B-\u200F\u2028-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFFB]+$";

/// Why a text value was refused, phrased to follow the field's name. The
/// rule is checked on the text as it is; `normalize_text` checks its NFC form.
pub fn check_text(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("must be at most {MAX_TEXT_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    if let Some(c) = value.chars().find(|&c| is_bidi_control(c)) {
        return Err(format!(
            "must not contain bidirectional formatting characters (it holds U+{:04X})",
            u32::from(c)
        ));
    }
    if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
        return Err(format!(
            "must not contain invisible or formatting characters (it holds U+{:04X}); \
             they make different ids look the same",
            u32::from(c)
        ));
    }
    Ok(())
}

/// The value in Unicode NFC, if it keeps `check_text`'s rule: the form in
/// which identifiers and usernames are compared, stored and answered, so
/// that `josé` typed composed or decomposed is one id.
pub fn normalize_text(value: &str) -> Result<String, String> {
    let nfc = nfc(value);
    check_text(&nfc)?;
    Ok(nfc)
}

/// Unicode NFC (canonical composition) of `text`.
pub fn nfc(text: &str) -> String {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfc()
        .normalize(text)
        .into_owned()
}

/// Unicode's bidirectional formatting characters — the explicit embeddings,
/// overrides and isolates, and the implicit marks LRM, RLM and ALM: in an id
/// or a username they can make what an admin reads differ from what is stored.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// Characters that show nothing, or nothing of their own: format characters
/// (general category Cf: zero-width spaces and joiners, the soft hyphen, tag
/// characters, ...), the line and paragraph separators (Zl, Zp), and every
/// Default_Ignorable_Code_Point (variation selectors, Hangul fillers, ...).
/// Two ids that differ only by them look the same to a person. The tables
/// are ICU4X's (`icu_properties`), generated from the Unicode Character
/// Database.
fn is_invisible(c: char) -> bool {
    use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory};
    let category = icu_properties::CodePointMapData::<GeneralCategory>::new().get(c);
    matches!(
        category,
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) || icu_properties::CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

/// How each identity provider compares `linked_user_id`s: exactly (the
/// default), or ignoring case (`case_insensitive_ids = true`), where
/// `00uABC` and `00uabc` are one remote identity. Built from the
/// configuration; the store keeps a comparison key per link by it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRules {
    case_insensitive: std::collections::BTreeSet<String>,
}

impl IdRules {
    /// The rules with these providers' ids compared ignoring case.
    pub fn ignoring_case_at<I, S>(providers: I) -> IdRules
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        IdRules {
            case_insensitive: providers.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether `provider` compares its ids ignoring case.
    pub fn ignores_case(&self, provider: &str) -> bool {
        self.case_insensitive.contains(provider)
    }

    /// The providers whose ids are compared ignoring case, in order.
    pub fn case_insensitive_providers(&self) -> impl Iterator<Item = &str> {
        self.case_insensitive.iter().map(String::as_str)
    }

    /// What a remote id is compared by at `provider`: the id itself (in
    /// NFC, as stored), or its case fold.
    pub fn key(&self, provider: &str, linked_user_id: &str) -> String {
        if self.ignores_case(provider) {
            case_fold(linked_user_id)
        } else {
            nfc(linked_user_id)
        }
    }
}

/// Unicode's canonical caseless form (full case folding of the canonical
/// decomposition, Unicode §3.13 D145), recomposed to NFC: two texts are the
/// same ignoring case exactly when their folds are equal (`ß` and `SS`,
/// `Σ`, `σ` and `ς`, `Å` written either way).
pub fn case_fold(text: &str) -> String {
    let nfd = icu_normalizer::DecomposingNormalizerBorrowed::new_nfd().normalize(text);
    let folded = icu_casemap::CaseMapperBorrowed::new().fold_string(&nfd);
    nfc(&folded)
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Accepts 1-255 characters without control, bidi formatting or
            /// invisible characters, and keeps them in NFC.
            pub fn parse(value: &str) -> Result<Self, String> {
                normalize_text(value).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

text_newtype!(
    /// A local user's identifier (the `user_id` path segment).
    UserId
);
text_newtype!(
    /// An identity provider's alias, as configured.
    ProviderId
);
text_newtype!(
    /// The user's identifier at the remote identity provider.
    LinkedUserId
);
text_newtype!(
    /// The user's login name or e-mail at the remote identity provider.
    LinkedUsername
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_refuse_control_and_bidi_characters() {
        assert!(UserId::parse("u-42").is_ok());
        assert!(UserId::parse("ada/lovelace ünïcode").is_ok());
        assert_eq!(UserId::parse("").unwrap_err(), "must not be empty");
        assert!(UserId::parse("a\u{0}b").is_err());
        assert!(UserId::parse("a\u{85}b").is_err());
        for bidi in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            assert!(UserId::parse(&format!("admin{bidi}")).is_err(), "{bidi:?}");
        }
        assert!(UserId::parse(&"é".repeat(255)).is_ok());
        assert!(UserId::parse(&"é".repeat(256)).is_err());
    }

    #[test]
    fn invisible_format_and_ignorable_characters_are_refused_naming_the_code_point() {
        let refused = [
            '\u{200B}',  // zero width space (Cf)
            '\u{200C}',  // zero width non-joiner (Cf)
            '\u{200D}',  // zero width joiner (Cf)
            '\u{200E}',  // left-to-right mark
            '\u{200F}',  // right-to-left mark
            '\u{061C}',  // Arabic letter mark
            '\u{2028}',  // line separator (Zl)
            '\u{2029}',  // paragraph separator (Zp)
            '\u{2060}',  // word joiner (Cf)
            '\u{FEFF}',  // byte order mark (Cf)
            '\u{00AD}',  // soft hyphen (Cf)
            '\u{034F}',  // combining grapheme joiner (default ignorable, Mn)
            '\u{115F}',  // Hangul choseong filler (default ignorable, Lo)
            '\u{1160}',  // Hangul jungseong filler
            '\u{3164}',  // Hangul filler
            '\u{FFA0}',  // halfwidth Hangul filler
            '\u{180B}',  // Mongolian free variation selector one
            '\u{180E}',  // Mongolian vowel separator (Cf)
            '\u{180F}',  // Mongolian free variation selector four
            '\u{FE00}',  // variation selector 1
            '\u{FE0F}',  // variation selector 16
            '\u{E0001}', // language tag
            '\u{E0041}', // tag Latin capital letter A
            '\u{E0100}', // variation selector 17
            '\u{E0FFF}', // the last reserved default ignorable
            '\u{1D173}', // musical symbol begin beam (Cf)
            '\u{110BD}', // Kaithi number sign (Cf)
        ];
        for c in refused {
            let why = UserId::parse(&format!("ada{c}")).unwrap_err();
            assert!(
                why.contains(&format!("U+{:04X}", u32::from(c))),
                "{c:?}: {why}"
            );
        }
        // Visible characters near them stay allowed.
        for fine in ["ada lovelace", "zoë", "a·b", "東京", "🦀", "ﾊ", "x\u{0301}"] {
            assert!(UserId::parse(fine).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn ids_and_usernames_are_kept_in_nfc_whichever_form_they_came_in() {
        let composed = UserId::parse("jos\u{E9}").unwrap();
        let decomposed = UserId::parse("jose\u{301}").unwrap();
        assert_eq!(composed, decomposed);
        assert_eq!(decomposed.as_str(), "jos\u{E9}");
        assert_eq!(
            LinkedUsername::parse("A\u{30A}ngstr\u{F6}m")
                .unwrap()
                .as_str(),
            "\u{C5}ngstr\u{F6}m"
        );
        // 255 characters decomposed are 510 before composition: the limit
        // counts what is stored.
        assert!(UserId::parse(&"e\u{301}".repeat(255)).is_ok());
        assert_eq!(
            normalize_text("\u{212B}").unwrap(),
            "\u{C5}",
            "the angstrom sign is the letter"
        );
    }

    #[test]
    fn case_insensitive_providers_compare_ids_by_their_case_fold() {
        let rules = IdRules::ignoring_case_at(["azure-ad"]);
        assert_eq!(
            rules.key("azure-ad", "00uABC"),
            rules.key("azure-ad", "00uabc")
        );
        assert_ne!(rules.key("okta", "00uABC"), rules.key("okta", "00uabc"));
        assert_eq!(rules.key("okta", "Jose\u{301}"), "Jos\u{E9}");
        for (a, b) in [
            ("Stra\u{DF}e", "STRASSE"),
            ("\u{3A3}\u{391}\u{3A3}", "\u{3C3}\u{3B1}\u{3C2}"),
            ("A\u{30A}", "\u{E5}"),
            ("\u{212B}", "\u{E5}"),
            ("Jos\u{C9}", "jose\u{301}"),
        ] {
            assert_eq!(case_fold(a), case_fold(b), "{a:?} {b:?}");
        }
        assert_eq!(case_fold("00uABC"), "00uabc");
        assert!(rules.ignores_case("azure-ad") && !rules.ignores_case("okta"));
        assert_eq!(
            IdRules::default(),
            IdRules::ignoring_case_at(Vec::<String>::new())
        );
    }

    /// Every character `check_text` refuses in the Basic Multilingual Plane,
    /// as a regular expression character class body.
    fn refused_bmp_class() -> String {
        let refused =
            |c: u32| char::from_u32(c).is_some_and(|c| check_text(&c.to_string()).is_err());
        let escape = |c: u32| {
            if c < 0x100 {
                format!("\\x{c:02X}")
            } else {
                format!("\\u{c:04X}")
            }
        };
        let mut class = String::new();
        let mut c = 0;
        while c <= 0xFFFF {
            if !refused(c) {
                c += 1;
                continue;
            }
            let start = c;
            while c < 0xFFFF && refused(c + 1) {
                c += 1;
            }
            class.push_str(&escape(start));
            if c > start {
                class.push('-');
                class.push_str(&escape(c));
            }
            c += 1;
        }
        class
    }

    #[test]
    fn the_documents_pattern_refuses_exactly_what_check_text_refuses_in_the_bmp() {
        let pattern = format!("^[^{}]+$", refused_bmp_class());
        assert_eq!(TEXT_PATTERN, pattern);
    }
}
