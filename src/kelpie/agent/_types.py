"""What the agent client hands back: its state, the agent's hello, exit statuses, file facts."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias


class ClientState(enum.Enum):
    """Where an AgentClient is in its lifecycle."""

    CONNECTED = "connected"  # stream open, hello() not yet done
    READY = "ready"  # hello() succeeded: requests allowed
    CLOSED = "closed"  # closed by us or lost; terminal


@dataclass(frozen=True)
class ExecInfo:
    """An exec the agent still holds (listed by hello)."""

    exec_id: int
    pid: int
    argv: tuple[str, ...]
    pty: bool
    running: bool


@dataclass(frozen=True)
class AgentInfo:
    """The agent's hello reply."""

    version: int
    agent_pid: int
    boot_id: str
    hostname: str
    root: str
    time_ns: int
    execs: tuple[ExecInfo, ...]


@dataclass(frozen=True)
class ExitStatus:
    """How a command ended, as the agent reports it (VM callers see
    :class:`kelpie.vm.ExecExit`: exit code ``128 + N`` for signal N, and a duration)."""

    exit_code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool


@dataclass(frozen=True)
class FileStat:
    """``stat`` of a path in the guest."""

    type: str  # one of protocol.FILE_TYPES
    size: int
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    target: str | None = None  # symlink target


@dataclass(frozen=True)
class DirEntry:
    """One entry of ``list_dir`` (symlinks are not followed)."""

    name: str
    type: str
    size: int
    mode: int


@dataclass(frozen=True)
class ResyncResult:
    """What ``resync`` changed."""

    clock_set: bool
    entropy_bytes: int
    entropy_credited: bool
    hostname: str | None


HandleEvent: TypeAlias = (
    tuple[Literal["stdout"], bytes]
    | tuple[Literal["stderr"], bytes]
    | tuple[Literal["exit"], ExitStatus]
)
"""What iterating an :class:`ExecHandle` yields: output chunks, then the exit status."""
