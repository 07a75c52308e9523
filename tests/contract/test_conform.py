"""`linkid conform` judging a server that is not linkid: broken_server.py.

Each variant of that server breaks one promise of the seed text, and
`linkid conform --level seed` must fail exactly the check that names the
promise (and no other); the correct variant, whose bodies and errors have
other shapes than linkid's, must pass `seed` and fail `full`. Also: an
expected failure becomes `xfail`, the JUnit report parses, and a run stopped
by Ctrl-C still deletes the links it made.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import base_env, free_port, linkid_binary

HERE = Path(__file__).resolve().parent
STUB = HERE / "broken_server.py"
sys.path.insert(0, str(HERE))
from broken_server import VARIANTS  # noqa: E402

TOKEN = "stub-token-0123456789"
SEED_CHECKS = 11


class Stub:
    """One broken_server.py process on a free port."""

    def __init__(self, variant: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(STUB), "--port", str(self.port), "--token", TOKEN, "--variant", variant],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.process.stdout.readline()
        assert "listening" in line, f"the stub did not start: {line}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stub/links", timeout=5) as answer:
            return json.load(answer)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def stub(request):
    server = Stub(request.param)
    yield server
    server.stop()


def conform(url: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `linkid conform URL ARGS...` with the stub's token in the environment."""
    environment = base_env()
    environment["LINKID_CONFORM_TOKEN"] = TOKEN
    environment.update(env or {})
    return subprocess.run(
        [str(linkid_binary()), "conform", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def failed_ids(stdout: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("FAIL ")]


@pytest.mark.parametrize("stub", ["correct"], indirect=True)
def test_the_correct_stub_passes_seed_with_other_shapes_and_leaves_nothing(stub: Stub) -> None:
    result = conform(stub.url, "--level", "seed")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"{SEED_CHECKS} passed, 0 failed, 0 skipped"
    assert all(line.startswith("ok ") for line in lines[:-1]), result.stdout
    assert stub.state()["links"] == []
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("stub", ["correct"], indirect=True)
def test_the_correct_stub_fails_full_where_it_is_not_linkid(stub: Stub) -> None:
    result = conform(stub.url)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = failed_ids(result.stdout)
    # Its errors are not problem details with linkid's codes.
    assert "links.user-already-linked" in failed
    assert "errors.problem-details" in failed
    assert stub.state()["links"] == []


@pytest.mark.parametrize(
    "stub,check",
    [(variant, check) for variant, check in VARIANTS.items() if check],
    indirect=["stub"],
)
def test_each_broken_variant_fails_exactly_the_check_of_its_bug(stub: Stub, check: str) -> None:
    result = conform(stub.url, "--level", "seed")
    assert result.returncode == 1, result.stdout + result.stderr
    assert failed_ids(result.stdout) == [check], result.stdout
    assert ", 1 failed, " in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("stub", ["retry-201"], indirect=True)
def test_an_expected_failure_is_an_xfail_and_exits_0(stub: Stub, tmp_path: Path) -> None:
    expected = tmp_path / "expected-failures.txt"
    expected.write_text("# this server answers a retry with 201\nlinks.retry\nlinks.delete  # passes: xpass\n")
    result = conform(stub.url, "--level", "seed", "--expected-failures", str(expected))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "xfail links.retry" in lines
    assert "xpass links.delete" in lines
    assert lines[-1] == f"{SEED_CHECKS} passed, 0 failed, 0 skipped"


@pytest.mark.parametrize("stub", ["delete-wrong-type"], indirect=True)
def test_the_junit_report_parses_with_one_testcase_a_check(stub: Stub, tmp_path: Path) -> None:
    report = tmp_path / "conform.xml"
    result = conform(stub.url, "--level", "seed", "--junit", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    suites = ET.parse(report).getroot()
    cases = suites.findall("./testsuite/testcase")
    assert len(cases) == SEED_CHECKS
    failed = [case.get("name") for case in cases if case.find("failure") is not None]
    assert failed == ["links.delete"]
    assert "$.linked_user_id" in cases[-1].find("failure").get("message")
    assert suites.get("failures") == "1"


@pytest.mark.parametrize("stub", ["embed-hangs"], indirect=True)
def test_ctrl_c_stops_the_run_and_still_deletes_its_links(stub: Stub) -> None:
    environment = base_env()
    environment["LINKID_CONFORM_TOKEN"] = TOKEN
    process = subprocess.Popen(
        [str(linkid_binary()), "conform", stub.url, "--level", "seed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        deadline = time.monotonic() + 30
        while stub.state()["hanging"] == 0:
            assert time.monotonic() < deadline, "conform never reached links.embed-actions"
            time.sleep(0.05)
        assert stub.state()["links"], "links.create and links.retry left links to clean up"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stdout + stderr
    assert "stopped by SIGINT" in stderr
    assert "passed" not in stdout
    assert stub.state()["links"] == []


@pytest.mark.parametrize("stub", ["providers-huge"], indirect=True)
def test_a_body_past_4_mib_is_not_read_and_the_run_exits_2_saying_so(stub: Stub) -> None:
    result = conform(stub.url, "--level", "seed")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "began an answer to the provider list, but its body is larger than 4 MiB" in result.stderr
    assert result.stdout == ""


def test_an_unreachable_server_exits_2_saying_so() -> None:
    result = conform(f"http://127.0.0.1:{free_port()}", "--level", "seed")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("stub", ["correct"], indirect=True)
def test_a_refused_token_and_no_token_exit_2_saying_so(stub: Stub) -> None:
    refused = conform(stub.url, env={"LINKID_CONFORM_TOKEN": "not-the-stub-token"})
    assert refused.returncode == 2
    assert "refused the token" in refused.stderr
    missing = conform(stub.url, env={"LINKID_CONFORM_TOKEN": ""})
    assert missing.returncode == 2
    assert "no token" in missing.stderr
    assert stub.state()["links"] == []
