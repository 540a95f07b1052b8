"""Verify a converged site.yml on the VM (testinfra over molecule's inventory).

Rootless, CPU ML, the offline test images (server and ML are contract stand-ins).
"""

import json
import os
import re
import subprocess
import urllib.request

import pytest

EPHEMERAL = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "")
PROJECT = os.environ.get("MOLECULE_PROJECT_DIRECTORY", "")
ROOTLESS = os.environ.get("IMMICH_TEST_ROOTLESS", "true") == "true"
USER = "immich"
UNIT_DIR = "/home/%s/.config/containers/systemd" % USER if ROOTLESS else "/etc/containers/systemd"
STORAGE = "/mnt/btrfs-pool/subvol7-containers/immich"
SERVICES = {
    # service: (container, MemoryMax)
    "immich-database.service": ("immich_postgres", 1 << 30),
    "immich-redis.service": ("immich_redis", 512 << 20),
    "immich-machine-learning.service": ("immich_machine_learning", 2 << 30),
    "immich-server.service": ("immich_server", 2 << 30),
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


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_is_active_and_healthy(host, service):
    assert systemctl(host, "is-active %s" % service).stdout.strip() == "active"
    container = SERVICES[service][0]
    health = podman(host, "inspect %s --format '{{.State.Health.Status}}'" % container)
    assert health.stdout.strip() == "healthy", health.stdout + health.stderr
    assert podman(host, "healthcheck run %s" % container).rc == 0


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_memory_limit_is_in_the_running_unit(host, service):
    value = systemctl(host, "show -p MemoryMax --value %s" % service).stdout.strip()
    assert value == str(SERVICES[service][1])


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_unit_is_generated_from_our_quadlet_file(host, service):
    source = systemctl(host, "show -p SourcePath --value %s" % service).stdout.strip()
    assert source == "%s/%s.container" % (UNIT_DIR, service[:-len(".service")])
    unit = host.file(source)
    assert unit.user == (USER if ROOTLESS else "root") and unit.content_string.startswith("# Managed by Ansible")


def test_server_ping_through_the_published_port_from_the_host(host):
    state = vm_state(host.backend.get_hostname())
    port = [h for h, g in state["forwards"] if g == 2283][0]
    with urllib.request.urlopen("http://127.0.0.1:%d/api/server/ping" % port, timeout=20) as r:
        assert r.read() == b'{"res":"pong"}'
    with urllib.request.urlopen("http://127.0.0.1:%d/api/server/standin-checks" % port, timeout=20) as r:
        checks = json.loads(r.read())
    assert all(c["ok"] for c in checks.values()), checks
    assert "PostgreSQL 17" in checks["database"]["detail"]


def test_networks(host):
    for name, subnet in (("systemd-photos", "10.89.5.0/24"), ("systemd-reverse_proxy", "10.89.2.0/24")):
        net = podman(host, "network inspect %s --format '{{range .Subnets}}{{.Subnet}}{{end}}'" % name)
        assert net.stdout.strip() == subnet
    nets = podman(host, "inspect immich_server --format '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}'")
    assert set(nets.stdout.split()) == {"systemd-photos", "systemd-reverse_proxy"}
    nets = podman(host, "inspect immich_postgres --format '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}'")
    assert set(nets.stdout.split()) == {"systemd-photos"}


@pytest.mark.parametrize("directory, minimum", [("postgres", 100), ("redis", 0), ("ml-cache", 1)])
def test_data_directories_are_effectively_nocow(host, directory, minimum):
    path = "%s/%s" % (STORAGE, directory)
    assert "C" in host.run("lsattr -d %s" % path).stdout.split()[0]
    listing = host.run("lsattr -R %s" % path).stdout.splitlines()
    entries = [line for line in listing if re.match(r"^[-a-zA-Z]{10,}\s", line)]
    assert len(entries) >= minimum
    cow = [line for line in entries if "C" not in line.split()[0]]
    assert cow == [], cow[:5]


def test_traefik_labels_when_enabled(host):
    labels = json.loads(podman(host, "inspect immich_server --format '{{json .Config.Labels}}'").stdout)
    if ROOTLESS:  # the default scenario leaves Traefik off
        assert not any(k.startswith("traefik.") for k in labels)
        return
    assert labels["traefik.enable"] == "true"
    assert labels["traefik.http.routers.immich.rule"] == "Host(`photos.example.test`)"
    assert labels["traefik.http.routers.immich.tls.certresolver"] == "letsencrypt"
    assert labels["traefik.http.services.immich.loadbalancer.server.port"] == "2283"
    assert labels["traefik.docker.network"] == "systemd-reverse_proxy"


def test_services_wrote_their_data(host):
    assert host.file("%s/ml-cache/standin/started" % STORAGE).exists
    assert host.file("%s/library/.immich-standin-check" % STORAGE).exists


def test_containers_run_as_the_service_user(host):
    if not ROOTLESS:
        conmon = host.run("ps -o user= -C conmon").stdout.split()
        assert len(conmon) == 4 and set(conmon) == {"root"}
        assert host.run("ls /home/%s/.config/containers/systemd 2>/dev/null" % USER).stdout.strip() == ""
        return
    conmon = host.run("ps -o user= -C conmon").stdout.split()
    assert len(conmon) == 4 and set(conmon) == {USER}
    subuid = host.run("grep ^%s: /etc/subuid" % USER).stdout.strip().split(":")
    low, count = int(subuid[1]), int(subuid[2])
    uids = [int(u) for u in host.run("ps -o uid= -C postgres").stdout.split()]
    assert uids and all(low <= u < low + count for u in uids), uids
    for name in ("python3", "valkey-server"):
        for u in host.run("ps -o user= -C %s" % name).stdout.split():
            assert u == USER, (name, u)


def test_database_has_vector_and_checksums(host):
    sql = "SELECT extname FROM pg_extension WHERE extname = 'vector'; SHOW data_checksums"
    out = podman(host, "exec immich_postgres psql -U postgres -d immich -tAc \"%s\"" % sql)
    assert out.stdout.split() == ["vector", "on"], out.stdout + out.stderr


def test_password_is_only_in_the_secret(host):
    secret = podman(host, "secret inspect --showsecret --format '{{.SecretData}}' immich-db-password").stdout.strip()
    assert re.match(r"^[A-Za-z0-9]{32}$", secret)
    units = host.run("find %s -maxdepth 2 -type f" % UNIT_DIR).stdout.split()
    assert len(units) >= 6
    for unit in units:
        assert secret not in host.file(unit).content_string
    for container in ("immich_postgres", "immich_server"):
        assert secret not in podman(host, "inspect %s" % container).stdout
    assert secret not in host.run("journalctl --no-pager -q").stdout
    assert secret not in host.run("ps -eo args").stdout


def test_check_mode_converge_reports_no_changes():
    """A --check run of the converge playbook against the converged VM changes nothing."""
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(EPHEMERAL, "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(PROJECT, ".collections"),
               ANSIBLE_ROLES_PATH=os.path.join(PROJECT, "roles"))
    inventory = os.environ.get("MOLECULE_INVENTORY_FILE")
    if not inventory:
        pytest.fail("MOLECULE_INVENTORY_FILE is not set: run through molecule")
    proc = subprocess.run(["ansible-playbook", "-i", inventory, "--check", os.path.join(PROJECT, "site.yml")],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    recap = proc.stdout.split("PLAY RECAP")[-1]
    assert re.findall(r"changed=(\d+)", recap) == ["0"], proc.stdout[-3000:]
