"""Shared fixtures for the contract tests, and a closing summary of what ran."""

from __future__ import annotations

import pytest

from harness import linkid_binary

SUMMARY = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SUMMARY] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("linkid contract tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> list:
    """Lines to print at the end of the run (numbers worth reporting)."""
    return pytestconfig.stash[SUMMARY]


@pytest.fixture(scope="session", autouse=True)
def _binary_exists() -> None:
    # Fails (not skips) every test when the binary is missing.
    linkid_binary()
