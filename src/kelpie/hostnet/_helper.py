"""The network helper of one sandbox: its DNS forwarder and its published ports' relays.

It runs on the host (``python -m kelpie.hostnet VM_DIR``) for as long as the sandbox's VMM
does, a process of its own like the VMM, so a daemon restart touches neither. It reads
:data:`SETTINGS` from the VM directory (and again on SIGHUP: a changed policy), tells its
starter it is ready on file descriptor 3, and keeps what the forwarder pinned in
:data:`PINNED` (so new rules keep the addresses already answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kelpie._fsutil import write_atomic
from kelpie.hostnet._dns import DnsForwarder, upstream_servers
from kelpie.hostnet._netns import SandboxNetns, run
from kelpie.hostnet._nft import TABLE, name_sets
from kelpie.hostnet._ports import relay_port
from kelpie.vm import EgressPolicy, NetworkMode, PortMapping
from kelpie.vm._egress import Address

SETTINGS = "net.json"
PINNED = "net-pinned.json"
READY_FD = 3

log = logging.getLogger("kelpie.hostnet")


def write_settings(vm_dir: Path, netns: SandboxNetns, mode: NetworkMode,
                   policy: EgressPolicy, ports: Sequence[PortMapping]) -> None:
    """What the helper of the VM in ``vm_dir`` serves (written atomically)."""
    data = {"netns": {"key": netns.key, "slot": netns.slot}, "mode": mode.value,
            "egress": policy.to_dict(), "ports": [p.to_dict() for p in ports],
            "upstream": os.environ.get("KELPIE_DNS_UPSTREAM")}
    write_atomic(vm_dir / SETTINGS, json.dumps(data).encode())


def read_pinned(vm_dir: Path) -> dict[str, list[Address]]:
    """The addresses the helper pinned so far, by set name."""
    try:
        data = json.loads((vm_dir / PINNED).read_text())
        return {name: [ipaddress.ip_address(a) for a in addresses]
                for name, addresses in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


class Helper:
    """The running helper of the VM in ``vm_dir``."""

    def __init__(self, vm_dir: Path) -> None:
        self._vm_dir = vm_dir
        self.mode = NetworkMode.NAT
        self.policy = EgressPolicy()
        self.netns = SandboxNetns("", 0)
        self.ports: list[PortMapping] = []
        self.upstream: str | None = None
        self._pinned = read_pinned(vm_dir)
        self.load()

    def load(self) -> None:
        data: dict[str, Any] = json.loads((self._vm_dir / SETTINGS).read_text())
        self.netns = SandboxNetns(str(data["netns"]["key"]), int(data["netns"]["slot"]))
        self.mode = NetworkMode(data["mode"])
        self.policy = EgressPolicy.from_dict(data["egress"])
        self.ports = [PortMapping.from_dict(p) for p in data["ports"]]
        self.upstream = data.get("upstream")

    async def pin(self, name: str, addresses: list[Address]) -> None:
        """Add what ``name`` resolved to, to the sets of the allow rules naming it."""
        added = False
        for named in name_sets(self.policy):
            if not named.rule.matches_name(name):
                continue
            for set_name, version in ((named.v4, 4), (named.v6, 6)):
                new = [a for a in addresses if a.version == version
                       and a not in self._pinned.get(set_name, [])]
                if not new:
                    continue
                elements = ", ".join(str(a) for a in new)
                await asyncio.to_thread(
                    run, [*self.netns.exec_prefix(), "nft", "add", "element", "inet", TABLE,
                           set_name, f"{{ {elements} }}"])
                self._pinned.setdefault(set_name, []).extend(new)
                added = True
        if added:
            pinned = json.dumps({k: [str(a) for a in v] for k, v in self._pinned.items()})
            await asyncio.to_thread(write_atomic, self._vm_dir / PINNED, pinned.encode())

    async def serve(self, resolv_conf: str) -> None:
        forwarder = DnsForwarder(lambda: (self.mode, self.policy),
                                 upstream_servers(resolv_conf, self.upstream), self.pin)
        servers = await forwarder.serve(str(self.netns.gateway))
        for mapping in self.ports:
            servers.append(await relay_port(mapping, str(self.netns.address)))
        _tell_ready()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    def _reload(self) -> None:
        try:
            self.load()
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot reload %s: %s (keeping the rules before)", SETTINGS, exc)


def _tell_ready() -> None:
    with contextlib.suppress(OSError):
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m kelpie.hostnet VM_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        helper = Helper(Path(args[0]))
        asyncio.run(helper.serve(Path("/etc/resolv.conf").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"kelpie network helper: {exc}", file=sys.stderr)
        return 1
    return 0
