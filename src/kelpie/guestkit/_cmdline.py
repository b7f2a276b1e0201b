"""The kernel command line a Kelpie guest boots with: base arguments plus init's settings.

Base arguments, each measured under QEMU TCG on the microvm machine:

* `console=ttyS0 quiet`: kernel messages off the (slow, emulated) serial port.
* `panic=-1`: reboot at once on panic; with QEMU's `-no-reboot`, QEMU exits instead of
  leaving a dead VM running.
* `cryptomgr.notests`: skip the kernel's crypto self-tests (~0.2 s of boot under TCG).
* `tsc_early_khz=<host TSC kHz>`: without it the kernel calibrates the TSC against the
  emulated PIT, which fails now and then under TCG (slow port I/O); the kernel then waits
  for timer ticks that never come and hangs in `calibrate_delay` before printing anything
  (about 1 boot in 10, more on a loaded host). Under TCG the guest's TSC is the host's, so
  the host's frequency is the right value. Left out when it cannot be found.
* `tsc=reliable`: use the TSC as clocksource (the cross-CPU sync check fails spuriously
  under TCG, leaving jiffies: 4 ms clock resolution and a syscall for every clock read).
  Only with `tsc_early_khz`.

The `kelpie.*` settings are read by the guest's /init (init.sh).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

BASE_KERNEL_ARGS = ("quiet", "panic=-1", "cryptomgr.notests")
#: The virtio-serial port name the agent listens on (`virtserialport,name=...`).
AGENT_PORT_NAME = "kelpie.agent"

_SAFE_WORD = re.compile(r"[A-Za-z0-9_./+@=-]+\Z")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,36}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


@dataclasses.dataclass(frozen=True)
class GuestShare:
    """A virtio-9p share (QEMU `mount_tag` = `tag`) that init mounts at `path`."""

    tag: str
    path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class GuestNetwork:
    """Static IPv4 set-up of the guest's eth0: `address` is `A.B.C.D/PREFIX`."""

    address: str
    gateway: str | None = None
    dns: str | None = None


def _check_path(what: str, path: str) -> None:
    if not path.startswith("/") or ".." in path.split("/") or not _SAFE_WORD.match(path):
        raise ValueError(
            f"{what} {path!r} must be an absolute path without '..', using only letters, "
            "digits and ._/+@=- (it travels on the kernel command line)"
        )


def _share_arg(shares: Sequence[GuestShare]) -> str:
    specs = []
    for share in shares:
        if not _TAG.match(share.tag):
            raise ValueError(f"share tag {share.tag!r} must be 1-36 of letters, digits, '_.-'")
        _check_path("share path", share.path)
        if share.path.rstrip("/") == "":
            raise ValueError("a share cannot be mounted over the guest's root '/'")
        specs.append(f"{share.tag}:{share.path}:{'ro' if share.read_only else 'rw'}")
    return ",".join(specs)


def _network_arg(network: GuestNetwork) -> str:
    interface = ipaddress.IPv4Interface(network.address)
    if "/" not in network.address:
        raise ValueError(f"network address {network.address!r} needs a prefix, e.g. /24")
    parts = [str(interface)]
    parts.append(str(ipaddress.IPv4Address(network.gateway)) if network.gateway else "")
    if network.dns:
        parts.append(str(ipaddress.IPv4Address(network.dns)))
    return ",".join(parts).rstrip(",")


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, or None when it cannot be known reliably."""
    try:
        return tsc_khz_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def tsc_khz_from_cpuinfo(cpuinfo: str) -> int | None:
    """The TSC frequency from the text of `/proc/cpuinfo`, or None if it is not in there.

    "cpu MHz" is the kernel's `cpu_khz`, which equals the TSC frequency unless the CPU
    reports its current clock instead (the `aperfmperf` flag), as bare metal with frequency
    scaling does. Hosts that are themselves VMs (`tsc_known_freq`, like the reference
    host) give it exactly.
    """
    first_cpu = cpuinfo.split("\n\n", 1)[0]
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in first_cpu.splitlines())
    }
    flags = set(fields.get("flags", "").split())
    if "tsc" not in flags or "constant_tsc" not in flags:
        return None
    if "aperfmperf" in flags and "tsc_known_freq" not in flags:
        return None
    try:
        khz = round(float(fields["cpu MHz"]) * 1000)
    except (KeyError, ValueError):
        return None
    return khz if khz > 0 else None


def kernel_cmdline(
    *,
    hostname: str | None = None,
    root_device: str | None = None,
    shares: Sequence[GuestShare] = (),
    network: GuestNetwork | None = None,
    tsc_khz: int | None = None,
    debug: bool = False,
    agent_vsock_port: int | None = None,
    console: str = "ttyS0",
    extra: Sequence[str] = (),
) -> str:
    """The full kernel command line for a guest booted from a Kelpie guest kit.

    `root_device` (e.g. `/dev/vda`) is an ext4 disk the agent chroots into; `shares` are
    mounted below it (or below `/` without one). `tsc_khz` defaults to `host_tsc_khz()`;
    pass 0 to leave the TSC arguments out. `debug` makes init log each step.
    `console` is the serial console's device (`ttyAMA0` on aarch64's `virt`).
    `agent_vsock_port` makes the agent listen on that vsock port (VMMs whose host end is a
    vsock device, e.g. Firecracker's hybrid vsock) instead of the virtio-serial port. Raises
    ValueError for a value that cannot travel on the command line.
    """
    args = [f"console={console}", *BASE_KERNEL_ARGS]
    khz = host_tsc_khz() if tsc_khz is None else tsc_khz
    if khz:
        args += [f"tsc_early_khz={khz}", "tsc=reliable"]
    if hostname is not None:
        if not _HOSTNAME.match(hostname):
            raise ValueError(f"hostname {hostname!r} is not a valid host name")
        args.append(f"kelpie.hostname={hostname}")
    if root_device is not None:
        _check_path("root device", root_device)
        args.append(f"kelpie.root={root_device}")
    if shares:
        args.append(f"kelpie.mounts={_share_arg(shares)}")
    if network is not None:
        args.append(f"kelpie.net={_network_arg(network)}")
    if agent_vsock_port is not None:
        if not 0 < agent_vsock_port < 2**32 - 1:
            raise ValueError(f"vsock port {agent_vsock_port} is not a port (1 to 2^32-2)")
        args.append(f"kelpie.vsock={agent_vsock_port}")
    if debug:
        args.append("kelpie.debug=1")
    for arg in extra:
        if not arg or any(c.isspace() for c in arg):
            raise ValueError(f"extra kernel argument {arg!r} must be one non-empty word")
    return " ".join([*args, *extra])
