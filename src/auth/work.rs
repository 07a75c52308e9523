//! The most work a token's datalog could make, worked out before it runs.
//!
//! biscuit-auth checks its time limit only between rule iterations and
//! between check queries, never inside one. Inside one rule application
//! (`CombineIt`) it joins the body's predicates by nested loops: for every
//! fact matching the first predicate it scans *every* fact for the second,
//! and so on, and evaluates the rule's expressions on every complete match.
//! A rule joining five predicates over 30 facts is 24 million matches in a
//! single iteration, out of reach of any limit the authorizer checks. So
//! each rule, check and policy is priced here from the token's contents,
//! and a token whose price is over [`WORK_BUDGET`] is refused unrun.
//!
//! Prices are upper bounds: a predicate is counted as matching every fact
//! of its name and arity whose constants agree, joins on shared variables
//! are assumed to filter nothing, and strings and collections are as long
//! as the longest in the token.

use std::collections::HashMap;

use biscuit_auth::builder::{Binary, Check, Fact, MapKey, Op, Predicate, Rule, Term};

/// The most steps one authorization may take. A step is one fact visited by
/// a join or one expression operation: joins of 2 to 5 predicates over 10 to
/// 300 facts ran at 65-98 ns a step in a release build on a 2-core machine,
/// so the budget is about 20 ms of one core. Honest tokens are far below: a
/// `linkid token mint` token is under 100 steps, and one with several
/// attenuation blocks and a third-party block a few hundred.
pub(crate) const WORK_BUDGET: u64 = 250_000;

/// Authorizations up to this many steps (about 75 µs) run where the request
/// runs: a hop to the blocking pool would cost about as much.
pub(crate) const INLINE_WORK: u64 = 1_000;

/// Bytes of string work (copying, comparing, searching) that cost one step.
const BYTES_PER_STEP: u64 = 256;

/// One `matches` evaluation: compiling a tame pattern (see [`is_tame_regex`])
/// and running it over a 16 KiB string took at most 1.5 ms in a release
/// build (256 `.`s); this is about 1.9 ms.
const REGEX_STEPS: u64 = 25_000;

/// The string length [`REGEX_STEPS`] covers; longer strings cost in proportion.
const REGEX_STRING_BYTES: u64 = 16 * 1024;

/// The longest regular expression priced; longer ones are refused.
const REGEX_MAX_BYTES: usize = 256;

/// Work too large to price: the token is refused.
const UNBOUNDED: u64 = u64::MAX;

/// What the server's authorizer adds to every run besides the token.
pub(crate) struct ServerSide {
    /// Facts the server provides (at most one each, arity 1), by name.
    pub facts: Vec<&'static str>,
    /// The longest string those facts can hold, in bytes.
    pub fact_string_bytes: u64,
    /// The queries of the server's policies.
    pub queries: Vec<Rule>,
    /// The run's fact limit: rules cannot derive more facts than this.
    pub max_facts: u64,
    /// The run's iteration limit.
    pub max_iterations: u64,
}

/// A token's datalog, sized and priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Estimate {
    /// Facts in all its blocks.
    pub facts: usize,
    /// Rules and check queries (each alternative of a check's `or`).
    pub rules: usize,
    /// The most steps one authorization can take.
    pub work: u64,
    /// The most steps its time-only checks can take alone (the expiry test).
    pub expiry_work: u64,
    /// Roughly how many bytes the parsed token holds in memory.
    pub heap_bytes: u64,
}

impl Estimate {
    /// Prices a token from its facts, rules and checks (as
    /// `Authorizer::dump` lists them); `expiry` are its time-only checks and
    /// `text_bytes` the length of its base64 text.
    pub(crate) fn of(
        facts: &[Fact],
        rules: &[Rule],
        checks: &[Check],
        expiry: &[&Check],
        text_bytes: usize,
        server: &ServerSide,
    ) -> Estimate {
        let queries = checks.iter().flat_map(|c| &c.queries);
        let world = World::new(facts, rules, queries.clone(), server);
        let query_work = queries
            .clone()
            .chain(&server.queries)
            .map(|q| world.query_work(q))
            .fold(0, u64::saturating_add);
        let rule_work = rules
            .iter()
            .map(|r| world.query_work(r))
            .fold(0, u64::saturating_add)
            .saturating_mul(world.iterations);
        let expiry_world = World::time_only(&world);
        let expiry_work = expiry
            .iter()
            .flat_map(|c| &c.queries)
            .map(|q| expiry_world.query_work(q))
            .fold(0, u64::saturating_add);
        let rule_count = rules.len() + queries.clone().count();
        let mut size = Size::default();
        facts.iter().for_each(|f| size.predicate(&f.predicate));
        rules.iter().chain(queries).for_each(|r| size.rule(r));
        // Every run first loads the token into a fresh authorizer.
        let load_work = size.predicates + size.terms + size.ops;
        Estimate {
            facts: facts.len(),
            rules: rule_count,
            work: load_work
                .saturating_add(rule_work)
                .saturating_add(query_work),
            expiry_work,
            heap_bytes: size.heap_bytes(text_bytes, facts.len(), rule_count),
        }
    }
}

/// Predicates by name and arity.
type Key<'a> = (&'a str, usize);

/// What a run can hold, as far as prices go.
struct World<'a> {
    /// The token's facts, by predicate.
    stored: HashMap<Key<'a>, Vec<&'a [Term]>>,
    /// The server's facts, by predicate.
    provided: HashMap<Key<'a>, u64>,
    /// How many facts rules can derive, by predicate.
    derived: HashMap<Key<'a>, u64>,
    /// All facts a join can scan.
    total: u64,
    /// How many times the rules run.
    iterations: u64,
    /// The longest string or byte array, in bytes.
    longest_string: u64,
    /// The most elements in a set, array or map (nested ones included).
    largest_collection: u64,
}

impl<'a> World<'a> {
    fn new(
        facts: &'a [Fact],
        rules: &'a [Rule],
        queries: impl Iterator<Item = &'a Rule>,
        server: &'a ServerSide,
    ) -> World<'a> {
        let mut stored: HashMap<Key<'a>, Vec<&'a [Term]>> = HashMap::new();
        for fact in facts {
            let p = &fact.predicate;
            stored.entry(key(p)).or_default().push(&p.terms);
        }
        let provided = server.facts.iter().map(|name| ((*name, 1), 1)).collect();
        let mut terms = TermBounds::default();
        for fact in facts {
            terms.all(&fact.predicate.terms);
        }
        for rule in rules.iter().chain(queries) {
            terms.rule(rule);
        }
        let mut world = World {
            stored,
            provided,
            derived: HashMap::new(),
            total: 0,
            iterations: 1,
            longest_string: terms.longest_string.max(server.fact_string_bytes),
            largest_collection: terms.largest_collection,
        };
        world.derive(rules, server);
        let initial = facts.len() as u64 + server.facts.len() as u64;
        let derived = world
            .derived
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b));
        world.total = initial
            .saturating_add(derived)
            .min(server.max_facts.max(initial));
        world
    }

    /// A run holding nothing but the server's facts: how the time-only
    /// checks are tested for expiry.
    fn time_only(like: &World<'a>) -> World<'a> {
        World {
            stored: HashMap::new(),
            provided: like.provided.clone(),
            derived: HashMap::new(),
            total: like.provided.len() as u64,
            iterations: 1,
            longest_string: like.longest_string,
            largest_collection: like.largest_collection,
        }
    }

    /// Bounds what each rule can derive. Without recursion, match counts
    /// are propagated level by level until they settle, and the rules run
    /// once per level plus once to find nothing new. Rules that feed each
    /// other may add one fact per iteration: their predicates are counted at
    /// the fact limit and the rules at the iteration limit.
    fn derive(&mut self, rules: &'a [Rule], server: &ServerSide) {
        if rules.is_empty() {
            return;
        }
        if is_recursive(rules) {
            for rule in rules {
                self.derived.insert(key(&rule.head), server.max_facts);
            }
            self.iterations = server.max_iterations;
            return;
        }
        let mut counts = vec![0u64; rules.len()];
        // Settles within one round per rule, plus one.
        for round in 1..=rules.len() as u64 + 1 {
            let next: Vec<u64> = rules
                .iter()
                .map(|r| self.matches(&r.body).min(server.max_facts))
                .collect();
            self.iterations = round;
            if next == counts {
                return;
            }
            counts = next;
            self.derived.clear();
            for (rule, count) in rules.iter().zip(&counts) {
                let derived = self.derived.entry(key(&rule.head)).or_default();
                *derived = derived.saturating_add(*count).min(server.max_facts);
            }
        }
    }

    /// How many facts can match one predicate.
    fn matching(&self, predicate: &Predicate) -> u64 {
        let key = key(predicate);
        let stored = self.stored.get(&key).map_or(0, |facts| {
            facts
                .iter()
                .filter(|terms| agrees(&predicate.terms, terms))
                .count() as u64
        });
        let provided = self.provided.get(&key).copied().unwrap_or(0);
        let derived = self.derived.get(&key).copied().unwrap_or(0);
        stored.saturating_add(provided).saturating_add(derived)
    }

    /// How many complete matches a body can have.
    fn matches(&self, body: &[Predicate]) -> u64 {
        body.iter()
            .map(|p| self.matching(p))
            .fold(1, u64::saturating_mul)
    }

    /// One application of a rule or query: the nested-loop join scans every
    /// fact once per partial match of the predicates before, and each
    /// complete match evaluates the expressions and builds the head.
    fn query_work(&self, rule: &Rule) -> u64 {
        // Each fact visited copies the partial match (a map of every
        // variable of the body) and compares the predicate's terms, and so
        // does each closure call: wide rules cost more per step.
        let widest = rule.body.iter().map(|p| p.terms.len()).max().unwrap_or(0);
        let breadth = 1 + (body_variables(rule) + widest) as u64 / 8;
        let mut scanned = 0u64;
        let mut partial = 1u64;
        for predicate in &rule.body {
            scanned = scanned.saturating_add(self.total.saturating_mul(partial));
            partial = partial.saturating_mul(self.matching(predicate));
        }
        let per_match = rule
            .expressions
            .iter()
            .map(|e| self.expression_work(&e.ops, breadth))
            .fold(
                breadth + rule.head.terms.len() as u64 * (1 + self.largest_collection),
                u64::saturating_add,
            );
        scanned
            .saturating_mul(breadth)
            .saturating_add(partial.saturating_mul(per_match))
    }

    /// One evaluation of an expression in a rule of this breadth.
    fn expression_work(&self, ops: &[Op], breadth: u64) -> u64 {
        let adds = count_adds(ops);
        // Concatenation is the only way to build a longer string, and the
        // stack machine cannot reuse a result, so no string an expression
        // makes is longer than this.
        let string_bytes = self.longest_string.saturating_mul(1 + adds);
        self.ops_work(ops, string_bytes, adds, breadth)
    }

    fn ops_work(&self, ops: &[Op], string_bytes: u64, adds: u64, breadth: u64) -> u64 {
        let collection = self.largest_collection;
        let string_steps = string_bytes / BYTES_PER_STEP;
        let mut work = 0u64;
        for (i, op) in ops.iter().enumerate() {
            let step = match op {
                Op::Value(Term::Variable(_) | Term::Parameter(_)) => 1 + collection,
                Op::Value(term) => 1 + elements(term),
                Op::Unary(_) => 1,
                Op::Binary(Binary::Regex) => {
                    let pattern = match i.checked_sub(1).map(|j| &ops[j]) {
                        Some(Op::Value(Term::Str(pattern))) => Some(pattern.as_str()),
                        _ => None,
                    };
                    regex_work(pattern, string_bytes)
                }
                // Each new string is also looked up among the temporary
                // strings made before it in the same evaluation.
                Op::Binary(Binary::Add) => {
                    (1 + collection).saturating_add(string_steps.saturating_mul(1 + adds))
                }
                Op::Binary(Binary::Contains | Binary::Prefix | Binary::Suffix) => {
                    (1 + collection).saturating_add(string_steps)
                }
                Op::Binary(_) => 1 + collection,
                Op::Closure(_, body) => collection
                    .max(1)
                    .saturating_mul(self.ops_work(body, string_bytes, adds, breadth))
                    .saturating_add(breadth),
            };
            work = work.saturating_add(step);
        }
        work
    }
}

/// Whether a body predicate can match a fact with these terms: constants
/// must be equal, variables match anything.
fn agrees(pattern: &[Term], terms: &[Term]) -> bool {
    pattern
        .iter()
        .zip(terms)
        .all(|(p, t)| matches!(p, Term::Variable(_) | Term::Parameter(_)) || p == t)
}

/// Whether some rules depend on each other's heads: peel off the rules
/// whose bodies use no head of another remaining rule until none is left.
fn is_recursive(rules: &[Rule]) -> bool {
    let mut remaining: Vec<&Rule> = rules.iter().collect();
    loop {
        let heads: Vec<Key<'_>> = remaining.iter().map(|r| key(&r.head)).collect();
        let before = remaining.len();
        remaining.retain(|r| r.body.iter().any(|p| heads.contains(&key(p))));
        if remaining.is_empty() {
            return false;
        }
        if remaining.len() == before {
            return true;
        }
    }
}

fn key(predicate: &Predicate) -> Key<'_> {
    (predicate.name.as_str(), predicate.terms.len())
}

/// How many distinct variables a rule's body binds.
fn body_variables(rule: &Rule) -> usize {
    let mut names: Vec<&str> = rule
        .body
        .iter()
        .flat_map(|p| &p.terms)
        .filter_map(|t| match t {
            Term::Variable(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

fn count_adds(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|op| match op {
            Op::Binary(Binary::Add) => 1,
            Op::Closure(_, body) => count_adds(body),
            _ => 0,
        })
        .sum()
}

/// Elements in a collection, nested ones included (0 for a scalar).
fn elements(term: &Term) -> u64 {
    match term {
        Term::Set(items) => items.iter().map(|t| 1 + elements(t)).sum(),
        Term::Array(items) => items.iter().map(|t| 1 + elements(t)).sum(),
        Term::Map(items) => items.values().map(|t| 1 + elements(t)).sum(),
        _ => 0,
    }
}

/// One `matches`: a tame constant pattern at [`REGEX_STEPS`] per 16 KiB of
/// string; any other pattern is unbounded.
fn regex_work(pattern: Option<&str>, string_bytes: u64) -> u64 {
    match pattern {
        Some(pattern) if is_tame_regex(pattern) => {
            REGEX_STEPS.saturating_mul(string_bytes.div_ceil(REGEX_STRING_BYTES).max(1))
        }
        _ => UNBOUNDED,
    }
}

/// A pattern whose compilation stays cheap: short, without counted
/// repetition (`a{1000}` multiplies the program) and without Unicode class
/// escapes (each `\w` compiles to hundreds of states: 128 of them took 42 ms).
fn is_tame_regex(pattern: &str) -> bool {
    pattern.len() <= REGEX_MAX_BYTES
        && !pattern.contains('{')
        && !pattern
            .as_bytes()
            .windows(2)
            .any(|w| w[0] == b'\\' && b"pPwWdDsSbB".contains(&w[1]))
}

/// The longest string and the largest collection among a token's terms.
#[derive(Default)]
struct TermBounds {
    longest_string: u64,
    largest_collection: u64,
}

impl TermBounds {
    fn rule(&mut self, rule: &Rule) {
        self.all(&rule.head.terms);
        for predicate in &rule.body {
            self.all(&predicate.terms);
        }
        for expression in &rule.expressions {
            self.ops(&expression.ops);
        }
    }

    fn ops(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Value(term) => self.term(term),
                Op::Closure(_, body) => self.ops(body),
                Op::Unary(_) | Op::Binary(_) => {}
            }
        }
    }

    fn all(&mut self, terms: &[Term]) {
        terms.iter().for_each(|t| self.term(t));
    }

    fn term(&mut self, term: &Term) {
        match term {
            Term::Str(s) => self.longest_string = self.longest_string.max(s.len() as u64),
            Term::Bytes(b) => self.longest_string = self.longest_string.max(b.len() as u64),
            Term::Set(items) => items.iter().for_each(|t| self.term(t)),
            Term::Array(items) => self.all(items),
            Term::Map(items) => {
                for (k, v) in items {
                    if let MapKey::Str(s) = k {
                        self.longest_string = self.longest_string.max(s.len() as u64);
                    }
                    self.term(v);
                }
            }
            _ => {}
        }
        self.largest_collection = self.largest_collection.max(elements(term));
    }
}

/// Counts of what a parsed token allocates.
#[derive(Default)]
struct Size {
    predicates: u64,
    terms: u64,
    ops: u64,
}

impl Size {
    fn predicate(&mut self, predicate: &Predicate) {
        self.predicates += 1;
        self.terms += predicate.terms.iter().map(|t| 1 + elements(t)).sum::<u64>();
    }

    fn rule(&mut self, rule: &Rule) {
        self.predicate(&rule.head);
        rule.body.iter().for_each(|p| self.predicate(p));
        for expression in &rule.expressions {
            self.ops += count_ops(&expression.ops);
        }
    }

    /// Measured with a counting allocator on tokens of one shape each
    /// (a plain token: 7 KB; 100 small facts: 24 KB; 200 check queries:
    /// 110 KB; a 1,000-element set: 44 KB; a 10 KB string: 37 KB); this
    /// formula is at or above every one of them.
    fn heap_bytes(&self, text_bytes: usize, facts: usize, rules: usize) -> u64 {
        6 * 1024
            + 3 * text_bytes as u64
            + 160 * facts as u64
            + 480 * rules as u64
            + 64 * (self.predicates + self.ops)
            + 32 * self.terms
    }
}

fn count_ops(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|op| match op {
            Op::Closure(_, body) => 1 + count_ops(body),
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use biscuit_auth::builder::Policy;
    use biscuit_auth::builder_ext::BuilderExt;
    use biscuit_auth::{Biscuit, BlockBuilder, KeyPair};
    use std::time::{Duration, SystemTime};

    fn server() -> ServerSide {
        let policies = [
            r#"allow if role("admin")"#,
            "allow if operation($op), right($op)",
            "deny if true",
        ];
        ServerSide {
            facts: vec!["operation", "user", "provider", "time"],
            fact_string_bytes: 1024,
            queries: policies
                .iter()
                .flat_map(|p| Policy::try_from(*p).unwrap().queries)
                .collect(),
            max_facts: 1256,
            max_iterations: 100,
        }
    }

    fn minted() -> Biscuit {
        Biscuit::builder()
            .code(
                r#"right("identity_providers:list"); right("linked_identities:list");
                   right("linked_identities:create"); right("linked_identities:delete");
                   check if user("u-42") or operation("identity_providers:list");"#,
            )
            .unwrap()
            .check_expiration_date(SystemTime::now() + Duration::from_secs(3600))
            .build(&KeyPair::new())
            .unwrap()
    }

    fn estimate(token: &Biscuit) -> Estimate {
        let (facts, rules, checks, _) = token.authorizer().unwrap().dump();
        let expiry: Vec<&Check> = checks
            .iter()
            .filter(|c| crate::auth::check_is_time_only(c))
            .collect();
        Estimate::of(&facts, &rules, &checks, &expiry, 600, &server())
    }

    fn with_block(code: &str) -> Estimate {
        estimate(
            &minted()
                .append(BlockBuilder::new().code(code).unwrap())
                .unwrap(),
        )
    }

    fn join(facts: usize, width: usize) -> String {
        let facts: String = (0..facts).map(|i| format!("f({i});")).collect();
        let body: Vec<String> = (0..width).map(|v| format!("f($v{v})")).collect();
        let sum: Vec<String> = (0..width).map(|v| format!("$v{v}")).collect();
        format!(
            "{facts} g($v0) <- {}, {} == 1000;",
            body.join(", "),
            sum.join(" + ")
        )
    }

    #[test]
    fn a_minted_token_is_cheap_enough_to_run_inline() {
        let estimate = estimate(&minted());
        assert_eq!((estimate.facts, estimate.rules), (4, 3));
        assert!(estimate.work <= INLINE_WORK, "{estimate:?}");
        assert!(estimate.expiry_work < 100, "{estimate:?}");
    }

    #[test]
    fn honest_attenuations_stay_far_below_the_budget() {
        let estimate = with_block(
            r#"check if user("u-42");
               check if operation($op), ["linked_identities:list", "identity_providers:list"].contains($op);
               check if time($t), $t < 2999-01-01T00:00:00Z;
               check if user($u), $u.starts_with("u-"), $u.matches("^u-[0-9]+$");
               group("support"); group("tier-2");"#,
        );
        assert!(estimate.work < WORK_BUDGET / 5, "{estimate:?}");
    }

    #[test]
    fn a_five_way_join_over_thirty_facts_is_over_the_budget() {
        let estimate = with_block(&join(30, 5));
        assert!(estimate.work > 100 * WORK_BUDGET, "{estimate:?}");
    }

    #[test]
    fn a_two_way_join_over_thirty_facts_is_within_the_budget_but_not_inline() {
        let estimate = with_block(&join(30, 2));
        assert!(
            estimate.work > INLINE_WORK && estimate.work < WORK_BUDGET,
            "{estimate:?}"
        );
    }

    #[test]
    fn recursive_rules_are_counted_at_the_limits() {
        let acyclic = with_block("e(1, 2); e(2, 3); p($a, $b) <- e($a, $b);");
        let recursive = with_block(
            "e(1, 2); e(2, 3); p($a, $b) <- e($a, $b); p($a, $c) <- p($a, $b), e($b, $c);",
        );
        assert!(acyclic.work < 1_000, "{acyclic:?}");
        assert!(recursive.work > WORK_BUDGET, "{recursive:?}");
    }

    #[test]
    fn wild_regular_expressions_are_unbounded() {
        for pattern in [r"^u-\\w+", "a{1000}", &"a".repeat(300)] {
            let estimate = with_block(&format!(r#"check if user($u), $u.matches("{pattern}");"#));
            assert_eq!(estimate.work, UNBOUNDED, "{pattern}");
        }
        let computed = with_block(r#"check if user($u), $u.matches($u + "x");"#);
        assert_eq!(computed.work, UNBOUNDED);
    }

    #[test]
    fn chained_concatenation_is_priced_by_the_strings_it_builds() {
        let long = "x".repeat(4000);
        let adds = vec!["$s"; 200].join(" + ");
        let estimate = with_block(&format!(
            r#"s("{long}"); check if s($s), ({adds}).length() > 0;"#
        ));
        assert!(estimate.work > WORK_BUDGET, "{estimate:?}");
    }

    #[test]
    fn nested_closures_over_a_big_set_multiply() {
        let set: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
        let set = set.join(", ");
        let estimate = with_block(&format!(
            "check if [{set}].all($x -> [{set}].all($y -> $x + $y >= 0));"
        ));
        assert!(estimate.work > WORK_BUDGET, "{estimate:?}");
    }

    #[test]
    fn wide_rules_cost_in_proportion_to_their_variables() {
        let terms =
            |prefix: &str| -> Vec<String> { (0..400).map(|i| format!("{prefix}{i}")).collect() };
        let values = terms("").join(", ");
        let facts: String = (0..10).map(|i| format!("p({i}, {values});")).collect();
        let a = terms("$a").join(", ");
        let b = terms("$b").join(", ");
        let narrow = with_block(&format!("{facts} check all p($x, {a}), p($y, {a});"));
        let wide = with_block(&format!("{facts} check all p($x, {a}), p($y, {b});"));
        assert!(wide.work > 4 * narrow.work / 3, "{narrow:?} {wide:?}");
        assert!(wide.work > 100 * (10 + 10 * 10), "{wide:?}");
    }

    #[test]
    fn the_time_only_checks_are_priced_alone() {
        let estimate = with_block(&join(30, 5));
        assert!(estimate.expiry_work < 100, "{estimate:?}");
    }

    #[test]
    fn the_memory_estimate_grows_with_facts_and_text() {
        let small = with_block("check if true;");
        let facts: String = (0..100).map(|i| format!("f({i});")).collect();
        let many = with_block(&facts);
        assert!(small.heap_bytes >= 7 * 1024, "{small:?}");
        assert!(many.heap_bytes >= small.heap_bytes + 16 * 1024, "{many:?}");
    }
}
