"""The task timer of the VM scenarios (tests/vm/callback_plugins/tasktimes.py, enabled by
tests/vm/scenario.py) under a real ansible-playbook on this machine."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_task_of_a_playbook_is_timed_and_the_slowest_named(load_script, tmp_path):
    """tasktimes (tests/vm/callback_plugins) under a real ansible-playbook, as scenario.py enables it."""
    scenario = load_script("scenario_under_test", os.path.join(ROOT, "tests", "vm", "scenario.py"))
    play = tmp_path / "play.yml"
    play.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "decide", "ansible.builtin.set_fact": {"x": 1}},
        {"name": "two calls", "ansible.builtin.command": "sleep 0.3", "loop": [1, 2], "changed_when": False},
        {"name": "not here", "ansible.builtin.command": "false", "when": False},
        {"name": "one call", "ansible.builtin.command": "true", "changed_when": False}]}]))
    lines = tmp_path / "tasks.jsonl"
    env = scenario.tasktimes_env(str(lines), "converge")
    env.update(ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    bin_dir = os.path.dirname(sys.executable)
    proc = subprocess.run([os.path.join(bin_dir, "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", "ansible_python_interpreter=%s" % sys.executable, str(play)],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tasks = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [(t["task"], t["remote"], t["ran"], t["items"]) for t in tasks] == [
        ("decide", False, 1, 0), ("two calls", True, 1, 2), ("not here", True, 0, 0), ("one call", True, 1, 0)]
    summary = scenario.slowest(str(lines), count=2)
    stage = summary["stages"]["converge"]
    assert (stage["tasks"], stage["host_calls"], list(stage["playbooks"])) == (4, 3, ["play.yml"])
    assert summary["slowest"][0]["task"] == "play.yml | two calls" and summary["slowest"][0]["seconds"] >= 0.6
    assert scenario.slowest(str(tmp_path / "none.jsonl")) == {"stages": {}, "slowest": []}
