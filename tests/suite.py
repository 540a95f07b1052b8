"""`make test`: every layer, timed, and a table of where the time went.

    suite.py [LAYER ...]        the layers to run (default: all)
    suite.py --report           print the table of the last run again (build/timings/)
    suite.py --write-reference  make tests/timings-reference.json from the last run's figures

Layers: lint, sanity, unit, integration (each `make LAYER`; integration in two pytest workers) and the
molecule scenarios (`tests/vm/scenario.py NAME`), each a job; TEST_LANES (default 2) jobs run side by
side, one per core, and a scenario of N VMs takes N lanes (multihost's two run alone, never three
guests on two cores). A job starts when its lanes are free and what it needs exists: the local layers need
nothing and go first (a wrong line fails in minutes, not at the end); a scenario needs the caches its
VMs boot from (the VM image, the test images, the preloaded disk layer: `make prebuild`, built in a
second process meanwhile) and, when it resumes another scenario's converged image (faults, day2,
update over default's), that scenario's image, made while that scenario runs. Among the jobs that can
start, the one with the longest way to the end goes first (its reference time plus the longest chain
of jobs waiting for it), so default, which the converged-image scenarios wait for, starts as soon as
it can. Two lanes on two cores: the TCG guests and the local layers leave a core idle much of the time
when run alone (every stage's `cpu` column), and two VMs side by side each went as fast as alone on
one vCPU (tests measured in docs/testing.md). The first failing job stops the run: no job starts
after it, the running ones end. Each job's output goes to build/timings/NAME.log, printed whole when a
local layer ends, and a scenario's tail when it fails. The table is printed and written in every
case (build/timings/report.json and report.txt).

The table names every stage (a layer, a cache, a scenario stage) whose time grew by more than 20 %
(and at least 5 s, so that a 2 s stage taking 3 s is not noise worth reading) against the
committed reference, tests/timings-reference.json. It is a report: no time fails the suite.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "build", "timings")
REFERENCE = os.path.join(HERE, "timings-reference.json")
# in this order when nothing else decides (the ones that fail fastest first)
LOCAL_LAYERS = ["lint", "sanity", "unit", "integration"]
LANES = int(os.environ.get("TEST_LANES", "2"))
if LANES > 1:
    # one vCPU per VM when jobs share the cores (tests/vm/vm.py, CPUS)
    os.environ.setdefault("HOMELAB_VM_CPUS", "1")
UNKNOWN_SECONDS = 600.0  # a job the reference does not know yet counts as this long
GROWTH = 0.20
GROWTH_FLOOR = 5.0
BIN = os.path.dirname(sys.executable)
# the toolchain of the interpreter running this (.venv) for every layer, as `make` sets it
os.environ["PATH"] = BIN + os.pathsep + os.environ.get("PATH", "")


def scenario_names():
    names = os.environ.get("SCENARIOS", "").split()
    if names:
        return names
    return sorted(d for d in os.listdir(os.path.join(REPO, "molecule"))
                  if os.path.exists(os.path.join(REPO, "molecule", d, "molecule.yml")))


class Prebuild:
    """`make prebuild` in a second process, its output in build/timings/prebuild.log; ready() says which
    of the caches the scenarios boot from exist so far."""

    def __init__(self):
        self.t0 = time.time()
        self.log = open(os.path.join(OUT, "prebuild.log"), "w")
        self.proc = subprocess.Popen(["make", "--no-print-directory", "prebuild"], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.seconds = None
        self.made = set()
        self.waiter = threading.Thread(target=self._wait)
        self.waiter.start()
        sys.path.insert(0, os.path.join(HERE, "vm"))
        sys.path.insert(0, os.path.join(HERE, "images"))
        import build as images  # noqa: E402  (tests/images/build.py)
        import vm  # noqa: E402  (tests/vm/vm.py)
        self.images, self.vm = images, vm

    def _wait(self):
        self.proc.wait()
        self.seconds = round(time.time() - self.t0, 1)
        self.log.close()

    def ready(self):
        """The caches made so far, by the names of build/timings/prebuild.json's (where prebuild.py
        leaves each; the preloaded layer's key covers the archive's size, known once it exists)."""
        archive = self.images.archive_path()
        paths = {"vm-image": os.path.join(self.vm.image_dir(), "DONE"), "test-images": archive}
        if os.path.exists(archive):
            paths["preload-layer"] = self.vm.preload_path(archive)
        self.made.update(name for name, path in paths.items() if os.path.exists(path))
        return self.made

    def stop(self):
        """Wait for it (terminate it first when a failure ended the run early); its return code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.waiter.join()
        return self.proc.returncode


def load(name):
    try:
        with open(os.path.join(OUT, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(layers, starts=None):
    """The figures of this run: layer times (and when each started), cache hits and misses, scenario stages."""
    figures = {"layers": {}, "caches": {}, "stages": {}, "cpu": {}, "failed": [], "started": dict(starts or {})}
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
    for scenario in scenario_names():
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
        started = figures.get("started", {}).get(name)
        row("layer", name, secs, ref.get("layers", {}).get(name),
            " ".join(([] if started is None else ["started at +%.0f s" % started])
                     + (["FAILED"] if name in figures["failed"] else [])))
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


class Job:
    """One layer: a local one (`make NAME`) or a molecule scenario (`scenario.py NAME`). needs: what
    must exist before it starts (names of the prebuild's caches, or converged:SCENARIO)."""

    def __init__(self, name, command, needs=(), local=False, makes_converged=False, width=1):
        self.name, self.command, self.needs, self.local = name, command, list(needs), local
        self.width = width  # the lanes (cores) it keeps busy: one per VM of a scenario
        self.makes_converged = makes_converged  # leaves a converged image others resume
        self.started = self.ended = self.rc = None

    @property
    def key(self):
        """Its row in the table: the local layer's name, molecule/NAME for a scenario."""
        return self.name if self.local else "molecule/" + self.name


def scenario_jobs(names):
    """A job for each scenario, in the order scenario.py runs them alone, with what each one's VMs need."""
    sys.path.insert(0, os.path.join(HERE, "vm"))
    import scenario as scenarios  # noqa: E402  (tests/vm/scenario.py)
    jobs = []
    for name in scenarios.in_order(names):
        config = scenarios.scenario_config(name)
        needs = ["vm-image", "test-images"] + (["preload-layer"] if scenarios.needs_preload(config) else [])
        needs += ["converged:" + n for n in scenarios.needs_converged(config)]
        jobs.append(Job(name, [sys.executable, os.path.join(HERE, "vm", "scenario.py"), name], needs,
                        makes_converged=scenarios.produces_converged(config),
                        width=max(1, len(config.get("platforms", [])))))
    return jobs, scenarios


def priorities(jobs, reference):
    """Which job a free lane takes first: the scenario heading the longest chain (its reference time
    plus the longest chain of jobs that wait for its converged image: the run cannot end before that
    chain does), then the local layers (they fail in minutes when they fail), then the rest, each
    group longest chain first."""
    seconds = {j.name: (reference or {}).get("layers", {}).get(j.key, UNKNOWN_SECONDS) for j in jobs}
    waiting = {j.name: [w.name for w in jobs if "converged:" + j.name in w.needs] for j in jobs}

    def chain(name):
        return seconds[name] + max([chain(w) for w in waiting[name]] or [0.0])
    chains = {j.name: chain(j.name) for j in jobs}
    head = max((j for j in jobs if not j.local), key=lambda j: chains[j.name], default=None)
    return {j.name: (2 if j is head else 1 if j.local else 0, chains[j.name]) for j in jobs}


class Scheduler:
    """Runs JOBS in LANES side by side (see the module's docstring); layers[key] = (rc, seconds)."""

    def __init__(self, jobs, lanes, layers, prebuild=None, scenarios=None, reference=None):
        self.jobs, self.lanes, self.layers = jobs, max(1, lanes), layers
        self.prebuild, self.scenarios = prebuild, scenarios
        self.priority = priorities(jobs, reference)
        self.t0 = time.time()
        self.failed = []
        self.busy = 0  # the widths of the jobs running now
        self.starts = {}  # key: seconds after the start of the run
        self.lock = threading.Lock()
        for job in jobs:
            if job.makes_converged:
                # an earlier run's converged image: never booted by this run (so one there is this run's)
                shutil.rmtree(scenarios.converged_dir(job.name), ignore_errors=True)

    def have(self, need):
        """True when NEED exists, False while it may still come, or the reason it never will."""
        if need.startswith("converged:"):
            maker = need.split(":", 1)[1]
            if os.path.exists(os.path.join(self.scenarios.converged_dir(maker), "DONE.json")):
                return True
            job = next(j for j in self.jobs if j.name == maker)  # scenario.in_order() added it
            return "%s left no converged image" % maker if job.rc is not None else False
        if need in self.prebuild.ready():
            return True
        if self.prebuild.proc.poll() is not None:
            return "the prebuild ended without %s (build/timings/prebuild.log)" % need
        return False

    def next_job(self):
        """The waiting job with the longest way to the end among those that can start (None if none
        can yet); a job that never can is failed on the spot."""
        ready = []
        for job in self.jobs:
            if job.started is not None:
                continue
            states = [self.have(need) for need in job.needs]
            never = [s for s in states if isinstance(s, str)]
            if never:
                job.started = job.ended = time.time()
                job.rc = 1
                self.finish(job, "not started: %s" % "; ".join(never))
                continue
            if all(s is True for s in states) and (self.busy == 0 or self.busy + job.width <= self.lanes):
                ready.append(job)
        if not ready or self.failed:
            return None
        job = max(ready, key=lambda j: self.priority[j.name])
        job.started = time.time()
        self.busy += job.width
        return job

    def finish(self, job, text):
        secs = round(job.ended - job.started, 1)
        self.layers[job.key] = (job.rc, secs)
        self.starts[job.key] = round(job.started - self.t0, 1)
        if job.rc != 0:
            self.failed.append(job.name)
        if job.local:
            print("== %s (%s in %.0f s)\n%s" % (job.name, "passed" if job.rc == 0 else "FAILED", secs, text), flush=True)
        elif job.rc != 0:
            print("== molecule %s: FAILED after %.0f s; the end of its output:\n%s" % (job.name, secs, text[-12000:]),
                  flush=True)
        else:
            print("== molecule %s: passed in %.0f s%s" % (job.name, secs, text[text.rfind("\nscenario "):]), flush=True)

    def lane(self, number):
        while True:
            with self.lock:
                if self.failed or all(j.started is not None for j in self.jobs):
                    return
                job = self.next_job()
                if job is not None:
                    print("== %s: started in lane %d at +%.0f s (output: build/timings/%s.log)"
                          % (job.key, number, job.started - self.t0, job.name), flush=True)
            if job is None:
                time.sleep(2)
                continue
            path = os.path.join(OUT, "%s.log" % job.name)
            with open(path, "w") as log:
                job.rc = subprocess.run(job.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        check=False).returncode
            job.ended = time.time()
            with open(path, errors="replace") as f:
                text = f.read()
            with self.lock:
                self.busy -= job.width
                self.finish(job, text)

    def run(self):
        """All jobs in the lanes; True when every one passed."""
        print("jobs: %s; %d lane(s)" % (", ".join(j.key for j in self.jobs), self.lanes), flush=True)
        threads = [threading.Thread(target=self.lane, args=(n + 1,)) for n in range(self.lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return not self.failed


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
    unknown = [w for w in wanted if w not in LOCAL_LAYERS + ["molecule"]]
    if unknown:
        print("unknown layer(s): %s (layers: %s)" % (", ".join(unknown), ", ".join(LOCAL_LAYERS + ["molecule"])),
              file=sys.stderr)
        return 2
    os.makedirs(OUT, exist_ok=True)
    for stale in ("report.json", "report.txt", "prebuild.json"):
        if os.path.exists(os.path.join(OUT, stale)):
            os.unlink(os.path.join(OUT, stale))
    t0 = time.time()
    layers = {}
    jobs = [Job(name, ["make", "--no-print-directory", name], local=True) for name in LOCAL_LAYERS if name in wanted]
    prebuild = scenarios = None
    if "molecule" in wanted:
        scenario_list, scenarios = scenario_jobs(scenario_names())
        jobs += scenario_list
        prebuild = Prebuild()
    scheduler = Scheduler(jobs, LANES, layers, prebuild, scenarios, read_reference())
    ok = False
    try:
        ok = scheduler.run()
    finally:
        if prebuild:
            prebuild.stop()
            if prebuild.proc.returncode:
                with open(os.path.join(OUT, "prebuild.log"), errors="replace") as f:
                    print("== prebuild FAILED; the end of its output:\n%s" % f.read()[-4000:], flush=True)
        figures = collect(layers, scheduler.starts)
        if prebuild and prebuild.seconds is not None:
            figures["layers"]["prebuild (background)"] = prebuild.seconds
        figures["total"] = round(time.time() - t0, 1)
        report(figures)
        not_run = [j.key for j in jobs if j.started is None]
        if not_run:
            print("not run (a job failed before they could start): %s" % ", ".join(not_run), flush=True)
        for name in figures["failed"]:
            print(why_failed(name), flush=True)
    if ok:
        print("make test: all layers passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
