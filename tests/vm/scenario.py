"""Run molecule scenarios stage by stage, always destroy, and report how long each stage took.

    scenario.py NAME [NAME ...]

Stages follow each scenario's test_sequence. A scenario whose VMs resume another one's converged
image (platform key converged_from) runs after it; that one is run first when not named and its
image is not there (named alone, such a scenario reuses the image an earlier run left). Timings, how busy this machine's CPUs were during
each stage (a stage near 100 % is bound by the 2 cores; a low one waits), and whether the VM image
and the test images came from the cache are printed as a table and written to
build/timings/<name>.json (`make test` gathers them into its report). Every ansible-playbook a
stage runs (the verify stage's own included) writes each task's time to
build/timings/<name>.tasks.jsonl (tests/vm/callback_plugins/tasktimes.py); the table adds, per
stage, the tasks, the calls that reached a host and the time per playbook, and the slowest tasks.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))

import build as images  # noqa: E402  (tests/images/build.py)
import vm  # noqa: E402

# molecule and the playbooks it runs come from the interpreter's own bin directory (.venv)
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def cpu_times():
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def tasktimes_env(path, stage):
    """The environment that has every ansible-playbook of a stage (molecule's, and those its verify
    runs) write each task's time to PATH (tests/vm/callback_plugins/tasktimes.py)."""
    env = dict(os.environ, HOMELAB_TASKTIMES=path, HOMELAB_TASKTIMES_STAGE=stage)
    env["ANSIBLE_CALLBACK_PLUGINS"] = os.pathsep.join(
        [os.path.join(HERE, "callback_plugins")] + [p for p in [os.environ.get("ANSIBLE_CALLBACK_PLUGINS")] if p])
    env["ANSIBLE_CALLBACKS_ENABLED"] = ",".join(
        [c for c in os.environ.get("ANSIBLE_CALLBACKS_ENABLED", "").split(",") if c] + ["tasktimes"])
    return env


def slowest(path, count=12):
    """From a scenario's task lines: per stage its playbook runs, tasks and the calls that reached a
    host; the COUNT tasks that took longest in all (summed over runs)."""
    stages, tasks = {}, {}
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return {"stages": {}, "slowest": []}
    for t in lines:
        entry = stages.setdefault(t["stage"], {"seconds": 0.0, "tasks": 0, "host_calls": 0, "host_call_seconds": 0.0,
                                               "playbooks": {}})
        calls = (t["items"] or t["ran"]) if t["remote"] else 0
        entry["seconds"] += t["seconds"]
        entry["tasks"] += 1
        entry["host_calls"] += calls
        entry["host_call_seconds"] += t["seconds"] if calls else 0.0
        entry["playbooks"][t["playbook"]] = entry["playbooks"].get(t["playbook"], 0.0) + t["seconds"]
        key = "%s | %s" % (t["playbook"], t["task"])
        agg = tasks.setdefault(key, {"task": key, "action": t["action"], "runs": 0, "seconds": 0.0})
        agg["runs"] += 1
        agg["seconds"] += t["seconds"]
    for entry in stages.values():
        for k in ("seconds", "host_call_seconds"):
            entry[k] = round(entry[k], 1)
        entry["playbooks"] = {k: round(v, 1) for k, v in sorted(entry["playbooks"].items(), key=lambda kv: -kv[1])}
    top = sorted(tasks.values(), key=lambda a: -a["seconds"])[:count]
    for agg in top:
        agg["seconds"] = round(agg["seconds"], 1)
    return {"stages": stages, "slowest": top}


def molecule(stage, scenario, cpu=None, tasktimes=None):
    # the stage's name as in a test_sequence (side_effect), the command's as molecule spells it (side-effect)
    cmd = [os.path.join(os.path.dirname(sys.executable), "molecule"), stage.replace("_", "-"), "-s", scenario]
    t0 = time.time()
    busy0, total0 = cpu_times()
    proc = subprocess.run(cmd, cwd=REPO, check=False, env=tasktimes_env(tasktimes, stage) if tasktimes else None)
    busy1, total1 = cpu_times()
    if cpu is not None and total1 > total0:
        cpu[stage] = round(100.0 * (busy1 - busy0) / (total1 - total0))
    return proc.returncode, time.time() - t0


def merged(base, over):
    """molecule's merge of a molecule.yml over its base config: dicts key by key, all else replaced."""
    result = dict(base)
    for key, value in over.items():
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def scenario_config(scenario):
    """A scenario's configuration as molecule sees it: .config/molecule/config.yml (what every
    scenario shares, loaded by molecule from the repository root) with its molecule.yml over it."""
    with open(os.path.join(REPO, ".config", "molecule", "config.yml")) as f:
        base = yaml.safe_load(f)
    with open(os.path.join(REPO, "molecule", scenario, "molecule.yml")) as f:
        return merged(base, yaml.safe_load(f))


def converged_dir(scenario):
    """Where a scenario that converges from bare leaves its converged image (molecule/shared/snapshot.yml)."""
    return os.path.join(REPO, "build", "converged", scenario)


def produces_converged(config):
    """Whether a scenario keeps its converged VM as an image: its side_effect stage is the snapshot."""
    return ("side_effect" in config["scenario"]["test_sequence"]
            and config["provisioner"]["playbooks"].get("side_effect", "").endswith("shared/snapshot.yml"))


def needs_converged(config):
    """The scenarios whose converged image this one's VMs resume (platform key converged_from)."""
    return sorted({p["converged_from"] for p in config.get("platforms", []) if p.get("converged_from")})


def needs_preload(config):
    """Whether this one's VMs boot over the preloaded layer (platform key preload)."""
    return any(p.get("preload") for p in config.get("platforms", []))


def converged_usable(scenario):
    """Whether SCENARIO's converged image is there and can be resumed (vm.read_converged: made by this
    vm.py, over the cached layers as they are now)."""
    try:
        vm.read_converged(converged_dir(scenario))
    except SystemExit:
        return False
    return True


def in_order(names, add_makers=True):
    """NAMES with every scenario that makes a converged image before those that resume it,
    otherwise as given. ADD_MAKERS: a maker not named is added when its image is not there or cannot
    be resumed (named alone, a scenario that resumes one reuses the image an earlier run left)."""
    wanted = list(names)
    for name in names:
        for need in needs_converged(scenario_config(name)):
            if need not in wanted and add_makers and not converged_usable(need):
                wanted.insert(0, need)
    makers = [n for n in wanted if produces_converged(scenario_config(n))]
    return makers + [n for n in wanted if n not in makers]


def run(scenario):
    config = scenario_config(scenario)
    sequence = config["scenario"]["test_sequence"]
    sequence = [s for s in sequence if s != "destroy"]
    if produces_converged(config):
        # the converged image of an earlier run must never be booted by this run's scenarios
        shutil.rmtree(converged_dir(scenario), ignore_errors=True)
    for need in needs_converged(config):
        try:
            with open(os.path.join(converged_dir(need), "DONE.json")) as f:
                made = json.load(f)["made"]
        except (OSError, ValueError, KeyError):
            print("\nscenario %s: FAILED before create: it resumes the converged image of %s, and %s left none "
                  "(%s): run %s first (scenario.py runs it first when its image is missing)"
                  % (scenario, need, need, converged_dir(need), need), flush=True)
            return False
        print("scenario %s: resumes the converged image %s made at %s" % (scenario, converged_dir(need), made),
              flush=True)
    report = {"scenario": scenario, "stages": {}, "cpu_busy_percent": {}}
    instances = [p["name"] for p in config.get("platforms", [])]
    faults = [os.path.join(REPO, "build", "faults", "%s.json" % name) for name in instances]
    for path in faults:
        if os.path.exists(path):
            os.unlink(path)
    out = os.path.join(REPO, "build", "timings")
    os.makedirs(out, exist_ok=True)
    tasktimes = os.path.join(out, "%s.tasks.jsonl" % scenario)
    if os.path.exists(tasktimes):
        os.unlink(tasktimes)
    t0 = time.time()
    report["vm_image_cached"] = os.path.exists(os.path.join(vm.image_dir(), "DONE"))
    t = time.time()
    vm.build()
    report["stages"]["vm-image"] = round(time.time() - t, 1)
    report["test_images_cached"] = os.path.exists(images.archive_path())
    t = time.time()
    images.build()
    report["stages"]["test-images"] = round(time.time() - t, 1)
    failed = None
    try:
        rc, secs = molecule("destroy", scenario)
        for stage in sequence:
            rc, secs = molecule(stage, scenario, report["cpu_busy_percent"], tasktimes)
            report["stages"][stage] = round(secs, 1)
            if rc != 0:
                failed = stage
                break
    finally:
        rc, secs = molecule("destroy", scenario, report["cpu_busy_percent"])
        report["stages"]["destroy"] = round(secs, 1)
    report["total"] = round(time.time() - t0, 1)
    report["figures"] = {}
    for name, path in zip(instances, faults):
        if os.path.exists(path):
            with open(path) as f:
                report["figures"][name] = json.load(f)
    report["failed_stage"] = failed
    report["tasks"] = slowest(tasktimes)
    with open(os.path.join(out, "%s.json" % scenario), "w") as f:
        json.dump(report, f, indent=1)
    print("\nscenario %s: %s" % (scenario, "FAILED at %s" % failed if failed else "passed"))
    for stage, secs in report["stages"].items():
        cpu = report["cpu_busy_percent"].get(stage)
        print("  %-14s %7.1f s%s" % (stage, secs, "   cpu %3d %%" % cpu if cpu is not None else ""))
    print("  %-14s %7.1f s  (VM image %s, test images %s)" % (
        "total", report["total"], "cached" if report["vm_image_cached"] else "built",
        "cached" if report["test_images_cached"] else "built"))
    for stage, entry in report["tasks"]["stages"].items():
        print("  %-14s %d task(s) in %.0f s; %d call(s) to a host took %.0f s; by playbook: %s" % (
            stage, entry["tasks"], entry["seconds"], entry["host_calls"], entry["host_call_seconds"],
            ", ".join("%s %.0f s" % kv for kv in entry["playbooks"].items())))
    print("  slowest tasks (summed over every run; build/timings/%s.tasks.jsonl has each):" % scenario)
    for agg in report["tasks"]["slowest"]:
        print("    %7.1f s  %3d run(s)  %s  (%s)" % (agg["seconds"], agg["runs"], agg["task"], agg["action"]))
    for name, figures in report["figures"].items():
        print("  figures of %s:" % name)
        for key, value in sorted(figures.items()):
            print("    %-36s %s" % (key, json.dumps(value)))
    return failed is None


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    ok = True
    for scenario in in_order(argv):
        ok = run(scenario) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
