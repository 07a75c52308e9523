"""Clients generated from openapi/openapi.json drive every operation and
every error code of a live linkid.

Two clients are generated at test time from the committed document:
- Python, by openapi-python-client (`linkid_client`, run in-process by
  python_steps.py);
- TypeScript, types by openapi-typescript and calls by openapi-fetch
  (typescript/steps.ts, type-checked by tsc in strict mode and run by node).

The same steps run through both against real `linkid serve` processes
(tests/contract/harness.py: loopback, a temporary directory each), in
scenarios that provoke each documented answer: the requests themselves for
the 2xx and the client errors; tokens and an Origin for 401/403; a stalled
body for 408; a blocked address for 429; a held event stream for 503
TOO_MANY_STREAMS; clients that never read big pages for 503 SERVER_BUSY;
pruned events for 410; the database file moved away for
503 STORE_UNAVAILABLE, its tables renamed for 500 INTERNAL, a full tmpfs for
507. Every call states what it expects; the test then checks that each
client met every expectation, parsed every body into the type the document
names for that status (Python), and together saw every (operation, status,
code) the document lists.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "contract"))

from harness import OPERATIONS, SERVER_CONFIG, LinkidServer  # noqa: E402

DOCUMENT = REPO / "openapi" / "openapi.json"
GENERATED = HERE / "generated"
NODE_BIN = HERE / "node_modules" / ".bin"
API = "/api/admin/users/v4"

# Documented answers no request can provoke: listIdentityProviders reads
# only the configuration, so nothing under it fails, but the document keeps
# the 500 that any operation may answer.
UNREACHABLE = {("listIdentityProviders", 500, "INTERNAL")}

CLIENTS = ("python", "typescript")


# ------------------------------------------------------------------ the clients

@pytest.fixture(scope="session")
def python_client():
    """openapi-python-client's package for the committed document."""
    target = GENERATED / "python" / "linkid_client"
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(Path(sys.executable).with_name("openapi-python-client")), "generate",
            "--path", str(DOCUMENT),
            "--config", str(HERE / "openapi-python-client.yaml"),
            "--meta", "none",
            "--output-path", str(target),
        ],
        check=True, capture_output=True, text=True,
    )
    sys.path.insert(0, str(target.parent))
    import python_steps

    return python_steps


@pytest.fixture(scope="session")
def typescript_client() -> Path:
    """openapi-typescript's types for the committed document, and the steps
    compiled against them (tsc --strict: a code that a response cannot carry
    is a compile error)."""
    GENERATED.mkdir(exist_ok=True)
    subprocess.run(
        [str(NODE_BIN / "openapi-typescript"), str(DOCUMENT), "--output", str(GENERATED / "linkid.ts")],
        check=True, capture_output=True, text=True, cwd=HERE,
    )
    compiled = subprocess.run(
        [str(NODE_BIN / "tsc"), "--project", str(HERE / "tsconfig.json")],
        capture_output=True, text=True, cwd=HERE,
    )
    assert compiled.returncode == 0, f"tsc:\n{compiled.stdout}\n{compiled.stderr}"
    return GENERATED / "js" / "typescript" / "steps.js"


@pytest.fixture(scope="session")
def run_step(python_client, typescript_client):
    """Runs one step through one client; returns its observations."""

    def run(client: str, step: str, context: dict) -> list[dict]:
        context = {**context, "prefix": f"{client[:2]}-{context.get('prefix', 'x')}"}
        if client == "python":
            observations = python_client.run(step, context)
        else:
            result = subprocess.run(
                ["node", str(typescript_client), step],
                env={**os.environ, "LINKID_STEP_CONTEXT": json.dumps(context)},
                capture_output=True, text=True, timeout=120,
            )
            assert result.returncode == 0, f"typescript {step}:\n{result.stdout}\n{result.stderr}"
            observations = json.loads(result.stdout)
        for observation in observations:
            observation.update(client=client, step=step)
        SEEN.extend(observations)
        return observations

    return run


SEEN: list[dict] = []


# ------------------------------------------------------------------ servers

def config_with(tmp: Path, extra: str) -> Path:
    """tests/contract/linkid-test.toml (the providers) plus `extra`."""
    path = tmp / "linkid.toml"
    path.write_text(SERVER_CONFIG.read_text() + "\n" + extra)
    return path


def mint_tokens(server: LinkidServer) -> dict[str, str]:
    return {
        "admin": server.mint("--admin"),
        "events_only": server.mint("--right", "events:list"),
        "providers_only": server.mint("--right", "identity_providers:list"),
        "garbage": "not-a-token",
    }


def admin_link(server: LinkidServer, tokens: dict, user: str, provider: str = "okta") -> None:
    response = requests.post(
        f"{server.url}{API}/users/{user}/linked-identities",
        json={"provider_id": provider, "linked_user_id": f"r-{user}", "linked_username": f"{user}@example.com"},
        headers={"Authorization": f"Bearer {tokens['admin']}"},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text


def wait_ready(server: LinkidServer, ready: bool = True) -> None:
    """Until /readyz says the store is (or, with False, is not) ready."""
    deadline = time.monotonic() + 10
    while (requests.get(f"{server.url}/readyz", timeout=5).status_code == 200) != ready:
        assert time.monotonic() < deadline, f"/readyz never said ready={ready}"
        time.sleep(0.05)


def every(status: int, code: str | None = None, **others) -> dict:
    """The same answer from every operation, but `others` (op=(status, code))."""
    expected = {operation: [status, code] for operation in OPERATIONS}
    expected.update({op: list(answer) for op, answer in others.items()})
    return expected


HEALTHY = every(
    200,
    linkIdentity=(201, None),
)


@pytest.fixture(scope="module")
def main_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients-main")
    server = LinkidServer(
        tmp / "server",
        key_file=tmp / "server" / "root.key",
        config=config_with(tmp, '[cors]\nallowed_origins = ["https://admin.example.com"]\n'),
        extra_env={"LINKID_SERVER__BODY_TIMEOUT_SECS": "1"},
    )
    server.tokens = mint_tokens(server)
    with server:
        yield server
    assert server.exit_code == 0, server.log_tail()


# ------------------------------------------------------------------ scenarios

@pytest.mark.parametrize("client", CLIENTS)
def test_flows_every_success_and_every_error_a_request_causes(run_step, main_server, client):
    run_step(client, "flows", {"url": main_server.url, "tokens": main_server.tokens, "prefix": "flows"})


@pytest.mark.parametrize("client", CLIENTS)
def test_credentials_and_origin_decide_401_403(run_step, main_server, client):
    srv = main_server
    context = {"url": srv.url, "tokens": srv.tokens, "prefix": "auth"}
    for name, token, headers, expected in [
        ("healthy", "admin", None, HEALTHY),
        ("no token", None, None, every(401, "UNAUTHENTICATED")),
        ("garbage token", "garbage", None, every(401, "INVALID_TOKEN")),
        ("events:list only", "events_only", None, every(403, "FORBIDDEN", listEvents=(200, None))),
        ("identity_providers:list only", "providers_only", None,
         every(403, "FORBIDDEN", listIdentityProviders=(200, None))),
        ("another origin", "admin", {"Origin": "https://evil.example"}, every(403, "CORS_FORBIDDEN")),
    ]:
        admin_link(srv, srv.tokens, f"{client[:2]}-auth-every")
        run_step(client, "every_operation", {**context, "token": token, "headers": headers, "expect": expected})


@pytest.mark.parametrize("client", CLIENTS)
def test_a_stalled_body_is_408(run_step, main_server, client):
    run_step(client, "request_timeout", {"url": main_server.url, "tokens": main_server.tokens, "pause_s": 2.5})


@pytest.mark.parametrize("client", CLIENTS)
def test_a_missing_database_file_is_503_and_broken_tables_are_500(run_step, main_server, client):
    srv = main_server
    db = srv.workdir / "linkid.db"
    context = {"url": srv.url, "tokens": srv.tokens, "prefix": "faults"}
    admin_link(srv, srv.tokens, f"{client[:2]}-faults-every")

    kept = db.with_suffix(".kept")
    os.link(db, kept)
    db.unlink()
    wait_ready(srv, False)
    try:
        run_step(client, "every_operation", {
            **context, "expect": every(503, "STORE_UNAVAILABLE", listIdentityProviders=(200, None)),
        })
    finally:
        os.link(kept, db)
        kept.unlink()
    wait_ready(srv)

    rename_tables(db, "", "_away")
    try:
        run_step(client, "every_operation", {
            **context, "expect": every(500, "INTERNAL", listIdentityProviders=(200, None)),
        })
    finally:
        rename_tables(db, "_away", "")
    run_step(client, "every_operation", {**context, "expect": HEALTHY})


def rename_tables(db: Path, old: str, new: str) -> None:
    with sqlite3.connect(db) as conn:
        for table in ("linked_identities", "events"):
            conn.execute(f"ALTER TABLE {table}{old} RENAME TO {table}{new}")


def test_a_blocked_address_gets_429_from_every_operation(run_step, tmp_path):
    server = LinkidServer(
        tmp_path / "server",
        key_file=tmp_path / "server" / "root.key",
        extra_env={
            "LINKID_RATE_LIMIT__FAILED_AUTH_PER_MINUTE": "1",
            "LINKID_RATE_LIMIT__FAILED_AUTH_BURST": "1",
        },
    )
    tokens = mint_tokens(server)
    with server:
        for _ in range(2):
            requests.get(f"{server.url}{API}/users/identity-providers", timeout=10)
        for client in CLIENTS:
            run_step(client, "every_operation", {
                "url": server.url, "tokens": tokens, "prefix": "limited", "expect": every(429, "RATE_LIMITED"),
            })


def test_a_long_poll_past_the_stream_limit_is_503(run_step, tmp_path):
    server = LinkidServer(
        tmp_path / "server",
        key_file=tmp_path / "server" / "root.key",
        extra_env={"LINKID_EVENTS__MAX_STREAMS": "1"},
    )
    tokens = mint_tokens(server)
    with server:
        with requests.get(
            f"{server.url}{API}/linked-identities/events",
            headers={"Authorization": f"Bearer {tokens['admin']}", "Accept": "text/event-stream"},
            stream=True, timeout=30,
        ) as held:
            assert held.status_code == 200
            for client in CLIENTS:
                run_step(client, "long_poll", {
                    "url": server.url, "tokens": tokens, "expect": [503, "TOO_MANY_STREAMS"],
                })


def test_big_pages_past_the_unsent_budget_are_503(run_step, tmp_path):
    """Clients that ask for big pages and never read them fill
    `server.max_unsent_bytes` (at its smallest); big pages are refused then."""
    workdir = tmp_path / "server"
    server = LinkidServer(
        workdir, key_file=workdir / "root.key", extra_env={"LINKID_SERVER__MAX_UNSENT_BYTES": str(8 * 1024 * 1024)},
    )
    tokens = mint_tokens(server)
    long = "\U0001d518" * 240
    lines = "".join(
        json.dumps({"user_id": f"u{i:05}{long}", "provider_id": "okta",
                    "linked_user_id": f"r{i:05}{long}", "linked_username": f"n{i:05}{long}"}) + "\n"
        for i in range(1000)
    )
    (tmp_path / "long.jsonl").write_text(lines)
    server.command("import", str(tmp_path / "long.jsonl"))
    page = f"GET {API}/linked-identities?limit=1000 HTTP/1.1\r\nHost: linkid\r\nAuthorization: Bearer {tokens['admin']}\r\n\r\n"
    with server:
        host, port = server.url.removeprefix("http://").split(":")
        stalled = []
        try:
            deadline = time.monotonic() + 60
            while requests.get(
                f"{server.url}{API}/linked-identities?limit=1000",
                headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=30,
            ).status_code != 503:
                assert time.monotonic() < deadline, "clients that never read never filled the budget"
                for _ in range(10):
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.connect((host, int(port)))
                    sock.sendall(page.encode())
                    stalled.append(sock)
            for client in CLIENTS:
                run_step(client, "big_pages", {
                    "url": server.url, "tokens": tokens, "prefix": "busy", "expect": [503, "SERVER_BUSY"],
                })
        finally:
            for sock in stalled:
                sock.close()


def test_reading_pruned_events_is_410(run_step, tmp_path):
    workdir = tmp_path / "server"
    server = LinkidServer(workdir, key_file=workdir / "root.key")
    tokens = mint_tokens(server)
    with server:
        for user in ("old-1", "old-2", "kept"):
            admin_link(server, tokens, user)
    with sqlite3.connect(workdir / "linkid.db") as conn:
        conn.execute("UPDATE events SET occurred_at = '2020-01-01T00:00:00Z' WHERE seq <= 2")
    server.extra_env["LINKID_EVENTS__RETENTION_DAYS"] = "30"
    with server:
        deadline = time.monotonic() + 10
        while requests.get(
            f"{server.url}{API}/linked-identities/events?after=0",
            headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=10,
        ).status_code != 410:
            assert time.monotonic() < deadline, "old events are pruned soon after start"
            time.sleep(0.1)
        for client in CLIENTS:
            run_step(client, "from_start", {"url": server.url, "tokens": tokens, "expect": [410, "EVENTS_EXPIRED"]})


class Tmpfs:
    """A small tmpfs (root only), unmounted at the end."""

    def __init__(self, size: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="linkid-disk-"))
        self.mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.dir)], capture_output=True,
        ).returncode == 0

    def fill(self) -> Path:
        """Writes a file until the disk is full."""
        filler = self.dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (b"\0" * 65536, b"\0" * 512):
                try:
                    while True:
                        os.write(fd, chunk)
                        os.fsync(fd)
                except OSError:
                    pass
        finally:
            os.close(fd)
        return filler

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


STORAGE_FULL_SEEN: list[bool] = []


def test_a_full_disk_is_507_for_writes(run_step, tmp_path):
    disk = Tmpfs("2m")
    if not disk.mounted:
        disk.close()
        pytest.skip("a full disk needs a tmpfs, and mounting one needs root")
    try:
        workdir = tmp_path / "server"
        server = LinkidServer(
            workdir, key_file=workdir / "root.key", extra_env={"LINKID_DATABASE__PATH": str(disk.dir / "linkid.db")},
        )
        tokens = mint_tokens(server)
        with server:
            for client in CLIENTS:
                admin_link(server, tokens, f"{client[:2]}-disk-every")
            filler = disk.fill()
            # Until SQLite has used up what its files had free, some writes still fit.
            for i in range(400):
                response = requests.post(
                    f"{server.url}{API}/users/fill-{i}/linked-identities",
                    json={"provider_id": "okta", "linked_user_id": f"fill-{i}", "linked_username": "x"},
                    headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=10,
                )
                if response.status_code == 507:
                    break
            else:
                pytest.fail("the disk never filled up")
            for client in CLIENTS:
                run_step(client, "every_operation", {
                    "url": server.url, "tokens": tokens, "prefix": "disk",
                    "expect": every(200, linkIdentity=(507, "STORAGE_FULL"), deleteLinkedIdentity=(507, "STORAGE_FULL")),
                })
            filler.unlink()
            wait_ready(server)
        STORAGE_FULL_SEEN.append(True)
    finally:
        disk.close()


# ------------------------------------------------------------------ the verdict

def documented_answers() -> dict[tuple[str, int, str | None], str]:
    """(operation, status, code or None) -> the schema the document names for it."""
    document = json.loads(DOCUMENT.read_text())
    answers = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if "$ref" in response:
                    response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
                for media, content in response["content"].items():
                    schema = content["schema"]
                    if "$ref" not in schema:
                        continue  # the text/event-stream string
                    name = schema["$ref"].rsplit("/", 1)[1]
                    if media == "application/problem+json":
                        narrowed = document["components"]["schemas"][name]["allOf"][1]
                        for code in narrowed["properties"]["code"]["enum"]:
                            answers[(operation["operationId"], int(status), code)] = name
                    else:
                        answers[(operation["operationId"], int(status), None)] = name
    return answers


def test_zz_each_client_met_every_expectation_and_saw_every_documented_answer(summary):
    assert SEEN, "no step ran"
    answers = documented_answers()
    wrong = [o for o in SEEN if (o["status"], o["code"]) != (o["expected_status"], o["expected_code"])]
    assert not wrong, json.dumps(wrong[:10], indent=1)
    for observation in SEEN:
        key = (observation["operation"], observation["status"], observation["code"])
        assert key in answers, f"undocumented answer {key}"
        assert observation["request_id"], observation
        if observation["code"] is not None:
            assert observation["problem_request_id"] == observation["request_id"], observation
        if observation["client"] == "python":
            assert observation["parsed_as"] == answers[key], observation
    unreachable = set(UNREACHABLE)
    if not STORAGE_FULL_SEEN:
        unreachable |= {key for key in answers if key[2] == "STORAGE_FULL"}
    for client in CLIENTS:
        seen = {(o["operation"], o["status"], o["code"]) for o in SEEN if o["client"] == client}
        missing = sorted(set(answers) - unreachable - seen, key=str)
        assert not missing, f"{client} never saw {missing}"
        calls = collections.Counter(o["step"] for o in SEEN if o["client"] == client)
        summary.append(
            f"{client} client: {sum(calls.values())} calls ({dict(calls)}), "
            f"{len(seen)} of {len(answers)} documented (operation, status, code) answers"
            + (f"; not provokable: {sorted(unreachable, key=str)}" if unreachable else "")
        )
