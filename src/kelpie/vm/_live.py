"""Live migration as the VM layer knows it: what a backend that can move a running VM to
another host offers (:class:`LiveMigratable`), and what the two halves report.

The source describes its VM in a *plan* (JSON-able, backend-specific: it crosses hosts and
is read only by the same backend); the target makes a new VM wait for the migration and
answers with the :class:`LiveEndpoints` it listens on; whoever carries the bytes between
the two hosts (the teleport coordinator's relay) connects the source's QEMU to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kelpie._exceptions import SnapshotError


class LiveMigrationFailed(SnapshotError):
    """A live migration did not complete; the source VM runs on as it was."""


class LiveMigrationDidNotConverge(LiveMigrationFailed):
    """The guest dirtied memory (or disk) faster than the link carried it: the migration
    was cancelled at its deadline and the source VM runs on."""


@dataclasses.dataclass(frozen=True)
class LiveEndpoints:
    """Where the target listens (unix sockets in its VM directory)."""

    nbd_socket: Path
    """The disk's NBD server: the source mirrors its disk here (export ``root``, writable)."""
    migration_socket: Path
    """The incoming migration: the source's ``migrate`` connects here."""


@dataclasses.dataclass(frozen=True)
class LiveProgress:
    """One report of a running live migration."""

    phase: str
    """``disk`` (the mirror's first copy), ``memory`` (RAM passes; one, with the guest
    paused, where the dirty-page log misses writes) or ``switchover``."""
    done: int
    """Bytes copied so far in this phase."""
    remaining: int
    """Bytes still to copy in this phase (it may grow: the guest keeps writing)."""


@dataclasses.dataclass(frozen=True)
class LiveStats:
    """How a completed live migration went."""

    total_seconds: float
    """From the mirror's start to the migration's completion."""
    downtime_ms: int | None
    """The source's pause as the hypervisor reports it (may be missing or 0 on QEMU 7.2
    after a ``pause-before-switchover``: :attr:`switchover_ms` is measured)."""
    switchover_ms: float
    """Measured: from the guest's pause (for the switchover; on a backend whose dirty-page
    log misses writes, such as QEMU under TCG, before its RAM is copied) to the migration's
    end on the source; the target then still has to resume the guest."""
    ram_transferred: int
    """Bytes of RAM sent, zero pages counted small."""
    disk_mirrored: int
    """Bytes the disk mirror wrote to the target (its first copy and every re-copy)."""


LiveProgressCallback = Callable[[LiveProgress], None]


@runtime_checkable
class LiveMigratable(Protocol):
    """A VM that can move to another host while it runs."""

    async def live_plan_document(self) -> dict[str, Any]:
        """What the target must be told about this running VM (JSON-able)."""
        ...

    async def send_live(
        self, nbd_socket: Path, migration_socket: Path, *, converge_timeout: float,
        progress: LiveProgressCallback | None = None,
    ) -> LiveStats:
        """Move this running VM to the target behind the two sockets; it ends PAUSED (the
        target holds the guest), or RUNNING as before if it fails."""
        ...

    async def receive_live_document(self, plan: Mapping[str, Any]) -> LiveEndpoints:
        """Make this new VM wait for the migration a plan describes; where it listens."""
        ...

    async def finish_live(self, timeout: float) -> None:
        """Wait for the migration to complete, then run and resync the guest."""
        ...

    async def abort_live(self) -> None:
        """Give up an incoming migration: the VM is stopped."""
        ...
