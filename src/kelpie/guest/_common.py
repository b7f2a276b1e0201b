"""What every module of the agent shares: the wire protocol, OpError, log() and limits."""

from __future__ import annotations

import errno
import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, TypeAlias

if __name__.startswith("kelpie."):  # the host's view: kelpie.guest, kelpie.protocol
    from kelpie import protocol
else:  # in the guest: the package "guest" beside protocol.py (see agent.py)
    import protocol  # type: ignore[import-not-found, no-redef]

__all__ = [
    "DEFAULT_PATH",
    "FT",
    "HIGH_WATER",
    "OpError",
    "ProtocolError",
    "file_type",
    "log",
    "protocol",
]

FT = protocol.FrameType
ProtocolError = protocol.ProtocolError

#: Stop reading child output (and file downloads) while this many bytes wait to go out.
HIGH_WATER: Final = 1024 * 1024
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

if TYPE_CHECKING:
    #: This loop turn's poll set: ``{fd: (events, callback)}``.
    Watches: TypeAlias = dict[int, tuple[int, Callable[[int], None]]]
    #: An op handler: ``handler(request_id, fields)`` returns the REPLY, or None if
    #: the reply follows later (execs, file transfers).
    Handler: TypeAlias = Callable[[int, dict[str, Any]], dict[str, Any] | None]


def log(message: str) -> None:
    """Write one diagnostic line to stderr (the console, in the guest)."""
    try:
        sys.stderr.write(f"kelpie-agent[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


class OpError(Exception):
    """A request failed; ``code`` is an errno-style name sent to the host."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_os(cls, exc: OSError, what: str) -> OpError:
        """Describe an OSError as ``what: strerror`` with its errno name."""
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        return cls(code, f"{what}: {exc.strerror or exc}")


def file_type(mode: int) -> str:
    """Name a file type as in protocol.FILE_TYPES."""
    for check, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if check(mode):
            return name
    return "other"
