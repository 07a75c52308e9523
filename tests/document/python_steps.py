"""The steps of test_generated_clients.py, through the Python client that
openapi-python-client generated from openapi/openapi.json (`linkid_client`).

Each step makes its calls with the generated functions and models, and
returns one observation per call: what was expected, and what the client
parsed (the status, the class of the parsed body, and the problem `code`
read from that class's typed enum). typescript/steps.ts is the same steps
through openapi-fetch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from linkid_client import AuthenticatedClient, Client
from linkid_client.api.linked_identities import (
    delete_linked_identity,
    get_linked_identity,
    link_identity,
    list_identity_providers,
    list_linked_identities,
)
from linkid_client.api.system_of_record import list_events, search_linked_identities
from linkid_client.models import Embed, LinkRequest
from linkid_client.types import Response

PREFIX = "/api/admin/users/v4"


class Tamper(httpx.BaseTransport):
    """Sends requests as the generated client builds them, after `change`
    (a malformed body, another content type, a body that stalls)."""

    def __init__(self, change: Callable[[httpx.Request], None]) -> None:
        self.inner = httpx.HTTPTransport()
        self.change = change

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.change(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def replace_body(body: bytes) -> Callable[[httpx.Request], None]:
    def change(request: httpx.Request) -> None:
        request.stream = httpx.ByteStream(body)
        request.headers["content-length"] = str(len(body))

    return change


def content_type(value: str) -> Callable[[httpx.Request], None]:
    def change(request: httpx.Request) -> None:
        request.headers["content-type"] = value

    return change


def stalled_body(pause_s: float) -> Callable[[httpx.Request], None]:
    """The body in two chunks with a pause between them (chunked encoding)."""

    def change(request: httpx.Request) -> None:
        body = request.content

        class Stalled(httpx.SyncByteStream):
            def __iter__(self):
                yield body[:5]
                time.sleep(pause_s)
                yield body[5:]

        request.stream = Stalled()
        del request.headers["content-length"]
        request.headers["transfer-encoding"] = "chunked"

    return change


class Steps:
    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context
        self.url: str = context["url"]
        self.prefix: str = context["prefix"]
        self.observations: list[dict[str, Any]] = []

    def client(self, token: str | None = "admin", change=None, headers=None):
        """A generated client: with a token (a name in the context's tokens,
        or None for none), extra headers, and a tampering transport."""
        args: dict[str, Any] = {}
        if change is not None:
            args["transport"] = Tamper(change)
        common = {"base_url": self.url, "headers": headers or {}, "timeout": httpx.Timeout(30.0), "httpx_args": args}
        if token is None:
            return Client(**common)
        return AuthenticatedClient(token=self.context["tokens"][token], **common)

    def observe(self, operation: str, response: Response, expected_status: int, expected_code: str | None, note: str = ""):
        parsed = response.parsed
        code = getattr(parsed, "code", None)
        self.observations.append({
            "operation": operation,
            "note": note,
            "expected_status": expected_status,
            "expected_code": expected_code,
            "status": int(response.status_code),
            "code": code.value if code is not None else None,
            "parsed_as": type(parsed).__name__ if parsed is not None else None,
            "request_id": response.headers.get("x-request-id"),
            "problem_request_id": getattr(parsed, "request_id", None),
        })
        return parsed

    # ------------------------------------------------------------------ steps

    def every_operation(self) -> None:
        """One call of each operation with valid arguments; the context says
        what each should answer (the scenario decides)."""
        expect: dict[str, list] = self.context["expect"]
        client = self.client(self.context.get("token", "admin"), headers=self.context.get("headers"))
        user = f"{self.prefix}-every"
        fresh = f"{self.prefix}-fresh-{uuid.uuid4().hex[:8]}"
        calls = {
            "listIdentityProviders": lambda: list_identity_providers.sync_detailed(client=client),
            "listLinkedIdentities": lambda: list_linked_identities.sync_detailed(user, client=client),
            "linkIdentity": lambda: link_identity.sync_detailed(
                fresh, client=client,
                body=LinkRequest(provider_id="okta", linked_user_id=fresh, linked_username=f"{fresh}@example.com"),
            ),
            "getLinkedIdentity": lambda: get_linked_identity.sync_detailed(user, "okta", client=client),
            "deleteLinkedIdentity": lambda: delete_linked_identity.sync_detailed(user, "okta", client=client),
            "searchLinkedIdentities": lambda: search_linked_identities.sync_detailed(client=client, provider_id="okta"),
            "listEvents": lambda: list_events.sync_detailed(client=client, after=0, limit=1, wait=0),
        }
        for operation, call in calls.items():
            status, code = expect[operation]
            self.observe(operation, call(), status, code)

    def flows(self) -> None:
        """Every success, and every error that a request itself causes."""
        p = self.prefix
        admin = self.client()
        ada, bob, cy = f"{p}-ada", f"{p}-bob", f"{p}-cy"
        remote = f"{p}-00u1"

        providers = self.observe("listIdentityProviders", list_identity_providers.sync_detailed(client=admin), 200, None)
        assert [x.provider_id for x in providers.identity_providers] == ["azure-ad", "okta", "corporate-saml"]

        body = LinkRequest(provider_id="okta", linked_user_id=remote, linked_username="ada@example.com")
        created = link_identity.sync_detailed(ada, client=admin, body=body)
        self.observe("linkIdentity", created, 201, None, "new link")
        assert created.headers["location"] == f"{PREFIX}/users/{ada}/linked-identities/okta"
        again = self.observe("linkIdentity", link_identity.sync_detailed(ada, client=admin, body=body), 200, None, "retry")
        assert again.linked_user_id == remote
        self.observe("linkIdentity", link_identity.sync_detailed(
            cy, client=admin, body=LinkRequest(provider_id="okta", linked_user_id=f"{p}-00u2", linked_username="cy@example.com"),
        ), 201, None, "second link")
        self.observe("linkIdentity", link_identity.sync_detailed(
            ada, client=admin, body=LinkRequest(provider_id="azure-ad", linked_user_id="aad-1", linked_username="ada@example.com"),
        ), 400, "USER_ALREADY_LINKED")
        self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=admin, body=LinkRequest(provider_id="okta", linked_user_id=remote, linked_username="bob@example.com"),
        ), 409, "IDENTITY_ALREADY_LINKED")
        self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=admin, body=LinkRequest(provider_id="github", linked_user_id="gh-1", linked_username="bob@example.com"),
        ), 400, "INVALID_IDENTITY_PROVIDER")
        invalid = self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=admin, body=LinkRequest(provider_id="okta", linked_user_id="", linked_username="bob\u0000"),
        ), 400, "VALIDATION_FAILED")
        assert [e.field for e in invalid.errors] == ["linked_user_id", "linked_username"], invalid
        self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=self.client(change=replace_body(b'{"provider_id": "okta"')), body=body,
        ), 400, "MALFORMED_JSON")
        self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=admin, body=LinkRequest(provider_id="okta", linked_user_id="r", linked_username="x" * 17 * 1024),
        ), 413, "PAYLOAD_TOO_LARGE")
        self.observe("linkIdentity", link_identity.sync_detailed(
            bob, client=self.client(change=content_type("text/plain")), body=body,
        ), 415, "UNSUPPORTED_MEDIA_TYPE")

        plain = self.observe("listLinkedIdentities", list_linked_identities.sync_detailed(ada, client=admin), 200, None)
        assert [i.provider_id for i in plain.linked_identities] == ["okta"] and not plain.actions
        with_actions = self.observe("listLinkedIdentities", list_linked_identities.sync_detailed(
            ada, client=admin, embed=[Embed.ACTIONS],
        ), 200, None, "embed=ACTIONS")
        assert [a.value for a in with_actions.linked_identities[0].actions] == ["DELETE"]
        assert with_actions.actions == []
        self.observe("listLinkedIdentities", list_linked_identities.sync_detailed("u\u0000", client=admin), 400, "VALIDATION_FAILED")

        one = self.observe("getLinkedIdentity", get_linked_identity.sync_detailed(ada, "okta", client=admin), 200, None)
        assert one.linked_user_id == remote
        self.observe("getLinkedIdentity", get_linked_identity.sync_detailed(ada, "azure-ad", client=admin), 404, "LINKED_IDENTITY_NOT_FOUND")
        self.observe("getLinkedIdentity", get_linked_identity.sync_detailed(ada, "ok\u0000ta", client=admin), 400, "VALIDATION_FAILED")

        found = self.observe("searchLinkedIdentities", search_linked_identities.sync_detailed(
            client=admin, provider_id="okta", linked_user_id=remote,
        ), 200, None, "reverse lookup")
        assert [x.user_id for x in found.linked_identities] == [ada]
        lonely = self.observe("searchLinkedIdentities", search_linked_identities.sync_detailed(
            client=admin, linked_user_id=remote,
        ), 400, "VALIDATION_FAILED")
        assert [e.field for e in lonely.errors] == ["linked_user_id"]
        seen, cursor = [], None
        while True:
            page = self.observe("searchLinkedIdentities", search_linked_identities.sync_detailed(
                client=admin, provider_id="okta", limit=1, **({"cursor": cursor} if cursor else {}),
            ), 200, None, "page")
            seen += [x.user_id for x in page.linked_identities]
            cursor = page.next_cursor
            if not cursor:
                break
        assert len(seen) == len(set(seen)) and {ada, cy} <= set(seen), seen

        feed = self.observe("listEvents", list_events.sync_detailed(client=admin, after=0, limit=1000, wait=0), 200, None)
        assert any(e.user_id == ada and e.type_.value == "LINKED" for e in feed.events)
        assert feed.next_after == feed.events[-1].seq
        too_long = self.observe("listEvents", list_events.sync_detailed(client=admin, wait=61), 400, "VALIDATION_FAILED")
        assert [e.field for e in too_long.errors] == ["wait"]

        self.observe("deleteLinkedIdentity", delete_linked_identity.sync_detailed(cy, "okta", client=admin), 200, None)
        self.observe("deleteLinkedIdentity", delete_linked_identity.sync_detailed(cy, "okta", client=admin), 404, "LINKED_IDENTITY_NOT_FOUND")
        self.observe("deleteLinkedIdentity", delete_linked_identity.sync_detailed(cy, "ok\u0000ta", client=admin), 400, "VALIDATION_FAILED")

    def request_timeout(self) -> None:
        """A link whose body stalls past `server.body_timeout_secs`."""
        user = f"{self.prefix}-slow"
        client = self.client(change=stalled_body(self.context["pause_s"]))
        self.observe("linkIdentity", link_identity.sync_detailed(
            user, client=client,
            body=LinkRequest(provider_id="okta", linked_user_id=user, linked_username=f"{user}@example.com"),
        ), 408, "REQUEST_TIMEOUT")

    def long_poll(self) -> None:
        status, code = self.context["expect"]
        self.observe("listEvents", list_events.sync_detailed(client=self.client(), after=10**12, wait=2), status, code)

    def big_pages(self) -> None:
        """The largest pages of links and of events."""
        status, code = self.context["expect"]
        client = self.client()
        self.observe("searchLinkedIdentities", search_linked_identities.sync_detailed(client=client, limit=1000), status, code)
        self.observe("listEvents", list_events.sync_detailed(client=client, after=0, limit=1000, wait=0), status, code)

    def from_start(self) -> None:
        status, code = self.context["expect"]
        problem = self.observe("listEvents", list_events.sync_detailed(client=self.client(), after=0), status, code)
        assert "after=" in problem.detail, problem


def run(step: str, context: dict[str, Any]) -> list[dict[str, Any]]:
    steps = Steps(context)
    getattr(steps, step)()
    return steps.observations


if __name__ == "__main__":  # python python_steps.py STEP, context as JSON in LINKID_STEP_CONTEXT
    import os
    import sys

    print(json.dumps(run(sys.argv[1], json.loads(os.environ["LINKID_STEP_CONTEXT"]))))
