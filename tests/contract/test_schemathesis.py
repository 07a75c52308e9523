"""Contract fuzzing: README.md's schemathesis recipe against the live binary.

The recipe as README.md gives it (DEV, RESET and RECIPE below; a test holds
them equal): `linkid dev` with tests/contract/linkid-test.toml (on a free
loopback port, the binary from $LINKID_BIN), the admin token it prints,
`POST /_dev/reset`, then schemathesis with tests/contract/schemathesis.toml
and `--checks all`: all four phases over every operation. The test adds
only --seed, where the reports go and, when asked, --max-examples. Its
stateful phase must follow every OpenAPI link of the document in that one
run: from a new link (linkIdentity 201/200) to getLinkedIdentity,
listLinkedIdentities, deleteLinkedIdentity, the login-time lookup
(searchLinkedIdentities), the change feed (listEvents) and the retry; from
a read to the delete; from a delete to the 404 and the empty lookup; along
the feed.

listEvents is always asked with wait=0 (schemathesis.toml says why), so no
case long-polls; test_event_feed.py covers long polls and the event stream.

Knobs (environment):
  LINKID_CONTRACT_MAX_EXAMPLES  --max-examples for every phase (default: the recipe's own)
  LINKID_CONTRACT_SEED          seed (default 20261129); "random" for a new one each run
  LINKID_CONTRACT_REPORT_DIR    keep schemathesis' reports and output there
"""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import OPERATIONS, REPO_ROOT, SCHEMATHESIS_CONFIG, SERVER_CONFIG, LinkidServer, run_schemathesis

MAX_EXAMPLES = os.environ.get("LINKID_CONTRACT_MAX_EXAMPLES")
SEED = os.environ.get("LINKID_CONTRACT_SEED", "20261129")

# README.md's recipe, as a reader pastes it from the repository root (on
# linkid dev's default address; the test gives it a free port).
DEV = "linkid --config tests/contract/linkid-test.toml dev --print-token"
RESET = 'curl -s -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/_dev/reset'
RECIPE = (
    "LINKID_TOKEN=$TOKEN schemathesis --config-file tests/contract/schemathesis.toml "
    "run --checks all http://127.0.0.1:8080/openapi.json"
)


def recipe_args() -> list[str]:
    """The recipe's arguments after `run` and before the URL."""
    return RECIPE.split(" run ")[1].split(" http")[0].split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("schemathesis-server")
    srv = LinkidServer(workdir, key_file=workdir / "root.key", config=SERVER_CONFIG, dev=True)
    with srv:
        yield srv
    assert srv.exit_code == 0, f"linkid dev did not exit 0 on SIGTERM:\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def document(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("LINKID_CONTRACT_REPORT_DIR")
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("schemathesis-reports")


def ndjson_scenarios(path: Path):
    """Each finished scenario's recorder from an NDJSON event stream."""
    with open(path) as events:
        for line in events:
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if finished:
                yield finished["phase"], finished["recorder"]


def documented_links(document: dict) -> set[str]:
    """Transition ids, as schemathesis names them, for every link in the document."""
    by_id = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            by_id[operation["operationId"]] = f"{method.upper()} {path}"
    links = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for name, link in response.get("links", {}).items():
                    links.add(f"{method.upper()} {path} -> [{status}] {name} -> {by_id[link['operationId']]}")
    return links


# The links the stateful phase must follow: (from, statuses, name, to).
EXPECTED_LINKS = [
    ("linkIdentity", ("201", "200"), "GetLinkedIdentity", "getLinkedIdentity"),
    ("linkIdentity", ("201", "200"), "ListLinkedIdentities", "listLinkedIdentities"),
    ("linkIdentity", ("201", "200"), "DeleteLinkedIdentity", "deleteLinkedIdentity"),
    ("linkIdentity", ("201", "200"), "LookUpLinkedIdentity", "searchLinkedIdentities"),
    ("linkIdentity", ("201", "200"), "ListEvents", "listEvents"),
    ("linkIdentity", ("201",), "RetryLinkIdentity", "linkIdentity"),
    ("getLinkedIdentity", ("200",), "DeleteLinkedIdentity", "deleteLinkedIdentity"),
    ("deleteLinkedIdentity", ("200",), "GetLinkedIdentity", "getLinkedIdentity"),
    ("deleteLinkedIdentity", ("200",), "LookUpLinkedIdentity", "searchLinkedIdentities"),
    ("listEvents", ("200",), "NextEvents", "listEvents"),
]

def test_the_readme_gives_the_recipe_this_test_runs():
    readme = " ".join((REPO_ROOT / "README.md").read_text().replace("\\\n", " ").split())
    for command in (DEV, RESET, RECIPE):
        assert command in readme, command
    assert f"--config {SERVER_CONFIG.relative_to(REPO_ROOT)} dev" in DEV
    assert f"--config-file {SCHEMATHESIS_CONFIG.relative_to(REPO_ROOT)} run" in RECIPE


def test_document_links_and_dictionary_match_the_server(document):
    """The links the stateful phase must follow are in the served document, and
    the schemathesis dictionary names exactly the linkable providers."""
    assert documented_links(document) == {
        f"{OPERATIONS[source]} -> [{status}] {name} -> {OPERATIONS[target]}"
        for source, statuses, name, target in EXPECTED_LINKS
        for status in statuses
    }
    server_config = tomllib.loads(SERVER_CONFIG.read_text())
    linkable = [p["id"] for p in server_config["identity_providers"] if p.get("linkable", True)]
    st_config = tomllib.loads(SCHEMATHESIS_CONFIG.read_text())
    assert st_config["dictionaries"]["providers"]["values"] == linkable


class Pass:
    """One schemathesis run and what it did, from its JSON and NDJSON reports."""

    def __init__(self, name: str, result: subprocess.CompletedProcess, report: dict, reports: Path) -> None:
        self.name = name
        self.result = result
        self.report = report
        self.output = result.stdout[-12000:]
        # Responses by operation and status, and the links the stateful phase followed.
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.links_followed: collections.Counter = collections.Counter()
        self.queries: dict[str, list[dict]] = collections.defaultdict(list)
        # Test cases of the examples phase, by operation.
        self.example_cases: collections.Counter = collections.Counter()
        self.requests = 0
        # The operation each stateful scenario began with.
        self.scenario_starts: collections.Counter = collections.Counter()
        self.stateful_scenarios = 0
        for phase, recorder in ndjson_scenarios(reports / f"{name}.ndjson"):
            cases = list(recorder.get("cases", {}).values())
            self.stateful_scenarios += phase == "stateful"
            if phase == "stateful" and cases:
                first = cases[0]["value"]
                self.scenario_starts[f"{first['method']} {first['path']}"] += 1
            for case_id, node in recorder.get("cases", {}).items():
                case = node["value"]
                if phase == "examples":
                    self.example_cases[f"{case['method']} {case['path']}"] += 1
                interaction = recorder.get("interactions", {}).get(case_id)
                if interaction and interaction.get("response"):
                    self.requests += 1
                    label = f"{case['method']} {case['path']}"
                    self.statuses[label][interaction["response"]["status_code"]] += 1
                    self.queries[label].append(interaction["request"]["uri"])
                transition = node.get("transition")
                if phase == "stateful" and transition and node.get("is_transition_applied"):
                    self.links_followed[transition["id"]] += 1

    def query_values(self, label: str, name: str) -> list[str]:
        """Every value of query parameter `name` sent to an operation."""
        return [
            value
            for uri in self.queries[label]
            for key, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(uri).query, keep_blank_values=True)
            if key == name
        ]

    def describe(self) -> str:
        cases = self.report["test_cases"]
        return (
            f"{self.name}: {cases['generated']} test cases generated, {cases['with_failures']} with failures, "
            f"{cases['errored']} errored, {cases['without_checks']} skipped without checks; "
            f"{self.requests} requests; seed {self.report['seed']}; {self.report['running_time']:.1f}s"
        )

    def assert_clean(self, phases: tuple[str, ...]) -> None:
        report, output = self.report, self.output
        assert self.result.returncode == 0 and report["exit_code"] == 0, f"schemathesis failed:\n{output}"
        assert report["complete"] and report["stop_reason"] == "completed", output
        assert report["failures"] == [], output
        assert report["errors"] == [], output
        for phase in phases:
            assert report["phases"][phase]["status"] == "success", (phase, report["phases"][phase], output)
        # Warnings mean part of the document could not be used (an unsupported
        # regex, a dangling $ref, ...): contract defects too.
        warnings = {kind: found for kind, found in report["warnings"].items() if found}
        assert warnings == {}, f"schemathesis warnings: {warnings}\n{output}"


ALL_PHASES = ("examples", "coverage", "fuzzing", "stateful")
# Statuses the main pass must reach on each operation: more than its 400s.
REACHED = {
    "listIdentityProviders": (200,),
    "listLinkedIdentities": (200, 400),
    "linkIdentity": (201, 200, 400, 409),
    "getLinkedIdentity": (200, 404),
    "deleteLinkedIdentity": (200, 404),
    "searchLinkedIdentities": (200, 400),
    "listEvents": (200, 400),
}


def test_schemathesis_finds_no_contract_violation(server, document, report_dir, summary):
    """README.md's recipe: no failure, the interesting statuses reached, and
    its stateful phase, starting scenarios at linkIdentity, follows every
    link of the document."""
    reset = urllib.request.Request(
        f"{server.url}/_dev/reset", method="POST", headers={"Authorization": f"Bearer {server.admin_token}"}
    )
    with urllib.request.urlopen(reset, timeout=10) as answer:
        assert answer.status == 204
    args = recipe_args()
    if MAX_EXAMPLES:
        args += ["--max-examples", MAX_EXAMPLES]
    if SEED != "random":
        args += ["--seed", SEED]
    result, report = run_schemathesis(f"{server.url}/openapi.json", server.admin_token, report_dir, "contract", *args)
    main = Pass("contract", result, report, report_dir)
    links = documented_links(document)
    try:
        main.assert_clean(ALL_PHASES)
        assert main.report["operations"]["selected"] == main.report["operations"]["tested"] == len(OPERATIONS), main.output
        assert main.report["test_cases"]["generated"] >= 10 * len(OPERATIONS), main.output
        # The run reached the interesting paths, not only the 400s.
        for operation, statuses in REACHED.items():
            seen = main.statuses[OPERATIONS[operation]]
            for status in statuses:
                assert seen[status] > 0, f"{operation} never answered {status}: {dict(seen)}"
        # The examples phase found examples for every operation that takes
        # any input (listIdentityProviders takes none, so it has none to find).
        for operation, label in OPERATIONS.items():
            if operation != "listIdentityProviders":
                assert main.example_cases[label] > 0, f"no examples for {operation}: {dict(main.example_cases)}"
        # No case long-polled: every listEvents request asked with wait=0.
        waits = main.query_values(OPERATIONS["listEvents"], "wait")
        assert waits and set(waits) == {"0"}, collections.Counter(waits)
        # Stateful scenarios start at linkIdentity, and follow every link of
        # the document, and no link schemathesis guessed (inference is off):
        # what its "API Links" line says, too.
        assert main.scenario_starts[OPERATIONS["linkIdentity"]] > 0, dict(main.scenario_starts)
        if not MAX_EXAMPLES:
            # The whole budget ran: each scenario began from the same data
            # (hooks.py resets it), else Hypothesis ends the phase at the
            # first replay that takes another path, a few dozen scenarios in.
            budget = tomllib.loads(SCHEMATHESIS_CONFIG.read_text())["phases"]["stateful"]["generation"]["max-examples"]
            assert main.stateful_scenarios >= budget, (main.stateful_scenarios, budget)
        missing = sorted(link for link in links if not main.links_followed[link])
        assert not missing, f"the stateful phase never followed {missing}; followed: {dict(main.links_followed)}"
        assert set(main.links_followed) == links, set(main.links_followed) - links
        n = len(links)
        assert f"API Links:    {n} covered / {n} selected / {n} total\n" in main.result.stdout, main.output
    finally:
        summary.append(
            f"schemathesis {main.report['schemathesis_version']} (README recipe), --max-examples {MAX_EXAMPLES or 'as configured'}: "
            f"{main.report['test_cases']['generated']} test cases, {main.report['test_cases']['with_failures']} with failures"
        )
        summary.append("  " + main.describe())
        for label, counter in sorted(main.statuses.items()):
            if label in OPERATIONS.values():
                summary.append(f"  contract {label}: " + ", ".join(f"{s}x{n}" for s, n in sorted(counter.items())))
        summary.append(
            f"  stateful: {main.stateful_scenarios} scenarios; "
            f"links: {sum(1 for link in links if main.links_followed[link])} of {len(links)} followed; "
            "scenarios start at " + ", ".join(f"{label} {n}x" for label, n in main.scenario_starts.most_common())
        )
        for link_id in sorted(links):
            summary.append(f"  stateful link {link_id}: followed {main.links_followed[link_id]}x")
        summary.append(f"  reports and output: {report_dir}")
        (report_dir / "summary.txt").write_text("\n".join(summary) + "\n")


def test_schemathesis_catches_a_broken_contract(server, document, report_dir, tmp_path):
    """The same harness fails when the document and the server disagree: a
    document that requires a response field the server never sends, and that
    leaves out a status the server does send."""
    broken = copy.deepcopy(document)
    identity = broken["components"]["schemas"]["LinkedIdentity"]
    identity["properties"]["etag"] = {"type": "string"}
    identity["required"].append("etag")
    del broken["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["get"]["responses"]["400"]
    location = tmp_path / "broken-openapi.json"
    location.write_text(json.dumps(broken))

    result, report = run_schemathesis(
        str(location), server.admin_token, report_dir, "broken",
        "--url", server.url,
        "--checks", "all",
        "--phases", "coverage,fuzzing",
        "--include-operation-id", "linkIdentity",
        "--include-operation-id", "listLinkedIdentities",
        "--max-examples", "30",
        "--seed", "1",
    )
    assert result.returncode != 0, result.stdout[-5000:]
    found = {(f["code"], op) for f in report["failures"] for op in f["operations"]}
    assert ("ST108", OPERATIONS["linkIdentity"]) in found, found  # response violates schema
    assert ("ST103", OPERATIONS["listLinkedIdentities"]) in found, found  # undocumented status
