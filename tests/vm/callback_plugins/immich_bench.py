# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Record every task result (action, host, status, seconds, message) for the benchmark."""

from __future__ import annotations

DOCUMENTATION = r"""
name: immich_bench
type: aggregate
short_description: Record task results for tests/vm/bench.py
description:
  - Writes one JSON record per task result to the file named by E(IMMICH_BENCH_OUT).
requirements:
  - enabled in ANSIBLE_CALLBACKS_ENABLED
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "immich_bench"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.started = {}
        self.records = []

    def v2_runner_on_start(self, host, task):
        self.started[(host.get_name(), task._uuid)] = time.time()

    def _record(self, result, status):
        key = (result._host.get_name(), result._task._uuid)
        start = self.started.pop(key, time.time())
        res = result._result
        items = res.get("results") if isinstance(res.get("results"), list) else None
        # the calls that reached the host: one, or one per loop item that was not skipped
        calls = 0 if status == "skipped" else (
            sum(1 for r in items if isinstance(r, dict) and not r.get("skipped")) if items is not None else 1)
        self.records.append({
            "host": result._host.get_name(), "task": result._task.get_name(), "action": result._task.action,
            "status": status, "changed": bool(res.get("changed")), "seconds": round(time.time() - start, 3),
            "msg": res.get("msg") if isinstance(res.get("msg"), str) else None, "calls": calls,
        })

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("IMMICH_BENCH_OUT")
        if path:
            with open(path, "w") as f:
                json.dump(self.records, f)
