"""Independent token issuers.

Tokens minted and attenuated with biscuit-python must be accepted or refused
exactly like the same tokens from `linkid token mint`:

- server A knows only a public key (auth.public_key, generated here in
  Python); its auth.private_key_file points at a path that does not exist,
  and it must stay that way: A cannot mint, and generates no key;
- server B holds its own key file, and its tokens come from `linkid token mint`
  (attenuation blocks, which linkid has no command for, are appended to them
  with biscuit-python, as any holder of a token may).

Each case sends the same seven requests, in the same order, to A with the
Python token and to B with the linkid token, and both must give exactly the
expected outcomes.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Callable

import biscuit_auth as biscuit
import pytest
import requests

from harness import LinkidServer

API = "/api/admin/users/v4/users"
PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)

# (name, method, path, body): the requests each case sends, in order.
REQUESTS = [
    ("providers", "GET", "/identity-providers", None),
    ("list_u1", "GET", "/u-1/linked-identities?embed=ACTIONS", None),
    ("list_u2", "GET", "/u-2/linked-identities", None),
    ("link_u1", "POST", "/u-1/linked-identities",
     {"provider_id": "okta", "linked_user_id": "ext-u-1", "linked_username": "u1@example.com"}),
    ("link_u2", "POST", "/u-2/linked-identities",
     {"provider_id": "okta", "linked_user_id": "ext-u-2", "linked_username": "u2@example.com"}),
    ("unlink_u1", "DELETE", "/u-1/linked-identities/okta", None),
    ("unlink_u2", "DELETE", "/u-2/linked-identities/okta", None),
]

OK = {
    "providers": "200",
    "list_u1": "200 actions=['CREATE']",
    "list_u2": "200",
    "link_u1": "201",
    "link_u2": "201",
    "unlink_u1": "200",
    "unlink_u2": "200",
}
FORBIDDEN = "403 FORBIDDEN"
INVALID = "401 invalid_token"


def expect(default: str | None = None, **outcomes: str) -> dict[str, str]:
    """Every request's outcome: `default` (or the admin outcome) unless named."""
    expected = {name: default or OK[name] for name, *_ in REQUESTS}
    expected.update(outcomes)
    return expected


READ_ONLY = expect(FORBIDDEN, providers="200", list_u1="200 actions=[]", list_u2="200")
USER_U1 = expect(list_u2=FORBIDDEN, link_u2=FORBIDDEN, unlink_u2=FORBIDDEN)


def outcome(response: requests.Response) -> str:
    """A response reduced to what must match: status, auth error or problem code,
    and for the list the actions this bearer may take."""
    status = response.status_code
    if status == 401:
        challenge = response.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Bearer"), challenge
        return "401 invalid_token" if 'error="invalid_token"' in challenge else "401 no-token"
    if status >= 400:
        return f"{status} {response.json().get('code')}"
    body = response.json()
    if "actions" in body:
        return f"{status} actions={body['actions']}"
    return str(status)


# ---------------------------------------------------------------------------
# Servers and keys

@pytest.fixture(scope="module")
def python_root() -> biscuit.KeyPair:
    return biscuit.KeyPair()


@pytest.fixture(scope="module")
def server_a(tmp_path_factory, python_root):
    """Knows only the Python key's public half."""
    workdir = tmp_path_factory.mktemp("public-key-only")
    absent = workdir / "no-such-dir" / "root.key"
    srv = LinkidServer(workdir, key_file=absent, public_key=str(python_root.public_key))
    srv.absent_key_file = absent
    with srv:
        yield srv
    assert not absent.exists(), "a public-key-only server must not generate a key file"
    assert srv.exit_code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def server_b(tmp_path_factory):
    """Holds its own key file; `linkid token mint` signs with it."""
    workdir = tmp_path_factory.mktemp("key-file")
    srv = LinkidServer(workdir, key_file=workdir / "root.key")
    srv.admin = srv.mint("--admin")  # generates the key file
    private = biscuit.PrivateKey(srv.key_file.read_text().strip())
    srv.root_public = biscuit.KeyPair.from_private_key(private).public_key
    with srv:
        yield srv
    assert srv.exit_code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def other_linkid(tmp_path_factory) -> LinkidServer:
    """Only for `linkid token mint` with a root key neither server trusts."""
    workdir = tmp_path_factory.mktemp("other-key")
    return LinkidServer(workdir, key_file=workdir / "root.key")


# ---------------------------------------------------------------------------
# Tokens

def py_mint(root: biscuit.KeyPair, code: str, **params) -> biscuit.Biscuit:
    return biscuit.BiscuitBuilder(code, params or None).build(root.private_key)


def attenuate(token: str, root: biscuit.PublicKey, code: str, **params) -> str:
    """Appends a block, as any holder of the token may."""
    parsed = biscuit.Biscuit.from_base64(token, root)
    return parsed.append(biscuit.BlockBuilder(code, params or None)).to_base64()


USER_BLOCK = 'check if user("u-1");'
READ_ONLY_BLOCK = 'check if operation("linked_identities:list") or operation("identity_providers:list");'
EXPIRED_CHECK = "check if time($t), $t <= {expiry};"


@dataclass
class Case:
    name: str
    python: Callable[[biscuit.KeyPair], str | None]
    linkid: Callable[[LinkidServer, LinkidServer], str | None]
    expected: dict[str, str]


CASES = [
    Case(
        "admin",
        lambda root: py_mint(root, 'role("admin");').to_base64(),
        lambda b, other: b.admin,
        expect(),
    ),
    Case(
        "right-list",
        lambda root: py_mint(root, 'right("linked_identities:list");').to_base64(),
        lambda b, other: b.mint("--right", "linked_identities:list"),
        expect(FORBIDDEN, list_u1="200 actions=[]", list_u2="200"),
    ),
    Case(
        "rights-read",
        lambda root: py_mint(root, 'right("linked_identities:list"); right("identity_providers:list");').to_base64(),
        lambda b, other: b.mint("--right", "linked_identities:list", "--right", "identity_providers:list"),
        READ_ONLY,
    ),
    Case(
        "rights-write",
        lambda root: py_mint(root, 'right("linked_identities:create"); right("linked_identities:delete");').to_base64(),
        lambda b, other: b.mint("--right", "linked_identities:create", "--right", "linked_identities:delete"),
        expect(providers=FORBIDDEN, list_u1=FORBIDDEN, list_u2=FORBIDDEN),
    ),
    Case(
        "expired",
        lambda root: py_mint(root, 'role("admin"); ' + EXPIRED_CHECK, expiry=PAST).to_base64(),
        lambda b, other: b.expired,
        expect(INVALID),
    ),
    Case(
        # linkid's --user: a check in the authority block that still lets the
        # token list the providers.
        "minted-for-user",
        lambda root: py_mint(root, 'role("admin"); check if user("u-1") or operation("identity_providers:list");').to_base64(),
        lambda b, other: b.mint("--admin", "--user", "u-1"),
        USER_U1,
    ),
    Case(
        "attenuated-to-user",
        lambda root: attenuate(py_mint(root, 'role("admin");').to_base64(), root.public_key, USER_BLOCK),
        lambda b, other: attenuate(b.admin, b.root_public, USER_BLOCK),
        expect(**{**USER_U1, "providers": FORBIDDEN}),  # the block names no operation
    ),
    Case(
        "attenuated-read-only",
        lambda root: attenuate(py_mint(root, 'role("admin");').to_base64(), root.public_key, READ_ONLY_BLOCK),
        lambda b, other: attenuate(b.admin, b.root_public, READ_ONLY_BLOCK),
        expect(FORBIDDEN, providers="200", list_u1="200 actions=[]", list_u2="200"),
    ),
    Case(
        "attenuated-user-read-only",
        lambda root: attenuate(
            attenuate(py_mint(root, 'role("admin");').to_base64(), root.public_key, USER_BLOCK),
            root.public_key, READ_ONLY_BLOCK),
        lambda b, other: attenuate(attenuate(b.admin, b.root_public, USER_BLOCK), b.root_public, READ_ONLY_BLOCK),
        expect(FORBIDDEN, list_u1="200 actions=[]"),
    ),
    Case(
        "attenuated-expired",
        lambda root: attenuate(py_mint(root, 'role("admin");').to_base64(), root.public_key, EXPIRED_CHECK, expiry=PAST),
        lambda b, other: attenuate(b.admin, b.root_public, EXPIRED_CHECK, expiry=PAST),
        expect(INVALID),
    ),
    Case(
        "other-key",
        lambda root: py_mint(biscuit.KeyPair(), 'role("admin");').to_base64(),
        lambda b, other: other.mint("--admin"),
        expect(INVALID),
    ),
    Case(
        "malformed",
        lambda root: "not-a-biscuit",
        lambda b, other: "not-a-biscuit",
        expect(INVALID),
    ),
    Case(
        "no-token",
        lambda root: None,
        lambda b, other: None,
        expect("401 no-token"),
    ),
]


@pytest.fixture(scope="module")
def linkid_tokens(server_b, other_linkid) -> dict[str, str | None]:
    """Every case's token from `linkid token mint`, minted once."""
    server_b.expired = server_b.mint("--admin", "--ttl", "1s")
    expires = time.monotonic() + 1.0
    tokens = {case.name: case.linkid(server_b, other_linkid) for case in CASES}
    # Let the one-second token run out (with a margin for clock granularity).
    time.sleep(max(0.0, expires + 1.0 - time.monotonic()))
    return tokens


def run_requests(server: LinkidServer, token: str | None, admin: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    outcomes = {}
    with requests.Session() as session:
        try:
            for name, method, path, body in REQUESTS:
                response = session.request(method, f"{server.url}{API}{path}", headers=headers, json=body, timeout=10)
                outcomes[name] = outcome(response)
        finally:
            # Leave no links behind for the next case (a 404 is fine).
            for user in ("u-1", "u-2"):
                response = session.delete(
                    f"{server.url}{API}/{user}/linked-identities/okta",
                    headers={"Authorization": f"Bearer {admin}"}, timeout=10,
                )
                assert response.status_code in (200, 404), response.text
    return outcomes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_same_outcome_from_either_issuer(case, python_root, server_a, server_b, linkid_tokens):
    python_token = case.python(python_root)
    python_admin = py_mint(python_root, 'role("admin");').to_base64()
    from_python = run_requests(server_a, python_token, python_admin)
    from_linkid = run_requests(server_b, linkid_tokens[case.name], server_b.admin)
    assert from_python == from_linkid, (
        f"biscuit-python token on the public-key server: {from_python}\n"
        f"linkid token mint token on the key-file server: {from_linkid}"
    )
    assert from_python == case.expected


def test_public_key_only_server_cannot_mint_and_generates_no_key(server_a, python_root):
    assert not server_a.absent_key_file.exists()
    refused = server_a.command("token", "mint", "--admin", check=False)
    assert refused.returncode != 0
    assert refused.stdout.strip() == "", "no token may be printed without the private key"
    assert "no private key" in refused.stderr, refused.stderr
    assert not server_a.absent_key_file.exists()


def test_linkid_inspect_verifies_python_tokens(server_a, python_root):
    """`linkid token inspect` with the public-key-only config sees a Python
    token's blocks and accepts its signature; another key's it does not."""
    token = attenuate(py_mint(python_root, 'role("admin");').to_base64(), python_root.public_key, USER_BLOCK)
    shown = server_a.command("token", "inspect", token).stdout
    assert "valid for this server's root key" in shown and "NOT valid" not in shown, shown
    assert 'role("admin")' in shown and 'check if user("u-1")' in shown, shown
    stranger = py_mint(biscuit.KeyPair(), 'role("admin");').to_base64()
    assert "NOT valid" in server_a.command("token", "inspect", stranger).stdout


def test_refused_requests_do_not_break_keep_alive(server_a, python_root):
    """A POST refused before its body is read (here: 401) must not leave a
    keep-alive client writing into a connection the server is closing: the
    refusal says `Connection: close`, and no request on the session fails."""
    stranger = py_mint(biscuit.KeyPair(), 'role("admin");').to_base64()
    failures = []
    with requests.Session() as session:
        for i in range(150):
            try:
                response = session.post(
                    f"{server_a.url}{API}/u-{i}/linked-identities",
                    headers={"Authorization": f"Bearer {stranger}"},
                    json={"provider_id": "okta", "linked_user_id": f"ext-{i}", "linked_username": "x"},
                    timeout=10,
                )
            except requests.ConnectionError as error:
                failures.append(repr(error))
                continue
            assert response.status_code == 401
            assert response.headers.get("Connection", "").lower() == "close", dict(response.headers)
    assert failures == [], f"{len(failures)} of 150 requests failed: {failures[:3]}"
