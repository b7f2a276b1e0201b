"""Kelpie agent wire protocol: one definition of every frame and message.

This module is shared by the host (``kelpie.agent``) and the guest agent (the
``kelpie/guest/`` package, started by ``kelpie/guest/agent.py``). It is copied verbatim
into the guest, where it is imported as the top-level module ``protocol`` by an
interpreter started with ``python3 -S``. It must therefore use the standard library only,
and only its cheap corners (``struct``, and ``json``'s C half; ``typing`` is imported
for type checkers only).

Transport
=========
One ordered, reliable byte stream per host connection: a virtio-serial port
(``/dev/vportNpM`` in the guest, a unix socket on the host), a vsock
connection, or a unix socket when the agent runs on the host for tests.
Everything is multiplexed on that stream by *request id*.

Frame format
============
Every frame is a 13-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       4     magic        b"\\xf5KLP"  (0xF5 never occurs in UTF-8 text)
    4       4     length       payload length, uint32 big-endian,
                               at most MAX_FRAME_PAYLOAD (256 KiB)
    8       1     type         FrameType value, see below
    9       4     request id   uint32 big-endian; 0 = "the connection itself"
    13      ...   payload

i.e. ``struct.Struct(">4sIBI")``. Data is carried raw (no base64).

Frame types::

    REQUEST   1  host -> agent  JSON object {"op": NAME, ...fields}
    EVENT     2  agent -> host  JSON object, non-terminal (e.g. exec "started")
    REPLY     3  agent -> host  JSON object, terminal success of the request
    ERROR     4  agent -> host  JSON {"code": "ENOENT", "message": "..."},
                                terminal failure of the request; with
                                request id 0 it reports a frame that could not
                                be attributed to a request (garbage, oversized
                                frame) and ends nothing
    STDIN     5  host -> agent  raw bytes for an exec; empty payload = EOF
    STDOUT    6  agent -> host  raw bytes from an exec (a PTY's output too)
    STDERR    7  agent -> host  raw bytes from an exec
    FILE_DATA 8  both           raw file chunk: write_file upload (host ->
                                agent, empty payload = end of file) and
                                read_file download (agent -> host, the end is
                                the REPLY)

Every request gets exactly one terminal frame (REPLY or ERROR) on its request
id; frames of different requests interleave freely. The host picks request
ids (unique among its open requests, never 0). Data frames for a request that
is no longer open are dropped silently (a normal race, e.g. stdin for an exec
that just exited).

Resynchronisation
=================
A sender never emits a frame larger than MAX_FRAME_PAYLOAD, so a header with
a bad magic, an unknown type or an oversized length is corruption: the
receiver reports it (the agent: one ERROR frame with request id 0 per run
of garbage) and scans forward to the next magic marker. A burst of random bytes
followed by a valid frame therefore costs one error, then the valid frame is
served normally. A frame whose header is valid but whose JSON is malformed,
whose op is unknown or whose fields are missing gets an ERROR on its own
request id; the connection stays usable.

Session
=======
The first request on a connection must be ``hello`` with the host's
``version``; the agent replies with its own version, pid, boot id, hostname
and the execs that survived earlier connections. A version mismatch is
refused with code ``EPROTONOSUPPORT``; the hello request and reply keep their
shape across protocol versions so that a mismatch can always be reported.

Execs outlive connections. When the connection ends (or a new ``hello``
starts a new session) the session's file transfers are aborted and its execs
are *detached*: they keep running, their unread output waits in the kernel
pipe (a command blocks once it fills), their exit status is kept (the 64
most recent), and ``hello`` lists them until a host ``attach``-es.

Flow control: the agent never blocks on the stream. It stops reading a
command's output while more than 1 MiB waits to go to the host, and stops
reading the stream while more than 1 MiB of stdin waits for commands.

Requests (op: fields, ``?`` = optional with the default shown)
==============================================================
See REQUEST_FIELDS for the machine-readable version used by both sides.

``hello``       version
                -> REPLY {version, agent_pid, boot_id, hostname, root,
                          time_ns, execs: [{exec_id, pid, argv, pty, running}]}
``ping``        -> REPLY {time_ns}
``exec``        argv, env?={}, cwd?="/", user?=null (name or uid),
                stdin?=false (true: host streams STDIN frames, else
                /dev/null), timeout?=null (seconds; SIGKILL to the whole
                process group), pty?=false, rows?=24, cols?=80,
                replay?=0 (bytes of its latest output to keep, up to 1 MiB,
                for an attach to replay: output in flight when the host
                changes is lost otherwise)
                -> EVENT {event: "started", exec_id, pid, offset}
                   (held up to 10 ms: a command that writes output or ends
                   sooner has it sent in the same write as that)
                -> STDOUT/STDERR frames
                -> REPLY {exec_id, exit_code, signal, timed_out}
                   (exit_code is null when killed by a signal)
                   An exec ends when its process has exited and its output
                   pipes are drained (EOF, or a short grace when background
                   processes keep them open).
``attach``      exec_id, offset?=null -> like exec, for an exec started on an
                earlier connection: EVENT started, remaining output, REPLY.
                ``offset``: the output bytes the host has already; what the
                exec kept after it (see replay) comes first. The started
                event's ``offset`` says where the output that follows starts
                (above the one asked for when some was not kept).
``signal``      target (request id of an exec), signum, group?=false
                -> REPLY {}
``resize``      target, rows, cols -> REPLY {}
``cancel``      target -> REPLY {cancelled: bool}; a cancelled file transfer
                ends with ERROR ECANCELED, a cancelled exec is killed.
``read_file``   path -> FILE_DATA frames -> REPLY {size}
``write_file``  path, mode?=0o644 -> (host sends FILE_DATA frames, then an
                empty one) -> REPLY {size}. Atomic: temp file + fsync +
                rename.
``stat``        path, follow_symlinks?=true
                -> REPLY {type, size, mode, uid, gid, mtime_ns, nlink, target?}
``list``        path -> EVENT {entries: [...]}* -> REPLY {entries: [...]}; the
                listing is the concatenation (batches keep frames small);
                entry = {name, type, size, mode}, symlinks not followed
``mkdir``       path, parents?=false, mode?=0o755 -> REPLY {}
``remove``      path, recursive?=false -> REPLY {}
``resync``      epoch_ns?=null, entropy?=null (hex string), hostname?=null
                -> REPLY {clock_set, entropy_bytes, entropy_credited,
                          hostname, rng_reseeded}
                After a snapshot restore: set the clock, mix in (and credit)
                the entropy, then make the kernel CRNG reseed at once so that
                clones of one snapshot stop sharing RNG output; rename the host.
``usage``       -> REPLY {clk_tck, cpus, cpu_busy_ticks, cpu_idle_ticks,
                          memory_total, memory_available, disk_total, disk_used,
                          disk_available, net_rx, net_tx, processes, uptime}
                The guest kernel's counters (bytes; ticks since boot; the disk is
                the file system of the agent's root; the network every interface
                but loopback).
``processes``   -> REPLY {clk_tck, uptime, truncated, processes: [{pid, ppid, uid,
                          state, cpu_ticks, start_ticks, rss, argv}]}
                At most 4096 processes, argv cut at 4096 bytes.
``walk``        path?="/" -> EVENT {entries: [...]}* -> REPLY {entries: [...]}
                Every entry below path, depth first, not crossing into other
                mounted file systems: {path, type, mode, uid, gid, size,
                mtime_ns, ctime_ns, target?, mount?} (mount: another file
                system is mounted there, not walked; the listing is the
                concatenation; a commit compares it with the image).
``mark``        -> REPLY {mark, entries}
                Remember every entry of the root file system (type, mode, owner,
                size, times, inode, link target) for the next ``layer``.
``layer``       mark -> FILE_DATA* -> REPLY {size, mark, entries}
                What changed since ``mark`` (the last one taken) as an OCI layer
                tar: new or changed entries, ``.wh.`` whiteouts for the topmost
                paths gone; other mounts and /etc/hostname, hosts, resolv.conf
                left out. The mark moves to now (REPLY's mark). ESTALE for an
                older mark.
``sweep``       keep?=[] -> REPLY {killed, left}
                SIGSTOP then SIGKILL every process but init, the agent, kernel
                threads and the pids in keep, in rounds until none is left (a
                fork bomb cannot outrun it): what a build step left running.
                left: processes still there after the last round (not zombies).
``grow_fs``     size -> REPLY {size, device_size}
                Grow the (ext4) file system of the agent's root online to
                ``size`` bytes, after the host made its disk bigger; EAGAIN
                while the guest kernel has not seen the new disk size yet.
``shutdown``    poweroff?=true -> REPLY {poweroff: bool} then the agent kills
                its commands and exits (and powers the VM off, but only when
                it serves a virtio-serial device)

Paths are absolute paths inside the agent's root (``--root``). ``type`` is
one of FILE_TYPES. Error codes are errno names (ENOENT, EACCES, EISDIR,
ENOTDIR, ENOTEMPTY, EEXIST, EINVAL, ...) plus EPROTO for protocol misuse.
"""

from __future__ import annotations

import struct

# CPython's C half of ``json``, which ``json.dumps`` and ``json.loads`` use themselves. The
# guest agent's start is on every boot's path, and importing ``json`` costs ~150 ms of it
# under TCG (it imports ``re`` and compiles its patterns); this needs nothing.
from _json import encode_basestring as _json_str
from _json import make_encoder as _json_encoder
from _json import make_scanner as _json_scanner

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, Final

__all__ = [
    "DATA_CHUNK",
    "ERROR_CODES",
    "FILE_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAME_PAYLOAD",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "REQUEST_FIELDS",
    "REQUIRED",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Garbage",
    "ProtocolError",
    "decode_json",
    "encode_frame",
    "encode_json",
    "parse_request",
]

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"\xf5KLP"
HEADER: Final = struct.Struct(">4sIBI")
HEADER_SIZE: Final = HEADER.size
MAX_FRAME_PAYLOAD: Final = 256 * 1024
#: Preferred size of one data chunk (file transfer, pipe read).
DATA_CHUNK: Final = 64 * 1024
MAX_REQUEST_ID: Final = 0xFFFFFFFF

#: The most pids a ``sweep`` request may ask to keep.
MAX_PIDS: Final = 4096

#: File types reported by ``stat`` and ``list``.
FILE_TYPES: Final = ("file", "dir", "symlink", "char", "block", "fifo", "socket", "other")


class FrameType:
    """Frame type byte values (a plain class: ``enum`` is kept out of the guest)."""

    REQUEST: Final = 1
    EVENT: Final = 2
    REPLY: Final = 3
    ERROR: Final = 4
    STDIN: Final = 5
    STDOUT: Final = 6
    STDERR: Final = 7
    FILE_DATA: Final = 8

    ALL: Final = frozenset(range(1, 9))
    JSON: Final = frozenset({REQUEST, EVENT, REPLY, ERROR})
    HOST_TO_AGENT: Final = frozenset({REQUEST, STDIN, FILE_DATA})
    AGENT_TO_HOST: Final = frozenset({EVENT, REPLY, ERROR, STDOUT, STDERR, FILE_DATA})

    @staticmethod
    def name(ftype: int) -> str:
        """Return the symbolic name of a frame type, for messages."""
        for key, value in vars(FrameType).items():
            if key.isupper() and value == ftype:
                return key
        return f"type {ftype}"


#: Error codes beyond errno names.
ERROR_CODES: Final = {
    "EPROTO": "protocol misuse: malformed frame or message, unknown op, bad field",
    "EPROTONOSUPPORT": "host and agent speak different protocol versions",
    "ECANCELED": "the request was cancelled by the host",
    "EBUSY": "the request id or exec is already in use",
    "ESRCH": "no such exec or request",
}


class ProtocolError(Exception):
    """A frame or message violates the protocol.

    ``code`` is the error code sent back in an ERROR frame (``EPROTO`` unless
    a more specific one applies).
    """

    def __init__(self, message: str, code: str = "EPROTO") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Frame:
    """One decoded frame: type, request id and raw payload."""

    __slots__ = ("ftype", "payload", "request_id")

    def __init__(self, ftype: int, request_id: int, payload: bytes) -> None:
        self.ftype = ftype
        self.request_id = request_id
        self.payload = payload

    def json(self) -> dict[str, Any]:
        """Decode the payload as a JSON object (raises ProtocolError)."""
        return decode_json(self.payload)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.ftype, self.request_id, self.payload) == (
            other.ftype,
            other.request_id,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.ftype, self.request_id, self.payload))

    def __repr__(self) -> str:
        name = FrameType.name(self.ftype)
        return f"Frame({name}, id={self.request_id}, {len(self.payload)} bytes)"


class Garbage:
    """Bytes the decoder skipped to resynchronise, and why."""

    __slots__ = ("reason", "skipped")

    def __init__(self, skipped: int, reason: str) -> None:
        self.skipped = skipped
        self.reason = reason

    def __repr__(self) -> str:
        return f"Garbage({self.skipped} bytes: {self.reason})"


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_JSON_CONSTANTS: Final = {"-Infinity": -float("inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _JsonDefaults:
    """What ``_json``'s scanner reads from a ``json.JSONDecoder``: its default settings."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    array_hook = None  # read from Python 3.15 on
    parse_float = float
    parse_int = int
    parse_constant = _JSON_CONSTANTS.__getitem__


_JSON_SPACE: Final = " \t\n\r"
# typeshed asks for a scanner as the context; any object with the settings above is one.
_JSON_SCAN: Final = _json_scanner(_JsonDefaults)  # type: ignore[arg-type]


def _dumps(message: dict[str, Any]) -> str:
    """``json.dumps(message, separators=(",", ":"), ensure_ascii=False)``."""
    # A new encoder each time, as json makes: its circular-reference marks are per call.
    encode = _json_encoder({}, _not_serializable, _json_str, None, ":", ",", False, False, True)
    return "".join(encode(message, 0))


def _loads(text: str) -> Any:
    """``json.loads(text)``."""
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _JSON_SCAN(text, start)
    except (StopIteration, SystemError):
        pass
    else:
        if not text[end:].strip(_JSON_SPACE):
            return value
    # Not one JSON value: json itself says what is wrong. (_json raises json.decoder's
    # exception, and until that module is loaded a SystemError instead.)
    import json

    return json.loads(text)


def encode_frame(ftype: int, request_id: int, payload: bytes = b"") -> bytes:
    """Encode one frame. Raises ValueError for an oversized payload or bad id."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(
            f"frame payload of {len(payload)} bytes exceeds MAX_FRAME_PAYLOAD"
            f" ({MAX_FRAME_PAYLOAD}); split the data"
        )
    if ftype not in FrameType.ALL:
        raise ValueError(f"unknown frame type {ftype!r}")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id {request_id!r} out of range")
    return HEADER.pack(MAGIC, len(payload), ftype, request_id) + payload


def encode_json(ftype: int, request_id: int, message: dict[str, Any]) -> bytes:
    """Encode a JSON message frame (REQUEST, EVENT, REPLY or ERROR)."""
    if ftype not in FrameType.JSON:
        raise ValueError(f"{FrameType.name(ftype)} frames do not carry JSON")
    return encode_frame(ftype, request_id, _dumps(message).encode())


def decode_json(payload: bytes) -> dict[str, Any]:
    """Decode a JSON object payload; raise ProtocolError if it is not one."""
    try:
        message = _loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # the last: nested deep
        raise ProtocolError(f"payload is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"JSON payload must be an object, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Incremental frame decoder that resynchronises after corrupt input.

    Feed it bytes as they arrive, then drain ``frames()``: it yields Frame
    objects and, for skipped corrupt input, Garbage objects.
    """

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max_payload = max_payload

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet decoded."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied: the caller may reuse its buffer)."""
        self._buf += data

    def reset(self) -> None:
        """Forget buffered input (the peer went away)."""
        self._buf = bytearray()
        self._pos = 0

    def frames(self) -> Iterator[Frame | Garbage]:
        """Yield every complete frame (or skipped garbage) buffered so far."""
        while True:
            item = self._next()
            if item is None:
                break
            yield item
        self._compact()

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def _skip_to_magic(self, start: int, reason: str) -> Garbage:
        """Skip to the next magic marker at or after ``start``."""
        found = self._buf.find(MAGIC, start)
        if found < 0:
            found = len(self._buf)
            # Keep a tail that is the beginning of a marker split across reads.
            for keep in range(len(MAGIC) - 1, 0, -1):
                if found - keep >= start and self._buf.endswith(MAGIC[:keep]):
                    found -= keep
                    break
        skipped = found - self._pos
        self._pos = found
        return Garbage(skipped, reason)

    def _next(self) -> Frame | Garbage | None:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available == 0:
            return None
        if buf[pos : pos + len(MAGIC)] != MAGIC[: min(available, len(MAGIC))]:
            return self._skip_to_magic(pos + 1, "bytes without a frame marker")
        if available < HEADER_SIZE:
            return None
        _, length, ftype, request_id = HEADER.unpack_from(buf, pos)
        if ftype not in FrameType.ALL:
            return self._skip_to_magic(pos + 1, f"unknown frame type {ftype}")
        if length > self._max_payload:
            return self._skip_to_magic(
                pos + 1,
                f"frame of {length} bytes exceeds the maximum of {self._max_payload}",
            )
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        self._pos = end
        # One copy through a view (a bytearray slice would copy twice); the view
        # is released at once so that _compact may resize the buffer.
        with memoryview(buf) as view:
            payload = bytes(view[pos + HEADER_SIZE : end])
        return Frame(ftype, request_id, payload)


# ---------------------------------------------------------------------------
# Request schemas: one table, used by the agent to validate and fill defaults
# and by the host to build requests.
# ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_uint(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_path(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and "\0" not in value


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_number_or_none(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_pid_list(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_PIDS and all(
        _is_uint(v) for v in value)


def _is_uint_or_none(value: object) -> bool:
    return value is None or _is_uint(value)


def _is_str_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_user(value: object) -> bool:
    return value is None or _is_uint(value) or (isinstance(value, str) and value != "")


def _is_argv(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(arg, str) and "\0" not in arg for arg in value)
    )


def _is_env(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str)
        and isinstance(val, str)
        and key
        and "=" not in key
        and "\0" not in key + val
        for key, val in value.items()
    )


def _is_hex_or_none(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _is_winsize(value: object) -> bool:
    return _is_int(value) and 0 < value <= 0xFFFF  # type: ignore[operator]


#: Marks a field without a default.
REQUIRED: Final = object()

#: What each check function accepts, for error messages.
_EXPECTED: Final[dict[Callable[[object], bool], str]] = {
    _is_int: "an integer",
    _is_uint: "a non-negative integer",
    _is_str: "a string",
    _is_path: "an absolute path",
    _is_bool: "true or false",
    _is_number_or_none: "a number of seconds or null",
    _is_uint_or_none: "a non-negative integer or null",
    _is_str_or_none: "a string or null",
    _is_user: "a user name, a uid or null",
    _is_argv: "a non-empty list of strings",
    _is_env: "an object mapping names to string values",
    _is_hex_or_none: "a hex string or null",
    _is_winsize: "an integer from 1 to 65535",
}

#: op -> {field: (check, default)}; REQUIRED marks mandatory fields.
REQUEST_FIELDS: Final[dict[str, dict[str, tuple[Callable[[object], bool], object]]]] = {
    "hello": {"version": (_is_int, REQUIRED)},
    "ping": {},
    "exec": {
        "argv": (_is_argv, REQUIRED),
        "env": (_is_env, {}),
        "cwd": (_is_path, "/"),
        "user": (_is_user, None),
        "stdin": (_is_bool, False),
        "timeout": (_is_number_or_none, None),
        "pty": (_is_bool, False),
        "rows": (_is_winsize, 24),
        "cols": (_is_winsize, 80),
        "replay": (_is_uint, 0),
    },
    "attach": {"exec_id": (_is_uint, REQUIRED), "offset": (_is_uint_or_none, None)},
    "signal": {
        "target": (_is_uint, REQUIRED),
        "signum": (_is_uint, REQUIRED),
        "group": (_is_bool, False),
    },
    "resize": {
        "target": (_is_uint, REQUIRED),
        "rows": (_is_winsize, REQUIRED),
        "cols": (_is_winsize, REQUIRED),
    },
    "cancel": {"target": (_is_uint, REQUIRED)},
    "read_file": {"path": (_is_path, REQUIRED)},
    "write_file": {"path": (_is_path, REQUIRED), "mode": (_is_uint, 0o644)},
    "stat": {"path": (_is_path, REQUIRED), "follow_symlinks": (_is_bool, True)},
    "list": {"path": (_is_path, REQUIRED)},
    "mkdir": {
        "path": (_is_path, REQUIRED),
        "parents": (_is_bool, False),
        "mode": (_is_uint, 0o755),
    },
    "remove": {"path": (_is_path, REQUIRED), "recursive": (_is_bool, False)},
    "resync": {
        "epoch_ns": (_is_uint_or_none, None),
        "entropy": (_is_hex_or_none, None),
        "hostname": (_is_str_or_none, None),
    },
    "shutdown": {"poweroff": (_is_bool, True)},
    "usage": {},
    "processes": {},
    "grow_fs": {"size": (_is_uint, REQUIRED)},
    "walk": {"path": (_is_path, "/")},
    "sweep": {"keep": (_is_pid_list, [])},
    "mark": {},
    "layer": {"mark": (_is_uint, REQUIRED)},
}


def _defaults(schema: dict[str, tuple[Callable[[object], bool], object]]) -> dict[str, object]:
    return {name: default for name, (_, default) in schema.items() if default is not REQUIRED}


#: Per op: its optional fields' defaults, the names of those that are mutable (copied for
#: each request, so handlers may modify them) and its required fields; parse_request
#: runs for every request, the agent's exec included.
_DEFAULTS: Final = {op: _defaults(schema) for op, schema in REQUEST_FIELDS.items()}
_MUTABLE: Final = {op: [name for name, value in defaults.items() if isinstance(value, dict | list)]
                   for op, defaults in _DEFAULTS.items()}
_REQUIRED: Final = {op: [name for name in schema if name not in _DEFAULTS[op]]
                    for op, schema in REQUEST_FIELDS.items()}


def parse_request(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a REQUEST message; return ``(op, fields with defaults filled)``.

    Unknown fields are ignored (forward compatibility within a version).
    Raises ProtocolError (code EPROTO) naming the op and field at fault.
    """
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError('request has no "op" string')
    schema = REQUEST_FIELDS.get(op)
    if schema is None:
        raise ProtocolError(
            "unknown op {!r}; this agent supports: {}".format(op, ", ".join(sorted(REQUEST_FIELDS)))
        )
    given = [name for name in message if name in schema]  # a request carries few
    for name in given:
        check = schema[name][0]
        if not check(message[name]):
            raise ProtocolError(
                f"{op}: field {name!r} must be {_EXPECTED[check]}, got {message[name]!r}")
    for name in _REQUIRED[op]:
        if name not in message:
            raise ProtocolError(f"{op}: missing required field {name!r}")
    fields: dict[str, Any] = dict(_DEFAULTS[op])
    for name in _MUTABLE[op]:
        fields[name] = fields[name].copy()
    fields.update({name: message[name] for name in given})
    return op, fields
