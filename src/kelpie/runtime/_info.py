"""What the runtime tells callers about a sandbox: :class:`SandboxInfo`, :class:`SandboxEvent`."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path

from kelpie.runtime._restart import RestartPolicy
from kelpie.vm import SnapshotKind, VmConfig, VmState

SHORT_ID_LENGTH = 12
ON_TIMEOUT_ACTIONS = ("remove", "pause", "stop")
"""What may happen to a sandbox when its timeout passes (``on_timeout``)."""


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    """One sandbox as recorded in the runtime's state database.

    ``state`` is the last state the runtime observed. ``crash_reason`` says why a crashed
    sandbox died; ``last_error`` is the last failed lifecycle operation (e.g. a failed
    start), kept until the next successful start. ``workdir`` and ``user`` are the exec
    defaults taken from the image. ``command`` is the sandbox's main command, started when
    the sandbox starts (None: the sandbox has none, it is driven by execs alone);
    ``main_exit_code`` is how it last ended (None while it runs or if it never ran). Times
    are Unix seconds from the runtime's clock. ``image_command`` is the image's default
    command (entrypoint + cmd), if it has one; ``image_entrypoint`` its entrypoint, which a
    ``run`` command override keeps (Docker's rule).
    """

    id: str
    name: str
    backend: str
    state: VmState
    config: VmConfig
    image: str | None = None
    image_digest: str | None = None
    workdir: str | None = None
    user: str | None = None
    vm_dir: Path | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    crash_reason: str | None = None
    last_error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    command: tuple[str, ...] | None = None
    main_exit_code: int | None = None
    image_command: tuple[str, ...] | None = None
    image_entrypoint: tuple[str, ...] = ()
    main_exec_id: str | None = None
    main_output_offset: int | None = None
    """Bytes of the running main command's output that its log holds (None: unknown)."""
    expires_at: float | None = None
    """When its timeout passes (None: it has none); then ``on_timeout`` happens to it."""
    on_timeout: str = "remove"
    """``remove``, ``pause`` or ``stop`` it when its timeout passes."""
    restart: RestartPolicy = dataclasses.field(default_factory=RestartPolicy)
    restart_count: int = 0
    stop_timeout: float | None = None

    @property
    def short_id(self) -> str:
        """The first 12 characters of the id, as listings show it."""
        return self.id[:SHORT_ID_LENGTH]

    @property
    def active(self) -> bool:
        """Whether a VM is (or should be) running for this sandbox."""
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset({VmState.CREATED, VmState.STARTING, VmState.RUNNING, VmState.PAUSED})
"""States in which a sandbox has (or is getting) a VM; the others are at rest."""


class EventKind(enum.StrEnum):
    """What an event says happened to a sandbox."""

    STATE = "state"
    """Its state changed to the event's state."""
    MAIN_EXITED = "main-exited"
    """Its main command ended (the reason gives the exit code)."""
    RESTARTED = "restarted"
    """Its restart policy started the main command again."""
    RENAMED = "renamed"
    REMOVED = "removed"


@dataclasses.dataclass(frozen=True)
class SandboxEvent:
    """One recorded event of a sandbox: ``kind`` says what happened; ``state`` is the
    sandbox's state after it; ``name`` its name then; ``seq`` orders every event of the
    runtime (it only grows)."""

    sandbox_id: str
    at: float
    state: VmState
    reason: str | None = None
    seq: int = 0
    name: str = ""
    kind: EventKind = EventKind.STATE


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot the runtime keeps: a complete snapshot directory plus what it came from.

    ``sandbox`` holds what restoring needs besides the VM state: the VM config (same
    devices, same image) and the exec defaults; its id, name and state are blank.
    ``template`` marks snapshots made to start many sandboxes from. ``size`` is the bytes
    of every blob. ``path`` is set by the runtime when it hands the record out.
    """

    id: str
    name: str
    kind: SnapshotKind
    backend: str
    sandbox: SandboxInfo
    template: bool = False
    sandbox_id: str | None = None
    sandbox_name: str | None = None
    image: str | None = None
    image_digest: str | None = None
    size: int = 0
    created_at: float = 0.0
    path: Path | None = None

    @property
    def short_id(self) -> str:
        """The first 12 characters of the id."""
        return self.id[:SHORT_ID_LENGTH]
