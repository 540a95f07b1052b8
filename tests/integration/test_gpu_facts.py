"""gpu_facts over fixture trees with the real shapes of sysfs, /dev, /proc and /etc.

Each scenario asserts the whole recommendation: ML backend, image suffix, quadlet keys, the
transcoding backend and its keys, and why each other backend was rejected. Device nodes get
their real groups with chown, so these run as root (as CI does).
"""

import os

import pytest

from ansible_collections.homelab.immich.plugins.module_utils import gpu

from gpu_tree import CPU_NODE, Tree, gpu_node


@pytest.fixture
def tree(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the fixture trees chown device nodes to their real groups and need root (CI runs as root)")
    return Tree(tmp_path / "host", users={"immich": ["video", "render"]})


def facts_for(root, arch="x86_64", **kw):
    prefer = kw.pop("prefer", None)
    rootless = kw.pop("rootless", False)
    f = gpu.gather(str(root), arch=arch, **kw)
    f["recommendation"] = gpu.recommend(f, prefer=prefer, rootless=rootless)
    return f


def build_amd_gfx1030(t):
    t.pci_gpu("0000:03:00.0", "0x1002", "0x73bf", "amdgpu", card=0, render=128, vram=17163091968)
    t.module("amdgpu")
    t.kfd([CPU_NODE, gpu_node(100300, 4098, 0x73bf, 128)])


def test_amd_discrete_gfx1030(tree):
    build_amd_gfx1030(tree)
    f = facts_for(tree.root)
    (g,) = f["gpus"]
    assert g["vendor"] == "AMD" and g["driver"] == "amdgpu" and g["pci_slot"] == "0000:03:00.0"
    assert g["card"] == "/dev/dri/card0" and g["render_node"] == "/dev/dri/renderD128"
    assert g["gfx_target"] == "gfx1030" and g["hsa_override_suggested"] is None and g["vram_bytes"] == 17163091968
    render = [n for n in g["nodes"] if n["path"] == "/dev/dri/renderD128"][0]
    assert (render["gid"], render["group"], render["mode"]) == (992, "render", "0660")
    assert f["amd"]["kfd"]["group"] == "render"
    r = f["recommendation"]
    assert r["ml_backend"] == "rocm" and r["ml_image_suffix"] == "-rocm" and r["ml_gpu"]
    assert r["ml_quadlet"] == {"Container": {"AddDevice": ["/dev/kfd", "/dev/dri/renderD128"], "GroupAdd": ["992"]}}
    assert r["ml_quadlet_lines"] == ["AddDevice=/dev/kfd", "AddDevice=/dev/dri/renderD128", "GroupAdd=992"]
    assert "gfx1030" in r["ml_reason"] and r["ml_environment_suggested"] == {}
    assert r["ml_rejected"]["cuda"] == "no NVIDIA GPU found"
    assert "Intel" in r["ml_rejected"]["openvino"]
    assert "arm64" in r["ml_rejected"]["rknn"] and "arm64" in r["ml_rejected"]["armnn"]
    assert "rocm comes first" in r["ml_rejected"]["cpu"]
    assert r["transcode_backend"] == "vaapi" and r["transcode_device"] == "/dev/dri/renderD128"
    assert r["transcode_quadlet"] == {"Container": {"AddDevice": ["/dev/dri/renderD128"], "GroupAdd": ["992"]}}
    assert f["unreadable"] == []


def build_hybrid(t, cdi=True):
    t.pci_gpu("0000:01:00.0", "0x10de", "0x28e0", "nvidia", card=0, render=128, connectors=())
    t.pci_gpu("0000:05:00.0", "0x1002", "0x15bf", "amdgpu", card=1, render=129, connectors=("eDP-1",))
    t.module("amdgpu")
    t.kfd([CPU_NODE, gpu_node(110003, 4098, 0x15bf, 129, apu=True, simd=24)])
    t.nvidia("550.54.14")
    if cdi:
        t.cdi("etc/cdi/nvidia.yaml")


def test_hybrid_laptop_amd_apu_gfx1103_and_nvidia(tree):
    build_hybrid(tree)
    f = facts_for(tree.root)
    assert [g["vendor"] for g in f["gpus"]] == ["NVIDIA", "AMD"]
    apu = f["gpus"][1]
    assert apu["gfx_target"] == "gfx1103" and apu["apu"] is True and apu["hsa_override_suggested"] == "11.0.0"
    assert f["nvidia"]["driver_version"] == "550.54.14"
    assert f["nvidia"]["cdi_devices"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=GPU-3f5c7a1e-9b2d-4c1e-8f00-1234567890ab",
                                          "nvidia.com/gpu=all"]
    r = f["recommendation"]
    assert r["ml_backend"] == "cuda" and r["ml_image_suffix"] == "-cuda"
    assert r["ml_quadlet"] == {"Container": {"AddDevice": ["nvidia.com/gpu=all"]}}
    assert "550.54.14" in r["ml_reason"]
    assert r["ml_rejected"]["rocm"].startswith("also usable") and "cuda comes first" in r["ml_rejected"]["rocm"]
    assert r["ml_environment_suggested"] == {}
    assert r["transcode_backend"] == "nvenc"
    assert r["transcode_quadlet"] == {"Container": {"AddDevice": ["nvidia.com/gpu=all"]}}
    assert r["transcode_rejected"]["vaapi"].startswith("also usable")
    # the user prefers the iGPU: ROCm on the APU only, with the override suggested, never applied
    r = facts_for(tree.root, prefer=["rocm", "cpu"])["recommendation"]
    assert r["ml_backend"] == "rocm"
    assert r["ml_quadlet"] == {"Container": {"AddDevice": ["/dev/kfd", "/dev/dri/renderD129"], "GroupAdd": ["992"]}}
    assert r["ml_environment_suggested"] == {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    assert "HSA_OVERRIDE_GFX_VERSION=11.0.0" in r["ml_reason"] and "not applied" in r["ml_reason"]
    assert "Environment" not in r["ml_quadlet"]["Container"]
    assert r["ml_rejected"]["cuda"] == "not in prefer" and r["prefer"] == ["rocm", "cpu"]


def test_nvidia_with_cdi_spec(tree):
    tree.pci_gpu("0000:01:00.0", "0x10de", "0x2684", "nvidia", card=1, render=128)
    tree.nvidia("560.35.03")
    tree.cdi("var/run/cdi/nvidia.yaml", names=("0", "all"))
    f = facts_for(tree.root)
    assert [n["path"] for n in f["nvidia"]["nodes"]] == [
        "/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0", "/dev/nvidiactl"]
    assert f["nvidia"]["cdi_specs"][0]["path"] == "/var/run/cdi/nvidia.yaml"
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"]) == ("cuda", "-cuda")
    assert r["ml_quadlet_lines"] == ["AddDevice=nvidia.com/gpu=all"]
    assert (r["transcode_backend"], r["transcode_quadlet_lines"]) == ("nvenc", ["AddDevice=nvidia.com/gpu=all"])


def test_nvidia_without_cdi_is_not_ready(tree):
    tree.pci_gpu("0000:01:00.0", "0x10de", "0x2684", "nvidia", card=0, render=128)
    tree.nvidia("560.35.03")
    r = facts_for(tree.root)["recommendation"]
    assert r["ml_backend"] == "cpu" and r["ml_image_suffix"] == "" and r["ml_quadlet"] == {}
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in r["ml_rejected"]["cuda"]
    assert r["transcode_backend"] == "none"
    assert "nvidia-ctk" in r["transcode_rejected"]["nvenc"]


def test_nvidia_old_driver_is_rejected_for_cuda(tree):
    tree.pci_gpu("0000:01:00.0", "0x10de", "0x1e84", "nvidia", card=0, render=128)
    tree.nvidia("535.183.01")
    tree.cdi("etc/cdi/nvidia.yaml")
    r = facts_for(tree.root)["recommendation"]
    assert r["ml_backend"] == "cpu" and "older than 545" in r["ml_rejected"]["cuda"]
    assert r["transcode_backend"] == "nvenc"


def test_nouveau_is_not_cuda(tree):
    tree.pci_gpu("0000:01:00.0", "0x10de", "0x1c82", "nouveau", card=0, render=128)
    f = facts_for(tree.root)
    assert f["nvidia"]["nouveau"] is True and f["nvidia"]["driver_loaded"] is False
    r = f["recommendation"]
    assert r["ml_backend"] == "cpu"
    assert "nouveau, which has no CUDA" in r["ml_rejected"]["cuda"]
    assert r["transcode_backend"] == "none" and "nouveau" in r["transcode_rejected"]["nvenc"]


@pytest.mark.parametrize("driver, device", [("i915", "0x9a49"), ("xe", "0x64a0")])
def test_intel_igpu(tree, driver, device):
    tree.pci_gpu("0000:00:02.0", "0x8086", device, driver, card=0, render=128, connectors=("eDP-1", "DP-1"))
    f = facts_for(tree.root)
    assert f["gpus"][0]["driver"] == driver and f["gpus"][0]["vendor"] == "Intel"
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"]) == ("openvino", "-openvino")
    assert r["ml_quadlet"] == {"Container": {"AddDevice": ["/dev/dri/renderD128"], "GroupAdd": ["992"]}}
    assert r["transcode_backend"] == "quicksync"
    assert r["transcode_quadlet"] == {"Container": {"AddDevice": ["/dev/dri/renderD128"], "GroupAdd": ["992"]}}
    assert r["transcode_rejected"]["vaapi"].startswith("also usable")


def test_simpledrm_card0_and_real_card1(tree):
    tree.platform_gpu("simple-framebuffer.0", "simpledrm", card=0)
    tree.pci_gpu("0000:00:02.0", "0x8086", "0xa7a0", "i915", card=1, render=128)
    f = facts_for(tree.root)
    assert f["skipped"] == [{"node": "card0", "driver": "simpledrm", "reason": "firmware framebuffer, not a GPU"}]
    (g,) = f["gpus"]
    assert g["card"] == "/dev/dri/card1" and g["render_node"] == "/dev/dri/renderD128"
    assert f["recommendation"]["ml_backend"] == "openvino"


def test_virtio_gpu_vm(tree):
    tree.pci_gpu("0000:00:01.0", "0x1af4", "0x1050", "virtio-pci", card=0, render=128, connectors=("Virtual-1",))
    f = facts_for(tree.root)
    (g,) = f["gpus"]
    assert g["virtual"] is True and g["vendor"] == "virtio"
    r = f["recommendation"]
    assert r["ml_backend"] == "cpu" and r["transcode_backend"] == "none"
    assert r["ignored"] and "virtual GPU, useless for ML and transcoding" in r["ignored"][0]
    assert r["transcode_rejected"]["vaapi"] == "no AMD or Intel GPU with a VAAPI-capable driver found"


def test_raspberry_pi_5(tree):
    tree.platform_gpu("axi:gpu", "v3d", card=0, render=128)
    tree.platform_gpu("axi:display", "vc4", card=1)
    tree.compatible("raspberrypi,5-model-b", "brcm,bcm2712")
    f = facts_for(tree.root, arch="aarch64")
    assert f["architecture"] == "arm64"
    assert [g["vendor"] for g in f["gpus"]] == ["Broadcom", "Broadcom"]
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"], r["ml_quadlet"]) == ("cpu", "", {})
    assert "amd64" in r["ml_rejected"]["cuda"] and "amd64" in r["ml_rejected"]["rocm"]
    assert "not a Rockchip" in r["ml_rejected"]["rknn"]
    assert "/dev/mali0" in r["ml_rejected"]["armnn"]
    assert r["transcode_backend"] == "none"


def build_rk3588(t, rknpu=True):
    t.compatible("radxa,rock-5b", "rockchip,rk3588")
    t.platform_gpu("fb000000.gpu", "panthor", card=0, render=128)
    if rknpu:
        t.module("rknpu")
        t.platform_gpu("fdab0000.npu", "rknpu", card=1, render=129)
        t.write("sys/kernel/debug/rknpu/version", "RKNPU driver: v0.9.8\n")
    for n in ("dev/rga", "dev/mpp_service"):
        t.dev(n, 0o660, "video")
    os.makedirs(t.p("dev/dma_heap"))


def test_rk3588_with_rknpu(tree):
    build_rk3588(tree)
    f = facts_for(tree.root, arch="aarch64")
    rk = f["rockchip"]
    assert rk["soc"] == "rk3588" and rk["rknpu_loaded"] and rk["rknpu_version"] == "0.9.8"
    assert rk["rknpu_nodes"] == ["/dev/dri/renderD129"]
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"]) == ("rknn", "-rknn")
    assert r["ml_quadlet"] == {"Container": {
        "AddDevice": ["/dev/dri/renderD129"],
        "PodmanArgs": ["--security-opt=systempaths=unconfined", "--security-opt=apparmor=unconfined"]}}
    assert "mainline panfrost/panthor" in r["ml_rejected"]["armnn"]
    assert r["transcode_backend"] == "rkmpp"
    assert r["transcode_quadlet"]["Container"]["AddDevice"] == ["/dev/rga", "/dev/dri", "/dev/dma_heap", "/dev/mpp_service"]


def test_rk3588_without_bsp_npu_driver(tree):
    build_rk3588(tree, rknpu=False)
    os.makedirs(tree.p("dev/accel"))
    tree.dev("dev/accel/accel0", 0o660, "render")
    r = facts_for(tree.root, arch="aarch64")["recommendation"]
    assert r["ml_backend"] == "cpu"
    assert "no BSP rknpu driver" in r["ml_rejected"]["rknn"] and "rocket" in r["ml_rejected"]["rknn"]


def test_no_gpu_at_all(tree):
    f = facts_for(tree.root)
    assert f["gpus"] == [] and f["skipped"] == []
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"], r["ml_quadlet"], r["ml_quadlet_lines"]) == ("cpu", "", {}, [])
    assert (r["transcode_backend"], r["transcode_quadlet"], r["transcode_device"]) == ("none", {}, None)
    assert set(r["ml_rejected"]) == {"cuda", "rocm", "openvino", "rknn", "armnn"}
    assert set(r["transcode_rejected"]) == {"nvenc", "quicksync", "vaapi", "rkmpp"}


def test_arm64_host_with_amd_card(tree):
    tree.pci_gpu("0000:0d:00.0", "0x1002", "0x73ff", "amdgpu", card=0, render=128)
    tree.module("amdgpu")
    tree.kfd([CPU_NODE, gpu_node(100302, 4098, 0x73ff, 128)])
    f = facts_for(tree.root, arch="aarch64")
    assert f["gpus"][0]["gfx_target"] == "gfx1032" and f["gpus"][0]["hsa_override_suggested"] == "10.3.0"
    r = f["recommendation"]
    assert r["ml_backend"] == "cpu"
    assert r["ml_rejected"]["rocm"] == "rocm is for amd64 hosts only (Immich builds it there); this host is arm64"
    assert r["transcode_backend"] == "vaapi"


def test_rootless_uses_keep_groups_and_checks_membership(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root")
    member = Tree(tmp_path / "member", users={"immich": ["render", "video"]})
    build_amd_gfx1030(member)
    r = facts_for(member.root, user="immich", rootless=True)["recommendation"]
    assert r["ml_backend"] == "rocm"
    assert r["ml_quadlet"]["Container"]["GroupAdd"] == ["keep-groups"]
    outsider = Tree(tmp_path / "outsider", users={})
    build_amd_gfx1030(outsider)
    f = facts_for(outsider.root, user="immich", rootless=True)
    assert f["user"]["render"] is False and f["user"]["groups"] == ["immich"]
    r = f["recommendation"]
    assert r["ml_backend"] == "cpu"
    assert "usermod -aG render immich" in r["ml_rejected"]["rocm"]
    assert "loginctl terminate-user immich" in r["ml_rejected"]["rocm"]


def test_odd_trees_never_raise(tree, tmp_path):
    build_amd_gfx1030(tree)
    # a broken device link, a garbage properties file, a FIFO where a file belongs (reading it
    # would block), garbage CDI, directories where files belong, a broken compatible link
    os.symlink("../../devices/nowhere/drm/card7", tree.p("sys/class/drm/card7"))
    tree.write("sys/class/kfd/kfd/topology/nodes/5/properties", "gfx_target_version banana\nnonsense\n")
    os.remove(tree.p("sys/devices/pci0000:00/0000:03:00.0/mem_info_vram_total"))
    os.mkfifo(tree.p("sys/devices/pci0000:00/0000:03:00.0/mem_info_vram_total"))
    tree.write("etc/cdi/broken.json", "{not json")
    tree.write("etc/cdi/empty.yaml", "")
    os.makedirs(tree.p("proc/driver/nvidia/version"))
    os.makedirs(tree.p("sys/class/drm/renderD200"))
    os.makedirs(tree.p("proc/device-tree"))
    os.symlink("/nonexistent/compatible", tree.p("proc/device-tree/compatible"))
    f = facts_for(tree.root)
    assert f["recommendation"]["ml_backend"] == "rocm"
    text = "\n".join(f["unreadable"])
    assert "mem_info_vram_total: not a regular file" in text
    assert "proc/driver/nvidia/version: not a regular file" in text
    assert "sys/class/drm/card7/device: broken symbolic link" in text
    assert "proc/device-tree/compatible: broken symbolic link" in text
    f = facts_for(tmp_path / "does-not-exist")
    assert f["gpus"] == [] and f["recommendation"]["ml_backend"] == "cpu"


def test_module_through_ansible(run_module, tree):
    build_hybrid(tree, cdi=False)
    rc, res, out = run_module("gpu_facts", {"root": tree.root, "user": "immich", "architecture": "x86_64"}, check=True)
    assert rc == 0, out
    assert res["changed"] is False
    g = res["ansible_facts"]["gpu"]
    assert g["user"]["video"] and g["user"]["render"]
    r = g["recommendation"]
    assert r["ml_backend"] == "rocm" and "nvidia-ctk" in r["ml_rejected"]["cuda"]
    assert r["ml_environment_suggested"] == {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    rc, res, out = run_module("gpu_facts", {"root": tree.root, "prefer": ["metal"]})
    assert rc != 0 and "value of prefer must be one or more of" in res["msg"]


def build_mali_kbase(t):
    t.compatible("khadas,vim3", "amlogic,g12b")
    t.dev("dev/mali0", 0o660, "video")
    t.write("usr/lib/libmali.so", "")
    t.write("lib/firmware/mali_csffw.bin", "")


def test_arm_mali_kbase_board(tree):
    build_mali_kbase(tree)
    f = facts_for(tree.root, arch="aarch64")
    assert f["arm"]["mali_kbase"] and f["arm"]["libmali"] == "/usr/lib/libmali.so"
    r = f["recommendation"]
    assert (r["ml_backend"], r["ml_image_suffix"]) == ("armnn", "-armnn")
    assert r["ml_quadlet"] == {"Container": {
        "AddDevice": ["/dev/mali0"], "GroupAdd": ["44"],
        "Volume": ["/usr/lib/libmali.so:/usr/lib/libmali.so:ro",
                   "/lib/firmware/mali_csffw.bin:/lib/firmware/mali_csffw.bin:ro"]}}
    assert "not a Rockchip" in r["ml_rejected"]["rknn"]


@pytest.mark.parametrize("build, arch, kw, backend", [
    (build_amd_gfx1030, "x86_64", {}, "rocm"),
    (build_amd_gfx1030, "x86_64", {"user": "immich", "rootless": True}, "rocm"),
    (build_hybrid, "x86_64", {}, "cuda"),
    (build_rk3588, "aarch64", {}, "rknn"),
    (build_mali_kbase, "aarch64", {}, "armnn"),
])
def test_recommended_quadlet_keys_pass_the_real_generator(tree, generator, tmp_path, build, arch, kw, backend):
    from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q
    build(tree)
    r = facts_for(tree.root, arch=arch, **kw)["recommendation"]
    assert r["ml_backend"] == backend
    sections = {"Container": dict({"Image": "ghcr.io/immich-app/immich-machine-learning:v3.1.0" + r["ml_image_suffix"]},
                                  **r["ml_quadlet"]["Container"])}
    server = {"Container": dict({"Image": "ghcr.io/immich-app/immich-server:v3.1.0"},
                                **r["transcode_quadlet"].get("Container", {}))}
    changes = {"immich-machine-learning.container": q.render_unit("container", sections).encode(),
               "immich-server.container": q.render_unit("container", server).encode()}
    val = q.validate(generator, str(tmp_path / "none"), changes, set(changes), kw.get("rootless", False))
    assert val["errors"] == {}, val
    for line in r["ml_quadlet_lines"]:
        assert line.split("=", 1)[1] in val["output"], line
