"""The time table of `make test` (tests/suite.py), its jobs in lanes, and the VM harness's port choice
(tests/vm/vm.py): growth against the reference is named, the longest chain starts first, a scenario
waits for the converged image it boots over, a failure starts nothing more, a port another VM holds
is not reused."""

import json
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def suite(load_script):
    return load_script("suite_under_test", os.path.join(ROOT, "tests", "suite.py"))


def figures(**stages):
    return {"layers": {"unit": 30.0}, "caches": {"vm-image": {"hit": False, "seconds": 95.0, "key": "vm/abc"}},
            "stages": stages, "cpu": {name: 50 for name in stages}, "failed": [], "total": 100.0}


def test_growth_is_more_than_20_percent_and_at_least_5_seconds(suite):
    assert suite.grown(121.0, 100.0)
    assert not suite.grown(119.0, 100.0)
    assert not suite.grown(3.9, 3.0)  # +30 %, but under a second: noise
    assert suite.grown(36.1, 30.0)
    assert not suite.grown(500.0, None)  # a new stage has nothing to grow from


def test_the_table_names_every_stage_that_grew(suite):
    ref = {"layers": {"unit": 29.0}, "stages": {"day2/verify": 600.0, "default/converge": 200.0},
           "caches": {"vm-image/miss": 94.0}, "total": 100.0}
    text = suite.table(figures(**{"day2/verify": 900.0, "default/converge": 201.0}), ref)
    grew = [line for line in text.splitlines() if line.startswith("  ") and "GREW" in line]
    assert len(grew) == 1 and "day2/verify" in grew[0] and "+50%" in grew[0]
    assert text.splitlines()[-1] == "grew against the reference: day2/verify"
    assert "vm-image/miss" in text and "cpu 50 %" in text


def test_a_row_that_took_no_time_in_the_reference_can_grow(suite):
    """A cold run waits for the prebuild the warm reference never waited for (0 s): named, no crash."""
    ref = {"layers": {"unit": 29.0, "prebuild (waited for)": 0.0}, "stages": {}, "caches": {}, "total": 100.0}
    now = figures()
    now["layers"]["prebuild (waited for)"] = 180.0
    text = suite.table(now, ref)
    assert "GREW from 0" in text and text.splitlines()[-1] == "grew against the reference: prebuild (waited for)"


def test_without_a_reference_nothing_grew(suite):
    text = suite.table(figures(**{"day2/verify": 900.0}), None)
    assert text.splitlines()[-1] == "grew against the reference: nothing"


def job(suite, name, needs=(), local=False, makes=False, rc=0, log=None, width=1, sleep=0.0):
    """A job whose command appends its name (then "/NAME" as it ends, after SLEEP seconds) to LOG (a
    file) and exits with RC."""
    script = ("import sys, time; open(%r, 'a').write(%r + '\\n'); print('output of %s'); time.sleep(%r); "
              "open(%r, 'a').write('/' + %r + '\\n'); sys.exit(%d)" % (str(log), name, name, sleep, str(log), name, rc))
    return suite.Job(name, [sys.executable, "-c", script], needs, local=local, makes_converged=makes, width=width)


class FakeScenarios:
    def __init__(self, root):
        self.root = root

    def converged_dir(self, name):
        return os.path.join(self.root, name)


class FakePrebuild:
    def __init__(self, made=("vm-image", "test-images", "preload-layer")):
        self.made = set(made)

        class Proc:
            @staticmethod
            def poll():
                return None
        self.proc = Proc

    def ready(self):
        return self.made


def test_the_longest_chain_goes_first_then_the_local_layers(suite):
    ref = {"layers": {"molecule/default": 400, "molecule/update": 700, "molecule/multihost": 900, "lint": 50,
                      "integration": 200}}
    jobs = [suite.Job("lint", [], local=True), suite.Job("integration", [], local=True),
            suite.Job("default", [], makes_converged=True), suite.Job("update", [], ["converged:default"]),
            suite.Job("multihost", [])]
    prio = suite.priorities(jobs, ref)
    # default heads the longest chain (400 + 700 > 900): first, even before the local layers
    assert max(prio, key=prio.get) == "default" and prio["default"][1] == 1100
    order = sorted(prio, key=prio.get, reverse=True)
    assert order == ["default", "integration", "lint", "multihost", "update"]
    assert suite.priorities([suite.Job("rocm", [])], None)["rocm"] == (2, suite.UNKNOWN_SECONDS)


def test_a_scenario_waits_for_the_converged_image_it_boots_over(suite, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "OUT", str(tmp_path))
    log = tmp_path / "order"
    made = tmp_path / "converged"
    (made / "default").mkdir(parents=True)
    (made / "default" / "DONE.json").write_text("{}")  # an earlier run's: removed before anything starts
    maker = job(suite, "default", makes=True, log=log)
    # the maker leaves its image as scenario.py's side_effect stage does
    maker.command[-1] = maker.command[-1].replace(
        "sys.exit(0)", "import os; os.makedirs(%r); open(%r, 'w').write('{}'); sys.exit(0)"
        % (str(made / "default"), str(made / "default" / "DONE.json")))
    jobs = [job(suite, "update", ["converged:default", "vm-image"], log=log), maker,
            job(suite, "lint", local=True, log=log)]
    layers = {}
    scheduler = suite.Scheduler(jobs, 2, layers, FakePrebuild(), FakeScenarios(str(made)), None)
    assert scheduler.run() is True
    order = [w for w in log.read_text().split() if not w.startswith("/")]
    assert order.index("default") < order.index("update") and sorted(order) == ["default", "lint", "update"]
    assert sorted(layers) == ["lint", "molecule/default", "molecule/update"]
    assert scheduler.starts["molecule/update"] >= scheduler.starts["molecule/default"]
    assert (tmp_path / "update.log").read_text() == "output of update\n"


def test_a_scenario_of_two_vms_takes_two_lanes(suite, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "OUT", str(tmp_path))
    log = tmp_path / "order"
    ref = {"layers": {"molecule/default": 400, "molecule/multihost": 300, "molecule/rootful": 200}}
    jobs = [job(suite, "default", log=log, sleep=1.0), job(suite, "multihost", log=log, width=2),
            job(suite, "rootful", log=log, sleep=1.0)]
    scheduler = suite.Scheduler(jobs, 2, {}, FakePrebuild(), FakeScenarios(str(tmp_path / "c")), ref)
    assert scheduler.run() is True
    events = log.read_text().split()
    # multihost outranks rootful, but its two VMs never share the cores with a third: rootful takes
    # the free lane, multihost starts when both lanes are free, and then runs alone
    assert events[:2] == ["default", "rootful"] or events[:2] == ["rootful", "default"]
    assert events.index("multihost") > max(events.index("/default"), events.index("/rootful"))
    assert scheduler.busy == 0
    # wider than all the lanes: it runs, alone
    log.write_text("")
    scheduler = suite.Scheduler([job(suite, "multihost", log=log, width=2)], 1, {}, FakePrebuild(),
                                FakeScenarios(str(tmp_path / "c")), None)
    assert scheduler.run() is True and log.read_text().split() == ["multihost", "/multihost"]


def test_a_failure_starts_nothing_more_and_a_missing_image_is_a_failure(suite, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "OUT", str(tmp_path))
    log = tmp_path / "order"
    # default ends without leaving its image: update never can start, and says why
    jobs = [job(suite, "default", makes=True, log=log), job(suite, "update", ["converged:default"], log=log)]
    layers = {}
    scheduler = suite.Scheduler(jobs, 1, layers, FakePrebuild(), FakeScenarios(str(tmp_path / "c")), None)
    assert scheduler.run() is False
    assert scheduler.failed == ["update"] and layers["molecule/update"][0] == 1
    # a failing job: no job starts after it, in any lane
    log.write_text("")
    jobs = [job(suite, "lint", local=True, rc=1, log=log), job(suite, "rocm", log=log), job(suite, "rootful", log=log)]
    scheduler = suite.Scheduler(jobs, 1, {}, FakePrebuild(), FakeScenarios(str(tmp_path / "c")), None)
    assert scheduler.run() is False
    assert log.read_text().split()[0] == "rocm" and "rootful" not in log.read_text().split()  # rocm heads, lint next
    # a cache the prebuild never made

    class Ended(FakePrebuild):
        def __init__(self):
            super().__init__(made=())

            class Proc:
                @staticmethod
                def poll():
                    return 2
            self.proc = Proc
    layers = {}
    scheduler = suite.Scheduler([job(suite, "rocm", ["vm-image"], log=log)], 1, layers, Ended(), None, None)
    assert scheduler.run() is False and layers["molecule/rocm"][0] == 1


def test_the_reference_is_written_only_from_a_passing_run(suite, monkeypatch, tmp_path):
    out, ref = tmp_path / "timings", tmp_path / "reference.json"
    out.mkdir()
    monkeypatch.setattr(suite, "OUT", str(out))
    monkeypatch.setattr(suite, "REFERENCE", str(ref))
    failed = dict(figures(**{"day2/verify": 900.0}), failed=["molecule/day2"])
    (out / "report.json").write_text(json.dumps(failed))
    assert suite.write_reference() == 2 and not ref.exists()
    (out / "report.json").write_text(json.dumps(figures(**{"day2/verify": 900.0})))
    assert suite.write_reference() == 0
    written = json.loads(ref.read_text())
    assert written["stages"] == {"day2/verify": 900.0} and written["caches"] == {"vm-image/miss": 95.0}


def test_a_port_held_by_another_run_directory_is_not_chosen(vm, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    held = listener.getsockname()[1]
    listener.close()
    os.makedirs(os.path.join(vm.RUNS, "other"))
    with open(os.path.join(vm.RUNS, "other", "state.json"), "w") as f:
        json.dump({"port": held, "forwards": [[held + 1, 2283]]}, f)
    offered = iter([held, held + 1, held + 2])

    class FakeSocket:
        def bind(self, _address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            pass

    monkeypatch.setattr(vm.socket, "socket", FakeSocket)
    taken = vm.ports_in_use()
    assert taken == {held, held + 1}
    assert vm.free_port(taken) == held + 2 and held + 2 in taken


def test_a_failed_scenario_is_explained_at_the_very_end(suite, monkeypatch, tmp_path):
    """The lines that say what failed are printed after the table (a CI log keeps only its tail)."""
    monkeypatch.setattr(suite, "OUT", str(tmp_path))
    (tmp_path / "day2.log").write_text(
        "\x1b[36mINFO\x1b[0m day2 \u279c converge: Executed: Successful\n"
        "  \x1b[2m\u2502\x1b[0m E       AssertionError: not healthy after 45 s\n"
        "  \x1b[2m\u2502\x1b[0m FAILED test_day2.py::test_restore - AssertionError\n"
        "  \x1b[2m\u2502\x1b[0m 12 passed in 99 s\n"
        "\x1b[31mERROR\x1b[0m    day2 \u279c verify: Executed: Failed\n"
        "scenario day2: FAILED at verify\n")
    text = suite.why_failed("molecule/day2")
    assert text.splitlines() == [
        "FAILED: molecule/day2; what its log (%s) says failed:" % os.path.relpath(str(tmp_path / "day2.log"), ROOT),
        "  E       AssertionError: not healthy after 45 s",
        "  FAILED test_day2.py::test_restore - AssertionError",
        "  ERROR    day2 \u279c verify: Executed: Failed",
        "  scenario day2: FAILED at verify"]
    assert "above the table" in suite.why_failed("prebuild (waited for)")
    # a local layer's output is in its own log too (the lanes run side by side)
    (tmp_path / "unit.log").write_text("tests/unit/test_x.py F\nFAILED tests/unit/test_x.py::test_y - assert 1 == 2\n")
    assert suite.why_failed("unit").splitlines()[1:] == ["  FAILED tests/unit/test_x.py::test_y - assert 1 == 2"]


def test_prebuild_builds_side_by_side_and_reports_a_failure_once_both_ended(load_script):
    prebuild = load_script("prebuild_under_test", os.path.join(ROOT, "tests", "vm", "prebuild.py"))
    caches = {}
    prebuild.side_by_side(caches, [("a", True, lambda: "A", "key-a"), ("b", False, lambda: "B", "key-b")])
    assert caches["a"]["hit"] and not caches["b"]["hit"] and caches["b"]["key"] == "key-b"
    ended = []

    def fails():
        raise SystemExit("debootstrap failed")

    with pytest.raises(SystemExit, match="debootstrap failed"):
        prebuild.side_by_side({}, [("bad", False, fails, ""), ("good", False, lambda: ended.append(1), "")])
    assert ended == [1]  # the other build was not cut short
