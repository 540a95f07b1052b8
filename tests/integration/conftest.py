"""Helpers for tests that run the modules for real through Ansible on this machine."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def generator():
    """The real podman quadlet generator (Debian 13's), fetched and cached by tests/tools."""
    path = os.environ.get("QUADLET_GENERATOR")
    if not path:
        proc = subprocess.run([os.path.join(ROOT, "tests/tools/fetch-quadlet.sh")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail("could not fetch the quadlet generator: %s" % proc.stderr)
        path = proc.stdout.strip()
    if not os.access(path, os.X_OK):
        pytest.fail("quadlet generator %s is not executable; run 'make quadlet-generator'" % path)
    return path


def ansible_module(module, args, tmp_path, check=False, diff=False):
    """Run one module through `ansible` (ad hoc, local connection); return (rc, result, stdout)."""
    tree = tmp_path / ("tree-%d" % len(list(tmp_path.glob("tree-*"))))
    cmd = [os.path.join(BIN, "ansible"), "localhost", "-c", "local", "-i", "localhost,",
           "-e", "ansible_python_interpreter=%s" % sys.executable,
           "-m", "homelab.immich.%s" % module, "-a", json.dumps(args), "-t", str(tree)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    result_file = tree / "localhost"
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.fixture
def run_module(tmp_path):
    def _run(module, args, **kw):
        return ansible_module(module, args, tmp_path, **kw)
    return _run
