"""`make demo`: a throwaway Debian 13 VM with the whole Immich stack, deployed by site.yml.

    demo.py up      boot the VM, prepare its BTRFS pool, run site.yml, print the URL
    demo.py down    remove it

With the upstream registries reachable it deploys the real Immich images (site.yml's defaults).
Where they are not, it says so loudly and deploys the offline test images instead (PostgreSQL +
pgvector and Valkey from Debian, contract stand-ins for the server and ML), loaded from an archive
as an air-gapped install would.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))

import build as images  # noqa: E402
import vm  # noqa: E402

NAME = "demo"
BIN = os.path.dirname(sys.executable)
OFFLINE_VARS = {
    "immich_image_archives": ["/mnt/test-images/homelab-immich-test-images.tar"],
    "immich_database_image": "localhost/homelab-immich-test/postgres:17-pgvector",
    "immich_redis_image": "localhost/homelab-immich-test/valkey:8",
    "immich_server_image": "localhost/homelab-immich-test/immich-server:standin",
    "immich_ml_image": "localhost/homelab-immich-test/immich-machine-learning:standin",
    "immich_db_vector_extension": "pgvector",
}


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
    if online:
        extra = {}
        print("demo: ghcr.io is reachable: deploying the real Immich images (%s)" % "site.yml defaults")
    else:
        extra = dict(OFFLINE_VARS)
        banner(["ghcr.io and docker.io are NOT reachable from here.",
                "The demo deploys the OFFLINE TEST IMAGES instead: PostgreSQL 17 + pgvector and Valkey",
                "from Debian, and contract STAND-INS for immich-server and immich-machine-learning",
                "(they answer the health endpoints; there is no photo UI). On a host that reaches",
                "ghcr.io, the same site.yml deploys the real Immich images."])
    archive = images.build()
    state = vm.up(NAME, forwards=[(0, 2283)], memory=4096, shares={"images": os.path.dirname(archive)})
    with tempfile.TemporaryDirectory() as tmp:
        playbook(state, os.path.join(REPO, "molecule", "shared", "prepare.yml"), {}, tmp)
        playbook(state, os.path.join(REPO, "site.yml"), extra, tmp)
    port = [h for h, g in state["forwards"] if g == 2283][0]
    banner(["Immich is up: http://127.0.0.1:%d" % port,
            "(%s)" % ("real Immich images" if online else "offline test images: stand-in server, no photo UI"),
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
