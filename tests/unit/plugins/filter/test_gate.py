"""The health gate's decisions (plugins/filter/gate.py) and the firewalld rules (topology.py)."""

import pytest

from ansible.errors import AnsibleFilterError
from ansible_collections.homelab.immich.plugins.filter.gate import gate_after, gate_before
from ansible_collections.homelab.immich.plugins.filter.topology import firewalld_rules

STATE = {
    "services": {"immich-database.service": {"active": "active"}, "immich-server.service": {"active": "activating"}},
    "containers": {"immich-database.service": {"image_id": "aaa", "image": "localhost/pg:17"}},
}


def test_before_lists_every_service_in_order_with_what_it_runs():
    before = gate_before(["immich-server.service", "immich-database.service", "immich-ml.service"], STATE)
    assert before == [
        {"service": "immich-server.service", "state": "activating", "old": "", "old_ref": ""},
        {"service": "immich-database.service", "state": "active", "old": "aaa", "old_ref": "localhost/pg:17"},
        {"service": "immich-ml.service", "state": "unknown", "old": "", "old_ref": ""},
    ]


def test_before_needs_a_state_read_with_services():
    with pytest.raises(AnsibleFilterError, match="immich_state"):
        gate_before(["a.service"], {})


def test_after_counts_a_change_only_between_two_known_images():
    before = [{"service": "db", "old": "aaa"}, {"service": "server", "old": "bbb"},
              {"service": "new", "old": ""}, {"service": "gone", "old": "ccc"}]
    images = {"db": "pg", "server": "srv:2", "new": "ml", "gone": "missing"}
    ids = {"pg": "aaa", "srv:2": "ddd", "ml": "eee", "missing": None}
    assert gate_after(before, images, ids) == [
        {"service": "db", "new": "aaa", "changed": False},
        {"service": "server", "new": "ddd", "changed": True},
        {"service": "new", "new": "eee", "changed": False},
        {"service": "gone", "new": "", "changed": False},
    ]


def test_firewalld_rules_one_per_allowed_address_on_the_published_address_only():
    publish = [{"service": "ml", "port": 3003, "address": "192.168.77.11", "allow_from": ["192.168.77.10", "fd00::10"]}]
    assert firewalld_rules(publish) == [
        'rule family="ipv4" source address="192.168.77.10" destination address="192.168.77.11" '
        'port port="3003" protocol="tcp" accept',
        'rule family="ipv6" source address="fd00::10" destination address="192.168.77.11" '
        'port port="3003" protocol="tcp" accept',
    ]
    assert firewalld_rules([]) == []
