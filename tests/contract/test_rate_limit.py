"""The rate limiter's 429s against the document.

The other contract servers run with the failed-authentication limit off
(linkid-test.toml). Here it is on, with a quota of one failed authentication
a minute: after two requests without a token, 127.0.0.1 is blocked and every
operation answers 429 RATE_LIMITED, whatever the request. Schemathesis then
checks those responses (status documented, content type, headers, body
schema) against the document the server serves.
"""

from __future__ import annotations

import json

import requests

from harness import OPERATIONS, LinkidServer, run_schemathesis

RESPONSE_CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
])


def test_rate_limited_responses_match_the_document(tmp_path, summary):
    workdir = tmp_path / "server"
    srv = LinkidServer(
        workdir,
        key_file=workdir / "root.key",
        extra_env={
            "LINKID_RATE_LIMIT__FAILED_AUTH_PER_MINUTE": "1",
            "LINKID_RATE_LIMIT__FAILED_AUTH_BURST": "1",
        },
    )
    token = srv.mint("--admin")
    with srv:
        providers = f"{srv.url}/api/admin/users/v4/users/identity-providers"
        assert requests.get(providers, timeout=10).status_code == 401
        blocked = requests.get(providers, timeout=10)
        assert blocked.status_code == 429, blocked.text
        assert blocked.json()["code"] == "RATE_LIMITED"
        assert int(blocked.headers["Retry-After"]) >= 1
        # A valid token does not get past a blocked address either.
        assert requests.get(providers, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 429

        result, report = run_schemathesis(
            f"{srv.url}/openapi.json", token, tmp_path, "rate-limited",
            "--checks", RESPONSE_CHECKS,
            "--phases", "examples,fuzzing",
            "--max-examples", "10",
            "--seed", "1",
        )
    summary.append(
        f"rate limit: {report['test_cases']['generated']} schemathesis cases against a blocked address, "
        f"{report['test_cases']['with_failures']} with failures"
    )
    assert result.returncode == 0, result.stdout[-8000:]
    assert report["failures"] == [] and report["errors"] == [], json.dumps(report["failures"])
    # Schemathesis saw (almost) nothing but 429s, so what it checked were the 429s.
    assert sorted(report["warnings"]["rate_limited"]) == sorted(OPERATIONS.values())
