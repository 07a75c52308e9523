//! Configuration problems as people read them, one line each:
//! `origin:key: what is wrong — the fix`, every problem of every layer at
//! once, each naming the file or environment variable its value came from.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use figment::error::{Actual, Kind};
use figment::providers::Serialized;
use figment::value::Value;
use figment::{Figment, Metadata};
use serde::de::DeserializeOwned;

/// The name of the built-in defaults layer (see `Config::load`).
pub(crate) const BUILT_IN: &str = "built-in defaults";

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The defaults built into the binary.
    BuiltIn,
    /// A config file (its absolute path).
    File(PathBuf),
    /// A `LINKID_SECTION__KEY` environment variable.
    Env,
    /// A value set by a program that embeds linkid (the tests).
    Program,
}

impl Origin {
    fn of(metadata: &Metadata) -> Origin {
        if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
            Origin::File(path.to_path_buf())
        } else if metadata.name.contains("environment variable") {
            Origin::Env
        } else if metadata.name == BUILT_IN {
            Origin::BuiltIn
        } else {
            Origin::Program
        }
    }
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the offending value came from, once known (see `Sources`).
    pub origin: Option<Origin>,
    /// The dotted key, e.g. `server.addr` or `identity_providers[1].id`;
    /// empty for a problem of a whole file.
    pub key: String,
    /// What is wrong.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

impl Problem {
    /// A problem with `key`, its origin to be filled in by `Sources::locate`.
    pub fn new(key: impl Into<String>, what: impl Into<String>, fix: impl Into<String>) -> Problem {
        Problem {
            origin: None,
            key: key.into(),
            what: what.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        match (&self.origin, key.is_empty()) {
            (Some(Origin::File(path)), true) => write!(f, "{}: ", path.display())?,
            (Some(Origin::File(path)), false) => write!(f, "{}:{key}: ", path.display())?,
            (Some(Origin::Env), false) => write!(f, "env {} ({key}): ", env_name(key))?,
            (Some(Origin::BuiltIn), false) => write!(f, "{BUILT_IN}:{key}: ")?,
            (_, false) => write!(f, "{key}: ")?,
            (_, true) => {}
        }
        write!(f, "{} — {}", self.what, self.fix)
    }
}

/// The environment variable that sets `key` (`server.addr` → `LINKID_SERVER__ADDR`).
pub fn env_name(key: &str) -> String {
    let path = key.replace('[', ".").replace(']', "");
    format!("LINKID_{}", path.to_ascii_uppercase().replace('.', "__"))
}

/// Every problem found in a configuration: `check-config` and start-up
/// print them, and the process exits with status 2.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
    /// The layers that were read, for the closing `read:` line.
    pub read: Vec<String>,
}

impl ConfigError {
    /// One problem, its origin still unknown.
    pub fn one(problem: Problem) -> ConfigError {
        ConfigError {
            problems: vec![problem],
            read: Vec::new(),
        }
    }

    /// Names where each problem's value came from and what was read.
    pub fn located(mut self, sources: &Sources) -> ConfigError {
        for problem in &mut self.problems {
            sources.locate(problem);
        }
        // Grouped by file, then by key: the order a reader fixes them in.
        self.problems.sort_by_cached_key(Problem::to_string);
        if self.read.is_empty() {
            self.read = sources.read.clone();
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "{count} configuration problem{}:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "{problem}")?;
        }
        if !self.read.is_empty() {
            writeln!(f, "read: {}", self.read.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where the configuration came from: the layers read, and each value's origin.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The layers read, for people: the built-in defaults, the file, the variables.
    pub read: Vec<String>,
    /// The config file read, if any (absolute).
    pub file: Option<PathBuf>,
    /// Each key's origin, by its dotted key.
    origins: BTreeMap<String, Origin>,
}

impl Sources {
    pub(crate) fn new(
        read: Vec<String>,
        file: Option<PathBuf>,
        origins: BTreeMap<String, Origin>,
    ) -> Sources {
        Sources {
            read,
            file,
            origins,
        }
    }

    /// Whether a key's value is the built-in default (no file, variable or
    /// program set it).
    pub fn is_built_in(&self, key: &str) -> bool {
        matches!(self.origins.get(key), None | Some(Origin::BuiltIn))
    }

    /// Fills in a problem's origin from its key, or the nearest key above it.
    pub fn locate(&self, problem: &mut Problem) {
        if problem.origin.is_some() {
            return;
        }
        let mut key = problem.key.as_str();
        loop {
            if let Some(origin) = self.origins.get(key) {
                problem.origin = Some(origin.clone());
                return;
            }
            match key.rfind(['.', '[']) {
                Some(end) => key = &key[..end],
                None => return,
            }
        }
    }
}

/// What `extract` made of a figment.
pub(crate) struct Extracted<T> {
    /// The value, with every problem mended; `None` when one could not be.
    pub value: Option<T>,
    pub problems: Vec<Problem>,
    /// Keys whose value was mended: checks of the mended value say nothing.
    pub mended: HashSet<String>,
    pub origins: BTreeMap<String, Origin>,
}

/// Extracts a `T`, reporting every problem rather than the first: each
/// unknown key is reported and removed, each bad value reported and
/// replaced by the built-in default (`defaults`), until the rest extracts.
pub(crate) fn extract<T: DeserializeOwned>(figment: &Figment, defaults: &Value) -> Extracted<T> {
    let mut extracted = Extracted {
        value: None,
        problems: Vec::new(),
        mended: HashSet::new(),
        origins: BTreeMap::new(),
    };
    let mut data = match figment.find_value("") {
        Ok(data) => data,
        Err(errors) => {
            // A file that is not TOML: nothing in it can be read.
            for error in errors {
                let mut problem = describe(&error.kind, &[], None, defaults);
                problem.origin = error.metadata.as_ref().map(Origin::of);
                extracted.problems.push(problem);
            }
            return extracted;
        }
    };
    collect_origins(figment, &data, &mut String::new(), &mut extracted.origins);
    // Each round reports and mends at least one problem.
    for _ in 0..256 {
        let errors = match Figment::from(Serialized::defaults(&data)).extract::<T>() {
            Ok(value) => {
                extracted.value = Some(value);
                return extracted;
            }
            Err(errors) => errors,
        };
        let mut mended = false;
        for error in errors {
            let key = key_of(&error.path);
            let origin = {
                let mut probe = Problem::new(key.clone(), "", "");
                let sources = Sources {
                    origins: extracted.origins.clone(),
                    ..Sources::default()
                };
                sources.locate(&mut probe);
                probe.origin
            };
            let mut problem = describe(&error.kind, &error.path, origin.as_ref(), defaults);
            problem.origin = origin;
            extracted.problems.push(problem);
            mended |= mend(
                &mut data,
                &error.kind,
                &error.path,
                defaults,
                &mut extracted.mended,
            );
        }
        if !mended {
            break;
        }
    }
    extracted
}

/// `["identity_providers", "1", "id"]` → `identity_providers[1].id`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for segment in path {
        if is_index(segment) {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    key
}

fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

fn collect_origins(
    figment: &Figment,
    value: &Value,
    key: &mut String,
    origins: &mut BTreeMap<String, Origin>,
) {
    if let Some(metadata) = figment.get_metadata(value.tag()) {
        if !key.is_empty() {
            origins.insert(key.clone(), Origin::of(metadata));
        }
    }
    let len = key.len();
    match value {
        Value::Dict(_, dict) => {
            for (name, child) in dict {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
                collect_origins(figment, child, key, origins);
                key.truncate(len);
            }
        }
        Value::Array(_, items) => {
            for (i, child) in items.iter().enumerate() {
                key.push_str(&format!("[{i}]"));
                collect_origins(figment, child, key, origins);
                key.truncate(len);
            }
        }
        _ => {}
    }
}

/// The value the built-in defaults have at `path`, taking the first item
/// of a list as the pattern for every item.
fn template<'a>(defaults: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = defaults;
    for segment in path {
        node = match node {
            Value::Dict(_, dict) => dict.get(segment)?,
            Value::Array(_, items) if is_index(segment) => items.first()?,
            _ => return None,
        };
    }
    Some(node)
}

fn node_mut<'a>(data: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut node = data;
    for segment in path {
        node = match node {
            Value::Dict(_, dict) => dict.get_mut(segment)?,
            Value::Array(_, items) => items.get_mut(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
}

fn set(data: &mut Value, path: &[String], value: Value) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match node_mut(data, parent) {
        Some(Value::Dict(_, dict)) => {
            dict.insert(last.clone(), value);
            true
        }
        Some(Value::Array(_, items)) => {
            match last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(item) => {
                    *item = value;
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

fn remove(data: &mut Value, path: &[String]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match node_mut(data, parent) {
        Some(Value::Dict(_, dict)) => dict.remove(last).is_some(),
        _ => false,
    }
}

/// Makes the problem at `path` go away so that extraction can find the
/// next: an unknown key is removed; a bad or missing value takes the
/// built-in default's place (a list without a pattern is reset whole).
fn mend(
    data: &mut Value,
    kind: &Kind,
    path: &[String],
    defaults: &Value,
    mended: &mut HashSet<String>,
) -> bool {
    let target: Vec<String> = match kind {
        Kind::UnknownField(..) => return remove(data, path),
        Kind::MissingField(name) => path.iter().cloned().chain([name.to_string()]).collect(),
        _ => path.to_vec(),
    };
    if let Some(value) = template(defaults, &target) {
        mended.insert(key_of(&target));
        return set(data, &target, value.clone());
    }
    if let Some(list) = target.iter().rposition(|s| is_index(s)) {
        let list = &target[..list];
        if let Some(value) = template(defaults, list) {
            mended.insert(key_of(list));
            return set(data, list, value.clone());
        }
    }
    mended.insert(key_of(&target));
    remove(data, &target)
}

/// A figment error in people's words.
fn describe(kind: &Kind, path: &[String], origin: Option<&Origin>, defaults: &Value) -> Problem {
    let key = key_of(path);
    let example = || example(path, defaults);
    match kind {
        Kind::UnknownField(name, expected) => {
            let parent = &path[..path.len().saturating_sub(1)];
            let fix = match closest(name, expected) {
                Some(known) => {
                    let known_key = key_of(&[parent, &[known.to_string()]].concat());
                    let shown = if origin == Some(&Origin::Env) {
                        env_name(&known_key)
                    } else {
                        known.to_string()
                    };
                    format!("did you mean `{shown}`?")
                }
                None if parent.is_empty() => {
                    format!("remove it; the sections are {}", quoted_list(expected))
                }
                None => format!(
                    "remove it; [{}] takes {}",
                    key_of(parent),
                    quoted_list(expected)
                ),
            };
            Problem::new(key, "unknown key", fix)
        }
        Kind::MissingField(name) => {
            let full: Vec<String> = path.iter().cloned().chain([name.to_string()]).collect();
            let fix = match template(defaults, &full) {
                Some(value) => format!("add it, e.g. `{name} = {}`", toml_text(value)),
                None => "add it".to_string(),
            };
            Problem::new(key_of(&full), "is missing", fix)
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => Problem::new(
            key,
            format!("{} is not {}", shown(actual), phrase(expected)),
            example(),
        ),
        Kind::UnknownVariant(found, expected) => {
            let fix = match closest(found, expected) {
                Some(known) => format!("did you mean `{known}`?"),
                None => format!("use one of {}", quoted_list(expected)),
            };
            Problem::new(
                key,
                format!("`{found}` is not one of {}", quoted_list(expected)),
                fix,
            )
        }
        Kind::Message(message) => match message.split_once(" — ") {
            Some((what, fix)) => Problem::new(key, what, fix),
            None if path.is_empty() => {
                let message = one_line(message);
                let at = message
                    .strip_prefix("TOML parse error ")
                    .unwrap_or(&message);
                Problem::new(key, format!("is not valid TOML {at}"), "fix that line")
            }
            None => Problem::new(key, one_line(message), example()),
        },
        other => Problem::new(key, one_line(&other.to_string()), example()),
    }
}

/// "use e.g. `max_batch = 256` (the built-in default)", or a general hint.
fn example(path: &[String], defaults: &Value) -> String {
    match (path.last(), template(defaults, path)) {
        (Some(name), Some(value)) if !is_index(name) => {
            format!(
                "use e.g. `{name} = {}` (the built-in default)",
                toml_text(value)
            )
        }
        _ => "see the comments in config.toml for this key".to_string(),
    }
}

/// A value as it would be written in TOML.
fn toml_text(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_u128(), n.to_i128(), n.to_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) => f.to_string(),
            _ => "0".to_string(),
        },
        Value::Array(_, items) if items.is_empty() => "[]".to_string(),
        Value::Array(..) => "[…]".to_string(),
        Value::Dict(..) => "{…}".to_string(),
        _ => "…".to_string(),
    }
}

fn shown(actual: &Actual) -> String {
    match actual {
        Actual::Str(s) => format!("{s:?}"),
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        Actual::Seq => "a list".to_string(),
        Actual::Map => "a table".to_string(),
        other => other.to_string(),
    }
}

/// serde's name for what it expected, in words.
fn phrase(expected: &str) -> String {
    let whole = ["u8", "u16", "u32", "u64", "u128", "usize"];
    let signed = ["i8", "i16", "i32", "i64", "i128", "isize"];
    if whole.contains(&expected) {
        "a whole number (0 or more)".to_string()
    } else if signed.contains(&expected) {
        "a whole number".to_string()
    } else if expected == "a boolean" {
        "true or false".to_string()
    } else if expected.starts_with("struct ") || expected == "a map" {
        "a table".to_string()
    } else if expected == "a sequence" {
        "a list".to_string()
    } else {
        expected.to_string()
    }
}

/// The known name nearest a mistyped one, if any is near (as clap does).
pub(crate) fn closest<'a>(typed: &str, known: &[&'a str]) -> Option<&'a str> {
    let typed = typed.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (strsim::jaro(&typed, &k.to_ascii_lowercase()), *k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A multi-line message (a TOML parser's, with its caret drawing) on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.contains(" | "))
        .filter(|l| !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_is_suggested_and_a_stranger_is_not() {
        let server = ["addr", "shutdown_timeout_secs", "max_connections"];
        assert_eq!(closest("adress", &server), Some("addr"));
        assert_eq!(closest("adrr", &server), Some("addr"));
        assert_eq!(
            closest("pool_sise", &["path", "pool_size", "max_batch"]),
            Some("pool_size")
        );
        assert_eq!(
            closest(
                "private_key",
                &["private_key_file", "public_key", "token_cache_size"]
            ),
            Some("private_key_file")
        );
        assert_eq!(closest("colour", &server), None);
        assert_eq!(closest("oidc", &["OIDC", "SAML"]), Some("OIDC"));
    }

    #[test]
    fn keys_read_as_written_and_as_environment_variables() {
        let path: Vec<String> = ["identity_providers", "1", "id"].map(String::from).to_vec();
        assert_eq!(key_of(&path), "identity_providers[1].id");
        assert_eq!(env_name("server.addr"), "LINKID_SERVER__ADDR");
    }

    #[test]
    fn a_problem_reads_origin_key_what_and_fix() {
        let mut problem = Problem::new("server.addr", "unknown key", "did you mean `addr`?");
        problem.origin = Some(Origin::File("/etc/linkid.toml".into()));
        assert_eq!(
            problem.to_string(),
            "/etc/linkid.toml:server.addr: unknown key — did you mean `addr`?"
        );
        problem.origin = Some(Origin::Env);
        assert!(problem
            .to_string()
            .starts_with("env LINKID_SERVER__ADDR (server.addr): "));
    }

    #[test]
    fn a_parser_message_is_put_on_one_line() {
        let message = "TOML parse error at line 2, column 8\n  |\n2 | addr = \n  |        ^\ninvalid string\nexpected `\"`, `'`\n";
        assert_eq!(
            one_line(message),
            "TOML parse error at line 2, column 8; invalid string; expected `\"`, `'`"
        );
    }
}
