"""Schemathesis hooks for the repository's recipe (schemathesis.toml loads them: `hooks`).

Positive test cases are meant to be requests the server must accept. Some
values are valid by the document's schemas and still a documented 400
VALIDATION_FAILED, for reasons no OpenAPI schema states:

- searchLinkedIdentities' `cursor` is opaque: only a `next_cursor` the
  server made (a checksummed encoding of where the previous page ended,
  bound to the search's filters) is valid, and a generated one almost never
  is;
- its `linked_user_id` needs `provider_id` (a dependency between
  parameters: a remote identity is unique only at its provider);
- an identifier (`user_id`, `provider_id`, `linked_user_id`,
  `linked_username`) must not hold a format or default-ignorable character.
  The schemas' `pattern` names those of the Basic Multilingual Plane only
  (src/domain/text.rs, TEXT_PATTERN, says why: a class of code points above it
  is written differently in ECMA-262 and in Python), so the generator makes
  ids holding the ones above it (tags and variation selectors
  U+E0000-E0FFF, and a few more, listed below), which the server refuses as
  the parameters' descriptions say.

So positive cases are sent without a made-up `cursor`, without a
`linked_user_id` that lacks its `provider_id`, and with each refused
character above U+FFFF replaced by "x". Negative cases keep them all, so
those 400s are still checked against the document, and the
positive_data_acceptance check stays strict.

And each scenario of the stateful phase starts from the data `linkid dev`
started with: its first request is preceded by `POST /_dev/reset`. Without
that, a scenario meets what the ones before it left (its new link is a 200
or a 409 where it was a 201 the first time), Hypothesis sees a replayed
scenario take another path, and it ends the whole phase there, after a few
dozen scenarios instead of `--max-examples`. `linkid serve` has no
`/_dev/reset`: against it the hook says so once and the scenarios share
their data.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request

import schemathesis
from hypothesis.control import current_build_context
from hypothesis.errors import InvalidArgument
from schemathesis import GenerationMode

SEARCH = "GET /api/admin/users/v4/linked-identities"

# What the server refuses above U+FFFF: format characters (Cf) and
# default-ignorable code points (src/domain/text.rs, is_invisible).
REFUSED_ABOVE_BMP = (
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def _refused(char: str) -> bool:
    code = ord(char)
    return code > 0xFFFF and any(low <= code <= high for low, high in REFUSED_ABOVE_BMP)


def _without_refused(value):
    if isinstance(value, str):
        return "".join("x" if _refused(char) else char for char in value)
    if isinstance(value, dict):
        return {key: _without_refused(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_refused(item) for item in value]
    return value


def _path_without_refused(value):
    # Path parameters come percent-encoded, as schemathesis sends them.
    if not isinstance(value, str):
        return value
    decoded = urllib.parse.unquote(value)
    kept = _without_refused(decoded)
    return value if kept == decoded else urllib.parse.quote(kept, safe="")


@schemathesis.hook
def map_case(context, case):
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return case
    if case.path_parameters:
        case.path_parameters = {name: _path_without_refused(value) for name, value in case.path_parameters.items()}
    if case.query:
        case.query = _without_refused(case.query)
    if isinstance(case.body, dict):
        case.body = _without_refused(case.body)
    if case.operation.label == SEARCH and case.query:
        query = dict(case.query)
        query.pop("cursor", None)
        if "linked_user_id" in query and "provider_id" not in query:
            del query["linked_user_id"]
        case.query = query
    return case


class _Scenarios:
    """The stateful scenario the last request belonged to, and whether the
    server has `/_dev/reset`."""

    current = None
    resettable = True


@schemathesis.hook
def before_call(context, case, kwargs):
    if not _Scenarios.resettable or case.meta is None or case.meta.phase.name != "stateful":
        return
    try:
        # Each scenario is one Hypothesis test case, with its own data.
        scenario = current_build_context().data
    except InvalidArgument:
        return
    if scenario is _Scenarios.current:
        return
    _Scenarios.current = scenario
    reset = urllib.request.Request(
        case.operation.base_url.rstrip("/") + "/_dev/reset",
        method="POST",
        headers={"Authorization": f"Bearer {os.environ.get('LINKID_TOKEN', '')}"},
    )
    try:
        with urllib.request.urlopen(reset, timeout=10) as answer:
            answer.read()
    except urllib.error.HTTPError as refused:
        _Scenarios.resettable = False
        print(
            f"hooks.py: POST /_dev/reset answered {refused.code} (not linkid dev?): "
            "stateful scenarios share their data from here on",
            file=sys.stderr,
        )
