"""A sandbox's own network namespace: made before its VMM starts, removed after it exits.

The namespace (``kelpie-<key>``) is joined to the host by a veth pair on a /30 of
:data:`POOL` (the host end, ``kv<key>``, is the namespace's gateway: the address the
sandbox's DNS forwarder and relays listen on). The host forwards and masquerades what
leaves it (:func:`ensure_host_forwarding`); what may leave is decided inside, by the
namespace's own nftables table (:mod:`._nft`), which nothing in the guest can reach. The
namespace has no IPv6 at all.

Slots of the pool are claimed by files in :data:`RUN_DIR` under a lock, so daemons that
share the host (two state directories, as in a teleport test) never take the same one; a
slot whose namespace is gone is free again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kelpie._exceptions import KelpieError
from kelpie._fsutil import exclusive_lock
from kelpie.hostnet._nft import render
from kelpie.vm import EgressPolicy, NetworkMode
from kelpie.vm._egress import Address

POOL = ipaddress.ip_network("10.254.0.0/16")
SLOTS = POOL.num_addresses // 4
RUN_DIR = Path("/run/kelpie/net")
NETNS_DIR = Path("/run/netns")
RESOLV_DIR = Path("/etc/netns")
PREFIX = "kelpie-"


class HostNetworkError(KelpieError):
    """The host's network could not be set up for a sandbox (a namespace, veth or rule)."""


@dataclasses.dataclass(frozen=True)
class SandboxNetns:
    """The network namespace of one VM (``key``: a digest of its VM directory)."""

    key: str
    slot: int

    @property
    def name(self) -> str:
        return PREFIX + self.key

    @property
    def host_if(self) -> str:
        return "kv" + self.key

    @property
    def gateway(self) -> Address:
        """The host's end, as the namespace sees it."""
        return POOL.network_address + 4 * self.slot + 1

    @property
    def address(self) -> Address:
        """The namespace's end: where its VMM's forwarded ports listen."""
        return POOL.network_address + 4 * self.slot + 2

    def exec_prefix(self) -> list[str]:
        """Run a command in the namespace (with its own resolv.conf: the forwarder)."""
        return ["ip", "netns", "exec", self.name]

    def apply(self, mode: NetworkMode, policy: EgressPolicy,
              pinned: dict[str, list[Address]] | None = None) -> None:
        """Replace the namespace's egress rules (atomically: one nft transaction)."""
        rules = render(mode, policy, gateway=self.gateway, host=host_addresses(),
                       pinned=pinned)
        run([*self.exec_prefix(), "nft", "-f", "-"], rules)


def key_of(vm_dir: Path) -> str:
    """The namespace key of the VM whose directory is ``vm_dir`` (unique on this host)."""
    return hashlib.sha256(str(vm_dir.resolve()).encode()).hexdigest()[:12]


def create(vm_dir: Path, mode: NetworkMode, policy: EgressPolicy,
           pinned: dict[str, list[Address]] | None = None) -> SandboxNetns:
    """Make (or find, after a restart) the namespace of the VM in ``vm_dir`` with its rules
    (``pinned``: the addresses its name sets hold already)."""
    key = key_of(vm_dir)
    existing = find(key)
    if existing is not None:
        existing.apply(mode, policy, pinned)
        return existing
    ensure_host_forwarding()
    with _pool_lock():
        netns = SandboxNetns(key, _claim_slot(PREFIX + key))
        try:
            _build(netns)
            netns.apply(mode, policy)
        except BaseException:
            _destroy(netns)
            raise
    return netns


def find(key: str) -> SandboxNetns | None:
    """The namespace with this key, if it exists (and its slot)."""
    if not (NETNS_DIR / (PREFIX + key)).exists():
        return None
    for slot_file in _slot_files():
        with contextlib.suppress(OSError):
            if slot_file.read_text() == PREFIX + key:
                return SandboxNetns(key, int(slot_file.name))
    return None


def destroy(vm_dir: Path) -> None:
    """Remove the namespace of the VM in ``vm_dir`` (its veth goes with it); a no-op if none."""
    netns = find(key_of(vm_dir))
    if netns is not None:
        with _pool_lock():
            _destroy(netns)


def _build(netns: SandboxNetns) -> None:
    name, host_if = netns.name, netns.host_if
    run(["ip", "netns", "add", name])
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
          "netns", name])
    run(["ip", "addr", "add", f"{netns.gateway}/30", "dev", host_if])
    run(["ip", "link", "set", host_if, "up"])
    inside = ["ip", "-n", name]
    run([*inside, "addr", "add", f"{netns.address}/30", "dev", "eth0"])
    run([*inside, "link", "set", "eth0", "up"])
    run([*inside, "link", "set", "lo", "up"])
    run([*inside, "route", "add", "default", "via", str(netns.gateway)])
    run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
          "net.ipv6.conf.all.disable_ipv6=1"])
    resolv = RESOLV_DIR / name
    resolv.mkdir(parents=True, exist_ok=True)
    (resolv / "resolv.conf").write_text(f"nameserver {netns.gateway}\n")


def _destroy(netns: SandboxNetns) -> None:
    with contextlib.suppress(HostNetworkError):
        run(["ip", "netns", "del", netns.name])
    with contextlib.suppress(HostNetworkError):  # (gone with the namespace, normally)
        run(["ip", "link", "del", netns.host_if])
    with contextlib.suppress(OSError):
        (RESOLV_DIR / netns.name / "resolv.conf").unlink()
        (RESOLV_DIR / netns.name).rmdir()
    with contextlib.suppress(OSError):
        (RUN_DIR / str(netns.slot)).unlink()


def ensure_host_forwarding() -> None:
    """Let the host forward and masquerade what leaves the pool's namespaces (idempotent).
    The namespaces' own rules have decided before a packet gets here."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    run(["nft", "-f", "-"], (
        "table ip kelpie_nat {}\n"
        "delete table ip kelpie_nat\n"
        "table ip kelpie_nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {POOL} oifname != \"kv*\" masquerade\n"
        "  }\n"
        "}\n"))


def host_addresses() -> list[Address]:
    """Every address of the host's interfaces (what ``nat`` never reaches)."""
    out = run(["ip", "-j", "addr", "show"])
    addresses: list[Address] = []
    for interface in json.loads(out or "[]"):
        for info in interface.get("addr_info", []):
            with contextlib.suppress(KeyError, ValueError):
                addresses.append(ipaddress.ip_address(info["local"].split("%")[0]))
    return addresses


def _slot_files() -> list[Path]:
    try:
        return [p for p in RUN_DIR.iterdir() if p.name.isdigit()]
    except FileNotFoundError:
        return []


def _claim_slot(name: str) -> int:
    """A free slot of the pool, claimed for ``name`` (call under the pool lock)."""
    taken: set[int] = set()
    for slot_file in _slot_files():
        try:
            owner = slot_file.read_text()
        except OSError:
            continue
        if (NETNS_DIR / owner).exists():
            taken.add(int(slot_file.name))
        else:
            slot_file.unlink(missing_ok=True)  # its namespace is gone: free again
    for slot in range(SLOTS):
        if slot not in taken:
            fd = os.open(RUN_DIR / str(slot), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as claim:
                claim.write(name)
            return slot
    raise HostNetworkError(f"all {SLOTS} sandbox network slots of {POOL} are taken")


@contextlib.contextmanager
def _pool_lock() -> Iterator[None]:
    RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive_lock(RUN_DIR / ".lock"):
        yield


def run(command: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostNetworkError(f"{' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        raise HostNetworkError(f"{' '.join(command)} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
