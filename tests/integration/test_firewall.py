"""The several-host firewall on this machine: the host role's nftables rules rendered by Ansible and
checked by the real nft (nft -c: parsed and validated by the kernel, nothing loaded), and the
firewalld task run against a stand-in firewall-cmd that keeps its rules in files.

The rules' effect on traffic (allowed host in, other sources dropped) is tested on two VMs by the
molecule scenario `multihost`; firewalld itself is not in the test VM image.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from localtools import ROOT, sh

BIN = os.path.dirname(sys.executable)
PUBLISH_V4 = [
    {"service": "database", "port": 5432, "address": "192.168.77.12", "allow_from": ["192.168.77.10"]},
    {"service": "ml", "port": 3003, "address": "192.168.77.12", "allow_from": ["192.168.77.10", "192.168.77.14"]},
]
PUBLISH_V6 = [{"service": "redis", "port": 6379, "address": "fd00::12", "allow_from": ["fd00::10"]}]


def ansible_env(tmp_path, **extra):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"))
    env.update(extra)
    return env


def render_rules(tmp_path, publish):
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps({"__immich_topology": {"publish": publish}, "ansible_python_interpreter": sys.executable}))
    dest = tmp_path / "firewall.nft"
    proc = subprocess.run([os.path.join(BIN, "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
                           "-a", "src=%s dest=%s" % (os.path.join(ROOT, "roles/host/templates/firewall.nft.j2"), dest),
                           "-e", "@%s" % varfile], cwd=ROOT, env=ansible_env(tmp_path),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


@pytest.mark.root
@pytest.mark.parametrize("publish", [PUBLISH_V4, PUBLISH_V6], ids=["ipv4", "ipv6"])
def test_the_rules_are_valid_nftables(tmp_path, publish):
    rules = render_rules(tmp_path, publish)
    check = sh("nft", "-c", "-f", str(rules), check=False)
    assert check.returncode == 0, check.stderr + rules.read_text()
    text = rules.read_text()
    # replaced whole on every load: declare, delete, define (one transaction)
    assert re.search(r"^table inet homelab_immich\ndelete table inet homelab_immich\n", text, re.M)
    assert "type filter hook prerouting priority -150; policy accept;" in text
    for p in publish:
        family = "ip6" if ":" in p["address"] else "ip"
        line = "%s daddr %s tcp dport %d %s saddr != { %s } counter drop" % (
            family, p["address"], p["port"], family, ", ".join(p["allow_from"]))
        assert line in text, text
    rules = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    # drops only: whatever else the host's firewalls decide still stands
    assert not [r for r in rules if " accept" in r and not r.startswith("type filter")], rules


FAKE_FIREWALL_CMD = r"""#!/bin/bash
# firewall-cmd stand-in: --state, --permanent --query-rich-rule/--add-rich-rule, --add-rich-rule
echo "$*" >> "$FAKE_FW/calls"
[ "$1" = --state ] && { [ -e "$FAKE_FW/running" ] && { echo running; exit 0; } || { echo "not running"; exit 252; }; }
file="$FAKE_FW/runtime"
if [ "$1" = --permanent ]; then file="$FAKE_FW/permanent"; shift; fi
touch "$file"
case "$1" in
  --query-rich-rule=*) grep -qxF -- "${1#--query-rich-rule=}" "$file" ;;
  --add-rich-rule=*) echo "${1#--add-rich-rule=}" >> "$file" ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""


@pytest.fixture
def fake_firewalld(tmp_path):
    state = tmp_path / "fw"
    state.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "firewall-cmd").write_text(FAKE_FIREWALL_CMD)
    (bindir / "firewall-cmd").chmod(0o755)
    return {"dir": state, "PATH": "%s:%s" % (bindir, os.environ["PATH"])}


def run_firewalld_task(tmp_path, fw, *extra):
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        "  environment:\n    PATH: %s\n    FAKE_FW: %s\n"
        "  tasks:\n    - ansible.builtin.include_role:\n        name: homelab.immich.host\n"
        "        tasks_from: firewalld\n" % (fw["PATH"], fw["dir"]))
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps({"__immich_topology": {"publish": PUBLISH_V4}, "ansible_python_interpreter": sys.executable}))
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-e", "@%s" % varfile,
                           str(playbook)] + list(extra), cwd=ROOT, env=ansible_env(tmp_path),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return int(re.findall(r"changed=(\d+)", proc.stdout.split("PLAY RECAP")[-1])[0])


def rules_in(fw, name):
    path = fw["dir"] / name
    return path.read_text().splitlines() if path.exists() else []


EXPECTED = [
    'rule family="ipv4" source address="192.168.77.10" destination address="192.168.77.12" '
    'port port="5432" protocol="tcp" accept',
    'rule family="ipv4" source address="192.168.77.10" destination address="192.168.77.12" '
    'port port="3003" protocol="tcp" accept',
    'rule family="ipv4" source address="192.168.77.14" destination address="192.168.77.12" '
    'port port="3003" protocol="tcp" accept',
]


def test_firewalld_gets_one_rich_rule_per_allowed_address_once(tmp_path, fake_firewalld):
    (fake_firewalld["dir"] / "running").touch()
    assert run_firewalld_task(tmp_path, fake_firewalld) == 1
    assert rules_in(fake_firewalld, "permanent") == EXPECTED
    assert rules_in(fake_firewalld, "runtime") == EXPECTED  # applied now too, without a reload
    assert run_firewalld_task(tmp_path, fake_firewalld) == 0  # idempotent
    assert rules_in(fake_firewalld, "permanent") == EXPECTED


def test_firewalld_in_check_mode_reports_and_adds_nothing(tmp_path, fake_firewalld):
    (fake_firewalld["dir"] / "running").touch()
    assert run_firewalld_task(tmp_path, fake_firewalld, "--check") == 1
    assert rules_in(fake_firewalld, "permanent") == [] and rules_in(fake_firewalld, "runtime") == []


def test_without_firewalld_running_nothing_is_asked_of_it(tmp_path, fake_firewalld):
    assert run_firewalld_task(tmp_path, fake_firewalld) == 0
    assert (fake_firewalld["dir"] / "calls").read_text().splitlines() == ["--state"]
