"""What the guest uses, from its own kernel: CPU, memory, disk, network, processes."""

from __future__ import annotations

import os

from ._common import OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

#: The most processes one ``processes`` reply lists (a fork bomb must not make a huge reply).
MAX_PROCESSES: Final = 4096
#: The most bytes of one process's command line a reply carries.
MAX_ARGV_BYTES: Final = 4096


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _cpu_ticks() -> tuple[int, int]:
    """(busy, idle) clock ticks of every CPU since boot, from /proc/stat."""
    fields = [int(v) for v in _read("/proc/stat").split("\n", 1)[0].split()[1:9]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, idle + iowait


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _network() -> tuple[int, int]:
    """(received, sent) bytes of every interface but loopback, from /proc/net/dev."""
    rx = tx = 0
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, counters = line.partition(":")
        values = counters.split()
        if name.strip() != "lo" and len(values) >= 9:
            rx += int(values[0])
            tx += int(values[8])
    return rx, tx


def guest_pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def op_usage(root: str, rid: int, f: dict[str, Any]) -> dict[str, Any]:
    """The guest's counters: CPU ticks, memory, the root file system, network, processes."""
    try:
        busy, idle = _cpu_ticks()
        memory = _meminfo()
        disk = os.statvfs(root)
        rx, tx = _network()
        uptime = float(_read("/proc/uptime").split()[0])
        processes = len(guest_pids())
    except (OSError, ValueError, IndexError) as exc:
        raise OpError("EIO", f"cannot read the guest's counters: {exc}") from None
    return {
        "clk_tck": os.sysconf("SC_CLK_TCK"),
        "cpus": os.cpu_count() or 1,
        "cpu_busy_ticks": busy,
        "cpu_idle_ticks": idle,
        "memory_total": memory.get("MemTotal", 0),
        "memory_available": memory.get("MemAvailable", memory.get("MemFree", 0)),
        "disk_total": disk.f_blocks * disk.f_frsize,
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
        "disk_available": disk.f_bavail * disk.f_frsize,
        "net_rx": rx,
        "net_tx": tx,
        "processes": processes,
        "uptime": uptime,
    }


def _process(pid: int, page_size: int) -> dict[str, Any] | None:
    """One process from /proc/PID (None when it is gone)."""
    try:
        stat = _read(f"/proc/{pid}/stat")
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(MAX_ARGV_BYTES)
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ")".
    head, _, rest = stat.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    if len(fields) < 22:
        return None
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    return {
        "pid": pid,
        "ppid": int(fields[1]),
        "uid": uid,
        "state": fields[0],
        "cpu_ticks": int(fields[11]) + int(fields[12]),
        "start_ticks": int(fields[19]),
        "rss": int(fields[21]) * page_size,
        "argv": argv or [f"[{comm}]"],
    }


def op_processes(rid: int, f: dict[str, Any]) -> dict[str, Any]:
    """Every process of the guest (at most MAX_PROCESSES), as ``ps`` would show them."""
    try:
        pids = guest_pids()
        uptime = float(_read("/proc/uptime").split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise OpError("EIO", f"cannot list the guest's processes: {exc}") from None
    page_size = os.sysconf("SC_PAGE_SIZE")
    listed: list[dict[str, Any]] = []
    for pid in pids:
        if len(listed) == MAX_PROCESSES:
            break
        process = _process(pid, page_size)
        if process is not None:
            listed.append(process)
    return {"clk_tck": os.sysconf("SC_CLK_TCK"), "uptime": uptime, "processes": listed,
            "truncated": len(pids) > MAX_PROCESSES}
