"""The scenarios' configuration as molecule sees it: .config/molecule/config.yml with each
molecule.yml merged over it (tests/vm/scenario.py reads the same merge to know the stages)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def scenario(load_script):
    return load_script("scenario_under_test", os.path.join(ROOT, "tests", "vm", "scenario.py"))


def test_dicts_merge_key_by_key_and_lists_are_replaced(scenario):
    base = {"a": {"x": 1, "y": [1, 2]}, "b": [1]}
    assert scenario.merged(base, {"a": {"y": [3]}, "b": [2], "c": 3}) == {"a": {"x": 1, "y": [3]}, "b": [2], "c": 3}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": [1]}  # the base is not changed


@pytest.mark.parametrize("name", ["default", "multihost", "rocm", "rootful"])
def test_every_scenario_gets_the_shared_settings(scenario, name):
    config = scenario.scenario_config(name)
    assert config["driver"]["name"] == "default" and config["dependency"]["enabled"] is False
    assert config["provisioner"]["config_options"]["defaults"]["interpreter_python"] == "/usr/bin/python3"
    assert config["provisioner"]["playbooks"]["create"] == "../shared/create.yml"
    assert config["provisioner"]["inventory"]["group_vars"]["immich"]  # its own inventory is kept
    sequence = config["scenario"]["test_sequence"]
    assert sequence[0] == sequence[-1] == "destroy" and "verify" in sequence and "idempotence" in sequence
    for playbook in config["provisioner"]["playbooks"].values():
        assert os.path.exists(os.path.join(ROOT, "molecule", name, playbook)), playbook


def test_what_a_scenario_sets_itself_wins(scenario):
    default = scenario.scenario_config("default")
    assert "check" in default["scenario"]["test_sequence"] and default["provisioner"]["playbooks"]["prepare"] == "prepare.yml"
    rootful = scenario.scenario_config("rootful")
    assert rootful["verifier"]["directory"] == "../default/tests"
    assert rootful["verifier"]["options"] == {"p": "no:cacheprovider", "durations": "0",
                                              "k": "not test_fault_ and not test_operations"}
    assert scenario.scenario_config("rocm")["provisioner"]["playbooks"]["converge"] == "converge.yml"
