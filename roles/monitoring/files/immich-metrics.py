"""Immich's service state as Prometheus text, for node_exporter's textfile collector.

    immich-metrics --output FILE --storage-root PATH [--user USER] SERVICE=CONTAINER ...

Runs as root from immich-metrics.timer. With --user (rootless deployments) the units are read
from that user's systemd manager and the containers from that user's podman. One systemctl and
one podman call per run; a query that fails is counted in immich_metrics_errors and its
metrics are left out, never guessed. The file is replaced atomically (node_exporter never reads
half a file). Python standard library only.
"""

import argparse
import os
import pwd
import subprocess
import sys
import tempfile
import time

UNIT_PROPERTIES = ("Id", "ActiveState", "NRestarts", "MemoryCurrent", "MemoryMax")

HELP = {
    "immich_unit_active": ("gauge", "1 when the systemd unit of the service is active."),
    "immich_unit_restarts_total": ("counter", "Automatic restarts of the unit (systemd NRestarts)."),
    "immich_unit_memory_bytes": ("gauge", "Memory used by the unit's cgroup (MemoryCurrent)."),
    "immich_unit_memory_max_bytes": ("gauge", "MemoryMax of the unit (absent when unlimited)."),
    "immich_container_healthy": ("gauge", "1 when the container's health check reports healthy."),
    "immich_container_running": ("gauge", "1 when the container is running."),
    "immich_pool_size_bytes": ("gauge", "Size of the filesystem holding the Immich data."),
    "immich_pool_avail_bytes": ("gauge", "Bytes available to unprivileged users on that filesystem."),
    "immich_metrics_errors": ("gauge", "Queries that failed in the last run (their metrics are missing)."),
    "immich_metrics_last_run_timestamp_seconds": ("gauge", "When these metrics were written."),
}


def parse_show(text):
    """systemctl show output for several units (blocks separated by blank lines) -> {Id: props}."""
    units = {}
    for block in text.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("Id"):
            units[props["Id"]] = props
    return units


def parse_ps(text):
    """podman ps -a --format '{{.Names}}\\t{{.State}}\\t{{.Status}}' -> {name: (running, healthy)}.

    healthy is None for a running container without a health check (the exporters): no state
    in parentheses after "Up ...".
    """
    containers = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, state, status = parts
        running = state == "running"
        checked = any(s in status for s in ("(healthy)", "(unhealthy)", "(starting)"))
        if not running:
            containers[name] = (False, False)
        else:
            containers[name] = (True, "(healthy)" in status if checked else None)
    return containers


def number(value):
    """A systemd integer property, or None when unset/unlimited."""
    if value is None or not value.isdigit():
        return None
    # systemd prints 2^64-1 for "unset" in some versions
    return None if int(value) >= (1 << 64) - 1 else int(value)


def label(value):
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render(services, units, containers, pool, errors, now):
    """services: [(service, container)]; units/containers: parsed, or None when the query failed."""
    samples = {name: [] for name in HELP}
    for service, container in services:
        lbl = '{service="%s"}' % label(service[:-len(".service")] if service.endswith(".service") else service)
        if units is not None:
            props = units.get(service, {})
            samples["immich_unit_active"].append((lbl, 1 if props.get("ActiveState") == "active" else 0))
            restarts = number(props.get("NRestarts"))
            if restarts is not None:
                samples["immich_unit_restarts_total"].append((lbl, restarts))
            memory = number(props.get("MemoryCurrent"))
            if memory is not None:
                samples["immich_unit_memory_bytes"].append((lbl, memory))
            limit = number(props.get("MemoryMax"))
            if limit is not None:
                samples["immich_unit_memory_max_bytes"].append((lbl, limit))
        if containers is not None:
            running, healthy = containers.get(container, (False, False))
            samples["immich_container_running"].append((lbl, 1 if running else 0))
            if healthy is not None:
                samples["immich_container_healthy"].append((lbl, 1 if healthy else 0))
    if pool is not None:
        path, size, avail = pool
        lbl = '{path="%s"}' % label(path)
        samples["immich_pool_size_bytes"].append((lbl, size))
        samples["immich_pool_avail_bytes"].append((lbl, avail))
    samples["immich_metrics_errors"].append(("", errors))
    samples["immich_metrics_last_run_timestamp_seconds"].append(("", now))
    out = []
    for name, (kind, text) in HELP.items():
        if not samples[name]:
            continue
        out.append("# HELP %s %s" % (name, text))
        out.append("# TYPE %s %s" % (name, kind))
        for lbl, value in samples[name]:
            out.append("%s%s %s" % (name, lbl, value if isinstance(value, int) else "%.3f" % value))
    return "\n".join(out) + "\n"


def query(cmd, user=None):
    kw = {}
    env = dict(os.environ)
    if user is not None:
        kw = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name,
                   XDG_RUNTIME_DIR="/run/user/%d" % user.pw_uid,
                   DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/%d/bus" % user.pw_uid)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False, **kw)
    if proc.returncode != 0:
        print("immich-metrics: %s failed (%d): %s" % (" ".join(cmd), proc.returncode, proc.stderr.strip()),
              file=sys.stderr)
        return None
    return proc.stdout


def collect(services, storage_root, user_name=None):
    user = pwd.getpwnam(user_name) if user_name else None
    errors = 0
    systemctl = ["systemctl", "--user", "-M", "%s@" % user_name] if user_name else ["systemctl"]
    out = query(systemctl + ["show", "-p", ",".join(UNIT_PROPERTIES), "--"] + [s for s, _c in services])
    units = parse_show(out) if out is not None else None
    errors += units is None
    out = query(["podman", "ps", "-a", "--format", "{{.Names}}\t{{.State}}\t{{.Status}}"], user)
    containers = parse_ps(out) if out is not None else None
    errors += containers is None
    try:
        st = os.statvfs(storage_root)
        pool = (storage_root, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    except OSError as exc:
        print("immich-metrics: statvfs %s: %s" % (storage_root, exc), file=sys.stderr)
        pool = None
        errors += 1
    return render(services, units, containers, pool, errors, time.time())


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".immich-metrics.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="the .prom file (in node_exporter's textfile directory)")
    ap.add_argument("--storage-root", required=True)
    ap.add_argument("--user", help="rootless: the user owning the containers")
    ap.add_argument("services", nargs="+", metavar="SERVICE=CONTAINER")
    args = ap.parse_args(argv)
    services = []
    for item in args.services:
        service, sep, container = item.partition("=")
        if not sep or not service or not container:
            ap.error("%r: expected SERVICE=CONTAINER, like immich-server.service=immich_server" % item)
        services.append((service, container))
    text = collect(services, args.storage_root, args.user)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
