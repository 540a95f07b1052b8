"""immich_state as Ansible runs it: args in, result out; podman and systemctl answered by fakes."""

import json
import os

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.homelab.immich.plugins.module_utils import hoststate
from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q
from ansible_collections.homelab.immich.plugins.modules import immich_state as mod


class Exit(Exception):
    pass


class Fail(Exception):
    pass


class Host:
    """Fake commands: secrets and images by name, systemd units by name; every argv recorded."""

    def __init__(self):
        self.secrets = {}
        self.images = {}
        self.units = {}
        self.containers = []
        self.calls = []
        self.secret_error = None

    def run(self, argv):
        self.calls.append(argv)
        if "runuser" in argv:
            argv = argv[argv.index("podman"):]
        if argv[:3] == ["podman", "secret", "inspect"]:
            names = [a for a in argv[4:] if a not in ("--format", "{{.SecretData}}")]
            if self.secret_error:
                return 125, "", self.secret_error
            missing = [n for n in names if n not in self.secrets]
            if "--format" in argv:
                return (0, self.secrets[names[0]] + "\n", "") if not missing else (125, "", "Error: no such secret")
            if missing:
                return 125, "", "Error: %s: no such secret" % missing[0]
            return 0, json.dumps([{"Spec": {"Name": n}, "SecretData": self.secrets[n]} for n in names]), ""
        if argv[:3] == ["podman", "image", "inspect"]:
            refs = argv[5:]
            if any(r not in self.images for r in refs):
                return 125, "", "Error: no such image"
            return 0, "".join(self.images[r] + "\n" for r in refs), ""
        if argv[:2] == ["podman", "ps"]:
            return 0, json.dumps(self.containers), ""
        if argv[0] == "systemctl" and "show" in argv:
            units = argv[argv.index("--") + 1:]
            blocks = []
            for u in units:
                st = self.units.get(u, {"ActiveState": "inactive", "UnitFileState": "", "LoadState": "not-found"})
                blocks.append("Id=%s\n" % u + "".join("%s=%s\n" % kv for kv in st.items()))
            return 0, "\n".join(blocks), ""
        if argv[0] == "stat":
            return 0, "btrfs\n", ""
        raise AssertionError("unexpected command %r" % argv)


@pytest.fixture
def host(monkeypatch, tmp_path):
    h = Host()

    def exit_json(self, **kw):
        raise Exit(kw)

    def fail_json(self, **kw):
        raise Fail(kw)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "run_command", lambda self, argv, **kw: h.run(argv))
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", lambda self, name, required=False: None)
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    h.user = dict(exists=True, name="immich", uid=os.getuid(), gid=os.getgid(), group_gid=os.getgid(),
                  home=str(tmp_path), home_exists=True, shell="/bin/bash", subuid=True, subgid=True,
                  linger=True, manager=True)
    monkeypatch.setattr(hoststate, "user_facts", lambda name: dict(h.user))
    return h


def run(args, check=False):
    args = dict(args, _ansible_check_mode=check)
    with patch_module_args(args):
        try:
            mod.main()
        except Exit as e:
            return "ok", e.args[0]
        except Fail as e:
            return "failed", e.args[0]
    raise AssertionError("module returned without exit_json/fail_json")


def test_every_secret_and_image_in_one_podman_call_each_as_the_user(host):
    host.secrets = {"db": "pw1", "redis": "pw2"}
    host.images = {"srv:1": "sha256:a", "pg:17": "sha256:b"}
    status, r = run({"user": "immich", "secrets": ["db", "redis"], "images": ["srv:1", "pg:17", "srv:1"]})
    assert status == "ok" and not r["changed"]
    assert r["secrets"] == {"db": {"present": True}, "redis": {"present": True}}
    assert r["secret_values"] == {"db": "pw1", "redis": "pw2"}
    assert r["images"] == {"srv:1": "sha256:a", "pg:17": "sha256:b"}
    assert len(host.calls) == 2
    assert all(c[:3] == ["runuser", "-u", "immich"] and "XDG_RUNTIME_DIR=/run/user/%d" % os.getuid() in c
               for c in host.calls)


def test_a_missing_secret_or_image_is_read_one_by_one(host):
    host.secrets = {"db": "pw1"}
    host.images = {"srv:1": "sha256:a"}
    status, r = run({"user": "immich", "rootless": False, "secrets": ["db", "redis"], "images": ["srv:1", "ml:1"]})
    assert status == "ok"
    assert r["secrets"] == {"db": {"present": True}, "redis": {"present": False}}
    assert r["secret_values"] == {"db": "pw1"}
    assert r["images"] == {"srv:1": "sha256:a", "ml:1": None}
    assert not any(c[0] == "runuser" for c in host.calls)


def test_a_secret_that_cannot_be_read_is_never_taken_for_a_missing_one(host):
    host.secret_error = "Error: database is locked"
    status, r = run({"user": "immich", "secrets": ["db"]})
    assert status == "failed" and "database is locked" in r["msg"] and "Nothing was changed" in r["msg"]


@pytest.mark.parametrize("user, words", [
    ({"exists": False}, "does not exist"),
    ({"manager": False}, "linger"),
])
def test_the_users_podman_needs_the_user_and_its_manager(host, user, words):
    host.user.update(user)
    status, r = run({"user": "immich", "services": ["immich-server.service"]})
    assert status == "failed" and words in r["msg"] and host.calls == []


def test_units_in_one_systemctl_show_and_the_newest_container_of_each(host):
    host.units = {"a.service": {"ActiveState": "active", "UnitFileState": "generated", "LoadState": "loaded"}}
    host.containers = [{"Id": "new", "ImageID": "img2", "Image": "srv:2", "State": "running",
                        "Labels": {"PODMAN_SYSTEMD_UNIT": "a.service"}},
                       {"Id": "old", "ImageID": "img1", "Image": "srv:1", "State": "exited",
                        "Labels": {"PODMAN_SYSTEMD_UNIT": "a.service"}},
                       {"Id": "other", "ImageID": "x", "Image": "x", "Labels": None}]
    status, r = run({"user": "immich", "services": ["a.service", "b.service"], "containers": True})
    assert status == "ok"
    assert r["services"]["a.service"] == {"active": "active", "file": "generated", "load": "loaded"}
    assert r["services"]["b.service"]["active"] == "inactive"
    assert r["containers"] == {"a.service": {"id": "new", "image_id": "img2", "image": "srv:2", "state": "running"}}
    show = [c for c in host.calls if "show" in c]
    assert len(show) == 1 and show[0][:4] == ["systemctl", "--user", "-M", "immich@"]


UNITS = [{"name": "immich-server", "type": "container",
          "sections": {"Container": {"Image": "srv:1"}, "Install": {"WantedBy": "default.target"}}},
         {"name": "systemd-photos", "type": "network", "sections": {"Network": {"Subnet": "10.89.0.0/24"}}}]


def install(home, units):
    qdir = q.unit_dir("user", str(home))
    os.makedirs(qdir, exist_ok=True)
    for u in q.normalise_unit_list(units):
        for rel, data in q.unit_files(u, qdir):
            with open(os.path.join(qdir, rel), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(qdir, rel), 0o644)
    return qdir


def test_quadlet_units_compared_as_podman_quadlet_writes_them(host, tmp_path):
    status, r = run({"user": "immich", "quadlet": {"units": UNITS}})
    assert r["quadlet"]["differs"]
    assert r["quadlet"]["changed_services"] == ["immich-server.service", "systemd-photos-network.service"]
    qdir = install(tmp_path, UNITS)
    status, r = run({"user": "immich", "quadlet": {"units": UNITS}})
    assert status == "ok" and r["quadlet"] == {"differs": False, "quadlet_dir": qdir, "changed_files": [],
                                               "changed_services": []}
    os.chmod(os.path.join(qdir, "systemd-photos.network"), 0o600)
    status, r = run({"user": "immich", "quadlet": {"units": UNITS}})
    assert r["quadlet"]["differs"] and r["quadlet"]["changed_files"] == ["systemd-photos.network"]
    assert r["quadlet"]["changed_services"] == []
    changed = [dict(UNITS[0], sections={"Container": {"Image": "srv:2"}})] + UNITS[1:]
    status, r = run({"user": "immich", "quadlet": {"units": changed}})
    assert r["quadlet"]["changed_services"] == ["immich-server.service"]
    assert host.calls == []


def test_quadlet_units_of_a_user_that_does_not_exist_yet_differ(host):
    host.user = dict(exists=False, name="immich")
    status, r = run({"user": "immich", "quadlet": {"units": UNITS}})
    assert status == "ok" and r["quadlet"]["differs"]


def test_file_sets_differ_on_content_mode_or_a_unit_that_is_not_running(host, tmp_path):
    uid, gid = str(os.getuid()), str(os.getgid())
    dest = tmp_path / "script"
    fset = {"name": "backup", "unit": "immich-backup.timer",
            "files": [{"dest": str(dest), "content": "#!/bin/sh\n", "mode": "0755", "owner": uid, "group": gid}]}
    status, r = run({"user": "immich", "file_sets": [fset]})
    assert r["file_sets"]["backup"]["differs"] and r["file_sets"]["backup"]["changed_files"] == [str(dest)]
    dest.write_text("#!/bin/sh\n")
    os.chmod(dest, 0o755)
    host.units = {"immich-backup.timer": {"ActiveState": "active", "UnitFileState": "enabled", "LoadState": "loaded"}}
    status, r = run({"user": "immich", "file_sets": [fset]})
    assert r["file_sets"]["backup"] == {"differs": False, "changed_files": [], "changed_directories": [],
                                        "unit_actions": [], "problems": []}
    host.units["immich-backup.timer"]["ActiveState"] = "inactive"
    status, r = run({"user": "immich", "file_sets": [fset]})
    assert r["file_sets"]["backup"]["differs"] and r["file_sets"]["backup"]["unit_actions"] == ["start"]
    assert [c for c in host.calls if c[0] == "systemctl"][0][:2] == ["systemctl", "show"]


def test_paths_are_described_not_followed(host, tmp_path):
    (tmp_path / "lib").mkdir(mode=0o750)
    os.chmod(tmp_path / "lib", 0o750)
    os.symlink(str(tmp_path / "lib"), str(tmp_path / "link"))
    status, r = run({"user": "immich", "paths": [str(tmp_path / "lib"), str(tmp_path / "link"), str(tmp_path / "no")]})
    assert r["paths"][str(tmp_path / "lib")] == {"exists": True, "type": "directory", "mode": "0750",
                                                 "uid": os.getuid(), "gid": os.getgid()}
    assert r["paths"][str(tmp_path / "link")]["type"] == "link"
    assert r["paths"][str(tmp_path / "no")] == {"exists": False}


def test_check_mode_reads_the_same(host):
    host.images = {"srv:1": "sha256:a"}
    status, r = run({"user": "immich", "images": ["srv:1"]}, check=True)
    assert status == "ok" and r["images"] == {"srv:1": "sha256:a"} and not r["changed"]


def test_host_facts_measure_the_nearest_existing_directory_of_the_pool(host, tmp_path):
    (tmp_path / "pool").mkdir()
    facts = {"storage_root": str(tmp_path / "pool" / "immich" / "data"), "library_path": str(tmp_path / "pool" / "library"),
             "firewall_unit": "no-such-unit-here.service"}
    status, r = run({"user": "immich", "host": facts})
    h = r["host"]
    assert status == "ok" and h["pool_probe"] == str(tmp_path / "pool") and h["pool_fs"] == "btrfs"
    assert h["pool_free_kib"] > 0 and h["library_exists"] is False and h["firewall_unit"] is False
    assert h["podman"] == "" and h["selinux"] == "Disabled" and h["machine"] == os.uname().machine
