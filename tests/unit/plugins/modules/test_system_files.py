"""The system_files module as Ansible runs it: args in, result out, systemctl recorded (not run)."""

import os
import stat

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.homelab.immich.plugins.modules import system_files as mod


class Exit(Exception):
    pass


class Fail(Exception):
    pass


@pytest.fixture(autouse=True)
def patch_exit(monkeypatch):
    def exit_json(self, **kw):
        raise Exit(kw)

    def fail_json(self, **kw):
        raise Fail(kw)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", lambda self, name, required=False: "/bin/" + name)


@pytest.fixture
def systemd(monkeypatch):
    """A fake systemctl: `show` answers from .state, every other verb is recorded (rc from .rc)."""
    class Fake:
        state = {"UnitFileState": "enabled", "ActiveState": "active", "LoadState": "loaded"}
        calls = []
        rc = {}

    def run_command(self, args, **kw):
        verb = args[1]
        if verb == "show":
            return 0, "".join("%s=%s\n" % kv for kv in Fake.state.items()), ""
        Fake.calls.append(verb)
        return Fake.rc.get(verb, 0), "", "boom" if Fake.rc.get(verb) else ""

    Fake.calls = []
    monkeypatch.setattr(basic.AnsibleModule, "run_command", run_command)
    return Fake


def run(args, check=False, diff=False):
    args = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
    with patch_module_args(args):
        try:
            mod.main()
        except Exit as e:
            return "ok", e.args[0]
        except Fail as e:
            return "failed", e.args[0]
    raise AssertionError("module returned without exit_json/fail_json")


def files(tmp_path):
    return [{"dest": str(tmp_path / "bin" / "script"), "content": "#!/bin/sh\necho hi\n", "mode": "0755"},
            {"dest": str(tmp_path / "bin" / "settings.json"), "content": "{}\n", "mode": "0600"}]


def test_writes_what_is_missing_then_changes_nothing(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    status, r = run({"files": files(tmp_path)})
    assert status == "ok" and r["changed"] and len(r["changed_files"]) == 2
    st = os.stat(tmp_path / "bin" / "settings.json")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
    assert (tmp_path / "bin" / "script").read_text() == "#!/bin/sh\necho hi\n"
    assert not [p for p in os.listdir(tmp_path / "bin") if p.endswith(".tmp")]
    status, r = run({"files": files(tmp_path)})
    assert status == "ok" and not r["changed"] and r["changed_files"] == [] and systemd.calls == []


def test_check_mode_and_diff_write_nothing(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "script").write_text("old\n")
    os.chmod(tmp_path / "bin" / "script", 0o644)
    status, r = run({"files": files(tmp_path), "unit": "x.timer"}, check=True, diff=True)
    assert status == "ok" and r["changed"] and sorted(r["changed_files"]) == sorted(f["dest"] for f in files(tmp_path))
    assert (tmp_path / "bin" / "script").read_text() == "old\n" and not (tmp_path / "bin" / "settings.json").exists()
    by_file = {d["after_header"]: d for d in r["diff"]}
    script = by_file[str(tmp_path / "bin" / "script")]
    assert script["before"].startswith("mode 0644") and "old" in script["before"]
    assert script["after"].startswith("mode 0755") and "echo hi" in script["after"]
    assert r["unit_actions"] == ["daemon-reload"] and systemd.calls == []


def test_a_mode_or_content_change_alone_is_mended(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path)})
    os.chmod(tmp_path / "bin" / "settings.json", 0o644)
    status, r = run({"files": files(tmp_path)})
    assert r["changed_files"] == [str(tmp_path / "bin" / "settings.json")]
    assert stat.S_IMODE(os.stat(tmp_path / "bin" / "settings.json").st_mode) == 0o600


def test_directories_are_made_first_with_their_mode(tmp_path, systemd):
    d = tmp_path / "etc" / "prom"
    status, r = run({"directories": [{"path": str(d), "mode": "0750"}],
                     "files": [{"dest": str(d / "rules.yml"), "content": "groups: []\n"}]})
    assert status == "ok" and r["changed_directories"] == [str(d)]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750 and (d / "rules.yml").read_text() == "groups: []\n"
    os.chmod(d, 0o755)
    status, r = run({"directories": [{"path": str(d), "mode": "0750"}],
                     "files": [{"dest": str(d / "rules.yml"), "content": "groups: []\n"}]})
    assert r["changed_directories"] == [str(d)] and r["changed_files"] == []


@pytest.mark.parametrize("bad, words", [
    ({"dest": "relative/file", "content": ""}, "must be absolute"),
    ({"dest": "/nonexistent-dir/file", "content": ""}, "does not exist (make it first"),
    ({"dest": "/tmp/x", "content": "", "mode": "rw"}, "not an octal permission"),
    ({"dest": "/tmp/x", "content": "", "owner": "no-such-user-here"}, "user 'no-such-user-here' does not exist"),
    ({"dest": "/tmp/x", "content": "", "group": "no-such-group-here"}, "group 'no-such-group-here' does not exist"),
])
def test_a_bad_entry_changes_nothing(tmp_path, systemd, bad, words):
    (tmp_path / "bin").mkdir()
    status, r = run({"files": files(tmp_path) + [bad], "unit": "x.timer"})
    assert status == "failed" and r["msg"].startswith("Nothing was changed") and words in r["msg"], r["msg"]
    assert os.listdir(tmp_path / "bin") == [] and systemd.calls == []


def test_something_else_in_the_way_is_refused(tmp_path, systemd):
    (tmp_path / "bin" / "script").mkdir(parents=True)
    status, r = run({"files": files(tmp_path)})
    assert status == "failed" and "not a regular file is in the way" in r["msg"]
    assert not (tmp_path / "bin" / "settings.json").exists()


def test_unit_enabled_and_started_only_when_needed(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path), "unit": "x.timer"})
    assert systemd.calls == ["daemon-reload"]  # written; already enabled and active
    systemd.calls.clear()
    systemd.state = {"UnitFileState": "disabled", "ActiveState": "inactive", "LoadState": "loaded"}
    status, r = run({"files": files(tmp_path), "unit": "x.timer"})
    assert r["changed"] and systemd.calls == ["enable", "start"] and r["unit_actions"] == ["enable", "start"]
    systemd.calls.clear()
    status, r = run({"files": files(tmp_path), "unit": "x.timer"}, check=True)
    assert r["changed"] and systemd.calls == []


def test_restart_when_a_file_changed(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    status, r = run({"files": files(tmp_path), "unit": "fw.service", "restart": True})
    assert systemd.calls == ["daemon-reload", "restart"]
    systemd.calls.clear()
    status, r = run({"files": files(tmp_path), "unit": "fw.service", "restart": True})
    assert not r["changed"] and systemd.calls == []


def test_a_failing_start_says_what_to_do(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    systemd.state = {"UnitFileState": "enabled", "ActiveState": "failed", "LoadState": "loaded"}
    systemd.rc = {"start": 1}
    status, r = run({"files": files(tmp_path), "unit": "x.timer"})
    assert status == "failed" and "systemctl start x.timer failed" in r["msg"] and "journalctl -u x.timer" in r["msg"]
    assert r["failed_action"] == "start"


def absent(tmp_path, unit="x.timer"):
    return {"state": "absent", "unit": unit, "files": [{"dest": f["dest"]} for f in files(tmp_path)]
            + [{"dest": str(tmp_path / "bin" / "never-written")}]}


def test_absent_stops_disables_removes_and_reloads_once_then_changes_nothing(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path)})
    status, r = run(absent(tmp_path))
    assert status == "ok" and r["changed"]
    assert sorted(r["removed_files"]) == sorted(f["dest"] for f in files(tmp_path))
    assert os.listdir(tmp_path / "bin") == []
    # stopped and disabled before its files go, one reload after
    assert systemd.calls == ["stop", "disable", "daemon-reload"] == r["unit_actions"]
    systemd.calls.clear()
    systemd.state = {"UnitFileState": "", "ActiveState": "inactive", "LoadState": "not-found"}
    status, r = run(absent(tmp_path))
    assert status == "ok" and not r["changed"] and r["removed_files"] == [] and systemd.calls == []


def test_absent_in_check_mode_with_diff_removes_nothing(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path)})
    systemd.calls.clear()
    status, r = run(absent(tmp_path), check=True, diff=True)
    assert status == "ok" and r["changed"] and len(r["removed_files"]) == 2 and systemd.calls == []
    assert sorted(os.listdir(tmp_path / "bin")) == ["script", "settings.json"]
    by_file = {d["before_header"]: d for d in r["diff"]}
    script = by_file[str(tmp_path / "bin" / "script")]
    assert "echo hi" in script["before"] and script["after"] == "" and script["after_header"].endswith("(absent)")


def test_absent_resets_a_failed_unit_even_when_its_files_are_gone(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    systemd.state = {"UnitFileState": "disabled", "ActiveState": "failed", "LoadState": "loaded"}
    status, r = run(absent(tmp_path))
    assert status == "ok" and r["changed"] and r["removed_files"] == [] and systemd.calls == ["reset-failed"]


def test_absent_refuses_what_is_not_a_file_and_changes_nothing(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path)})
    (tmp_path / "bin" / "a-directory").mkdir()
    systemd.calls.clear()
    args = absent(tmp_path)
    args["files"].append({"dest": str(tmp_path / "bin" / "a-directory")})
    status, r = run(args)
    assert status == "failed" and r["msg"].startswith("Nothing was changed") and "not a regular file" in r["msg"]
    assert sorted(os.listdir(tmp_path / "bin")) == ["a-directory", "script", "settings.json"] and systemd.calls == []
    status, r = run(dict(absent(tmp_path), directories=[{"path": str(tmp_path / "bin")}]))
    assert status == "failed" and "directories are only for state=present" in r["msg"] and systemd.calls == []


def test_absent_keeps_the_files_when_the_unit_does_not_stop(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    run({"files": files(tmp_path)})
    systemd.calls.clear()
    systemd.rc = {"stop": 1}
    status, r = run(absent(tmp_path))
    assert status == "failed" and "systemctl stop x.timer failed" in r["msg"] and "Nothing was removed" in r["msg"]
    assert sorted(os.listdir(tmp_path / "bin")) == ["script", "settings.json"]


def test_present_needs_content(tmp_path, systemd):
    (tmp_path / "bin").mkdir()
    status, r = run({"files": [{"dest": str(tmp_path / "bin" / "x")}]})
    assert status == "failed" and "no content (it is required with state=present)" in r["msg"]
