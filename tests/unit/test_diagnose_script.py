"""playbooks/files/immich-diagnose.py: its summary and its problem detection, without a host."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def d(load_script):
    return load_script("immich_diagnose", os.path.join(ROOT, "playbooks", "files", "immich-diagnose.py"))


CFG = {"user": "", "services": {"immich-server.service": "immich_server",
                                "immich-postgres-exporter.service": "immich_postgres_exporter"},
       "optional": ["immich-postgres-exporter.service"], "server_container": "immich_server",
       "ml_container": "immich_machine_learning", "reach": {"database": ["immich-database", 5432]},
       "nocow_dirs": [], "storage_root": "/", "immich_version": "v3.1.0", "log_lines": 3}


def fake_run(answers):
    """answers: {"word word": (rc, out, err)}, the first whose words all appear in the command."""
    def run(cmd, user=None, timeout=30):
        line = " ".join(cmd)
        for key, answer in answers.items():
            if all(word in line for word in key.split()):
                return answer
        return 1, "", "no answer"
    return run


def test_healthy_host_has_no_problems_and_a_readable_summary(d, monkeypatch, capsys):
    show = ("LoadState=loaded\nActiveState=active\nSubState=running\nNRestarts=1\n"
            "MemoryCurrent=536870912\nMemoryMax=2147483648")
    monkeypatch.setattr(d, "run", fake_run({
        "show LoadState": (0, show, ""),
        "inspect immich_server": (0, "running|healthy|img:v3.1.0|abc", ""),
        "journalctl": (0, "line 1\nline 2\nline 3\nline 4", ""),
        "/dev/tcp": (0, "", ""),
        "--version": (0, "podman version 5.4.2", ""),
    }))
    cfg = dict(CFG, services={"immich-server.service": "immich_server"})
    monkeypatch.setattr(d.sys, "argv", ["x", json.dumps(cfg)])
    assert d.main() == 0
    report = json.loads(capsys.readouterr().out)
    s = report["services"]["immich-server.service"]
    assert s["memory_percent"] == 25.0 and s["health"] == "healthy" and s["log"] == ["line 2", "line 3", "line 4"]
    assert report["problems"] == []
    assert report["summary"][0] == "Immich v3.1.0 on %s (podman 5.4.2, kernel %s)" % (os.uname().nodename,
                                                                                      os.uname().release)
    assert "server reaches: database yes" in report["summary"]
    assert "no problems found" in report["summary"]
    assert "-- last log lines of immich-server.service:" in report["summary"]


def test_problems_are_named_and_optional_units_are_not_missed(d, monkeypatch, capsys):
    monkeypatch.setattr(d, "run", fake_run({
        "show immich-server.service": (0, "LoadState=loaded\nActiveState=activating\nSubState=start", ""),
        "show immich-postgres-exporter.service": (0, "LoadState=not-found\nActiveState=inactive", ""),
        "/dev/tcp": (1, "", "connection refused"),
    }))
    monkeypatch.setattr(d.sys, "argv", ["x", json.dumps(CFG)])
    assert d.main() == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == ["immich-server.service: not active (activating/start)",
                                  "server container cannot reach database at immich-database:5432"]
    assert report["reachable_from_server"]["database"] == {"target": "immich-database:5432", "ok": False,
                                                           "error": "connection refused"}
    assert any(line.startswith("problems: ") for line in report["summary"])
