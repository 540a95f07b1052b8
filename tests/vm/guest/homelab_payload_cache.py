"""Test VMs only (tests/vm/vm.py installs it): Ansible's module payloads imported from a directory.

Each task sends its module and module_utils as a zip (AnsiballZ) that Python imports with
zipimport: under qemu TCG that costs ~2.5 s a task against ~0.8 s for the same code imported from
a directory with its bytecode cached, and a no-op site.yml makes dozens of such calls. This path
hook extracts each payload once, into a directory named by the hash of its members (name, CRC,
size; the per-task sitecustomize.py left out), per user (/var/cache/homelab-payloads/<uid>, 0700),
and imports from there, where Python keeps the bytecode as usual. What runs is exactly the
payload's code. Anything unusual (not a payload, no space, a race) falls back to zipimport.
Loaded at interpreter start by homelab_payload_cache.pth.
"""

import hashlib
from importlib import machinery
import os
import shutil
import sys
import zipfile

ROOT = "/var/cache/homelab-payloads"
MARK = "_payload.zip"
LOADERS = [(machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
           (machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES),
           (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES)]


def extracted(archive):
    with zipfile.ZipFile(archive) as zf:
        members = sorted((i for i in zf.infolist() if i.filename != "sitecustomize.py"), key=lambda i: i.filename)
        h = hashlib.sha256()
        for i in members:
            h.update(("%s %08x %d\n" % (i.filename, i.CRC, i.file_size)).encode())
        base = os.path.join(ROOT, str(os.getuid()))
        dest = os.path.join(base, h.hexdigest()[:32])
        if os.path.isdir(dest):
            return dest
        os.makedirs(base, mode=0o700, exist_ok=True)
        tmp = "%s.%d.tmp" % (dest, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        for i in members:
            zf.extract(i, tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process made it first
        if not os.path.isdir(dest):
            raise
    return dest


def hook(path):
    if MARK not in path or "_payload_" not in path:
        raise ImportError("not an Ansible module payload")
    archive, _sep, inner = path.partition(MARK)
    archive += MARK
    try:
        directory = os.path.join(extracted(archive), inner.lstrip("/"))
    except Exception as exc:  # fall back to zipimport
        raise ImportError("payload cache: %s" % exc) from exc
    return machinery.FileFinder(directory, *LOADERS)


if hook not in sys.path_hooks:
    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()
