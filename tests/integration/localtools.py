"""Small helpers for the integration tests that run real tools on this machine."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def fetched_tool(env, script):
    """$env if set, else the path tests/tools/<script> fetched and cached (Debian 13 binaries)."""
    path = os.environ.get(env)
    if not path:
        proc = subprocess.run([os.path.join(ROOT, "tests/tools", script)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail("could not fetch with %s: %s" % (script, proc.stderr))
        path = proc.stdout.strip()
    return path
