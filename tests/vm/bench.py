"""`make bench`: what site.yml costs on the Debian 13 test VM (qemu TCG).

Measures, on one throwaway VM with the offline test images:
  - converge time from a bare VM (first site.yml run), tasks, module calls per host
  - no-op re-run time (target: at most half of the ~58 s the same four services cost when
    written the usual way with containers.podman: podman_container state=quadlet per service plus
    systemd_service per unit, measured on the same kind of VM)
  - how many units restart when one service variable changes (must be exactly one)
  - converge time for two hosts (app: database, Valkey, server; GPU host: ML) on a private link,
    both converged in parallel (forks), against the one-host converge above
Writes build/bench.json and prints a table. --one-host skips the two-host part.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))

import build as images  # noqa: E402
import demo  # noqa: E402  (inventory writing and the offline variables)
import vm  # noqa: E402

NAME = "bench"
BIN = os.path.dirname(sys.executable)
REFERENCE_NOOP = 58.0
CONTROLLER_ACTIONS = {"ansible.builtin.set_fact", "set_fact", "ansible.builtin.assert", "assert",
                      "ansible.builtin.debug", "debug", "ansible.builtin.meta", "meta",
                      "ansible.builtin.include_role", "include_role", "ansible.builtin.import_tasks",
                      "ansible.builtin.include_tasks"}


def run_site(state, tmp, extra, label):
    out = os.path.join(tmp, label + ".json")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"),
               ANSIBLE_CALLBACK_PLUGINS=os.path.join(HERE, "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="immich_bench", IMMICH_BENCH_OUT=out)
    inv = os.path.join(tmp, "hosts.yml")
    varfile = os.path.join(tmp, label + "-vars.json")
    with open(varfile, "w") as f:
        json.dump(extra, f)
    t0 = time.time()
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", inv, "-e", "@" + varfile,
                           os.path.join(REPO, "site.yml")], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:])
        raise SystemExit("bench: %s run failed" % label)
    with open(out) as f:
        records = json.load(f)
    keep = os.path.join(REPO, "build", "bench")
    os.makedirs(keep, exist_ok=True)
    with open(os.path.join(keep, label + ".json"), "w") as f:
        json.dump(records, f, indent=1)
    remote = [r for r in records if r["status"] != "skipped" and r["action"] not in CONTROLLER_ACTIONS]
    restarts = [r["msg"] for r in records if r["task"].endswith("Schedule the restarts") and r["status"] == "ok"]
    return {"seconds": round(seconds, 1), "tasks": len(records), "changed": sum(r["changed"] for r in records),
            "module_calls": len(remote), "restarted": restarts[0].replace("restarting ", "").split(", ") if restarts else []}


TWO_HOSTS = {
    # name: (private link LOCAL:REMOTE:ADDRESS/PREFIX, groups)
    "bench-app": ("47411:47412:10.89.8.1/24", ["immich_database", "immich_redis", "immich_server"]),
    "bench-gpu": ("47412:47411:10.89.8.2/24", ["immich_ml"]),
}


def write_two_host_inventory(states, tmp):
    hosts = {}
    for name, state in states.items():
        hosts[name] = {"ansible_host": "127.0.0.1", "ansible_port": state["port"], "ansible_user": "root",
                       "ansible_python_interpreter": "/usr/bin/python3",
                       "ansible_ssh_private_key_file": state["identity_file"],
                       "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                       "immich_host_address": state["private"]["cidr"].split("/")[0]}
    groups = {g: {"hosts": {n: {} for n, (_link, gs) in TWO_HOSTS.items() if g in gs}}
              for g in ("immich_database", "immich_redis", "immich_server", "immich_ml")}
    with open(os.path.join(tmp, "hosts.yml"), "w") as f:
        json.dump({"all": {"children": {"immich": {"children": groups}}, "hosts": hosts}}, f)


def two_hosts(archive):
    """Boot the two VMs, prepare both, converge both with one site.yml run (in parallel)."""
    states = {}
    try:
        for name, (private, _groups) in TWO_HOSTS.items():
            states[name] = vm.up(name, forwards=[(0, 2283)] if name == "bench-app" else [], memory=3072,
                                 shares={"images": os.path.dirname(archive)}, private=vm.parse_private(private))
        with tempfile.TemporaryDirectory() as tmp:
            write_two_host_inventory(states, tmp)
            env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
            subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", os.path.join(tmp, "hosts.yml"),
                            os.path.join(REPO, "molecule", "shared", "prepare.yml")], cwd=REPO, env=env, check=True,
                           capture_output=True)
            return run_site(None, tmp, dict(demo.OFFLINE_VARS), "converge-two-hosts")
    finally:
        if "--keep" not in sys.argv:
            for name in TWO_HOSTS:
                vm.down(name)


def noop_only():
    """Re-measure the no-op run on a VM kept by --keep (for tuning); prints the slowest tasks."""
    state = vm.read_state(NAME)
    if not state:
        raise SystemExit("bench: no kept VM; run 'bench.py --keep' first")
    with tempfile.TemporaryDirectory() as tmp:
        demo.write_inventory(state, tmp)
        result = run_site(state, tmp, dict(demo.OFFLINE_VARS), "noop")
    with open(os.path.join(REPO, "build", "bench", "noop.json")) as f:
        records = json.load(f)
    print("no-op: %(seconds).1f s, %(tasks)d tasks, %(module_calls)d module calls, %(changed)d changed" % result)
    for r in sorted(records, key=lambda r: -r["seconds"])[:15]:
        print("  %6.2f s  %-8s %-32s %s" % (r["seconds"], r["status"], r["action"][-32:], r["task"][:70]))
    return 0


def main():
    if "--noop-only" in sys.argv:
        return noop_only()
    archive = images.build()
    t0 = time.time()
    state = vm.up(NAME, forwards=[(0, 2283)], memory=4096, shares={"images": os.path.dirname(archive)})
    boot = time.time() - t0
    report = {"vm_boot_seconds": round(boot, 1)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            demo.playbook(state, os.path.join(REPO, "molecule", "shared", "prepare.yml"), {}, tmp)
            extra = dict(demo.OFFLINE_VARS)
            report["converge"] = run_site(state, tmp, extra, "converge")
            report["noop"] = run_site(state, tmp, extra, "noop")
            report["one_variable"] = run_site(state, tmp, dict(extra, immich_redis_memory_max="600M"), "one-variable")
    finally:
        if "--keep" not in sys.argv:
            vm.down(NAME)
    if "--one-host" not in sys.argv:
        report["converge_two_hosts"] = two_hosts(archive)
        report["two_vs_one_host"] = round(report["converge_two_hosts"]["seconds"] / report["converge"]["seconds"], 2)
    report["reference_noop_seconds"] = REFERENCE_NOOP
    report["noop_ratio"] = round(report["noop"]["seconds"] / REFERENCE_NOOP, 2)
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    with open(os.path.join(REPO, "build", "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    c, n, o = report["converge"], report["noop"], report["one_variable"]
    print("\nbench (Debian 13 VM, qemu TCG, 2 vCPU):")
    print("  VM boot                      %7.1f s" % report["vm_boot_seconds"])
    print("  converge from bare VM        %7.1f s  %d tasks, %d module calls, %d changed" % (
        c["seconds"], c["tasks"], c["module_calls"], c["changed"]))
    print("  no-op re-run                 %7.1f s  %d tasks, %d module calls, %d changed" % (
        n["seconds"], n["tasks"], n["module_calls"], n["changed"]))
    print("  no-op vs containers.podman   %7.2f x  of ~%.0f s (target <= 0.5)" % (report["noop_ratio"], REFERENCE_NOOP))
    print("  one variable changed         %7.1f s  restarted: %s" % (o["seconds"], ", ".join(o["restarted"]) or "none"))
    if "converge_two_hosts" in report:
        t = report["converge_two_hosts"]
        print("  converge, 2 hosts in parallel %6.1f s  %d tasks, %d module calls (%.2f x the one-host converge)" % (
            t["seconds"], t["tasks"], t["module_calls"], report["two_vs_one_host"]))
    ok = n["changed"] == 0 and o["restarted"] == ["immich-redis.service"] and report["noop_ratio"] <= 0.5
    print("  %s" % ("targets met" if ok else "TARGETS MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
