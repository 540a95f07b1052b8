"""The scenarios' configuration as molecule sees it: .config/molecule/config.yml with each
molecule.yml merged over it (tests/vm/scenario.py reads the same merge to know the stages)."""

import json
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def scenario(load_script):
    return load_script("scenario_under_test", os.path.join(ROOT, "tests", "vm", "scenario.py"))


def test_dicts_merge_key_by_key_and_lists_are_replaced(scenario):
    base = {"a": {"x": 1, "y": [1, 2]}, "b": [1]}
    assert scenario.merged(base, {"a": {"y": [3]}, "b": [2], "c": 3}) == {"a": {"x": 1, "y": [3]}, "b": [2], "c": 3}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": [1]}  # the base is not changed


CONVERGED = ["faults", "day2", "update"]  # boot over default's converged image


def test_every_scenario_is_listed_here():
    on_disk = sorted(d for d in os.listdir(os.path.join(ROOT, "molecule"))
                     if os.path.exists(os.path.join(ROOT, "molecule", d, "molecule.yml")))
    assert on_disk == sorted(["default", "multihost", "rocm", "rootful"] + CONVERGED)


@pytest.mark.parametrize("name", ["default", "multihost", "rocm", "rootful"] + CONVERGED)
def test_every_scenario_gets_the_shared_settings(scenario, name):
    config = scenario.scenario_config(name)
    assert config["driver"]["name"] == "default" and config["dependency"]["enabled"] is False
    assert config["provisioner"]["config_options"]["defaults"]["interpreter_python"] == "/usr/bin/python3"
    assert config["provisioner"]["playbooks"]["create"] == "../shared/create.yml"
    assert config["verifier"]["env"]["PYTHONPATH"] == "${MOLECULE_PROJECT_DIRECTORY}/molecule/shared"
    inventory = config["provisioner"]["inventory"]
    if inventory.get("links"):  # default's inventory, linked: the very same settings
        assert os.path.exists(os.path.join(ROOT, "molecule", name, inventory["links"]["group_vars"], "immich.yml"))
    else:
        assert inventory["group_vars"]["immich"]  # its own inventory is kept
    sequence = config["scenario"]["test_sequence"]
    assert sequence[0] == sequence[-1] == "destroy" and "verify" in sequence
    # converging from bare is tested where a scenario converges; the others start converged
    assert ("idempotence" in sequence) is (name not in CONVERGED)
    for playbook in config["provisioner"]["playbooks"].values():
        assert os.path.exists(os.path.join(ROOT, "molecule", name, playbook)), playbook


def test_what_a_scenario_sets_itself_wins(scenario):
    default = scenario.scenario_config("default")
    assert "check" in default["scenario"]["test_sequence"] and default["provisioner"]["playbooks"]["prepare"] == "prepare.yml"
    rootful = scenario.scenario_config("rootful")
    assert rootful["verifier"]["directory"] == "../default/tests"
    assert rootful["verifier"]["env"] == {"PYTHONPATH": "${MOLECULE_PROJECT_DIRECTORY}/molecule/shared",
                                          "IMMICH_TEST_ROOTLESS": "false", "IMMICH_TEST_PUBLISHED": "false"}
    assert scenario.scenario_config("rocm")["provisioner"]["playbooks"]["converge"] == "converge.yml"


def test_default_leaves_the_converged_image_the_others_resume(scenario):
    default = scenario.scenario_config("default")
    assert scenario.produces_converged(default)
    sequence = default["scenario"]["test_sequence"]
    # verified before it is kept: the checks of test_default.py run on the VM as converge left it
    assert sequence.index("idempotence") < sequence.index("verify") < sequence.index("side_effect")
    assert [n for n in ["default", "multihost", "rocm", "rootful"] + CONVERGED
            if scenario.produces_converged(scenario.scenario_config(n))] == ["default"]
    for name in CONVERGED:
        config = scenario.scenario_config(name)
        assert scenario.needs_converged(config) == ["default"] and not scenario.needs_preload(config)
        assert config["provisioner"]["inventory"]["links"] == {"group_vars": "../default/group_vars/"}
        # resumed with its pool and share mounted: `molecule create` runs no prepare.yml after it
        assert config["scenario"]["create_sequence"] == ["create"]
    assert scenario.needs_preload(scenario.scenario_config("rootful"))


def test_the_maker_of_a_converged_image_runs_first(scenario, monkeypatch, tmp_path):
    monkeypatch.setattr(scenario, "converged_dir", lambda name: str(tmp_path / name))
    assert scenario.in_order(["update", "rocm"]) == ["default", "update", "rocm"]
    assert scenario.in_order(["faults", "default", "day2"]) == ["default", "faults", "day2"]
    assert scenario.in_order(["rootful"]) == ["rootful"]
    # named alone, a scenario reuses the image an earlier run left (make test runs each job this way)
    base = tmp_path / "root.raw"
    base.write_bytes(b"bare")
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "DONE.json").write_text(json.dumps({
        "made": "now", "ram_state_bytes": 1, "shares": {}, "base": scenario.vm.base_identity(str(base))}))
    assert scenario.in_order(["update"]) == ["update"]
    assert scenario.in_order(["update", "default"]) == ["default", "update"]
    # one that cannot be resumed any more (its cached layer rebuilt since) is made again first
    os.utime(base, ns=(1, 1))
    assert scenario.in_order(["update"]) == ["default", "update"]


SIZED = ["immich_database_health_interval", "immich_redis_health_interval", "immich_server_health_interval",
         "immich_ml_health_interval", "immich_monitoring_collector_interval"]


def test_every_inventory_is_test_sized_alike(scenario):
    """The regular health checks and the collector, sized for tests in every inventory the same way
    (molecule/default/group_vars/immich.yml says why); never in the role defaults."""
    with open(os.path.join(ROOT, "molecule", "default", "group_vars", "immich.yml")) as f:
        default = yaml.safe_load(f)
    sized = {k: default[k] for k in SIZED}
    assert sized == {k: ("30min" if "collector" in k else "5m") for k in SIZED}
    for name in ("rootful", "multihost"):
        inventory = scenario.scenario_config(name)["provisioner"]["inventory"]["group_vars"]["immich"]
        assert {k: inventory.get(k) for k in SIZED} == sized, name
    for role in ("database", "redis", "server", "ml", "monitoring"):
        with open(os.path.join(ROOT, "roles", role, "defaults", "main.yml")) as f:
            defaults = yaml.safe_load(f)
        assert not any(defaults.get(k) == sized[k] for k in SIZED), role
