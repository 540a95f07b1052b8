"""Shared pytest setup: import the collection in place, load its scripts as modules, and refuse
silent skips."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, ".collections")
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)


@pytest.fixture(scope="session")
def load_script():
    """load_script(name, path): a script of the project (not a package: a shipped script, a test
    tool) imported as the module NAME."""
    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a passing test: fail the run unless ALLOW_SKIPS=1."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get("ALLOW_SKIPS") != "1" and session.exitstatus == 0:
        reporter.write_line("%d test(s) skipped: failing the run (set ALLOW_SKIPS=1 to allow)" % skipped, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
