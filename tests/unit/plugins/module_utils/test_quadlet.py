"""Quadlet knowledge: names, service names, unit file plans, generator output parsing."""

import os

import pytest

from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q


@pytest.mark.parametrize("name, utype, sections, expected", [
    ("immich-server", "container", None, "immich-server.service"),
    ("photos", "network", None, "photos-network.service"),
    ("cache", "volume", None, "cache-volume.service"),
    ("immich", "pod", None, "immich-pod.service"),
    ("app", "kube", None, "app.service"),
    ("pg", "image", None, "pg-image.service"),
    ("stand-in", "build", None, "stand-in-build.service"),
    ("x", "container", {"Container": {"ServiceName": "custom"}}, "custom.service"),
    ("x", "network", {"Network": {"ServiceName": "net.service"}}, "net.service"),
])
def test_service_name(name, utype, sections, expected):
    assert q.service_name(name, utype, sections) == expected


@pytest.mark.parametrize("name, utype, message", [
    ("ok", "dockerfile", "unknown quadlet type"),
    ("-bad", "container", "not a valid unit name"),
    (".hidden", "container", "not a valid unit name"),
    ("has space", "container", "not a valid unit name"),
    ("a/b", "container", "not a valid unit name"),
    ("x" * 201, "container", "not a valid unit name"),
    ("web.container", "container", "without its suffix"),
])
def test_check_name_rejects(name, utype, message):
    with pytest.raises(q.QuadletError, match=message):
        q.check_name(name, utype)


def test_key_kinds():
    assert q.key_kind("Container", "Environment") == "pairs"
    assert q.key_kind("Service", "Environment") == "pairs"
    assert q.key_kind("Container", "PodmanArgs") == "args"
    assert q.key_kind("Service", "ExecStartPre") == "args"
    assert q.key_kind("Container", "Volume") == "raw"
    assert q.key_kind("Container", "Image") == "raw"


def test_unit_files_present_with_dropins(tmp_path):
    files = q.unit_files({
        "name": "web", "type": "container", "state": "present",
        "sections": {"Container": {"Image": "docker.io/library/nginx:1"}},
        "dropins": {"10-mem.conf": {"Service": {"MemoryMax": "1G"}},
                    "20-raw.conf": "[Container]\nEnvironment=A=1",
                    "30-gone.conf": None},
        "specifiers": True}, str(tmp_path))
    paths = [path for path, data in files]
    assert paths == ["web.container", "web.container.d/10-mem.conf", "web.container.d/20-raw.conf",
                     "web.container.d/30-gone.conf"]
    data = dict(files)
    assert data["web.container"].decode().endswith("[Container]\nImage=docker.io/library/nginx:1\n")
    assert data["web.container"].startswith(b"# Managed by Ansible")
    assert data["web.container.d/10-mem.conf"].decode().endswith("[Service]\nMemoryMax=1G\n")
    assert data["web.container.d/20-raw.conf"] == b"[Container]\nEnvironment=A=1\n"
    assert data["web.container.d/30-gone.conf"] is None


def test_unit_files_absent_lists_existing_dropins(tmp_path):
    d = tmp_path / "web.container.d"
    d.mkdir()
    (d / "b.conf").write_text("x")
    (d / "a.conf").write_text("x")
    files = q.unit_files({"name": "web", "type": "container", "state": "absent"}, str(tmp_path))
    assert files == [("web.container", None), ("web.container.d/a.conf", None), ("web.container.d/b.conf", None)]


@pytest.mark.parametrize("unit, message", [
    ({"sections": {"Container": {"Image": "i"}}, "content": "x"}, "exactly one of sections or content"),
    ({}, "exactly one of sections or content"),
    ({"sections": {"Service": {"Restart": "always"}}}, r"has no \[Container\] section"),
    ({"sections": {"Container": {"Image": "i"}}, "dropins": {"../evil.conf": {}}}, "drop-in name"),
    ({"sections": {"Container": {"Image": "i"}}, "dropins": {"noext": {}}}, "drop-in name"),
    ({"sections": {"Container": {"Image": "a\nb"}}}, "newline"),
    ({"content": "[Container]\nImage=a\x00"}, "NUL"),
    ({"content": 42}, "content must be a string"),
])
def test_unit_files_rejects(tmp_path, unit, message):
    spec = {"name": "web", "type": "container", "state": "present", "specifiers": True}
    spec.update(unit)
    with pytest.raises(q.QuadletError, match=message):
        q.unit_files(spec, str(tmp_path))


def test_parse_generator_output():
    stderr = (
        "quadlet-generator[1]: Loading source unit file /t/a.container\n"
        'quadlet-generator[1]: Warning: a.container specifies the image "x" which not a fully qualified image name.\n'
        'quadlet-generator[1]: converting "a.container": unsupported key \'Bogus\' in group \'Container\' in /t/a.container\n'
        'quadlet-generator[1]: converting "b.container": requested Quadlet unit missing.network was not found\n'
    )
    errors, warnings = q.parse_generator_output(stderr)
    assert errors == {
        "a.container": ["unsupported key 'Bogus' in group 'Container' in /t/a.container"],
        "b.container": ["requested Quadlet unit missing.network was not found"],
    }
    assert warnings[0][0] == "a.container"


@pytest.mark.parametrize("text, expected", [
    ("podman version 5.4.2", (5, 4, 2)),
    ("podman version 4.3.1", (4, 3, 1)),
    ("podman version 4.4", (4, 4, 0)),
    ("nothing", None),
])
def test_parse_version(text, expected):
    assert q.parse_version(text) == expected


def test_missing_generator_message_names_version():
    msg = q.missing_generator_message("4.3.1")
    assert "podman >= 4.4" in msg and "podman 4.3.1 is installed" in msg


def test_find_generator(tmp_path):
    gen = tmp_path / "quadlet"
    gen.write_text("#!/bin/sh\n")
    assert q.find_generator(candidates=(str(tmp_path / "none"),)) is None
    assert q.find_generator(str(gen)) is None  # not executable
    os.chmod(str(gen), 0o755)
    assert q.find_generator(str(gen)) == str(gen)
    assert q.find_generator(candidates=(str(tmp_path / "none"), str(gen))) == str(gen)


def test_unit_dir():
    assert q.unit_dir("system") == "/etc/containers/systemd"
    assert q.unit_dir("user", "/home/immich") == "/home/immich/.config/containers/systemd"
    with pytest.raises(q.QuadletError):
        q.unit_dir("user")
