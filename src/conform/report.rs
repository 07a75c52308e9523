//! What a run says: one line a check (`ok`, `FAIL`, `skip`, `xfail`,
//! `xpass`), the closing count, and the JUnit XML report. Every message
//! passes through `clean` first: what a server answered is shown, but never
//! the token (a hostile server may echo it), no control characters (they
//! could rewrite the terminal) and not more than a few hundred characters.

use std::fmt::Write as _;
use std::time::Duration;

/// The longest message shown, in characters.
const MAX_MESSAGE_CHARS: usize = 600;
/// The shortest token that messages are cleared of.
const MIN_HIDDEN_TOKEN_CHARS: usize = 8;

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Passed,
    /// What was expected and what came.
    Failed(String),
    /// Why it did not run.
    Skipped(String),
}

/// One check's result, as reported.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub id: &'static str,
    pub outcome: Outcome,
    /// Listed in `--expected-failures`.
    pub expected_to_fail: bool,
    pub took: Duration,
}

impl Verdict {
    /// Its line of output.
    pub(crate) fn line(&self) -> String {
        match (&self.outcome, self.expected_to_fail) {
            (Outcome::Passed, false) => format!("ok {}", self.id),
            (Outcome::Passed, true) => format!("xpass {}", self.id),
            (Outcome::Failed(_), true) => format!("xfail {}", self.id),
            (Outcome::Failed(why), false) => format!("FAIL {}: {why}", self.id),
            (Outcome::Skipped(why), _) => format!("skip {}: {why}", self.id),
        }
    }

    /// Whether it failed unexpectedly (what makes the exit status 1).
    pub(crate) fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_)) && !self.expected_to_fail
    }
}

/// How many checks passed (`xfail` and `xpass` included), failed and were
/// skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    /// The tally of these verdicts.
    pub(crate) fn of(verdicts: &[Verdict]) -> Tally {
        let mut tally = Tally::default();
        for verdict in verdicts {
            match verdict.outcome {
                Outcome::Skipped(_) => tally.skipped += 1,
                _ if verdict.failed() => tally.failed += 1,
                _ => tally.passed += 1,
            }
        }
        tally
    }

    /// The closing line.
    pub(crate) fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// A message made fit to show: the token replaced by `<token>`, control
/// characters escaped, and cut to `MAX_MESSAGE_CHARS`. (A token shorter than
/// `MIN_HIDDEN_TOKEN_CHARS` is no secret that text could keep: replacing it
/// would only garble every word that holds it.)
pub(crate) fn clean(message: &str, token: &str) -> String {
    let message = if token.chars().count() < MIN_HIDDEN_TOKEN_CHARS {
        message.to_string()
    } else {
        message.replace(token, "<token>")
    };
    let mut out = String::new();
    for (count, c) in message.chars().enumerate() {
        if count == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push(' '),
            c if c.is_control()
                || ('\u{202A}'..='\u{202E}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c) =>
            {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The JUnit XML report of a run: one `testsuite`, one `testcase` a check
/// (its `classname` the id's first part), failures as `<failure>` and skips
/// as `<skipped>`; an `xfail` or `xpass` passes, with a property saying so.
pub(crate) fn junit(suite: &str, verdicts: &[Verdict], took: Duration) -> String {
    let tally = Tally::of(verdicts);
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"linkid conform\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\">",
        verdicts.len(),
        tally.failed,
        tally.skipped,
        took.as_secs_f64()
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\">",
        escape(suite),
        verdicts.len(),
        tally.failed,
        tally.skipped,
        took.as_secs_f64()
    );
    for verdict in verdicts {
        let class = verdict.id.split('.').next().unwrap_or(verdict.id);
        let _ = write!(
            xml,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            escape(class),
            escape(verdict.id),
            verdict.took.as_secs_f64()
        );
        match (&verdict.outcome, verdict.expected_to_fail) {
            (Outcome::Passed, false) => xml.push_str("/>\n"),
            (Outcome::Skipped(why), _) => {
                let _ = writeln!(
                    xml,
                    ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                    escape(why)
                );
            }
            (Outcome::Failed(why), false) => {
                let _ = writeln!(
                    xml,
                    ">\n      <failure message=\"{}\" type=\"FAIL\">{}</failure>\n    </testcase>",
                    escape(why),
                    escape(why)
                );
            }
            (Outcome::Failed(why), true) => {
                let _ = writeln!(
                    xml,
                    ">\n      <properties><property name=\"outcome\" value=\"xfail\"/></properties>\n      <system-out>expected failure: {}</system-out>\n    </testcase>",
                    escape(why)
                );
            }
            (Outcome::Passed, true) => {
                let _ = writeln!(
                    xml,
                    ">\n      <properties><property name=\"outcome\" value=\"xpass\"/></properties>\n      <system-out>listed as an expected failure, but passed</system-out>\n    </testcase>"
                );
            }
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

/// Text escaped for XML content and attribute values; characters XML 1.0
/// cannot hold become `?`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(id: &'static str, outcome: Outcome, expected_to_fail: bool) -> Verdict {
        Verdict {
            id,
            outcome,
            expected_to_fail,
            took: Duration::from_millis(5),
        }
    }

    #[test]
    fn each_outcome_has_its_line_and_xfail_and_xpass_count_as_passed() {
        let verdicts = [
            verdict("a.ok", Outcome::Passed, false),
            verdict(
                "a.fail",
                Outcome::Failed("expected 200, got 201".into()),
                false,
            ),
            verdict("a.skip", Outcome::Skipped("one provider".into()), false),
            verdict("a.xfail", Outcome::Failed("no".into()), true),
            verdict("a.xpass", Outcome::Passed, true),
        ];
        let lines: Vec<String> = verdicts.iter().map(Verdict::line).collect();
        assert_eq!(
            lines,
            [
                "ok a.ok",
                "FAIL a.fail: expected 200, got 201",
                "skip a.skip: one provider",
                "xfail a.xfail",
                "xpass a.xpass"
            ]
        );
        assert_eq!(Tally::of(&verdicts).line(), "3 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn a_message_never_shows_the_token_or_control_characters() {
        let shown = clean(
            "body {\"echo\":\"Bearer s3cr3t-token\"}\n\u{1b}[2J",
            "s3cr3t-token",
        );
        assert_eq!(shown, "body {\"echo\":\"Bearer <token>\"}\\n\\u{1b}[2J");
        assert_eq!(
            clean(&"x".repeat(700), "t").chars().count(),
            MAX_MESSAGE_CHARS + 1
        );
        assert_eq!(clean("GET /x", "T"), "GET /x", "too short to hide");
    }

    #[test]
    fn the_junit_report_escapes_what_the_server_said() {
        let verdicts = [
            verdict(
                "links.create",
                Outcome::Failed("got <b>&\"</b>\u{1}".into()),
                false,
            ),
            verdict("links.retry", Outcome::Skipped("why".into()), false),
        ];
        let xml = junit("linkid conform full", &verdicts, Duration::from_secs(1));
        assert!(
            xml.contains("message=\"got &lt;b&gt;&amp;&quot;&lt;/b&gt;?\""),
            "{xml}"
        );
        assert!(xml.contains("<skipped message=\"why\"/>"), "{xml}");
        assert!(
            xml.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"1\""),
            "{xml}"
        );
    }
}
