"""Cross-host wiring derived from the inventory groups (plugins/filter/topology.py)."""

import pytest

from ansible.errors import AnsibleFilterError
from ansible_collections.homelab.immich.plugins.filter.topology import publish_port, topology

ADDR = {"app": "192.168.77.10", "gpu": "192.168.77.11", "db": "192.168.77.12"}


def groups(database, redis, server, ml):
    return {"immich_database": database, "immich_redis": redis, "immich_server": server, "immich_ml": ml}


def test_one_host_is_wired_by_container_names_and_publishes_nothing():
    t = topology("app", groups(["app"], ["app"], ["app"], ["app"]), ADDR)
    assert t["roles"] == ["database", "redis", "ml", "server"]
    assert t["database"] == {"host": "immich-database", "port": 5432, "remote": False}
    assert t["redis"] == {"host": "immich-redis", "port": 6379, "remote": False}
    assert t["ml_urls"] == ["http://immich-machine-learning:3003"]
    assert t["publish"] == [] and t["cross_host"] == []


def test_remote_ml_on_the_gpu_host():
    g = groups(["app"], ["app"], ["app"], ["gpu"])
    app, gpu = topology("app", g, ADDR), topology("gpu", g, ADDR)
    assert app["roles"] == ["database", "redis", "server"] and gpu["roles"] == ["ml"]
    assert app["ml_urls"] == ["http://192.168.77.11:3003"]
    assert app["publish"] == []
    assert gpu["publish"] == [{"service": "ml", "port": 3003, "address": "192.168.77.11", "allow_from": ["192.168.77.10"]}]
    assert "database" not in gpu and "ml_urls" not in gpu
    assert app["cross_host"] == gpu["cross_host"] == ["ml"]


def test_remote_ml_first_and_the_local_one_as_fallback():
    t = topology("app", groups(["app"], ["app"], ["app"], ["app", "gpu"]), ADDR)
    assert t["ml_urls"] == ["http://192.168.77.11:3003", "http://immich-machine-learning:3003"]


def test_separate_database_host_publishes_postgres_to_the_server_only():
    g = groups(["db"], ["db"], ["app"], ["app"])
    db, app = topology("db", g, ADDR), topology("app", g, ADDR)
    assert db["roles"] == ["database", "redis"]
    assert [(p["service"], p["port"], p["allow_from"]) for p in db["publish"]] == [
        ("database", 5432, ["192.168.77.10"]), ("redis", 6379, ["192.168.77.10"])]
    assert app["database"] == {"host": "192.168.77.12", "port": 5432, "remote": True}
    assert app["redis"] == {"host": "192.168.77.12", "port": 6379, "remote": True}
    assert db["cross_host"] == ["database", "redis"]


@pytest.mark.parametrize("g, message", [
    (groups([], ["app"], ["app"], ["app"]), "no host in immich_database"),
    (groups(["app"], ["app"], ["app", "gpu"], ["app"]), "immich_server has 2 hosts"),
    (groups(["app", "db"], ["app"], ["app"], ["app"]), "immich_database has 2 hosts"),
])
def test_impossible_inventories_are_refused_with_the_reason(g, message):
    with pytest.raises(AnsibleFilterError, match=message):
        topology("app", g, ADDR)


def test_a_host_without_an_address_is_named():
    with pytest.raises(AnsibleFilterError, match="no address for host gpu"):
        topology("app", groups(["app"], ["app"], ["app"], ["gpu"]), {"app": "192.168.77.10"})


def test_only_the_immich_group_with_one_host_is_the_one_host_layout():
    t = topology("app", {"immich": ["app"]}, {})
    assert t["roles"] == ["database", "redis", "ml", "server"] and t["publish"] == []


def test_a_host_in_no_service_group_is_refused():
    g = dict(groups(["app"], ["app"], ["app"], ["app"]), immich=["app", "spare"])
    with pytest.raises(AnsibleFilterError, match="host spare is in none of"):
        topology("spare", g, ADDR)


def test_a_loopback_address_cannot_be_reached_from_another_host():
    with pytest.raises(AnsibleFilterError, match="host gpu would be reached .* on 127.0.0.1, a loopback address"):
        topology("app", groups(["app"], ["app"], ["app"], ["gpu"]), dict(ADDR, gpu="127.0.0.1"))


def test_providers_are_named_for_password_sharing():
    t = topology("gpu", groups(["db"], ["app"], ["app"], ["gpu"]), ADDR)
    assert t["providers"] == {"database": "db", "redis": "app", "server": "app"}


@pytest.mark.parametrize("address, expected", [
    ("192.168.77.11", "192.168.77.11:3003:3003"), ("fd00::11", "[fd00::11]:3003:3003")])
def test_publish_port_binds_the_host_address_only(address, expected):
    assert publish_port({"service": "ml", "port": 3003, "address": address, "allow_from": []}) == expected
