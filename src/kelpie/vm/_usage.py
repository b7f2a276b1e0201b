"""What a VM uses: the host's view of its process, and the guest's own counters.

The guest's figures come from an untrusted guest: :meth:`GuestUsage.from_reply` and
:meth:`GuestProcesses.from_reply` accept only the fields and types they expect, within
bounds, and say which field was wrong otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_PROCESSES = 4096
MAX_ARGV_ITEMS = 1024
MAX_COUNTER = 2**63 - 1


def _count(reply: Mapping[str, Any], name: str) -> int:
    value = reply.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"field {name!r} must be a non-negative integer, got {value!r}")
    return value


def _seconds(reply: Mapping[str, Any], name: str) -> float:
    value = reply.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise ValueError(f"field {name!r} must be a non-negative number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class GuestUsage:
    """The guest kernel's own counters (bytes; CPU seconds since the guest booted)."""

    cpu_seconds: float
    """Busy CPU time of every guest CPU together (user, system, interrupts, steal)."""
    cpus: int
    memory_total: int
    memory_used: int
    """MemTotal - MemAvailable: what the guest's programs and kernel hold."""
    disk_total: int
    disk_used: int
    disk_available: int
    net_rx: int
    net_tx: int
    processes: int
    uptime: float

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> GuestUsage:
        """From the agent's ``usage`` reply; ValueError names a field that is wrong."""
        tick = _count(reply, "clk_tck") or 100
        total = _count(reply, "memory_total")
        return cls(
            cpu_seconds=_count(reply, "cpu_busy_ticks") / tick,
            cpus=max(1, _count(reply, "cpus")),
            memory_total=total,
            memory_used=max(0, total - _count(reply, "memory_available")),
            disk_total=_count(reply, "disk_total"),
            disk_used=_count(reply, "disk_used"),
            disk_available=_count(reply, "disk_available"),
            net_rx=_count(reply, "net_rx"),
            net_tx=_count(reply, "net_tx"),
            processes=_count(reply, "processes"),
            uptime=_seconds(reply, "uptime"),
        )


@dataclasses.dataclass(frozen=True)
class GuestProcess:
    """One process in the guest, as ``ps`` shows it."""

    pid: int
    ppid: int
    uid: int
    state: str
    cpu_seconds: float
    memory: int
    """Resident bytes."""
    started: float
    """Seconds after the guest booted."""
    argv: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GuestProcesses:
    """The guest's process list and its clock (``uptime``: seconds since it booted)."""

    processes: tuple[GuestProcess, ...]
    uptime: float
    truncated: bool = False

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> GuestProcesses:
        """From the agent's ``processes`` reply; ValueError names what is wrong."""
        tick = _count(reply, "clk_tck") or 100
        listed = reply.get("processes")
        if not isinstance(listed, list) or len(listed) > MAX_PROCESSES:
            raise ValueError(f"field 'processes' must be a list of at most {MAX_PROCESSES}")
        processes = []
        for item in listed:
            if not isinstance(item, dict):
                raise ValueError(f"a process must be an object, got {item!r:.80}")
            argv, state = item.get("argv"), item.get("state")
            if not isinstance(argv, list) or len(argv) > MAX_ARGV_ITEMS \
                    or not all(isinstance(a, str) for a in argv):
                raise ValueError(f"process {item.get('pid')!r}: 'argv' must be a list of "
                                 "strings")
            if not isinstance(state, str) or len(state) != 1:
                raise ValueError(f"process {item.get('pid')!r}: 'state' must be one letter")
            processes.append(GuestProcess(
                pid=_count(item, "pid"), ppid=_count(item, "ppid"), uid=_count(item, "uid"),
                state=state, cpu_seconds=_count(item, "cpu_ticks") / tick,
                memory=_count(item, "rss"), started=_count(item, "start_ticks") / tick,
                argv=tuple(argv)))
        truncated = reply.get("truncated", False)
        return cls(tuple(processes), _seconds(reply, "uptime"),
                   truncated if isinstance(truncated, bool) else False)


@dataclasses.dataclass(frozen=True)
class HostUsage:
    """The host's view of a VM: its VMM process and the files it writes."""

    cpu_seconds: float
    """CPU time of the VMM process (user + system), guest work and emulation together."""
    memory: int
    """Resident bytes of the VMM process (the guest's touched RAM and the VMM's own)."""
    disk: int
    """Bytes allocated on the host by the VM's directory (its writable disk layer, logs)."""

    @classmethod
    def of_process(cls, pid: int, directory: Path | None) -> HostUsage | None:
        """From /proc/PID and the VM directory (None when the process is gone)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()
        ticks = int(fields[11]) + int(fields[12])
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                    if line.startswith("VmRSS:")), 0)
        return cls(ticks / os.sysconf("SC_CLK_TCK"), rss, allocated_bytes(directory))


def allocated_bytes(directory: Path | None) -> int:
    """Bytes the files below ``directory`` take on disk (holes excluded)."""
    if directory is None:
        return 0
    total = 0
    for dirpath, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue  # gone meanwhile
    return total
