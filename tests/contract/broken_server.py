"""A small server of the Linked Identities API as the seed text describes it,
in memory, with one deliberate bug per variant: what `linkid conform` is
judged against in test_conform.py.

It is not linkid: its bodies have other shapes (`{"items": [...]}`, errors as
`{"error": {"code": ..., "message": ...}}` in plain application/json, actions
in lower case, a missing field answered 422), so that a correct variant
passing `--level seed` shows that seed judges only what the seed names.

    python3 broken_server.py --port 8099 --token T --variant retry-201

`GET /_stub/links` (no token) lists every stored link, for the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

PREFIX = "/api/admin/users/v4"
PROVIDERS = [
    {"provider_id": "alpha", "name": "Alpha Login", "kind": "OIDC"},
    {"provider_id": "beta", "name": "Beta Login", "kind": "SAML"},
]

# Each variant but "correct" breaks one promise of the seed text; the value
# is the check id of `linkid conform --level seed` that must catch it.
VARIANTS = {
    "correct": None,
    "missing-token-accepted": "auth.missing-token",
    "invalid-token-accepted": "auth.invalid-token",
    "providers-500": "providers.list",
    "retry-201": "links.retry",
    "embed-ignored": "links.embed-actions",
    "user-already-linked-409": "links.user-already-linked",
    "invalid-provider-accepted": "links.invalid-provider",
    "missing-field-accepted": "links.missing-field",
    "delete-keeps": "links.delete",
    "delete-wrong-type": "links.delete",
}

# Variants made for other tests than "this check catches that bug".
OTHER_VARIANTS = {
    # The list with embed answers only after a long wait: a run is stopped there.
    "embed-hangs",
    # The provider list is 5 MiB: more than conform reads.
    "providers-huge",
}

USER_PATH = re.compile(r"^/users/([^/]+)/linked-identities(?:/([^/]+))?$")


class Store:
    """user_id -> {"provider_id", "linked_user_id", "linked_username"}: one link a user."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.links: dict[str, dict] = {}
        self.hanging = 0


class Handler(BaseHTTPRequestHandler):
    server_version = "broken-stub/1"
    protocol_version = "HTTP/1.1"
    # One write per answer, sent at once: headers and body in separate
    # segments would wait on delayed ACKs, 40 ms a request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    # Set by main().
    store: Store
    token: str
    variant: str

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------ answers
    def send_json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, code: str, message: str) -> None:
        self.send_json(status, {"error": {"code": code, "message": message}})

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # ------------------------------------------------------------ auth
    def authorized(self) -> bool:
        header = self.headers.get("Authorization")
        if header is None:
            if self.variant == "missing-token-accepted":
                return True
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        if header != f"Bearer {self.token}":
            if self.variant == "invalid-token-accepted":
                return True
            self.error(401, "BAD_TOKEN", "who are you?")
            return False
        return True

    # ------------------------------------------------------------ routes
    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self.read_body() if method == "POST" else b""
        if url.path == "/_stub/links" and method == "GET":
            with self.store.lock:
                links = [{"user_id": u, **link} for u, link in self.store.links.items()]
            self.send_json(200, {"links": links, "hanging": self.store.hanging})
            return
        if not url.path.startswith(PREFIX):
            self.error(404, "NO_ROUTE", "no such path")
            return
        path = url.path[len(PREFIX):]
        if path == "/users/identity-providers" and method == "GET":
            if not self.authorized():
                return
            if self.variant == "providers-500":
                self.error(500, "OOPS", "the provider list broke")
                return
            if self.variant == "providers-huge":
                self.send_json(200, {"items": PROVIDERS, "padding": "x" * (5 << 20)})
                return
            self.send_json(200, {"items": PROVIDERS})
            return
        match = USER_PATH.match(path)
        if not match:
            self.error(404, "NO_ROUTE", "no such path")
            return
        user = unquote(match.group(1))
        provider = unquote(match.group(2)) if match.group(2) else None
        if not self.authorized():
            return
        embed = "ACTIONS" in ",".join(query.get("embed", [])).split(",")
        if self.variant == "embed-ignored":
            embed = False
        if provider is None and method == "GET":
            self.list_links(user, embed)
        elif provider is None and method == "POST":
            self.link(user, body, embed)
        elif provider is not None and method == "DELETE":
            self.unlink(user, provider)
        else:
            self.error(405, "NO_METHOD", "method not allowed")

    def identity(self, link: dict, embed: bool) -> dict:
        shown = dict(link)
        if embed:
            shown["allowed"] = ["delete"]
        return shown

    def list_links(self, user: str, embed: bool) -> None:
        if embed and self.variant == "embed-hangs":
            with self.store.lock:
                self.store.hanging += 1
            time.sleep(60)
        with self.store.lock:
            link = self.store.links.get(user)
        items = [self.identity(link, embed)] if link else []
        body: dict = {"items": items, "count": len(items)}
        if embed:
            body["allowed"] = [] if link else ["create"]
        self.send_json(200, body)

    def link(self, user: str, raw: bytes, embed: bool) -> None:
        try:
            request = json.loads(raw)
        except ValueError:
            self.error(400, "BAD_JSON", "not JSON")
            return
        fields = ("provider_id", "linked_user_id", "linked_username")
        if not isinstance(request, dict):
            self.error(400, "BAD_REQUEST", "an object, please")
            return
        missing = [f for f in fields if not isinstance(request.get(f), str)]
        if missing and self.variant != "missing-field-accepted":
            # 422, where linkid says 400: the seed names no status for it.
            self.error(422, "UNPROCESSABLE", f"{missing[0]} is required")
            return
        link = {f: request.get(f, "") for f in fields}
        known = [p["provider_id"] for p in PROVIDERS]
        if link["provider_id"] not in known and self.variant != "invalid-provider-accepted":
            self.error(400, "INVALID_IDENTITY_PROVIDER", "no such provider")
            return
        with self.store.lock:
            current = self.store.links.get(user)
            if current is not None:
                same = (current["provider_id"], current["linked_user_id"]) == (
                    link["provider_id"],
                    link["linked_user_id"],
                )
                if same:
                    current["linked_username"] = link["linked_username"]
                    status = 201 if self.variant == "retry-201" else 200
                    answer = self.identity(current, embed)
                else:
                    if self.variant == "user-already-linked-409":
                        status, answer = 409, {"error": {"code": "USER_ALREADY_LINKED"}}
                    else:
                        status, answer = 400, {"error": {"code": "USER_ALREADY_LINKED"}}
            else:
                taken = any(
                    (l["provider_id"], l["linked_user_id"]) == (link["provider_id"], link["linked_user_id"])
                    for l in self.store.links.values()
                )
                if taken:
                    status, answer = 409, {"error": {"code": "IDENTITY_ALREADY_LINKED"}}
                else:
                    self.store.links[user] = link
                    status, answer = 201, self.identity(link, embed)
        self.send_json(status, answer)

    def unlink(self, user: str, provider: str) -> None:
        with self.store.lock:
            current = self.store.links.get(user)
            if current is None or current["provider_id"] != provider:
                self.error(404, "NOT_LINKED", "no such link")
                return
            if self.variant != "delete-keeps":
                del self.store.links[user]
        answer = dict(current)
        if self.variant == "delete-wrong-type":
            answer["linked_user_id"] = 42
        self.send_json(200, answer)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self.route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self.route("DELETE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--variant", choices=sorted([*VARIANTS, *OTHER_VARIANTS]), default="correct")
    args = parser.parse_args()
    Handler.store = Store()
    Handler.token = args.token
    Handler.variant = args.variant
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
