"""The ROCm choice from a fixture GPU tree reaches the ML unit and passes quadlet validation."""

UNIT = "/etc/containers/systemd/immich-machine-learning.container"


def test_ml_unit_has_the_rocm_image_devices_and_numeric_groups(host):
    text = host.file(UNIT).content_string
    assert "Image=ghcr.io/immich-app/immich-machine-learning:v3.1.0-rocm\n" in text
    assert "AddDevice=/dev/kfd\n" in text and "AddDevice=/dev/dri/renderD128\n" in text
    assert "GroupAdd=992\n" in text, "numeric render GID, not a name the image may not know"
    assert "MemoryMax=4G\n" in text, "the GPU memory limit"
    assert "Description=Immich machine learning (rocm)" in text


def test_quadlet_generator_accepts_it(host):
    dry = host.run("/usr/libexec/podman/quadlet -dryrun 2>&1")
    assert dry.rc == 0, dry.stdout
    assert "--device /dev/kfd" in dry.stdout and "--group-add 992" in dry.stdout
    exec_start = host.run("systemctl cat immich-machine-learning.service")
    assert exec_start.rc == 0 and "immich-machine-learning:v3.1.0-rocm" in exec_start.stdout


def test_ml_is_not_started(host):
    assert host.run("systemctl is-active immich-machine-learning.service").stdout.strip() == "inactive"
    assert host.run("podman image exists ghcr.io/immich-app/immich-machine-learning:v3.1.0-rocm").rc == 1
