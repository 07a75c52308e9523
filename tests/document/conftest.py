"""Shared fixtures for the document tests, and a closing summary of what ran."""

from __future__ import annotations

import pytest

SUMMARY = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SUMMARY] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("linkid document tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> list:
    """Lines to print at the end of the run."""
    return pytestconfig.stash[SUMMARY]
