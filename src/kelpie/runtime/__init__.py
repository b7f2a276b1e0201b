"""The runtime: the one owner of sandboxes (create, find, exec, files, lifecycle, logs).

:class:`Runtime` composes ``kelpie.vm`` (VM lifecycle), ``kelpie.backends`` (which
hypervisor) and ``kelpie.images`` (root filesystems), and keeps every sandbox's record in
a SQLite database under the data directory. The SDK uses it in-process; the daemon serves
it over HTTP. Neither is imported here.
"""

from kelpie.runtime._build import BuildError
from kelpie.runtime._db import SCHEMA_VERSION
from kelpie.runtime._errors import (
    AmbiguousSandbox,
    AmbiguousSnapshot,
    ExecNotFound,
    MainCommandNotRunning,
    RuntimeLocked,
    RuntimeNotOpen,
    SandboxError,
    SandboxMoving,
    SandboxNameInUse,
    SandboxNotFound,
    SandboxStateError,
    SnapshotNameInUse,
    SnapshotNotFound,
    StateDatabaseError,
)
from kelpie.runtime._events import EventFilter
from kelpie.runtime._info import EventKind, SandboxEvent, SandboxInfo, SnapshotInfo
from kelpie.runtime._moves import base_disk_mib
from kelpie.runtime._names import NAME_PATTERN, check_name, generated_name
from kelpie.runtime._restart import RestartMode, RestartPolicy
from kelpie.runtime._runtime import Runtime

__all__ = [
    "NAME_PATTERN",
    "SCHEMA_VERSION",
    "AmbiguousSandbox",
    "AmbiguousSnapshot",
    "BuildError",
    "EventFilter",
    "EventKind",
    "ExecNotFound",
    "MainCommandNotRunning",
    "RestartMode",
    "RestartPolicy",
    "Runtime",
    "RuntimeLocked",
    "RuntimeNotOpen",
    "SandboxError",
    "SandboxEvent",
    "SandboxInfo",
    "SandboxMoving",
    "SandboxNameInUse",
    "SandboxNotFound",
    "SandboxStateError",
    "SnapshotInfo",
    "SnapshotNameInUse",
    "SnapshotNotFound",
    "StateDatabaseError",
    "base_disk_mib",
    "check_name",
    "generated_name",
]
