//! Which checks a run includes (`--only PATTERN`) and which it expects to
//! fail (`--expected-failures FILE`): two small parsers over check ids.

use std::collections::BTreeSet;

/// `--only`: one or more patterns separated by commas. A pattern that holds
/// `*` (any run of characters) or `?` (one character) is a glob over the
/// whole id; any other is a prefix of ids (`auth`, `links.retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Only {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Glob(Vec<char>),
    Prefix(String),
}

impl Only {
    /// Parses `--only`'s value; an empty pattern is an error.
    pub(crate) fn parse(text: &str) -> Result<Only, String> {
        let mut patterns = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "--only {text:?} holds an empty pattern: give a check id, a prefix such as `links.` or a glob such as `links.*`"
                ));
            }
            patterns.push(if part.contains(['*', '?']) {
                Pattern::Glob(part.chars().collect())
            } else {
                Pattern::Prefix(part.to_string())
            });
        }
        Ok(Only { patterns })
    }

    /// Whether a check id is selected.
    pub(crate) fn matches(&self, id: &str) -> bool {
        self.patterns.iter().any(|pattern| match pattern {
            Pattern::Prefix(prefix) => id.starts_with(prefix.as_str()),
            Pattern::Glob(glob) => glob_matches(glob, &id.chars().collect::<Vec<_>>()),
        })
    }
}

/// Whether `text` matches `glob` whole (`*`: any run, `?`: one character),
/// backtracking only to the last `*`, so it stays linear-ish on any input.
fn glob_matches(glob: &[char], text: &[char]) -> bool {
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some('*') => {
                star = Some((g, t));
                g += 1;
            }
            Some('?') => {
                g += 1;
                t += 1;
            }
            Some(c) if *c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match star {
                Some((star_g, star_t)) => {
                    g = star_g + 1;
                    t = star_t + 1;
                    star = Some((star_g, star_t + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|c| *c == '*')
}

/// The check ids of an expected-failures file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ExpectedFailures {
    ids: BTreeSet<String>,
}

impl ExpectedFailures {
    /// Parses a file's text: one check id a line, `#` starts a comment,
    /// blank lines are ignored. Every line naming no known check is
    /// reported (`line N: …`), with the nearest known id when one is close.
    pub(crate) fn parse(text: &str, known: &[&str]) -> Result<ExpectedFailures, Vec<String>> {
        let mut ids = BTreeSet::new();
        let mut problems = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let number = index + 1;
            if line.split_whitespace().count() > 1 {
                problems.push(format!(
                    "line {number}: one check id a line (put a reason after `#`)"
                ));
            } else if known.contains(&line) {
                ids.insert(line.to_string());
            } else {
                let nearest = known
                    .iter()
                    .map(|id| (strsim::jaro_winkler(id, line), *id))
                    .filter(|(score, _)| *score > 0.85)
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                problems.push(match nearest {
                    Some((_, id)) => {
                        format!("line {number}: no check is called {line:?} (did you mean {id}?)")
                    }
                    None => format!("line {number}: no check is called {line:?}"),
                });
            }
        }
        if problems.is_empty() {
            Ok(ExpectedFailures { ids })
        } else {
            Err(problems)
        }
    }

    /// Whether this check is expected to fail.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 4] = [
        "auth.missing-token",
        "links.retry",
        "links.race",
        "links.create",
    ];

    #[test]
    fn a_plain_pattern_is_a_prefix_of_ids() {
        let only = Only::parse("links.r").unwrap();
        assert!(only.matches("links.retry"));
        assert!(only.matches("links.race"));
        assert!(!only.matches("links.create"));
        assert!(Only::parse("auth").unwrap().matches("auth.missing-token"));
    }

    #[test]
    fn a_pattern_with_a_star_or_question_mark_is_a_glob_over_the_whole_id() {
        let only = Only::parse("*.r?ce").unwrap();
        assert!(only.matches("links.race"));
        assert!(!only.matches("links.races"));
        assert!(Only::parse("links.*-linked")
            .unwrap()
            .matches("links.user-already-linked"));
        assert!(!Only::parse("links.*-linked")
            .unwrap()
            .matches("links.user-already-linked-twice"));
        assert!(Only::parse("*").unwrap().matches(""));
        assert!(Only::parse("a*b*c").unwrap().matches("aXXbYYbc"));
        assert!(!Only::parse("a*b*c").unwrap().matches("aXXbYYb"));
    }

    #[test]
    fn commas_separate_patterns_and_an_empty_one_is_refused() {
        let only = Only::parse("auth, links.retry").unwrap();
        assert!(only.matches("auth.invalid-token"));
        assert!(only.matches("links.retry"));
        assert!(!only.matches("links.create"));
        assert!(Only::parse("auth,").unwrap_err().contains("empty pattern"));
        assert!(Only::parse("").is_err());
    }

    #[test]
    fn expected_failures_are_ids_one_a_line_with_comments_and_blank_lines() {
        let text = "# known gaps of our server\n\nlinks.retry   # answers 201\n  links.race\n";
        let expected = ExpectedFailures::parse(text, &KNOWN).unwrap();
        assert!(expected.contains("links.retry"));
        assert!(expected.contains("links.race"));
        assert!(!expected.contains("links.create"));
    }

    #[test]
    fn an_unknown_id_in_expected_failures_is_reported_by_line_with_the_nearest_id() {
        let problems =
            ExpectedFailures::parse("links.retyr\n\nnonsense\nlinks.retry links.race\n", &KNOWN)
                .unwrap_err();
        assert_eq!(
            problems,
            [
                "line 1: no check is called \"links.retyr\" (did you mean links.retry?)",
                "line 3: no check is called \"nonsense\"",
                "line 4: one check id a line (put a reason after `#`)",
            ]
        );
    }
}
