"""Wrong inputs to site.yml are rejected by argument specs or preflight before any change.

Each case runs site.yml against this machine (local connection) in check mode, as a second
safety net, and expects the run to stop in the validation pre_tasks (or the argument-spec check
of a role) with a message naming the problem, having changed nothing.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

CASES = [
    ("version tag", {"immich_version": "latest"}, "immich_version is match"),
    ("rootless not a bool", {"immich_rootless": "maybe"}, "immich_rootless"),
    ("root as service user", {"immich_user": "root"}, "immich_user != 'root'"),
    ("relative storage", {"immich_storage_root": "relative/path"}, "immich_storage_root is match"),
    ("subnet without prefix", {"immich_app_subnet": "10.89.5.0"}, "immich_app_subnet is match"),
    ("same directory twice", {"immich_redis_path": "/mnt/btrfs-pool/subvol7-containers/immich/postgres"}, "unique"),
    ("nocow policy", {"immich_nocow_on_unsupported": "ignore"}, "immich_nocow_on_unsupported"),
    ("negative free space", {"immich_min_free_gib": -1}, r"immich_min_free_gib \| int >= 0"),
    ("no time for the health gate", {"immich_update_health_timeout": 0}, r"immich_update_health_timeout \| int > 0"),
    ("startup check never runs", {"immich_health_startup_interval": "0s"}, "immich_health_startup_interval is match"),
    ("startup interval in words", {"immich_health_startup_interval": "five seconds"}, "immich_health_startup_interval is match"),
    ("rollback point in /var", {"immich_update_rollback_dir": "/var"}, "immich_update_rollback_dir is match"),
    ("short password", {"immich_db_password": "short"}, "16 or more letters and digits"),
    ("Valkey password with symbols", {"immich_redis_password": "pass word!pass word!"}, "immich_redis_password must be 16"),
    ("one secret for two passwords", {"immich_redis_password_secret": "immich-db-password"},
     "immich_redis_password_secret != immich_db_password_secret"),
    ("host address with a space", {"immich_host_address": "10.0.0.1 10.0.0.2"}, "immich_host_address is match"),
    ("relative archive", {"immich_image_archives": ["images.tar"]}, "immich_image_archives"),
    ("short image name", {"immich_database_image": "postgres:14"}, "immich_database_image is match"),
    ("memory with a space", {"immich_database_memory_max": "1 GB"}, "immich_database_memory_max is match"),
    ("retries not a number", {"immich_database_health_retries": "three"}, "immich_database_health_retries"),
    ("broken digest", {"immich_redis_image": "docker.io/valkey/valkey:9@sha256:abc"}, "immich_redis_image is match"),
    ("unknown ML backend", {"immich_ml_backend": "metal"}, "immich_ml_backend"),
    ("negative GPU memory", {"immich_ml_memory_max_gpu": "-4G"}, "immich_ml_memory_max_gpu is match"),
    ("port out of range", {"immich_server_publish": "99999"}, r"a port \(1-65535\)"),
    ("secret in the environment", {"immich_server_env": {"DB_PASSWORD": "hunter2hunter2"}}, "PASSWORD|SECRET"),
    ("ML URL scheme", {"immich_server_ml_url": "ftp://ml:3003"}, "immich_server_ml_url is match"),
    ("Traefik without a host", {"immich_server_traefik": True}, "immich_server_traefik_host is match"),
    ("rate limit burst zero", {"immich_server_traefik_ratelimit_burst": 0}, "immich_server_traefik_ratelimit_burst >= 1"),
    ("unknown telemetry group", {"immich_server_telemetry_include": "api,disk"}, "immich_server_telemetry_include is match"),
    ("trusted proxy not an address", {"immich_server_trusted_proxies": ["proxy.lan"]}, "immich_server_trusted_proxies"),
    ("exporter image unqualified", {"immich_monitoring_postgres_exporter_image": "postgres-exporter"},
     "immich_monitoring_postgres_exporter_image is match"),
    ("exporter published on a name", {"immich_monitoring_redis_exporter_publish": "lan:9121"}, "immich_monitoring_redis_exporter_publish"),
    ("memory alert ratio above 1", {"immich_monitoring_memory_ratio": 1.5}, "immich_monitoring_memory_ratio"),
    ("alert duration in systemd syntax", {"immich_monitoring_pool_for": "15min"}, "immich_monitoring_pool_for"),
    ("backup dumps inside the library", {"immich_backup_dump_dir": "/mnt/btrfs-pool/subvol7-containers/immich/library/dumps"},
     "immich_library_path"),
    ("no dump kept", {"immich_backup_keep_dumps": 0}, "immich_backup_keep_dumps >= 1"),
    ("forced backend not present here", {"immich_ml_backend": "cuda"}, "cannot work on this host"),
]


LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
LAYOUTS = [
    ("two servers", {"immich_database": ["a"], "immich_redis": ["a"], "immich_server": ["a", "b"], "immich_ml": ["a"]},
     {}, "immich_server has 2 hosts"),
    ("no ML host", {"immich_database": ["a"], "immich_redis": ["a"], "immich_server": ["a"], "immich_ml": []},
     {}, "no host in immich_ml"),
    ("a host with nothing to run", {"immich_database": ["a"], "immich_redis": ["a"], "immich_server": ["a"],
                                    "immich_ml": ["a"], "immich": ["b"]}, {}, "host b is in none of"),
    ("remote ML on a loopback address", {"immich_database": ["a"], "immich_redis": ["a"], "immich_server": ["a"],
                                         "immich_ml": ["b"]},
     {"b": {"immich_host_address": "127.0.0.2"}}, "a loopback address: set immich_host_address"),
]


@pytest.mark.parametrize("label, groups, hostvars, message", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_an_inventory_immich_cannot_run_is_refused_before_any_change(tmp_path, label, groups, hostvars, message):
    """Several hosts: the layout is checked from the groups before anything changes on any host."""
    inv = tmp_path / "hosts.yml"
    children = {g: {"hosts": {h: {} for h in hosts}} for g, hosts in groups.items() if g != "immich"}
    extra = {"hosts": {h: {} for h in groups.get("immich", [])}}
    inv.write_text(json.dumps({"all": {
        "children": {"immich": dict(extra, children=children)},
        "hosts": {h: dict(LOCAL, **hostvars.get(h, {})) for h in ("a", "b")}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", str(inv), "--check", os.path.join(ROOT, "site.yml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(message, out), out[-3000:]
    assert "TASK [homelab.immich.host : Service user" not in out.split("fatal:")[0]


@pytest.fixture(scope="module")
def inventory(tmp_path_factory):
    d = tmp_path_factory.mktemp("inv")
    inv = d / "hosts.yml"
    inv.write_text(json.dumps({"all": {
        "children": {"immich": {"children": {g: {"hosts": {"local": {}}} for g in
                                             ("immich_database", "immich_redis", "immich_server", "immich_ml")}}},
        "hosts": {"local": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    return str(inv)


@pytest.mark.parametrize("label, extra, message", CASES, ids=[c[0] for c in CASES])
def test_bad_variable_is_rejected_before_any_change(inventory, tmp_path, label, extra, message):
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps(extra))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", inventory, "--check",
                           "-e", "@%s" % varfile, os.path.join(ROOT, "site.yml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(message, out), out[-3000:]
    recap = out.split("PLAY RECAP")[-1]
    assert re.search(r"changed=0\b", recap), recap
    before_failure = out.split("fatal:")[0]
    # stopped in the checks: no role task that changes the host ran
    for task in ("Service user", "Library", "Write and validate every quadlet unit"):
        assert "TASK [homelab.immich.host : %s" % task not in before_failure, task
