"""Pure parsers and tables of gpu_facts (fixture trees are in tests/integration/test_gpu_facts.py)."""

import pytest

from ansible_collections.homelab.immich.plugins.module_utils import gpu


@pytest.mark.parametrize("version, target", [
    (90010, "gfx90a"), (90012, "gfx90c"), (100300, "gfx1030"), (100302, "gfx1032"),
    (100306, "gfx1036"), (110003, "gfx1103"), (110501, "gfx1151"), (120001, "gfx1201"), (0, None),
])
def test_gfx_target(version, target):
    assert gpu.gfx_target(version) == target


@pytest.mark.parametrize("target", ["gfx1030", "gfx1100", "gfx1101", "gfx1102", "gfx1151", "gfx1200",
                                    "gfx1201", "gfx90a", "gfx942"])
def test_no_override_for_natively_supported_targets(target):
    assert target not in gpu.HSA_OVERRIDES


def test_override_table_is_conservative():
    assert gpu.HSA_OVERRIDES["gfx1032"] == "10.3.0" and gpu.HSA_OVERRIDES["gfx1103"] == "11.0.0"
    assert set(gpu.HSA_OVERRIDES.values()) == {"10.3.0", "11.0.0"}


def test_parse_cdi_yaml_keeps_only_device_names():
    text = (
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n"
        "- name: \"0\"\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n"
        "- name: all\n  containerEdits:\n    hooks:\n    - hookName: createContainer\n"
        "containerEdits:\n  env:\n  - NVIDIA_VISIBLE_DEVICES=void\n"
    )
    assert gpu.parse_cdi(text, "nvidia.yaml") == ("nvidia.com/gpu", ["0", "all"])


def test_parse_cdi_yaml_indented_devices():
    text = "kind: 'nvidia.com/gpu'\ndevices:\n  - name: 'GPU-abc'\n    containerEdits: {}\n"
    assert gpu.parse_cdi(text, "x.yml") == ("nvidia.com/gpu", ["GPU-abc"])


def test_parse_cdi_json():
    text = '{"cdiVersion":"0.6.0","kind":"nvidia.com/gpu","devices":[{"name":"0"},{"name":"all"},{}]}'
    assert gpu.parse_cdi(text, "nvidia.json") == ("nvidia.com/gpu", ["0", "all"])
    assert gpu.parse_cdi("{broken", "x.json") == (None, [])


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n", "550.54.14"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n", "570.86.15"),
])
def test_nvidia_driver_version(tmp_path, text, version):
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(text)
    assert gpu.nvidia_driver(gpu.Reader(str(tmp_path))) == version


@pytest.mark.parametrize("machine, arch", [("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "arm"),
                                           ("riscv64", "riscv64"), ("", "unknown")])
def test_normalise_arch(machine, arch):
    assert gpu.normalise_arch(machine) == arch


def test_parse_group_and_passwd():
    groups = gpu.parse_group_file("video:x:44:immich,bob\nrender:x:992:\nbad line\n")
    assert groups == {"video": (44, ["immich", "bob"]), "render": (992, [])}
    assert gpu.parse_passwd_file("immich:x:1000:1000::/home/immich:/bin/sh\n") == {"immich": (1000, 1000)}


def test_parse_properties():
    assert gpu.parse_properties("gfx_target_version 100300\nname foo\nbad\n") == {
        "gfx_target_version": 100300, "name": "foo"}


def test_quadlet_lines():
    sections = {"Container": {"AddDevice": ["/dev/kfd"], "GroupAdd": ["992"], "Environment": {"A": "1"}}}
    assert gpu.quadlet_lines(sections) == ["AddDevice=/dev/kfd", "GroupAdd=992", "Environment=A=1"]
