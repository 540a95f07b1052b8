"""Debian 13 (trixie) test VMs under qemu TCG: build a cached image, boot, wait for SSH, stop.

    vm.py build                     build (or reuse) the cached VM image; print its directory
    vm.py up NAME [--ssh-port N] [--forward HOST:GUEST ...] [--memory MiB] [--pool-size SIZE]
                                    boot a throwaway VM (copy-on-write over the cached image, a
                                    fresh BTRFS pool disk, a per-run SSH key); print its facts as JSON
    vm.py down NAME                 stop it and remove its run directory
    vm.py status NAME               print its facts as JSON (exit 1 when it is not running)
    vm.py reboot NAME               reboot it from inside and boot the same disks again (print timings)
    vm.py preload ARCHIVE           build (or reuse) the disk layer with ARCHIVE's images already loaded
                                    (root's store and the service user's); print its path
    vm.py up NAME --preload ARCHIVE boot over that layer instead of the bare image
    vm.py snapshot NAME DIR         save the running VM in DIR as a converged image: its memory and
                                    device state and its disks (the VM is gone afterwards)
    vm.py up NAME --from DIR        resume such a converged image (over copy-on-write overlays of its
                                    disks, DIR unchanged), its clock set to now

The image is a debootstrap'd trixie tree (systemd, podman 5.4 with quadlet and its runtime
dependencies, openssh, python3, btrfs-progs) written to an ext4 disk with `mkfs.ext4 -d` (no loop
mount) and booted directly (-kernel/-initrd). It is cached under $HOMELAB_IMMICH_CACHE/vm/<hash>,
the hash covering this file and the package list, so a second run skips the build. Each VM gets
a qcow2 overlay, so the cached image is never modified. Under TCG about 1 boot in 20 dies in an
early kernel panic: qemu runs with panic=-1 and -no-reboot, so a panicked boot exits, and it is
retried (bounded).

Importing the test images costs ~45 s per VM under TCG (minutes for the real server image), so the
scenarios that do not test the air-gapped load itself boot over a second cached layer: a qcow2 over
the image, made once by booting it, creating the service user as the host role would (useradd, its
subordinate ids) and loading the archive into root's and that user's podman storage, then powering
off. It is keyed by the image's key, the archive's path (which holds the archive's own hash) and
the recipe below, and lives beside the image under $HOMELAB_IMMICH_CACHE/vm/<hash>/preload/<key>.

A converged image is a run's artefact, not a cache: a scenario that converged a VM from bare and
verified it saves it running (`snapshot`: paused, its memory and device state written through QMP's
migrate to a file, ~1 GiB for the converged host with its page cache, in ~6 s), and the scenarios
that only need a converged host to start from (the fault tests, the day-2 playbooks) resume it over
copy-on-write overlays of both its disks, root and BTRFS pool, side by side if they like, instead of
converging again: up in ~5-10 s with every service running, where booting the same disks took ~70 s
and the services ~55 s more under TCG.
"""

import argparse
import base64
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("HOMELAB_IMMICH_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "homelab-immich")
RUNS = os.environ.get("HOMELAB_IMMICH_VM_RUNS") or os.path.join(REPO, "build", "vm")
SUITE = "trixie"
PACKAGES = [
    # boot and init
    "linux-image-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev", "dbus", "dbus-user-session",
    "libpam-systemd", "systemd-container", "kmod", "procps", "iproute2",
    # access
    "openssh-server", "python3", "python3-apt", "sudo", "curl", "ca-certificates",
    # podman with quadlet, rootless and its networking
    "podman", "crun", "conmon", "netavark", "aardvark-dns", "passt", "uidmap", "nftables", "catatonit",
    # storage
    "btrfs-progs", "e2fsprogs", "util-linux", "psmisc",
]
# Kernel module trees nobody needs in a headless TCG guest; dropping them shrinks the disk a lot.
PRUNE_MODULES = ["drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/net/ethernet",
                 "drivers/infiniband", "drivers/staging", "drivers/iio", "drivers/bluetooth", "sound",
                 "drivers/usb", "drivers/hid", "drivers/input", "drivers/scsi", "drivers/ata",
                 "drivers/mmc", "drivers/isdn", "drivers/net/can", "drivers/hwmon", "drivers/platform",
                 "drivers/thunderbolt", "drivers/nvme", "drivers/mtd", "drivers/video", "net/wireless",
                 "net/bluetooth", "net/mac80211", "fs/ocfs2", "fs/gfs2", "fs/nfs", "fs/nfsd", "fs/ceph",
                 "fs/smb", "fs/xfs", "fs/f2fs", "fs/jfs", "fs/nilfs2"]
ROOT_SIZE = "6G"
# vCPUs of each VM. `make test` runs two jobs side by side and sets 1: TCG has no pause-loop exit, so a
# 2-vCPU guest sharing the cores with another spins on every lock whose holder's vCPU thread is off
# the core (measured: default's converge 147 s alone, 573 s beside another 2-vCPU scenario; two
# 1-vCPU VMs side by side each ran as fast as one alone).
CPUS = int(os.environ.get("HOMELAB_VM_CPUS", "2"))
BOOT_TIMEOUT = 240
BOOT_ATTEMPTS = 3

GUEST_FILES = {
    "etc/hostname": "immich-vm\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 immich-vm\n",
    "etc/fstab": "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n",
    "etc/systemd/network/10-wired.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
    "etc/ssh/sshd_config.d/10-test-vm.conf": "PermitRootLogin prohibit-password\nUseDNS no\nPasswordAuthentication no\n",
    "etc/initramfs-tools/conf.d/10-test-vm": "MODULES=list\nCOMPRESS=gzip\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\nvirtio_net\next4\ncrc32c_generic\n",
    "etc/systemd/journald.conf.d/10-test-vm.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n",
    "etc/dpkg/dpkg.cfg.d/01-slim": "path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\n"
                                   "path-exclude=/usr/share/locale/*\npath-exclude=/usr/share/info/*\n",
    "usr/local/sbin/homelab-ssh-key": (
        "#!/bin/sh\n"
        "# Install the per-run SSH key passed on the kernel command line (homelab.ssh_key=<base64>), and\n"
        "# give the private test link its static address (homelab.private=<mac>,<address/prefix>).\n"
        "set -eu\n"
        "for word in $(cat /proc/cmdline); do\n"
        "  case \"$word\" in\n"
        "    homelab.ssh_key=*) key=${word#homelab.ssh_key=} ;;\n"
        "    homelab.private=*) private=${word#homelab.private=} ;;\n"
        "  esac\n"
        "done\n"
        "if [ -n \"${private:-}\" ]; then\n"
        "  install -d /run/systemd/network\n"
        "  printf '[Match]\\nMACAddress=%s\\n\\n[Network]\\nAddress=%s\\n' \"${private%%,*}\" \"${private#*,}\" \\\n"
        "    > /run/systemd/network/05-private.network\n"
        "fi\n"
        "[ -n \"${key:-}\" ] || exit 0\n"
        "install -d -m 0700 /root/.ssh\n"
        "echo \"$key\" | base64 -d > /root/.ssh/authorized_keys\n"
        "chmod 0600 /root/.ssh/authorized_keys\n"
    ),
    "etc/systemd/system/homelab-ssh-key.service": (
        "[Unit]\nDescription=Install the test run's SSH key and private address\nBefore=ssh.service network-pre.target\n"
        "Wants=network-pre.target\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/homelab-ssh-key\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
}
# Ansible's module payloads imported from a directory with cached bytecode instead of from each
# task's zip: ~1 s less for every module call under TCG (tests/vm/guest/homelab_payload_cache.py).
with open(os.path.join(HERE, "guest", "homelab_payload_cache.py")) as _f:
    GUEST_FILES["usr/lib/python3/dist-packages/homelab_payload_cache.py"] = _f.read()
GUEST_FILES["usr/lib/python3/dist-packages/homelab_payload_cache.pth"] = "import homelab_payload_cache\n"
GUEST_DIRS = {"var/cache/homelab-payloads": 0o1777}  # one 0700 directory per user inside
ENABLE = ["systemd-networkd.service", "homelab-ssh-key.service", "ssh.service"]
# Podman's user units wait for the system's network-online.target (podman-user-wait-network-online),
# so the guest must reach it: systemd-networkd-wait-online stays, and the target is wanted at boot.
ENABLE += ["systemd-networkd-wait-online.service"]
MASK = ["apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer", "fstrim.timer"]


def log(msg):
    print("vm: %s" % msg, file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, **kw)


def mirror():
    return subprocess.run([os.path.join(REPO, "tests/tools/debian-mirror.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def image_key():
    """Hash of everything that shapes the image (not the boot logic, which can change freely)."""
    h = hashlib.sha256(inspect.getsource(_build).encode())
    h.update(json.dumps([SUITE, PACKAGES, PRUNE_MODULES, ROOT_SIZE, GUEST_FILES, GUEST_DIRS, ENABLE, MASK],
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def image_dir():
    return os.path.join(CACHE, "vm", image_key())


@contextlib.contextmanager
def cache_lock(name):
    """One builder at a time for a cache entry (scenarios may run side by side)."""
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".%s.lock" % name), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build():
    """Build the VM image unless the cache has it; return its directory."""
    out = image_dir()
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    with cache_lock("vm-image"):
        if os.path.exists(os.path.join(out, "DONE")):
            return out
        return _build(out)


def _build(out):
    t0 = time.time()
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    root = os.path.join(tmp, "rootfs")
    log("debootstrap %s (%d packages) into %s" % (SUITE, len(PACKAGES), root))
    run(["debootstrap", "--variant=minbase", "--components=main", "--include=" + ",".join(PACKAGES),
         SUITE, root, mirror()], stdout=subprocess.DEVNULL)
    for rel, content in GUEST_FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
        if rel.startswith("usr/local/sbin/"):
            os.chmod(path, 0o755)
    for rel, mode in GUEST_DIRS.items():
        os.makedirs(os.path.join(root, rel), exist_ok=True)
        os.chmod(os.path.join(root, rel), mode)
    run(["chroot", root, "systemctl", "enable"] + ENABLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run(["chroot", root, "systemctl", "mask"] + MASK, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.makedirs(os.path.join(root, "etc/systemd/system/multi-user.target.wants"), exist_ok=True)
    os.symlink("/usr/lib/systemd/system/network-online.target",
               os.path.join(root, "etc/systemd/system/multi-user.target.wants/network-online.target"))
    kver = sorted(os.listdir(os.path.join(root, "lib/modules")))[-1]
    for rel in PRUNE_MODULES:
        shutil.rmtree(os.path.join(root, "lib/modules", kver, "kernel", rel), ignore_errors=True)
    run(["chroot", root, "depmod", kver])
    run(["chroot", root, "update-initramfs", "-u", "-k", kver], stdout=subprocess.DEVNULL)
    shutil.copy(os.path.join(root, "boot", "vmlinuz-" + kver), os.path.join(tmp, "vmlinuz"))
    shutil.copy(os.path.join(root, "boot", "initrd.img-" + kver), os.path.join(tmp, "initrd.img"))
    for rel in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man", "usr/share/locale",
                "usr/share/info", "var/log/journal"):
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            for entry in os.listdir(path):
                p = os.path.join(path, entry)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    for p in ("etc/machine-id", "var/lib/dbus/machine-id"):
        path = os.path.join(root, p)
        if os.path.lexists(path):
            os.unlink(path)
    open(os.path.join(root, "etc/machine-id"), "w").close()  # systemd makes one at first boot
    log("mkfs.ext4 -d (no loop mount) -> root.raw %s" % ROOT_SIZE)
    run(["mkfs.ext4", "-q", "-F", "-L", "vmroot", "-d", root, os.path.join(tmp, "root.raw"), ROOT_SIZE])
    shutil.rmtree(root)
    with open(os.path.join(tmp, "DONE"), "w") as f:
        json.dump({"kernel": kver, "seconds": round(time.time() - t0, 1), "packages": PACKAGES}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    log("image built in %.0f s: %s" % (time.time() - t0, out))
    return out


# The service user as roles/host creates it (ansible.builtin.user: a home, the default shell of the
# role, Debian's useradd adding the subordinate ids), and the archive loaded by root and by that user
# with the runtime directory the user's manager will have, so podman's state matches later runs.
# Linger is enabled only while loading and removed again: the converge still enables it.
PRELOAD_USER = "immich"
PRELOAD_SCRIPT = r"""
set -eu
user=%(user)s
archive=/mnt/preload/%(archive)s
mkdir -p /mnt/preload
mountpoint -q /mnt/preload || mount -t 9p -o trans=virtio,version=9p2000.L,ro preload /mnt/preload
podman load -q -i "$archive"
id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin "$user"
if ! grep -q "^$user:" /etc/subuid 2>/dev/null || ! grep -q "^$user:" /etc/subgid 2>/dev/null; then
  start=$(cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: 'BEGIN {m = 100000} NF == 3 {e = $2 + $3; if (e > m) m = e} END {print m}')
  usermod --add-subuids "$start-$((start + 65535))" --add-subgids "$start-$((start + 65535))" "$user"
fi
uid=$(id -u "$user")
loginctl enable-linger "$user"
for _ in $(seq 240); do [ -S /run/user/$uid/bus ] && break; sleep 0.5; done
cd /
runuser -u "$user" -- env XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus \
  podman load -q -i "$archive"
runuser -u "$user" -- env XDG_RUNTIME_DIR=/run/user/$uid podman image ls --format 'image {{.Repository}}:{{.Tag}}' | sort
loginctl disable-linger "$user"
for _ in $(seq 120); do systemctl -q is-active user@$uid.service || break; sleep 0.5; done
umount /mnt/preload
rm -rf /var/tmp/* /tmp/*
: > /etc/machine-id
sync
"""


def preload_key(archive):
    h = hashlib.sha256(image_key().encode())
    h.update(os.path.abspath(archive).encode())
    h.update(os.path.getsize(archive).to_bytes(8, "big"))
    h.update(inspect.getsource(_preload).encode())
    h.update((PRELOAD_SCRIPT + PRELOAD_USER).encode())
    return h.hexdigest()[:16]


def preload_path(archive):
    return os.path.join(image_dir(), "preload", preload_key(archive), "root.qcow2")


def preload(archive):
    """The disk layer with ARCHIVE's images loaded (built once, then reused); return its path."""
    out = preload_path(archive)
    if os.path.exists(out):
        return out
    with cache_lock("preload"):
        if os.path.exists(out):
            return out
        return _preload(archive, out)


def _preload(archive, out):
    t0 = time.time()
    name = "preload-" + os.path.basename(os.path.dirname(out))
    state = up(name, shares={"preload": os.path.dirname(os.path.abspath(archive))}, memory=2048)
    try:
        script = PRELOAD_SCRIPT % {"user": PRELOAD_USER, "archive": os.path.basename(archive)}
        proc = subprocess.run(ssh_base(state) + ["bash -s"], input=script, capture_output=True, text=True,
                              timeout=1800, check=False)
        if proc.returncode != 0:
            raise SystemExit("preloading %s failed (rc %d):\n%s%s" % (archive, proc.returncode, proc.stdout, proc.stderr))
        loaded = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("image ")]
        ask(state, "systemctl poweroff")
        deadline = time.time() + 180
        while alive(state["pid"]) and time.time() < deadline:
            time.sleep(0.5)
        if alive(state["pid"]):
            raise SystemExit("the preload VM did not power off within 180 s")
        tmp = out + ".tmp"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.move(os.path.join(state["run_dir"], "root.qcow2"), tmp)
        with open(os.path.join(os.path.dirname(out), "DONE.json"), "w") as f:
            json.dump({"archive": os.path.abspath(archive), "images": loaded, "seconds": round(time.time() - t0, 1)}, f)
        os.rename(tmp, out)
    finally:
        down(name)
    log("preload layer built in %.0f s (%d images): %s" % (time.time() - t0, len(loaded), out))
    return out


def ports_in_use():
    """The host ports of every VM run directory (running or booting)."""
    taken = set()
    if os.path.isdir(RUNS):
        for name in os.listdir(RUNS):
            state = read_state(name) or {}
            taken.update([state.get("port")] + [h for h, _g in state.get("forwards", [])])
    return taken


def free_port(taken=None):
    """A free TCP port on 127.0.0.1, not in TAKEN (which it joins)."""
    taken = set() if taken is None else taken
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in taken:
            taken.add(port)
            return port


def run_dir(name):
    return os.path.join(RUNS, name)


def read_state(name):
    try:
        with open(os.path.join(run_dir(name), "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


def ssh_base(state):
    """ssh to the guest. Callers give it its own stdin (DEVNULL or input=): ssh makes its stdin
    non-blocking, and on a stdin shared with make that breaks every later ansible command of the run
    ("Ansible requires blocking IO on stdin")."""
    return ["ssh", "-i", state["identity_file"], "-p", str(state["port"]), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
            "-o", "BatchMode=yes", "root@127.0.0.1"]


def ask(state, command):
    """Ask the guest to power off or reboot. The SSH session may hang while the guest goes down:
    a timeout is no failure, the callers wait for the qemu process to end (bounded) instead."""
    try:
        subprocess.run(ssh_base(state) + [command], stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pass


class QMP:
    """One connection to a VM's QMP socket (qemu serves one client at a time, and takes a moment to
    listen again after one leaves: a connect is retried for a while)."""

    def __init__(self, state, timeout=60):
        path = os.path.join(state["run_dir"], "qmp.sock")
        deadline = time.time() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # the greeting
        self.run({"execute": "qmp_capabilities"})

    def run(self, command):
        """COMMAND's result; a command qemu refuses raises SystemExit with qemu's words."""
        self.f.write(json.dumps(command) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline() or "{}")
            if "event" not in reply:
                break
        if "error" in reply or "return" not in reply:
            raise SystemExit("qemu refused %s: %s" % (command["execute"], reply.get("error", reply)))
        return reply["return"]

    def close(self):
        for thing in (self.f, self.sock):
            try:
                thing.close()
            except OSError:
                pass  # qemu went away first


def qmp(state, *commands):
    """Run COMMANDS ({"execute": ..., "arguments": ...}) on the VM's QMP socket, in order, on one
    connection; return their results."""
    q = QMP(state)
    try:
        return [q.run(c) for c in commands]
    finally:
        q.close()


def boot_once(state, image, rd, attempt, incoming=None):
    serial = os.path.join(rd, "serial-%s.log" % attempt)
    pidfile = os.path.join(rd, "qemu.pid")
    with open(state["identity_file"] + ".pub", "rb") as f:
        key = base64.b64encode(f.read().strip()).decode()
    netdev = "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:22" % state["port"]
    for host_port, guest_port in state["forwards"]:
        netdev += ",hostfwd=tcp:127.0.0.1:%d-:%d" % (host_port, guest_port)
    append = ("root=/dev/vda rw console=ttyS0 panic=-1 quiet systemd.show_status=0 net.ifnames=1 homelab.ssh_key=%s"
              % key)
    private = []
    if state.get("private"):
        # a point-to-point link to one other VM: UDP datagrams between two ports of 127.0.0.1
        pv = state["private"]
        private = ["-netdev", "dgram,id=n1,local.type=inet,local.host=127.0.0.1,local.port=%d,"
                   "remote.type=inet,remote.host=127.0.0.1,remote.port=%d" % (pv["local_port"], pv["remote_port"]),
                   "-device", "virtio-net-pci,netdev=n1,mac=%s" % pv["mac"]]
        append += " homelab.private=%s,%s" % (pv["mac"], pv["cidr"])
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(state["cpus"]),
           "-m", str(state["memory"]), "-display", "none", "-serial", "file:" + serial, "-monitor", "none",
           "-qmp", "unix:%s,server=on,wait=off" % os.path.join(rd, "qmp.sock"),
           "-no-reboot", "-daemonize", "-pidfile", pidfile,
           "-kernel", os.path.join(image, "vmlinuz"), "-initrd", os.path.join(image, "initrd.img"),
           "-append", append,
           "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe,discard=unmap" % os.path.join(rd, "root.qcow2"),
           "-drive", "file=%s,if=virtio,format=%s,cache=unsafe,discard=unmap" % (
               os.path.join(rd, pool_file(state)), "qcow2" if state.get("converged") else "raw"),
           "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
           "-device", "virtio-rng-pci"] + private
    for tag, path in state["shares"].items():
        cmd += ["-virtfs", "local,path=%s,mount_tag=%s,security_model=none,readonly=on" % (path, tag)]
    if incoming:
        # the running guest a snapshot saved: its memory and devices, over these very disks
        cmd += ["-incoming", "exec:cat %s" % shlex.quote(incoming)]
    run(cmd)
    with open(pidfile) as f:
        pid = int(f.read().strip())
    state["pid"] = pid
    if incoming:
        # the guest was saved paused, and qemu keeps a resumed guest in the state it was saved in
        status = "exited"
        try:
            q = QMP(state)
            try:
                while alive(pid):
                    status = q.run({"execute": "query-status"})["status"]
                    if status != "inmigrate":
                        break
                    time.sleep(0.2)
                if status == "paused":
                    q.run({"execute": "cont"})
            finally:
                q.close()
        except (OSError, ValueError):
            status = "exited"  # qemu ends when the saved state does not fit this machine
        if status != "paused":
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            return ("resuming the saved guest failed (qemu: %s): it needs the machine it was saved on, the same "
                    "memory, vCPUs, disks, shares and NICs" % status)
    deadline = time.time() + BOOT_TIMEOUT
    while time.time() < deadline:
        if not alive(pid):
            tail = open(serial, errors="replace").read()[-2000:]
            return "qemu exited during boot (kernel panic?):\n" + tail
        try:
            text = open(serial, errors="replace").read()
        except FileNotFoundError:
            text = ""
        if "Kernel panic" in text:
            os.kill(pid, signal.SIGKILL)
            return "kernel panic:\n" + text[-2000:]
        try:
            probe = subprocess.run(ssh_base(state) + ["true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                   check=False)
        except subprocess.TimeoutExpired:
            # qemu's port forward accepts at once, so a guest still booting on busy cores can take
            # longer than this to finish the handshake: not up yet, look again until BOOT_TIMEOUT
            continue
        if probe.returncode == 0:
            return None
        time.sleep(2)
    os.kill(pid, signal.SIGKILL)
    return "no SSH within %d s; serial console:\n%s" % (BOOT_TIMEOUT, open(serial, errors="replace").read()[-2000:])


def boot(state, label, fresh_overlay, incoming=None):
    """Boot, retrying a panicked or stuck boot (bounded). fresh_overlay: a half-booted first boot may
    have written to its disks, so they are made again; a reboot keeps its disks. incoming: a saved
    running guest (snapshot's ram.state) to resume instead of booting the kernel."""
    rd = state["run_dir"]
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        problem = boot_once(state, state["image"], rd, "%s%d" % (label, attempt), incoming)
        state["attempts"].append(problem or "ok")
        if problem is None:
            return
        log("VM %s: boot attempt %d failed: %s" % (state["name"], attempt, problem.splitlines()[0]))
        if attempt == BOOT_ATTEMPTS:
            raise SystemExit("VM %s did not boot in %d attempts; last: %s" % (state["name"], BOOT_ATTEMPTS, problem))
        if fresh_overlay:
            overlays(state)


def parse_private(text):
    """LOCAL_PORT:REMOTE_PORT:ADDRESS/PREFIX -> the private link's settings (MAC from the address)."""
    local, remote, cidr = text.split(":", 2)
    octets = [int(x) for x in cidr.split("/")[0].split(".")]
    return {"local_port": int(local), "remote_port": int(remote), "cidr": cidr,
            "mac": "52:54:00:%02x:%02x:%02x" % tuple(octets[1:])}


def pool_file(state):
    """The pool disk's file in the run directory: a raw sparse file, or an overlay of a converged image's."""
    return "pool.qcow2" if state.get("converged") else "pool.raw"


def overlay(state, path):
    """A fresh copy-on-write root over the bare image, the preloaded layer or a converged image."""
    if state.get("converged"):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
             os.path.join(state["converged"], "root.qcow2"), path])
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2" if state.get("backing") else "raw", "-b",
             base_path(state), path])


def overlays(state):
    """Fresh disks in the run directory: the root overlay, and the pool disk (an overlay of a converged
    image's pool, or a new sparse file). A boot that panicked half-way gets new ones."""
    rd = state["run_dir"]
    for f in ("root.qcow2", pool_file(state)):
        if os.path.exists(os.path.join(rd, f)):
            os.unlink(os.path.join(rd, f))
    overlay(state, os.path.join(rd, "root.qcow2"))
    if state.get("converged"):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
             os.path.join(state["converged"], "pool.raw"), os.path.join(rd, pool_file(state))])
    else:
        run(["truncate", "-s", state["pool_size"], os.path.join(rd, pool_file(state))])


def read_converged(directory):
    """The facts a snapshot left in DIRECTORY (DONE.json), or a SystemExit saying what to run first."""
    try:
        with open(os.path.join(directory, "DONE.json")) as f:
            facts = json.load(f)
    except (OSError, ValueError):
        raise SystemExit("no converged image in %s: run the scenario that makes it first (its side_effect stage, "
                         "molecule/shared/snapshot.yml, keeps it there)" % directory)
    if "ram_state_bytes" not in facts or "shares" not in facts or "base" not in facts:
        raise SystemExit("the converged image in %s is one an older vm.py made: run the scenario that makes it again"
                         % directory)
    if base_identity(facts["base"]["path"]) != facts["base"]:
        # its root disk is an overlay: a rebuilt layer under it is another disk than the one the saved
        # guest's memory (page cache, file system state) remembers, and the guest corrupts its file system
        raise SystemExit("the converged image in %s was saved over %s as it was then; that cached layer was rebuilt "
                         "or removed since (a cold run, a cleared cache): run the scenario that makes it again"
                         % (directory, facts["base"]["path"]))
    return facts


def base_path(state):
    """The cached file the VM's root overlay is over: the preloaded layer or the bare VM image."""
    return state.get("backing") or os.path.join(state["image"], "root.raw")


def base_identity(path):
    """PATH as a snapshot records it (size and modification time: a rebuilt cache file differs), None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def up(name, ssh_port=None, forwards=(), memory=3072, cpus=None, pool_size="8G", shares=None, private=None,
       preload_archive=None, converged=None):
    existing = read_state(name)
    if existing and alive(existing.get("pid")):
        return existing
    image = build()
    backing = preload(preload_archive) if preload_archive else None
    incoming = None
    if converged:
        converged = os.path.abspath(converged)
        facts = read_converged(converged)
        if facts["image"] != image:
            raise SystemExit("the converged image in %s was made over another VM image (%s, not %s): make it again"
                             % (converged, facts["image"], image))
        # the guest resumes as it was saved: the same memory size and vCPUs (qemu refuses others)
        if (memory, cpus or CPUS) != (facts["memory"], facts["cpus"]):
            log("VM %s resumes %s with the memory and vCPUs it was saved with: %d MiB, %d" % (
                name, converged, facts["memory"], facts["cpus"]))
        memory, cpus = facts["memory"], facts["cpus"]
        if shares is not None and set(shares) != set(facts["shares"]):
            raise SystemExit("the converged image in %s was saved with the shares %s, not %s: a resumed guest needs the "
                             "devices it had" % (converged, sorted(facts["shares"]), sorted(shares)))
        shares = shares if shares is not None else facts["shares"]
        if private or facts.get("private"):
            raise SystemExit("a guest on a private link cannot be saved or resumed (its peer is not saved with it)")
        incoming = os.path.join(converged, "ram.state")
    rd = run_dir(name)
    shutil.rmtree(rd, ignore_errors=True)
    os.makedirs(rd)
    key = os.path.join(rd, "id_ed25519")
    if converged:
        # the saved guest trusts the key of the VM it was saved from (a throwaway test key)
        for suffix in ("", ".pub"):
            shutil.copy2(os.path.join(converged, "id_ed25519" + suffix), key + suffix)
    else:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "homelab-immich-test-%s" % name, "-f", key])
    with cache_lock("ports"):
        # scenarios may boot VMs side by side: a port another run directory holds is not free, and
        # this one's state is written before its boot so that the next one sees its ports too
        taken = ports_in_use()
        state = dict(name=name, address="127.0.0.1", user="root", port=ssh_port or free_port(taken), identity_file=key,
                     forwards=[[h or free_port(taken), g] for h, g in forwards], memory=memory, cpus=cpus or CPUS,
                     image=image,
                     run_dir=rd, shares=dict(shares or {}), pool_disk="/dev/vdb", attempts=[], private=private,
                     backing=backing, converged=converged, pool_size=pool_size)
        with open(os.path.join(rd, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
    overlays(state)
    t0 = time.time()
    boot(state, "", fresh_overlay=True, incoming=incoming)
    if incoming:
        resumed(state)
    state["boot_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(rd, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    log("VM %s up in %.0f s (ssh -p %d root@127.0.0.1)" % (name, state["boot_seconds"], state["port"]))
    return state


def resumed(state):
    """A guest resumed from a snapshot lives at the moment it was saved: set its clock to now and
    mount its fstab's shares again (snapshot unmounts them: qemu cannot save a guest with a 9p mount)."""
    command = "date -u -s @%.3f >/dev/null" % time.time()
    if state["shares"]:
        command += " && mount -a -t 9p"
    out = subprocess.run(ssh_base(state) + [command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60, check=False)
    if out.returncode != 0:
        down(state["name"])
        raise SystemExit("VM %s resumed, but setting its clock and mounting its shares failed: %s"
                         % (state["name"], out.stderr.strip()))


def stop_qemu(pid, wait=5.0):
    """End a qemu process: SIGTERM (it closes its disks and exits), SIGKILL after WAIT seconds."""
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + wait
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def down(name):
    state = read_state(name)
    if state:
        stop_qemu(state.get("pid"))
    shutil.rmtree(run_dir(name), ignore_errors=True)


def reboot(name, shutdown_timeout=180):
    """Reboot a running VM from inside (systemctl reboot) and boot it again on the same disks.

    qemu runs with -no-reboot, so the guest's reset ends the process; the same overlay and pool
    disk are booted again with the same ports, and a panicked boot is retried (bounded) on the
    same disks. Returns the seconds the shutdown and the boot took.
    """
    state = read_state(name)
    if not state or not alive(state.get("pid")):
        raise SystemExit("VM %s is not running: nothing to reboot" % name)
    rd = state["run_dir"]
    t0 = time.time()
    ask(state, "systemctl reboot")
    while alive(state["pid"]) and time.time() - t0 < shutdown_timeout:
        time.sleep(0.5)
    clean = not alive(state["pid"])
    if not clean:
        log("VM %s did not stop within %d s of systemctl reboot: killing it" % (name, shutdown_timeout))
        os.kill(state["pid"], signal.SIGKILL)
        time.sleep(1)
    shutdown = time.time() - t0
    state["reboots"] = state.get("reboots", 0) + 1
    t1 = time.time()
    boot(state, "reboot%d-" % state["reboots"], fresh_overlay=False)
    with open(os.path.join(rd, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    result = {"shutdown_seconds": round(shutdown, 1), "clean_shutdown": clean,
              "boot_seconds": round(time.time() - t1, 1), "reboots": state["reboots"]}
    log("VM %s rebooted: %s" % (name, result))
    return result


def snapshot(name, out, timeout=300):
    """Save a running VM as a converged image in OUT: the guest paused and its memory and device state
    written to ram.state, its two disks (root.qcow2, still an overlay of the cached VM image or of the
    preloaded layer, and pool.raw) as they are at that instant, the SSH key it trusts, and DONE.json
    last, so a half-written image is never used. `up --from OUT` resumes it: a host already booted and
    running, with no boot and no service start to wait for. The VM is gone afterwards. Returns the
    facts written to DONE.json."""
    state = read_state(name)
    if not state or not alive(state.get("pid")):
        raise SystemExit("VM %s is not running: nothing to snapshot" % name)
    if state.get("converged"):
        raise SystemExit("VM %s runs over a converged image itself: snapshot the VM that converged from bare" % name)
    if state.get("private"):
        raise SystemExit("VM %s is on a private link: its peer is not saved with it, so it cannot be saved" % name)
    t0 = time.time()
    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    # qemu will not save a guest that has a virtio-9p share mounted
    done = subprocess.run(ssh_base(state) + ["sync && umount -a -t 9p"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        down(name)
        raise SystemExit("VM %s: unmounting its shares before the snapshot failed (%s): no converged image made"
                         % (name, done.stderr.strip()))
    ram = os.path.join(out, "ram.state")
    try:
        qmp(state, {"execute": "stop"},
            {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1 << 40}},
            {"execute": "migrate", "arguments": {"uri": "exec:cat > %s" % shlex.quote(ram)}})
    except SystemExit as e:
        down(name)
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit("VM %s could not be saved running: %s. A 9p mount a user namespace copied (rootless "
                         "podman's) cannot be unmounted from the host: copy what the guest needs from a share "
                         "and unmount it before the namespace exists (molecule/shared/prepare.yml)" % (name, e))
    status = {}
    q = QMP(state)
    try:
        while time.time() - t0 < timeout:
            status = q.run({"execute": "query-migrate"})
            if status.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
    finally:
        q.close()
    if status.get("status") != "completed":
        down(name)
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit("VM %s: saving its memory did not complete (%s): no converged image made" % (name, status))
    stop_qemu(state["pid"], wait=10)  # the saved guest stays paused: nothing runs on after the state
    rd = state["run_dir"]
    for f in ("root.qcow2", "pool.raw", "id_ed25519", "id_ed25519.pub"):
        shutil.move(os.path.join(rd, f), os.path.join(out, f))
    facts = {"source": name, "image": state["image"], "backing": state.get("backing"),
             "base": base_identity(base_path(state)), "memory": state["memory"],
             "cpus": state["cpus"], "shares": state["shares"], "private": state.get("private"),
             "ram_state_bytes": os.path.getsize(ram),
             "save_seconds": round(time.time() - t0, 1), "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(out, "DONE.json.tmp"), "w") as f:
        json.dump(facts, f, indent=1)
    os.rename(os.path.join(out, "DONE.json.tmp"), os.path.join(out, "DONE.json"))
    down(name)
    log("VM %s saved running in %.0f s (%d MiB of memory state): the converged image %s"
        % (name, facts["save_seconds"], facts["ram_state_bytes"] >> 20, out))
    return facts


def parse_forward(text):
    host, guest = text.split(":")
    return int(host), int(guest)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    p = sub.add_parser("up")
    p.add_argument("name")
    p.add_argument("--ssh-port", type=int)
    p.add_argument("--forward", action="append", default=[], type=parse_forward,
                   help="HOST:GUEST tcp port on 127.0.0.1 (HOST 0: any free port)")
    p.add_argument("--memory", type=int, default=3072)
    p.add_argument("--cpus", type=int, default=CPUS, help="vCPUs (default: $HOMELAB_VM_CPUS, else 2)")
    p.add_argument("--pool-size", default="8G")
    p.add_argument("--share", action="append", default=[], help="TAG=DIR exported read-only over virtio-9p")
    p.add_argument("--preload", metavar="ARCHIVE",
                   help="boot over the cached layer with ARCHIVE's images already loaded (vm.py preload)")
    p.add_argument("--from", dest="converged", metavar="DIR",
                   help="resume the converged image in DIR (vm.py snapshot), over copy-on-write overlays")
    p.add_argument("--private", type=parse_private,
                   help="LOCAL_PORT:REMOTE_PORT:ADDRESS/PREFIX: a second NIC on a point-to-point link to the VM "
                        "started with the ports swapped (UDP on 127.0.0.1 only), with that static address")
    for n in ("down", "status", "reboot"):
        sub.add_parser(n).add_argument("name")
    sub.add_parser("preload").add_argument("archive")
    p = sub.add_parser("snapshot")
    p.add_argument("name")
    p.add_argument("dir")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build())
    elif args.cmd == "up":
        shares = dict(s.split("=", 1) for s in args.share) or None
        print(json.dumps(up(args.name, args.ssh_port, args.forward, args.memory, args.cpus, args.pool_size, shares,
                            args.private, args.preload, args.converged)))
    elif args.cmd == "preload":
        print(preload(args.archive))
    elif args.cmd == "snapshot":
        print(json.dumps(snapshot(args.name, args.dir)))
    elif args.cmd == "reboot":
        print(json.dumps(reboot(args.name)))
    elif args.cmd == "down":
        down(args.name)
    elif args.cmd == "status":
        state = read_state(args.name)
        print(json.dumps(state))
        return 0 if state and alive(state.get("pid")) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
