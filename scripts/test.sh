#!/usr/bin/env bash
# The whole test suite: Rust HTTP tests against the real server, then the
# contract tests (schemathesis, biscuit-python) against the built binary.
# Installs what the tests need; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test dependencies"
python3 -m pip install --quiet --disable-pip-version-check -r tests/contract/requirements.txt

echo "== building"
cargo build --locked --bins --tests

echo "== cargo fmt and clippy"
for component in rustfmt clippy; do
    # A toolchain without them gets them from rustup when it can.
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
        || rustup component add "$component" 2>/dev/null || true
done
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

echo "== Rust tests"
cargo test --locked -- --test-threads 4

echo "== contract tests"
LINKID_BIN="$PWD/target/debug/linkid" python3 -m pytest tests/contract -q -p no:cacheprovider

echo "== the docs page in headless Chromium"
LINKID_BIN="$PWD/target/debug/linkid" tests/browser/run.sh
