"""Contract fuzzing: schemathesis against the live binary, every check, every phase.

One server (fresh temp dir for its database and key, free loopback port,
the binary from $LINKID_BIN) and one admin token from `linkid token mint
--admin`. Schemathesis loads the document the server serves at
/openapi.json and runs, for all four operations, its examples, coverage,
fuzzing and stateful phases with `--checks all`. The stateful phase follows
the document's own OpenAPI links (linkIdentity 201/200 -> listLinkedIdentities,
deleteLinkedIdentity).

Knobs (environment):
  LINKID_CONTRACT_MAX_EXAMPLES  test cases per operation and phase (default 75)
  LINKID_CONTRACT_SEED          seed (default 20261129); "random" for a new one each run
  LINKID_CONTRACT_REPORT_DIR    keep schemathesis' reports and output there
"""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from harness import SCHEMATHESIS_CONFIG, SERVER_CONFIG, LinkidServer, base_env

MAX_EXAMPLES = int(os.environ.get("LINKID_CONTRACT_MAX_EXAMPLES", "75"))
SEED = os.environ.get("LINKID_CONTRACT_SEED", "20261129")
RUN_TIMEOUT_S = 420

OPERATIONS = {
    "listIdentityProviders": "GET /api/admin/users/v4/users/identity-providers",
    "listLinkedIdentities": "GET /api/admin/users/v4/users/{user_id}/linked-identities",
    "linkIdentity": "POST /api/admin/users/v4/users/{user_id}/linked-identities",
    "deleteLinkedIdentity": "DELETE /api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("schemathesis-server")
    srv = LinkidServer(workdir, key_file=workdir / "root.key")
    # The first command generates the key file; the server then loads it.
    srv.admin_token = srv.mint("--admin")
    assert srv.key_file.is_file()
    with srv:
        yield srv
    assert srv.exit_code == 0, f"linkid did not exit 0 on SIGTERM:\n{srv.log_tail()}"


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


def run_schemathesis(location: str, token: str, reports: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the schemathesis CLI; returns the process and its JSON report."""
    json_report = reports / f"{name}.json"
    for stale in reports.glob(f"{name}.*"):
        stale.unlink()
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(SCHEMATHESIS_CONFIG),
        "run", location,
        "--no-color",
        "--generation-database", "none",
        "--request-timeout", "10",
        "--report", "json,ndjson,junit",
        "--report-json-path", str(json_report),
        "--report-ndjson-path", str(reports / f"{name}.ndjson"),
        "--report-junit-path", str(reports / f"{name}.junit.xml"),
        *args,
    ]
    env = base_env()
    env["LINKID_TOKEN"] = token
    env["COLUMNS"] = "160"
    result = subprocess.run(
        command,
        env=env,
        cwd=reports,  # anything schemathesis writes on its own lands here
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    (reports / f"{name}.out").write_text(result.stdout + result.stderr)
    if not json_report.is_file():
        pytest.fail(f"schemathesis wrote no report (exit {result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result, json.loads(json_report.read_text())


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


def test_document_links_and_dictionary_match_the_server(document):
    """The links the stateful phase must follow are in the served document, and
    the schemathesis dictionary names exactly the linkable providers."""
    link = OPERATIONS["linkIdentity"]
    assert documented_links(document) == {
        f"{link} -> [{status}] {name} -> {OPERATIONS[target]}"
        for status in ("201", "200")
        for name, target in (
            ("ListLinkedIdentities", "listLinkedIdentities"),
            ("DeleteLinkedIdentity", "deleteLinkedIdentity"),
        )
    }
    server_config = tomllib.loads(SERVER_CONFIG.read_text())
    linkable = [p["id"] for p in server_config["identity_providers"] if p.get("linkable", True)]
    st_config = tomllib.loads(SCHEMATHESIS_CONFIG.read_text())
    assert st_config["dictionaries"]["providers"]["values"] == linkable


def test_schemathesis_finds_no_contract_violation(server, document, report_dir, summary):
    args = [
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES),
    ]
    if SEED != "random":
        args += ["--seed", SEED]
    result, report = run_schemathesis(
        f"{server.url}/openapi.json", server.admin_token, report_dir, "contract", *args
    )
    output = result.stdout[-12000:]

    cases = report["test_cases"]
    # What the run did, by operation and status, from the recorded interactions.
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    links_followed: collections.Counter = collections.Counter()
    requests = 0
    for phase, recorder in ndjson_scenarios(report_dir / "contract.ndjson"):
        for case_id, node in recorder.get("cases", {}).items():
            case = node["value"]
            interaction = recorder.get("interactions", {}).get(case_id)
            if interaction and interaction.get("response"):
                requests += 1
                statuses[f"{case['method']} {case['path']}"][interaction["response"]["status_code"]] += 1
            transition = node.get("transition")
            if phase == "stateful" and transition and node.get("is_transition_applied"):
                links_followed[transition["id"]] += 1

    summary.append(
        f"schemathesis {report['schemathesis_version']} (seed {report['seed']}, --max-examples {MAX_EXAMPLES}, "
        f"--checks all, phases examples+coverage+fuzzing+stateful): "
        f"{cases['generated']} test cases generated, {cases['with_failures']} with failures, "
        f"{cases['errored']} errored, {cases['without_checks']} skipped without checks; "
        f"{requests} requests recorded; {report['running_time']:.1f}s"
    )
    for label, counter in sorted(statuses.items()):
        summary.append(f"  {label}: " + ", ".join(f"{s}x{n}" for s, n in sorted(counter.items())))
    for link_id in sorted(documented_links(document)):
        summary.append(f"  stateful link {link_id}: followed {links_followed[link_id]}x")
    summary.append(f"  reports: {report_dir}")

    assert result.returncode == 0 and report["exit_code"] == 0, f"schemathesis failed:\n{output}"
    assert report["complete"] and report["stop_reason"] == "completed", output
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert report["operations"]["selected"] == report["operations"]["tested"] == len(OPERATIONS), output
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        assert report["phases"][phase]["status"] == "success", (phase, report["phases"][phase], output)
    # Warnings that mean part of the document could not be used (an unsupported
    # regex, a dangling $ref, ...) are contract defects too.
    warnings = {kind: found for kind, found in report["warnings"].items() if found}
    assert warnings == {}, f"schemathesis warnings: {warnings}\n{output}"
    assert cases["generated"] >= 10 * len(OPERATIONS), output

    # The run reached the interesting paths, not only the 400s.
    link_statuses = statuses[OPERATIONS["linkIdentity"]]
    for status in (201, 200, 400, 409):
        assert link_statuses[status] > 0, f"linkIdentity never answered {status}: {dict(link_statuses)}"
    delete_statuses = statuses[OPERATIONS["deleteLinkedIdentity"]]
    for status in (200, 404):
        assert delete_statuses[status] > 0, f"deleteLinkedIdentity never answered {status}: {dict(delete_statuses)}"
    # The stateful phase followed the document's links out of a new link.
    for link_id in documented_links(document):
        if "-> [201]" in link_id:
            assert links_followed[link_id] > 0, f"stateful phase never followed {link_id}: {dict(links_followed)}"


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
