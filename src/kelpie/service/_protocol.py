"""The :class:`SandboxService` protocol and the views of the records it returns.

:class:`SandboxService` is what the SDK, the CLI and (later) MCP and the fleet need from
whoever owns sandboxes. Two things implement it: :class:`~kelpie.runtime.Runtime`
(in-process) and :class:`~kelpie.client.DaemonClient` (a daemon, over REST). Both
conform structurally; the checks at the end of this module make mypy prove it, so the two
cannot drift apart again.

The records they return differ in type (the runtime's dataclasses in-process, the REST
API's models from a daemon), so the service promises the fields both carry, described by
the view protocols :class:`SandboxView`, :class:`SnapshotView`, :class:`EventView` and
:class:`ImageView`. Errors are the same classes on both sides: a daemon's error comes back
as the class it was raised as (see :mod:`kelpie.client`).

Snapshot export and import are not part of the service: in-process they write to and read
from files, over REST they are byte streams.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kelpie.api import (
    BuildEvent,
    BuildOptions,
    ProcessList,
    SandboxCreate,
    SandboxStats,
    TemplateCreate,
)
from kelpie.vm import ExecProcess, ExecResult, FileInfo

if TYPE_CHECKING:
    from kelpie.images import BlobProgress


class SandboxView(Protocol):
    """What every sandbox record says, in-process or from a daemon."""

    @property
    def id(self) -> str: ...
    @property
    def short_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def image(self) -> str | None: ...
    @property
    def image_digest(self) -> str | None: ...
    @property
    def workdir(self) -> str | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def command(self) -> Sequence[str] | None: ...
    @property
    def main_exit_code(self) -> int | None: ...
    @property
    def crash_reason(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def updated_at(self) -> float: ...


class SnapshotView(Protocol):
    """What every snapshot (or template) record says."""

    @property
    def id(self) -> str: ...
    @property
    def short_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def template(self) -> bool: ...
    @property
    def backend(self) -> str: ...
    @property
    def sandbox_id(self) -> str | None: ...
    @property
    def sandbox_name(self) -> str | None: ...
    @property
    def image(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    @property
    def created_at(self) -> float: ...


class EventView(Protocol):
    """One recorded state change of a sandbox."""

    @property
    def at(self) -> float: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str | None: ...


class ImageView(Protocol):
    """A stored image."""

    @property
    def id(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def size(self) -> int: ...


class PushView(Protocol):
    """What a push did: where the image went, and which blobs were sent, mounted or
    found there already."""

    @property
    def reference(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def uploaded(self) -> Sequence[str]: ...
    @property
    def mounted(self) -> Sequence[str]: ...
    @property
    def existing(self) -> Sequence[str]: ...
    @property
    def bytes_sent(self) -> int: ...


class SandboxService(Protocol):
    """Sandboxes, their commands and files, snapshots, templates and images.

    ``ref`` is a sandbox's (or snapshot's, or image's) name, id or unique id prefix.
    """

    # ---- sandboxes ----------------------------------------------------------------------
    async def create(self, request: SandboxCreate, /, *,
                     progress: Callable[[str], None] | None = None) -> SandboxView:
        """Create and start a sandbox; its record once it runs. ``progress`` hears each
        step (image unpacking, disk building, boot)."""
        ...

    async def list_sandboxes(self, *, all: bool = False) -> Sequence[SandboxView]:
        """Running and paused sandboxes (``all``: every one)."""
        ...

    async def inspect(self, ref: str) -> SandboxView:
        """One sandbox's record."""
        ...

    async def start(self, ref: str) -> SandboxView:
        """Start a stopped or crashed sandbox."""
        ...

    async def stop(self, ref: str, *, timeout: float | None = None) -> SandboxView:
        """Shut a sandbox down (``timeout=0``: at once)."""
        ...

    async def kill(self, ref: str, *, signal: int | str | None = None) -> SandboxView:
        """Stop a sandbox at once; with ``signal`` (number or name), send that to its
        main command instead."""
        ...

    async def set_network(self, ref: str, *, allow: Sequence[str] = (),
                          deny: Sequence[str] = (), network: str | None = None,
                          ) -> SandboxView:
        """Replace a sandbox's egress rules (and switch between nat and policy)."""
        ...

    async def pause(self, ref: str) -> SandboxView:
        """Freeze a running sandbox."""
        ...

    async def set_timeout(self, ref: str, seconds: float | None, *,
                          on_timeout: str | None = None) -> SandboxView:
        """Give a sandbox a timeout ``seconds`` from now (None: none); when it passes,
        ``on_timeout`` (remove, pause or stop; None: as before) happens to it."""
        ...

    async def rename(self, ref: str, name: str) -> SandboxView:
        """Give a sandbox another name (its id stays)."""
        ...

    async def wait_main(self, ref: str) -> int | None:
        """Wait for the sandbox's main command to end; its exit code (None: it has none,
        or its end was not seen)."""
        ...

    async def exec_detached(
        self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, user: str | None = None,
    ) -> str | None:
        """Start a command and leave it running unobserved; its exec id."""
        ...

    async def fork(self, ref: str, count: int, *, name_prefix: str | None = None,
                   names: Sequence[str] | None = None,
                   disk_mib: int | None = None) -> Sequence[SandboxView]:
        """``count`` children of a running sandbox, each a copy of it now (``disk_mib``:
        their root disk, grown from the parent's)."""
        ...

    async def resume(self, ref: str) -> SandboxView:
        """Let a paused sandbox run again."""
        ...

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Delete a sandbox (``force``: even a running one)."""
        ...

    async def events(self, ref: str) -> Sequence[EventView]:
        """The sandbox's recorded events, oldest first."""
        ...

    def watch_events(self, *, since: float | None = None, until: float | None = None,
                     sandboxes: Sequence[str] = (), kinds: Sequence[str] = (),
                     states: Sequence[str] = ()) -> AsyncIterator[EventView]:
        """Every sandbox's events as they are recorded, from ``since`` (None: now) until
        ``until`` (None: until the caller stops), narrowed by sandbox, kind and state."""
        ...

    async def stats(self, ref: str) -> SandboxStats:
        """A sample of what the sandbox uses (host's view and the guest's counters)."""
        ...

    async def stats_all(self) -> Sequence[SandboxStats]:
        """A sample of every running or paused sandbox."""
        ...

    async def processes(self, ref: str) -> ProcessList:
        """The processes in the sandbox's guest."""
        ...

    async def read_logs(self, ref: str, *, tail: int | None = None,
                        console: bool = False) -> bytes:
        """The logs so far (main command's output, else the console)."""
        ...

    def follow_logs(self, ref: str, *, tail: int | None = None,
                    console: bool = False) -> AsyncIterator[bytes]:
        """The logs so far, then what is written until the sandbox is at rest."""
        ...

    # ---- commands -----------------------------------------------------------------------
    async def exec(self, ref: str, argv: Sequence[str], *,
                   env: Mapping[str, str] | None = None, cwd: str | None = None,
                   user: str | None = None, stdin: bytes | None = None,
                   timeout: float | None = None) -> ExecResult:
        """Run a command to completion (ExecTimeout past ``timeout``)."""
        ...

    def exec_stream(self, ref: str, argv: Sequence[str], *,
                    env: Mapping[str, str] | None = None, cwd: str | None = None,
                    user: str | None = None, timeout: float | None = None,
                    pty: bool = False) -> AbstractAsyncContextManager[ExecProcess]:
        """Start a command and stream it; leaving the block early kills it."""
        ...

    # ---- files --------------------------------------------------------------------------
    async def read_file(self, ref: str, path: str) -> bytes:
        """A whole file."""
        ...

    def read_file_stream(self, ref: str, path: str) -> AsyncIterator[bytes]:
        """A file in chunks."""
        ...

    async def write_file(self, ref: str, path: str, data: bytes | AsyncIterable[bytes], *,
                         mode: int = 0o644) -> None:
        """Write a file atomically, from bytes or a stream of chunks."""
        ...

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        ...

    async def mkdir(self, ref: str, path: str, *, mode: int = 0o755) -> None:
        """Create a directory and its missing parents."""
        ...

    async def remove_path(self, ref: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        ...

    # ---- snapshots and templates --------------------------------------------------------
    async def snapshot(self, ref: str, *, name: str | None = None, kind: str = "full",
                       leave_paused: bool = False, workspace: str | None = None,
                       ) -> SnapshotView:
        """Snapshot a sandbox (kind full, disk or checkpoint)."""
        ...

    async def list_snapshots(self, *, templates: bool | None = None,
                             ) -> Sequence[SnapshotView]:
        """Snapshots (``templates``: only templates, or only plain ones)."""
        ...

    async def inspect_snapshot(self, ref: str) -> SnapshotView:
        """One snapshot or template."""
        ...

    async def delete_snapshot(self, ref: str, *, template: bool = False) -> None:
        """Delete a snapshot or template (``template``: only a template)."""
        ...

    async def restore(self, ref: str, *, name: str | None = None, paused: bool = False,
                      env: Mapping[str, str] | None = None) -> SandboxView:
        """A new sandbox from a snapshot, as it was when captured."""
        ...

    async def restore_into(self, sandbox: str, snapshot: str, *, paused: bool = False,
                           ) -> SandboxView:
        """Roll a stopped sandbox back to one of its own snapshots."""
        ...

    async def create_template(self, request: TemplateCreate, /) -> SnapshotView:
        """Boot a sandbox once and keep its snapshot as a template."""
        ...

    # ---- images -------------------------------------------------------------------------
    async def list_images(self) -> Sequence[ImageView]:
        """The stored images."""
        ...

    async def inspect_image(self, ref: str) -> ImageView:
        """One stored image."""
        ...

    async def remove_image(self, ref: str, *, force: bool = False) -> builtins.list[str]:
        """Untag or delete a stored image; the digests deleted."""
        ...

    async def pull_image(self, reference: str, *, platform: str | None = None,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> ImageView:
        """Pull an image from a registry; ``progress(digest, done, total)`` per blob."""
        ...

    async def commit(self, ref: str, reference: str, *,
                     message: str | None = None) -> ImageView:
        """A sandbox's file system changes over its image, stored as image ``reference``."""
        ...

    async def build(self, context: Path | str, options: BuildOptions | None = None, /, *,
                    progress: Callable[[BuildEvent], None] | None = None, **fields: Any,
                    ) -> ImageView:
        """Build the Dockerfile in the directory ``context`` (see :class:`BuildOptions`);
        ``progress`` gets each step, note and chunk of RUN output."""
        ...

    async def push_image(self, image: str, reference: str | None = None, *,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> PushView:
        """Push a stored image to a registry (``reference``: where; default its name)."""
        ...


if TYPE_CHECKING:
    # mypy proves both implementations conform (a missing or mistyped call fails the check).
    from kelpie.client import DaemonClient
    from kelpie.runtime import Runtime

    def _runtime_is_a_service(runtime: Runtime) -> SandboxService:
        return runtime

    def _client_is_a_service(client: DaemonClient) -> SandboxService:
        return client
