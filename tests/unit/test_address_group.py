"""Client address budgets count an IPv6 client by its /64 (docs/guide.md), and /dev/token's peer check."""

from __future__ import annotations

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from pipeline.core.settings import loopback
from web import from_this_machine
from web.ratelimit import address_group


@pytest.mark.parametrize("address, group", [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2:0:0:0:9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("-", "-"),
    ("", ""),
])
def test_ipv6_addresses_are_grouped_by_their_64_prefix(address, group):
    assert address_group(address) == group


def test_two_addresses_of_one_64_share_a_budget_and_the_next_64_does_not():
    assert address_group("2001:db8:0:1::a") == address_group("2001:db8:0:1:dead:beef:0:1")
    assert address_group("2001:db8:0:1::a") != address_group("2001:db8:0:2::a")
    assert address_group("203.0.113.1") != address_group("203.0.113.2")


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.2", False), ("10.0.0.1", False), ("fd00::2", False), ("::", False), ("0.0.0.0", False),
    ("", False), ("localhost", False),
])
def test_loopback_addresses(address, local):
    assert loopback(address) is local


def _request(remote: str, **headers) -> Request:
    return Request(EnvironBuilder(path="/dev/token", headers=headers,
                                  environ_base={"REMOTE_ADDR": remote}).get_environ())


def test_dev_token_answers_a_loopback_peer_that_no_proxy_relayed():
    assert from_this_machine(_request("127.0.0.1"))
    assert from_this_machine(_request("::1"))
    assert not from_this_machine(_request("192.0.2.2"))
    assert not from_this_machine(_request("fd00::2"))
    # A proxy on this machine relays anyone: what it forwarded is not from here.
    assert not from_this_machine(_request("127.0.0.1", **{"X-Forwarded-For": "127.0.0.1"}))
    assert not from_this_machine(_request("127.0.0.1", Forwarded="for=198.51.100.1"))
