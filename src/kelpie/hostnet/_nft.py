"""The nftables rules that enforce a sandbox's egress, inside its own network namespace.

Every connection the guest makes leaves through the VMM's user-mode network stack, which
runs in the sandbox's namespace: so a filter on that namespace's ``output`` hook sees all of
them, and the guest (root in its VM, but only there) cannot touch it. :func:`render` turns
the sandbox's mode and :class:`~kelpie.vm.EgressPolicy` into one ``nft -f`` script that
replaces the table atomically (a change on a running sandbox applies to the next packet).

The order is the policy's meaning (see :mod:`kelpie.vm._egress`): the sandbox's DNS
forwarder; ``deny`` rules; ``allow`` rules; then the mode (``nat``: never the always-denied
ranges nor the host's addresses, the rest allowed; ``policy``: nothing else). A name rule
allowed matches the addresses the forwarder answered for it, added to its own sets
(:func:`name_sets`) as it answers; a name denied is never answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Iterable

from kelpie.vm import EgressPolicy, EgressRule, NetworkMode
from kelpie.vm._egress import ALWAYS_DENIED, Address, Network

TABLE = "kelpie"
REJECT = "reject with icmpx admin-prohibited"
REJECTS = ("meta l4proto tcp reject with tcp reset", REJECT)
"""A refused TCP connection is reset (the VMM then resets the guest's at once: no wait for
a timeout); anything else gets an ICMP error."""


@dataclasses.dataclass(frozen=True)
class NameSets:
    """The two sets (IPv4, IPv6) holding the pinned addresses of one name rule."""

    rule: EgressRule
    v4: str
    v6: str


def name_sets(policy: EgressPolicy) -> list[NameSets]:
    """The sets of the policy's name rules, as :func:`render` names them: after the rule's
    text, so a set keeps its meaning (and its addresses) across a change of the policy."""
    sets = []
    for rule in policy.allow:  # (a denied name is never answered: nothing to pin)
        if rule.is_name:
            tag = hashlib.sha256(str(rule).encode()).hexdigest()[:12]
            sets.append(NameSets(rule, f"allow_{tag}_v4", f"allow_{tag}_v6"))
    return sets


def render(mode: NetworkMode, policy: EgressPolicy, *, gateway: Address,
           host: Iterable[Address], pinned: dict[str, list[Address]] | None = None) -> str:
    """The ``nft -f`` script for a sandbox's namespace: ``gateway`` is the host as the
    namespace sees it (where the DNS forwarder listens), ``host`` every address of the host,
    ``pinned`` the addresses each name set holds already (kept across a change)."""
    host = sorted(set(host) | {gateway}, key=lambda a: (a.version, a))
    sets = name_sets(policy)
    by_rule = {id(s.rule): s for s in sets}
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for named in sets:
        for name, family in ((named.v4, "ipv4_addr"), (named.v6, "ipv6_addr")):
            elements = [str(a) for a in (pinned or {}).get(name, [])]
            body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
            lines.append(f"  set {name} {{ type {family};{body} }}")
    lines += [
        "  chain egress {",
        "    type filter hook output priority 0; policy accept;",
        '    oifname "lo" accept',
        "    ct direction reply accept",  # answers to inbound connections (published ports)
        f"    ip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept",
    ]
    if any(r.is_name for r in (*policy.allow, *policy.deny)):
        # name rules hold only if names are asked of the forwarder: no other DNS server
        lines += [f"    meta l4proto {{ tcp, udp }} th dport {{ 53, 853 }} {verdict}"
                  for verdict in REJECTS]
    for rules, verdicts in ((policy.deny, REJECTS), (policy.allow, ("accept",))):
        for rule in rules:
            if rule.is_name and verdicts is REJECTS:
                continue  # the forwarder refuses the name; its addresses are never pinned
            lines += [f"    {match} {verdict}"
                      for match in _matches(rule, host, by_rule.get(id(rule)))
                      for verdict in verdicts]
    if mode is NetworkMode.POLICY:
        lines += [f"    {verdict}" for verdict in REJECTS]
    else:
        denied = [*ALWAYS_DENIED, *(ipaddress.ip_network(a) for a in host)]
        for version, family in ((4, "ip"), (6, "ip6")):
            networks = _collapse(n for n in denied if n.version == version)
            lines += [f"    {family} daddr {{ {', '.join(networks)} }} {verdict}"
                      for verdict in REJECTS]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _matches(rule: EgressRule, host: list[Address], named: NameSets | None) -> list[str]:
    """The match expressions (one per address family) of one rule."""
    port = "" if rule.port is None else f" meta l4proto {{ tcp, udp }} th dport {rule.port}"
    if named is not None:
        return [f"ip daddr @{named.v4}{port}", f"ip6 daddr @{named.v6}{port}"]
    if rule.target == "host":
        targets: list[Network] = [ipaddress.ip_network(a) for a in host]
    else:
        network = rule.network
        assert network is not None
        targets = [network]
    matches = []
    for version, family in ((4, "ip"), (6, "ip6")):
        networks = _collapse(n for n in targets if n.version == version)
        if networks:
            matches.append(f"{family} daddr {{ {', '.join(networks)} }}{port}")
    return matches


def _collapse(networks: Iterable[Network]) -> list[str]:
    return [str(n) for n in ipaddress.collapse_addresses(networks)]  # type: ignore[type-var]
