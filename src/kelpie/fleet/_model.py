"""What the fleet knows: the hosts' reports, where each sandbox is, and what happened to it."""

from __future__ import annotations

import dataclasses
import enum

FLEET_LABEL = "kelpie.fleet"
"""Label on every sandbox the fleet made: a host reports only these."""
GENERATION_LABEL = "kelpie.fleet.generation"
"""Label holding a sandbox copy's generation. A copy made by recovery gets the next one, so
a host that comes back with an older copy is fenced: that copy is destroyed."""


class SandboxStatus(enum.StrEnum):
    """Where the fleet believes a sandbox stands (its host's own state is in ``state``)."""

    PLACING = "placing"
    """Its host was asked to create it and has not answered yet."""
    RUNNING = "running"
    """On its host, which reports it."""
    MOVING = "moving"
    """A drain is teleporting it to another host."""
    LOST = "lost"
    """Its host was declared dead, or no longer reports it; ``reason`` says which."""


class HostStatus(enum.StrEnum):
    """A host as the fleet sees it."""

    UP = "up"
    DRAINING = "draining"
    """Up, but no sandbox is placed there; a drain moves its sandboxes away."""
    DEAD = "dead"
    """No good report for longer than the bound (or Ray says its node died)."""


@dataclasses.dataclass(frozen=True)
class HostedSandbox:
    """One of the fleet's sandboxes as its host reports it."""

    id: str
    name: str
    generation: int
    state: str
    memory_mib: int = 0
    cpus: int = 0


@dataclasses.dataclass(frozen=True)
class HostReport:
    """What a host agent reports: its facts, free capacity and the fleet's sandboxes on it."""

    host: str
    address: str
    """Its daemon's URL (what a teleport targets and a sandbox handle talks to)."""
    arches: tuple[str, ...]
    backends: tuple[str, ...]
    accelerators: tuple[str, ...]
    cpus: int
    free_vcpus: int
    memory_mib: int
    free_memory_mib: int
    free_disk_bytes: int
    images: frozenset[str] = frozenset()
    """Image references and manifest digests it holds."""
    templates: dict[str, int] = dataclasses.field(default_factory=dict)
    """The templates it holds, by name and by id: the memory (MiB) each one's sandboxes
    have (a template fixes it)."""
    sandboxes: tuple[HostedSandbox, ...] = ()


@dataclasses.dataclass(frozen=True)
class Placement:
    """What a new sandbox needs from its host."""

    memory_mib: int
    cpus: int
    arch: str | None = None
    backend: str | None = None
    image: str | None = None
    template: str | None = None


@dataclasses.dataclass(frozen=True)
class FleetSandbox:
    """Where a sandbox of the fleet is and how it stands."""

    name: str
    id: str | None
    """Its id on its host (kept by teleport); None until the host answered the create."""
    host: str
    generation: int
    status: SandboxStatus
    state: str | None
    """Its state on its host at the last report (running, paused, exited...)."""
    reason: str | None
    """Why it is lost, or what last happened to it."""
    memory_mib: int
    cpus: int
    address: str | None = None
    """Its host's daemon URL."""


@dataclasses.dataclass(frozen=True)
class FleetHost:
    """A host as the fleet sees it: its last report and status."""

    host: str
    status: HostStatus
    report: HostReport | None
    last_seen: float | None
    """Monotonic time of its last good report (None: never)."""
    reason: str | None
    sandboxes: int
    """How many of the fleet's sandboxes the fleet places on it."""


@dataclasses.dataclass(frozen=True)
class FleetEvent:
    """Something the fleet did or saw: ``kind`` is placed, lost, returned, fenced, moved,
    removed, abandoned, adopted, host-dead or host-up."""

    at: float
    kind: str
    host: str
    name: str | None
    detail: str
