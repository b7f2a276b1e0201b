"""Kelpie's one error tree.

Every error Kelpie raises derives from :class:`KelpieError`. Backend-specific failures
(QMP, Firecracker's HTTP API, a registry, the guest agent) are translated into this tree at
the backend boundary with ``raise ... from exc``; ``asyncio.CancelledError`` is never
wrapped.

::

    KelpieError                      retriable / requires_recreate flags on every error
    ├── ConfigError                  invalid VmConfig; .problems lists every problem
    ├── InvalidStateError            operation not allowed in the VM's current state
    ├── UnsupportedOperation         the backend cannot do this; names who can
    ├── BackendUnavailable           no backend fits this host; .rejections says why
    │   └── UnknownBackend           no backend has that name (also a ConfigError)
    ├── VmError                      something went wrong in or with a VM
    │   ├── BootError                the VM did not come up            (retriable)
    │   ├── VmCrashed                the VM died under us              (requires_recreate)
    │   ├── AgentError               the guest agent misbehaved or went away
    │   ├── ExecError                a command could not be run
    │   │   └── ExecTimeout          a command ran past its timeout (partial output kept)
    │   └── GuestFileError           a file operation in the guest failed (.code: ENOENT...)
    ├── SnapshotError
    │   ├── SnapshotCorrupted        a blob or the manifest does not match its digest
    │   ├── SnapshotIncompatible     cannot be restored on this host; .reasons lists why
    │   └── SnapshotTooLarge         over the configured size limit
    ├── StorageError                 reading or writing the host's storage failed (retriable)
    ├── NetworkError                 a host <-> guest or host <-> host link failed (retriable)
    │   └── PeerUnreachable          a peer daemon did not answer; the request may have
    │                                been carried out or not
    └── TeleportError                moving a sandbox to another host
        ├── TeleportRefused          the target cannot take it; nothing was paused
        ├── TeleportAborted          rolled back: the sandbox runs on the source as before
        ├── TeleportInDoubt          the target cannot be asked whether it took the sandbox;
        │                            the source keeps it paused until it can (retriable)
        └── TransferOffsetMismatch   a chunk was sent for the wrong offset (.received says
                                     where to resume)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class KelpieError(Exception):
    """Root of every error Kelpie raises.

    ``retriable`` says the same call may succeed if repeated; ``requires_recreate`` says the
    VM is unusable and must be replaced (stopped and created again, or restored).
    """

    retriable: bool = False
    requires_recreate: bool = False


class ConfigError(KelpieError, ValueError):
    """A :class:`~kelpie.VmConfig` (or other input) is invalid.

    ``problems`` lists every problem found, not only the first.
    """

    def __init__(self, problems: Sequence[str], *, what: str = "VM configuration") -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({count} problem{'s' if count != 1 else ''}):\n{lines}")


class InvalidStateError(KelpieError):
    """An operation was called in a state that does not allow it."""

    def __init__(self, vm_id: str, operation: str, current: object, allowed: Iterable[object]):
        self.vm_id = vm_id
        self.operation = operation
        self.current = current
        self.allowed = tuple(allowed)
        names = ", ".join(str(s) for s in self.allowed) or "none"
        super().__init__(
            f"cannot {operation} VM {vm_id}: it is {current}; {operation} is allowed when {names}"
        )


class UnsupportedOperation(KelpieError):
    """The backend cannot perform this operation at all."""

    def __init__(self, backend: str, operation: str, supported_by: Iterable[str] = ()) -> None:
        self.backend = backend
        self.operation = operation
        self.supported_by = tuple(supported_by)
        hint = (
            f"; backends that support it: {', '.join(self.supported_by)}"
            if self.supported_by
            else ""
        )
        super().__init__(f"backend {backend!r} does not support {operation}{hint}")


class BackendUnavailable(KelpieError):
    """No backend can be used: unknown name, or none of the probed ones runs on this host."""

    def __init__(self, message: str, rejections: Sequence[tuple[str, str]] = ()) -> None:
        self.rejections: tuple[tuple[str, str], ...] = tuple(rejections)
        detail = "".join(f"\n  - {name}: {why}" for name, why in self.rejections)
        super().__init__(message + detail)


class UnknownBackend(BackendUnavailable, ConfigError):
    """The backend name is not one Kelpie knows: bad input, not a host problem."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.rejections = ()
        ConfigError.__init__(self, [f"unknown backend {name!r}; known backends: "
                                    f"{', '.join(known) or 'none'}"], what="backend")


class VmError(KelpieError):
    """Something went wrong in or with a VM."""


class BootError(VmError):
    """The VM did not come up (hypervisor failed, guest agent never answered)."""

    retriable = True


class VmCrashed(VmError):
    """The VM died while in use; it must be recreated or restored."""

    requires_recreate = True


class AgentError(VmError):
    """The guest agent sent something invalid, refused a request, or disconnected."""

    retriable = True


class ExecError(VmError):
    """A command could not be run in the guest."""


class ExecTimeout(ExecError):
    """A command ran past its timeout and was killed with its whole process group.

    The output produced before the kill is kept in ``stdout`` and ``stderr``.
    """

    def __init__(self, argv: Sequence[str], timeout: float, stdout: bytes, stderr: bytes):
        self.argv = tuple(argv)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"command {list(self.argv)!r} timed out after {timeout:g}s and was killed")


class GuestFileError(VmError):
    """A file operation in the guest failed; ``code`` is the errno name (``ENOENT``...)."""

    def __init__(self, path: str, code: str, message: str) -> None:
        self.path = path
        self.code = code
        super().__init__(f"{path}: {message} ({code})")


class SnapshotError(KelpieError):
    """Creating, storing or restoring a snapshot failed."""


class SnapshotCorrupted(SnapshotError):
    """A snapshot's manifest or one of its blobs does not match its recorded digest/size."""


class SnapshotIncompatible(SnapshotError):
    """A snapshot cannot be restored on this host; ``reasons`` lists every mismatch."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"snapshot cannot be restored here:\n{lines}")


class SnapshotTooLarge(SnapshotError):
    """The snapshot would exceed the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"snapshot is {size} bytes, over the limit of {limit} bytes")


class StorageError(KelpieError):
    """Reading or writing the host's storage failed."""

    retriable = True


class NetworkError(KelpieError):
    """A link (host to guest agent, or host to host) dropped, stalled or was partitioned."""

    retriable = True


class PeerUnreachable(NetworkError):
    """A peer daemon (a teleport's target) did not answer: the request may or may not
    have been carried out there."""


class TeleportError(KelpieError):
    """Root of the errors of moving a sandbox to another host."""


class TeleportRefused(TeleportError):
    """The target cannot take the sandbox (checked before anything paused); ``reasons``
    lists every reason."""

    def __init__(self, reasons: Iterable[str], *, target: str = "the target") -> None:
        self.reasons = tuple(reasons)
        self.target = target
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{target} cannot take the sandbox:\n{lines}")

    def __reduce__(self) -> tuple[type[TeleportRefused], tuple[tuple[str, ...]], dict[str, str]]:
        return (type(self), (self.reasons,), {"target": self.target})


class TeleportAborted(TeleportError):
    """The teleport was rolled back: the sandbox is where it was, as it was."""


class TeleportInDoubt(TeleportError):
    """The target may have taken the sandbox but cannot be asked: the source keeps its copy
    paused (never running twice) and settles it when the target answers again."""

    retriable = True


class TransferOffsetMismatch(TeleportError):
    """A chunk of a teleport's blob came for the wrong offset; ``received`` is where the
    target stands (resume from there)."""

    def __init__(self, name: str, offset: int, received: int) -> None:
        self.name = name
        self.offset = offset
        self.received = received
        super().__init__(f"blob {name}: a chunk came for offset {offset}, but {received} "
                         f"bytes are received; resume at {received}")

    def __reduce__(self) -> tuple[type[TransferOffsetMismatch], tuple[str, int, int]]:
        return (type(self), (self.name, self.offset, self.received))


__all__ = [
    "PeerUnreachable",
    "TeleportAborted",
    "TeleportError",
    "TeleportInDoubt",
    "TeleportRefused",
    "TransferOffsetMismatch",
]
"""The errors only this module exports (the rest reach users through ``kelpie.vm``)."""
