//! The JSON Lines format of `linkid export` and `linkid import`: one link a
//! line, `{"user_id", "provider_id", "linked_user_id", "linked_username",
//! "created_at", "updated_at"}`, the search answer's item. Parsing and
//! checking a line is the same for every backend; applying it is theirs.

use std::collections::HashSet;
use std::io::{BufRead, Write};

use anyhow::Context;
use serde_json::Value;

use crate::domain::{normalize_text, JsonMembers, LinkRecord};

/// Where an import reads from: a file or stdin.
pub type Source = Box<dyn BufRead + Send>;

/// The longest line an import reads (a link is well under 2 KiB): memory
/// stays bounded whatever the file holds.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// How an import runs and reports.
pub struct ImportOptions {
    /// Check everything, apply nothing.
    pub dry_run: bool,
    /// Every configured provider id, linkable or not.
    pub providers: HashSet<String>,
    /// How each provider compares remote ids (the configuration's).
    pub rules: crate::domain::IdRules,
    /// Gets the number of bytes read so far.
    pub progress: Box<dyn Fn(u64) + Send>,
    /// Gets each problem as it is found, as `line N: field: message`.
    pub problem: Box<dyn FnMut(String) + Send>,
    /// Delete every link and event first, in the same transaction, so that
    /// the file becomes all there is and the feed starts again at 1
    /// (`linkid dev`'s reset; SQLite only).
    pub replace: bool,
    /// The instant every stamp gets (`linkid dev --clock`); now when `None`.
    pub clock: Option<std::time::SystemTime>,
}

/// RFC 3339 UTC with seconds: `clock`'s instant, or now.
pub fn stamp(clock: Option<std::time::SystemTime>) -> String {
    humantime::format_rfc3339_seconds(clock.unwrap_or_else(std::time::SystemTime::now)).to_string()
}

/// What an import did (or, on a dry run or with problems, would have done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Bad lines and conflicts; any at all means nothing was applied.
    pub problems: u64,
    /// Whether the changes were committed.
    pub applied: bool,
}

impl ImportReport {
    /// The summary line: `created N, updated N, unchanged N`.
    pub fn summary(&self) -> String {
        format!(
            "created {}, updated {}, unchanged {}",
            self.created, self.updated, self.unchanged
        )
    }
}

/// What applying one line did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOutcome {
    Created,
    Updated,
    Unchanged,
}

/// Why a line cannot be applied, against what is stored or an earlier line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The user already has a link to another identity.
    UserAlreadyLinked { current: Box<LinkRecord> },
    /// The identity belongs to another user.
    IdentityAlreadyLinked { owner: String },
}

impl Conflict {
    /// The problem line for this conflict on line `number`.
    pub fn describe(&self, number: u64, line: &LinkRecord) -> String {
        match self {
            Conflict::UserAlreadyLinked { current } => format!(
                "line {number}: user_id: USER_ALREADY_LINKED: user {:?} is already linked to {:?} at {:?} (stored, or on an earlier line)",
                line.user_id, current.linked_user_id, current.provider_id
            ),
            Conflict::IdentityAlreadyLinked { owner } => format!(
                "line {number}: linked_user_id: IDENTITY_ALREADY_LINKED: {:?} at {:?} is already linked to user {owner:?} (stored, or on an earlier line)",
                line.linked_user_id, line.provider_id
            ),
        }
    }
}

/// Reads the file in batches of `batch` lines, applies each batch's good
/// lines with `apply` (the backend's step: one outcome per line, in order,
/// each line seeing the ones before it), counts the outcomes and reports
/// every problem in line order. Returns the report with `applied` false:
/// committing is the caller's.
pub fn run_import(
    source: Source,
    options: &mut ImportOptions,
    batch: usize,
    mut apply: impl FnMut(&[LinkRecord]) -> anyhow::Result<Vec<Result<LineOutcome, Conflict>>>,
) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    let now = stamp(options.clock);
    let mut lines = Lines::new(source);
    let mut parsed: Vec<(u64, Result<LinkRecord, Vec<String>>)> = Vec::with_capacity(batch);
    let mut flush = |parsed: &mut Vec<(u64, Result<LinkRecord, Vec<String>>)>,
                     report: &mut ImportReport|
     -> anyhow::Result<()> {
        let records: Vec<LinkRecord> = parsed
            .iter()
            .filter_map(|(_, line)| line.as_ref().ok().cloned())
            .collect();
        let mut outcomes = apply(&records)?.into_iter();
        for (number, line) in parsed.drain(..) {
            let record = match line {
                Ok(record) => record,
                Err(problems) => {
                    for problem in problems {
                        report.problems += 1;
                        (options.problem)(format!("line {number}: {problem}"));
                    }
                    continue;
                }
            };
            match outcomes
                .next()
                .context("the store gave fewer outcomes than lines")?
            {
                Ok(LineOutcome::Created) => report.created += 1,
                Ok(LineOutcome::Updated) => report.updated += 1,
                Ok(LineOutcome::Unchanged) => report.unchanged += 1,
                Err(conflict) => {
                    report.problems += 1;
                    (options.problem)(conflict.describe(number, &record));
                }
            }
        }
        Ok(())
    };
    while let Some((number, line)) = lines.next_line()? {
        match line.and_then(|text| parse_line(&text, &options.providers, &now)) {
            Ok(None) => {}
            Ok(Some(record)) => parsed.push((number, Ok(record))),
            Err(problems) => parsed.push((number, Err(problems))),
        }
        if parsed.len() >= batch {
            flush(&mut parsed, &mut report)?;
            (options.progress)(lines.bytes_read);
        }
    }
    flush(&mut parsed, &mut report)?;
    (options.progress)(lines.bytes_read);
    Ok(report)
}

/// Numbered lines of at most `MAX_LINE_BYTES`, read without holding more.
struct Lines {
    source: Source,
    number: u64,
    bytes_read: u64,
    buffer: Vec<u8>,
}

impl Lines {
    fn new(source: Source) -> Lines {
        Lines {
            source,
            number: 0,
            bytes_read: 0,
            buffer: Vec::with_capacity(1024),
        }
    }

    /// The next line's number and text (or why it cannot be read), or
    /// `None` at the end. I/O errors end the import.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> anyhow::Result<Option<(u64, Result<String, Vec<String>>)>> {
        self.buffer.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let read =
            std::io::Read::take(&mut self.source, limit).read_until(b'\n', &mut self.buffer)?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;
        self.bytes_read += read as u64;
        let ended = self.buffer.last() == Some(&b'\n');
        if !ended && read as u64 == limit {
            // Skip the rest of an over-long line without keeping it.
            loop {
                let rest = self.source.fill_buf()?;
                if rest.is_empty() {
                    break;
                }
                let (used, found) = match rest.iter().position(|&b| b == b'\n') {
                    Some(at) => (at + 1, true),
                    None => (rest.len(), false),
                };
                self.source.consume(used);
                self.bytes_read += used as u64;
                if found {
                    break;
                }
            }
            return Ok(Some((
                self.number,
                Err(vec![format!("line: is longer than {MAX_LINE_BYTES} bytes")]),
            )));
        }
        let text = match std::str::from_utf8(&self.buffer) {
            Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_owned()),
            Err(_) => Err(vec!["line: is not UTF-8".to_string()]),
        };
        Ok(Some((self.number, text)))
    }
}

const FIELDS: [&str; 6] = [
    "user_id",
    "provider_id",
    "linked_user_id",
    "linked_username",
    "created_at",
    "updated_at",
];

/// One line as a link to apply; `None` for a blank line. Every problem is
/// `field: message`. Times are optional (an import stamps `now`) and kept
/// as given, normalised to RFC 3339 UTC with seconds.
pub fn parse_line(
    text: &str,
    providers: &HashSet<String>,
    now: &str,
) -> Result<Option<LinkRecord>, Vec<String>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    // Members in order with duplicates kept: a file reviewed by reading it
    // must not apply the second of two values the reader took for the first.
    let members = match serde_json::from_str::<JsonMembers>(text) {
        Ok(members) => members.0,
        Err(e) if e.is_data() => return Err(vec!["line: must be a JSON object".into()]),
        Err(e) => return Err(vec![format!("line: is not JSON ({e})")]),
    };
    let mut problems = Vec::new();
    for (i, (name, _)) in members.iter().enumerate() {
        let shown: String = name.chars().take(64).collect();
        if !FIELDS.contains(&name.as_str()) {
            problems.push(format!(
                "{shown}: is not a known field; the fields are {}",
                FIELDS.join(", ")
            ));
        } else if members[..i].iter().any(|(earlier, _)| earlier == name) {
            problems.push(format!("{shown}: appears more than once"));
        }
    }
    let mut text_field = |name: &str, required: bool| -> Option<String> {
        match members
            .iter()
            .find(|(member, _)| member == name)
            .map(|(_, v)| v)
        {
            None if required => problems.push(format!("{name}: is required")),
            None => {}
            Some(Value::String(value)) => match normalize_text(value) {
                Ok(value) => return Some(value),
                Err(why) => problems.push(format!("{name}: {why}")),
            },
            Some(_) => problems.push(format!("{name}: must be a string")),
        }
        None
    };
    let user_id = text_field("user_id", true);
    let provider_id = text_field("provider_id", true);
    let linked_user_id = text_field("linked_user_id", true);
    let linked_username = text_field("linked_username", true);
    let created_at = text_field("created_at", false);
    let updated_at = text_field("updated_at", false);
    if let Some(provider) = &provider_id {
        if !providers.contains(provider) {
            problems.push(format!(
                "provider_id: {provider:?} is not a configured identity provider"
            ));
        }
    }
    let mut time = |name: &str, value: Option<String>| -> Option<String> {
        let value = value?;
        match humantime::parse_rfc3339(&value) {
            Ok(at) => Some(humantime::format_rfc3339_seconds(at).to_string()),
            Err(_) => {
                problems.push(format!(
                    "{name}: {value:?} is not an RFC 3339 UTC time such as 2026-11-29T10:00:00Z"
                ));
                None
            }
        }
    };
    let created_at = time("created_at", created_at).unwrap_or_else(|| now.to_owned());
    let updated_at = time("updated_at", updated_at).unwrap_or_else(|| created_at.clone());
    if updated_at < created_at {
        problems.push("updated_at: must not be before created_at".into());
    }
    match (user_id, provider_id, linked_user_id, linked_username) {
        (Some(user_id), Some(provider_id), Some(linked_user_id), Some(linked_username))
            if problems.is_empty() =>
        {
            Ok(Some(LinkRecord {
                user_id,
                provider_id,
                linked_user_id,
                linked_username,
                created_at,
                updated_at,
            }))
        }
        _ => Err(problems),
    }
}

/// Writes one link as a line of the format.
pub fn write_line(out: &mut dyn Write, record: &LinkRecord) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn providers() -> HashSet<String> {
        ["okta".to_string()].into()
    }

    const NOW: &str = "2026-11-30T00:00:00Z";

    #[test]
    fn a_whole_line_is_a_link_with_its_times_kept() {
        let line = r#"{"user_id":"u-1","provider_id":"okta","linked_user_id":"r","linked_username":"n","created_at":"2026-01-02T03:04:05Z","updated_at":"2026-01-03T00:00:00Z"}"#;
        let record = parse_line(line, &providers(), NOW).unwrap().unwrap();
        assert_eq!(record.created_at, "2026-01-02T03:04:05Z");
        assert_eq!(record.updated_at, "2026-01-03T00:00:00Z");
        let mut out = Vec::new();
        write_line(&mut out, &record).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{line}\n"));
    }

    #[test]
    fn times_are_optional_and_normalised() {
        let line = r#"{"user_id":"u-1","provider_id":"okta","linked_user_id":"r","linked_username":"n","created_at":"2026-01-02T03:04:05.123+00:00"}"#;
        let record = parse_line(line, &providers(), NOW).unwrap().unwrap();
        assert_eq!(record.created_at, "2026-01-02T03:04:05Z");
        assert_eq!(record.updated_at, record.created_at);
        let bare =
            r#"{"user_id":"u-1","provider_id":"okta","linked_user_id":"r","linked_username":"n"}"#;
        assert_eq!(
            parse_line(bare, &providers(), NOW)
                .unwrap()
                .unwrap()
                .created_at,
            NOW
        );
    }

    #[test]
    fn every_problem_of_a_line_is_named_by_field() {
        let line = r#"{"user_id":"","provider_id":"github","linked_user_id":7,"nickname":"x","created_at":"yesterday"}"#;
        let problems = parse_line(line, &providers(), NOW).unwrap_err();
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "nickname",
                "user_id",
                "linked_user_id",
                "linked_username",
                "provider_id",
                "created_at"
            ],
            "{problems:?}"
        );
        assert!(parse_line("[1]", &providers(), NOW).is_err());
        assert!(parse_line("{", &providers(), NOW).is_err());
        assert_eq!(parse_line("   ", &providers(), NOW).unwrap(), None);
    }

    #[test]
    fn a_field_named_twice_is_a_problem_however_the_values_agree() {
        let line = r#"{"user_id":"u-1","provider_id":"okta","linked_user_id":"r","linked_username":"n","provider_id":"azure-ad","user_id":"u-1"}"#;
        let problems = parse_line(line, &providers(), NOW).unwrap_err();
        assert_eq!(
            problems,
            [
                "provider_id: appears more than once",
                "user_id: appears more than once"
            ]
        );
    }

    #[test]
    fn ids_and_usernames_are_read_in_nfc_and_invisible_characters_refused() {
        let line = r#"{"user_id":"jose\u0301","provider_id":"okta","linked_user_id":"CN=Jose\u0301","linked_username":"jose\u0301@example.com"}"#;
        let record = parse_line(line, &providers(), NOW).unwrap().unwrap();
        assert_eq!(record.user_id, "jos\u{E9}");
        assert_eq!(record.linked_user_id, "CN=Jos\u{E9}");
        assert_eq!(record.linked_username, "jos\u{E9}@example.com");
        let hidden = r#"{"user_id":"ada\u200b","provider_id":"okta","linked_user_id":"r","linked_username":"n"}"#;
        let problems = parse_line(hidden, &providers(), NOW).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("user_id: must not contain invisible"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_over_long_line_is_a_problem_and_the_next_line_is_read() {
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let text = format!("{long}\n{{}}\n");
        let mut lines = Lines::new(Box::new(std::io::Cursor::new(text.into_bytes())));
        let (number, first) = lines.next_line().unwrap().unwrap();
        assert_eq!(number, 1);
        assert!(first.unwrap_err()[0].contains("longer than"));
        let (number, second) = lines.next_line().unwrap().unwrap();
        assert_eq!((number, second.unwrap()), (2, "{}".to_string()));
        assert!(lines.next_line().unwrap().is_none());
    }
}
