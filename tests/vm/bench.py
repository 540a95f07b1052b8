"""`make bench`: what site.yml costs on the Debian 13 test VM (qemu TCG), side by side with a
reference on the same VM in the same run.

Measures, on one throwaway VM with the offline test images:
  - the floor: `ansible -m ping` (the median of three)
  - converge time from a bare VM (first site.yml run), tasks, module calls per host
  - no-op re-run time and module calls (targets: at most 3 module calls, <= 0.25 x the reference's
    no-op, <= 4 x the ping)
  - how many units restart when one service variable changes (must be exactly one)
  - the reference (tests/vm/bench_reference.yml): the same four services written the usual way
    with containers.podman (podman_network and podman_container state=quadlet, systemd_service per
    unit), rootless as a user of its own beside the site.yml deployment: its converge (site.yml's
    converge should cost <= 1.0 x it, though it does less) and its no-op. containers.podman comes
    from the `ansible` package pinned in requirements-bench.txt (a bench-only dependency), unpacked
    once into ~/.cache/homelab-immich/bench/
  - converge time for two hosts (app: database, Valkey, server; GPU host: ML) on a private link,
    both converged in parallel (forks), against the one-host converge above
Writes build/bench.json and prints a table. --one-host skips the two-host part.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))
sys.path.insert(0, os.path.join(HERE, "callback_plugins"))

import build as images  # noqa: E402
import demo  # noqa: E402  (inventory writing and the offline variables)
import tasktimes  # noqa: E402  (tests/vm/callback_plugins/tasktimes.py)
import vm  # noqa: E402

NAME = "bench"
BIN = os.path.dirname(sys.executable)
CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "homelab-immich", "bench")
REFERENCE = os.path.join(HERE, "bench_reference.yml")
TARGETS = {"noop_module_calls": 3, "noop_vs_reference": 0.25, "noop_vs_ping": 4.0, "converge_vs_reference": 1.0}
# the actions that run on the controller: the one list the scenario timings use too
CONTROLLER_ACTIONS = tasktimes.CONTROLLER


def reference_collections():
    """A collections directory holding containers.podman from the pinned `ansible` wheel (downloaded
    and unpacked once, keyed by the pin)."""
    with open(os.path.join(REPO, "requirements-bench.txt")) as f:
        pin = [line.strip() for line in f if line.strip() and not line.startswith("#")][0]
    target = os.path.join(CACHE, pin.replace("==", "-"))
    if os.path.isdir(os.path.join(target, "ansible_collections", "containers", "podman")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(BIN, "pip"), "download", "-q", "--no-deps", "-d", tmp, pin], check=True)
        wheel = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")][0]
        partial = target + ".tmp"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(partial, [n for n in z.namelist() if n.startswith("ansible_collections/containers/podman/")])
        os.replace(partial, target)
    return target


def ping(tmp):
    """Seconds for `ansible -m ping` on the VM (the median of three): Ansible's floor for one call."""
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
    times = []
    for _attempt in range(3):
        t0 = time.time()
        subprocess.run([os.path.join(BIN, "ansible"), "-i", os.path.join(tmp, "hosts.yml"), "all", "-m",
                        "ansible.builtin.ping"], cwd=REPO, env=env, check=True, capture_output=True)
        times.append(time.time() - t0)
    return round(statistics.median(times), 1)


def run_site(state, tmp, extra, label, playbook=None, collections=None):
    out = os.path.join(tmp, label + ".json")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"),
               ANSIBLE_CALLBACK_PLUGINS=os.path.join(HERE, "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="immich_bench", IMMICH_BENCH_OUT=out)
    if collections:
        env["ANSIBLE_COLLECTIONS_PATH"] = os.pathsep.join([os.path.join(REPO, ".collections"), collections])
    inv = os.path.join(tmp, "hosts.yml")
    varfile = os.path.join(tmp, label + "-vars.json")
    with open(varfile, "w") as f:
        json.dump(extra, f)
    t0 = time.time()
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", inv, "-e", "@" + varfile,
                           playbook or os.path.join(REPO, "site.yml")], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
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
            "module_calls": sum(r["calls"] for r in remote), "restarted": restarts[0].replace("restarting ", "").split(", ") if restarts else []}


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


def ratio(a, b):
    return round(a / b, 2) if b else None


def main():
    if "--noop-only" in sys.argv:
        return noop_only()
    archive = images.build()
    collections = reference_collections()
    t0 = time.time()
    state = vm.up(NAME, forwards=[(0, 2283)], memory=4096, shares={"images": os.path.dirname(archive)})
    boot = time.time() - t0
    report = {"vm_boot_seconds": round(boot, 1)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            demo.playbook(state, os.path.join(REPO, "molecule", "shared", "prepare.yml"), {}, tmp)
            extra = dict(demo.OFFLINE_VARS)
            report["ping_seconds"] = ping(tmp)
            report["converge"] = run_site(state, tmp, extra, "converge")
            report["noop"] = run_site(state, tmp, extra, "noop")
            report["one_variable"] = run_site(state, tmp, dict(extra, immich_redis_memory_max="600M"), "one-variable")
            report["reference_converge"] = run_site(state, tmp, {}, "reference-converge", REFERENCE, collections)
            report["reference_noop"] = run_site(state, tmp, {}, "reference-noop", REFERENCE, collections)
    finally:
        if "--keep" not in sys.argv:
            vm.down(NAME)
    if "--one-host" not in sys.argv:
        report["converge_two_hosts"] = two_hosts(archive)
        report["two_vs_one_host"] = round(report["converge_two_hosts"]["seconds"] / report["converge"]["seconds"], 2)
    c, n, o = report["converge"], report["noop"], report["one_variable"]
    rc, rn = report["reference_converge"], report["reference_noop"]
    report["ratios"] = {"noop_vs_reference": ratio(n["seconds"], rn["seconds"]),
                        "noop_vs_ping": ratio(n["seconds"], report["ping_seconds"]),
                        "converge_vs_reference": ratio(c["seconds"], rc["seconds"])}
    report["targets"] = TARGETS
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    with open(os.path.join(REPO, "build", "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    r = report["ratios"]
    print("\nbench (Debian 13 VM, qemu TCG, 2 vCPU; every row on the same VM in this run):")
    print("  VM boot                          %7.1f s" % report["vm_boot_seconds"])
    print("  ansible -m ping (floor)          %7.1f s  1 module call" % report["ping_seconds"])
    for label, x in (("site.yml converge from bare VM", c), ("site.yml no-op re-run", n),
                     ("site.yml one variable changed", o), ("reference converge", rc), ("reference no-op", rn)):
        print("  %-32s %7.1f s  %d tasks, %d module calls, %d changed" % (
            label, x["seconds"], x["tasks"], x["module_calls"], x["changed"]))
    print("  one variable changed restarted   %s" % (", ".join(o["restarted"]) or "none"))
    print("  no-op vs reference no-op         %7.2f x  (target <= %.2f)" % (r["noop_vs_reference"], TARGETS["noop_vs_reference"]))
    print("  no-op vs ping                    %7.2f x  (target <= %.1f)" % (r["noop_vs_ping"], TARGETS["noop_vs_ping"]))
    print("  converge vs reference converge   %7.2f x  (target <= %.1f)" % (
        r["converge_vs_reference"], TARGETS["converge_vs_reference"]))
    if "converge_two_hosts" in report:
        t = report["converge_two_hosts"]
        print("  converge, 2 hosts in parallel    %7.1f s  %d tasks, %d module calls (%.2f x the one-host converge)" % (
            t["seconds"], t["tasks"], t["module_calls"], report["two_vs_one_host"]))
    missed = [name for name, ok in (
        ("no-op changed something", n["changed"] == 0),
        ("one variable restarted %s" % o["restarted"], o["restarted"] == ["immich-redis.service"]),
        ("no-op module calls", n["module_calls"] <= TARGETS["noop_module_calls"]),
        ("no-op vs reference", r["noop_vs_reference"] <= TARGETS["noop_vs_reference"]),
        ("no-op vs ping", r["noop_vs_ping"] <= TARGETS["noop_vs_ping"]),
        ("converge vs reference", r["converge_vs_reference"] <= TARGETS["converge_vs_reference"])) if not ok]
    print("  %s" % ("targets met" if not missed else "TARGETS MISSED: " + "; ".join(missed)))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
