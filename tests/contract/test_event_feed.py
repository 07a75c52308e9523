"""The change feed's long poll and event stream, against the document.

Schemathesis asks listEvents with wait=0 only (schemathesis.toml says why)
and cannot read a response that never ends, so these tests cover what it
leaves out, checking every body against the schemas of the document the
server serves:

- a long poll with nothing to report answers 200 after `wait` seconds with
  no events; one woken by a commit answers at once with the event;
- `Accept: text/event-stream` answers 200 with the `text/event-stream`
  content the document lists for listEvents' 200, and `x-request-id`; each
  event's `id:` is its seq, `event:` its type and `data:` an `Event`;
  `Last-Event-ID` resumes after that seq;
- the document's own event-stream example is such a stream.
"""

from __future__ import annotations

import json
import threading
import time

import jsonschema_rs
import pytest
import requests

from harness import LinkidServer

FEED = "/api/admin/users/v4/linked-identities/events"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("event-feed-server")
    srv = LinkidServer(workdir, key_file=workdir / "root.key")
    srv.admin_token = srv.mint("--admin")
    with srv:
        yield srv
    assert srv.exit_code == 0, f"linkid did not exit 0 on SIGTERM:\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def document(server) -> dict:
    return requests.get(f"{server.url}/openapi.json", timeout=10).json()


def validator(document: dict, schema: str):
    """A validator for one of the document's component schemas."""
    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    )


def auth(server, **headers) -> dict:
    return {"Authorization": f"Bearer {server.admin_token}", **headers}


def link(server, user: str, provider: str = "okta") -> None:
    response = requests.post(
        f"{server.url}/api/admin/users/v4/users/{user}/linked-identities",
        json={"provider_id": provider, "linked_user_id": f"r-{user}", "linked_username": f"{user}@example.com"},
        headers=auth(server),
        timeout=10,
    )
    assert response.status_code == 201, response.text


def newest_seq(server) -> int:
    page = requests.get(f"{server.url}{FEED}?limit=1000", headers=auth(server), timeout=10).json()
    return page["next_after"]


def read_events(response: requests.Response, count: int) -> list[dict[str, str]]:
    """The first `count` server-sent events of a stream, as field dicts."""
    events, fields = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if fields:
                events.append(fields)
                fields = {}
                if len(events) == count:
                    return events
        elif not line.startswith(":"):  # comments are heartbeats
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    raise AssertionError(f"the stream ended after {len(events)} events")


def test_a_long_poll_with_nothing_new_answers_after_wait_with_no_events(server, document):
    after = newest_seq(server)

    started = time.monotonic()
    response = requests.get(f"{server.url}{FEED}?after={after}&wait=1", headers=auth(server), timeout=10)
    took = time.monotonic() - started

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    validator(document, "EventPage").validate(response.json())
    assert response.json() == {"events": [], "next_after": after}
    assert 0.9 <= took < 5, took


def test_a_long_poll_is_answered_as_soon_as_a_change_commits(server, document):
    after = newest_seq(server)
    answer: dict = {}

    def poll() -> None:
        started = time.monotonic()
        answer["response"] = requests.get(
            f"{server.url}{FEED}?after={after}&wait=30", headers=auth(server), timeout=40
        )
        answer["took"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    link(server, "long-poll-user")
    poller.join(timeout=35)

    response = answer["response"]
    assert response.status_code == 200
    page = response.json()
    validator(document, "EventPage").validate(page)
    assert [(e["type"], e["user_id"]) for e in page["events"]] == [("LINKED", "long-poll-user")]
    assert page["next_after"] == page["events"][0]["seq"]
    assert answer["took"] < 10, answer["took"]


def test_the_event_stream_is_the_documented_content_with_documented_events(server, document):
    after = newest_seq(server)
    for user in ("sse-1", "sse-2", "sse-3"):
        link(server, user)
    documented = document["paths"][FEED]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in documented
    event_schema = validator(document, "Event")

    with requests.get(
        f"{server.url}{FEED}?after={after}",
        headers=auth(server, Accept="text/event-stream"),
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == "text/event-stream"
        assert response.headers["x-request-id"]
        events = read_events(response, 3)

    for fields in events:
        data = json.loads(fields["data"])
        event_schema.validate(data)
        assert fields["id"] == str(data["seq"])
        assert fields["event"] == data["type"]
    assert [json.loads(f["data"])["user_id"] for f in events] == ["sse-1", "sse-2", "sse-3"]

    # An EventSource reconnecting sends the last id it saw: the stream resumes after it.
    with requests.get(
        f"{server.url}{FEED}?after={after}",
        headers=auth(server, Accept="text/event-stream", **{"Last-Event-ID": events[0]["id"]}),
        stream=True,
        timeout=10,
    ) as resumed:
        assert resumed.status_code == 200
        again = read_events(resumed, 2)
    assert [f["id"] for f in again] == [f["id"] for f in events[1:]]


def test_the_documented_event_stream_example_is_a_stream_of_documented_events(document):
    example = document["paths"][FEED]["get"]["responses"]["200"]["content"]["text/event-stream"]["example"]
    frames = [frame for frame in example.split("\n\n") if frame]
    assert frames
    for frame in frames:
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(fields["data"])
        validator(document, "Event").validate(data)
        assert fields["id"] == str(data["seq"]) and fields["event"] == data["type"]
