"""The health-gated changes on a VM resumed from the default scenario's converged image: update.yml
to a healthy version, in check mode, to one that never gets healthy (rolled back), a moving tag that
breaks (rolled back); ml_backend.yml to ROCm and back, a ROCm switch that cannot start (rolled
back), a backend gpu_facts rejects (refused)."""

import json
import os

import pytest
from vmhelpers import (DUMPS, PROBE_SQL, QUADLETS, STORAGE, TEST_IMAGES, assert_all_active_and_healthy, checksums,
                       container_state, playbook, podman, psql, record, user_data, wait_converged_host)

ROLLBACK = "/var/lib/homelab-immich/rollback"


@pytest.fixture(scope="module", autouse=True)
def converged(host):
    """The host these tests start from: converged from bare and verified by the default scenario."""
    record(host.backend.get_hostname(), "resume_to_all_healthy_seconds", wait_converged_host(host))


@pytest.fixture(scope="module")
def before(host):
    return user_data(host)


def served_version(host):
    out = host.run("curl -fsS -m 5 http://127.0.0.1:2283/api/server/version")
    assert out.rc == 0, out.stderr
    v = json.loads(out.stdout)
    return "%d.%d.%d" % (v["major"], v["minor"], v["patch"])


def image_id(host, ref):
    out = podman(host, "image inspect --format '{{.Id}}' %s" % ref)
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


def running_image(host, container):
    return podman(host, "inspect --format '{{.Image}}' %s" % container).stdout.strip()


def test_update_to_a_healthy_version_backs_up_first_and_serves_it(host, before):
    assert served_version(host) == "3.1.0"
    old_id = running_image(host, "immich_server")
    ml_container = container_state(host, "immich_machine_learning")[1]
    # the converged host has no dump yet (its nightly timer has not run): any there now is the update's
    dumps_before = host.run("ls %s 2>/dev/null" % DUMPS).stdout.split()
    rc, out = playbook("update.yml", "-e", "immich_server_image=%simmich-server:standin-next" % TEST_IMAGES)
    assert rc == 0, out[-4000:]
    assert "done, every service healthy within" in out
    assert served_version(host) == "3.2.0"
    assert running_image(host, "immich_server") == image_id(host, TEST_IMAGES + "immich-server:standin-next")
    # a backup first, the previous image kept, the database copy dropped, the data as it was
    dumps = host.run("ls %s" % DUMPS).stdout.split()
    assert len(dumps) == len(dumps_before) + 1 and sorted(dumps)[-1] > max(dumps_before, default=""), (dumps_before, dumps)
    assert image_id(host, "localhost/homelab-immich-rollback/immich-server:previous") == old_id
    assert not host.file(STORAGE + "/postgres.pre-update").exists
    assert host.file(ROLLBACK).mode == 0o700 and host.file(ROLLBACK + "/units.tar").exists
    assert psql(host, PROBE_SQL) == before["rows"] and checksums(host) == before["files"]
    # the ML image and unit did not change: its container was not restarted
    assert container_state(host, "immich_machine_learning")[1] == ml_container
    assert_all_active_and_healthy(host)


def test_update_in_check_mode_says_what_would_restart_and_changes_nothing(host):
    server = container_state(host, "immich_server")[1]
    unit = host.file(QUADLETS + "/immich-server.container").content_string
    rc, out = playbook("update.yml", "--check", "--diff", "-e", "immich_server_image=%simmich-server:standin-broken" % TEST_IMAGES)
    assert rc == 0, out[-4000:]
    assert "would restart: immich-server.service" in out and "+Image=%simmich-server:standin-broken" % TEST_IMAGES in out
    assert container_state(host, "immich_server")[1] == server
    assert host.file(QUADLETS + "/immich-server.container").content_string == unit


def test_update_that_never_gets_healthy_is_rolled_back(host, before):
    next_id = running_image(host, "immich_server")
    rc, out = playbook("update.yml", "-e", "immich_server_image=%simmich-server:standin-broken" % TEST_IMAGES,
                       "-e", "immich_update_health_timeout=30")
    assert rc != 0, out[-4000:]
    assert "failed and was rolled back: not healthy after" in out and "immich-server.service:activating" in out, out[-4000:]
    assert "503" in out  # the health check's own words are in the report
    # the old version serves again, on its image, from its unit; the data is intact
    assert served_version(host) == "3.2.0"
    assert running_image(host, "immich_server") == next_id
    assert "Image=%simmich-server:standin-next" % TEST_IMAGES in host.file(QUADLETS + "/immich-server.container").content_string
    assert_all_active_and_healthy(host)
    assert psql(host, PROBE_SQL) == before["rows"] and checksums(host) == before["files"]
    # the database directory the broken version touched is kept aside; the one in use is NOCOW
    assert host.run("ls -d %s/postgres.failed-update-*" % STORAGE).rc == 0
    assert "C" in host.run("lsattr -d %s/postgres" % STORAGE).stdout.split()[0]


def test_a_moving_tag_that_breaks_is_pointed_back(host, before):
    """The same reference, a new image behind it (a re-pulled tag): the rollback re-tags it."""
    ref = TEST_IMAGES + "immich-server:standin-next"
    good = image_id(host, ref)
    assert podman(host, "tag %simmich-server:standin-broken %s" % (TEST_IMAGES, ref)).rc == 0
    rc, out = playbook("update.yml", "-e", "immich_server_image=%s" % ref, "-e", "immich_update_health_timeout=30",
                       "-e", "immich_update_backup=false")
    assert rc != 0 and "failed and was rolled back" in out, out[-4000:]
    assert image_id(host, ref) == good
    assert running_image(host, "immich_server") == good and served_version(host) == "3.2.0"
    assert_all_active_and_healthy(host)
    assert psql(host, PROBE_SQL) == before["rows"]


@pytest.fixture()
def fake_gpu(host):
    """Device nodes where the fixture tree (/opt/gpu-fixture, installed by prepare) says the GPU's
    are: the null device under the ROCm names, world read/write (so no group is needed rootless)."""
    made = []
    for node in ("/dev/kfd", "/dev/dri/renderD128"):
        assert host.run("chmod 0666 /opt/gpu-fixture%s" % node).rc == 0
        if not host.file(node).exists:
            assert host.run("mkdir -p %s && mknod -m 0666 %s c 1 3" % (os.path.dirname(node), node)).rc == 0
            made.append(node)
    yield made
    for node in made:
        host.run("rm -f %s" % node)


def ml_unit(host):
    return host.file(QUADLETS + "/immich-machine-learning.container").content_string


def test_ml_backend_to_rocm_and_back(host, fake_gpu):
    rc, out = playbook("ml_backend.yml", "-e", "immich_ml_backend=rocm", "-e", "immich_ml_gpu_facts_root=/opt/gpu-fixture")
    assert rc == 0, out[-4000:]
    assert "switch of the ML backend to rocm: done" in out
    assert "AddDevice=/dev/kfd" in ml_unit(host)
    assert podman(host, "exec immich_machine_learning test -c /dev/kfd").rc == 0
    assert_all_active_and_healthy(host)
    rc, out = playbook("ml_backend.yml", "-e", "immich_ml_backend=cpu")
    assert rc == 0, out[-4000:]
    assert "switch of the ML backend to cpu: done" in out
    assert "AddDevice" not in ml_unit(host)
    assert podman(host, "exec immich_machine_learning test -e /dev/kfd").rc != 0
    assert_all_active_and_healthy(host)


def test_ml_backend_that_cannot_start_is_rolled_back(host, fake_gpu):
    # the fixture still says ROCm, but the device node is gone: the container cannot start
    host.run("rm -f /dev/kfd")
    cpu_unit = ml_unit(host)
    rc, out = playbook("ml_backend.yml", "-e", "immich_ml_backend=rocm", "-e", "immich_ml_gpu_facts_root=/opt/gpu-fixture",
                       "-e", "immich_update_health_timeout=30")
    assert rc != 0 and "failed and was rolled back" in out and "immich-machine-learning.service" in out, out[-4000:]
    assert ml_unit(host) == cpu_unit
    assert_all_active_and_healthy(host)


def test_ml_backend_refuses_what_gpu_facts_rejects(host):
    rc, out = playbook("ml_backend.yml", "-e", "immich_ml_backend=cuda")
    assert rc != 0 and "immich_ml_backend=cuda cannot work on this host" in out, out[-3000:]
    assert "changed=0" in out.split("PLAY RECAP")[-1]
