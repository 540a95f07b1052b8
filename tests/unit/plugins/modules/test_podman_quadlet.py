"""The podman_quadlet module as Ansible runs it: args in, result out.

The generator here is a stand-in script so these tests stay pure; tests/integration runs the same
module against the real quadlet generator.
"""

import json
import os
import pwd
import re

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.homelab.immich.plugins.modules import podman_quadlet as mod


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


@pytest.fixture
def calls(monkeypatch):
    recorded = []

    def run_command(self, args, **kw):
        recorded.append((list(args), kw.get("environ_update")))
        return 0, "", ""

    monkeypatch.setattr(basic.AnsibleModule, "run_command", run_command)
    return recorded


@pytest.fixture
def gen_ok(tmp_path):
    path = tmp_path / "gen-ok"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def gen_bad(tmp_path):
    path = tmp_path / "gen-bad"
    path.write_text("#!/bin/sh\ncat >&2 <<'EOF'\n"
                    "quadlet-generator[9]: converting \"web.container\": unsupported key 'Bogus' in group 'Container'\n"
                    "EOF\nexit 1\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def qdir(tmp_path):
    return str(tmp_path / "units")


def run(args, check=False, diff=False):
    args = dict(args)
    args["_ansible_check_mode"] = check
    args["_ansible_diff"] = diff
    with patch_module_args(args):
        try:
            mod.main()
        except Exit as e:
            return "ok", e.args[0]
        except Fail as e:
            return "failed", e.args[0]
    raise AssertionError("module returned without exit_json/fail_json")


WEB = {"name": "web", "type": "container",
       "sections": {"Container": {"Image": "docker.io/library/nginx:1", "Environment": {"A": "x y"}}}}


def base(qdir, gen, **kw):
    args = dict(WEB, quadlet_dir=qdir, generator=gen)
    args.update(kw)
    return args


def tree(path):
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def test_present_writes_reloads_and_is_idempotent(qdir, gen_ok, calls):
    status, res = run(base(qdir, gen_ok))
    assert status == "ok" and res["changed"]
    assert res["changed_services"] == ["web.service"]
    assert res["units"][0]["service"] == "web.service"
    assert res["daemon_reloaded"] is True
    assert calls == [(["systemctl", "daemon-reload"], None)]
    text = open(os.path.join(qdir, "web.container")).read()
    assert 'Environment="A=x y"' in text
    assert oct(os.stat(os.path.join(qdir, "web.container")).st_mode & 0o777) == "0o644"
    status, res = run(base(qdir, gen_ok))
    assert status == "ok" and not res["changed"] and res["changed_services"] == []
    assert len(calls) == 1, "no reload when nothing changed"


def test_check_mode_touches_nothing_but_reports_diff(qdir, gen_ok, calls):
    status, res = run(base(qdir, gen_ok), check=True, diff=True)
    assert status == "ok" and res["changed"]
    assert not os.path.exists(qdir)
    assert calls == []
    (d,) = res["diff"]
    assert d["before"] == "" and "Image=docker.io/library/nginx:1" in d["after"]
    assert "+Image=docker.io/library/nginx:1" in d["prepared"]


def test_diff_shows_change_of_each_file(qdir, gen_ok, calls):
    run(base(qdir, gen_ok, dropins={"10-mem.conf": {"Service": {"MemoryMax": "1G"}}}))
    status, res = run(base(qdir, gen_ok, dropins={"10-mem.conf": {"Service": {"MemoryMax": "2G"}}}), diff=True)
    assert status == "ok" and res["changed"]
    (d,) = res["diff"]
    assert d["before_header"].endswith("web.container.d/10-mem.conf")
    assert "-MemoryMax=1G" in d["prepared"] and "+MemoryMax=2G" in d["prepared"]
    assert res["changed_services"] == ["web.service"]


def test_units_list_one_reload(qdir, gen_ok, calls):
    status, res = run({"quadlet_dir": qdir, "generator": gen_ok, "units": [
        {"name": "photos", "type": "network", "sections": {"Network": {"Subnet": "10.89.5.0/24"}}},
        dict(WEB, sections={"Container": {"Image": "i", "Network": "photos.network"}}),
    ]})
    assert status == "ok"
    assert sorted(res["changed_services"]) == ["photos-network.service", "web.service"]
    assert calls == [(["systemctl", "daemon-reload"], None)]


def test_absent_removes_unit_and_dropins_and_stops(qdir, gen_ok, calls):
    run(base(qdir, gen_ok, dropins={"10-a.conf": {"Service": {"MemoryMax": "1G"}}}))
    os.makedirs(os.path.join(qdir, "web.container.d"), exist_ok=True)
    with open(os.path.join(qdir, "web.container.d", "99-hand.conf"), "w") as f:
        f.write("[Service]\n")
    del calls[:]
    status, res = run({"name": "web", "type": "container", "state": "absent", "stop": True,
                       "quadlet_dir": qdir, "generator": gen_ok})
    assert status == "ok" and res["changed"]
    assert sorted(os.path.basename(p) for p in res["removed"]) == ["10-a.conf", "99-hand.conf", "web.container"]
    assert tree(qdir) == {}
    assert not os.path.exists(os.path.join(qdir, "web.container.d"))
    assert calls == [(["systemctl", "stop", "web.service"], None), (["systemctl", "reset-failed", "web.service"], None),
                     (["systemctl", "daemon-reload"], None)]
    status, res = run({"name": "web", "type": "container", "state": "absent", "quadlet_dir": qdir, "generator": gen_ok})
    assert status == "ok" and not res["changed"]


def test_generator_rejection_writes_nothing(qdir, gen_bad, calls):
    status, res = run(base(qdir, gen_bad))
    assert status == "failed"
    assert "rejected the change, nothing was written" in res["msg"]
    assert "unsupported key 'Bogus'" in res["msg"]
    assert not os.path.exists(qdir) and calls == []


def test_missing_generator_fails_with_version(qdir, calls, monkeypatch):
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", lambda self, name, *a, **k: None)
    status, res = run(base(qdir, "/nonexistent/quadlet"))
    assert status == "failed" and "podman >= 4.4" in res["msg"]
    assert not os.path.exists(qdir)


def test_validate_false_skips_generator(qdir, calls):
    status, res = run(base(qdir, "/nonexistent/quadlet", validate=False))
    assert status == "ok" and res["changed"] and "validation" not in res


@pytest.mark.parametrize("args, message", [
    ({"name": "web", "type": "dockerfile", "sections": {}}, "value of type must be one of"),
    ({"name": "web"}, "missing parameter\\(s\\) required by 'name': type"),
    ({"type": "container"}, "one of the following is required: name, units"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "a\nb"}}}, "newline"),
    ({"name": "web", "type": "container", "sections": {"Container": {"bad key": "x"}}}, "not a valid key name"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "50%"}}}, "not a systemd specifier"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "i"}}, "content": "x"},
     "mutually exclusive"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "i"}}, "user": "root"},
     "only applies to scope=user"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "i"}}, "scope": "user",
      "user": "no-such-user-xyz"}, "does not exist on the host"),
    ({"name": "web", "type": "container", "sections": {"Container": {"Image": "i"}}, "mode": "rw"},
     "not an octal permission"),
    ({"units": [dict(WEB), dict(WEB)]}, "given twice"),
    ({"units": []}, "units is empty"),
])
def test_bad_input_fails_and_writes_nothing(qdir, gen_ok, calls, args, message):
    args = dict(args, quadlet_dir=qdir, generator=gen_ok)
    status, res = run(args)
    assert status == "failed"
    assert re.search(message, res["msg"]), res["msg"]
    assert not os.path.exists(qdir) and calls == []


def test_symlinked_unit_is_refused(qdir, gen_ok, calls, tmp_path):
    os.makedirs(qdir)
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.symlink(str(target), os.path.join(qdir, "web.container"))
    status, res = run(base(qdir, gen_ok))
    assert status == "failed" and "symbolic link" in res["msg"]
    assert target.read_text() == "x"


def test_mode_change_is_changed_without_restart(qdir, gen_ok, calls):
    run(base(qdir, gen_ok))
    del calls[:]
    status, res = run(base(qdir, gen_ok, mode="0600"))
    assert status == "ok" and res["changed"] and res["changed_services"] == []
    assert os.stat(os.path.join(qdir, "web.container")).st_mode & 0o777 == 0o600
    assert calls == [], "a mode change needs no daemon-reload"


@pytest.fixture
def fake_user(monkeypatch, tmp_path):
    home = tmp_path / "home-immich"
    home.mkdir()
    # As root, model a distinct service user (uid 4242); otherwise use our own uid so chown works.
    uid = os.getuid() or 4242
    entry = pwd.struct_passwd(("immich", "x", uid, os.getgid() or 4242, "", str(home), "/bin/sh"))

    def fake_getpwnam(name):
        if name != "immich":
            raise KeyError(name)
        return entry

    monkeypatch.setattr(mod.pwd, "getpwnam", fake_getpwnam)
    monkeypatch.setattr(mod.pwd, "getpwuid", lambda uid: entry)
    runtime = tmp_path / "run-user"
    linger = tmp_path / "linger"
    runtime.mkdir()
    linger.mkdir()
    monkeypatch.setattr(mod, "RUNTIME_ROOT", str(runtime))
    monkeypatch.setattr(mod, "LINGER_DIR", str(linger))
    return entry, runtime, linger


def _bus(runtime, uid):
    d = runtime / str(uid)
    d.mkdir()
    (d / "bus").write_text("")


def test_user_scope_from_root_uses_machine_and_user_dir(fake_user, gen_ok, calls, monkeypatch):
    entry, runtime = fake_user[:2]
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    _bus(runtime, entry.pw_uid)
    args = dict(WEB, scope="user", user="immich", generator=gen_ok)
    status, res = run(args)
    assert status == "ok", res
    assert res["quadlet_dir"] == os.path.join(entry.pw_dir, ".config/containers/systemd")
    assert os.path.isfile(os.path.join(res["quadlet_dir"], "web.container"))
    assert calls == [(["systemctl", "--user", "-M", "immich@", "daemon-reload"], None)]


def test_user_scope_as_the_user_sets_runtime_env(fake_user, gen_ok, calls, monkeypatch):
    entry, runtime = fake_user[:2]
    monkeypatch.setattr(mod.os, "geteuid", lambda: entry.pw_uid)
    _bus(runtime, entry.pw_uid)
    status, res = run(dict(WEB, scope="user", generator=gen_ok))
    assert status == "ok", res
    (argv, env), = calls
    assert argv == ["systemctl", "--user", "daemon-reload"]
    assert env["XDG_RUNTIME_DIR"] == str(runtime / str(entry.pw_uid))
    assert env["DBUS_SESSION_BUS_ADDRESS"].endswith("/bus")


def test_user_scope_as_root_without_user_fails(gen_ok, calls, monkeypatch):
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    status, res = run(dict(WEB, scope="user", generator=gen_ok))
    assert status == "failed" and "needs user=" in res["msg"]


def test_user_without_linger_fails_before_writing(fake_user, gen_ok, calls, monkeypatch):
    entry, linger = fake_user[0], fake_user[2]
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    status, res = run(dict(WEB, scope="user", user="immich", generator=gen_ok))
    assert status == "failed" and "loginctl enable-linger immich" in res["msg"]
    assert not os.path.exists(os.path.join(entry.pw_dir, ".config"))
    (linger / "immich").write_text("")
    status, res = run(dict(WEB, scope="user", user="immich", generator=gen_ok))
    assert status == "failed" and "systemctl start user@" in res["msg"]
    assert not os.path.exists(os.path.join(entry.pw_dir, ".config")) and calls == []


def test_result_is_json_serialisable(qdir, gen_ok, calls):
    status, res = run(base(qdir, gen_ok), diff=True)
    json.dumps(res)
