#!/usr/bin/env bash
# The whole test suite: Rust HTTP tests against the real server (once on
# SQLite, once more on SQLite with the plain read path, once on PostgreSQL),
# then the contract tests (schemathesis,
# biscuit-python) against the built binary, then the docs page in a browser.
# Safe to run on a fresh Debian machine, as root or not; it installs:
#   - .venv/ (in the repository, git-ignored): a Python virtual environment
#     with tests/contract/requirements.txt. A venv because Debian's Python
#     refuses a global `pip install` (externally-managed-environment); Debian's
#     python3-venv package is installed (apt, as root or via sudo) when
#     python3 cannot make one.
#   - PostgreSQL, when it is missing (Debian's package, by
#     scripts/pg-cluster.sh): one throwaway server for the whole run, in a
#     temporary directory under /tmp, stopped and deleted when the script
#     exits, also on failure or Ctrl-C. The tests get LINKID_TEST_PG_URL,
#     LINKID_TEST_PG_CA and LINKID_TEST_PG_DIR (see scripts/pg-cluster.sh).
#   - rustfmt and clippy through rustup, when the toolchain lacks them.
#   - chromium and playwright-core (tests/browser/run.sh says how).
#   - cargo-deb, pinned, into .tools/ (git-ignored); the package test
#     (scripts/test-package.sh) then builds the release binary and the .deb,
#     installs, upgrades, removes and purges it on this machine (root or
#     sudo), and leaves it as it was.
#   - tests/document/node_modules (git-ignored): Redocly CLI, Spectral,
#     Prism, openapi-typescript, openapi-fetch and TypeScript, pinned by
#     tests/document/package-lock.json (npm ci; no global installs); and
#     openapi-python-client into .venv (tests/document/requirements.txt).
# The document checks after the install run offline: as root they run in a
# network namespace of their own with only loopback (unshare), so a tool
# that reached out would fail them.
# Every phase prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "scripts/test.sh: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------- phases
SUITE_T0=$SECONDS
PHASE=
PHASE_T0=$SECONDS

phase() { # phase TITLE: end the current phase and start the next
    phase_done
    PHASE=$1
    PHASE_T0=$SECONDS
    echo "== $PHASE"
}

phase_done() {
    [[ -n $PHASE ]] || return 0
    echo "== phase took $((SECONDS - PHASE_T0)) s ($PHASE)"
    PHASE=
}

# offline COMMAND...: runs COMMAND with loopback as its only network (a new
# network namespace) where that is possible (root, unshare, ip); elsewhere
# as it is.
offline() {
    if [[ $(id -u) -eq 0 ]] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
        && unshare --net true 2>/dev/null; then
        unshare --net -- sh -c 'ip link set lo up && exec "$@"' offline "$@"
    else
        "$@"
    fi
}

PG_DIR=
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && -n $PHASE ]]; then
        echo "== FAILED (exit status $rc) in: $PHASE, after $((SECONDS - PHASE_T0)) s ($((SECONDS - SUITE_T0)) s in all)" >&2
    fi
    if [[ -n $PG_DIR ]]; then
        scripts/pg-cluster.sh stop "$PG_DIR" || true
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup
phase "installing test dependencies (.venv)"
if ! { [[ -x .venv/bin/python ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    rm -rf .venv
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv # a half-made one, without pip
        echo "   python3 cannot make a virtual environment: installing python3-venv (apt)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/contract/requirements.txt
# Tests that need this venv fail without it from here on, instead of skipping.
export LINKID_TEST_FULL=1

phase "PostgreSQL for the tests"
# Under /tmp, not $TMPDIR: as root the server runs as the postgres user, who
# must be able to reach the directory.
PG_DIR=$(mktemp -d /tmp/linkid-test-pg.XXXXXX)
pg_env=$(scripts/pg-cluster.sh start "$PG_DIR")
eval "$pg_env"
export LINKID_TEST_PG_URL LINKID_TEST_PG_CA LINKID_TEST_PG_DIR

# ---------------------------------------------------------------- tests
phase "building"
cargo build --locked --bins --tests

phase "cargo fmt and clippy"
for component in rustfmt clippy; do
    # A toolchain without them gets them from rustup when it can.
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
        || rustup component add "$component" 2>/dev/null || true
done
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

phase "Rust tests (sqlite)"
LINKID_TEST_BACKEND=sqlite cargo test --locked -- --test-threads 4

phase "Rust HTTP tests (sqlite, database.row_cache_bytes = 0: the plain read path)"
# The fast read path (row cache, held read transactions, WAL-index peek) off:
# every HTTP test again, so both paths are held to the same answers (the
# unit tests do not depend on it, and test both paths themselves). The
# reading tests alone (list, get, search, feed, crash, races...) take nearly
# as long as all of them, so all of them run.
LINKID_TEST_BACKEND=sqlite LINKID_TEST_ROW_CACHE_BYTES=0 cargo test --locked --test api -- --test-threads 4

phase "Rust tests (postgres)"
LINKID_TEST_BACKEND=postgres cargo test --locked -- --test-threads 4

phase "contract tests"
LINKID_BIN="$PWD/target/debug/linkid" .venv/bin/python -m pytest tests/contract -q -p no:cacheprovider

phase "installing the document tools (tests/document: npm ci, openapi-python-client)"
node_version=$(node -p 'process.versions.node' 2>/dev/null || echo 0)
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' 2>/dev/null; then
    echo "scripts/test.sh: node 20.19 or later (and npm) is required for tests/document, found $node_version" >&2
    exit 1
fi
npm ci --prefix tests/document --no-audit --no-fund --loglevel=error
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/document/requirements.txt

phase "openapi/openapi.json lint (Redocly recommended-strict, Spectral oas): no error or warning"
offline env REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true \
    tests/document/node_modules/.bin/redocly lint --config tests/document/redocly.yaml openapi/openapi.json
offline tests/document/node_modules/.bin/spectral lint --ruleset tests/document/.spectral.yaml \
    --fail-severity=hint openapi/openapi.json

phase "generated Python and TypeScript clients against linkid (every operation and error code)"
offline env LINKID_BIN="$PWD/target/debug/linkid" \
    .venv/bin/python -m pytest tests/document/test_generated_clients.py -q -p no:cacheprovider

phase "Prism: mock and validating proxy on openapi/openapi.json"
offline env LINKID_BIN="$PWD/target/debug/linkid" \
    .venv/bin/python -m pytest tests/document/test_prism.py -q -p no:cacheprovider

phase "the docs page in headless Chromium"
LINKID_BIN="$PWD/target/debug/linkid" tests/browser/run.sh

phase "the Debian package: build, install, run, upgrade, remove, purge (scripts/test-package.sh)"
scripts/test-package.sh

phase_done
echo "== all tests passed in $((SECONDS - SUITE_T0)) s"
