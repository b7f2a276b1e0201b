"""Facts about QEMU processes on this host: version, identity, run state, start failures."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

from kelpie.vm import VmState

QMP_RUNNING = "running"
QMP_DEAD = frozenset({"guest-panicked", "internal-error", "shutdown", "inmigrate"})
"""QMP run states of a guest that will not run again; any other non-running one is paused.
An attach finding ``inmigrate`` found a QEMU still waiting for the VM state of a restore or
live migration whose process died: nobody will send it."""
_HOSTFWD_FAILED = re.compile(
    r"could not set up host forwarding rule '(tcp|udp)?:([^:']*):([0-9]+)-[^']*'", re.IGNORECASE
)
_VERSIONS: dict[str, str] = {}


def start_failure_reason(workdir: Path) -> str | None:
    """Why QEMU refused to start, in plain words, when its log says so clearly; else None.

    A published port whose host port cannot be bound makes QEMU print
    ``Could not set up host forwarding rule 'tcp:127.0.0.1:8080-10.0.2.15:80'`` and exit.
    """
    try:
        log = (workdir / "qemu.log").read_text(errors="replace")
    except OSError:
        return None
    ports = [
        f"{address or '0.0.0.0'}:{number}/{protocol or 'tcp'}"
        for protocol, address, number in _HOSTFWD_FAILED.findall(log)
    ]
    if not ports:
        return None
    return (
        f"cannot publish host port {', '.join(ports)}: QEMU could not bind it (already in "
        f"use? not an address of this host? below 1024 without the privilege to bind it?)"
    )


def qmp_socket_of(pid: int) -> Path | None:
    """The QMP socket named on process ``pid``'s command line (``-qmp unix:PATH,...``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    for option, value in itertools.pairwise(argv):
        found = re.match(rb"unix:((?:[^,]|,,)+)", value) if option == b"-qmp" else None
        if found:
            return cwd / os.fsdecode(found.group(1).replace(b",,", b","))
    return None


def is_qemu_of(pid: int, qmp_socket: Path) -> bool:
    """Whether ``pid`` is the QEMU serving ``qmp_socket`` (a pid file can outlive its pid)."""
    named = qmp_socket_of(pid)
    return named is not None and os.path.realpath(named) == os.path.realpath(qmp_socket)


def state_for_qmp_status(status: str) -> VmState:
    """The VmState of a guest whose QMP ``query-status`` is ``status``."""
    if status == QMP_RUNNING:
        return VmState.RUNNING
    if status in QMP_DEAD:
        return VmState.CRASHED
    return VmState.PAUSED  # paused, prelaunch, inmigrate, suspended...: vCPUs are stopped


def qemu_version(qemu: str) -> str:
    """``7.2.0``-style version of a QEMU binary (cached per binary)."""
    if qemu not in _VERSIONS:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
        words = out.stdout.split()
        version = words[3] if len(words) > 3 and words[2] == "version" else "unknown"
        _VERSIONS[qemu] = version.split("(")[0]
    return _VERSIONS[qemu]
