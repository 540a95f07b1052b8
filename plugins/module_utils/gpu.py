# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What accelerators a host really has (from sysfs, /dev, /proc, /etc), and which Immich image fits.

Everything is read below ``root`` (``/`` on a live host; a copied or fixture tree in tests), in
pure Python, and nothing raises on odd trees: what cannot be read is recorded in ``unreadable``.
"""

from __future__ import annotations

import json
import os
import re
import stat

VENDORS = {
    "0x1002": "AMD",
    "0x10de": "NVIDIA",
    "0x8086": "Intel",
    "0x1af4": "virtio",
    "0x1b36": "Red Hat (QXL)",
    "0x1234": "QEMU (Bochs)",
    "0x15ad": "VMware",
    "0x1013": "Cirrus Logic",
}
VIRTUAL_DRIVERS = frozenset(["virtio_gpu", "virtio-gpu", "qxl", "vmwgfx", "bochs", "bochs-drm", "cirrus", "vboxvideo"])
VIRTUAL_VENDORS = frozenset(["0x1af4", "0x1b36", "0x1234", "0x15ad", "0x1013"])
FIRMWARE_DRIVERS = frozenset(["simpledrm", "simplefb", "efifb", "vesafb", "ofdrm", "vesadrm", "efidrm"])
PLATFORM_VENDORS = {
    "panfrost": "ARM (Mali)", "panthor": "ARM (Mali)", "mali": "ARM (Mali)", "lima": "ARM (Mali)",
    "v3d": "Broadcom", "vc4": "Broadcom", "rockchip-drm": "Rockchip", "rknpu": "Rockchip (NPU)",
    "msm": "Qualcomm", "etnaviv": "Vivante", "tegra": "NVIDIA (Tegra)",
}
RKNN_SOCS = ("rk3566", "rk3568", "rk3576", "rk3588")
RKNPU_MIN = (0, 9, 8)
NVIDIA_MIN_DRIVER = 545  # immich -cuda image: CUDA 12.3, driver >= 545
# Conservative HSA_OVERRIDE_GFX_VERSION suggestions for targets ROCm does not ship kernels for,
# whose ISA matches a supported one. Never for natively supported targets (gfx1030, gfx110[0-2],
# gfx12xx, CDNA parts).
HSA_OVERRIDES = {
    "gfx1031": "10.3.0", "gfx1032": "10.3.0", "gfx1033": "10.3.0", "gfx1034": "10.3.0",
    "gfx1035": "10.3.0", "gfx1036": "10.3.0", "gfx1103": "11.0.0",
}
ML_BACKENDS = ("cuda", "rocm", "openvino", "rknn", "armnn", "cpu")
ML_SUFFIX = {"cpu": "", "cuda": "-cuda", "rocm": "-rocm", "openvino": "-openvino", "armnn": "-armnn", "rknn": "-rknn"}
ML_ARCH = {"cuda": ("amd64",), "rocm": ("amd64",), "openvino": ("amd64",), "armnn": ("arm64",),
           "rknn": ("arm64",), "cpu": ("amd64", "arm64")}
TRANSCODE_BACKENDS = ("nvenc", "quicksync", "vaapi", "rkmpp", "none")
TRANSCODE_ARCH = {"nvenc": ("amd64", "arm64"), "quicksync": ("amd64",), "vaapi": ("amd64", "arm64"),
                  "rkmpp": ("arm64",), "none": None}
ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386"}
PCI_SLOT_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def normalise_arch(machine):
    return ARCH_ALIASES.get((machine or "").lower(), (machine or "unknown").lower())


class Reader:
    """File access below ``root`` that never raises; failures land in ``unreadable``."""

    def __init__(self, root="/"):
        self.root = root
        self.unreadable = []

    def p(self, rel):
        return os.path.join(self.root, rel.lstrip("/"))

    def _note(self, rel, exc):
        entry = "%s: %s" % (rel, getattr(exc, "strerror", None) or exc)
        if entry not in self.unreadable:
            self.unreadable.append(entry)

    def text(self, rel, limit=1 << 20):
        """File content as text, or None; never opens FIFOs or devices (they could block)."""
        path = self.p(rel)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                self._note(rel, "not a regular file")
                return None
            with open(path, "rb") as f:
                return f.read(limit).decode("utf-8", "replace")
        except FileNotFoundError:
            if os.path.islink(path):
                self._note(rel, "broken symbolic link")
            return None
        except OSError as exc:
            self._note(rel, exc)
            return None

    def exists(self, rel):
        return os.path.lexists(self.p(rel))

    def listdir(self, rel):
        try:
            return sorted(os.listdir(self.p(rel)))
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._note(rel, exc)
            return []

    def link_name(self, rel):
        """Basename of a symlink's target (``device/driver`` -> ``amdgpu``), or None."""
        try:
            return os.path.basename(os.readlink(self.p(rel)).rstrip("/"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._note(rel, exc)
            return None

    def real(self, rel):
        try:
            path = os.path.realpath(self.p(rel))
        except OSError as exc:
            self._note(rel, exc)
            return None
        if not os.path.exists(path):
            self._note(rel, "broken symbolic link")
            return None
        return path

    def stat(self, rel):
        try:
            return os.stat(self.p(rel))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._note(rel, exc)
            return None


def parse_group_file(text):
    """/etc/group text -> {name: (gid, [members])}."""
    groups = {}
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            members = [m for m in (parts[3].split(",") if len(parts) > 3 else []) if m]
            groups[parts[0]] = (int(parts[2]), members)
    return groups


def parse_passwd_file(text):
    users = {}
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) >= 7 and parts[2].isdigit() and parts[3].isdigit():
            users[parts[0]] = (int(parts[2]), int(parts[3]))
    return users


def gid_names(groups):
    names = {}
    for name, (gid, _members) in groups.items():
        names.setdefault(gid, name)
    return names


def node_info(reader, dev_rel, gidmap):
    """Facts about a device node: path (as on the host), type, numeric owner gid, group name, mode."""
    st = reader.stat(dev_rel)
    path = "/" + dev_rel.lstrip("/")
    if st is None:
        return dict(path=path, exists=False)
    kind = "char" if stat.S_ISCHR(st.st_mode) else "block" if stat.S_ISBLK(st.st_mode) else \
        "dir" if stat.S_ISDIR(st.st_mode) else "file"
    return dict(path=path, exists=True, type=kind, uid=st.st_uid, gid=st.st_gid,
                group=gidmap.get(st.st_gid), mode="%04o" % stat.S_IMODE(st.st_mode))


def gfx_target(version):
    """KFD gfx_target_version (e.g. 100300) -> 'gfx1030'; minor and stepping are hex digits."""
    if not version:
        return None
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return "gfx%d%x%x" % (major, minor, step)


def parse_properties(text):
    props = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                props[parts[0]] = int(parts[1])
            except ValueError:
                props[parts[0]] = parts[1]
    return props


def kfd_nodes(reader):
    """GPU nodes of the KFD topology: list of dicts with gfx_target, render_minor, ids, apu."""
    base = "sys/class/kfd/kfd/topology/nodes"
    out = []
    for node in reader.listdir(base):
        props = parse_properties(reader.text("%s/%s/properties" % (base, node)))
        version = props.get("gfx_target_version") or 0
        if not isinstance(version, int) or version == 0:
            continue
        out.append(dict(
            node=int(node) if node.isdigit() else node,
            gfx_target_version=version,
            gfx_target=gfx_target(version),
            vendor_id="0x%04x" % props["vendor_id"] if isinstance(props.get("vendor_id"), int) else None,
            device_id="0x%04x" % props["device_id"] if isinstance(props.get("device_id"), int) else None,
            render_minor=props.get("drm_render_minor"),
            simd_count=props.get("simd_count"),
            apu=bool(props.get("cpu_cores_count")),
        ))
    return out


def _version_tuple(text):
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def nvidia_driver(reader):
    text = reader.text("proc/driver/nvidia/version")
    if not text:
        text = reader.text("sys/module/nvidia/version")
        return (text.strip() or None) if text else None
    m = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", text)
    return m.group(1) if m else _version_string(text)


def _version_string(text):
    v = _version_tuple(text)
    return ".".join(str(x) for x in v) if v else None


def parse_cdi(text, filename):
    """Return (kind, [device names]) of a CDI spec in YAML or JSON, without a YAML library."""
    if filename.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError:
            return None, []
        return data.get("kind"), [str(d.get("name")) for d in data.get("devices", []) if isinstance(d, dict) and d.get("name") is not None]
    kind = None
    names = []
    in_devices = False
    indent = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^kind:\s*[\"']?([^\"'\s]+)", line)
        if m:
            kind = m.group(1)
            continue
        if re.match(r"^devices:\s*$", line):
            in_devices = True
            continue
        if in_devices and re.match(r"^\S", line) and not line.startswith("-"):
            in_devices = False
        if in_devices:
            m = re.match(r"^(\s*)-\s+name:\s*[\"']?([^\"'#]+?)[\"']?\s*$", line)
            if m and (indent is None or len(m.group(1)) == indent):
                indent = len(m.group(1))
                names.append(m.group(2))
    return kind, names


def cdi_specs(reader):
    specs = []
    for d in ("etc/cdi", "var/run/cdi", "run/cdi"):
        for f in reader.listdir(d):
            if not f.endswith((".yaml", ".yml", ".json")):
                continue
            rel = "%s/%s" % (d, f)
            text = reader.text(rel)
            if text is None:
                continue
            kind, names = parse_cdi(text, f)
            specs.append(dict(path="/" + rel, kind=kind, devices=["%s=%s" % (kind, n) for n in names] if kind else []))
    return specs


def device_tree_compatible(reader):
    text = reader.text("proc/device-tree/compatible") or reader.text("sys/firmware/devicetree/base/compatible")
    return [s for s in (text or "").split("\x00") if s]


def drm_gpus(reader, gidmap):
    """Every DRM GPU (connectors and firmware framebuffers skipped), grouped by parent device."""
    gpus = {}
    skipped = []
    for entry in reader.listdir("sys/class/drm"):
        if not re.match(r"^(card\d+|renderD\d+)$", entry):
            continue
        base = "sys/class/drm/%s" % entry
        devdir = reader.real(base + "/device")
        if devdir is None:
            continue
        driver = reader.link_name(base + "/device/driver")
        if driver in FIRMWARE_DRIVERS:
            if entry.startswith("card"):
                skipped.append(dict(node=entry, driver=driver, reason="firmware framebuffer, not a GPU"))
            continue
        gpu = gpus.get(devdir)
        if gpu is None:
            slot = os.path.basename(devdir)
            vendor_id = (reader.text(base + "/device/vendor") or "").strip().lower() or None
            device_id = (reader.text(base + "/device/device") or "").strip().lower() or None
            pci_class = (reader.text(base + "/device/class") or "").strip().lower() or None
            vendor = VENDORS.get(vendor_id) if vendor_id else PLATFORM_VENDORS.get(driver or "", None)
            gpu = dict(
                pci_slot=slot if PCI_SLOT_RE.match(slot) else None,
                device=slot, bus="pci" if PCI_SLOT_RE.match(slot) else "platform",
                vendor_id=vendor_id, device_id=device_id, pci_class=pci_class,
                vendor=vendor or "unknown", driver=driver,
                card=None, render_node=None, nodes=[],
                virtual=bool(driver in VIRTUAL_DRIVERS or vendor_id in VIRTUAL_VENDORS),
            )
            vram = reader.text(base + "/device/mem_info_vram_total")
            if vram and vram.strip().isdigit():
                gpu["vram_bytes"] = int(vram.strip())
            gpus[devdir] = gpu
        dev_rel = "dev/dri/%s" % entry
        info = node_info(reader, dev_rel, gidmap)
        gpu["nodes"].append(info)
        if entry.startswith("card"):
            gpu["card"] = info["path"]
        else:
            gpu["render_node"] = info["path"]
            gpu["render_minor"] = int(entry[len("renderD"):])
    ordered = sorted(gpus.values(), key=lambda g: (g["card"] is None, _num(g["card"]), g["device"]))
    return ordered, skipped


def _num(path):
    m = re.search(r"(\d+)$", path or "")
    return int(m.group(1)) if m else 0


def user_groups(reader, user, groups):
    """The user's uid, primary gid and all group names/gids (from root/etc; NSS on a live host)."""
    if not user:
        return None
    users = parse_passwd_file(reader.text("etc/passwd"))
    uid = gid = None
    if user in users:
        uid, gid = users[user]
    elif reader.root in ("/", ""):
        try:
            import pwd
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        except (KeyError, ImportError):
            pass
    if uid is None:
        return dict(name=user, exists=False, groups=[], gids=[])
    names = gid_names(groups)
    member = {gid} | set(g for n, (g, members) in groups.items() if user in members)
    return dict(name=user, exists=True, uid=uid, gid=gid, gids=sorted(member),
                groups=sorted(names.get(g, str(g)) for g in member),
                video="video" in groups and groups["video"][0] in member,
                render="render" in groups and groups["render"][0] in member)


def _node_gidmap(reader, groups):
    names = gid_names(groups)
    if reader.root in ("/", ""):
        try:
            import grp
            for g in grp.getgrall():
                names.setdefault(g.gr_gid, g.gr_name)
        except ImportError:
            pass
    return names


def gather(root="/", user=None, arch=None):
    """Read everything; return the facts dict (without the recommendation)."""
    reader = Reader(root)
    groups = parse_group_file(reader.text("etc/group"))
    gidmap = _node_gidmap(reader, groups)
    gpus, skipped = drm_gpus(reader, gidmap)

    kfd = kfd_nodes(reader)
    for node in kfd:
        for g in gpus:
            if node["render_minor"] is not None and g.get("render_minor") == node["render_minor"]:
                g.update(gfx_target=node["gfx_target"], apu=node["apu"],
                         hsa_override_suggested=HSA_OVERRIDES.get(node["gfx_target"]))
                node["render_node"] = g["render_node"]
    amd = dict(
        driver_loaded=reader.exists("sys/module/amdgpu") or any(g["driver"] == "amdgpu" for g in gpus),
        kfd=node_info(reader, "dev/kfd", gidmap),
        kfd_nodes=kfd,
    )
    driver_version = nvidia_driver(reader)
    nv_nodes = [node_info(reader, "dev/" + n, gidmap) for n in reader.listdir("dev")
                if n.startswith("nvidia") and not os.path.isdir(reader.p("dev/" + n))]
    specs = cdi_specs(reader)
    nvidia = dict(
        driver_loaded=driver_version is not None,
        driver_version=driver_version,
        nodes=nv_nodes,
        nouveau=any(g["driver"] == "nouveau" for g in gpus),
        cdi_specs=specs,
        cdi_devices=sorted(set(d for s in specs if s["kind"] == "nvidia.com/gpu" for d in s["devices"])),
    )
    libmali = next((p for p in ("usr/lib/libmali.so", "usr/lib/aarch64-linux-gnu/libmali.so",
                                "usr/lib/aarch64-linux-gnu/libmali.so.1") if reader.exists(p)), None)
    arm = dict(
        mali_kbase=reader.exists("dev/mali0"),
        mali0=node_info(reader, "dev/mali0", gidmap),
        libmali="/" + libmali if libmali else None,
        csf_firmware="/lib/firmware/mali_csffw.bin" if reader.exists("lib/firmware/mali_csffw.bin") else None,
        mainline_gpus=[g["device"] for g in gpus if g["driver"] in ("panfrost", "panthor", "lima")],
    )
    compatible = device_tree_compatible(reader)
    soc = next((s for s in RKNN_SOCS for c in compatible if s in c), None)
    rknpu_version_text = reader.text("sys/kernel/debug/rknpu/version")
    rknpu_version = _version_tuple(rknpu_version_text) if rknpu_version_text else None
    rknpu_drm = [g for g in gpus if g["driver"] == "rknpu"]
    rockchip = dict(
        compatible=compatible,
        soc=soc,
        rknpu_loaded=reader.exists("sys/module/rknpu") or bool(rknpu_drm) or reader.exists("dev/rknpu"),
        rknpu_version=".".join(str(x) for x in rknpu_version) if rknpu_version else None,
        rknpu_nodes=[g["render_node"] for g in rknpu_drm if g["render_node"]]
        + (["/dev/rknpu"] if reader.exists("dev/rknpu") else []),
        rkmpp_nodes=["/dev/" + n for n in ("rga", "dma_heap", "mpp_service") if reader.exists("dev/" + n)],
        accel_nodes=["/dev/accel/" + n for n in reader.listdir("dev/accel")],
    )
    machine = arch or os.uname().machine
    return dict(
        architecture=normalise_arch(machine),
        machine=machine,
        gpus=gpus,
        skipped=skipped,
        amd=amd,
        nvidia=nvidia,
        arm=arm,
        rockchip=rockchip,
        user=user_groups(reader, user, groups),
        unreadable=reader.unreadable,
    )


def _gpu_label(g):
    where = g["render_node"] or g["card"] or g["device"]
    name = g.get("gfx_target") or g["device_id"] or ""
    return ("%s %s at %s (%s)" % (g["vendor"], name, g["pci_slot"] or g["device"], where)).replace("  ", " ")


class _Plan:
    """What one backend needs: devices, groups, volumes, extra args, env; and why (not)."""

    def __init__(self):
        self.devices, self.nodes, self.volumes, self.args, self.env = [], [], [], [], {}
        self.why = ""
        self.suggested_env = {}

    def quadlet(self, facts, rootless):
        container = {}
        if self.devices:
            container["AddDevice"] = list(self.devices)
        groups = _groups_for(self.nodes, rootless)
        if groups:
            container["GroupAdd"] = groups
        if self.volumes:
            container["Volume"] = list(self.volumes)
        if self.args:
            container["PodmanArgs"] = list(self.args)
        if self.env:
            container["Environment"] = dict(self.env)
        return {"Container": container} if container else {}


def _groups_for(nodes, rootless):
    needed = []
    for n in nodes:
        if not n.get("exists") or n.get("gid") in (None, 0):
            continue
        if int(n["mode"], 8) & 0o006 == 0o006:
            continue  # world read/write: no group needed
        if str(n["gid"]) not in needed:
            needed.append(str(n["gid"]))
    if not needed:
        return []
    return ["keep-groups"] if rootless else needed


def _membership_problem(facts, nodes, rootless):
    """For rootless containers the user must be in the groups that own the nodes."""
    if not rootless:
        return None
    user = facts.get("user")
    if not user:
        return None
    if not user.get("exists"):
        return "user %s does not exist on the host" % user["name"]
    missing = []
    for n in nodes:
        if not n.get("exists") or int(n["mode"], 8) & 0o006 == 0o006:
            continue
        if n["gid"] not in user["gids"]:
            name = n.get("group") or str(n["gid"])
            if name not in missing:
                missing.append(name)
    if missing:
        return ("rootless containers keep only the user's own groups, and %s is not in %s which own%s the device "
                "nodes: run 'usermod -aG %s %s' and restart its user manager ('loginctl terminate-user %s')"
                % (user["name"], ", ".join(missing), "s" if len(missing) == 1 else "", ",".join(missing),
                   user["name"], user["name"]))
    return None


def _real_gpus(facts, vendor_id=None, drivers=None):
    return [g for g in facts["gpus"] if not g["virtual"]
            and (vendor_id is None or g["vendor_id"] == vendor_id)
            and (drivers is None or g["driver"] in drivers)]


def _cdi_device(facts):
    devs = facts["nvidia"]["cdi_devices"]
    if "nvidia.com/gpu=all" in devs:
        return "nvidia.com/gpu=all"
    return devs[0] if devs else None


def _nvidia_common(facts, plan, need_version):
    nv = facts["nvidia"]
    gpus = [g for g in facts["gpus"] if g["vendor_id"] == "0x10de"]
    if not gpus and not nv["driver_loaded"]:
        return "no NVIDIA GPU found"
    if gpus and all(g["driver"] == "nouveau" for g in gpus) and not nv["driver_loaded"]:
        return ("%s uses nouveau, which has no CUDA or NVENC: install the proprietary NVIDIA driver (>= %d)"
                % (_gpu_label(gpus[0]), NVIDIA_MIN_DRIVER))
    if not nv["driver_loaded"]:
        return "the proprietary NVIDIA driver is not loaded (/proc/driver/nvidia/version is missing)"
    version = _version_tuple(nv["driver_version"])
    if need_version and version and version[0] < NVIDIA_MIN_DRIVER:
        return ("NVIDIA driver %s is older than %d (CUDA 12.3), which the Immich -cuda image needs: upgrade the driver"
                % (nv["driver_version"], NVIDIA_MIN_DRIVER))
    device = _cdi_device(facts)
    if not device:
        return ("NVIDIA driver %s is loaded but no CDI spec defines nvidia.com/gpu devices in /etc/cdi or /var/run/cdi: "
                "install the NVIDIA Container Toolkit and run 'nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml'"
                % nv["driver_version"])
    plan.devices.append(device)
    plan.why = "NVIDIA driver %s, CDI device %s" % (nv["driver_version"], device)
    return None


def _ml_cuda(facts, plan, rootless):
    return _nvidia_common(facts, plan, need_version=True)


def _ml_rocm(facts, plan, rootless):
    amd = _real_gpus(facts, "0x1002")
    if not amd:
        return "no AMD GPU found"
    if all(g["driver"] == "radeon" for g in amd):
        return "%s uses the old radeon driver, which ROCm cannot use (amdgpu is needed)" % _gpu_label(amd[0])
    if not facts["amd"]["driver_loaded"]:
        return "the amdgpu driver is not loaded"
    kfd = facts["amd"]["kfd"]
    if not kfd.get("exists"):
        return "/dev/kfd (the ROCm compute interface) is missing: the amdgpu driver was built without KFD, or the node is not created"
    compute = [g for g in amd if g.get("gfx_target") and g["render_node"]]
    if not compute:
        return "no AMD GPU appears in the KFD topology with a render node (/sys/class/kfd/kfd/topology/nodes)"
    nodes = [kfd] + [n for g in compute for n in g["nodes"] if n["path"] == g["render_node"]]
    problem = _membership_problem(facts, nodes, rootless)
    if problem:
        return problem
    plan.devices.extend(["/dev/kfd"] + [g["render_node"] for g in compute])
    plan.nodes.extend(nodes)
    plan.why = ", ".join(_gpu_label(g) for g in compute) + " with amdgpu and /dev/kfd"
    overrides = dict((g["gfx_target"], g["hsa_override_suggested"]) for g in compute if g.get("hsa_override_suggested"))
    if overrides:
        plan.suggested_env["HSA_OVERRIDE_GFX_VERSION"] = sorted(overrides.values())[0]
        plan.why += ("; %s has no ROCm kernels of its own: HSA_OVERRIDE_GFX_VERSION=%s may make it work (suggested, "
                     "not applied)" % (", ".join(sorted(overrides)), plan.suggested_env["HSA_OVERRIDE_GFX_VERSION"]))
    return None


def _render_plan(facts, plan, gpus, rootless, label):
    nodes = [n for g in gpus for n in g["nodes"] if n["path"] == g["render_node"] and n.get("exists")]
    if not nodes:
        return "%s has no render node in /dev/dri" % label
    problem = _membership_problem(facts, nodes, rootless)
    if problem:
        return problem
    plan.devices.extend(n["path"] for n in nodes)
    plan.nodes.extend(nodes)
    plan.why = ", ".join(_gpu_label(g) for g in gpus)
    return None


def _intel_render(facts, plan, rootless):
    """OpenVINO (ML) and QuickSync (transcoding) both need an Intel i915/xe render node."""
    intel = _real_gpus(facts, "0x8086", ("i915", "xe"))
    if not intel:
        return "no Intel GPU with the i915 or xe driver found"
    return _render_plan(facts, plan, intel, rootless, _gpu_label(intel[0]))


def _ml_rknn(facts, plan, rootless):
    rk = facts["rockchip"]
    if not rk["soc"]:
        return ("not a Rockchip %s SoC (device tree: %s)"
                % ("/".join(RKNN_SOCS), ", ".join(rk["compatible"][:3]) or "none"))
    if not rk["rknpu_loaded"]:
        extra = " (the mainline 'rocket' accel driver at %s is not what the -rknn image uses)" % rk["accel_nodes"][0] \
            if rk["accel_nodes"] else ""
        return "%s has no BSP rknpu driver loaded%s: use a vendor (BSP) kernel with rknpu >= 0.9.8" % (rk["soc"], extra)
    version = _version_tuple(rk["rknpu_version"]) if rk["rknpu_version"] else None
    if version and version < RKNPU_MIN:
        return "rknpu driver %s is older than 0.9.8, which the -rknn image needs" % rk["rknpu_version"]
    plan.devices.extend(rk["rknpu_nodes"] or ["/dev/dri"])
    plan.args.extend(["--security-opt=systempaths=unconfined", "--security-opt=apparmor=unconfined"])
    plan.why = "Rockchip %s NPU, rknpu driver %s" % (rk["soc"], rk["rknpu_version"] or "(version unreadable without root/debugfs)")
    return None


def _ml_armnn(facts, plan, rootless):
    arm = facts["arm"]
    if not arm["mali_kbase"]:
        if arm["mainline_gpus"]:
            return ("the Mali GPU (%s) uses the mainline panfrost/panthor driver, which has no /dev/mali0: the -armnn "
                    "image needs the vendor kbase driver" % ", ".join(arm["mainline_gpus"]))
        return "no ARM Mali GPU with the vendor kbase driver (/dev/mali0) found"
    if not arm["libmali"]:
        return "/dev/mali0 exists but libmali.so is not on the host (the -armnn image mounts it from /usr/lib/libmali.so)"
    problem = _membership_problem(facts, [arm["mali0"]], rootless)
    if problem:
        return problem
    plan.devices.append("/dev/mali0")
    plan.nodes.append(arm["mali0"])
    plan.volumes.append("%s:/usr/lib/libmali.so:ro" % arm["libmali"])
    if arm["csf_firmware"]:
        plan.volumes.append("%s:%s:ro" % (arm["csf_firmware"], arm["csf_firmware"]))
    plan.why = "ARM Mali with the kbase driver (/dev/mali0) and %s" % arm["libmali"]
    return None


def _ml_cpu(facts, plan, rootless):
    plan.why = "no usable accelerator was chosen; the CPU image runs everywhere Immich publishes images"
    if facts["architecture"] not in ML_ARCH["cpu"]:
        plan.why = "Immich publishes ML images for amd64 and arm64 only; this host is %s" % facts["architecture"]
    return None


def _tc_nvenc(facts, plan, rootless):
    return _nvidia_common(facts, plan, need_version=False)


def _tc_vaapi(facts, plan, rootless):
    gpus = _real_gpus(facts, "0x1002", ("amdgpu", "radeon")) or _real_gpus(facts, "0x8086", ("i915", "xe"))
    if not gpus:
        return "no AMD or Intel GPU with a VAAPI-capable driver found"
    return _render_plan(facts, plan, gpus[:1], rootless, _gpu_label(gpus[0]))


def _tc_rkmpp(facts, plan, rootless):
    rk = facts["rockchip"]
    if not any("rockchip" in c for c in rk["compatible"]):
        return "not a Rockchip SoC"
    missing = [n for n in ("/dev/rga", "/dev/mpp_service", "/dev/dma_heap") if n not in rk["rkmpp_nodes"]]
    if missing:
        return "Rockchip media devices missing: %s (needs a BSP kernel with MPP/RGA)" % ", ".join(missing)
    plan.devices.extend(["/dev/rga", "/dev/dri", "/dev/dma_heap", "/dev/mpp_service"])
    plan.args.extend(["--security-opt=systempaths=unconfined", "--security-opt=apparmor=unconfined"])
    plan.why = "Rockchip MPP/RGA media devices"
    return None


def _tc_none(facts, plan, rootless):
    plan.why = "no usable hardware encoder: transcoding runs on the CPU"
    return None


ML_CHECKS = {"cuda": _ml_cuda, "rocm": _ml_rocm, "openvino": _intel_render, "rknn": _ml_rknn,
             "armnn": _ml_armnn, "cpu": _ml_cpu}
TC_CHECKS = {"nvenc": _tc_nvenc, "quicksync": _intel_render, "vaapi": _tc_vaapi, "rkmpp": _tc_rkmpp,
             "none": _tc_none}


def quadlet_lines(sections):
    lines = []
    for key, value in sections.get("Container", {}).items():
        if isinstance(value, dict):
            lines.extend("%s=%s=%s" % (key, k, v) for k, v in value.items())
        else:
            lines.extend("%s=%s" % (key, v) for v in value)
    return lines


def _choose(facts, order, checks, arch_table, fallback, rootless):
    arch = facts["architecture"]
    rejected = {}
    chosen = None
    plans = {}
    for backend in order:
        archs = arch_table.get(backend)
        if archs is not None and arch not in archs and backend != fallback:
            rejected[backend] = "%s is for %s hosts only (Immich builds it there); this host is %s" % (
                backend, " and ".join(archs), arch)
            continue
        plan = _Plan()
        problem = checks[backend](facts, plan, rootless)
        if problem:
            rejected[backend] = problem
            continue
        plans[backend] = plan
        if chosen is None:
            chosen = backend
        else:
            rejected[backend] = "also usable (%s), but %s comes first in the preference order" % (plan.why, chosen)
    for backend in checks:
        if backend not in order:
            rejected[backend] = "not in prefer"
    return chosen, plans, rejected


def recommend(facts, prefer=None, rootless=False):
    """The ML and transcoding backends, each with its reason, rejections and quadlet lines."""
    order = [b for b in (prefer or ML_BACKENDS) if b in ML_CHECKS]
    if "cpu" not in order:
        order.append("cpu")
    ml, plans, ml_rejected = _choose(facts, order, ML_CHECKS, ML_ARCH, "cpu", rootless)
    ml_plan = plans[ml]
    ml_sections = ml_plan.quadlet(facts, rootless)
    tc_order = list(TRANSCODE_BACKENDS)
    tc, tc_plans, tc_rejected = _choose(facts, tc_order, TC_CHECKS, TRANSCODE_ARCH, "none", rootless)
    tc_plan = tc_plans[tc]
    tc_sections = tc_plan.quadlet(facts, rootless)
    ignored = ["%s: virtual GPU, useless for ML and transcoding" % _gpu_label(g) for g in facts["gpus"] if g["virtual"]]
    return dict(
        prefer=order,
        rootless=rootless,
        ml_backend=ml,
        ml_image_suffix=ML_SUFFIX[ml],
        ml_reason=ml_plan.why,
        ml_rejected=ml_rejected,
        ml_quadlet=ml_sections,
        ml_quadlet_lines=quadlet_lines(ml_sections),
        ml_environment_suggested=dict(ml_plan.suggested_env),
        ml_gpu=ml != "cpu",
        transcode_backend=tc,
        transcode_reason=tc_plan.why,
        transcode_rejected=tc_rejected,
        transcode_quadlet=tc_sections,
        transcode_quadlet_lines=quadlet_lines(tc_sections),
        transcode_device=next((d for d in tc_plan.devices if d.startswith("/dev/dri/renderD")), None),
        ignored=ignored,
    )
