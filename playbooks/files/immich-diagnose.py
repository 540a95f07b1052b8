"""Immich diagnostics, run on the host as root by playbooks/diagnose.yml (ansible.builtin.script).

    immich-diagnose.py '{"user": ..., "services": {...}, ...}'   (settings as one JSON argument)

Answers the runbook's troubleshooting questions in one pass and prints one JSON object: per
service the unit state, restarts, memory against MemoryMax, container health and its last log
lines; whether the server container reaches the database and Redis; the GPU devices visible in
the ML container; NOCOW on the data directories; pool space; versions. Read-only. Python
standard library only.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys


def run(cmd, user=None, timeout=30):
    kw, env = {}, dict(os.environ)
    if user:
        pw = pwd.getpwnam(user)
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}
        env.update(HOME=pw.pw_dir, XDG_RUNTIME_DIR="/run/user/%d" % pw.pw_uid,
                   DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/%d/bus" % pw.pw_uid)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=timeout, check=False, **kw)
        return p.returncode, p.stdout.strip(), p.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 255, "", str(exc)


def number(text):
    return int(text) if text.isdigit() and int(text) < (1 << 63) else None


def main():
    cfg = json.loads(sys.argv[1])
    user = cfg["user"] or None
    systemctl = ["systemctl", "--user", "-M", "%s@" % user] if user else ["systemctl"]
    podman = ["podman"]
    report = {"host": os.uname().nodename, "services": {}, "problems": []}
    for service, container in cfg["services"].items():
        s = {"container": container}
        rc, out, _err = run(systemctl + ["show", "-p", "LoadState,ActiveState,SubState,NRestarts,MemoryCurrent,MemoryMax",
                                         service])
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        s["load"] = props.get("LoadState")
        s["state"] = "%s/%s" % (props.get("ActiveState"), props.get("SubState"))
        s["restarts"] = number(props.get("NRestarts", ""))
        s["memory"] = number(props.get("MemoryCurrent", ""))
        s["memory_max"] = number(props.get("MemoryMax", ""))
        if s["memory"] is not None and s["memory_max"]:
            s["memory_percent"] = round(100.0 * s["memory"] / s["memory_max"], 1)
        rc, out, _err = run(podman + ["inspect", container, "--format",
                                      "{{.State.Status}}|{{.State.Health.Status}}|{{.ImageName}}|{{.Image}}"], user)
        parts = out.split("|") if rc == 0 else []
        s["container_state"], s["health"], s["image"], s["image_id"] = (parts + [None] * 4)[:4] if parts else [None] * 4
        if user:
            rc, out, _err = run(["journalctl", "--no-pager", "-q", "-o", "cat", "-n", str(cfg["log_lines"]),
                                 "_SYSTEMD_USER_UNIT=%s" % service, "_UID=%d" % pwd.getpwnam(user).pw_uid])
        else:
            rc, out, _err = run(["journalctl", "--no-pager", "-q", "-o", "cat", "-n", str(cfg["log_lines"]), "-u", service])
        s["log"] = out.splitlines()[-cfg["log_lines"]:]
        if s["load"] != "loaded":
            s["problem"] = "no such unit (not deployed on this host?)"
        elif not s["state"].startswith("active"):
            s["problem"] = "not active (%s)" % s["state"]
        elif s["health"] not in ("healthy", None, ""):
            s["problem"] = "health check %s" % s["health"]
        elif s.get("memory_percent", 0) > 80:
            s["problem"] = "memory at %s %% of MemoryMax" % s["memory_percent"]
        if s.get("problem") and (s["load"] == "loaded" or service not in cfg.get("optional", [])):
            report["problems"].append("%s: %s" % (service, s["problem"]))
        report["services"][service] = s
    reach = {}
    for name, (host, port) in cfg["reach"].items():
        rc, _out, err = run(podman + ["exec", cfg["server_container"], "bash", "-c",
                                      "exec 3<>/dev/tcp/%s/%d" % (host, port)], user, timeout=15)
        reach[name] = {"target": "%s:%d" % (host, port), "ok": rc == 0, "error": err or None}
        if rc != 0:
            report["problems"].append("server container cannot reach %s at %s:%d" % (name, host, port))
    report["reachable_from_server"] = reach
    rc, out, _err = run(podman + ["exec", cfg["ml_container"], "sh", "-c",
                                  "ls -1 /dev/dri /dev/kfd /dev/nvidia* /dev/accel 2>/dev/null"], user)
    report["ml_devices"] = [line for line in out.splitlines() if line and not line.endswith(":")]
    nocow = {}
    for path in cfg["nocow_dirs"]:
        rc, out, _err = run(["lsattr", "-d", path])
        flags = out.split()[0] if rc == 0 and out else ""
        nocow[path] = "C" in flags if flags else None
        if flags and "C" not in flags:
            report["problems"].append("%s is not NOCOW" % path)
    report["nocow"] = nocow
    try:
        usage = shutil.disk_usage(cfg["storage_root"])
        report["pool"] = {"path": cfg["storage_root"], "size": usage.total, "free": usage.free,
                          "used_percent": round(100.0 * usage.used / usage.total, 1)}
        if report["pool"]["used_percent"] > 85:
            report["problems"].append("pool %s is %s %% full" % (cfg["storage_root"], report["pool"]["used_percent"]))
    except OSError as exc:
        report["pool"] = {"path": cfg["storage_root"], "error": str(exc)}
    rc, out, _err = run(["podman", "--version"])
    report["versions"] = {"podman": out.split()[-1] if out else None, "immich": cfg["immich_version"],
                          "kernel": os.uname().release}
    report["summary"] = summary(report)
    print(json.dumps(report))
    return 0


def summary(report):
    """The report for people, a line each."""
    v = report["versions"]
    lines = ["Immich %s on %s (podman %s, kernel %s)" % (v["immich"], report["host"], v["podman"], v["kernel"])]
    for service, s in report["services"].items():
        if s["load"] != "loaded":
            continue
        memory = ("%s %% of MemoryMax" % s["memory_percent"]) if "memory_percent" in s else "memory ?"
        lines.append("%-34s %-18s health %-9s restarts %-3s %s" % (
            service, s["state"], s["health"] or "-", s["restarts"], memory))
    reach = report["reachable_from_server"]
    lines.append("server reaches: " + ", ".join("%s %s" % (k, "yes" if r["ok"] else "NO") for k, r in reach.items()))
    lines.append("ML devices: " + (" ".join(report["ml_devices"]) or "none (CPU)"))
    lines.append("NOCOW: " + ", ".join("%s %s" % (os.path.basename(p), {True: "yes", False: "NO", None: "?"}[c])
                                       for p, c in report["nocow"].items()))
    pool = report["pool"]
    lines.append("pool %s: %s %% used" % (pool["path"], pool.get("used_percent", "?")))
    lines.append(("problems: " + "; ".join(report["problems"])) if report["problems"] else "no problems found")
    for service, s in report["services"].items():
        if s["load"] == "loaded" and s["log"]:
            lines.append("-- last log lines of %s:" % service)
            lines.extend("   " + line for line in s["log"])
    return lines


if __name__ == "__main__":
    sys.exit(main())
