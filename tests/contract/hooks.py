"""Schemathesis hooks for the contract run (schemathesis.toml loads them: `hooks`).

Positive test cases are meant to be requests the server must accept. For
searchLinkedIdentities two query values are valid by the schema and still a
documented 400 VALIDATION_FAILED, for reasons no OpenAPI schema can state:

- `cursor` is opaque: only a `next_cursor` the server made (a checksummed
  encoding of where the previous page ended, bound to the search's filters)
  is valid, and a generated one almost never is;
- `linked_user_id` needs `provider_id` (a dependency between parameters: a
  remote identity is unique only at its provider).

So positive cases of that operation are sent without a made-up `cursor`,
and without `linked_user_id` when they lack `provider_id`. Negative cases
keep both, so the 400s are still checked against the document; and the
positive_data_acceptance check stays strict for the operation.
"""

from __future__ import annotations

import schemathesis
from schemathesis import GenerationMode

SEARCH = "GET /api/admin/users/v4/linked-identities"


@schemathesis.hook
def map_case(context, case):
    if case.operation.label != SEARCH or case.meta is None:
        return case
    if case.meta.generation.mode != GenerationMode.POSITIVE or not case.query:
        return case
    query = dict(case.query)
    query.pop("cursor", None)
    if "linked_user_id" in query and "provider_id" not in query:
        del query["linked_user_id"]
    case.query = query
    return case
