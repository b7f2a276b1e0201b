"""Errors of the runtime layer, part of Kelpie's one error tree.

::

    KelpieError
    ├── InvalidStateError
    │   ├── SandboxStateError        the sandbox's state does not allow this (names what does)
    │   └── SandboxMoving            a teleport holds the sandbox: wait for it to end
    ├── StorageError
    │   └── StateDatabaseError       the runtime's SQLite state cannot be used (too new...)
    └── SandboxError                 anything about finding or naming sandboxes
        ├── SandboxNotFound          no sandbox by that name, id or id prefix
        ├── AmbiguousSandbox         an id prefix matches several sandboxes
        ├── SandboxNameInUse         another sandbox already has the name
        ├── MainCommandNotRunning    a sandbox's main command does not run (to signal it)
        ├── RuntimeNotOpen           the Runtime was used before open() or after close()
        └── RuntimeLocked            another runtime process owns this data directory
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from kelpie._exceptions import InvalidStateError, KelpieError, StorageError


class SandboxError(KelpieError):
    """Root of the errors about finding, naming and owning sandboxes."""


class SandboxNotFound(SandboxError, LookupError):
    """No sandbox matches the reference (name, id or id prefix)."""

    def __init__(self, ref: str, hint: str = "") -> None:
        self.ref = ref
        super().__init__(
            f"no sandbox {ref!r}: give a sandbox name, its id, or a unique id prefix of at "
            f"least 3 characters (list them with `kelpie ps -a`){hint}"
        )


class ExecNotFound(SandboxError, LookupError):
    """No streamed command with this id runs in the sandbox (it ended, or never was)."""

    def __init__(self, ref: str, exec_id: str) -> None:
        self.ref = ref
        self.exec_id = exec_id
        super().__init__(
            f"no running command {exec_id!r} in sandbox {ref!r}: it has ended, or the id "
            "is not the one its exec stream started with"
        )


class MainCommandNotRunning(SandboxError):
    """The sandbox has no main command running now (none given, or it ended)."""

    def __init__(self, sandbox: str, why: str) -> None:
        self.sandbox = sandbox
        super().__init__(f"sandbox {sandbox} {why}, so there is nothing to signal; kill "
                         "without a signal stops the sandbox itself")


class AmbiguousSandbox(SandboxError, LookupError):
    """An id prefix matches more than one sandbox; ``matches`` lists ``(id, name)``."""

    def __init__(self, ref: str, matches: Sequence[tuple[str, str]]) -> None:
        self.ref = ref
        self.matches = tuple(matches)
        listed = ", ".join(f"{sid} ({name})" for sid, name in self.matches)
        super().__init__(
            f"sandbox id prefix {ref!r} matches {len(self.matches)} sandboxes: {listed}; "
            "give more characters of the id, or the sandbox's name"
        )


class SandboxNameInUse(SandboxError):
    """Another sandbox already has this name."""

    def __init__(self, name: str, owner_id: str | None = None) -> None:
        self.name = name
        self.owner_id = owner_id
        owner = f" (sandbox {owner_id})" if owner_id else ""
        super().__init__(
            f"sandbox name {name!r} is already in use{owner}; choose another name, "
            "remove that sandbox first, or leave the name out to get a generated one"
        )


class RuntimeNotOpen(SandboxError):
    """The runtime was used before :meth:`Runtime.open` or after :meth:`Runtime.close`."""

    def __init__(self) -> None:
        super().__init__(
            "the runtime is not open; use 'async with Runtime(...)' or await runtime.open() first"
        )


class RuntimeLocked(SandboxError):
    """Another runtime (a daemon, or another program) owns this data directory."""

    def __init__(self, data_dir: Path, owner: str) -> None:
        self.data_dir = data_dir
        self.owner = owner
        who = f" ({owner})" if owner else ""
        super().__init__(
            f"the Kelpie data directory {data_dir} is in use by another runtime{who}; "
            "talk to that runtime (e.g. the daemon) or use another KELPIE_STATE_DIR"
        )


class SandboxStateError(InvalidStateError):
    """A sandbox operation is not allowed in the sandbox's current state."""

    def __init__(
        self, sandbox: str, operation: str, current: object, allowed: Iterable[object],
        hint: str = "",
    ) -> None:
        super().__init__(sandbox, operation, current, allowed)
        names = ", ".join(str(s) for s in self.allowed) or "never"
        message = (
            f"cannot {operation} sandbox {sandbox}: it is {current}; "
            f"{operation} is allowed when it is {names}{hint}"
        )
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class SandboxMoving(InvalidStateError):
    """A move to another host holds the sandbox: nothing else may change it meanwhile."""

    def __init__(self, sandbox: str, operation: str, move: str) -> None:
        self.sandbox = sandbox
        self.operation = operation
        self.move = move
        KelpieError.__init__(
            self, f"cannot {operation} sandbox {sandbox}: it is being moved ({move}); wait "
                  "for the move to finish or be rolled back (a daemon asks the target of a "
                  "move in doubt again every 30 s)")

    def __reduce__(self) -> tuple[type[SandboxMoving], tuple[str, str, str]]:
        return (type(self), (self.sandbox, self.operation, self.move))


class StateDatabaseError(StorageError):
    """The runtime's state database cannot be opened or migrated."""

    retriable = False


class SnapshotNotFound(SandboxError, LookupError):
    """No snapshot (or template) matches the reference."""

    def __init__(self, ref: str, what: str = "snapshot") -> None:
        self.ref = ref
        super().__init__(
            f"no {what} {ref!r}: give its name, its id, or a unique id prefix of at least 3 "
            f"characters (see `kelpie {what} ls`)"
        )


class AmbiguousSnapshot(SandboxError, LookupError):
    """An id prefix matches more than one snapshot."""

    def __init__(self, ref: str, matches: Sequence[tuple[str, str]]) -> None:
        self.ref = ref
        self.matches = tuple(matches)
        listed = ", ".join(f"{sid} ({name})" for sid, name in self.matches)
        super().__init__(f"snapshot id prefix {ref!r} matches {len(self.matches)} snapshots: "
                         f"{listed}; give more characters of the id, or the name")


class SnapshotNameInUse(SandboxError):
    """Another snapshot or template already has this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"snapshot name {name!r} is already in use; choose another name or "
                         "remove that snapshot first")
