//! Comparison keys, the same on every backend: each link stores
//! `linked_user_key`, what its remote id is compared by at its provider
//! (`IdRules::key`), and `one_user_per_remote_identity` is unique on
//! (provider, key). Here: recomputing the keys of a provider whose rule
//! changed, and the upgrade that puts stored ids in NFC — each refusing,
//! with the links named, a change that would make two links one.

use std::collections::HashMap;

use crate::domain::{nfc, IdRules, LinkRecord};

/// One stored link of a provider whose keys are being recomputed.
pub(crate) struct Keyed {
    pub id: i64,
    pub user_id: String,
    pub linked_user_id: String,
    pub linked_user_key: String,
}

/// The providers whose rule differs between what the database recorded
/// (the providers it keeps case-folded keys for) and `rules`.
pub(crate) fn changed_providers(recorded: &[String], rules: &IdRules) -> Vec<String> {
    let mut changed: Vec<String> = recorded
        .iter()
        .filter(|p| !rules.ignores_case(p))
        .cloned()
        .chain(
            rules
                .case_insensitive_providers()
                .filter(|p| !recorded.iter().any(|r| r == p))
                .map(str::to_owned),
        )
        .collect();
    changed.sort();
    changed
}

/// The new keys of `provider`'s links under `rules` (only those that
/// change), or, when two links would share one, why not: every group of
/// links that would, by user and remote id.
pub(crate) fn rekey(
    provider: &str,
    links: &[Keyed],
    rules: &IdRules,
) -> Result<Vec<(i64, String)>, String> {
    let mut by_key: HashMap<String, Vec<&Keyed>> = HashMap::with_capacity(links.len());
    for link in links {
        by_key
            .entry(rules.key(provider, &link.linked_user_id))
            .or_default()
            .push(link);
    }
    let mut collisions: Vec<String> = by_key
        .values()
        .filter(|group| group.len() > 1)
        .map(|group| {
            group
                .iter()
                .map(|l| {
                    format!(
                        "user {:?} (linked_user_id {:?})",
                        l.user_id, l.linked_user_id
                    )
                })
                .collect::<Vec<_>>()
                .join(" and ")
        })
        .collect();
    if !collisions.is_empty() {
        collisions.sort();
        let shown = collisions.len().min(10);
        let more = match collisions.len() - shown {
            0 => String::new(),
            n => format!("; and {n} more"),
        };
        let setting = if rules.ignores_case(provider) {
            "case_insensitive_ids = true"
        } else {
            "case_insensitive_ids = false"
        };
        return Err(format!(
            "{setting} at identity provider {provider:?} would make links one remote identity: {}{more}; \
             with the setting as it was, unlink all but one of each (DELETE .../users/{{user_id}}/linked-identities/{provider}), then start again",
            collisions[..shown].join("; ")
        ));
    }
    let mut changes: Vec<(i64, String)> = by_key
        .into_iter()
        .flat_map(|(key, group)| group.into_iter().map(move |l| (l, key.clone())))
        .filter(|(link, key)| link.linked_user_key != *key)
        .map(|(link, key)| (link.id, key))
        .collect();
    changes.sort();
    Ok(changes)
}

/// A stored link in NFC, when any of its texts is not.
pub(crate) fn in_nfc(link: &LinkRecord) -> Option<LinkRecord> {
    let normalized = LinkRecord {
        user_id: nfc(&link.user_id),
        provider_id: nfc(&link.provider_id),
        linked_user_id: nfc(&link.linked_user_id),
        linked_username: nfc(&link.linked_username),
        ..link.clone()
    };
    (normalized != *link).then_some(normalized)
}

/// Why the upgrade to NFC stops: `text` (of `field`) becomes the same as
/// `other`'s, stored already.
pub(crate) fn nfc_collision(field: &str, text: &str, other: &str) -> String {
    format!(
        "the upgrade to schema version 3 keeps identifiers in Unicode NFC, and two links would become one: \
         {field} {} and {} are the same text in NFC; delete one of the two links (with the linkid that wrote \
         this database), then start this one again",
        escaped(text),
        escaped(other)
    )
}

/// `text` quoted, every non-ASCII character written as its code point, so
/// that two texts that look alike read differently.
pub(crate) fn escaped(text: &str) -> String {
    format!("\"{}\"", text.escape_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(id: i64, user: &str, remote: &str) -> Keyed {
        Keyed {
            id,
            user_id: user.into(),
            linked_user_id: remote.into(),
            linked_user_key: remote.into(),
        }
    }

    #[test]
    fn the_providers_whose_rule_changed_are_those_recorded_or_configured_but_not_both() {
        let rules = IdRules::ignoring_case_at(["azure-ad", "okta"]);
        let recorded = ["okta".to_string(), "github".to_string()];
        assert_eq!(changed_providers(&recorded, &rules), ["azure-ad", "github"]);
        assert!(changed_providers(&[], &IdRules::default()).is_empty());
    }

    #[test]
    fn turning_case_insensitivity_on_folds_the_keys_that_change() {
        let rules = IdRules::ignoring_case_at(["okta"]);
        let links = [link(1, "u-1", "00uABC"), link(2, "u-2", "00udef")];
        assert_eq!(
            rekey("okta", &links, &rules).unwrap(),
            [(1, "00uabc".to_string())]
        );
        let folded = [Keyed {
            linked_user_key: "00uabc".into(),
            ..link(1, "u-1", "00uABC")
        }];
        assert_eq!(
            rekey("okta", &folded, &IdRules::default()).unwrap(),
            [(1, "00uABC".to_string())],
            "and back"
        );
    }

    #[test]
    fn links_that_would_become_one_are_refused_all_named() {
        let rules = IdRules::ignoring_case_at(["okta"]);
        let links = [
            link(1, "u-1", "00uABC"),
            link(2, "u-2", "00uabc"),
            link(3, "u-3", "00uAbC"),
            link(4, "u-4", "other"),
        ];
        let why = rekey("okta", &links, &rules).unwrap_err();
        for named in ["u-1", "u-2", "u-3", "00uABC", "00uabc", "00uAbC", "okta"] {
            assert!(why.contains(named), "{named}: {why}");
        }
        assert!(!why.contains("u-4"), "{why}");
    }

    #[test]
    fn a_link_already_in_nfc_is_left_alone_and_one_that_is_not_is_named_apart() {
        let record = |user: &str| LinkRecord {
            user_id: user.into(),
            provider_id: "okta".into(),
            linked_user_id: "r".into(),
            linked_username: "n".into(),
            created_at: "t".into(),
            updated_at: "t".into(),
        };
        assert!(in_nfc(&record("jos\u{E9}")).is_none());
        assert_eq!(in_nfc(&record("jose\u{301}")).unwrap().user_id, "jos\u{E9}");
        let why = nfc_collision("user_id", "jose\u{301}", "jos\u{E9}");
        assert!(
            why.contains(r#""jose\u{301}""#) && why.contains(r#""jos\u{e9}""#),
            "{why}"
        );
    }
}
