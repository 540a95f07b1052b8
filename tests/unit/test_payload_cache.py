"""The test VMs' payload cache (tests/vm/guest/homelab_payload_cache.py): an Ansible payload zip is
imported from its extracted copy, the same code, once per content; anything else is left alone."""

import os
import subprocess
import sys
import zipfile

import pytest

GUEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vm", "guest")
sys.path.insert(0, GUEST)
import homelab_payload_cache as cache  # noqa: E402


def payload(tmp_path, body, sitecustomize="import sys\n"):
    d = tmp_path / "ansible_ping_payload_abc123"
    d.mkdir()
    z = d / "ansible_ping_payload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ansible/__init__.py", "")
        zf.writestr("ansible/modules/__init__.py", "")
        zf.writestr("ansible/modules/ping.py", body)
        zf.writestr("sitecustomize.py", sitecustomize)
    return str(z)


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "cache"
    r.mkdir()
    monkeypatch.setattr(cache, "ROOT", str(r))
    return r


def test_payload_is_extracted_once_per_content(tmp_path, root):
    for name in "abc":
        (tmp_path / name).mkdir()
    a = payload(tmp_path / "a", "X = 1\n", "path a\n")
    b = payload(tmp_path / "b", "X = 1\n", "path b\n")
    c = payload(tmp_path / "c", "X = 2\n")
    da, db, dc = cache.extracted(a), cache.extracted(b), cache.extracted(c)
    # the per-task sitecustomize.py differs, the code does not: one copy
    assert da == db != dc
    assert os.path.dirname(da) == str(root / str(os.getuid()))
    assert (root / str(os.getuid())).stat().st_mode & 0o777 == 0o700
    with open(os.path.join(da, "ansible", "modules", "ping.py")) as f:
        assert f.read() == "X = 1\n"
    assert not os.path.exists(os.path.join(da, "sitecustomize.py"))
    assert sorted(os.listdir(root / str(os.getuid()))) == sorted({os.path.basename(da), os.path.basename(dc)})


def test_hook_imports_the_payload_from_its_directory(tmp_path, root):
    z = payload(tmp_path, "X = 'from the payload'\n")
    # importing the module installs the hook, as the .pth does at interpreter start
    script = ("import sys, homelab_payload_cache as c; c.ROOT = %r; sys.path.insert(0, %r); "
              "import ansible.modules.ping as m; print(m.X); print(m.__file__)" % (str(root), z))
    env = dict(os.environ, PYTHONPATH=GUEST)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    value, path = out.splitlines()
    assert value == "from the payload"
    assert path.startswith(str(root)) and path.endswith(os.path.join("ansible", "modules", "ping.py"))


def test_anything_else_is_left_to_the_other_importers(tmp_path):
    with pytest.raises(ImportError):
        cache.hook(str(tmp_path / "plain.zip"))
    with pytest.raises(ImportError):
        cache.hook(str(tmp_path))
    # a payload that cannot be read falls back (ImportError: the next hook, zipimport, tries)
    with pytest.raises(ImportError, match="payload cache"):
        cache.hook(str(tmp_path / "ansible_x_payload_q" / "ansible_x_payload.zip"))
