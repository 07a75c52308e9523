#!/usr/bin/env bash
# The /docs page in a real browser. Installs what it needs, idempotently:
#   - Debian's chromium package, when /usr/bin/chromium is missing (apt-get;
#     as root, or through sudo);
#   - playwright-core, pinned by tests/browser/package-lock.json (npm ci; it
#     never downloads a browser);
#   - the linkid binary (cargo build), unless LINKID_BIN names one.
# Then runs node's test runner on tests/browser/.
#
#   tests/browser/run.sh
#   LINKID_BIN=target/release/linkid tests/browser/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "tests/browser/run.sh: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

if [ ! -x "$CHROMIUM_BIN" ]; then
    echo "== installing chromium (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "tests/browser/run.sh: node (20 or later) and npm are required" >&2
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    echo "tests/browser/run.sh: node $(node --version) is too old: playwright-core needs 20 or later" >&2
    exit 1
fi

echo "== installing playwright-core (npm ci)"
# Playwright must not try to fetch browsers: we use Debian's chromium.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser \
    --no-audit --no-fund --loglevel=error

if [ -z "${LINKID_BIN:-}" ]; then
    echo "== building linkid"
    cargo build --locked --bin linkid
fi

echo "== browser test"
export CHROMIUM_BIN
# Test files named explicitly (node 20 also accepts the directory; later
# versions take globs instead).
exec node --test tests/browser/*.test.mjs
