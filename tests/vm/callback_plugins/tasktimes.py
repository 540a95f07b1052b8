"""Where a playbook's time goes, task by task: one JSON line per task to $HOMELAB_TASKTIMES.

The VM scenarios (tests/vm/scenario.py) enable it for every ansible-playbook they run, the
playbooks the verify stage starts included, and print the slowest tasks of each scenario. A task's
time runs from its start to the next task's start (on every host of the play together), so the
lines of one playbook add up to its run. Nothing is written without $HOMELAB_TASKTIMES.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: tasktimes
type: aggregate
short_description: each task's wall time, as JSON lines
description: Appends one JSON line per task to the file named by HOMELAB_TASKTIMES (test harness only).
"""

# what runs on the controller only (no round trip to the host)
CONTROLLER = {"ansible.builtin.set_fact", "ansible.builtin.assert", "ansible.builtin.debug", "ansible.builtin.fail",
              "ansible.builtin.include_role", "ansible.builtin.import_role", "ansible.builtin.include_tasks",
              "ansible.builtin.import_tasks", "ansible.builtin.meta", "ansible.builtin.add_host",
              "ansible.builtin.group_by", "ansible.builtin.validate_argument_spec", "ansible.builtin.include_vars"}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "tasktimes"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.path = os.environ.get("HOMELAB_TASKTIMES")
        self.playbook = None
        self.current = None

    def _finish(self):
        if self.current and self.path:
            self.current["seconds"] = round(time.time() - self.current.pop("t0"), 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(self.current) + "\n")
        self.current = None

    def v2_playbook_on_start(self, playbook):
        self.playbook = os.path.basename(playbook._file_name)

    def _start(self, task):
        self._finish()
        action = task.resolved_action or task.action
        action = action if "." in action else "ansible.builtin." + action
        self.current = {"stage": os.environ.get("HOMELAB_TASKTIMES_STAGE", ""), "playbook": self.playbook,
                        "task": task.get_name(), "action": action, "remote": action not in CONTROLLER,
                        "ran": 0, "items": 0, "t0": time.time()}

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task)

    def _count(self, key):
        if self.current is not None:
            self.current[key] += 1

    # a task ran on a host (ok or failed, not skipped); each loop item is a call of its own
    def v2_runner_on_ok(self, result):
        self._count("ran")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._count("ran")

    def v2_runner_item_on_ok(self, result):
        self._count("items")

    def v2_runner_item_on_failed(self, result):
        self._count("items")

    def v2_playbook_on_stats(self, stats):
        self._finish()
