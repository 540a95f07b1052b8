"""Day-2 playbooks on the VM, in order: backup, destroy, restore and compare; the timer's
retention; maintenance and diagnose; a health-gated update, one that never gets healthy (rolled
back), a moving tag that breaks (rolled back); the ML backend to ROCm and back, and a ROCm switch
that cannot start (rolled back); uninstall keeping the data; purge with nothing left behind."""

import json
import os
import re
import subprocess

import pytest
from vmhelpers import (EPHEMERAL, EXPORTERS, PROJECT, SERVICES, STORAGE, USER, assert_all_active_and_healthy, container_state, podman,
                       systemctl)

LIBRARY = STORAGE + "/library"
DUMPS = "/mnt/btrfs-pool/subvol7-containers/immich-backups"
SNAPSHOTS = "/mnt/btrfs-pool/subvol7-containers/immich-snapshots"
TEST_IMAGES = "localhost/homelab-immich-test/"
ROLLBACK = "/var/lib/homelab-immich/rollback"
QUADLETS = "/home/%s/.config/containers/systemd" % USER
PROBE_SQL = "SELECT count(*) || ' ' || md5(string_agg(v, ',' ORDER BY id)) FROM restore_probe"


def playbook(name, *extra):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(EPHEMERAL, "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(PROJECT, ".collections"),
               ANSIBLE_ROLES_PATH=os.path.join(PROJECT, "roles"), ANSIBLE_NOCOLOR="1")
    inventory = os.environ.get("MOLECULE_INVENTORY_FILE")
    if not inventory:
        pytest.fail("MOLECULE_INVENTORY_FILE is not set: run through molecule")
    proc = subprocess.run(["ansible-playbook", "-i", inventory, os.path.join(PROJECT, "playbooks", name)] + list(extra),
                          env=env, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def psql(host, sql):
    out = podman(host, "exec immich_postgres psql -U postgres -d immich -tAc \"%s\"" % sql)
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


def checksums(host):
    out = host.run("cd %s && find . -type f ! -name '.immich*' -print0 | sort -z | xargs -0 -r sha256sum" % LIBRARY)
    return dict(reversed(line.split(None, 1)) for line in out.stdout.splitlines())


@pytest.fixture(scope="module")
def before(host):
    """Rows in the database and files in the library, as a user would have them."""
    psql(host, "CREATE TABLE restore_probe AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g")
    host.run("install -d -o %s -g %s %s/upload/probe" % (USER, USER, LIBRARY))
    for i in range(12):
        host.run("head -c %d /dev/urandom > %s/upload/probe/photo-%02d.jpg" % (4096 * (i + 1), LIBRARY, i))
    host.run("chown -R %s: %s/upload" % (USER, LIBRARY))
    return {"rows": psql(host, PROBE_SQL), "files": checksums(host)}


def test_library_is_its_own_subvolume(host):
    assert host.run("stat -c %%i %s" % LIBRARY).stdout.strip() == "256"


def test_backup_playbook_dumps_and_snapshots(host, before):
    assert before["rows"].startswith("5000 ") and len(before["files"]) == 12
    rc, out = playbook("backup.yml")
    assert rc == 0, out[-3000:]
    dumps = host.run("ls %s" % DUMPS).stdout.split()
    assert len(dumps) == 1 and re.match(r"^immich-db-\d{8}T\d{6}Z\.sql\.gz$", dumps[0]), dumps
    dump = host.file("%s/%s" % (DUMPS, dumps[0]))
    assert dump.mode == 0o600 and dump.user == "root"
    assert host.file(DUMPS).mode == 0o700
    text = host.run("zcat %s/%s" % (DUMPS, dumps[0])).stdout
    assert "DROP TABLE IF EXISTS public.restore_probe" in text and "COPY public.restore_probe" in text
    snaps = host.run("ls -d %s/immich-*Z" % SNAPSHOTS).stdout.split()
    assert len(snaps) == 1
    assert host.run("btrfs property get -ts %s ro" % snaps[0]).stdout.strip() == "ro=true"
    assert host.file(snaps[0] + "/upload/probe/photo-00.jpg").exists
    meta = json.loads(host.file(snaps[0] + ".json").content_string)
    assert meta["library_in_snapshot"] == "." and meta["source"] == LIBRARY


def test_restore_after_destroying_both_gives_back_the_same_rows_and_files(host, before):
    psql(host, "DROP TABLE restore_probe")
    host.run("rm -rf %s/upload/probe" % LIBRARY)
    assert checksums(host) != before["files"]
    rc, out = playbook("restore.yml")
    assert rc == 0, out[-3000:]
    assert psql(host, PROBE_SQL) == before["rows"]
    assert checksums(host) == before["files"]
    assert_all_active_and_healthy(host)
    # what was there before is kept beside it, and the new database directory is NOCOW again
    assert host.run("ls -d %s/postgres.pre-restore-* %s/library.pre-restore-*" % (STORAGE, STORAGE)).rc == 0
    assert "C" in host.run("lsattr -d %s/postgres" % STORAGE).stdout.split()[0]
    assert host.run("stat -c %%i %s" % LIBRARY).stdout.strip() == "256"


def test_restore_refuses_a_missing_dump_and_changes_nothing(host):
    rows = psql(host, "SELECT count(*) FROM restore_probe")
    rc, out = playbook("restore.yml", "-e", "immich_restore_dump=/nonexistent.sql.gz")
    assert rc != 0 and "Nothing to restore from" in out, out[-2000:]
    assert "changed=0" in out.split("PLAY RECAP")[-1]
    assert psql(host, "SELECT count(*) FROM restore_probe") == rows


def test_timer_backups_keep_the_newest(host):
    assert host.run("systemctl is-enabled immich-backup.timer").stdout.strip() == "enabled"
    assert "immich-backup.timer" in host.run("systemctl list-timers --all --no-legend").stdout
    for _run in range(3):
        host.run("sleep 1.1")
        run = host.run("systemctl start immich-backup.service")
        assert run.rc == 0, host.run("journalctl -u immich-backup.service -n 20 --no-pager").stdout
    dumps = host.run("ls %s" % DUMPS).stdout.split()
    snaps = host.run("ls -d %s/immich-*Z" % SNAPSHOTS).stdout.split()
    assert len(dumps) == 2 and len(snaps) == 2, (dumps, snaps)
    assert len(host.run("ls %s/*.json" % SNAPSHOTS).stdout.split()) == 2
    # the pruned snapshots are gone as subvolumes too
    listed = host.run("btrfs subvolume list -o /mnt/btrfs-pool/subvol7-containers").stdout
    assert len(re.findall(r"immich-snapshots/immich-", listed)) == 2, listed


def test_maintenance_vacuums_and_reports(host, tmp_path):
    # 5000 dead row versions, and no autovacuum removing them before the playbook looks
    psql(host, "ALTER TABLE restore_probe SET (autovacuum_enabled = false)")
    psql(host, "UPDATE restore_probe SET v = v")
    host.run("sleep 2")  # table statistics reach pg_stat_user_tables at the end of the transaction, flushed within 1 s
    rc, out = playbook("maintenance.yml", "-e", "immich_maintenance_json=%s" % tmp_path)
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / ("%s.json" % host.backend.get_hostname())).read_text())
    assert report["vacuumed"] is True
    assert report["dead_rows_before"] >= 5000 and report["dead_rows_after"] < report["dead_rows_before"], report
    assert report["tables_with_most_dead_rows_before"][0]["table"] == "restore_probe"
    assert report["nocow_effective"] is True and report["nocow_cow_entries"] == 0 and report["nocow_checked_entries"] > 100
    assert report["snapshots"] == 2 and report["dumps"] == 2
    assert 0 < report["pool_used_percent"] < 85 and report["database_bytes"] > 0


def test_diagnose_answers_for_people_and_as_json(host, tmp_path):
    rc, out = playbook("diagnose.yml", "-e", "immich_diagnose_json=%s" % tmp_path)
    assert rc == 0, out[-3000:]
    assert "no problems found" in out and "server reaches: database yes, redis yes, machine_learning yes" in out
    report = json.loads((tmp_path / ("%s.json" % host.backend.get_hostname())).read_text())
    assert report["problems"] == []
    for service, (container, memory_max) in SERVICES.items():
        s = report["services"][service]
        assert s["state"] == "active/running" and s["health"] == "healthy" and s["container"] == container
        assert s["memory_max"] == memory_max and 0 < s["memory_percent"] < 80
        assert s["log"], service  # the last log lines are there
    for service, (container, _port, _metric) in EXPORTERS.items():
        s = report["services"][service]
        assert s["state"] == "active/running" and s["container"] == container, (service, s)
    assert all(r["ok"] for r in report["reachable_from_server"].values())
    assert report["ml_devices"] == []  # CPU VM
    assert set(report["nocow"].values()) == {True}
    assert report["versions"]["podman"].startswith("5.") and report["versions"]["immich"] == "v3.1.0"


def test_diagnose_names_what_is_wrong(host, tmp_path):
    assert systemctl(host, "stop immich-redis.service").rc == 0
    try:
        rc, out = playbook("diagnose.yml", "-e", "immich_diagnose_json=%s" % tmp_path)
        assert rc == 0, out[-3000:]
        report = json.loads((tmp_path / ("%s.json" % host.backend.get_hostname())).read_text())
        assert "immich-redis.service: not active (inactive/dead)" in report["problems"]
        assert report["reachable_from_server"]["redis"]["ok"] is False
        assert "problems: " in out
    finally:
        assert systemctl(host, "start immich-redis.service").rc == 0


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
    newest_dump = sorted(host.run("ls %s" % DUMPS).stdout.split())[-1]
    rc, out = playbook("update.yml", "-e", "immich_server_image=%simmich-server:standin-next" % TEST_IMAGES)
    assert rc == 0, out[-4000:]
    assert "done, every service healthy within" in out
    assert served_version(host) == "3.2.0"
    assert running_image(host, "immich_server") == image_id(host, TEST_IMAGES + "immich-server:standin-next")
    # a backup first, the previous image kept, the database copy dropped, the data as it was
    assert sorted(host.run("ls %s" % DUMPS).stdout.split())[-1] > newest_dump
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
                       "-e", "immich_update_health_timeout=45")
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
    rc, out = playbook("update.yml", "-e", "immich_server_image=%s" % ref, "-e", "immich_update_health_timeout=45",
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
                       "-e", "immich_update_health_timeout=60")
    assert rc != 0 and "failed and was rolled back" in out and "immich-machine-learning.service" in out, out[-4000:]
    assert ml_unit(host) == cpu_unit
    assert_all_active_and_healthy(host)


def test_ml_backend_refuses_what_gpu_facts_rejects(host):
    rc, out = playbook("ml_backend.yml", "-e", "immich_ml_backend=cuda")
    assert rc != 0 and "immich_ml_backend=cuda cannot work on this host" in out, out[-3000:]
    assert "changed=0" in out.split("PLAY RECAP")[-1]


def leftovers(host):
    found = {}
    found["quadlets"] = host.run("find /home/%s/.config/containers/systemd /etc/containers/systemd -type f 2>/dev/null"
                                 % USER).stdout.split()
    found["system units"] = host.run("ls /etc/systemd/system | grep -i immich || true").stdout.split()
    found["scripts"] = host.run("ls /usr/local/sbin | grep homelab-immich || true").stdout.split()
    found["settings"] = host.run("ls /etc/homelab-immich-backup.json 2>/dev/null || true").stdout.split()
    found["prom"] = host.run("ls /var/lib/prometheus/node-exporter/immich.prom 2>/dev/null || true").stdout.split()
    found["rollback point"] = host.run("ls -d /var/lib/homelab-immich 2>/dev/null || true").stdout.split()
    if host.run("id -u %s" % USER).rc == 0:
        found["user units"] = [u for u in systemctl(host, "list-units --all --plain --no-legend 'immich-*'").stdout.split()
                               if u.startswith("immich")]
        found["containers"] = podman(host, "ps -a --format '{{.Names}}'").stdout.split()
        found["networks"] = [n for n in podman(host, "network ls --format '{{.Name}}'").stdout.split() if n != "podman"]
        found["secrets"] = podman(host, "secret ls --noheading --format '{{.Name}}'").stdout.split()
    found["system units loaded"] = [u for u in host.run("systemctl list-units --all --plain --no-legend 'immich-*'").stdout.split()
                                    if u.startswith("immich")]
    return {k: v for k, v in found.items() if v}


def test_uninstall_keeps_the_data_and_leaves_nothing_else(host, before):
    rc, out = playbook("uninstall.yml")
    assert rc == 0, out[-3000:]
    assert leftovers(host) == {}
    # the data and the backups are still there
    assert psql_offline_files(host)
    assert checksums(host) == before["files"]
    assert len(host.run("ls %s" % DUMPS).stdout.split()) == 2
    rc, out = playbook("uninstall.yml")
    assert rc == 0 and "changed=0" in out.split("PLAY RECAP")[-1], out[-3000:]


def psql_offline_files(host):
    """The database directory still holds a cluster (PG_VERSION)."""
    return host.run("test -f %s/postgres/PG_VERSION" % STORAGE).rc == 0


def test_purge_removes_data_images_and_user(host):
    rc, out = playbook("uninstall.yml", "-e", "immich_uninstall_purge=true")
    assert rc == 0, out[-3000:]
    assert leftovers(host) == {}
    assert not host.file(STORAGE).exists
    assert host.run("id -u %s" % USER).rc != 0
    assert not host.file("/home/%s" % USER).exists
    assert USER not in host.run("cat /etc/subuid").stdout
    assert host.run("pgrep -u %s" % 1000).rc != 0
    # backups stay unless asked
    assert len(host.run("ls %s" % DUMPS).stdout.split()) == 2
    rc, out = playbook("uninstall.yml", "-e", "immich_uninstall_purge=true", "-e", "immich_uninstall_purge_backups=true")
    assert rc == 0, out[-3000:]
    assert not host.file(DUMPS).exists and not host.file(SNAPSHOTS).exists
    assert "immich-snapshots" not in host.run("btrfs subvolume list /mnt/btrfs-pool").stdout
