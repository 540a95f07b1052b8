"""The built collection tarball installs cleanly and documents every module."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins/modules"))
                 if f.endswith(".py") and not f.startswith("_"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tarball = os.environ.get("COLLECTION_TARBALL")
    if not tarball:
        out = tmp_path_factory.mktemp("build")
        subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--output-path", str(out), ROOT],
                       check=True, capture_output=True)
        tarball = str(next(out.iterdir()))
    dest = tmp_path_factory.mktemp("collections")
    (dest / "ansible.cfg").write_text("[defaults]\n")  # keep the checkout's ansible.cfg out of it
    env = dict(os.environ, ANSIBLE_CONFIG=str(dest / "ansible.cfg"))
    proc = subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "install", "-p", str(dest), tarball],
                          capture_output=True, text=True, env=env, cwd=str(dest), check=False)
    assert proc.returncode == 0, proc.stderr
    return tarball, dest


def test_tarball_holds_no_build_or_test_debris(installed):
    tarball = installed[0]
    names = tarfile.open(tarball).getnames()
    for bad in (".venv", ".collections", "build/", ".ci", ".cache", "__pycache__"):
        assert not any(n.startswith(bad) or ("/%s" % bad) in n for n in names), bad
    for good in ("MANIFEST.json", "FILES.json", "README.md", "meta/runtime.yml", "plugins/modules/podman_quadlet.py"):
        assert good in names, good


def test_modules_exist():
    assert set(MODULES) == {"podman_quadlet", "btrfs_nocow", "gpu_facts", "system_files", "immich_state"}


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_from_installed_tarball(installed, module):
    dest = installed[1]
    env = dict(os.environ, ANSIBLE_CONFIG=str(dest / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(dest),
               ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([os.path.join(BIN, "ansible-doc"), "homelab.immich.%s" % module],
                          capture_output=True, text=True, env=env, cwd=str(dest), check=False)
    assert proc.returncode == 0, proc.stderr
    assert str(dest) in proc.stdout, "documented from the installed copy, not the checkout"
    assert "EXAMPLES:" in proc.stdout and "RETURN VALUES:" in proc.stdout
    assert "ATTRIBUTES:" in proc.stdout
