"""Helpers shared by the verify tests (testinfra over molecule's inventory): molecule's verifier puts
this directory on PYTHONPATH (.config/molecule/config.yml)."""

import json
import os
import subprocess
import time

import pytest

PROJECT = os.environ.get("MOLECULE_PROJECT_DIRECTORY", "")
EPHEMERAL = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "")
ROOTLESS = os.environ.get("IMMICH_TEST_ROOTLESS", "true") == "true"
# immich_server_publish: "" in the scenario (reverse-proxy network only): no host port at all
PUBLISHED = os.environ.get("IMMICH_TEST_PUBLISHED", "true") == "true"
USER = "immich"
STORAGE = "/mnt/btrfs-pool/subvol7-containers/immich"
LIBRARY = STORAGE + "/library"
DUMPS = "/mnt/btrfs-pool/subvol7-containers/immich-backups"
SNAPSHOTS = "/mnt/btrfs-pool/subvol7-containers/immich-snapshots"
TEST_IMAGES = "localhost/homelab-immich-test/"
QUADLETS = "/home/%s/.config/containers/systemd" % USER
PROBE_SQL = "SELECT count(*) || ' ' || md5(string_agg(v, ',' ORDER BY id)) FROM restore_probe"
SERVICES = {
    # service: (container, MemoryMax)
    "immich-database.service": ("immich_postgres", 1 << 30),
    "immich-redis.service": ("immich_redis", 512 << 20),
    "immich-machine-learning.service": ("immich_machine_learning", 2 << 30),
    "immich-server.service": ("immich_server", 2 << 30),
}
EXPORTERS = {
    # service: (container, port, metric that says it reaches its target)
    "immich-postgres-exporter.service": ("immich_postgres_exporter", 9187, "pg_up 1"),
    "immich-redis-exporter.service": ("immich_redis_exporter", 9121, "redis_up 1"),
}


def systemctl(host, args):
    return host.run(("systemctl --user -M %s@ " % USER if ROOTLESS else "systemctl ") + args)


def podman(host, args):
    if not ROOTLESS:
        return host.run("podman " + args)
    return host.run(
        "cd / && uid=$(id -u %s) && runuser -u %s -- env XDG_RUNTIME_DIR=/run/user/$uid "
        "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus podman %s" % (USER, USER, args))


def vm_state(name):
    with open(os.path.join(PROJECT, "build", "vm", name, "state.json")) as f:
        return json.load(f)


def container_state(host, container):
    """(health status, container id) or (None, None) when there is no such container."""
    return container_states(host, [container])[container]


def container_states(host, containers):
    """{container: (health status, id)} for all of them in one podman call (a poll of every
    container costs the guest one podman start, not one each); (None, None) for a missing one."""
    out = podman(host, "inspect %s --format '{{.Name}} {{.State.Health.Status}} {{.Id}}'" % " ".join(containers))
    found = {}
    for line in out.stdout.splitlines():  # a missing container fails the call, the others are listed
        parts = line.split()
        if len(parts) == 3:
            found[parts[0].lstrip("/")] = (parts[1], parts[2])
    return {c: found.get(c, (None, None)) for c in containers}


def all_healthy(host):
    """Whether every container of SERVICES is healthy (one podman call)."""
    return all(status == "healthy" for status, _cid in container_states(host, [c for c, _m in SERVICES.values()]).values())


def assert_all_active_and_healthy(host):
    """Every service of SERVICES active and its container healthy: two calls, whatever the count."""
    services = sorted(SERVICES)
    states = systemctl(host, "is-active %s" % " ".join(services)).stdout.split()
    assert dict(zip(services, states)) == {s: "active" for s in services}, dict(zip(services, states))
    health = container_states(host, [SERVICES[s][0] for s in services])
    assert all(status == "healthy" for status, _cid in health.values()), health


def wait_until(predicate, timeout, interval=1.0):
    """Seconds until predicate() was true, or None after timeout."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return round(time.time() - t0, 1)
        time.sleep(interval)
    return None


def promtool():
    proc = subprocess.run([os.path.join(PROJECT, "tests/tools/fetch-promtool.sh")],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def record(name, key, value):
    """Keep a figure in build/faults/<instance>.json (scenario.py prints them)."""
    path = os.path.join(PROJECT, "build", "faults", "%s.json" % name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            figures = json.load(f)
    except (OSError, ValueError):
        figures = {}
    figures[key] = value
    with open(path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)


def playbook(name, *extra):
    """ansible-playbook playbooks/NAME against the scenario's inventory: (rc, stdout + stderr)."""
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
    """{path: sha256} of every file in the library but the server's own markers."""
    out = host.run("cd %s && find . -type f ! -name '.immich*' -print0 | sort -z | xargs -0 -r sha256sum" % LIBRARY)
    return dict(reversed(line.split(None, 1)) for line in out.stdout.splitlines())


def user_data(host):
    """Rows in the database and files in the library, as a user would have them: made once on the
    host, then their fingerprint (PROBE_SQL) and checksums, which every later check compares with."""
    psql(host, "CREATE TABLE restore_probe AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g")
    host.run("install -d -o %s -g %s %s/upload/probe" % (USER, USER, LIBRARY))
    for i in range(12):
        host.run("head -c %d /dev/urandom > %s/upload/probe/photo-%02d.jpg" % (4096 * (i + 1), LIBRARY, i))
    host.run("chown -R %s: %s/upload" % (USER, LIBRARY))
    return {"rows": psql(host, PROBE_SQL), "files": checksums(host)}


def wait_converged_host(host, timeout=420):
    """A VM resumed from a converged image (molecule/shared/snapshot.yml) was saved with every service
    running: every service active and healthy within TIMEOUT (a check the saved guest had under way
    ends first), or the module fails. That services start at boot with nobody logged in is the faults
    scenario's reboot test."""
    took = wait_until(lambda: all_healthy(host), timeout, 3)
    assert took is not None, "the converged host's services were not all healthy within %d s of its resume" % timeout
    assert_all_active_and_healthy(host)
    return took
