# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: topology
short_description: Cross-host wiring of an Immich deployment, derived from the inventory groups
version_added: 0.2.0
description:
  - Given the hosts of the groups C(immich_database), C(immich_redis), C(immich_server) and C(immich_ml)
    and each host's address, returns what one host runs and how its services reach each other.
  - A service on the server's own host is reached by its network alias over the application network;
    one on another host is published on that host's address and allowed only from the server's address.
  - An inventory with none of the four groups and exactly one host in C(immich) is the one-host layout
    (that host runs everything), so inventories written before the groups existed keep working.
  - The server gets one ML URL per ML host, remote ones first and its own host's last (Immich tries the
    URLs in order; the local one is the fallback).
options:
  _input:
    description: The inventory host name to describe.
    type: str
    required: true
  groups:
    description: The inventory's C(groups) (the four Immich groups, or only C(immich) with one host).
    type: dict
    required: true
  addresses:
    description: The address each host is reached on by the others (inventory host name to address).
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: How this host is wired
  ansible.builtin.set_fact:
    __immich_topology: >-
      {{ inventory_hostname | homelab.immich.topology(groups,
         dict(groups['immich'] | zip(groups['immich'] | map('extract', hostvars, 'immich_host_address')))) }}
"""

RETURN = r"""
_value:
  description: The wiring for the host.
  type: dict
  contains:
    roles:
      description: The Immich roles this host runs (database, redis, server, ml), in deployment order.
      type: list
      elements: str
    database:
      description: Where the server reaches PostgreSQL (C(host), C(port), C(remote)); absent without a server here.
      type: dict
    redis:
      description: Where the server reaches Valkey (C(host), C(port), C(remote)); absent without a server here.
      type: dict
    ml_urls:
      description: The server's ML URLs, remote first; absent without a server here.
      type: list
      elements: str
    publish:
      description: Services this host publishes for other hosts, each with C(service), C(port), C(address)
        and C(allow_from) (the addresses allowed to connect).
      type: list
      elements: dict
    cross_host:
      description: The services used across hosts in the whole deployment (database, redis, ml), for
        password requirements.
      type: list
      elements: str
    providers:
      description: The inventory host of the database, of Valkey and of the server (C(database), C(redis), C(server)).
      type: dict
"""

from ansible.errors import AnsibleFilterError

GROUPS = ("immich_database", "immich_redis", "immich_ml", "immich_server")
ROLE_ORDER = ("database", "redis", "ml", "server")
PORTS = {"database": 5432, "redis": 6379, "ml": 3003}
ALIASES = {"database": "immich-database", "redis": "immich-redis", "ml": "immich-machine-learning"}


def _hosts(groups, name):
    hosts = groups.get(name) or []
    if not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError("groups['%s'] is not a list of hosts" % name)
    return list(hosts)


def _address(addresses, host):
    addr = addresses.get(host)
    if not addr:
        raise AnsibleFilterError(
            "no address for host %s: set immich_host_address (or ansible_host) for it, the address the other "
            "Immich hosts reach it on" % host)
    addr = str(addr)
    if addr == "localhost" or addr.startswith("127.") or addr == "::1":
        raise AnsibleFilterError(
            "host %s would be reached by the other Immich hosts on %s, a loopback address: set immich_host_address "
            "for it (its address on the network the hosts share)" % (host, addr))
    return addr


def publish_port(entry):
    """PublishPort= value for one publish entry: the host's address only (IPv6 in brackets)."""
    addr = entry["address"]
    if ":" in addr:
        addr = "[%s]" % addr
    return "%s:%d:%d" % (addr, entry["port"], entry["port"])


def check(groups):
    """The groups an Immich deployment can be built from, or an error saying what is missing."""
    members = dict((g, _hosts(groups, g)) for g in GROUPS)
    everyone = _hosts(groups, "immich")
    if not any(members.values()) and len(everyone) == 1:
        members = dict((g, everyone) for g in GROUPS)
    missing = [g for g in GROUPS if not members[g]]
    if missing:
        raise AnsibleFilterError(
            "the inventory has no host in %s: every Immich deployment needs one database, one redis, at least "
            "one server and at least one ml host (one host may be in all four groups)" % ", ".join(missing))
    for g in ("immich_database", "immich_redis", "immich_server"):
        if len(members[g]) != 1:
            raise AnsibleFilterError(
                "%s has %d hosts (%s): Immich uses exactly one; put the others in other groups"
                % (g, len(members[g]), ", ".join(members[g])))
    return members


def topology(host, groups, addresses):
    members = check(groups)
    server = members["immich_server"][0]
    roles = [r for r in ROLE_ORDER if host in members["immich_" + r]]
    if not roles:
        raise AnsibleFilterError(
            "host %s is in none of %s: put it in the groups of the services it should run, or take it out of "
            "the immich group" % (host, ", ".join(GROUPS)))
    cross, publish = [], []
    for service in ("database", "redis", "ml"):
        providers = members["immich_" + service]
        if any(p != server for p in providers):
            cross.append(service)
        if host in providers and host != server:
            publish.append({"service": service, "port": PORTS[service], "address": _address(addresses, host),
                            "allow_from": [_address(addresses, server)]})
    result = {"roles": roles, "publish": publish, "cross_host": cross,
              "providers": {"database": members["immich_database"][0], "redis": members["immich_redis"][0],
                            "server": server}}
    if host == server:
        for service in ("database", "redis"):
            provider = members["immich_" + service][0]
            result[service] = ({"host": ALIASES[service], "port": PORTS[service], "remote": False} if provider == host
                               else {"host": _address(addresses, provider), "port": PORTS[service], "remote": True})
        ml = members["immich_ml"]
        result["ml_urls"] = (["http://%s:%d" % (_address(addresses, h), PORTS["ml"]) for h in ml if h != host]
                             + (["http://%s:%d" % (ALIASES["ml"], PORTS["ml"])] if host in ml else []))
    return result


def firewalld_rules(publish):
    """The firewalld rich rules that let each host of a publish entry's allow_from reach its port
    on its address, and nothing else."""
    rules = []
    for entry in publish:
        for source in entry["allow_from"]:
            rules.append('rule family="%s" source address="%s" destination address="%s" port port="%d" protocol="tcp" accept'
                         % ("ipv6" if ":" in source else "ipv4", source, entry["address"], entry["port"]))
    return rules


class FilterModule(object):
    def filters(self):
        return {"topology": topology, "publish_port": publish_port, "firewalld_rules": firewalld_rules}
