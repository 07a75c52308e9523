"""Prism (@stoplight/prism-cli) on the committed document.

- `prism mock openapi/openapi.json` must answer like linkid: by default the
  first documented example (the plain list, the default configuration's
  providers); for each documented status and example (`Prefer: code=,
  example=`) exactly that example; for a status alone an example of a code
  that status carries (a 401 is UNAUTHENTICATED or INVALID_TOKEN); a request
  without a token a 401; `embed` comma-separated and repeated both accepted.
  A 401 it picks itself, and the UNAUTHENTICATED example, come with the
  missing token's challenge (`WWW-Authenticate: Bearer`); the
  INVALID_TOKEN example's own challenge is beyond Prism (an expected
  failure, strict: it says when a Prism release can do it).
- `prism proxy --errors openapi/openapi.json <linkid>`, Prism's validating
  proxy in front of a live linkid, passes every operation's requests and
  responses (including both forms of `embed`) without a violation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "contract"))

from harness import LinkidServer, free_port  # noqa: E402

DOCUMENT = REPO / "openapi" / "openapi.json"
PRISM = HERE / "node_modules" / ".bin" / "prism"
API = "/api/admin/users/v4"
TOKEN = {"Authorization": "Bearer any-token"}


def start_prism(*args: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    out = open(log, "wb")
    process = subprocess.Popen(
        [str(PRISM), *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=HERE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"{url}/healthz", timeout=2)
            return process, url
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"prism did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(DOCUMENT.read_text())


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    process, url = start_prism("mock", str(DOCUMENT), log=tmp_path_factory.mktemp("prism") / "mock.log")
    yield url
    stop(process)


def resolve(document: dict, node: dict) -> dict:
    while "$ref" in node:
        section, name = node["$ref"].split("/")[-2:]
        node = document["components"][section][name]
    return node


def requests_for(document: dict):
    """(operationId, method, concrete path, JSON body or None, responses) for every operation,
    with the documented path parameter and request body examples."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            concrete = path
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    concrete = concrete.replace("{" + parameter["name"] + "}", parameter["example"])
            body = None
            if "requestBody" in operation:
                schema = resolve(document, operation["requestBody"]["content"]["application/json"]["schema"])
                body = schema["example"]
            responses = {status: resolve(document, r) for status, r in operation["responses"].items()}
            yield operation["operationId"], method, concrete, body, responses


def call(base: str, method: str, path: str, body, headers=None, query: str = ""):
    return requests.request(
        method.upper(), f"{base}{path}{query}", json=body, headers={**TOKEN, **(headers or {})}, timeout=10,
    )


def examples(response: dict, media: str) -> dict:
    content = response["content"][media]
    if "examples" in content:
        return {name: example["value"] for name, example in content["examples"].items()}
    return {"": content["example"]}


def test_by_default_the_mock_answers_each_operations_first_documented_example(document, mock):
    for operation_id, method, path, body, responses in requests_for(document):
        response = call(mock, method, path, body)
        status = str(response.status_code)
        assert status in responses and status.startswith("2"), (operation_id, status, response.text)
        first = next(iter(examples(responses[status], "application/json").values()))
        assert response.json() == first, operation_id
        assert response.headers["x-request-id"]
    providers = call(mock, "get", f"{API}/users/identity-providers", None).json()
    assert [p["provider_id"] for p in providers["identity_providers"]] == ["azure-ad", "okta", "corporate-saml"]
    plain = call(mock, "get", f"{API}/users/u-42/linked-identities", None).json()
    assert "actions" not in plain and "actions" not in plain["linked_identities"][0]


def test_the_mock_answers_every_documented_status_and_example(document, mock):
    answered = 0
    for operation_id, method, path, body, responses in requests_for(document):
        for status, response in responses.items():
            for media in response["content"]:
                if media == "text/event-stream":
                    continue
                documented = examples(response, media)
                for name, value in documented.items():
                    prefer = f"code={status}" + (f", example={name}" if name else "")
                    answer = call(mock, method, path, body, {"Prefer": prefer, "Accept": media})
                    assert str(answer.status_code) == status, (operation_id, prefer, answer.text)
                    assert answer.json() == value, (operation_id, prefer)
                    for header in response.get("headers", {}):
                        assert header.lower() in {h.lower() for h in answer.headers}, (operation_id, status, header)
                    answered += 1
                if media == "application/problem+json":
                    # A status alone: one of that status's own codes, never another's.
                    answer = call(mock, method, path, body, {"Prefer": f"code={status}"})
                    assert answer.json()["code"] in {v["code"] for v in documented.values()}, (operation_id, status)
                    assert answer.json()["status"] == int(status)
    assert answered > 60


def test_the_mock_answers_a_request_without_a_token_with_a_documented_401(mock):
    response = requests.get(f"{mock}{API}/users/u-42/linked-identities", timeout=10)

    assert response.status_code == 401
    assert response.json()["code"] in {"UNAUTHENTICATED", "INVALID_TOKEN"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


CHALLENGE = {"UNAUTHENTICATED": "Bearer", "INVALID_TOKEN": 'Bearer error="invalid_token"'}


def test_the_mock_sends_the_missing_token_challenge_with_the_missing_token_problem(mock):
    """A 401 as Prism answers it without being told which (no token, or
    `Prefer: code=401`), and the UNAUTHENTICATED example asked for by name:
    the problem and the challenge linkid sends when no token came."""
    path = f"{mock}{API}/users/u-42/linked-identities"
    for headers in ({}, {**TOKEN, "Prefer": "code=401"}, {**TOKEN, "Prefer": "code=401, example=UNAUTHENTICATED"}):
        answer = requests.get(path, headers=headers, timeout=10)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["code"] == "UNAUTHENTICATED", (headers, answer.json())
        assert answer.headers["WWW-Authenticate"] == CHALLENGE["UNAUTHENTICATED"], headers


@pytest.mark.xfail(
    strict=True,
    reason="Prism 5.14 sends one value per response header whichever body example is asked for "
    "(@stoplight/prism-http dist/mocker/index.js computeMockedHeaders: a header's first example, "
    "else a sample of its schema; the example key chooses only the body): see the README's Prism notes",
)
def test_the_mock_sends_the_invalid_token_challenge_with_the_invalid_token_problem(mock):
    answer = call(mock, "get", f"{API}/users/u-42/linked-identities", None, {"Prefer": "code=401, example=INVALID_TOKEN"})
    assert answer.json()["code"] == "INVALID_TOKEN"
    assert answer.headers["WWW-Authenticate"] == CHALLENGE["INVALID_TOKEN"]


def test_the_mock_validates_requests_as_linkid_does(mock):
    for query in ("?embed=ACTIONS", "?embed=ACTIONS,ACTIONS", "?embed=ACTIONS&embed=ACTIONS"):
        assert call(mock, "get", f"{API}/users/u-42/linked-identities", None, query=query).status_code == 200, query
    for query, field in (("?embed=EVERYTHING", "embed"), ("?wait=61", "wait")):
        path = f"{API}/linked-identities/events" if field == "wait" else f"{API}/users/u-42/linked-identities"
        refused = call(mock, "get", path, None, query=query)
        assert refused.status_code == 400, (query, refused.text)
        assert refused.json()["code"] == "VALIDATION_FAILED"


def test_prisms_validating_proxy_finds_no_violation_in_linkid(tmp_path):
    server = LinkidServer(tmp_path / "server", key_file=tmp_path / "server" / "root.key")
    token = server.mint("--admin")
    auth = {"Authorization": f"Bearer {token}"}
    with server:
        process, proxy = start_prism("proxy", "--errors", str(DOCUMENT), server.url, log=tmp_path / "proxy.log")
        try:
            body = {"provider_id": "okta", "linked_user_id": "00u1a2b3c4", "linked_username": "ada@example.com"}
            one = f"{API}/users/u-42/linked-identities/okta"
            for method, path, json_body, status in [
                ("GET", f"{API}/users/identity-providers", None, 200),
                ("POST", f"{API}/users/u-42/linked-identities?embed=ACTIONS", body, 201),
                ("POST", f"{API}/users/u-42/linked-identities", body, 200),
                ("POST", f"{API}/users/u-43/linked-identities", body, 409),
                ("GET", f"{API}/users/u-42/linked-identities", None, 200),
                ("GET", f"{API}/users/u-42/linked-identities?embed=ACTIONS,ACTIONS", None, 200),
                ("GET", f"{API}/users/u-42/linked-identities?embed=ACTIONS&embed=ACTIONS", None, 200),
                ("GET", f"{one}?embed=ACTIONS", None, 200),
                ("GET", f"{API}/linked-identities?provider_id=okta&linked_user_id=00u1a2b3c4", None, 200),
                ("GET", f"{API}/linked-identities/events?after=0&wait=0", None, 200),
                ("DELETE", one, None, 200),
                ("GET", one, None, 404),
                ("DELETE", one, None, 404),
            ]:
                response = requests.request(method, f"{proxy}{path}", json=json_body, headers=auth, timeout=20)
                assert response.status_code == status, (method, path, response.text)
                assert "sl-violations" not in response.headers, (method, path, response.headers["sl-violations"])
            unauthenticated = requests.get(f"{proxy}{API}/users/identity-providers", timeout=20)
            assert unauthenticated.status_code == 401
        finally:
            stop(process)
