"""Verify a two-host site.yml run: the app host (PostgreSQL, server) and the GPU host (ML, Valkey)
on a private link the test created (10.89.7.1 and 10.89.7.2, nothing else on it).

What a user relies on: each host runs only its services; the server reaches ML and Valkey on the
other host; those are published on the GPU host's private address only, reachable only from the
app host (checked from a second source address on the same link, from the GPU host itself and
through the GPU host's other network); Valkey wants its password and the password is in no unit
file or world-readable file.
"""

import json
import os
import re
import subprocess
import urllib.request

import pytest
import testinfra

from vmhelpers import EPHEMERAL, PROJECT, USER, podman, systemctl, vm_state, wait_until

APP, GPU = "10.89.7.1", "10.89.7.2"
STRANGER = "10.89.7.3"  # a second address on the app host's side of the link: "another host"
QUADLETS = "/home/%s/.config/containers/systemd" % USER
RUNS = {
    "immich-app": {"immich-database", "immich-server"},
    "immich-gpu": {"immich-machine-learning", "immich-redis", "immich-redis-exporter"},
}
ALL_UNITS = set().union(*RUNS.values()) | {"immich-postgres-exporter"}


def inventory():
    path = os.environ.get("MOLECULE_INVENTORY_FILE")
    if not path:
        pytest.fail("MOLECULE_INVENTORY_FILE is not set: run through molecule")
    return path


@pytest.fixture(scope="module")
def app():
    return testinfra.get_host("ansible://immich-app", ansible_inventory=inventory())


@pytest.fixture(scope="module")
def gpu():
    return testinfra.get_host("ansible://immich-gpu", ansible_inventory=inventory())


def hosts(app, gpu):
    return {"immich-app": app, "immich-gpu": gpu}


def standin_checks():
    port = [h for h, g in vm_state("immich-app")["forwards"] if g == 2283][0]
    with urllib.request.urlopen("http://127.0.0.1:%d/api/server/standin-checks" % port, timeout=30) as r:
        return json.loads(r.read())


def http_from(host, url, source=None):
    """curl on host (from a given source address): (rc, body); rc 28 = timed out (dropped)."""
    out = host.run("curl -sS -m 5 %s %s" % ("--interface %s" % source if source else "", url))
    return out.rc, out.stdout.strip()


def test_each_host_runs_its_services_and_no_others(app, gpu):
    for name, host in hosts(app, gpu).items():
        units = {os.path.basename(u)[:-len(".container")]
                 for u in host.run("ls %s/*.container" % QUADLETS).stdout.split()}
        assert units == RUNS[name], name
        for unit in RUNS[name]:
            assert systemctl(host, "is-active %s.service" % unit).stdout.strip() == "active", (name, unit)
        for unit in ALL_UNITS - RUNS[name]:
            assert systemctl(host, "is-active %s.service" % unit).stdout.strip() != "active", (name, unit)


def test_storage_and_networks_only_where_used(app, gpu):
    storage = "/mnt/btrfs-pool/subvol7-containers/immich"
    assert app.file(storage + "/library").is_directory and app.file(storage + "/postgres").is_directory
    assert not app.file(storage + "/redis").exists and not app.file(storage + "/ml-cache").exists
    assert gpu.file(storage + "/redis").is_directory and gpu.file(storage + "/ml-cache").is_directory
    assert not gpu.file(storage + "/library").exists and not gpu.file(storage + "/postgres").exists
    assert gpu.run("lsattr -d %s/redis" % storage).stdout.split()[0].count("C") == 1  # NOCOW there too
    assert podman(app, "network exists systemd-reverse_proxy").rc == 0
    assert podman(gpu, "network exists systemd-reverse_proxy").rc != 0
    # the backup: dump and library snapshot where the database and the server run; nothing on the GPU host
    assert app.service("immich-backup.timer").is_enabled
    assert not gpu.file("/etc/systemd/system/immich-backup.timer").exists


def test_the_server_reaches_remote_ml_and_valkey():
    checks = standin_checks()
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["machine_learning"]["detail"] == "http://%s:3003" % GPU
    assert checks["redis"]["detail"] == "SET/GET ok"


def test_the_server_is_wired_to_the_gpu_host(app):
    env = json.loads(podman(app, "inspect immich_server --format '{{json .Config.Env}}'").stdout)
    assert "IMMICH_MACHINE_LEARNING_URL=http://%s:3003" % GPU in env
    assert "REDIS_HOSTNAME=%s" % GPU in env and "REDIS_PORT=6379" in env
    assert "DB_HOSTNAME=immich-database" in env  # the database is local: over the application network
    unit = app.file(QUADLETS + "/immich-server.container").content_string
    # ordered only after what runs on this host
    assert "Wants=immich-database.service\n" in unit and "immich-machine-learning" not in unit.split("[Container]")[0]
    assert "Secret=immich-redis-password,type=env,target=REDIS_PASSWORD" in unit


def test_services_are_published_on_the_private_address_only(app, gpu):
    listening = gpu.run("ss -ltnH").stdout
    for port in (3003, 6379):
        assert re.search(r"\s%s:%d\s" % (re.escape(GPU), port), listening), listening
        assert not re.search(r"\s(0\.0\.0\.0|\*|\[::\]):%d\s" % port, listening), listening
    assert not re.search(r":5432\s", app.run("ss -ltnH").stdout)  # the database stays on its network


def test_ml_answers_the_app_host_only(app, gpu):
    assert http_from(app, "http://%s:3003/ping" % GPU, source=APP) == (0, "pong")
    app.run("ip addr add %s/24 dev ens5" % STRANGER)
    try:
        rc = http_from(app, "http://%s:3003/ping" % GPU, source=STRANGER)[0]
        assert rc == 28, "another address on the link reached ML (curl rc %d)" % rc
    finally:
        app.run("ip addr del %s/24 dev ens5" % STRANGER)
    rc = http_from(gpu, "http://%s:3003/ping" % GPU)[0]
    assert rc == 28, "the GPU host itself reached ML on the published address (curl rc %d)" % rc
    rules = gpu.run("nft list table inet homelab_immich").stdout
    drops = [int(n) for n in re.findall(r'tcp dport 3003 .*counter packets (\d+) .*drop', rules)]
    assert drops and drops[0] > 0, rules


def test_ml_is_not_reachable_through_the_other_network():
    """The GPU host's user-network side (qemu forwards 127.0.0.1:PORT to its 3003): nothing answers."""
    port = [h for h, g in vm_state("immich-gpu")["forwards"] if g == 3003][0]
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:%d/ping" % port, timeout=10).read()


def test_valkey_wants_its_password(app, gpu):
    probe = ("import socket; s = socket.create_connection(('%s', 6379), timeout=5); "
             "s.sendall(b'PING\\r\\n'); print(s.recv(100).decode().strip())" % GPU)
    out = app.run("python3 -c \"%s\"" % probe)
    assert out.stdout.startswith("-NOAUTH"), out.stdout + out.stderr
    assert gpu.run("ss -ltnH").stdout.count(":6379") == 1
    # the exporter authenticates too (asked from the ML container, on the same application network)
    code = "import urllib.request as u; print(u.urlopen('http://immich-redis-exporter:9121/metrics', timeout=10).read().decode())"
    metrics = podman(gpu, 'exec immich_machine_learning python3 -c "%s"' % code).stdout
    assert re.search(r"^redis_up 1", metrics, re.M), metrics[-500:]


def test_passwords_are_only_in_secrets(app, gpu):
    password = podman(gpu, "secret inspect --showsecret --format '{{.SecretData}}' immich-redis-password").stdout.strip()
    assert re.match(r"^[A-Za-z0-9]{32}$", password)
    # the same password on the server's host (one generated for the deployment)
    assert podman(app, "secret inspect --showsecret --format '{{.SecretData}}' immich-redis-password").stdout.strip() \
        == password
    acl = podman(gpu, "secret inspect --showsecret --format '{{.SecretData}}' immich-redis-password-acl").stdout
    assert password not in acl and re.match(r"^user default on #[0-9a-f]{64} ", acl), acl
    assert podman(gpu, "secret exists immich-db-password").rc != 0  # no database there, no database password
    for host in (app, gpu):
        found = host.run("grep -rlF %s %s /etc /var/log /tmp 2>/dev/null" % (password, QUADLETS)).stdout
        assert found == "", found
        assert password not in podman(host, "inspect --all 2>/dev/null || podman inspect $(podman ps -q)").stdout


def test_firewall_comes_back_after_nftables_restarts(gpu):
    """nftables.service starts with 'flush ruleset': the rules are loaded again after it (PartOf=)."""
    assert gpu.run("systemctl restart nftables.service").rc == 0
    # the firewall unit's restart is a second job of the same transaction: systemctl does not wait for it
    assert wait_until(lambda: gpu.run("nft list table inet homelab_immich").rc == 0, 20) is not None
    assert gpu.service("homelab-immich-firewall.service").is_enabled
    assert http_from(gpu, "http://%s:3003/ping" % GPU)[0] == 28


def test_check_mode_reports_no_changes():
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(EPHEMERAL, "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(PROJECT, ".collections"),
               ANSIBLE_ROLES_PATH=os.path.join(PROJECT, "roles"))
    proc = subprocess.run(["ansible-playbook", "-i", inventory(), "--check", os.path.join(PROJECT, "site.yml")],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    recap = proc.stdout.split("PLAY RECAP")[-1]
    assert re.findall(r"changed=(\d+)", recap) == ["0", "0"], recap
