# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The health gate's decisions (update.yml, ml_backend.yml) as plain functions over the state that
homelab.immich.immich_state read."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError


def gate_before(services, state):
    """For each service, in order: its active state and the image (ID and reference) its newest
    container runs, from immich_state's services and containers."""
    try:
        units = state["services"]
        containers = state.get("containers") or {}
    except (KeyError, TypeError, AttributeError):
        raise AnsibleFilterError("gate_before needs the result of homelab.immich.immich_state with services read")
    out = []
    for service in services:
        c = containers.get(service) or {}
        out.append({"service": service, "state": (units.get(service) or {}).get("active", "unknown"),
                    "old": c.get("image_id", ""), "old_ref": c.get("image", "")})
    return out


def gate_after(before, images, image_ids):
    """For each service of BEFORE: the image ID its unit will name (IMAGES: service -> reference,
    IMAGE_IDS: reference -> ID) and whether it differs from the one it runs now (a service that runs
    nothing yet, or whose image is not here, is not counted as changed)."""
    out = []
    for entry in before:
        new = (image_ids.get(images.get(entry["service"], "")) or "") if images else ""
        out.append({"service": entry["service"], "new": new,
                    "changed": bool(entry["old"] and new and new != entry["old"])})
    return out


class FilterModule(object):
    def filters(self):
        return {"gate_before": gate_before, "gate_after": gate_after}
