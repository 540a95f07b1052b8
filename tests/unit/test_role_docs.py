"""Role READMEs document exactly the variables of their argument specs, and defaults agree."""

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLES = sorted(r for r in os.listdir(os.path.join(ROOT, "roles"))
               if os.path.isfile(os.path.join(ROOT, "roles", r, "meta", "argument_specs.yml")))


def test_roles_exist():
    assert ROLES == ["backup", "database", "host", "ml", "monitoring", "redis", "server"]


def test_readmes_are_current():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/role_readme.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("role", ROLES)
def test_specs_match_defaults(role):
    base = os.path.join(ROOT, "roles", role)
    with open(os.path.join(base, "meta", "argument_specs.yml")) as f:
        specs = yaml.safe_load(f)["argument_specs"]
    with open(os.path.join(base, "defaults", "main.yml")) as f:
        defaults = yaml.safe_load(f) or {}
    options = specs["main"]["options"]
    assert specs["validate"] == specs["main"], "the validate entry point checks the same options"
    assert set(options) == set(defaults), "every default is specified and every option has a default"
    for name, value in defaults.items():
        assert name.startswith("immich_"), name
        assert options[name].get("default") == value, name
        assert options[name].get("description"), name
