"""Build fixture trees with the real shapes of sysfs, /dev, /proc and /etc for gpu_facts.

Device nodes are regular files with the mode and group a real host gives them (chown needs
root, as CI has). Layout follows the kernel: /sys/class/drm/cardN -> ../../devices/<bus path>/drm/cardN,
whose `device` links back to the PCI or platform device holding vendor/device/class and a
`driver` link to /sys/bus/<bus>/drivers/<name>.
"""

import os

GROUPS = {"root": 0, "video": 44, "render": 992, "immich": 1000}


class Tree:
    def __init__(self, root, users=None):
        self.root = str(root)
        members = {"video": [], "render": []}
        for user, groups in (users or {}).items():
            for g in groups:
                members.setdefault(g, []).append(user)
        self.write("etc/group", "".join("%s:x:%d:%s\n" % (n, gid, ",".join(members.get(n, [])))
                                        for n, gid in GROUPS.items()))
        self.write("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nimmich:x:1000:1000::/home/immich:/bin/sh\n")
        os.makedirs(self.p("sys/class/drm"), exist_ok=True)
        os.makedirs(self.p("dev/dri"), exist_ok=True)

    def p(self, rel):
        return os.path.join(self.root, rel)

    def write(self, rel, text, mode=None):
        path = self.p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def link(self, rel, target):
        path = self.p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)

    def dev(self, rel, mode=0o660, group="root"):
        path = self.write(rel, "")
        os.chmod(path, mode)
        os.chown(path, 0, GROUPS[group])

    def module(self, name):
        os.makedirs(self.p("sys/module/%s" % name), exist_ok=True)

    def _drm(self, devrel, card=None, render=None, connectors=()):
        for node in [n for n in (("card%d" % card) if card is not None else None,
                                 ("renderD%d" % render) if render is not None else None) if n]:
            os.makedirs(self.p("%s/drm/%s" % (devrel, node)))
            self.link("%s/drm/%s/device" % (devrel, node), "../../../" + os.path.basename(devrel))
            self.link("sys/class/drm/%s" % node, "../../%s/drm/%s" % (devrel[len("sys/"):], node))
            if node.startswith("card"):
                self.dev("dev/dri/%s" % node, 0o660, "video")
            else:
                self.dev("dev/dri/%s" % node, 0o660, "render")
        for c in connectors:
            name = "card%d-%s" % (card, c)
            os.makedirs(self.p("%s/drm/card%d/%s" % (devrel, card, name)))
            self.link("sys/class/drm/%s" % name, "../../%s/drm/card%d/%s" % (devrel[len("sys/"):], card, name))

    def pci_gpu(self, slot, vendor, device, driver, card=None, render=None, cls="0x030000", vram=None,
                connectors=("HDMI-A-1",)):
        devrel = "sys/devices/pci0000:00/%s" % slot
        self.write(devrel + "/vendor", vendor + "\n")
        self.write(devrel + "/device", device + "\n")
        self.write(devrel + "/class", cls + "\n")
        os.makedirs(self.p("sys/bus/pci/drivers/%s" % driver), exist_ok=True)
        self.link(devrel + "/driver", "../../../bus/pci/drivers/%s" % driver)
        if vram is not None:
            self.write(devrel + "/mem_info_vram_total", "%d\n" % vram)
        self._drm(devrel, card, render, connectors if card is not None else ())

    def platform_gpu(self, name, driver, card=None, render=None):
        devrel = "sys/devices/platform/%s" % name
        os.makedirs(self.p(devrel), exist_ok=True)
        os.makedirs(self.p("sys/bus/platform/drivers/%s" % driver), exist_ok=True)
        self.link(devrel + "/driver", "../../../bus/platform/drivers/%s" % driver)
        self._drm(devrel, card, render, ())

    def kfd(self, nodes, kfd_group="render"):
        """nodes: list of dicts of KFD properties (CPU nodes have gfx_target_version 0)."""
        for i, props in enumerate(nodes):
            self.write("sys/class/kfd/kfd/topology/nodes/%d/properties" % i,
                       "".join("%s %s\n" % kv for kv in props.items()))
        self.dev("dev/kfd", 0o660, kfd_group)

    def nvidia(self, version, gpus=1):
        self.module("nvidia")
        self.write("proc/driver/nvidia/version",
                   "NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Release Build  (dvs-builder@U16)\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n" % version)
        self.write("sys/module/nvidia/version", version + "\n")
        for i in range(gpus):
            self.dev("dev/nvidia%d" % i, 0o666)
        for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
            self.dev("dev/" + n, 0o666)

    def cdi(self, rel, names=("0", "GPU-3f5c7a1e-9b2d-4c1e-8f00-1234567890ab", "all")):
        body = ["---", "cdiVersion: 0.5.0", "kind: nvidia.com/gpu", "devices:"]
        for n in names:
            body += ["- name: \"%s\"" % n, "  containerEdits:", "    deviceNodes:",
                     "    - path: /dev/nvidia0", "    - path: /dev/dri/renderD128"]
        body += ["containerEdits:", "  env:", "  - NVIDIA_VISIBLE_DEVICES=void", "  hooks:",
                 "  - hookName: createContainer", "    path: /usr/bin/nvidia-cdi-hook",
                 "  deviceNodes:", "  - path: /dev/nvidiactl"]
        self.write(rel, "\n".join(body) + "\n")

    def compatible(self, *strings):
        self.write("proc/device-tree/compatible", "\x00".join(strings) + "\x00")


CPU_NODE = {"cpu_cores_count": 16, "simd_count": 0, "gfx_target_version": 0, "vendor_id": 0, "device_id": 0}


def gpu_node(version, vendor, device, minor, apu=False, simd=120):
    return {"cpu_cores_count": 8 if apu else 0, "simd_count": simd, "gfx_target_version": version,
            "vendor_id": vendor, "device_id": device, "drm_render_minor": minor, "unique_id": 1234}
