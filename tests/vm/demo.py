"""`make demo`: a throwaway Debian 13 VM with the whole Immich stack, deployed by site.yml.

    demo.py up      boot the VM, prepare its BTRFS pool, run site.yml, print the URL
    demo.py down    remove it

With the upstream registries reachable it deploys the real Immich images (site.yml's defaults).
Where they are not (this project's test machines), it deploys offline, loaded from archives as an
air-gapped install would: the REAL Immich server and web UI built from upstream's source
(tests/images/server.py, ~3 min the first time, cached after), PostgreSQL + pgvector and Valkey
from Debian, and the contract stand-in for machine learning (its models cannot be downloaded here).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))

import build as images  # noqa: E402
import server as server_images  # noqa: E402  (tests/images/server.py)
import vm  # noqa: E402

NAME = "demo"
BIN = os.path.dirname(sys.executable)
# the offline test images with the contract stand-ins (bench.py measures the collection with these)
OFFLINE_VARS = {
    "immich_image_archives": ["/mnt/test-images/homelab-immich-test-images.tar"],
    "immich_database_image": "localhost/homelab-immich-test/postgres:17-pgvector",
    "immich_redis_image": "localhost/homelab-immich-test/valkey:8",
    "immich_server_image": "localhost/homelab-immich-test/immich-server:standin",
    "immich_ml_image": "localhost/homelab-immich-test/immich-machine-learning:standin",
    "immich_db_vector_extension": "pgvector",
}


SERVER_VERSION = "3.1.0"  # the real server make demo builds and deploys offline


def offline_vars(server_archive):
    """OFFLINE_VARS with the real server built from upstream's source instead of its stand-in."""
    extra = dict(OFFLINE_VARS)
    extra["immich_image_archives"] = OFFLINE_VARS["immich_image_archives"] + [
        "/mnt/test-images/" + os.path.basename(server_archive)]
    extra["immich_server_image"] = images.PREFIX + "immich-server:v" + SERVER_VERSION
    return extra


def share_dir(archives):
    """One directory holding ARCHIVES (hard links where the file system allows, copies otherwise),
    shared with the VM as `images`: prepare.yml copies it onto the guest's disk."""
    out = os.path.join(REPO, "build", "demo-images")
    os.makedirs(out, exist_ok=True)
    wanted = {os.path.basename(a): a for a in archives}
    for name in os.listdir(out):
        if name not in wanted:
            os.unlink(os.path.join(out, name))
    for name, path in wanted.items():
        dest = os.path.join(out, name)
        if os.path.exists(dest) and os.path.samefile(dest, path):
            continue
        if os.path.exists(dest):
            os.unlink(dest)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    return out


def check_web_ui(port):
    """Headless Chromium opens the web UI as a new user would (its JavaScript run): the screenshot is
    kept in build/demo-web-ui.png, the rendered DOM in build/demo-web-ui.html, and the DOM must be
    Immich's onboarding page (a new instance) or its login page (an admin exists)."""
    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("demo: chromium (Debian's package) is needed to check the web UI: "
                         "tests/tools/host-deps.sh demo installs it")
    url = "http://127.0.0.1:%d/" % port
    out = os.path.join(REPO, "build")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,800",
            "--virtual-time-budget=20000"]
    subprocess.run(args + ["--screenshot=" + os.path.join(out, "demo-web-ui.png"), url], capture_output=True,
                   timeout=300, check=True)
    dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=300, check=True).stdout
    with open(os.path.join(out, "demo-web-ui.html"), "w") as f:
        f.write(dom)
    for marker, page in (("Welcome to Immich", "onboarding page"), ("<title>Login - Immich</title>", "login page")):
        if marker in dom:
            print("demo: the web UI renders Immich's %s (build/demo-web-ui.png)" % page, flush=True)
            return page
    raise SystemExit("demo: %s did not render Immich's onboarding or login page: see build/demo-web-ui.png and "
                     "build/demo-web-ui.html" % url)


def registry_reachable(host="ghcr.io", port=443, timeout=5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def banner(lines):
    width = max(len(line) for line in lines) + 4
    print("\n" + "*" * width)
    for line in lines:
        print("* %s *" % line.ljust(width - 4))
    print("*" * width + "\n", flush=True)


def write_inventory(state, inventory_dir):
    inv = os.path.join(inventory_dir, "hosts.yml")
    with open(inv, "w") as f:
        json.dump({"all": {"children": {"immich": {"children": {
            g: {"hosts": {NAME: {}}} for g in ("immich_database", "immich_redis", "immich_server", "immich_ml")}}},
            "hosts": {NAME: {"ansible_host": "127.0.0.1", "ansible_port": state["port"], "ansible_user": "root",
                             "ansible_python_interpreter": "/usr/bin/python3",
                             "ansible_ssh_private_key_file": state["identity_file"],
                             "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}}}},
            f)
    return inv


def playbook(state, playbook_path, extra, inventory_dir):
    inv = write_inventory(state, inventory_dir)
    varfile = os.path.join(inventory_dir, "vars.json")
    with open(varfile, "w") as f:
        json.dump(extra, f)
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
    subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", inv, "-e", "@" + varfile, playbook_path],
                   cwd=REPO, env=env, check=True)


def up():
    online = registry_reachable()
    archive = images.build()
    archives = [archive]
    if online:
        extra = {}
        print("demo: ghcr.io is reachable: deploying the real Immich images (%s)" % "site.yml defaults")
    else:
        server_archive = server_images.build(SERVER_VERSION)
        archives.append(server_archive)
        extra = offline_vars(server_archive)
        banner(["ghcr.io and docker.io are NOT reachable from here: the demo deploys offline.",
                "immich-server v%s (server and web UI) is built from upstream's source here;" % SERVER_VERSION,
                "PostgreSQL 17 + pgvector and Valkey come from Debian; machine learning is a",
                "contract STAND-IN (its models cannot be downloaded here: no smart search or faces).",
                "The first start of the server runs its database migrations: minutes under qemu TCG."])
    state = vm.up(NAME, forwards=[(0, 2283)], memory=4096, shares={"images": share_dir(archives)})
    with tempfile.TemporaryDirectory() as tmp:
        playbook(state, os.path.join(REPO, "molecule", "shared", "prepare.yml"), {}, tmp)
        playbook(state, os.path.join(REPO, "site.yml"), extra, tmp)
    port = [h for h, g in state["forwards"] if g == 2283][0]
    check_web_ui(port)
    banner(["Immich is up: http://127.0.0.1:%d" % port,
            "(%s)" % ("real Immich images" if online else
                      "the real Immich server and web UI v%s; stand-in machine learning" % SERVER_VERSION),
            "Open it in a browser, create the first admin user and upload photos.",
            "SSH: ssh -i %s -p %d root@127.0.0.1" % (state["identity_file"], state["port"]),
            "Tear it down with: make demo-down"])
    return 0


def down():
    vm.down(NAME)
    print("demo: removed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(up() if sys.argv[1] == "up" else down())
