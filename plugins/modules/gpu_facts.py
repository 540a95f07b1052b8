#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_facts
short_description: What accelerators a host really has, and which Immich image fits
version_added: 0.1.0
description:
  - Reads the kernel's own view of the host's GPUs and NPUs in pure Python (C(/sys/class/drm),
    the KFD topology, C(/proc/driver/nvidia), CDI specs, C(/dev), the device tree) and returns
    them as the C(gpu) fact, with the numeric owner GID, group name and mode of every device node.
  - Connector entries and firmware framebuffers (C(simpledrm), C(efifb)) are skipped; virtual GPUs
    (virtio, QXL, VMware, Bochs) are recognised and never chosen; C(nouveau) is recognised as not
    CUDA-capable.
  - Recommends the Immich machine-learning backend (C(cpu), C(rocm), C(cuda), C(openvino),
    C(armnn), C(rknn)) with its image suffix, and the transcoding backend (C(none), C(vaapi),
    C(quicksync), C(nvenc), C(rkmpp)), each gated by architecture and readiness, with a reason
    for the choice and for every backend rejected, and the quadlet C([Container]) keys the choice
    needs (C(AddDevice), C(GroupAdd) with numeric GIDs or C(keep-groups), C(Volume), C(PodmanArgs)).
  - An C(HSA_OVERRIDE_GFX_VERSION) is only ever suggested, from a small conservative table, never
    put into the quadlet keys.
  - Never fails on odd trees; files it cannot read are listed in C(unreadable).
options:
  root:
    description:
      - Directory holding C(sys/), C(dev/), C(proc/) and C(etc/) to read instead of the live host
        (for tests, or to diagnose a copied tree).
    type: path
    default: /
  user:
    description:
      - Report this user's membership of the groups that own the device nodes (C(video),
        C(render)); with O(rootless=true), a backend whose nodes the user cannot open is rejected.
    type: str
  prefer:
    description:
      - ML backends to consider, in order of preference. C(cpu) is always the last resort.
    type: list
    elements: str
    choices: [cuda, rocm, openvino, rknn, armnn, cpu]
    default: [cuda, rocm, openvino, rknn, armnn, cpu]
  rootless:
    description:
      - The containers run rootless. Device groups are then passed as C(GroupAdd=keep-groups) (the
        user's own groups; needs crun) instead of numeric GIDs, and the user must be in them.
    type: bool
    default: false
  architecture:
    description:
      - Override the architecture (C(uname -m) of the target by default), for copied trees.
    type: str
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to diff.
  facts:
    support: full
    description: Returns the C(gpu) fact.
  platform:
    platforms: posix
    support: full
    description: Linux (sysfs, procfs).
author:
  - homelab.immich maintainers (@homelab-immich)
"""

EXAMPLES = r"""
- name: Read the GPUs of the ML hosts
  homelab.immich.gpu_facts:
    user: immich
    rootless: true

- name: Say what was chosen and why
  ansible.builtin.debug:
    msg: >-
      ML backend {{ ansible_facts.gpu.recommendation.ml_backend }}
      (image suffix '{{ ansible_facts.gpu.recommendation.ml_image_suffix }}'):
      {{ ansible_facts.gpu.recommendation.ml_reason }}

- name: Never use CUDA on this host, prefer ROCm
  homelab.immich.gpu_facts:
    prefer: [rocm, openvino, cpu]

- name: Diagnose a copy of another host's /sys, /dev, /proc and /etc
  homelab.immich.gpu_facts:
    root: /tmp/host-copy
    architecture: aarch64
"""

RETURN = r"""
ansible_facts:
  description: Facts added to the host.
  returned: always
  type: dict
  contains:
    gpu:
      description: Everything found, and the recommendation.
      type: dict
      contains:
        architecture:
          description: Normalised architecture (amd64, arm64, ...).
          type: str
          sample: amd64
        gpus:
          description:
            - One entry per DRM GPU with C(vendor_id), C(device_id), C(vendor), C(driver), C(pci_slot)
              (or the platform C(device)), C(card), C(render_node), C(virtual), C(nodes) (each with
              C(path), C(gid), C(group), C(mode)), and for AMD C(gfx_target), C(apu),
              C(hsa_override_suggested), C(vram_bytes).
          type: list
          elements: dict
        skipped:
          description: DRM cards that are not GPUs (firmware framebuffers), with the reason.
          type: list
          elements: dict
        amd:
          description: C(driver_loaded), C(kfd) (node facts) and C(kfd_nodes) (gfx targets and render minors).
          type: dict
        nvidia:
          description: C(driver_loaded), C(driver_version), C(nodes) (C(/dev/nvidia*)), C(nouveau),
            C(cdi_specs) and C(cdi_devices).
          type: dict
        arm:
          description: C(mali_kbase), C(mali0), C(libmali), C(csf_firmware), C(mainline_gpus).
          type: dict
        rockchip:
          description: C(compatible), C(soc), C(rknpu_loaded), C(rknpu_version), C(rknpu_nodes),
            C(rkmpp_nodes), C(accel_nodes).
          type: dict
        user:
          description: With O(user), its C(uid), C(gids), C(groups), and C(video)/C(render) membership.
          type: dict
        unreadable:
          description: Paths that exist but could not be read, with the error.
          type: list
          elements: str
        recommendation:
          description: The choice.
          type: dict
          contains:
            ml_backend:
              description: cpu, rocm, cuda, openvino, armnn or rknn.
              type: str
              sample: rocm
            ml_image_suffix:
              description: Appended to the immich-machine-learning image tag.
              type: str
              sample: -rocm
            ml_reason:
              description: Why this backend.
              type: str
            ml_rejected:
              description: Every other backend and why it was not chosen.
              type: dict
            ml_quadlet:
              description: Quadlet sections the ML container needs (merge into its unit).
              type: dict
              sample: {"Container": {"AddDevice": ["/dev/kfd", "/dev/dri/renderD128"], "GroupAdd": ["992"]}}
            ml_quadlet_lines:
              description: The same as unit-file lines.
              type: list
              elements: str
            ml_environment_suggested:
              description: Environment that may help (HSA_OVERRIDE_GFX_VERSION), never applied.
              type: dict
            transcode_backend:
              description: none, vaapi, quicksync, nvenc or rkmpp.
              type: str
            transcode_reason:
              description: Why.
              type: str
            transcode_rejected:
              description: Every other transcoding backend and why not.
              type: dict
            transcode_quadlet:
              description: Quadlet sections the server container needs for it.
              type: dict
            transcode_device:
              description: The render node to use as Immich's preferred hardware device.
              type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.homelab.immich.plugins.module_utils import gpu


def main():
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", default="/"),
            user=dict(type="str"),
            prefer=dict(type="list", elements="str", choices=list(gpu.ML_BACKENDS), default=list(gpu.ML_BACKENDS)),
            rootless=dict(type="bool", default=False),
            architecture=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    facts = gpu.gather(p["root"], user=p["user"], arch=p["architecture"])
    facts["recommendation"] = gpu.recommend(facts, prefer=p["prefer"], rootless=p["rootless"])
    module.exit_json(changed=False, ansible_facts=dict(gpu=facts))


if __name__ == "__main__":
    main()
