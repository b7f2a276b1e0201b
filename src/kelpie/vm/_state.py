"""VM lifecycle: the states, the one transition table, and which operation each state allows.

Every backend goes through :class:`~kelpie.VmInstance`, which consults these tables, so a
state machine violation is impossible to write in a backend without this module knowing.

::

    CREATED --start--> STARTING --ok--> RUNNING <--resume-- PAUSED
       |                  |                |  \\--pause------->/ |
       |                  +--fail--> STOPPED|                    |
       |                  +--died--> CRASHED<--died--------------+
       +--restore--> STARTING          RUNNING/PAUSED --stop--> STOPPED --start--> STARTING
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class VmState(enum.StrEnum):
    """Where a VM is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


_S = VmState

TRANSITIONS: Mapping[VmState, frozenset[VmState]] = {
    _S.CREATED: frozenset({_S.STARTING, _S.STOPPED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.PAUSED, _S.STOPPED, _S.CRASHED}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.STOPPED, _S.CRASHED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPED, _S.CRASHED}),
    _S.STOPPED: frozenset({_S.STARTING}),
    _S.CRASHED: frozenset({_S.STOPPED, _S.STARTING}),
}
"""Legal ``from -> {to}`` moves. STARTING -> PAUSED is a restore that asked to stay paused."""


class Operation(enum.StrEnum):
    """The guarded operations of :class:`~kelpie.VmInstance`."""

    START = "start"
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    EXEC = "exec"
    FILES = "files"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    GROW_DISK = "grow_disk"


ALLOWED: Mapping[Operation, frozenset[VmState]] = {
    Operation.START: frozenset({_S.CREATED, _S.STOPPED}),
    Operation.STOP: frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.CRASHED, _S.STOPPED}),
    Operation.PAUSE: frozenset({_S.RUNNING}),
    Operation.RESUME: frozenset({_S.PAUSED}),
    Operation.EXEC: frozenset({_S.RUNNING}),
    Operation.FILES: frozenset({_S.RUNNING}),
    Operation.SNAPSHOT: frozenset({_S.RUNNING, _S.PAUSED, _S.STOPPED}),
    Operation.RESTORE: frozenset({_S.CREATED, _S.STOPPED}),
    Operation.GROW_DISK: frozenset({_S.RUNNING}),
}
"""The states in which each operation may be called. ``stop`` on a stopped VM is a no-op."""


def is_legal(current: VmState, target: VmState) -> bool:
    """Whether ``current -> target`` is a legal transition."""
    return target in TRANSITIONS[current]


def allowed_states(operation: Operation) -> tuple[VmState, ...]:
    """The states that allow ``operation``, in declaration order (for error messages)."""
    return tuple(s for s in VmState if s in ALLOWED[operation])
