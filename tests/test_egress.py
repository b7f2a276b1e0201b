"""Egress rules: how they read, what they decide, how they round-trip."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie.vm import ConfigError
from kelpie.vm._egress import ALWAYS_DENIED, EgressPolicy, EgressRule

HOST = [ipaddress.ip_address("203.0.113.9")]


@pytest.mark.parametrize(("text", "target", "port"), [
    ("203.0.113.7", "203.0.113.7/32", None),
    ("198.51.100.0/24:443", "198.51.100.0/24", 443),
    ("198.51.100.9/24", "198.51.100.0/24", None),  # host bits are dropped
    ("PyPI.org.", "pypi.org", None),
    ("*.pythonhosted.org:443", "*.pythonhosted.org", 443),
    ("host:5432", "host", 5432),
    ("[2001:db8::1]:443", "2001:db8::1/128", 443),
    ("2001:db8::/32", "2001:db8::/32", None),
])
def test_rules_read_every_form(text: str, target: str, port: int | None) -> None:
    rule = EgressRule.parse(text)
    assert (rule.target, rule.port) == (target, port)
    assert EgressRule.parse(str(rule)) == rule


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("example.com:0", "1 to 65535"),
    ("example.com:http", "1 to 65535"),
    ("300.1.2.3", "not a valid address"),
    ("localhost", "two labels"),
    ("bad_name.com", "two labels"),
    ("[2001:db8::1", "is not ADDRESS"),
    ("*.*.example.com", "two labels"),
])
def test_bad_rules_say_what_is_wrong_and_the_forms(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EgressRule.parse(text)
    assert says in str(caught.value)
    assert "CIDR" in str(caught.value)


def test_every_bad_rule_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        EgressPolicy.parse(allow=["x", "example.com"], deny=["1.2.3.4:99999"])
    assert len(caught.value.problems) == 2


def test_nat_reaches_the_internet_but_never_the_host_or_private_ranges() -> None:
    nat = EgressPolicy()
    assert nat.allows("198.51.100.1", 80, narrowed=False, host=HOST)
    for denied in ("127.0.0.1", "10.0.2.2", "172.16.0.1", "192.168.1.1", "100.64.0.1",
                   "169.254.169.254", "::1", "fd00::1", "fe80::1", "203.0.113.9",
                   "::ffff:127.0.0.1", "224.0.0.1"):
        assert not nat.allows(denied, 80, narrowed=False, host=HOST), denied


def test_an_allow_opens_an_exception_and_a_deny_wins() -> None:
    policy = EgressPolicy.parse(allow=["host:5432", "10.1.0.0/16"],
                                deny=["10.1.2.3", "198.51.100.0/24:25"])
    assert policy.allows("203.0.113.9", 5432, narrowed=False, host=HOST)
    assert not policy.allows("203.0.113.9", 5433, narrowed=False, host=HOST)
    assert policy.allows("10.1.9.9", 22, narrowed=False, host=HOST)
    assert not policy.allows("10.1.2.3", 22, narrowed=False, host=HOST)
    assert not policy.allows("198.51.100.7", 25, narrowed=False, host=HOST)
    assert policy.allows("198.51.100.7", 587, narrowed=False, host=HOST)


def test_policy_mode_reaches_only_what_is_allowed() -> None:
    policy = EgressPolicy.parse(allow=["198.51.100.1:80", "*.example.org"])
    assert policy.allows("198.51.100.1", 80, narrowed=True)
    assert not policy.allows("198.51.100.1", 81, narrowed=True)
    assert not policy.allows("198.51.100.2", 80, narrowed=True)
    pinned = {"api.example.org": [ipaddress.ip_address("198.51.100.50")]}
    assert policy.allows("198.51.100.50", 443, narrowed=True, pinned=pinned)
    assert not policy.allows("198.51.100.51", 443, narrowed=True, pinned=pinned)


def test_names_are_answered_as_the_rules_say() -> None:
    policy = EgressPolicy.parse(allow=["pypi.org", "*.pythonhosted.org"],
                                deny=["evil.pythonhosted.org"])
    assert policy.allows_name("pypi.org", narrowed=True)
    assert policy.allows_name("files.pythonhosted.org.", narrowed=True)
    assert not policy.allows_name("pythonhosted.org", narrowed=True)  # the wildcard: below
    assert not policy.allows_name("evil.pythonhosted.org", narrowed=True)
    assert not policy.allows_name("example.com", narrowed=True)
    assert policy.allows_name("example.com", narrowed=False)
    assert not policy.allows_name("evil.pythonhosted.org", narrowed=False)


def test_policies_round_trip_through_json() -> None:
    policy = EgressPolicy.parse(allow=["host:5432", "[2001:db8::1]:443", "*.a.example"],
                                deny=["198.51.100.0/24"])
    assert EgressPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match="unknown field 'allows'"):
        EgressPolicy.from_dict({"allows": []})


@given(st.ip_addresses(), st.integers(1, 65535))
def test_a_deny_of_everything_denies_everything(address: object, port: int) -> None:
    policy = EgressPolicy.parse(allow=["0.0.0.0/0", "::/0"], deny=["0.0.0.0/0", "::/0"])
    assert not policy.allows(str(address), port, narrowed=False)


@given(st.ip_addresses())
def test_nat_denies_exactly_the_always_denied_ranges(address: object) -> None:
    parsed = ipaddress.ip_address(str(address))
    expected = not any(parsed in network for network in ALWAYS_DENIED)
    assert EgressPolicy().allows(parsed, 443, narrowed=False) is expected


def test_name_rules_keep_dns_to_the_forwarder() -> None:
    from kelpie.hostnet import render_rules
    from kelpie.vm import NetworkMode

    gateway = ipaddress.ip_address("10.254.0.1")
    with_names = render_rules(NetworkMode.NAT, EgressPolicy.parse(deny=["evil.example"]),
                              gateway=gateway, host=[])
    assert "meta l4proto { tcp, udp } th dport { 53, 853 } meta l4proto tcp reject with tcp " \
           "reset" in with_names
    assert with_names.index("dport 53 accept") < with_names.index("dport { 53, 853 }")
    plain = render_rules(NetworkMode.NAT, EgressPolicy(), gateway=gateway, host=[])
    assert "dport { 53, 853 }" not in plain
