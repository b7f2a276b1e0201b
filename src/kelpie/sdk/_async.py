"""The async SDK: :class:`AsyncSandbox` and its files, written once over the sandbox service.

Whether the sandbox lives in this process's runtime or in a daemon, every call goes to a
:class:`~kelpie.service.SandboxService`; nothing here knows which.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Self

from kelpie._units import optional_mib
from kelpie.api import (
    BuildEvent,
    ProcessList,
    SandboxCreate,
    SandboxStats,
    TeleportMode,
    TeleportProgress,
    TeleportReport,
    TemplateCreate,
    validated,
)
from kelpie.api import Sandbox as SandboxRecord
from kelpie.api import Snapshot as SnapshotRecord
from kelpie.client import DaemonClient
from kelpie.runtime import Runtime
from kelpie.sdk._connect import Connection, attach, connect
from kelpie.service import SandboxService, sandbox_record, snapshot_record
from kelpie.teleport import TeleportHost
from kelpie.vm import ExecProcess, ExecResult, FileInfo

BytesLike = bytes | bytearray | memoryview
"""What a file write takes as one payload (not as an iterable of chunks)."""


class AsyncFiles:
    """Files in a sandbox: read and write (whole or in chunks), list, mkdir, remove."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """A whole file's bytes."""
        return await self._sandbox._service.read_file(self._sandbox.id, path)

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """A file's bytes in chunks, as they arrive (for files too big to hold at once)."""
        async for chunk in self._sandbox._service.read_file_stream(self._sandbox.id, path):
            yield chunk

    async def write(self, path: str, data: BytesLike | str | AsyncIterable[bytes], *,
                    mode: int = 0o644) -> None:
        """Write a file atomically: bytes-like (bytes, bytearray, memoryview) or text
        (UTF-8 encoded) as one payload, or an async iterable of chunks streamed as they
        come."""
        raw: bytes | AsyncIterable[bytes]
        if isinstance(data, str):
            raw = data.encode()
        elif isinstance(data, BytesLike):
            raw = bytes(data)
        else:
            raw = data
        await self._sandbox._service.write_file(self._sandbox.id, path, raw, mode=mode)

    async def list(self, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        return await self._sandbox._service.list_dir(self._sandbox.id, path)

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """Create a directory and its missing parents."""
        await self._sandbox._service.mkdir(self._sandbox.id, path, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        await self._sandbox._service.remove_path(self._sandbox.id, path, recursive=recursive)


class AsyncSandbox:
    """A sandbox, driven with ``await``. Make one with :meth:`create`, :meth:`restore` or
    :meth:`attach`."""

    def __init__(self, connection: Connection, record: SandboxRecord) -> None:
        self._connection = connection
        self._service: SandboxService = connection.service
        self._record = record
        self.files = AsyncFiles(self)
        """The sandbox's files."""

    @classmethod
    async def create(
        cls,
        image: str | None = None,
        *,
        name: str | None = None,
        cpus: int | None = None,
        memory: int | str | None = None,
        disk: int | str | None = None,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        ports: Sequence[str] = (),
        network: str = "none",
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        backend: str | None = None,
        arch: str | None = None,
        command: Sequence[str] | None = None,
        template: str | None = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        restart: str | None = None,
        stop_timeout: float | None = None,
        timeout: float | None = None,
        on_timeout: str = "remove",
        daemon: str | None = None,
        token: str | None = None,
    ) -> AsyncSandbox:
        """Create and start a sandbox; returns once it runs.

        ``image``: a stored image (tag, digest, id prefix); None runs the guest kit's own
        userland. ``memory`` and ``disk`` (the root disk, with an image; default 10 GiB,
        sparse) in MiB or with a unit (``"512m"``, ``"2g"``). ``volumes``:
        ``HOST:GUEST[:ro]``; ``ports``: ``[IP:]HOST:GUEST``; ``network``: ``none``,
        ``nat`` (the internet, never the host or private networks) or ``policy`` (only
        what ``allow`` names); ``allow``/``deny``: egress rules ``TARGET[:PORT]`` (see
        :class:`kelpie.vm.EgressPolicy`); ``arch``: the guest's architecture (``x86_64``,
        ``aarch64``; default the host's, another one is emulated); ``command``: a
        main command whose output becomes the logs, started again when it ends as
        ``restart`` says (``no``, ``on-failure[:N]``, ``always``); ``stop_timeout``: seconds
        a stop waits for the guest before the VM is killed; ``timeout``: seconds after
        which ``on_timeout`` happens to the sandbox (``remove``, ``pause`` or ``stop``;
        see :meth:`set_timeout`); ``hostname``, ``labels``,
        ``workdir``, ``user``: as Docker's flags. ``template``: start by restoring this
        template (then only ``name``, ``env`` and ``labels`` may be given). ``daemon``: the
        daemon's URL (``unix:///PATH`` or ``http(s)://HOST:PORT``, ``token`` for TCP); None
        creates it in this process.
        """
        request = validated(SandboxCreate, {
            "image": image, "name": name, "cpus": cpus,
            "memory_mib": optional_mib(memory, "memory"), "disk_mib": optional_mib(disk, "disk"),
            "env": dict(env or {}), "volumes": list(volumes), "ports": list(ports),
            "network": network, "allow": list(allow), "deny": list(deny), "backend": backend,
            "arch": arch,
            "command": None if command is None else list(command), "template": template,
            "hostname": hostname, "labels": dict(labels or {}), "workdir": workdir,
            "user": user, "restart": restart, "stop_timeout": stop_timeout,
            "timeout": timeout, "on_timeout": on_timeout,
        }, "sandbox")
        connection = await connect(daemon, token)
        async with _closed_on_error(connection):
            created = await connection.service.create(request)
            return cls(connection, sandbox_record(created))

    @classmethod
    async def restore(cls, snapshot: str, *, name: str | None = None, paused: bool = False,
                      daemon: str | None = None, token: str | None = None) -> AsyncSandbox:
        """A new sandbox from a snapshot (name or id), as it was when captured.

        In-process snapshots belong to this process's runtime; pass ``daemon`` for the
        daemon's.
        """
        connection = await connect(daemon, token)
        async with _closed_on_error(connection):
            restored = await connection.service.restore(snapshot, name=name, paused=paused)
            return cls(connection, sandbox_record(restored))

    @staticmethod
    async def create_template(
        name: str, image: str | None = None, *, cpus: int | None = None,
        memory: int | str | None = None, disk: int | str | None = None,
        env: Mapping[str, str] | None = None,
        network: str = "none", allow: Sequence[str] = (), deny: Sequence[str] = (),
        backend: str | None = None, daemon: str | None = None, token: str | None = None,
    ) -> SnapshotRecord:
        """Boot ``image`` once and keep its snapshot as template ``name`` (for
        ``create(template=name)``); its clones keep its network and egress rules."""
        request = validated(TemplateCreate, {
            "name": name, "image": image, "cpus": cpus,
            "memory_mib": optional_mib(memory, "memory"), "disk_mib": optional_mib(disk, "disk"),
            "env": dict(env or {}), "network": network, "allow": list(allow),
            "deny": list(deny), "backend": backend}, "template")
        connection = await connect(daemon, token)
        try:
            return snapshot_record(await connection.service.create_template(request))
        finally:
            await connection.close()

    @staticmethod
    async def build_image(
        context: str | os.PathLike[str], *, tag: Sequence[str] = (), file: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None, target: str | None = None,
        platform: str | None = None, network: str = "nat", no_cache: bool = False,
        step_timeout: float = 1800, progress: Callable[[BuildEvent], None] | None = None,
        daemon: str | None = None, token: str | None = None,
    ) -> str:
        """Build the Dockerfile in the directory ``context`` (every RUN in a micro-VM;
        unchanged steps from the build cache) and store it as ``tag``; the image's digest.
        ``progress`` receives each step, note and chunk of RUN output."""
        connection = await connect(daemon, token)
        try:
            built = await connection.service.build(
                os.fspath(context), tag=list(tag), file=file,
                build_arg=[f"{k}={v}" for k, v in (build_args or {}).items()], target=target,
                platform=platform, network=network, no_cache=no_cache,
                step_timeout=step_timeout, progress=progress)
            return built.digest
        finally:
            await connection.close()

    @classmethod
    async def attach(cls, ref: str, *, daemon: str | None = None,
                     token: str | None = None) -> AsyncSandbox:
        """An existing sandbox of a daemon (default: the local one), by name or id."""
        connection = attach(daemon, token)
        async with _closed_on_error(connection):
            return cls(connection, sandbox_record(await connection.service.inspect(ref)))

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._record.id

    @property
    def name(self) -> str:
        """The sandbox's name."""
        return self._record.name

    async def info(self) -> SandboxRecord:
        """The sandbox's current record (state, config, main command's exit...)."""
        self._record = sandbox_record(await self._service.inspect(self.id))
        return self._record

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None) -> ExecResult:
        """Run a command to completion; its exit code and output.

        Past ``timeout`` seconds the command is killed and an error raised (ExecTimeout).
        """
        return await self._service.exec(self.id, argv, env=env, cwd=cwd, user=user,
                                        stdin=stdin, timeout=timeout)

    def exec_stream(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | None = None,
                    timeout: float | None = None, tty: bool = False,
                    ) -> contextlib.AbstractAsyncContextManager[ExecProcess]:
        """Start a command and stream it (``async with``): write stdin, send signals,
        resize its terminal (``tty``), iterate its output events. Leaving early kills it."""
        return self._service.exec_stream(self.id, argv, env=env, cwd=cwd, user=user,
                                         timeout=timeout, pty=tty)

    async def stats(self) -> SandboxStats:
        """A sample of what the sandbox uses: the host's view of its VM (CPU time, resident
        memory, disk bytes) and the guest's own counters (CPU, memory, root disk, network,
        processes); ``disk_full`` says whether writes fail for want of space."""
        return await self._service.stats(self.id)

    async def processes(self) -> ProcessList:
        """The processes in the sandbox's guest (``kelpie top``)."""
        return await self._service.processes(self.id)

    async def logs(self, *, tail: int | None = None) -> bytes:
        """The main command's output (else the console), the last ``tail`` lines if given."""
        return await self._service.read_logs(self.id, tail=tail)

    async def follow_logs(self, *, tail: int | None = None) -> AsyncIterator[bytes]:
        """The logs so far, then each new chunk until the sandbox stops."""
        async for chunk in self._service.follow_logs(self.id, tail=tail):
            yield chunk

    async def snapshot(self, *, name: str | None = None, kind: str = "full",
                       leave_paused: bool = False) -> SnapshotRecord:
        """Snapshot the sandbox (``full``: memory + devices + disk; ``disk`` when stopped).

        The sandbox goes on running (or stays paused with ``leave_paused``); restore with
        :meth:`restore`.
        """
        return snapshot_record(await self._service.snapshot(
            self.id, name=name, kind=kind, leave_paused=leave_paused))

    async def teleport(self, to: str, *, token: str | None = None, mode: str = "auto",
                       without_volumes: bool = False,
                       progress: Callable[[TeleportProgress], None] | None = None,
                       arch: str | None = None) -> TeleportReport:
        """Move the sandbox to the daemon at ``to`` (its token: ``token``); this object then
        drives it there. ``mode``: live, full, checkpoint or auto (the best the two hosts
        support); the report says which ran, why, the downtime and the bytes sent.
        ``arch``: the guest architecture it should have there (another one than its own
        moves it as a checkpoint).

        A sandbox in a daemon is moved by that daemon; one in this process's runtime by
        this process (a crash part-way is settled the next time a daemon opens its state).
        """
        service = self._service
        if isinstance(service, DaemonClient):
            report = await service.teleport(self.id, to, token=token, mode=mode,
                                            without_volumes=without_volumes,
                                            progress=progress, arch=arch)
        else:
            assert isinstance(service, Runtime)
            host = TeleportHost(service)
            try:
                report = await host.teleporter.teleport(
                    self.id, to=to, token=token, mode=TeleportMode(mode),
                    without_volumes=without_volumes, progress=progress, arch=arch)
            finally:
                await host.close()
        old = self._connection
        self._connection = attach(to, token)
        self._service = self._connection.service
        self._record = report.sandbox
        await old.close()
        return report

    async def commit(self, reference: str, *, message: str | None = None) -> str:
        """Store this sandbox's file system changes over its image as image ``reference``
        (its env, workdir, user and command carried over); the new image's digest."""
        return (await self._service.commit(self.id, reference, message=message)).digest

    async def pause(self) -> None:
        """Freeze the sandbox."""
        await self._service.pause(self.id)

    async def fork(self, count: int, *, name_prefix: str | None = None,
                   names: Sequence[str] | None = None,
                   disk_mib: int | None = None) -> list[AsyncSandbox]:
        """``count`` children of this (running) sandbox, each a copy of it now: named
        ``names``, else ``PREFIX-1``... (``PREFIX``: ``name_prefix`` or this sandbox's
        name). This sandbox pauses only while it is captured; the children have their own
        id, host name, RNG and disk, no published ports, and share its captured memory
        copy-on-write where the backend can. ``disk_mib``: their root disk, at least this
        sandbox's (it grows while they run)."""
        children = await self._service.fork(self.id, count, name_prefix=name_prefix,
                                             names=names, disk_mib=disk_mib)
        return [AsyncSandbox(self._child_connection(), sandbox_record(child))
                for child in children]

    def _child_connection(self) -> Connection:
        """A connection of its own for a sandbox made through this one's (one each, so
        that removing one releases only its own)."""
        service = self._service
        if isinstance(service, DaemonClient):
            return attach(service.url, service.token)
        return Connection(service, self._connection.close)

    async def resume(self) -> None:
        """Let a paused sandbox run again."""
        await self._service.resume(self.id)

    async def stop(self) -> None:
        """Shut the sandbox down gracefully (it can be started again by the CLI or API)."""
        await self._service.stop(self.id)

    async def kill(self, *, signal: int | str | None = None) -> None:
        """Stop the sandbox at once (its VM is killed); with ``signal`` (``"TERM"``, 15...),
        send that to its main command instead."""
        self._record = sandbox_record(await self._service.kill(self.id, signal=signal))

    async def set_timeout(self, seconds: float | None, *,
                          on_timeout: str | None = None) -> None:
        """Give the sandbox a timeout ``seconds`` from now, replacing any it had (None: no
        timeout); when it passes, ``on_timeout`` happens to it: ``remove`` (the default),
        ``pause`` or ``stop`` (None: as set before); ``info().expires_at`` says when."""
        self._record = sandbox_record(await self._service.set_timeout(
            self.id, seconds, on_timeout=on_timeout))

    async def set_network(self, *, allow: Sequence[str] = (), deny: Sequence[str] = (),
                          network: str | None = None) -> None:
        """Replace the sandbox's egress rules (and switch between ``nat`` and ``policy``);
        a running sandbox obeys them from its next packet."""
        self._record = sandbox_record(await self._service.set_network(
            self.id, allow=allow, deny=deny, network=network))

    async def remove(self) -> None:
        """Kill the sandbox if it runs and delete it; releases the connection."""
        try:
            await self._service.remove(self.id, force=True)
        finally:
            await self._connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.remove()


@contextlib.asynccontextmanager
async def _closed_on_error(connection: Connection) -> AsyncIterator[None]:
    """Release the connection if making the sandbox fails (it then has no owner)."""
    try:
        yield
    except BaseException:
        await connection.close()
        raise
