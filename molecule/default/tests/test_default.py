"""Verify a converged site.yml on the VM (testinfra over molecule's inventory).

Rootless, CPU ML, the offline test images (server and ML are contract stand-ins).
"""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest
from vmhelpers import (EPHEMERAL, EXPORTERS, PROJECT, PUBLISHED, ROOTLESS, SERVICES, STORAGE, USER, container_state, podman,
                       promtool, record, systemctl, vm_state, wait_until)

UNIT_DIR = "/home/%s/.config/containers/systemd" % USER if ROOTLESS else "/etc/containers/systemd"


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
    if not PUBLISHED:
        # qemu forwards the port, but nothing in the VM listens on 2283: the server answers only
        # on its networks (Traefik's), here asked from the application network
        with pytest.raises(OSError):
            urllib.request.urlopen("http://127.0.0.1:%d/api/server/ping" % port, timeout=20).read()
        out = in_app_network(host, "http://immich-server:2283/api/server/standin-checks")
        assert out.rc == 0, out.stderr
        checks = json.loads(out.stdout)
    else:
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
    assert labels["traefik.http.routers.immich.middlewares"] == "immich-ratelimit@docker"
    assert labels["traefik.http.middlewares.immich-ratelimit.ratelimit.average"] == "100"
    assert labels["traefik.http.middlewares.immich-ratelimit.ratelimit.burst"] == "400"
    assert labels["traefik.http.middlewares.immich-ratelimit.ratelimit.period"] == "1s"


def test_services_wrote_their_data(host):
    assert host.file("%s/ml-cache/standin/started" % STORAGE).exists
    assert host.file("%s/library/.immich-standin-check" % STORAGE).exists


def processes(host, name, column):
    """(user, COLUMN) of every process named NAME, the column unabridged."""
    rows = [line.split(None, 1) for line in host.run("ps -ww -o user=,%s= -C %s" % (column, name)).stdout.splitlines()]
    return [row for row in rows if len(row) == 2]


def container_conmons(host):
    """The owner of each container's conmon: a health check or `podman exec` running at that
    moment has a conmon of its own (-e --exec-process-spec FILE), which is not a container."""
    return [user for user, args in processes(host, "conmon", "args") if "--exec-process-spec" not in args]


def test_containers_run_as_the_service_user(host):
    if not ROOTLESS:
        conmon = container_conmons(host)
        assert len(conmon) == len(SERVICES) + len(EXPORTERS) and set(conmon) == {"root"}, conmon
        assert host.run("ls /home/%s/.config/containers/systemd 2>/dev/null" % USER).stdout.strip() == ""
        return
    conmon = container_conmons(host)
    assert len(conmon) == len(SERVICES) + len(EXPORTERS) and set(conmon) == {USER}, conmon
    subuid = host.run("grep ^%s: /etc/subuid" % USER).stdout.strip().split(":")
    low, count = int(subuid[1]), int(subuid[2])
    uids = [int(u) for u in host.run("ps -o uid= -C postgres").stdout.split()]
    assert uids and all(low <= u < low + count for u in uids), uids
    # Only the processes inside the containers count: a python3 of the host's own
    # (unattended-upgrades, the test's Ansible connection) runs as root by design.
    # Quadlet puts each container's processes in a libpod cgroup below its unit.
    for name in ("python3", "valkey-server"):
        rows = processes(host, name, "cgroup")
        owners = [user for user, cgroup in rows if "libpod" in cgroup]
        assert owners and set(owners) == {USER}, (name, rows)


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


def test_server_environment_for_telemetry_and_proxies(host):
    env = json.loads(podman(host, "inspect immich_server --format '{{json .Config.Env}}'").stdout)
    assert "IMMICH_TELEMETRY_INCLUDE=all" in env
    assert "IMMICH_TRUSTED_PROXIES=10.89.2.0/24" in env


def in_app_network(host, url):
    """GET url from inside the ML container (a member of the application network only)."""
    code = "import urllib.request as u; print(u.urlopen('%s', timeout=10).read().decode())" % url
    return podman(host, 'exec immich_machine_learning python3 -c "%s"' % code)


def check_metrics(text):
    proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("url, expect", [
    ("http://immich-server:8081/metrics", "immich_standin_up 1"),
    ("http://immich-server:8082/metrics", "immich_standin_up 1"),
] + [("http://%s:%d/metrics" % (c.replace("_", "-"), port), metric) for c, port, metric in EXPORTERS.values()])
def test_metrics_on_the_application_network(host, url, expect):
    out = in_app_network(host, url)
    assert out.rc == 0, out.stderr
    assert re.search("^%s$" % re.escape(expect), out.stdout, re.M), out.stdout[-2000:]
    if "immich-server" in url:  # exporters' own output has lint warnings promtool reports (upstream's)
        rc, text = check_metrics(out.stdout)
        assert rc == 0, text


@pytest.mark.parametrize("service", sorted(EXPORTERS))
def test_exporters_run_with_nothing(host, service):
    container = EXPORTERS[service][0]
    assert systemctl(host, "is-active %s" % service).stdout.strip() == "active"
    info = json.loads(podman(host, "inspect %s --format '{{json .}}'" % container).stdout)
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["EffectiveCaps"] in (None, [])
    assert info["HostConfig"]["PortBindings"] in (None, {})
    assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    assert set(info["NetworkSettings"]["Networks"]) == {"systemd-photos"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_containers_are_hardened(host, service):
    container = SERVICES[service][0]
    info = json.loads(podman(host, "inspect %s --format '{{json .}}'" % container).stdout)
    assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    assert "CAP_NET_RAW" not in (info["EffectiveCaps"] or [])
    assert info["HostConfig"]["ReadonlyRootfs"] is (service == "immich-redis.service")
    published = list(info["HostConfig"]["PortBindings"] or {})
    assert published == (["2283/tcp"] if service == "immich-server.service" and PUBLISHED else [])


def test_private_files_are_private(host):
    home = host.user(USER).home if ROOTLESS else "/root"
    secrets = host.run("find %s/.local/share/containers/storage/secrets /var/lib/containers/storage/secrets "
                       "-type f ! -name '*.lock' 2>/dev/null" % home).stdout.split()
    assert any(p.endswith("/secretsdata.json") for p in secrets), secrets
    for path in secrets:
        assert host.file(path).mode & 0o077 == 0, path
    assert host.file("%s/postgres" % STORAGE).mode & 0o077 == 0


def test_collector_writes_the_state_for_node_exporter(host):
    assert host.run("systemctl is-enabled immich-metrics.timer").stdout.strip() == "enabled"
    assert host.run("systemctl is-active immich-metrics.timer").stdout.strip() == "active"
    run = host.run("systemctl start immich-metrics.service")
    assert run.rc == 0, run.stderr + host.run("journalctl -u immich-metrics.service -n 20 --no-pager").stdout
    prom = host.file("/var/lib/prometheus/node-exporter/immich.prom")
    assert prom.mode == 0o644
    text = prom.content_string
    rc, lint = check_metrics(text)
    assert rc == 0, lint
    for service, (container, memory_max) in SERVICES.items():
        name = service[:-len(".service")]
        assert 'immich_container_healthy{service="%s"} 1' % name in text, text
        assert 'immich_unit_active{service="%s"} 1' % name in text
        assert 'immich_unit_memory_max_bytes{service="%s"} %s' % (name, memory_max) in text
        assert re.search(r'^immich_unit_memory_bytes\{service="%s"\} [1-9][0-9]*$' % name, text, re.M)
    for service in EXPORTERS:
        assert 'immich_container_running{service="%s"} 1' % service[:-len(".service")] in text
    assert "immich_metrics_errors 0" in text
    assert re.search(r'^immich_pool_size_bytes\{path="%s"\} [1-9]' % STORAGE, text, re.M)


def test_prometheus_files_pass_promtool(host, tmp_path):
    for name in ("immich-alerts.yml", "immich-scrape.yml"):
        f = host.file("/etc/prometheus/immich/%s" % name)
        assert f.mode == 0o644 and f.user == "root"
        (tmp_path / name).write_text(f.content_string)
    (tmp_path / "prometheus.yml").write_text(
        "rule_files: [immich-alerts.yml]\nscrape_config_files: [immich-scrape.yml]\n")
    proc = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=str(tmp_path),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "immich-postgres-exporter:9187" in (tmp_path / "immich-scrape.yml").read_text()


SCAN = """
import errno, json, select, socket, sys, time
def scan(addr, ports, batch=500, timeout=1.0):
    # non-blocking connects, a batch at a time, each waited for at most TIMEOUT (a dropped SYN is
    # closed); one thread: 64 threads of blocking connects cost the TCG guest ~40 s for 65535 ports
    found = []
    for i in range(0, len(ports), batch):
        waiting, poller = {}, select.poll()
        for port in ports[i:i + batch]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex((addr, port)) in (0, errno.EINPROGRESS):
                waiting[s.fileno()] = (s, port)
                poller.register(s, select.POLLOUT)
            else:
                s.close()
        sockets = list(waiting.values())
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for fd, _event in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                s, port = waiting.pop(fd)
                poller.unregister(fd)
                try:
                    # a port in the ephemeral range can connect to itself (TCP simultaneous open): not a listener
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and s.getsockname() != s.getpeername():
                        found.append(port)
                except OSError:
                    pass
        for s, _port in sockets:
            s.close()
    return sorted(found)
addr, ports = sys.argv[1], range(1, 65536) if sys.argv[2] == 'all' else [int(p) for p in sys.argv[2].split(',')]
print(json.dumps(scan(addr, list(ports))))
"""


def test_exposure_only_the_server_port_on_the_external_address(host):
    """Every TCP port of the VM's external address, probed from the VM: only SSH (the test
    harness's) and the server's published port (none with the reverse proxy only) answer; the
    internal ports not even on loopback."""
    addr = host.run("ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1").stdout.strip()
    assert addr
    host.run("cat > /tmp/scan.py <<'EOF'\n%s\nEOF" % SCAN)
    open_ports = json.loads(host.run("python3 /tmp/scan.py %s all" % addr).stdout)
    record(host.backend.get_hostname(), "exposure_external_tcp_ports_open", open_ports)
    assert open_ports == ([22, 2283] if PUBLISHED else [22]), open_ports
    internal = "5432,6379,3003,8081,8082,9187,9121"
    assert json.loads(host.run("python3 /tmp/scan.py 127.0.0.1 %s" % internal).stdout) == []
    listening = host.run("ss -Htln").stdout
    for port in internal.split(","):
        assert not re.search(r":%s\s" % port, listening), listening


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_health_check_also_runs_as_the_startup_check(host, service):
    """Notify=healthy reports a start done when the startup check first passes (every 5 s), not at
    the first regular check one interval (30 s) later; the same command judges both."""
    config = json.loads(podman(host, "inspect %s --format '{{json .Config}}'" % SERVICES[service][0]).stdout)
    startup = config.get("StartupHealthCheck") or {}
    assert startup.get("Test") == config["Healthcheck"]["Test"], config
    assert (startup.get("StartInterval") or startup.get("Interval")) == 5 * 10 ** 9, startup
    if service == "immich-database.service":
        # the entrypoint's init-time server listens on the unix socket only: a check that passed
        # through it handed a first start to the regular check while the real server was not up
        assert "-h 127.0.0.1" in " ".join(config["Healthcheck"]["Test"]), config["Healthcheck"]


def test_a_stopped_server_is_inactive_not_failed(host):
    """The server exits 143 on SIGTERM (upstream's node under tini; the stand-in does the same): the
    unit counts that as a clean stop (SuccessExitStatus), so a stop or restart never leaves it failed."""
    assert systemctl(host, "stop immich-server.service").rc == 0
    try:
        state = systemctl(host, "show -p ActiveState -p Result -p ExecMainStatus immich-server.service").stdout.split()
        assert sorted(state) == ["ActiveState=inactive", "ExecMainStatus=143", "Result=success"], state
    finally:
        assert systemctl(host, "start immich-server.service").rc == 0
    assert systemctl(host, "is-active immich-server.service").stdout.strip() == "active"


def test_a_restart_returns_healthy_on_a_new_container(host):
    """systemctl restart returns once the new container's startup check passed (Notify=healthy)."""
    _status, before = container_state(host, "immich_redis")
    t0 = time.time()
    assert systemctl(host, "restart immich-redis.service").rc == 0
    record(host.backend.get_hostname(), "redis_restart_seconds", round(time.time() - t0, 1))
    status, after = container_state(host, "immich_redis")
    assert status == "healthy" and after not in (before, None), (status, before, after)
    assert wait_until(lambda: podman(host, "exec immich_server curl -fsS http://127.0.0.1:2283/api/server/ping").rc == 0,
                      60, 2) is not None
