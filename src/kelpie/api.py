"""The REST API's wire format: request and response models shared by daemon and client.

Every path is under ``/v1``. Errors are JSON bodies ``{"error": ErrorBody}`` with an HTTP
status from :data:`ERROR_STATUS`. Bytes (command output, stdin) travel base64-encoded in
JSON, raw in file bodies and in the exec WebSocket.

The exec WebSocket (``/v1/sandboxes/{ref}/exec/ws``) speaks this protocol:

- the client's first message is a text frame holding an :class:`ExecStart`;
- then the client sends binary frames of stdin, and text frames holding a
  :class:`StreamControl` (``stdin_eof``, ``resize``, ``signal``);
- the server sends a text ``{"type": "started"}``, then binary frames whose first byte is
  :data:`CHANNEL_STDOUT` or :data:`CHANNEL_STDERR` followed by the data, and ends with a
  text :class:`ExecExitMessage` (``type: "exit"``) or an error
  ``{"type": "error", "error": ErrorBody}``; then it closes the socket.

``POST /v1/sandboxes/{ref}/exec`` with ``Accept: application/x-ndjson`` streams a command
without stdin as JSON lines: :class:`ExecStarted` (its ``exec_id`` takes signals at
``POST /v1/sandboxes/{ref}/exec/{exec_id}/signal``), :class:`ExecOutputLine` as output
comes, then :class:`ExecExitMessage` or :class:`StreamError`. A client that hangs up
kills the command.
"""

from __future__ import annotations

import base64
import contextlib
import enum
from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from kelpie.images import StoredImage
    from kelpie.vm import ExecResult, FileInfo

API_VERSION = "v1"
NDJSON = "application/x-ndjson"
CHANNEL_STDOUT = 1
CHANNEL_STDERR = 2
WS_POLICY_VIOLATION = 1008
CHUNK_SHA256_HEADER = "X-Kelpie-Chunk-Sha256"
"""The sha256 (hex) of a teleport chunk's body, checked by the target on arrival."""

MAX_ARGV = 4096
MAX_NAME = 253
MAX_EGRESS_RULES = 256
SANDBOX_NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$"
"""A sandbox name, as the runtime checks it (kelpie.runtime.NAME_PATTERN); documented here
for the OpenAPI document, enforced by the runtime (which says what is wrong)."""
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StrictModel(_Model):
    """A body another program sends as it is (no coercion: ``false`` is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- errors -----------------------------------------------------------------------------
class ErrorBody(_Model):
    """What went wrong: the error's class, its ancestors up to KelpieError, the message."""

    type: str = Field(description="The error's class name, e.g. SandboxNotFound.")
    types: list[str] = Field(description="The class and its Kelpie ancestors, most specific first.")
    message: str
    retriable: bool = False
    requires_recreate: bool = False
    problems: list[str] = Field(default_factory=list,
                                description="Every problem found, for invalid input.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="The error's other public attributes as JSON values (e.g. "
                    "GuestFileError's path and code, ExecTimeout's argv and timeout); a bytes "
                    "attribute is base64 text under its name + '_b64' (ExecTimeout's "
                    "stdout_b64, stderr_b64).")


class ErrorResponse(_Model):
    """The body of every error response."""

    error: ErrorBody


ERROR_STATUS: tuple[tuple[str, int], ...] = (
    # most specific first: the first class name in an error's ``types`` that is listed wins
    ("LoginRefused", 401),
    ("NotAllowed", 403),
    ("SandboxNotFound", 404),
    ("ExecNotFound", 404),
    ("SnapshotNotFound", 404),
    ("ImageNotFound", 404),
    ("NotInFleet", 404),
    ("GuestFileError", 400),
    ("AmbiguousSandbox", 409),
    ("AmbiguousImage", 409),
    ("SandboxNameInUse", 409),
    ("MainCommandNotRunning", 409),
    ("SnapshotNameInUse", 409),
    ("AmbiguousSnapshot", 409),
    ("SnapshotIncompatible", 409),
    ("SnapshotCorrupted", 400),
    ("ImageInUse", 409),
    ("InvalidStateError", 409),
    ("TeleportRefused", 409),
    ("TeleportInDoubt", 409),
    ("TransferOffsetMismatch", 409),
    ("TeleportAborted", 409),
    ("PeerUnreachable", 502),
    ("ConfigError", 400),
    ("DockerfileError", 400),
    ("BuildError", 422),
    ("UnsupportedOperation", 501),
    ("BackendUnavailable", 503),
    ("ExecTimeout", 504),
    ("RegistryError", 502),
    ("KelpieError", 500),
)


def error_status(types: list[str]) -> int:
    """The HTTP status for an error whose class and ancestors are ``types``."""
    for name, status in ERROR_STATUS:
        if name in types:
            return status
    return 500


class _Request(_Model):
    """A request an in-process caller may also give as keyword fields."""

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Self:
        """A request from an in-process caller's keyword fields. Only the names are checked
        here: the runtime checks every value itself, and says what is wrong in its words."""
        unknown = sorted(set(fields) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unexpected {cls.__name__} field(s) {', '.join(unknown)}; "
                            f"expected {', '.join(cls.model_fields)}")
        missing = sorted(n for n, f in cls.model_fields.items()
                         if f.is_required() and n not in fields)
        if missing:
            raise TypeError(f"{cls.__name__} needs the field(s) {', '.join(missing)}")
        # pydantic's mypy plugin types model_construct as the defining class, not Self
        return cast(Self, cls.model_construct(**fields))

    @classmethod
    def of(cls, request: Self | None, fields: Mapping[str, Any], what: str) -> Self:
        """The request an in-process call gives: ``request``, or one made of its keyword
        ``fields`` (a ConfigError when both are given)."""
        if request is None:
            return cls.from_fields(fields)
        if fields:
            from kelpie._exceptions import ConfigError

            raise ConfigError([f"give the request or its fields, not both (got a request "
                               f"and {', '.join(sorted(fields))})"], what=what)
        return request


# ---- sandboxes --------------------------------------------------------------------------
class SandboxCreate(_Request):
    """Create and start a sandbox."""

    image: str | None = Field(None, max_length=MAX_NAME * 2,
                              description="A stored image: tag, digest or id prefix. "
                                          "None: the guest kit's own userland.")
    name: Annotated[str, Field(max_length=MAX_NAME,
                               json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})] | None = None
    cpus: int | None = Field(None, description="Virtual CPUs (the VM config's limits apply).")
    memory_mib: int | None = Field(None, description="Memory in MiB (limits as for cpus).")
    disk_mib: int | None = Field(None, description="The root disk's size in MiB (default "
                                 "10240; sparse: free space costs the host nothing). Only "
                                 "with an image; with a template, at least the template's "
                                 "(the disk grows to it once the sandbox runs).")
    env: dict[str, str] = Field(default_factory=dict,
                                json_schema_extra={"propertyNames": {"pattern": ENV_NAME_PATTERN}})
    volumes: list[str] = Field(default_factory=list, max_length=16,
                               description="HOST:GUEST[:ro|rw]; HOST must exist on the "
                                           "daemon's host.")
    ports: list[str] = Field(default_factory=list, max_length=64,
                             description="[IP:]HOST:GUEST[/tcp|udp]; IP 127.0.0.1 by default.")
    network: Literal["none", "nat", "policy"] = Field(
        "none", description="none: no NIC; nat: the internet, never the host or private "
                            "networks; policy: only what allow names.")
    allow: list[str] = Field(
        default_factory=list, max_length=MAX_EGRESS_RULES,
        description="Egress rules TARGET[:PORT]: an address, CIDR, NAME, *.NAME or 'host'. "
                    "In nat an exception to what is denied; in policy the whole list.")
    deny: list[str] = Field(default_factory=list, max_length=MAX_EGRESS_RULES,
                            description="Egress rules as for allow; a deny wins.")
    backend: str | None = Field(None, max_length=64)
    arch: Literal["x86_64", "aarch64"] | None = Field(
        None, description="The guest's architecture; None: the host's. Another one is "
                          "emulated (QEMU TCG); the image is taken for that platform.")
    hostname: str | None = Field(None, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = Field(None, max_length=4096,
                                description="Where commands run (absolute); None: the "
                                            "image's WorkingDir.")
    user: str | None = Field(None, max_length=256,
                             description="Who commands run as (name or uid); None: "
                                         "the image's User.")
    entrypoint: list[str] | None = Field(
        None, max_length=MAX_ARGV,
        description="Replaces the image's Entrypoint and drops its Cmd, as Docker's "
                    "--entrypoint; [] clears it. None: the image's.")
    command: list[str] | None = Field(
        None, max_length=MAX_ARGV,
        description="The main command, run at every start, its output the sandbox's logs. "
                    "[] means the image's default command; None: no main command.")
    template: str | None = Field(
        None, max_length=MAX_NAME,
        description="Start by restoring this template instead of booting; then only name, "
                    "env and labels may be given.")
    start: bool = Field(True, description="Boot it now; false: record it (state created, "
                                          "its root disk built) for a later start.")
    restart: str | None = Field(
        None, max_length=32,
        description="When the main command is started again after it ends: no (default), "
                    "on-failure[:N] (non-zero exit, at most N times), always. Back-off 0.1 s "
                    "doubling to 60 s.")
    stop_timeout: Annotated[float, Field(strict=True)] | None = Field(
        None, ge=0, le=3600,
        description="Seconds a stop waits for the guest to shut down before the VM is "
                    "killed; None: the backend's default.")
    timeout: Annotated[float, Field(strict=True)] | None = Field(
        None, gt=0, le=30 * 24 * 3600,
        description="Seconds from its creation after which on_timeout happens to the "
                    "sandbox (E2B's timeout); None: it lives until removed.")
    on_timeout: Literal["remove", "pause", "stop"] = Field(
        "remove", description="What happens when its timeout passes: remove it (E2B's "
                              "kill), pause it (E2B's auto-pause) or stop it.")



class TimeoutChange(_Request):
    """A new timeout for a sandbox, counted from now (E2B's set_timeout)."""

    timeout: Annotated[float, Field(strict=True)] | None = Field(
        ..., gt=0, le=30 * 24 * 3600,
        description="Seconds from now; None: no timeout any more.")
    on_timeout: Literal["remove", "pause", "stop"] | None = Field(
        None, description="What happens when it passes; None: as before.")


class NetworkChange(_Request):
    """New egress rules for a sandbox (they replace its rules), and optionally its mode."""

    network: Literal["nat", "policy"] | None = None
    allow: list[str] = Field(default_factory=list, max_length=MAX_EGRESS_RULES)
    deny: list[str] = Field(default_factory=list, max_length=MAX_EGRESS_RULES)


class Volume(_Model):
    host_path: str
    guest_path: str
    read_only: bool


class Port(_Model):
    host_ip: str
    host_port: int
    guest_port: int
    protocol: str


class Sandbox(_Model):
    """A sandbox as the runtime records it."""

    id: str
    short_id: str
    name: str
    backend: str
    arch: str = Field("", description="The guest's architecture (x86_64, aarch64).")
    state: str
    image: str | None
    image_digest: str | None
    cpus: int
    memory_mib: int
    disk_mib: int | None = Field(None, description="The root disk's size (None: no image, "
                                 "or sized to the image before disks had a size).")
    network: str
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    env: dict[str, str]
    volumes: list[Volume]
    ports: list[Port]
    workdir: str | None
    user: str | None
    command: list[str] | None
    image_command: list[str] | None
    image_entrypoint: list[str]
    main_exit_code: int | None
    restart: str = Field("no", description="The main command's restart policy.")
    restart_count: int = Field(0, description="Restarts by the policy since the last start.")
    stop_timeout: float | None = None
    expires_at: float | None = Field(None, description="When its timeout passes (Unix "
                                     "seconds); None: it has none.")
    on_timeout: str = Field("remove", description="What then happens: remove, pause or "
                                                  "stop.")
    crash_reason: str | None
    last_error: str | None
    labels: dict[str, str]
    created_at: float
    updated_at: float


class Event(_Model):
    """One recorded event of a sandbox: ``kind`` says what happened (state: its state
    changed; main-exited, restarted, renamed, removed), ``state`` is its state after it."""

    at: float
    state: str
    reason: str | None
    seq: int = Field(0, description="Orders every event of a daemon; only grows.")
    sandbox_id: str = ""
    name: str = Field("", description="The sandbox's name when it happened.")
    kind: str = "state"


class Progress(_Model):
    """One line of an NDJSON progress stream."""

    type: Literal["progress"] = "progress"
    message: str


class CreateDone(_Model):
    """The last line of a create's NDJSON stream when it succeeded."""

    type: Literal["result"] = "result"
    sandbox: Sandbox


class StreamError(_Model):
    """The last line of a stream (NDJSON or WebSocket) when the operation failed."""

    type: Literal["error"] = "error"
    error: ErrorBody


# ---- snapshots and templates ------------------------------------------------------------
class SnapshotCreate(_Model):
    """Snapshot a sandbox."""

    sandbox: str = Field(max_length=MAX_NAME, description="Name, id or unique id prefix.")
    name: Annotated[str, Field(max_length=MAX_NAME,
                               json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})] | None = None
    kind: Literal["full", "disk", "checkpoint"] = Field(
        "full", description="full: memory, devices and disk of a running or paused sandbox; "
                            "disk: the disk of a stopped one; checkpoint: a running one's "
                            "workspace directory and env, restorable on any arch.")
    leave_paused: bool = False
    workspace: str | None = Field(
        None, max_length=4096,
        description="For checkpoints: the guest directory to keep (default: the image's "
                    "working directory, else /workspace).")


class CommitBody(_Request):
    """Commit a sandbox's file system changes over its image as a new image."""

    reference: str = Field(min_length=1, max_length=MAX_NAME * 2,
                           description="The new image's name (REPO[:TAG]).")
    message: str | None = Field(None, max_length=1000,
                                description="Kept in the image's history.")


class BuildOptions(_Request):
    """How to build an image from a Dockerfile (the REST query of ``POST /v1/builds``,
    whose body is the build context as a tar)."""

    tag: list[str] = Field(default_factory=list, max_length=16,
                           description="Names for the image (REPO[:TAG]); none: untagged.")
    file: str = Field("Dockerfile", min_length=1, max_length=4096,
                      description="The Dockerfile's path inside the context.")
    build_arg: list[str] = Field(default_factory=list, max_length=256,
                                 description="KEY=VALUE for the Dockerfile's ARGs.")
    target: str | None = Field(None, max_length=MAX_NAME,
                               description="The stage to build (default: the last).")
    platform: str | None = Field(None, max_length=64,
                                 description="os/arch of the image (default: the host's); "
                                             "another arch runs its RUN steps under TCG.")
    network: Literal["none", "nat"] = Field(
        "nat", description="The network of RUN steps: nat (the internet, never the host "
                           "or private networks) or none.")
    no_cache: bool = Field(False, description="Run every step again.")
    step_timeout: float = Field(1800, gt=0, le=86400,
                                description="Seconds a RUN step may take before it fails.")
    memory_mib: int | None = Field(None, description="Memory of the build VMs (MiB).")
    cpus: int | None = Field(None, description="Virtual CPUs of the build VMs.")
    disk_mib: int | None = Field(None, description="Root disk of the build VMs (MiB).")
    backend: str | None = Field(None, max_length=64,
                                description="The backend of the build VMs.")


class BuildEvent(_Model):
    """One line of a build's progress (also a line of its NDJSON stream)."""

    type: Literal["build"] = "build"
    kind: Literal["step", "output", "note"] = Field(
        description="step: a step starts (text is its instruction); output: what a RUN "
                    "step printed; note: anything else (a pull, a VM booting).")
    text: str
    step: int | None = Field(None, description="The step's number, from 1.")
    steps: int | None = Field(None, description="How many steps the build has.")
    stage: str | None = Field(None, description="The stage's name or number.")
    cached: bool | None = Field(None, description="The step's result came from the cache.")


class RenameBody(_Request):
    """A sandbox's new name."""

    name: Annotated[str, Field(max_length=MAX_NAME,
                               json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})]


class MainExit(_Model):
    """How a sandbox's main command ended."""

    exit_code: int | None = Field(description="None: it has no main command, or its end "
                                              "was not seen (e.g. the sandbox was stopped).")


class HostUsageStats(_Model):
    """The host's view of a sandbox's VM: its VMM process and the files it writes."""

    cpu_seconds: float = Field(description="CPU time of the VMM process since it started "
                                           "(the guest's work and its emulation).")
    memory_bytes: int = Field(description="Resident memory of the VMM process.")
    disk_bytes: int = Field(description="Bytes the VM's directory takes on the host (its "
                                        "writable disk layer, logs).")


class GuestUsageStats(_Model):
    """The guest kernel's own counters (reported by the guest: informative, not trusted)."""

    cpu_seconds: float = Field(description="Busy CPU time of all guest CPUs since boot.")
    cpus: int
    memory_used_bytes: int
    memory_total_bytes: int
    disk_used_bytes: int = Field(description="Used bytes of the root file system.")
    disk_total_bytes: int
    disk_available_bytes: int
    net_rx_bytes: int = Field(description="Received by every interface but loopback.")
    net_tx_bytes: int
    processes: int
    uptime_seconds: float


# ---- the dashboard's login -----------------------------------------------------------
class LoginBody(_Model):
    """A dashboard login: a one-time token from ``kelpie dashboard`` (or the daemon's own
    token on a TCP daemon)."""

    token: str = Field(min_length=1, max_length=512)


class DashboardSession(_Model):
    """A dashboard session: send ``csrf`` as ``X-CSRF-Token`` on state-changing requests."""

    csrf: str


class DashboardLogin(_Model):
    """Where to open the dashboard: ``url`` holds a one-time token in its fragment."""

    url: str
    expires_in: float


class SandboxStats(_Model):
    """What a sandbox uses now: counters since it started, for rates take two samples."""

    id: str
    name: str
    state: str
    at: float = Field(description="When the sample was taken (Unix time).")
    memory_limit_bytes: int
    disk_limit_bytes: int | None = Field(description="The root disk's size (None: no image).")
    disk_full: bool = Field(description="The guest's root file system has under 1 MiB "
                                        "left: writes fail with ENOSPC.")
    host: HostUsageStats | None = Field(description="None: the backend has no VMM process "
                                                    "of its own, or the VM is not running.")
    guest: GuestUsageStats | None = Field(description="None: the guest did not answer (see "
                                                      "guest_error) or is not running.")
    guest_error: str | None = None


class GuestProcessInfo(_Model):
    """One process in a sandbox's guest."""

    pid: int
    ppid: int
    uid: int
    state: str = Field(description="The kernel's one-letter state (R, S, D, Z, T...).")
    cpu_seconds: float
    memory_bytes: int = Field(description="Resident memory.")
    started_at: float = Field(description="When it started (Unix time, host clock).")
    command: list[str]


class ProcessList(_Model):
    """The processes of a sandbox's guest (``kelpie top``)."""

    sandbox_id: str
    processes: list[GuestProcessInfo]
    truncated: bool = Field(description="More processes ran than one reply lists (4096).")


class ExecDetached(_Model):
    """A command started and left running unobserved."""

    exec_id: str | None = Field(description="The backend's id of the command, if it has one.")


class ForkBody(_Request):
    """Fork a running (or paused) sandbox into ``count`` children, each a copy of it now."""

    count: int = Field(ge=1, le=100, description="How many children (1 to 100).")
    name_prefix: Annotated[str, Field(max_length=MAX_NAME - 4,
                                      json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})] \
        | None = Field(None, description="Children are named PREFIX-1 ... (default: the "
                                         "parent's name).")
    names: list[Annotated[str, Field(max_length=MAX_NAME,
                                     json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})]] \
        | None = Field(None, max_length=100, description="The children's names (count of "
                                                          "them), instead of PREFIX-N.")
    disk_mib: int | None = Field(None, description="The children's root disk in MiB: at "
                                 "least the parent's (default: the parent's); it grows while "
                                 "they run.")


class RestoreBody(_Model):
    """Create a sandbox from a snapshot, or (``into``) roll a stopped sandbox back to it."""

    into: str | None = Field(None, max_length=MAX_NAME,
                             description="A stopped sandbox the snapshot was taken from: "
                                         "restore it in place (same id, name, identity).")

    name: Annotated[str, Field(max_length=MAX_NAME,
                               json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})] | None = None
    paused: bool = False
    env: dict[str, str] = Field(default_factory=dict,
                                json_schema_extra={"propertyNames": {"pattern": ENV_NAME_PATTERN}})
    labels: dict[str, str] = Field(default_factory=dict)


class TemplateCreate(_Request):
    """Boot a sandbox once and keep its snapshot as a template."""

    name: Annotated[str, Field(max_length=MAX_NAME,
                               json_schema_extra={"pattern": SANDBOX_NAME_PATTERN})]
    image: str | None = Field(None, max_length=MAX_NAME * 2)
    cpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = Field(None, description="The root disk's size, as for a sandbox: "
                                 "its clones keep it.")
    env: dict[str, str] = Field(default_factory=dict,
                                json_schema_extra={"propertyNames": {"pattern": ENV_NAME_PATTERN}})
    network: Literal["none", "nat", "policy"] = "none"
    allow: list[str] = Field(default_factory=list, max_length=MAX_EGRESS_RULES,
                             description="Egress rules, as for a sandbox: its clones keep them.")
    deny: list[str] = Field(default_factory=list, max_length=MAX_EGRESS_RULES)
    backend: str | None = Field(None, max_length=64)


class Snapshot(_Model):
    """A snapshot (or template) the daemon keeps."""

    id: str
    short_id: str
    name: str
    kind: str
    template: bool
    backend: str
    sandbox_id: str | None
    sandbox_name: str | None
    image: str | None
    image_digest: str | None
    cpus: int
    memory_mib: int
    size: int
    created_at: float


class SnapshotCompatibility(_Model):
    """What restoring a snapshot needs of a host, and whether this host has it."""

    id: str
    name: str
    kind: str
    backend: str
    backend_version: str
    arch: str
    cpu_model: str
    machine: str
    vcpus: int
    memory_mib: int
    guestkit_digest: str | None
    base_image_digest: str | None
    restorable_here: bool
    reasons: list[str] = Field(description="Every mismatch with this host (none: it restores "
                                           "here). A checkpoint restores on any arch and "
                                           "backend.")


# ---- exec -------------------------------------------------------------------------------
Argv = Annotated[list[str], Field(min_length=1, max_length=MAX_ARGV)]


class ExecBody(_Model):
    """Run a command to completion."""

    argv: Argv
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, max_length=4096)
    user: str | None = Field(None, max_length=256)
    stdin: Annotated[str, Field(json_schema_extra={"format": "byte"})] | None = Field(
        None, description="Standard input, base64.")
    timeout: Annotated[float, Field(strict=True)] | None = Field(None, gt=0, le=86400)


class ExecOutcome(_Model):
    """How a command ended and what it wrote (base64)."""

    exit_code: int
    signal: int | None
    stdout: str
    stderr: str
    duration: float

    @classmethod
    def from_result(cls, result: ExecResult) -> ExecOutcome:
        return cls(exit_code=result.exit_code, signal=result.signal,
                   stdout=b64(result.stdout), stderr=b64(result.stderr),
                   duration=result.duration)


class ExecStart(_Model):
    """The first message on the exec WebSocket."""

    argv: Argv
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, max_length=4096)
    user: str | None = Field(None, max_length=256)
    timeout: Annotated[float, Field(strict=True)] | None = Field(None, gt=0, le=86400)
    tty: bool = False
    rows: int = Field(24, ge=1, le=4096)
    cols: int = Field(80, ge=1, le=4096)


class StreamControl(_Model):
    """A control message from the client on the exec WebSocket."""

    type: Literal["stdin_eof", "resize", "signal"]
    rows: int | None = Field(None, ge=1, le=4096)
    cols: int | None = Field(None, ge=1, le=4096)
    signal: int | None = Field(None, ge=1, le=64)


class ExecStarted(_Model):
    """The first line of a streamed exec: the command runs."""

    type: Literal["started"] = "started"
    exec_id: str = Field(description="Where signals go: POST .../exec/{exec_id}/signal.")


class ExecOutputLine(_Model):
    """Output of a streamed exec, base64, in the order the command wrote it."""

    type: Literal["output"] = "output"
    stream: Literal["stdout", "stderr"]
    data: Annotated[str, Field(json_schema_extra={"format": "byte"})]


class ExecSignal(_Model):
    """A signal for a streamed exec's command."""

    signal: int = Field(ge=1, le=64)


class ExecExitMessage(_Model):
    """The last message of an exec stream (WebSocket or NDJSON) when the command ended."""

    type: Literal["exit"] = "exit"
    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    warning: str | None = Field(None, description="What may explain a failure, e.g. the "
                                                  "sandbox's root disk is full.")


# ---- files ------------------------------------------------------------------------------
class FileEntry(_Model):
    name: str
    type: str
    size: int
    mode: int

    @classmethod
    def from_info(cls, info: FileInfo) -> FileEntry:
        return cls(name=info.name, type=info.type, size=info.size, mode=info.mode)


# ---- the daemon -------------------------------------------------------------------------
class VersionInfo(_Model):
    version: str
    api_version: str
    pid: int
    data_dir: str


class Image(_Model):
    """A stored image: its short id, manifest digest, names and size."""

    id: str
    digest: str
    tags: list[str]
    size: int


class Layer(_Model):
    digest: str
    size: int
    media_type: str


class ImageDetails(_Model):
    """A stored image: manifest digest, config and layers."""

    id: str
    digest: str
    tags: list[str]
    size: int
    media_type: str
    platform: str
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str
    layers: list[Layer]
    held_by: list[str]

    @classmethod
    def from_stored(cls, image: StoredImage) -> ImageDetails:
        config = image.config
        return cls(
            id=image.id, digest=image.digest, tags=list(image.tags), size=image.size,
            media_type=image.media_type, platform=f"{config.os}/{config.architecture}",
            entrypoint=list(config.entrypoint or ()), cmd=list(config.cmd or ()),
            env=list(config.env), working_dir=config.working_dir, user=config.user,
            layers=[Layer(digest=d.digest, size=d.size, media_type=d.media_type)
                    for d in image.manifest.layers],
            held_by=list(image.holders),
        )


class PullBody(_Model):
    """Pull an image from a registry into the daemon's store."""

    reference: str = Field(min_length=1, max_length=MAX_NAME * 2)
    platform: str | None = Field(None, max_length=64, description="OS/ARCH[/VARIANT]")
    insecure: bool = Field(False, description="Plain HTTP for this registry.")


class PushBody(_Model):
    """Push an image of the daemon's store to a registry."""

    image: str = Field(min_length=1, max_length=MAX_NAME * 2,
                       description="A stored image: tag, digest or id prefix.")
    reference: str | None = Field(None, min_length=1, max_length=MAX_NAME * 2,
                                  description="Where to push it (REGISTRY/REPO:TAG); default: "
                                              "the name the image is known by.")
    insecure: bool = Field(False, description="Plain HTTP for this registry.")


class PushOutcome(_Model):
    """What a push did, blob by blob."""

    reference: str = Field(description="Where the image went, by tag and digest.")
    digest: str
    uploaded: list[str] = Field(description="Blobs sent.")
    mounted: list[str] = Field(description="Blobs mounted from another repository of the "
                                           "registry (not sent).")
    existing: list[str] = Field(description="Blobs the registry had already (not sent).")
    bytes_sent: int


class PushDone(_Model):
    """The last line of a push's NDJSON stream when it succeeded."""

    type: Literal["result"] = "result"
    push: PushOutcome


class PullProgress(_Model):
    """One line of a pull's or push's NDJSON stream: bytes of one blob moved so far."""

    type: Literal["progress"] = "progress"
    digest: str
    done: int
    total: int


class PullDone(_Model):
    """The last line of a pull's NDJSON stream when it succeeded."""

    type: Literal["result"] = "result"
    image: Image


# ---- host facts and teleport -------------------------------------------------------------
class BackendFacts(_Model):
    """One backend as a host offers it."""

    name: str
    available: bool
    reason: str = Field(description="Why it is (not) available, e.g. its binary and accelerator.")
    version: str | None = None
    arches: dict[str, str] = Field(
        default_factory=dict,
        description="Guest architectures it runs here, each with its accelerator (kvm, tcg; "
                    "empty while undecided: QEMU proves KVM with a boot probe on first use).")
    capabilities: list[str] = Field(default_factory=list,
                                    description="e.g. pause, snapshot:full, live_migration")


class HostFacts(_Model):
    """What a host offers, advertised so another host (a teleport source, the fleet) can
    decide before anything pauses what it can send there."""

    kelpie_version: str
    arch: str = Field(description="The host's architecture in the kernel's spelling (x86_64).")
    cpu_model: str
    cpus: int
    free_vcpus: int = Field(description="CPUs not promised to running or paused sandboxes.")
    memory_mib: int
    free_memory_mib: int = Field(description="Memory available now (MemAvailable).")
    free_disk_bytes: int = Field(description="Free space where the daemon keeps its state.")
    backends: list[BackendFacts]
    images: list[str] = Field(description="Manifest digests of the images this host holds.")
    guestkits: list[str] = Field(description="Digests of the guest kits this host holds.")


class FleetViewSandbox(_StrictModel):
    """One of a fleet's sandboxes as its controller last saw it."""

    name: str
    status: str = Field(description="placing, running, lost, moving, recovering...")
    state: str | None = Field(description="Its state on its host at the last report.")
    generation: int


class FleetViewHost(_StrictModel):
    """One host of a fleet as its controller last saw it: status, capacity, sandboxes."""

    host: str
    status: str = Field(description="up, draining or dead.")
    reason: str | None
    address: str | None = Field(description="Its daemon's URL.")
    arches: list[str]
    backends: list[str]
    cpus: int
    free_vcpus: int
    memory_mib: int
    free_memory_mib: int
    free_disk_bytes: int
    sandboxes: list[FleetViewSandbox]


class FleetView(_StrictModel):
    """What the fleet this daemon's host belongs to looks like: its controller sends it to
    every host's daemon each round (``PUT /v1/fleet``), so any daemon can show it."""

    at: float = Field(description="Unix time of the controller's round.")
    hosts: list[FleetViewHost]


class TeleportMode(enum.StrEnum):
    """How a teleport moves a sandbox (see :class:`TeleportBody`)."""

    AUTO = "auto"
    LIVE = "live"
    FULL = "full"
    CHECKPOINT = "checkpoint"


class TeleportBody(_Model):
    """Move a sandbox from this daemon to another one."""

    to: str = Field(min_length=1, max_length=2048,
                    description="The target daemon's URL (http://HOST:PORT or unix:PATH).")
    token: str | None = Field(None, max_length=4096,
                              description="The target daemon's bearer token.")
    mode: TeleportMode = Field(
        TeleportMode.AUTO,
        description="live: pre-copy migration while the guest runs (QEMU); full: pause, "
                    "snapshot memory + disk, move, restore; checkpoint: workspace files, env "
                    "and agent state, the target boots the image fresh (any arch); auto: the "
                    "best the pair supports.")
    without_volumes: bool = Field(
        False, description="Move a sandbox with host volumes in checkpoint mode, without them.")
    converge_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="Seconds a live migration may take to reach its final pause; past them "
                    "the teleport falls back to full mode.")
    arch: Literal["x86_64", "aarch64"] | None = Field(
        None, description="The guest architecture the sandbox should have on the target; "
                          "another one than its own moves it as a checkpoint (the target "
                          "boots its own variant of the image). None: its own when the "
                          "target runs it, else one the target runs.")


class TeleportProgress(_Model):
    """One line of a teleport's NDJSON stream."""

    type: Literal["progress"] = "progress"
    phase: str
    message: str
    done: int = 0
    total: int = 0


class TeleportReport(_Model):
    """How a teleport went."""

    id: str
    mode: TeleportMode
    reason: str = Field(description="Why this mode ran (what the pair supports).")
    target: str
    downtime_s: float = Field(
        description="From the guest paused on the source to it running on the target.")
    total_s: float
    bytes_sent: int
    sandbox: Sandbox = Field(description="The sandbox as the target now runs it.")


class TeleportInFlight(_Model):
    """A teleport this daemon is running now (its source's view)."""

    id: str
    sandbox_id: str
    sandbox_name: str
    target: str
    mode: TeleportMode = Field(description="The mode running now (a live attempt that does "
                                           "not converge goes on as full).")
    phase: str = Field(description="prepare, transfer, capture, live, switch or commit.")
    message: str
    done: int = Field(description="Progress of the phase (bytes of a blob or of RAM).")
    total: int
    bytes_sent: int
    started_at: float = Field(description="Unix time.")
    rate_bytes_per_s: float = Field(description="Bytes sent per second since the start.")
    paused_s: float | None = Field(
        description="Seconds the guest has been paused so far (the downtime, growing until "
                    "it runs on the target); none while it runs here.")


class TeleportDone(_Model):
    """The last line of a teleport's NDJSON stream when it succeeded."""

    type: Literal["result"] = "result"
    report: TeleportReport


class TeleportOffer(_Model):
    """What a source asks a target to take (the ``prepare`` step, daemon to daemon)."""

    id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    mode: TeleportMode
    sandbox: dict[str, Any] = Field(description="The sandbox's record (SandboxInfo as JSON).")
    image_digest: str | None = None
    image_tags: list[str] = Field(default_factory=list)
    base_disk_digest: str | None = Field(
        None, description="Digest (sparse-sha256) of the base disk image a full or live "
                          "snapshot's disk overlay sits on.")
    arch: str
    backend_version: str | None = None
    guestkit_digest: str | None = None
    size_bytes: int = Field(0, description="About how much the transfer writes on the target.")


class TeleportAccepted(_Model):
    """The target's answer to an offer: reserved, and what it lacks."""

    id: str
    needs_image: bool
    needs_base_disk: bool


class TeleportBlob(_Model):
    """One file a teleport carries, named and checked by its sha256."""

    name: str = Field(pattern=r"^[a-z]+-[A-Za-z0-9][A-Za-z0-9_.:-]{0,200}$")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TeleportSwitch(_Model):
    """The switch step: everything is sent; restore it and prove it runs."""

    blobs: list[TeleportBlob]
    sandbox: dict[str, Any] = Field(description="The sandbox's record as of the pause.")
    image_media_type: str | None = None
    live: bool = Field(False, description="The VM came live (see TeleportLive): finish the "
                                          "migration instead of restoring from blobs.")


class TeleportLive(_Model):
    """Start a live teleport's target: a VM waiting for the migration, reached through
    ``/v1/teleports/{id}/live/{channel}`` (``nbd``: the disk mirror, ``migration``)."""

    sandbox: dict[str, Any] = Field(description="The sandbox's record.")
    plan: dict[str, Any] = Field(description="The source backend's live migration plan.")
    image_media_type: str | None = Field(
        None, description="The media type of the image manifest sent, if one was.")


class TeleportState(_Model):
    """Where a teleport stands on the target."""

    id: str
    phase: str
    sandbox: Sandbox | None = None


def run_argv(sandbox: Sandbox, override: list[str]) -> list[str]:
    """What ``run`` executes, by Docker's rules: the image's entrypoint + ``override``, or
    the image's default command when there is no override."""
    if override:
        return [*sandbox.image_entrypoint, *override]
    if sandbox.image_command:
        return list(sandbox.image_command)
    from kelpie.images import NoDefaultCommand

    raise NoDefaultCommand()


def b64(data: bytes) -> str:
    """Bytes as base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None, field: str) -> bytes:
    """Base64 text as bytes; a ConfigError naming ``field`` when it is not base64."""
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        from kelpie._exceptions import ConfigError

        raise ConfigError([f"{field} is not valid base64"], what="request") from None


def error_body(exc: BaseException) -> ErrorBody:
    """The wire form of an exception (Kelpie's, or any other as a plain KelpieError)."""
    from kelpie.vm import ConfigError, KelpieError

    types = [c.__name__ for c in type(exc).__mro__
             if isinstance(exc, KelpieError) and issubclass(c, KelpieError)]
    if not types:
        types = ["KelpieError"]
    retriable = bool(getattr(exc, "retriable", False))
    recreate = bool(getattr(exc, "requires_recreate", False))
    problems = list(exc.problems) if isinstance(exc, ConfigError) else []
    return ErrorBody(type=types[0], types=types, message=str(exc) or type(exc).__name__,
                     retriable=retriable, requires_recreate=recreate, problems=problems,
                     details=error_details(exc) if isinstance(exc, KelpieError) else {})


BYTES_SUFFIX = "_b64"
"""Marks an :attr:`ErrorBody.details` entry holding a bytes attribute, base64-encoded."""
_BODY_ATTRIBUTES = frozenset({"args", "message", "problems", "retriable", "requires_recreate"})
"""Attributes :class:`ErrorBody` carries in fields of their own."""


def error_details(exc: BaseException) -> dict[str, Any]:
    """An error's public instance attributes as JSON values, for :attr:`ErrorBody.details`.

    Tuples become lists, enums their value, paths text, bytes base64 (the name gets
    :data:`BYTES_SUFFIX`); an attribute with no JSON form is left out."""
    details: dict[str, Any] = {}
    for name, value in vars(exc).items():
        if name.startswith("_") or name in _BODY_ATTRIBUTES:
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            details[name + BYTES_SUFFIX] = b64(bytes(value))
            continue
        with contextlib.suppress(_NoJson):
            details[name] = _json_value(value)
    return details


def error_attributes(details: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes :func:`error_details` encoded: lists back to tuples (as the error
    classes keep them), base64 back to bytes."""
    attributes: dict[str, Any] = {}
    for name, value in details.items():
        if name.endswith(BYTES_SUFFIX) and isinstance(value, str):
            with contextlib.suppress(ValueError):
                attributes[name[: -len(BYTES_SUFFIX)]] = base64.b64decode(value, validate=True)
                continue
        attributes[name] = _tuples(value)
    return attributes


class _NoJson(Exception):
    """A value with no JSON form."""


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise _NoJson


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], fields: Mapping[str, Any], what: str) -> M:
    """``model`` built from ``fields``; a ConfigError listing every problem when they do not
    fit (for in-process callers, who get the same checks as a REST body)."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as exc:
        from kelpie._exceptions import ConfigError

        problems = [f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}"
                    for e in exc.errors()]
        raise ConfigError(problems, what=what) from None


def model_json(model: BaseModel) -> dict[str, Any]:
    """A model as a JSON-ready dict."""
    return model.model_dump(mode="json")
