//! `linkid conform URL`: judges a server that claims the Linked Identities
//! API, through the API alone. It runs named checks (`checks.rs`) on users
//! of its own, judges every answer by the OpenAPI document built into this
//! binary or, at `--level seed`, by what the seed text names (`schema.rs`),
//! prints one line a check and a closing count (`report.rs`), and deletes
//! every link it made when it ends, also after a failure or a signal.
//!
//! It is an HTTP client living beside the server: it shares the domain
//! types, the operations table and the document with it, never its
//! handlers, and nothing below `cli` uses it.

mod checks;
mod exchange;
mod report;
mod run;
mod schema;
mod selection;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use reqwest::Method;

use checks::Check;
use exchange::{Api, Request};
use report::{clean, Outcome, Tally, Verdict};
use run::{Run, Stop};
use schema::Judge;
use selection::{ExpectedFailures, Only};

use crate::config::CONFORM_TOKEN_VARIABLE;
use crate::domain::Operation;

/// Exit status: no check failed unexpectedly.
const EXIT_PASSED: i32 = 0;
/// Exit status: a check failed unexpectedly.
const EXIT_FAILED: i32 = 1;
/// Exit status: the run could not start (unreachable, no token, refused).
const EXIT_UNABLE: i32 = 2;
/// How many users the cleanup works on at once.
const CLEANUP_CONCURRENCY: usize = 8;
/// How long one check may take: a server that answers each request just
/// within its timeout must not hold a run for hours.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cleanup may take, for the same reason.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How much a run judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// Only what the seed text promises (any implementation can pass).
    Seed,
    /// Also linkid's own promises: exact shapes and codes, the 409, the
    /// Location, GET one, search, the change feed, races.
    Full,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Seed => "seed",
            Level::Full => "full",
        })
    }
}

/// A bearer token for the server under judgement; `Debug` hides it.
#[derive(Clone)]
pub struct Token(String);

impl From<String> for Token {
    fn from(text: String) -> Token {
        Token(text)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// `linkid conform`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (the API under
    /// /api/admin/users/v4 is found from there).
    #[arg(value_name = "URL")]
    pub url: String,
    /// A token the server accepts with every right (an admin token). The
    /// environment keeps it out of `ps` and shell history.
    #[arg(long, value_name = "TOKEN", env = CONFORM_TOKEN_VARIABLE, hide_env_values = true)]
    pub token: Option<Token>,
    /// seed: only what the seed text promises, so any implementation can
    /// pass (other error shapes too); full: also linkid's own promises.
    #[arg(long, value_enum, default_value_t = Level::Full)]
    pub level: Level,
    /// Also write a JUnit XML report to FILE (one testcase a check).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Check ids expected to fail, one a line (`#` starts a comment): their
    /// failure is an `xfail`, their pass an `xpass`; both count as passed.
    #[arg(long, value_name = "FILE")]
    pub expected_failures: Option<PathBuf>,
    /// Run only the checks whose id matches: a prefix (`auth`,
    /// `links.retry`), or a glob over the whole id when PATTERN holds `*` or
    /// `?` (`links.*-linked`); several separated by commas.
    #[arg(long, value_name = "PATTERN")]
    pub only: Option<String>,
    /// Leave the links the checks made (by default they are deleted at the
    /// end, also after a failure or Ctrl-C).
    #[arg(long)]
    pub keep: bool,
}

/// `linkid conform --help`'s closing text: examples, then every check.
pub fn help() -> String {
    let mut text = String::from(
        "Examples:\n  LINKID_CONFORM_TOKEN=$TOKEN linkid conform http://127.0.0.1:8080\n  linkid conform https://ids.example.com --level seed --junit conform.xml\n  linkid conform http://127.0.0.1:8080 --only 'links.*' --expected-failures known-gaps.txt\n\nIt makes its own users (conform-<run id>-<n>), finds a linkable provider in the\nprovider list, and deletes every link it made when it ends, also after a failure\nor Ctrl-C (--keep leaves them). Exit 0: no check failed unexpectedly; 1: one\ndid; 2: it could not run at all (unreachable, no token, the token refused).\n\nChecks (seed, then those --level full adds):\n",
    );
    for check in Check::ALL {
        let spec = check.spec();
        text.push_str(&format!("  {:<30} {}\n", spec.id, spec.what));
    }
    text
}

/// A signal that stops a run, and the exit status it leaves.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    fn exit_status(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// The next SIGINT or SIGTERM.
async fn signal() -> Signal {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Signal::Interrupt,
        () = terminate => Signal::Terminate,
    }
}

/// Prints a line of the report on stdout (a closed stdout is not a panic).
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Judges the server and returns the exit status: 0 when no check failed
/// unexpectedly, 1 when one did, 2 when the run could not start (the
/// message on stderr says why), 130 or 143 after SIGINT or SIGTERM.
pub async fn run(args: Args) -> i32 {
    match prepare(&args).await {
        Ok((run, selected, expected, junit)) => {
            judge(&args, &run, &selected, &expected, junit).await
        }
        Err(why) => {
            eprintln!("linkid conform: cannot run: {why}");
            EXIT_UNABLE
        }
    }
}

/// Everything a run needs before its first check; an error says why the
/// run cannot start.
async fn prepare(
    args: &Args,
) -> Result<(Run, Vec<Check>, ExpectedFailures, Option<std::fs::File>), String> {
    let token = args
        .token
        .as_ref()
        .map(|token| token.0.trim().to_string())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            format!(
                "no token: pass --token TOKEN or set {CONFORM_TOKEN_VARIABLE} (a token the server accepts with every right)"
            )
        })?;
    let known: Vec<&str> = Check::ALL.iter().map(|c| c.id()).collect();
    let expected = match &args.expected_failures {
        None => ExpectedFailures::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --expected-failures {}: {e}", path.display()))?;
            ExpectedFailures::parse(&text, &known).map_err(|problems| {
                format!(
                    "--expected-failures {}:\n  {}",
                    path.display(),
                    problems.join("\n  ")
                )
            })?
        }
    };
    let only = args.only.as_deref().map(Only::parse).transpose()?;
    let selected: Vec<Check> = Check::ALL
        .into_iter()
        .filter(|c| args.level == Level::Full || c.spec().level == Level::Seed)
        .filter(|c| only.as_ref().is_none_or(|only| only.matches(c.id())))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "--only {:?} selects no check at --level {} (the ids: {})",
            args.only.as_deref().unwrap_or(""),
            args.level,
            known.join(", ")
        ));
    }
    let junit = match &args.junit {
        None => None,
        Some(path) => Some(
            std::fs::File::create(path)
                .map_err(|e| format!("cannot write --junit {}: {e}", path.display()))?,
        ),
    };
    let api = Api::new(&args.url, token)?;
    let judge = Judge::new(args.level)?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut run = Run::new(api, judge, id);
    let providers = discover_providers(&run).await?;
    run.providers = providers;
    Ok((run, selected, expected, junit))
}

/// Reads the provider list with the token: the linkable providers, or why
/// there are none. An error when the run cannot start at all: the server
/// is unreachable or refuses the token.
async fn discover_providers(run: &Run) -> Result<Result<Vec<String>, String>, String> {
    let token = run.api.token();
    let request = Request::new(
        Method::GET,
        exchange::target(Operation::ListIdentityProviders, &[], ""),
    );
    let answer = run.api.send(request).await.map_err(|unanswered| {
        let what = if unanswered.began {
            format!(
                "{} began an answer to the provider list, but",
                run.api.base()
            )
        } else {
            format!("cannot reach {}:", run.api.base())
        };
        clean(&format!("{what} {}", unanswered.why), token)
    })?;
    match answer.status {
        401 | 403 => Err(clean(
            &format!(
                "the server refused the token on the provider list: {}",
                answer.describe()
            ),
            token,
        )),
        200 => {
            let body = answer.json().unwrap_or_default();
            // The checks need two at most.
            let mut providers: Vec<String> = Vec::new();
            for object in schema::objects_with(&body, "provider_id") {
                if let Some(id) = object["provider_id"].as_str() {
                    if crate::domain::check_text(id).is_ok() && !providers.iter().any(|p| p == id) {
                        providers.push(id.to_string());
                    }
                }
                if providers.len() == 2 {
                    break;
                }
            }
            if providers.is_empty() {
                Ok(Err("the provider list names no provider_id".to_string()))
            } else {
                Ok(Ok(providers))
            }
        }
        _ => Ok(Err(clean(
            &format!("the provider list answered {}", answer.describe()),
            token,
        ))),
    }
}

/// Runs the selected checks, cleans up and reports; returns the exit status.
async fn judge(
    args: &Args,
    run: &Run,
    selected: &[Check],
    expected: &ExpectedFailures,
    junit: Option<std::fs::File>,
) -> i32 {
    eprintln!(
        "linkid conform: judging {} at level {}: {} checks, on users conform-{}-N",
        run.api.base(),
        args.level,
        selected.len(),
        run.id
    );
    let started = Instant::now();
    let mut verdicts: Vec<Verdict> = Vec::new();
    let checks = async {
        for check in selected {
            let verdict = judge_one(run, *check, expected).await;
            say(&verdict.line());
            verdicts.push(verdict);
        }
    };
    let interrupted = tokio::select! {
        () = checks => None,
        signal = signal() => Some(signal),
    };
    if let Some(signal) = interrupted {
        eprintln!(
            "linkid conform: stopped by {} after {} of {} checks",
            signal.name(),
            verdicts.len(),
            selected.len()
        );
    }
    let took = started.elapsed();

    if args.keep {
        eprintln!(
            "linkid conform: --keep: the links of this run's users (conform-{}-1 to conform-{}-{}) stay",
            run.id,
            run.id,
            run.users().len()
        );
    } else {
        tokio::select! {
            () = clean_up(run) => {}
            () = tokio::time::sleep(CLEANUP_TIMEOUT) => eprintln!(
                "linkid conform: the cleanup stopped after {} s: users conform-{}-N may keep links",
                CLEANUP_TIMEOUT.as_secs(),
                run.id
            ),
            signal = signal() => eprintln!(
                "linkid conform: stopped by {} during the cleanup: users conform-{}-N may keep links",
                signal.name(),
                run.id
            ),
        }
    }
    if let Some(signal) = interrupted {
        return signal.exit_status();
    }

    let tally = Tally::of(&verdicts);
    say(&tally.line());
    if let (Some(mut file), Some(path)) = (junit, &args.junit) {
        let suite = format!("linkid conform --level {} {}", args.level, run.api.base());
        if let Err(e) = file.write_all(report::junit(&suite, &verdicts, took).as_bytes()) {
            eprintln!(
                "linkid conform: cannot write --junit {}: {e}",
                path.display()
            );
            return EXIT_UNABLE;
        }
    }
    if tally.failed > 0 {
        EXIT_FAILED
    } else {
        EXIT_PASSED
    }
}

/// Runs one check and makes its verdict.
async fn judge_one(run: &Run, check: Check, expected: &ExpectedFailures) -> Verdict {
    let started = Instant::now();
    let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check.run(run)).await {
        Ok(Ok(())) => Outcome::Passed,
        Ok(Err(Stop::Fail(why))) => Outcome::Failed(clean(&why, run.api.token())),
        Ok(Err(Stop::Skip(why))) => Outcome::Skipped(clean(&why, run.api.token())),
        Err(_) => Outcome::Failed(format!(
            "expected the check to end within {} s, it did not: the server answers too slowly",
            CHECK_TIMEOUT.as_secs()
        )),
    };
    Verdict {
        id: check.id(),
        outcome,
        expected_to_fail: expected.contains(check.id()),
        took: started.elapsed(),
    }
}

/// Deletes every link of this run's users: those each user's list shows
/// and those tried, whatever the list says. Says on stderr what it did and
/// what it could not do.
async fn clean_up(run: &Run) {
    let users = run.users();
    let outcomes: Vec<(usize, Vec<String>)> = futures_util::stream::iter(users)
        .map(|(user, tried)| clean_up_user(run, user, tried))
        .buffer_unordered(CLEANUP_CONCURRENCY)
        .collect()
        .await;
    let deleted: usize = outcomes.iter().map(|(deleted, _)| deleted).sum();
    let problems: Vec<&String> = outcomes.iter().flat_map(|(_, problems)| problems).collect();
    eprintln!(
        "linkid conform: cleanup: deleted {deleted} link{} of this run's {} users",
        if deleted == 1 { "" } else { "s" },
        run.users().len()
    );
    for problem in problems {
        eprintln!(
            "linkid conform: cleanup: {}",
            clean(problem, run.api.token())
        );
    }
}

/// Deletes one user's links; returns how many were deleted and what went
/// wrong.
async fn clean_up_user(run: &Run, user: String, tried: BTreeSet<String>) -> (usize, Vec<String>) {
    let listed = |answer: Result<exchange::Answer, Stop>| -> BTreeSet<String> {
        let Ok(answer) = answer else {
            return BTreeSet::new();
        };
        let body = answer.json().unwrap_or_default();
        if answer.status != 200 {
            return BTreeSet::new();
        }
        schema::objects_with(&body, "provider_id")
            .into_iter()
            .filter_map(|identity| identity["provider_id"].as_str().map(str::to_string))
            .collect()
    };
    let before = listed(run.list(&user, "").await);
    let mut deleted = 0;
    let mut problems = Vec::new();
    for provider in before.union(&tried) {
        match run.delete(&user, provider).await {
            Ok(answer) if answer.status == 200 => deleted += 1,
            Ok(answer) if answer.status == 404 && !before.contains(provider) => {}
            Ok(answer) => problems.push(format!(
                "cannot delete the link of {user} to {provider}: {}",
                answer.describe()
            )),
            Err(Stop::Fail(why) | Stop::Skip(why)) => problems.push(format!(
                "cannot delete the link of {user} to {provider}: {why}"
            )),
        }
    }
    if deleted > 0 {
        for provider in listed(run.list(&user, "").await) {
            problems.push(format!(
                "the link of {user} to {provider} is still listed after its delete"
            ));
        }
    }
    (deleted, problems)
}
