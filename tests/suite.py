"""`make test`: every layer, timed, and a table of where the time went.

    suite.py [LAYER ...]        the layers to run (default: all, in this order)
    suite.py --report           print the table of the last run again (build/timings/)
    suite.py --write-reference  make tests/timings-reference.json from the last run's figures

Layers: lint, sanity, unit, integration (each `make LAYER`; integration in two pytest workers), in
two lanes side by side (integration | lint -> sanity -> unit: measured alone, each kept one of the
two cores idle), each layer's output in build/timings/LAYER.log and printed when it ends, then the molecule scenarios
(`tests/vm/scenario.py`), one after another; MOLECULE_LANES=N runs them in N lanes side by side
(measured on 2 cores: the TCG guests keep both cores busy, 57-100 % in every stage, and two VMs
booting together took 123 s each against ~50 s alone, so one lane is the default). The caches the VM
scenarios need (the VM image, the test images, the preloaded disk layer: `make prebuild`) are
built while the local layers run, in a second process; the scenarios wait for it. The first
failing layer stops the run, as before; the table is printed and written in every case
(build/timings/report.json and report.txt).

The table names every stage (a layer, a cache, a scenario stage) whose time grew by more than 20 %
(and at least 5 s, so that a 2 s stage taking 3 s is not noise worth reading) against the
committed reference, tests/timings-reference.json. It is a report: no time fails the suite.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "build", "timings")
REFERENCE = os.path.join(HERE, "timings-reference.json")
LOCAL_LAYERS = ["lint", "sanity", "unit", "integration"]
# the local layers in lanes run side by side, each lane's layers one after another
LOCAL_LANES = [["integration"], ["lint", "sanity", "unit"]]
GROWTH = 0.20
GROWTH_FLOOR = 5.0
BIN = os.path.dirname(sys.executable)
# the toolchain of the interpreter running this (.venv) for every layer, as `make` sets it
os.environ["PATH"] = BIN + os.pathsep + os.environ.get("PATH", "")


def scenarios():
    names = os.environ.get("SCENARIOS", "").split()
    if names:
        return names
    return sorted(d for d in os.listdir(os.path.join(REPO, "molecule"))
                  if os.path.exists(os.path.join(REPO, "molecule", d, "molecule.yml")))


def side_by_side(lane, lanes):
    """lane(names) for each list of names in LANES, each in its own thread; returns when all ended."""
    threads = [threading.Thread(target=lane, args=(names,)) for names in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_local_layers(wanted, layers):
    """The local layers of WANTED in LOCAL_LANES side by side; a failing layer stops every lane
    before its next layer. Each layer's output goes to build/timings/LAYER.log and is printed
    whole when the layer ends (one layer at a time, so outputs do not mix). True when all passed."""
    failed = []
    lock = threading.Lock()

    def lane(names):
        for name in names:
            if name not in wanted or failed:
                continue
            path = os.path.join(OUT, "%s.log" % name)
            with open(path, "w") as log:
                rc, secs = make(name, log)
            with lock:
                layers[name] = (rc, secs)
                with open(path, errors="replace") as f:
                    print("== %s (%s in %.0f s)\n%s" % (name, "passed" if rc == 0 else "FAILED", secs, f.read()), flush=True)
                if rc != 0:
                    failed.append(name)

    side_by_side(lane, LOCAL_LANES)
    return not failed


def make(target, log=None):
    t0 = time.time()
    proc = subprocess.run(["make", "--no-print-directory", target], cwd=REPO, check=False,
                          stdout=log, stderr=subprocess.STDOUT if log else None)
    return proc.returncode, round(time.time() - t0, 1)


class Prebuild:
    """`make prebuild` in a second process, its output in build/timings/prebuild.log."""

    def __init__(self):
        self.t0 = time.time()
        self.log = open(os.path.join(OUT, "prebuild.log"), "w")
        self.proc = subprocess.Popen(["make", "--no-print-directory", "prebuild"], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.seconds = None

    def wait(self):
        rc = self.proc.wait()
        self.seconds = round(time.time() - self.t0, 1)
        self.log.close()
        return rc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.wait()


def load(name):
    try:
        with open(os.path.join(OUT, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(layers):
    """The figures of this run: layer times, cache hits and misses, scenario stages."""
    figures = {"layers": {}, "caches": {}, "stages": {}, "cpu": {}, "failed": []}
    for name, (rc, secs) in layers.items():
        figures["layers"][name] = secs
        if rc != 0:
            figures["failed"].append(name)
    prebuild = load("prebuild.json") or {}
    for name, entry in prebuild.get("caches", {}).items():
        figures["caches"][name] = entry
    if os.environ.get("HOMELAB_VENV_CACHE") in ("hit", "miss"):
        figures["caches"]["venv"] = {"hit": os.environ["HOMELAB_VENV_CACHE"] == "hit",
                                     "seconds": float(os.environ.get("HOMELAB_VENV_SECONDS") or 0), "key": ".venv"}
    for scenario in scenarios():
        report = load("%s.json" % scenario)
        if not report or ("molecule/" + scenario) not in layers:
            continue
        for stage, secs in report["stages"].items():
            if stage in ("vm-image", "test-images"):
                continue
            figures["stages"]["%s/%s" % (scenario, stage)] = secs
            cpu = report.get("cpu_busy_percent", {}).get(stage)
            if cpu is not None:
                figures["cpu"]["%s/%s" % (scenario, stage)] = cpu
    return figures


def grown(now, ref):
    return ref is not None and now > ref * (1 + GROWTH) and now - ref >= GROWTH_FLOOR


def table(figures, reference):
    ref = reference or {}
    lines = []
    flagged = []

    def row(kind, name, secs, ref_secs, extra=""):
        mark = ""
        if grown(secs, ref_secs):
            flagged.append(name)
            # a reference of 0 s (a cache hit, a wait that did not happen) grows without a ratio
            mark = "GREW +%d%%" % round(100 * (secs - ref_secs) / ref_secs) if ref_secs > 0 else "GREW from 0"
        lines.append("  %-9s %-34s %8.1f s %10s  %-10s %s" % (
            kind, name, secs, "%.1f s" % ref_secs if ref_secs is not None else "-", mark, extra))

    lines.append("where the time went (reference: tests/timings-reference.json; GREW: > %d %% and >= %d s over it)"
                 % (round(GROWTH * 100), GROWTH_FLOOR))
    lines.append("  %-9s %-34s %10s %10s  %s" % ("kind", "name", "this run", "reference", "note"))
    for name, entry in figures["caches"].items():
        key = "%s/%s" % (name, "hit" if entry["hit"] else "miss")
        row("cache", key, entry["seconds"], ref.get("caches", {}).get(key), entry.get("key", ""))
    for name, secs in figures["layers"].items():
        row("layer", name, secs, ref.get("layers", {}).get(name),
            "FAILED" if name in figures["failed"] else "")
    for name, secs in figures["stages"].items():
        cpu = figures["cpu"].get(name)
        row("stage", name, secs, ref.get("stages", {}).get(name), "cpu %d %%" % cpu if cpu is not None else "")
    total = figures.get("total")
    if total is not None:
        row("total", "make test", total, ref.get("total"))
    lines.append("grew against the reference: %s" % (", ".join(flagged) if flagged else "nothing"))
    return "\n".join(lines)


def read_reference():
    try:
        with open(REFERENCE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report(figures):
    text = table(figures, read_reference())
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(figures, f, indent=1)
    with open(os.path.join(OUT, "report.txt"), "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)


FAILURE_MARKS = re.compile(r"FAILED|ERROR|fatal:|failed: \[|Error\b|^E +")


def why_failed(name):
    """The lines of a failed layer's output that say what failed, for the very end of the output
    (where a CI log that keeps only its tail still shows them): a scenario's failed tests, failed
    tasks and failed stage from build/timings/<scenario>.log, or a local layer's from its LAYER.log."""
    if not name.startswith("molecule/") and name not in LOCAL_LAYERS:
        return "FAILED: %s (its output is above the table)" % name
    path = os.path.join(OUT, "%s.log" % name.split("/", 1)[-1])
    colour = re.compile(r"\x1b\[[0-9;]*m")
    try:
        with open(path, errors="replace") as f:
            lines = [colour.sub("", line).strip(" \u2502\n") for line in f]
    except OSError:
        return "FAILED: %s (no log at %s)" % (name, path)
    marked = [line for line in lines if FAILURE_MARKS.search(line)]
    said = "\n  ".join(marked[-40:]) or "(nothing marked)"
    return "FAILED: %s; what its log (%s) says failed:\n  %s" % (name, os.path.relpath(path, REPO), said)


def write_reference():
    figures = load("report.json")
    if not figures:
        print("no build/timings/report.json: run make test first", file=sys.stderr)
        return 2
    if figures["failed"]:
        print("the last run failed (%s): a reference comes from a passing run" % ", ".join(figures["failed"]),
              file=sys.stderr)
        return 2
    try:
        with open(REFERENCE) as f:
            reference = json.load(f)
    except (OSError, ValueError):
        reference = {}
    for kind in ("layers", "stages"):
        reference.setdefault(kind, {}).update(figures[kind])
    reference.setdefault("caches", {}).update(
        {"%s/%s" % (k, "hit" if v["hit"] else "miss"): v["seconds"] for k, v in figures["caches"].items()})
    if "total" in figures:
        reference["total"] = figures["total"]
    with open(REFERENCE, "w") as f:
        json.dump(reference, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s" % REFERENCE)
    return 0


def lanes_for(names, count, reference):
    """Scenarios split into COUNT lanes run side by side, longest first onto the least loaded lane
    (by the reference's scenario totals; unknown ones count as long)."""
    totals = (reference or {}).get("layers", {})
    order = sorted(names, key=lambda n: -totals.get("molecule/" + n, 3600))
    lanes = [[] for lane in range(max(1, min(count, len(names))))]
    loads = [0.0] * len(lanes)
    for name in order:
        i = loads.index(min(loads))
        lanes[i].append(name)
        loads[i] += totals.get("molecule/" + name, 3600)
    return lanes


def run_scenarios(layers):
    """Each lane runs its scenarios one after another, the lanes side by side; a failed scenario
    stops its lane and no lane starts another one. Each scenario's output: build/timings/NAME.log."""
    count = int(os.environ.get("MOLECULE_LANES", "1"))
    lanes = lanes_for(scenarios(), count, read_reference())
    print("molecule: %d lane(s): %s" % (len(lanes), " | ".join(" -> ".join(lane) for lane in lanes)), flush=True)
    failed = []
    lock = threading.Lock()

    def lane(names):
        for name in names:
            if failed:
                return
            with lock:
                print("== molecule %s: started (output: build/timings/%s.log)" % (name, name), flush=True)
            t = time.time()
            with open(os.path.join(OUT, "%s.log" % name), "w") as log:
                proc = subprocess.run([sys.executable, os.path.join(HERE, "vm", "scenario.py"), name], cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT, check=False)
            secs = round(time.time() - t, 1)
            with lock:
                layers["molecule/" + name] = (proc.returncode, secs)
                with open(os.path.join(OUT, "%s.log" % name), errors="replace") as f:
                    text = f.read()
                if proc.returncode != 0:
                    failed.append(name)
                    print("== molecule %s: FAILED after %.0f s; the end of its output:\n%s" % (name, secs, text[-12000:]))
                else:
                    print("== molecule %s: passed in %.0f s%s" % (name, secs, text[text.rfind("\nscenario "):]), flush=True)

    side_by_side(lane, lanes)
    return not failed


def main(argv):
    if "--report" in argv:
        figures = load("report.json")
        if not figures:
            return 2
        report(figures)
        return 0
    if "--write-reference" in argv:
        return write_reference()
    wanted = argv or LOCAL_LAYERS + ["molecule"]
    os.makedirs(OUT, exist_ok=True)
    for stale in ("report.json", "report.txt", "prebuild.json"):
        if os.path.exists(os.path.join(OUT, stale)):
            os.unlink(os.path.join(OUT, stale))
    t0 = time.time()
    layers = {}
    prebuild = None
    if "molecule" in wanted:
        prebuild = Prebuild()
    ok = True
    try:
        ok = run_local_layers(wanted, layers)
        if ok and prebuild:
            t = time.time()
            rc = prebuild.wait()
            layers["prebuild (waited for)"] = (rc, round(time.time() - t, 1))
            if rc != 0:
                with open(os.path.join(OUT, "prebuild.log")) as f:
                    print(f.read()[-4000:])
                ok = False
        if ok and "molecule" in wanted:
            ok = run_scenarios(layers)
    finally:
        if prebuild:
            prebuild.stop()
        figures = collect(layers)
        if prebuild and prebuild.seconds is not None:
            figures["layers"]["prebuild (background)"] = prebuild.seconds
        figures["total"] = round(time.time() - t0, 1)
        report(figures)
        for name in figures["failed"]:
            print(why_failed(name), flush=True)
    if ok:
        print("make test: all layers passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
