"""Where a sandbox's guest may connect to: its egress rules and what they decide.

A rule is ``TARGET[:PORT]``, given to ``--allow`` or ``--deny``. TARGET is one of

- an address or CIDR, IPv4 or IPv6 (``203.0.113.7``, ``198.51.100.0/24``; an IPv6 one in
  brackets when a port follows: ``[2001:db8::1]:443``);
- a domain name (``pypi.org``: that name) or a wildcard (``*.pythonhosted.org``: its
  subdomains, not the name itself). Names are resolved by the sandbox's DNS forwarder and
  the addresses it answered are pinned for the sandbox;
- ``host``: this host itself (for a service it runs for its sandboxes).

What the rules decide, in this order: a ``deny`` rule that matches wins; then an ``allow``
rule that matches; then the mode. ``nat`` lets the guest reach the internet but never
:data:`ALWAYS_DENIED` (loopback, private, CGNAT, link-local with the cloud metadata address,
multicast and their IPv6 equivalents) nor the host's own addresses; ``policy`` lets it
reach nothing else. So in ``nat`` an ``allow`` only opens an exception (``--allow host:5432``),
and in ``policy`` the ``allow`` rules are the whole list.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kelpie._exceptions import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALWAYS_DENIED: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8",
))
"""What ``nat`` and ``policy`` never reach unless an ``allow`` rule names it."""
HOST = "host"
MAX_RULES = 256
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_RULE_FORMS = ("ADDRESS, CIDR, NAME, *.NAME or 'host', optionally with :PORT "
               "(e.g. 203.0.113.0/24:443, pypi.org, *.pythonhosted.org:443, host:5432, "
               "[2001:db8::1]:443)")


@dataclasses.dataclass(frozen=True)
class EgressRule:
    """One destination (``target``: a network, a name, a wildcard or ``host``) and an
    optional port (None: every port)."""

    target: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> EgressRule:
        """Read ``TARGET[:PORT]``; :class:`ConfigError` says what is wrong and the forms."""
        raw = text.strip()
        target, port = _split_port(raw)
        if target is None:
            raise ConfigError([f"egress rule {text!r} is not {_RULE_FORMS}"], what="egress rule")
        try:
            return cls(_canonical_target(target), _port(port))
        except ValueError as exc:
            raise ConfigError([f"egress rule {text!r}: {exc}; give {_RULE_FORMS}"],
                              what="egress rule") from None

    @property
    def network(self) -> Network | None:
        """The network the rule names (None for a name or ``host``)."""
        if self.target == HOST or _is_name(self.target):
            return None
        return ipaddress.ip_network(self.target)

    @property
    def is_name(self) -> bool:
        return _is_name(self.target)

    def matches_name(self, name: str) -> bool:
        """Whether the rule names ``name`` (a wildcard: its subdomains)."""
        name = name.rstrip(".").lower()
        if self.target.startswith("*."):
            return name.endswith(self.target[1:])
        return name == self.target

    def matches(self, address: Address, port: int, *, host: Iterable[Address] = (),
                pinned: Mapping[str, Iterable[Address]] | None = None) -> bool:
        """Whether a connection to ``address``:``port`` is one the rule names; ``host`` are
        this host's addresses, ``pinned`` the addresses each name resolved to."""
        if self.port is not None and self.port != port:
            return False
        if self.target == HOST:
            return address in set(host)
        network = self.network
        if network is not None:
            return address in network
        return any(self.matches_name(name) and address in set(addresses)
                   for name, addresses in (pinned or {}).items())

    def __str__(self) -> str:
        target = self.target
        if self.port is None:
            return target
        if ":" in target:  # IPv6
            return f"[{target}]:{self.port}"
        return f"{target}:{self.port}"


@dataclasses.dataclass(frozen=True)
class EgressPolicy:
    """The ``allow`` and ``deny`` rules of one sandbox (see the module for what they
    decide)."""

    allow: tuple[EgressRule, ...] = ()
    deny: tuple[EgressRule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))

    @classmethod
    def parse(cls, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> EgressPolicy:
        """Rules from text (``--allow`` and ``--deny``); every bad one is reported."""
        problems: list[str] = []
        rules: dict[str, list[EgressRule]] = {"allow": [], "deny": []}
        for kind, texts in (("allow", allow), ("deny", deny)):
            for text in texts:
                try:
                    rules[kind].append(EgressRule.parse(text))
                except ConfigError as exc:
                    problems += exc.problems
        if problems:
            raise ConfigError(problems, what="egress policy")
        policy = cls(tuple(rules["allow"]), tuple(rules["deny"]))
        policy.check()
        return policy

    def check(self) -> None:
        count = len(self.allow) + len(self.deny)
        if count > MAX_RULES:
            raise ConfigError([f"{count} egress rules given; at most {MAX_RULES} allowed"],
                              what="egress policy")

    @property
    def empty(self) -> bool:
        return not self.allow and not self.deny

    def allows(self, address: Address | str, port: int, *, narrowed: bool,
               host: Iterable[Address] = (),
               pinned: Mapping[str, Iterable[Address]] | None = None) -> bool:
        """Whether the guest may connect to ``address``:``port``: the reference meaning of
        the rules, which every enforcement must agree with. ``narrowed``: mode ``policy``
        (else ``nat``)."""
        address = ipaddress.ip_address(address)
        host = list(host)
        if any(r.matches(address, port, host=host, pinned=pinned) for r in self.deny):
            return False
        if any(r.matches(address, port, host=host, pinned=pinned) for r in self.allow):
            return True
        if narrowed:
            return False
        return address not in host and not any(address in n for n in ALWAYS_DENIED)

    def allows_name(self, name: str, *, narrowed: bool) -> bool:
        """Whether the DNS forwarder answers for ``name``: a ``deny`` rule naming it wins;
        in ``policy`` mode an ``allow`` rule must name it."""
        if any(r.is_name and r.matches_name(name) for r in self.deny):
            return False
        return not narrowed or any(r.is_name and r.matches_name(name) for r in self.allow)

    def to_dict(self) -> dict[str, Any]:
        return {"allow": [str(r) for r in self.allow], "deny": [str(r) for r in self.deny]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressPolicy:
        unknown = sorted(set(data) - {"allow", "deny"})
        if unknown:
            raise ConfigError([f"unknown field {k!r}; known: allow, deny" for k in unknown],
                              what="egress policy")
        return cls.parse(list(data.get("allow") or []), list(data.get("deny") or []))

    def __str__(self) -> str:
        parts = [f"allow {r}" for r in self.allow] + [f"deny {r}" for r in self.deny]
        return ", ".join(parts) or "no rules"


def _split_port(text: str) -> tuple[str | None, str | None]:
    """``TARGET`` and ``PORT`` of ``TARGET[:PORT]`` (IPv6 in brackets when with a port)."""
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::([^:]*))?", text)
        return (match.group(1), match.group(2)) if match else (None, None)
    if text.count(":") > 1:  # a bare IPv6 address or CIDR: no port
        return text, None
    target, sep, port = text.partition(":")
    return target, (port if sep else None)


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _canonical_target(target: str) -> str:
    lowered = target.lower().rstrip(".")
    if not lowered:
        raise ValueError("the destination is empty")
    if lowered == HOST:
        return HOST
    try:
        return str(ipaddress.ip_network(lowered, strict=False))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9./]+", lowered) or ":" in lowered or "/" in lowered:
        raise ValueError(f"{target!r} is not a valid address or CIDR")
    name = lowered[2:] if lowered.startswith("*.") else lowered
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{target!r} is not a domain name with at least two labels of "
                         "letters, digits and '-' (a wildcard is '*.' before one)")
    return lowered


def _is_name(target: str) -> bool:
    return target != HOST and any(c.isalpha() for c in target) and ":" not in target
