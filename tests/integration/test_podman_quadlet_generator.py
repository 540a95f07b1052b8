"""podman_quadlet against the REAL quadlet generator of podman 5.4 (Debian 13).

The strongest check of quoting: render values through the module, let the real generator turn
the unit into a service, split its ExecStart the way systemd does, and compare the podman
arguments with the values we started from.
"""

import os
import subprocess

import pytest


def systemd_split(line):
    """Split an ExecStart= value into words as systemd does (quotes, C escapes, %% specifier)."""
    words, cur, i, quote, have = [], [], 0, None, False
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "s": " "}
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            nxt = line[i + 1]
            if nxt == "x":
                cur.append(chr(int(line[i + 2:i + 4], 16)))
                i += 4
                have = True
                continue
            cur.append(escapes.get(nxt, nxt))
            i += 2
            have = True
            continue
        if quote:
            if c == quote:
                quote = None
            else:
                cur.append(c)
        elif c in "\"'":
            quote, have = c, True
        elif c.isspace():
            if have or cur:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(c)
        i += 1
    if have or cur:
        words.append("".join(cur))
    return [w.replace("%%", "%") for w in words]


def generate(generator, directory, user=False):
    cmd = [generator, "-dryrun"] + (["-user"] if user else [])
    proc = subprocess.run(cmd, env=dict(os.environ, QUADLET_UNIT_DIRS=str(directory)),
                          capture_output=True, text=True, check=False)
    return proc


def exec_start(output, service):
    block = output.split("---%s---" % service, 1)[1].split("\n---", 1)[0]
    for line in block.splitlines():
        if line.startswith("ExecStart="):
            return systemd_split(line[len("ExecStart="):])
    raise AssertionError("no ExecStart for %s" % service)


NASTY = {
    "SPACES": "two words",
    "QUOTES": 'say "hi" it\'s',
    "BACKSLASH": "C:\\path\\n",
    "PERCENT": "100%%",
    "EQUALS": "a=b=c",
    "EMPTY": "",
}


def test_values_survive_the_real_generator(run_module, generator, tmp_path):
    qdir = tmp_path / "units"
    args = {
        "quadlet_dir": str(qdir), "generator": generator, "daemon_reload": False,
        "units": [
            {"name": "photos", "type": "network",
             "sections": {"Network": {"Subnet": "10.89.5.0/24", "Label": {"app": "immich photos"}}}},
            {"name": "web", "type": "container", "sections": {
                "Container": {
                    "Image": "docker.io/library/nginx:1.27",
                    "Network": "photos.network",
                    "Environment": NASTY,
                    "Label": ["owner=homelab team"],
                    "Volume": ["/srv/my photos:/data:ro", "%h/cache:/cache"],
                    "PodmanArgs": ["--log-opt", "tag=web app"],
                    "Exec": ["sh", "-c", "echo \"$SPACES\" && sleep 100"],
                },
                "Service": {"MemoryMax": "1G", "Restart": "always"},
            }},
        ],
    }
    rc, res, out = run_module("podman_quadlet", args)
    assert rc == 0, out
    assert sorted(res["changed_services"]) == ["photos-network.service", "web.service"]
    assert res["validation"]["ran"] is True
    proc = generate(generator, qdir)
    assert proc.returncode == 0, proc.stderr
    argv = exec_start(proc.stdout, "web.service")
    for key, value in NASTY.items():
        expected = "%s=%s" % (key, value.replace("%%", "%"))
        assert expected in argv, (expected, argv)
    assert argv[argv.index("--label") + 1] == "owner=homelab team"
    assert "/srv/my photos:/data:ro" in argv
    assert "tag=web app" in argv
    assert argv[-3:] == ["sh", "-c", 'echo "$SPACES" && sleep 100']
    assert "--network" in argv and argv[argv.index("--network") + 1] == "systemd-photos"
    net = exec_start(proc.stdout, "photos-network.service")
    assert "app=immich photos" in net
    # idempotence through Ansible
    rc, res, out = run_module("podman_quadlet", args)
    assert rc == 0 and res["changed"] is False, out


def snapshot(path):
    out = {}
    if not os.path.isdir(path):
        return out
    for root, _d, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("unit, message", [
    ({"sections": {"Container": {"Image": "docker.io/library/a:1", "BogusKey": "1"}}},
     "unsupported key 'BogusKey' in group 'Container'"),
    ({"sections": {"Container": {"Network": "photos.network"}}}, "no Image or Rootfs key specified"),
    ({"sections": {"Container": {"Image": "docker.io/library/a:1", "Network": "missing.network"}}},
     "requested Quadlet unit missing.network was not found"),
    ({"sections": {"Container": {"Image": "docker.io/library/a:1"}},
      "dropins": {"10-bad.conf": {"Container": {"NotAKey": "x"}}}},
     "unsupported key 'NotAKey'"),
])
@pytest.mark.parametrize("check", [False, True])
def test_generator_rejections_write_nothing(run_module, generator, tmp_path, unit, message, check):
    qdir = tmp_path / "units"
    qdir.mkdir()
    (qdir / "photos.network").write_text("[Network]\nSubnet=10.89.5.0/24\n")
    before = snapshot(str(qdir))
    args = dict(unit, name="web", type="container", quadlet_dir=str(qdir), generator=generator,
                daemon_reload=False)
    rc, res, out = run_module("podman_quadlet", args, check=check)
    assert rc != 0
    assert "rejected the change, nothing was written" in res["msg"]
    assert message in res["msg"], res["msg"]
    assert snapshot(str(qdir)) == before


def test_removing_a_network_still_in_use_is_refused(run_module, generator, tmp_path):
    qdir = tmp_path / "units"
    qdir.mkdir()
    (qdir / "photos.network").write_text("[Network]\n")
    (qdir / "app.container").write_text("[Container]\nImage=docker.io/library/a:1\nNetwork=photos.network\n")
    before = snapshot(str(qdir))
    rc, res, out = run_module("podman_quadlet", {
        "name": "photos", "type": "network", "state": "absent", "quadlet_dir": str(qdir),
        "generator": generator, "daemon_reload": False})
    assert rc != 0
    assert "app.container: requested Quadlet unit photos.network was not found" in res["msg"]
    assert snapshot(str(qdir)) == before


def test_preexisting_broken_unit_is_a_warning_not_a_failure(run_module, generator, tmp_path):
    qdir = tmp_path / "units"
    qdir.mkdir()
    (qdir / "broken.container").write_text("[Container]\nImage=docker.io/library/a:1\nNope=1\n")
    rc, res, out = run_module("podman_quadlet", {
        "name": "photos", "type": "network", "sections": {"Network": {}}, "quadlet_dir": str(qdir),
        "generator": generator, "daemon_reload": False})
    assert rc == 0, out
    assert "broken.container" in res["validation"]["preexisting"]
    assert "installed unit broken.container already fails the generator" in out, out
    assert (qdir / "photos.network").exists()


def test_generator_warnings_for_our_units_are_surfaced(run_module, generator, tmp_path):
    qdir = tmp_path / "units"
    rc, res, out = run_module("podman_quadlet", {
        "name": "short", "type": "container", "sections": {"Container": {"Image": "nginx"}},
        "quadlet_dir": str(qdir), "generator": generator, "daemon_reload": False})
    assert rc == 0, out
    assert any("fully qualified" in w for w in res["validation"]["warnings"])


def test_check_mode_and_diff_with_real_generator(run_module, generator, tmp_path):
    qdir = tmp_path / "units"
    args = {"name": "web", "type": "container", "quadlet_dir": str(qdir), "generator": generator,
            "daemon_reload": False,
            "sections": {"Container": {"Image": "docker.io/library/nginx:1"}},
            "dropins": {"10-mem.conf": {"Service": {"MemoryMax": "1G"}}}}
    rc, res, out = run_module("podman_quadlet", args, check=True, diff=True)
    assert rc == 0 and res["changed"] is True, out
    assert not qdir.exists()
    assert "+Image=docker.io/library/nginx:1" in out and "+MemoryMax=1G" in out
    rc, res, out = run_module("podman_quadlet", args)
    assert rc == 0 and res["changed"] is True
    args["dropins"] = {"10-mem.conf": {"Service": {"MemoryMax": "2G"}}}
    rc, res, out = run_module("podman_quadlet", args, diff=True)
    assert rc == 0 and res["changed_services"] == ["web.service"]
    assert "-MemoryMax=1G" in out and "+MemoryMax=2G" in out
    proc = generate(generator, qdir)
    assert "MemoryMax=2G" in proc.stdout


def test_user_scope_generator_mode(generator, tmp_path):
    """The -user generator accepts what the module writes for a rootless unit (with %h)."""
    from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q
    sections = {"Container": {"Image": "docker.io/library/a:1", "Volume": "%h/photos:/data:Z"}}
    data = q.render_unit("container", sections).encode()
    val = q.validate(generator, str(tmp_path / "none"), {"a.container": data}, {"a.container"}, True)
    assert val["errors"] == {}
    bad = q.validate(generator, str(tmp_path / "none"), {"a.container": b"[Container]\n"}, {"a.container"}, True)
    assert "a.container" in bad["errors"]
