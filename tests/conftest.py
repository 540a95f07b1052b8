"""Shared pytest setup: import the collection in place, and refuse silent skips."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, ".collections")
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a passing test: fail the run unless ALLOW_SKIPS=1."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get("ALLOW_SKIPS") != "1" and session.exitstatus == 0:
        reporter.write_line("%d test(s) skipped: failing the run (set ALLOW_SKIPS=1 to allow)" % skipped, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
