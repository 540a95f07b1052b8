"""The monitoring role's Prometheus files, rendered by the role, checked by the real promtool.

promtool is Debian 13's (tests/tools/fetch-promtool.sh). The alerts are proven with
`promtool test rules`: synthetic series on a virtual clock, and the ALERTS series each rule
writes, firing just after its threshold and duration and not before.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


ALL_ROLES = ["database", "redis", "ml", "server"]


def play(directory, *args, **variables):
    """Run the role's prometheus tasks on this machine (local connection) into directory/out, then the
    host role's `files` entry point that writes the file sets they added; the host runs every service
    unless __immich_roles says otherwise (as the host role works it out from the groups). Returns the
    play's output."""
    variables = dict({"__immich_roles": ALL_ROLES, "__immich_redis_auth": False}, **variables)
    path = directory / "play.yml"
    path.write_text(json.dumps([{
        "hosts": "localhost", "gather_facts": False,
        "vars": dict(variables, immich_monitoring_prometheus_dir=str(directory / "out")),
        "tasks": [{"ansible.builtin.include_role": {"name": "homelab.immich.monitoring", "tasks_from": "prometheus"}},
                  {"ansible.builtin.include_role": {"name": "homelab.immich.host", "tasks_from": "files"}}]}]))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", "ansible_python_interpreter=%s" % sys.executable, str(path)] + list(args),
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


def render(directory, **variables):
    """The files the role writes, with a prometheus.yml that reads them, in directory/out."""
    play(directory, **variables)
    out = directory / "out"
    (out / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "15s", "evaluation_interval": "1m"},
        "rule_files": ["immich-alerts.yml"], "scrape_config_files": ["immich-scrape.yml"]}))
    return out


def test_check_mode_writes_nothing_and_a_second_run_changes_nothing(tmp_path):
    """One read decides (immich_state), one module call writes: check mode on a host without the
    directory reports the change and makes nothing; the real run makes the directory and both files; the next run changes nothing;
    a file edited by hand and a wrong directory mode are mended, the untouched file is not rewritten."""
    out = tmp_path / "out"
    checked = play(tmp_path, "--check", "--diff")
    assert "changed=1" in checked and not out.exists(), checked[-2000:]
    assert "+groups:" in checked  # the diff shows the rules that would be written
    first = play(tmp_path)
    assert "changed=1" in first, first[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["immich-alerts.yml", "immich-scrape.yml"]
    assert oct(out.stat().st_mode & 0o777) == "0o755" and oct((out / "immich-scrape.yml").stat().st_mode & 0o777) == "0o644"
    rules = (out / "immich-alerts.yml").read_text()
    scrape_inode = (out / "immich-scrape.yml").stat().st_ino
    again = play(tmp_path)
    assert "changed=0" in again and "Install the files that differ and run their units" in again, again[-2000:]
    assert "skipping: [localhost] => (item=" in again, again[-2000:]  # the set is right: no system_files call
    (out / "immich-alerts.yml").write_text("edited by hand\n")
    out.chmod(0o700)
    mended = play(tmp_path, "-v")
    assert "changed=1" in mended, mended[-2000:]
    written = mended.split("changed_files:", 1)[1].split("unit_actions:", 1)[0]
    assert str(out / "immich-alerts.yml") in written and "immich-scrape.yml" not in written, mended[-3000:]
    assert str(out) in mended.split("changed_directories:", 1)[1].split("changed_files:", 1)[0], mended[-3000:]
    assert oct(out.stat().st_mode & 0o777) == "0o755" and (out / "immich-alerts.yml").read_text() == rules
    assert (out / "immich-scrape.yml").stat().st_ino == scrape_inode  # written atomically only when it differs


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return render(tmp_path_factory.mktemp("full"), immich_monitoring_postgres_exporter=True,
                  immich_monitoring_redis_exporter=True, immich_monitoring_node_exporter_target="node.lan:9100")


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    return render(tmp_path_factory.mktemp("minimal"))


def promtool_run(promtool, args, cwd, stdin=None):
    proc = subprocess.run([promtool] + args, cwd=str(cwd), input=stdin, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", ["full", "minimal"])
def test_config_with_rules_and_scrape_configs_passes_promtool(promtool, variant, request):
    out = request.getfixturevalue(variant)
    rc, text = promtool_run(promtool, ["check", "config", "prometheus.yml"], out)
    assert rc == 0, text
    assert "SUCCESS: 7 rules found" in text
    rc, text = promtool_run(promtool, ["check", "rules", "--lint=all", "--lint-fatal", "immich-alerts.yml"], out)
    assert rc == 0, text


def jobs(out):
    with open(out / "immich-scrape.yml") as f:
        return {j["job_name"]: j["static_configs"][0]["targets"] for j in yaml.safe_load(f)["scrape_configs"]}


def test_scrape_jobs_follow_the_enabled_exporters(full, minimal):
    assert jobs(full) == {"immich_api": ["immich-server:8081"], "immich_microservices": ["immich-server:8082"],
                          "immich_postgres": ["immich-postgres-exporter:9187"],
                          "immich_redis": ["immich-redis-exporter:9121"], "immich_node": ["node.lan:9100"]}
    assert jobs(minimal) == {"immich_api": ["immich-server:8081"], "immich_microservices": ["immich-server:8082"]}


@pytest.mark.parametrize("roles, expected", [
    (["ml"], {}),
    (["redis", "ml"], {"immich_redis": ["immich-redis-exporter:9121"]}),
    (["database", "server"], {"immich_api": ["immich-server:8081"], "immich_microservices": ["immich-server:8082"],
                              "immich_postgres": ["immich-postgres-exporter:9187"]}),
], ids=["ml-host", "ml-and-valkey-host", "app-host"])
def test_on_several_hosts_each_scrapes_what_runs_there(promtool, tmp_path, roles, expected):
    out = render(tmp_path, __immich_roles=roles, immich_monitoring_postgres_exporter=True,
                 immich_monitoring_redis_exporter=True)
    assert jobs(out) == expected
    rc, text = promtool_run(promtool, ["check", "config", "prometheus.yml"], out)
    assert rc == 0, text


def firing(alert, labels):
    inner = ",".join('%s="%s"' % kv for kv in sorted(dict(labels, alertname=alert, alertstate="firing").items()))
    return "ALERTS{%s}" % inner


def case(series, alert, labels, fires_at, quiet_at):
    """series fire `alert` with `labels` at fires_at (minutes) and not yet at quiet_at."""
    query = 'ALERTS{alertname="%s",alertstate="firing"}' % alert
    expect = [] if fires_at is None else [{"labels": firing(alert, labels), "value": 1}]
    tests = [{"expr": query, "eval_time": "%dm" % quiet_at, "exp_samples": []}]
    if fires_at is not None:
        tests.append({"expr": query, "eval_time": "%dm" % fires_at, "exp_samples": expect})
    return {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
            "promql_expr_test": tests}


I = 'instance="h1"'
ML = 'service="immich-machine-learning"'
CASES = {
    "ML unhealthy for 15m": case([("immich_container_healthy{%s,%s}" % (ML, I), "0x40")],
                                 "ImmichMachineLearningUnhealthy",
                                 {"instance": "h1", "service": "immich-machine-learning", "severity": "warning"}, 16, 14),
    "ML healthy: quiet": case([("immich_container_healthy{%s,%s}" % (ML, I), "1x40")],
                              "ImmichMachineLearningUnhealthy", {}, None, 30),
    "another service unhealthy: not the ML alert": case(
        [('immich_container_healthy{service="immich-server",%s}' % I, "0x40")], "ImmichMachineLearningUnhealthy", {}, None, 30),
    "ML recovered after 10m: quiet": case([("immich_container_healthy{%s,%s}" % (ML, I), "0x10 1x30")],
                                          "ImmichMachineLearningUnhealthy", {}, None, 20),
    "unit inactive 5m": case([('immich_unit_active{service="immich-server",%s}' % I, "0x20")], "ImmichServiceDown",
                             {"instance": "h1", "service": "immich-server", "severity": "critical"}, 6, 4),
    "postgres unreachable 2m": case([('pg_up{job="immich_postgres",%s}' % I, "1 1 0x20")],
                                    "ImmichPostgresConnectionFailures",
                                    {"instance": "h1", "job": "immich_postgres", "severity": "critical"}, 5, 3),
    "postgres exporter down": case([('up{job="immich_postgres",%s}' % I, "0x20")], "ImmichPostgresConnectionFailures",
                                   {"instance": "h1", "job": "immich_postgres", "severity": "critical"}, 3, 1),
    "postgres reachable: quiet": case([('pg_up{job="immich_postgres",%s}' % I, "1x20"),
                                       ('up{job="immich_postgres",%s}' % I, "1x20")],
                                      "ImmichPostgresConnectionFailures", {}, None, 15),
    "connections 95 of 100": case([('pg_stat_activity_count{job="immich_postgres",%s,state="active"}' % I, "60x20"),
                                   ('pg_stat_activity_count{job="immich_postgres",%s,state="idle"}' % I, "35x20"),
                                   ('pg_settings_max_connections{job="immich_postgres",%s}' % I, "100x20")],
                                  "ImmichPostgresConnectionsExhausted", {"instance": "h1", "severity": "warning"}, 6, 4),
    "memory 85% of max": case([('immich_unit_memory_bytes{service="immich-server",%s}' % I, "850x30"),
                               ('immich_unit_memory_max_bytes{service="immich-server",%s}' % I, "1000x30")],
                              "ImmichMemoryNearLimit",
                              {"instance": "h1", "service": "immich-server", "severity": "warning"}, 11, 9),
    "memory 75% of max: quiet": case([('immich_unit_memory_bytes{service="immich-server",%s}' % I, "750x30"),
                                      ('immich_unit_memory_max_bytes{service="immich-server",%s}' % I, "1000x30")],
                                     "ImmichMemoryNearLimit", {}, None, 25),
    "unlimited memory: no ratio": case([('immich_unit_memory_bytes{service="immich-server",%s}' % I, "850x30")],
                                       "ImmichMemoryNearLimit", {}, None, 25),
    "pool 90% full": case([('immich_pool_avail_bytes{path="/pool",%s}' % I, "10x30"),
                           ('immich_pool_size_bytes{path="/pool",%s}' % I, "100x30")],
                          "ImmichPoolNearlyFull", {"instance": "h1", "path": "/pool", "severity": "warning"}, 16, 14),
    "pool 80% full: quiet": case([('immich_pool_avail_bytes{path="/pool",%s}' % I, "20x30"),
                                  ('immich_pool_size_bytes{path="/pool",%s}' % I, "100x30")],
                                 "ImmichPoolNearlyFull", {}, None, 25),
    "collector errors": case([('immich_metrics_errors{%s}' % I, "1x30"),
                              ('immich_metrics_last_run_timestamp_seconds{%s}' % I, "0+60x30")],
                             "ImmichMetricsStale", {"instance": "h1", "severity": "warning"}, 11, 9),
    "collector stopped writing": case([('immich_metrics_errors{%s}' % I, "0x40"),
                                       ('immich_metrics_last_run_timestamp_seconds{%s}' % I, "0x40")],
                                      "ImmichMetricsStale", {"instance": "h1", "severity": "warning"}, 22, 19),
    "collector current: quiet": case([('immich_metrics_errors{%s}' % I, "0x30"),
                                      ('immich_metrics_last_run_timestamp_seconds{%s}' % I, "0+60x30")],
                                     "ImmichMetricsStale", {}, None, 25),
}


def run_cases(promtool, out, cases):
    test_file = out / "tests.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": ["immich-alerts.yml"], "evaluation_interval": "1m",
                                         "tests": list(cases.values())}))
    return promtool_run(promtool, ["test", "rules", "tests.yml"], out)


def test_each_alert_fires_after_its_threshold_and_duration(promtool, full):
    rc, text = run_cases(promtool, full, CASES)
    assert rc == 0, text
    assert "SUCCESS" in text


def test_an_alert_that_should_fire_but_does_not_is_caught(promtool, full):
    """The harness is not vacuous: expecting the memory alert for 75 % use fails."""
    wrong = case([('immich_unit_memory_bytes{service="immich-server",%s}' % I, "750x30"),
                  ('immich_unit_memory_max_bytes{service="immich-server",%s}' % I, "1000x30")],
                 "ImmichMemoryNearLimit", {"instance": "h1", "service": "immich-server", "severity": "warning"}, 11, 9)
    rc, text = run_cases(promtool, full, {"wrong": wrong})
    assert rc != 0 and "FAILED" in text, text


def test_annotations_are_prometheus_templates_with_the_thresholds(promtool, full):
    test = {"interval": "1m",
            "input_series": [{"series": "immich_container_healthy{%s,%s}" % (ML, I), "values": "0x20"}],
            "alert_rule_test": [{"eval_time": "16m", "alertname": "ImmichMachineLearningUnhealthy", "exp_alerts": [{
                "exp_labels": {"instance": "h1", "service": "immich-machine-learning", "severity": "warning"},
                "exp_annotations": {
                    "summary": "Immich machine learning has not been healthy for 15m",
                    "description": "The health check of immich-machine-learning on h1 has failed for 15m (its unit "
                                   "restarts it on failure: a restart loop). Smart search and face detection are not "
                                   "running. Look at journalctl --user -u immich-machine-learning as the service user."},
            }]}]}
    (full / "annotations.yml").write_text(yaml.safe_dump({"rule_files": ["immich-alerts.yml"], "tests": [test]}))
    rc, text = promtool_run(promtool, ["test", "rules", "annotations.yml"], full)
    assert rc == 0, text


def test_thresholds_are_variables(promtool, tmp_path):
    out = render(tmp_path, immich_monitoring_ml_unhealthy_for="5m", immich_monitoring_memory_ratio=0.5,
                 immich_monitoring_memory_for="2m", immich_monitoring_pool_ratio=0.7)
    cases = {
        "ML after 5m": case([("immich_container_healthy{%s,%s}" % (ML, I), "0x20")], "ImmichMachineLearningUnhealthy",
                            {"instance": "h1", "service": "immich-machine-learning", "severity": "warning"}, 6, 4),
        "memory 60%": case([('immich_unit_memory_bytes{service="immich-server",%s}' % I, "600x20"),
                            ('immich_unit_memory_max_bytes{service="immich-server",%s}' % I, "1000x20")],
                           "ImmichMemoryNearLimit",
                           {"instance": "h1", "service": "immich-server", "severity": "warning"}, 3, 1),
        "pool 75%": case([('immich_pool_avail_bytes{path="/pool",%s}' % I, "25x30"),
                          ('immich_pool_size_bytes{path="/pool",%s}' % I, "100x30")],
                         "ImmichPoolNearlyFull", {"instance": "h1", "path": "/pool", "severity": "warning"}, 16, 14),
    }
    rc, text = run_cases(promtool, out, cases)
    assert rc == 0, text


def test_collector_output_is_valid_exposition_format(promtool, tmp_path, load_script):
    m = load_script("immich_metrics", os.path.join(ROOT, "roles", "monitoring", "files", "immich-metrics.py"))
    services = [("immich-server.service", "immich_server"), ("immich-database.service", "immich_postgres")]
    show = ("Id=immich-server.service\nActiveState=active\nNRestarts=1\nMemoryCurrent=1000\nMemoryMax=2000\n\n"
            "Id=immich-database.service\nActiveState=active\nNRestarts=0\nMemoryCurrent=10\nMemoryMax=infinity\n")
    ps = "immich_server\trunning\tUp 1 minute (healthy)\nimmich_postgres\trunning\tUp 2 minutes (unhealthy)\n"
    text = m.render(services, m.parse_show(show), m.parse_ps(ps), (str(tmp_path), 100, 50), 0, 1700000000.25)
    rc, out = promtool_run(promtool, ["check", "metrics"], tmp_path, stdin=text)
    assert rc == 0, out + text
