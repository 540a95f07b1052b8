"""Fixtures the unit tests of the test harness share."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def vm(monkeypatch, tmp_path, load_script):
    """tests/vm/vm.py, its run directories and cache under tmp_path."""
    module = load_script("vm_under_test", os.path.join(ROOT, "tests", "vm", "vm.py"))
    monkeypatch.setattr(module, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(module, "CACHE", str(tmp_path / "cache"))
    return module
