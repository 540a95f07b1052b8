"""The time table of `make test` (tests/suite.py) and the VM harness's port choice (tests/vm/vm.py):
growth against the reference is named, lanes are balanced, a port another VM holds is not reused."""

import json
import os
import socket

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def suite(load_script):
    return load_script("suite_under_test", os.path.join(ROOT, "tests", "suite.py"))


@pytest.fixture()
def vm(monkeypatch, tmp_path, load_script):
    module = load_script("vm_under_test", os.path.join(ROOT, "tests", "vm", "vm.py"))
    monkeypatch.setattr(module, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(module, "CACHE", str(tmp_path / "cache"))
    return module


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


def test_lanes_put_the_longest_first_and_balance_the_rest(suite):
    ref = {"layers": {"molecule/day2": 1800, "molecule/default": 800, "molecule/multihost": 600,
                      "molecule/rootful": 350, "molecule/rocm": 100}}
    lanes = suite.lanes_for(["default", "day2", "multihost", "rocm", "rootful"], 2, ref)
    assert lanes[0][0] == "day2" and lanes[1][:2] == ["default", "multihost"]
    assert sorted(sum(lanes, [])) == ["day2", "default", "multihost", "rocm", "rootful"]
    assert suite.lanes_for(["default", "day2"], 1, ref) == [["day2", "default"]]
    assert suite.lanes_for(["rocm"], 4, ref) == [["rocm"]]


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


def test_local_layers_run_in_lanes_and_a_failure_stops_the_next_layer(suite, monkeypatch, tmp_path):
    """integration beside lint -> sanity -> unit; each layer's output kept and printed whole;
    after a failing layer no lane starts another one."""
    monkeypatch.setattr(suite, "OUT", str(tmp_path))
    started = []

    def make(target, log=None):
        started.append(target)
        log.write("output of %s\n" % target)
        return (1 if target == "lint" else 0), 1.0

    monkeypatch.setattr(suite, "make", make)
    layers = {}
    assert suite.run_local_layers(suite.LOCAL_LAYERS, layers) is False
    assert "sanity" not in started and "unit" not in started  # lint failed: its lane stops
    assert layers["lint"] == (1, 1.0) and (tmp_path / "lint.log").read_text() == "output of lint\n"
    started.clear()
    monkeypatch.setattr(suite, "make", lambda target, log=None: (started.append(target), log.write("ok\n"), (0, 1.0))[-1])
    layers = {}
    assert suite.run_local_layers(["unit", "integration"], layers) is True
    assert sorted(started) == ["integration", "unit"] and sorted(layers) == ["integration", "unit"]
    assert sorted(layer for lane in suite.LOCAL_LANES for layer in lane) == sorted(suite.LOCAL_LAYERS)


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
