"""Day-2 playbooks on a VM resumed from the default scenario's converged image, in order: backup,
destroy, restore and compare; the timer's retention; maintenance and diagnose; uninstall keeping the
data; purge with nothing left behind."""

import json
import re

import pytest
from vmhelpers import (DUMPS, EXPORTERS, LIBRARY, PROBE_SQL, SERVICES, SNAPSHOTS, STORAGE, USER, assert_all_active_and_healthy,
                       checksums, playbook, podman, psql, record, systemctl, user_data, wait_converged_host)


@pytest.fixture(scope="module", autouse=True)
def converged(host):
    """The host these tests start from: converged from bare and verified by the default scenario."""
    record(host.backend.get_hostname(), "resume_to_all_healthy_seconds", wait_converged_host(host))


@pytest.fixture(scope="module")
def before(host):
    return user_data(host)


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
