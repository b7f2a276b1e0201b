"""What the fleet knows: the hosts' reports, where each sandbox is, and what happened to it."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Literal

from kelpie._exceptions import ConfigError
from kelpie.api import FleetView, FleetViewHost, FleetViewSandbox

FLEET_LABEL = "kelpie.fleet"
"""Label on every sandbox the fleet made: a host reports only these."""
GENERATION_LABEL = "kelpie.fleet.generation"
"""Label holding a sandbox copy's generation. A copy made by recovery gets the next one, so
a host that comes back with an older copy is fenced: that copy is destroyed."""
RECOVER_LABEL = "kelpie.fleet.recover"
"""Label holding a sandbox's recovery policy (``checkpoint/30``), so a restarted coordinator
that adopts the sandbox keeps saving it."""
MIN_RECOVER_INTERVAL = 5.0


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
    RECOVERING = "recovering"
    """Lost, and being restored on another host from its latest saved state."""


class HostStatus(enum.StrEnum):
    """A host as the fleet sees it."""

    UP = "up"
    DRAINING = "draining"
    """Up, but no sandbox is placed there; a drain moves its sandboxes away."""
    DEAD = "dead"
    """No good report for longer than the bound (or Ray says its node died)."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """How a lost sandbox comes back: from its latest ``checkpoint`` (its workspace
    directory and env: a fresh boot of its image, on any host holding the image) or
    ``snapshot`` (memory, devices and disk: as it ran, on a host of the same arch and
    backend), saved to the shared store every ``interval`` seconds."""

    kind: Literal["checkpoint", "snapshot"]
    interval: float

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("checkpoint", "snapshot"):
            problems.append(f"recover={self.kind!r}: expected 'checkpoint' or 'snapshot'")
        if not (math.isfinite(self.interval) and self.interval >= MIN_RECOVER_INTERVAL):
            problems.append(f"recover_interval={self.interval!r}: expected seconds, at "
                            f"least {MIN_RECOVER_INTERVAL:g}")
        if problems:
            raise ConfigError(problems, what="recovery policy")

    @property
    def snapshot_kind(self) -> str:
        """The kind of snapshot the host takes (the daemon's name for it)."""
        return "checkpoint" if self.kind == "checkpoint" else "full"

    def label(self) -> str:
        return f"{self.kind}/{self.interval:g}"

    @classmethod
    def from_label(cls, value: str | None) -> Recovery | None:
        """The policy a label holds; None for none (or one this version cannot read)."""
        kind, _, interval = (value or "").partition("/")
        try:
            return cls(kind, float(interval))  # type: ignore[arg-type]
        except (ValueError, ConfigError):
            return None


@dataclasses.dataclass(frozen=True)
class SavedState:
    """A sandbox's state saved in the shared store, to recover it from."""

    name: str
    generation: int
    """The generation of the copy it was taken from."""
    kind: str
    """The daemon's snapshot kind: checkpoint or full."""
    key: str
    """Its object's key in the store."""
    digest: str
    size: int
    image_digest: str | None
    """The image a host needs to restore it (None: none)."""
    backend: str
    arch: str | None = None
    """Set for a full snapshot: only a host of that arch restores it."""
    at: float = 0.0
    """The coordinator's clock when it took the save in."""


@dataclasses.dataclass(frozen=True)
class HostedSandbox:
    """One of the fleet's sandboxes as its host reports it."""

    id: str
    name: str
    generation: int
    state: str
    memory_mib: int = 0
    cpus: int = 0
    recover: Recovery | None = None


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
    guestkits: frozenset[str] = frozenset()
    """Digests of the guest kits it holds."""
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
    recover: Recovery | None = None
    saved: SavedState | None = None
    """Its latest saved state (with ``recover``)."""


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
    removed, abandoned, adopted, saved, save-failed, recovered, recovery-failed, host-dead
    or host-up."""

    at: float
    kind: str
    host: str
    name: str | None
    detail: str


def view_of(hosts: list[FleetHost], sandboxes: list[FleetSandbox], at: float) -> FleetView:
    """The fleet as its controller tells each host's daemon (what dashboards show)."""
    by_host: dict[str, list[FleetViewSandbox]] = {}
    for s in sandboxes:
        by_host.setdefault(s.host, []).append(FleetViewSandbox(
            name=s.name, status=s.status.value, state=s.state, generation=s.generation))
    return FleetView(at=at, hosts=[_host_view(h, by_host.get(h.host, [])) for h in hosts])


def _host_view(host: FleetHost, sandboxes: list[FleetViewSandbox]) -> FleetViewHost:
    report = host.report
    return FleetViewHost(
        host=host.host, status=host.status.value, reason=host.reason,
        address=report.address if report else None,
        arches=list(report.arches) if report else [],
        backends=list(report.backends) if report else [],
        cpus=report.cpus if report else 0, free_vcpus=report.free_vcpus if report else 0,
        memory_mib=report.memory_mib if report else 0,
        free_memory_mib=report.free_memory_mib if report else 0,
        free_disk_bytes=report.free_disk_bytes if report else 0, sandboxes=sandboxes)
