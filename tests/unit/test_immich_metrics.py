"""The monitoring role's state collector (roles/monitoring/files/immich-metrics.py)."""

import os
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "roles", "monitoring", "files", "immich-metrics.py")


@pytest.fixture(scope="module")
def m(load_script):
    return load_script("immich_metrics", SCRIPT)


SHOW = """Id=immich-database.service
ActiveState=active
NRestarts=2
MemoryCurrent=104857600
MemoryMax=1073741824

Id=immich-machine-learning.service
ActiveState=activating
NRestarts=0
MemoryCurrent=[not set]
MemoryMax=infinity
"""

PS = ("immich_postgres\trunning\tUp 3 minutes (healthy)\n"
      "immich_machine_learning\trunning\tUp 10 seconds (starting)\n"
      "immich_redis\texited\tExited (137) 2 seconds ago\n"
      "immich_postgres_exporter\trunning\tUp 5 minutes\n")

SERVICES = [("immich-database.service", "immich_postgres"),
            ("immich-machine-learning.service", "immich_machine_learning"),
            ("immich-redis.service", "immich_redis"),
            ("immich-postgres-exporter.service", "immich_postgres_exporter")]


def samples(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_parse_show_keys_units_by_id(m):
    units = m.parse_show(SHOW)
    assert set(units) == {"immich-database.service", "immich-machine-learning.service"}
    assert units["immich-database.service"]["NRestarts"] == "2"


def test_parse_ps_health_only_when_running_and_healthy(m):
    assert m.parse_ps(PS) == {"immich_postgres": (True, True), "immich_machine_learning": (True, False),
                              "immich_redis": (False, False), "immich_postgres_exporter": (True, None)}
    assert m.parse_ps("garbage line\n") == {}


@pytest.mark.parametrize("value, expected", [("123", 123), ("infinity", None), ("[not set]", None),
                                             (str((1 << 64) - 1), None), (None, None)])
def test_number(m, value, expected):
    assert m.number(value) == expected


def test_render_every_metric_with_service_labels(m):
    text = m.render(SERVICES, m.parse_show(SHOW), m.parse_ps(PS), ("/pool", 1000, 250), 0, 1700000000.5)
    s = samples(text)
    assert s['immich_unit_active{service="immich-database"}'] == 1
    assert s['immich_unit_active{service="immich-machine-learning"}'] == 0
    assert s['immich_unit_active{service="immich-redis"}'] == 0  # unknown to systemd: not active
    assert s['immich_unit_restarts_total{service="immich-database"}'] == 2
    assert s['immich_unit_memory_bytes{service="immich-database"}'] == 104857600
    assert s['immich_unit_memory_max_bytes{service="immich-database"}'] == 1073741824
    # unset memory and unlimited MemoryMax are left out, never reported as 0
    assert 'immich_unit_memory_bytes{service="immich-machine-learning"}' not in s
    assert 'immich_unit_memory_max_bytes{service="immich-machine-learning"}' not in s
    assert s['immich_container_healthy{service="immich-database"}'] == 1
    assert s['immich_container_healthy{service="immich-machine-learning"}'] == 0
    assert s['immich_container_running{service="immich-redis"}'] == 0
    assert s['immich_container_healthy{service="immich-redis"}'] == 0
    # running without a health check: running, and no health reported at all
    assert s['immich_container_running{service="immich-postgres-exporter"}'] == 1
    assert 'immich_container_healthy{service="immich-postgres-exporter"}' not in s
    assert s['immich_pool_size_bytes{path="/pool"}'] == 1000
    assert s['immich_pool_avail_bytes{path="/pool"}'] == 250
    assert s["immich_metrics_errors"] == 0
    assert s["immich_metrics_last_run_timestamp_seconds"] == 1700000000.5
    assert "# TYPE immich_unit_restarts_total counter" in text


def test_failed_queries_leave_their_metrics_out_and_count(m):
    text = m.render(SERVICES, None, None, None, 3, 1.0)
    s = samples(text)
    assert not any(k.startswith(("immich_unit_", "immich_container_", "immich_pool_")) for k in s)
    assert s["immich_metrics_errors"] == 3
    assert "# HELP immich_unit_active" not in text


def test_label_values_are_escaped(m):
    text = m.render([('we"ird\\.service', "c")], {}, {}, ('/p"a\nth', 1, 1), 0, 1.0)
    assert 'service="we\\"ird\\\\"' in text
    assert 'path="/p\\"a\\nth"' in text


def test_collect_counts_failures_and_reads_the_filesystem(m, monkeypatch, tmp_path):
    calls = []

    def fake_query(cmd, user=None):
        calls.append((cmd, user))
        return SHOW if cmd[0] == "systemctl" else None

    monkeypatch.setattr(m, "query", fake_query)
    s = samples(m.collect(SERVICES, str(tmp_path)))
    assert s["immich_metrics_errors"] == 1  # podman failed
    assert s['immich_pool_size_bytes{path="%s"}' % tmp_path] > 0
    assert calls[0][0][:2] == ["systemctl", "show"] and calls[0][0][-4:] == [svc for svc, _c in SERVICES]
    assert calls[1][0][:3] == ["podman", "ps", "-a"]
    s = samples(m.collect(SERVICES, str(tmp_path / "missing")))
    assert s["immich_metrics_errors"] == 2


def test_collect_rootless_asks_the_users_manager(m, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(m, "query", lambda cmd, user=None: calls.append((cmd, user)) or "")
    m.collect(SERVICES, str(tmp_path), "root")
    assert calls[0][0][:4] == ["systemctl", "--user", "-M", "root@"] and calls[0][1] is None
    assert calls[1][1].pw_name == "root"


def test_query_failure_returns_none_and_says_why(m, capsys):
    assert m.query(["false"]) is None
    assert "false failed (1)" in capsys.readouterr().err
    assert m.query(["echo", "ok"]) == "ok\n"


def test_write_atomic_replaces_with_a_readable_file(m, tmp_path):
    path = tmp_path / "immich.prom"
    path.write_text("old")
    m.write_atomic(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["immich.prom"]


def test_main_rejects_bad_service_arguments(m, capsys):
    with pytest.raises(SystemExit) as exc:
        m.main(["--output", "-", "--storage-root", "/", "immich-server.service"])
    assert exc.value.code == 2
    assert "expected SERVICE=CONTAINER" in capsys.readouterr().err


def test_main_writes_the_file(m, monkeypatch, tmp_path):
    monkeypatch.setattr(m, "query", lambda cmd, user=None: SHOW if cmd[0] == "systemctl" else PS)
    out = tmp_path / "immich.prom"
    assert m.main(["--output", str(out), "--storage-root", str(tmp_path)] +
                  ["%s=%s" % pair for pair in SERVICES]) == 0
    assert 'immich_container_healthy{service="immich-database"} 1' in out.read_text()


def test_write_atomic_creates_the_textfile_directory(m, tmp_path):
    path = tmp_path / "node-exporter" / "immich.prom"
    m.write_atomic(str(path), "x 1\n")
    assert path.read_text() == "x 1\n"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
