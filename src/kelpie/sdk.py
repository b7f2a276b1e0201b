"""The Python SDK: :class:`AsyncSandbox` and its blocking twin :class:`Sandbox`.

A sandbox is created in-process by default: a :class:`~kelpie.runtime.Runtime` private to
this process (and event loop) owns it, with its records under
``<state dir>/sdk/<pid>-<n>`` and images from the shared image store. With
``daemon="unix:///..."`` or ``daemon="http://host:port"`` (plus ``token``) the sandbox
lives in that daemon instead and outlives this process.

Use them as context managers: leaving the block kills and removes the sandbox. A sandbox
that is never cleaned up keeps its VM running (VMs are detached from the process).

::

    with Sandbox.create(image="kelpie/demo", memory=256) as box:
        print(box.exec(["echo", "hi"]).stdout)
        box.files.write("/tmp/x", b"data")
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import os
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from kelpie.api import Sandbox as SandboxRecord
from kelpie.api import SandboxCreate, TemplateCreate
from kelpie.api import Snapshot as SnapshotRecord
from kelpie.client import DaemonClient
from kelpie.runtime import Runtime
from kelpie.vm import ExecEvent, ExecProcess, ExecResult, FileInfo

T = TypeVar("T")


class _Driver:
    """What a sandbox needs from its owner: an in-process runtime or a daemon's client.

    Both offer the same calls for commands, files and lifecycle; the subclasses adapt
    the rest (records, streams, logs, snapshots).
    """

    def __init__(self, target: Runtime | DaemonClient) -> None:
        self.target = target

    async def exec(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None,
                   cwd: str | None, user: str | None, stdin: bytes | None,
                   timeout: float | None) -> ExecResult:
        return await self.target.exec(ref, argv, env=env, cwd=cwd, user=user, stdin=stdin,
                                      timeout=timeout)

    async def read_file(self, ref: str, path: str) -> bytes:
        return await self.target.read_file(ref, path)

    async def write_file(self, ref: str, path: str, data: bytes, *, mode: int) -> None:
        await self.target.write_file(ref, path, data, mode=mode)

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        return await self.target.list_dir(ref, path)

    async def remove_path(self, ref: str, path: str, *, recursive: bool) -> None:
        await self.target.remove_path(ref, path, recursive=recursive)

    async def pause(self, ref: str) -> object:
        return await self.target.pause(ref)

    async def resume(self, ref: str) -> object:
        return await self.target.resume(ref)

    async def stop(self, ref: str, *, timeout: float | None = None) -> object:
        return await self.target.stop(ref, timeout=timeout)

    async def remove(self, ref: str, *, force: bool) -> None:
        await self.target.remove(ref, force=force)

    async def create(self, body: SandboxCreate) -> SandboxRecord:
        raise NotImplementedError

    async def record(self, ref: str) -> SandboxRecord:
        raise NotImplementedError

    def exec_stream(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None,
                    cwd: str | None, user: str | None, timeout: float | None, tty: bool,
                    ) -> contextlib.AbstractAsyncContextManager[ExecProcess]:
        raise NotImplementedError

    async def logs(self, ref: str, tail: int | None) -> bytes:
        raise NotImplementedError

    async def snapshot(self, ref: str, name: str | None, kind: str,
                       leave_paused: bool) -> SnapshotRecord:
        raise NotImplementedError

    async def restore(self, snapshot: str, name: str | None, paused: bool) -> SandboxRecord:
        raise NotImplementedError

    async def create_template(self, body: TemplateCreate) -> SnapshotRecord:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the driver holds."""


class _RuntimeDriver(_Driver):
    """Sandboxes owned by this process's runtime."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.runtime = runtime

    async def create(self, body: SandboxCreate) -> SandboxRecord:
        info = await self.runtime.create(
            image=body.image, name=body.name, cpus=body.cpus, memory_mib=body.memory_mib,
            env=body.env, volumes=body.volumes, ports=body.ports, network=body.network,
            backend=body.backend, hostname=body.hostname, labels=body.labels,
            command=body.command, template=body.template)
        return SandboxRecord.from_info(info)

    async def record(self, ref: str) -> SandboxRecord:
        return SandboxRecord.from_info(self.runtime.get(ref))

    def exec_stream(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None,
                    cwd: str | None, user: str | None, timeout: float | None, tty: bool,
                    ) -> contextlib.AbstractAsyncContextManager[ExecProcess]:
        return self.runtime.exec_stream(ref, argv, env=env, cwd=cwd, user=user,
                                        timeout=timeout, pty=tty)

    async def logs(self, ref: str, tail: int | None) -> bytes:
        return self.runtime.logs(ref, tail=tail)

    async def snapshot(self, ref: str, name: str | None, kind: str,
                       leave_paused: bool) -> SnapshotRecord:
        return SnapshotRecord.from_info(await self.runtime.snapshot(
            ref, name=name, kind=kind, leave_paused=leave_paused))

    async def restore(self, snapshot: str, name: str | None, paused: bool) -> SandboxRecord:
        return SandboxRecord.from_info(await self.runtime.restore(snapshot, name=name,
                                                                  paused=paused))

    async def create_template(self, body: TemplateCreate) -> SnapshotRecord:
        return SnapshotRecord.from_info(await self.runtime.create_template(
            name=body.name, image=body.image, cpus=body.cpus, memory_mib=body.memory_mib,
            env=body.env, network=body.network, backend=body.backend))

    async def close(self) -> None:
        """The runtime is shared by every in-process sandbox of the loop: kept open."""


class _DaemonDriver(_Driver):
    """Sandboxes owned by a daemon."""

    def __init__(self, client: DaemonClient) -> None:
        super().__init__(client)
        self.client = client

    async def create(self, body: SandboxCreate) -> SandboxRecord:
        return await self.client.create(body)

    async def record(self, ref: str) -> SandboxRecord:
        return await self.client.get(ref)

    def exec_stream(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None,
                    cwd: str | None, user: str | None, timeout: float | None, tty: bool,
                    ) -> contextlib.AbstractAsyncContextManager[ExecProcess]:
        return self.client.exec_stream(ref, argv, env=env, cwd=cwd, user=user,
                                       timeout=timeout, tty=tty)

    async def logs(self, ref: str, tail: int | None) -> bytes:
        return b"".join([chunk async for chunk in self.client.logs(ref, tail=tail)])

    async def snapshot(self, ref: str, name: str | None, kind: str,
                       leave_paused: bool) -> SnapshotRecord:
        return await self.client.snapshot(ref, name=name, kind=kind, leave_paused=leave_paused)

    async def restore(self, snapshot: str, name: str | None, paused: bool) -> SandboxRecord:
        return await self.client.restore(snapshot, name=name, paused=paused)

    async def create_template(self, body: TemplateCreate) -> SnapshotRecord:
        return await self.client.create_template(body)

    async def close(self) -> None:
        await self.client.close()


# ---- the in-process runtime: one per event loop -----------------------------------------
_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, Runtime]] = (
    weakref.WeakKeyDictionary())
_runtime_numbers = itertools.count()
_runtime_lock = threading.Lock()


async def _local_runtime() -> Runtime:
    """This loop's in-process runtime for the current state dir, opened on first use."""
    from kelpie._paths import images_dir, state_dir
    from kelpie.images import ImageStore

    loop = asyncio.get_running_loop()
    base = state_dir()
    with _runtime_lock:
        runtimes = _runtimes.setdefault(loop, {})
        runtime = runtimes.get(base)
        if runtime is None:
            _prune_dead(base / "sdk")
            data_dir = base / "sdk" / f"{os.getpid()}-{next(_runtime_numbers)}"
            runtime = Runtime(data_dir=data_dir, images=ImageStore(images_dir()))
            runtimes[base] = runtime
    await runtime.open()
    return runtime


async def _driver(daemon: str | None, token: str | None) -> _RuntimeDriver | _DaemonDriver:
    if daemon is None:
        return _RuntimeDriver(await _local_runtime())
    return _DaemonDriver(DaemonClient(daemon, token=token))


def _prune_dead(sdk_dir: Path) -> None:
    """Delete the data dirs of in-process runtimes whose process is gone and that kept no
    sandbox (a process that exited without removing its sandboxes leaves them listed)."""
    import shutil
    import sqlite3

    if not sdk_dir.is_dir():
        return
    for entry in sdk_dir.iterdir():
        pid_text = entry.name.partition("-")[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            uri = f"file:{entry / 'runtime.db'}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                left = db.execute("SELECT count(*) FROM sandboxes").fetchone()[0]
        except sqlite3.Error:
            left = 0  # no database (or not even a table): nothing was ever recorded
        if not left:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the async SDK ----------------------------------------------------------------------
class AsyncFiles:
    """Files in a sandbox: ``read``, ``write``, ``list``, ``remove``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """A whole file's bytes."""
        return await self._sandbox._driver.read_file(self._sandbox.id, path)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write a file atomically (text is UTF-8 encoded)."""
        raw = data.encode() if isinstance(data, str) else data
        await self._sandbox._driver.write_file(self._sandbox.id, path, raw, mode=mode)

    async def list(self, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        return await self._sandbox._driver.list_dir(self._sandbox.id, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        await self._sandbox._driver.remove_path(self._sandbox.id, path, recursive=recursive)


class AsyncSandbox:
    """A sandbox, driven with ``await``. Make one with :meth:`create` or :meth:`attach`."""

    def __init__(self, driver: _Driver, record: SandboxRecord) -> None:
        self._driver = driver
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
        memory: int | None = None,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        ports: Sequence[str] = (),
        network: str = "none",
        backend: str | None = None,
        command: Sequence[str] | None = None,
        template: str | None = None,
        daemon: str | None = None,
        token: str | None = None,
    ) -> AsyncSandbox:
        """Create and start a sandbox; returns once it runs.

        ``image``: a stored image (tag, digest, id prefix); None runs the guest kit's own
        userland. ``memory`` in MiB. ``volumes``: ``HOST:GUEST[:ro]``; ``ports``:
        ``[IP:]HOST:GUEST``; ``network``: ``none`` or ``nat``; ``command``: a main command
        whose output becomes the logs. ``template``: start by restoring this template
        (then only ``name`` and ``env`` may be given). ``daemon``: the daemon's URL
        (``unix:///PATH`` or ``http(s)://HOST:PORT``, ``token`` for TCP); None creates it
        in this process.
        """
        body = SandboxCreate(image=image, name=name, cpus=cpus, memory_mib=memory,
                             env=dict(env or {}), volumes=list(volumes), ports=list(ports),
                             network=network,
                             backend=backend,
                             command=None if command is None else list(command),
                             template=template)
        driver = await _driver(daemon, token)
        try:
            record = await driver.create(body)
        except BaseException:
            await driver.close()
            raise
        return cls(driver, record)

    @classmethod
    async def restore(cls, snapshot: str, *, name: str | None = None, paused: bool = False,
                      daemon: str | None = None, token: str | None = None) -> AsyncSandbox:
        """A new sandbox from a snapshot (name or id), as it was when captured.

        In-process snapshots belong to this process's runtime; pass ``daemon`` for the
        daemon's.
        """
        driver = await _driver(daemon, token)
        try:
            record = await driver.restore(snapshot, name, paused)
        except BaseException:
            await driver.close()
            raise
        return cls(driver, record)

    @staticmethod
    async def create_template(
        name: str, image: str | None = None, *, cpus: int | None = None,
        memory: int | None = None, env: Mapping[str, str] | None = None,
        network: str = "none", backend: str | None = None, daemon: str | None = None,
        token: str | None = None,
    ) -> SnapshotRecord:
        """Boot ``image`` once and keep its snapshot as template ``name`` (for
        ``create(template=name)``)."""
        body = TemplateCreate(name=name, image=image, cpus=cpus, memory_mib=memory,
                              env=dict(env or {}), network=network,
                              backend=backend)
        driver = await _driver(daemon, token)
        try:
            return await driver.create_template(body)
        finally:
            await driver.close()

    @classmethod
    async def attach(cls, ref: str, *, daemon: str | None = None,
                     token: str | None = None) -> AsyncSandbox:
        """An existing sandbox of a daemon (default: the local one), by name or id."""
        driver = _DaemonDriver(DaemonClient(daemon, token=token))
        try:
            record = await driver.record(ref)
        except BaseException:
            await driver.close()
            raise
        return cls(driver, record)

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
        self._record = await self._driver.record(self.id)
        return self._record

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None) -> ExecResult:
        """Run a command to completion; its exit code and output.

        Past ``timeout`` seconds the command is killed and an error raised (ExecTimeout).
        """
        return await self._driver.exec(self.id, argv, env=env, cwd=cwd, user=user,
                                       stdin=stdin, timeout=timeout)

    def exec_stream(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | None = None,
                    timeout: float | None = None, tty: bool = False,
                    ) -> contextlib.AbstractAsyncContextManager[ExecProcess]:
        """Start a command and stream it (``async with``): write stdin, send signals,
        resize its terminal (``tty``), iterate its output events. Leaving early kills it."""
        return self._driver.exec_stream(self.id, argv, env=env, cwd=cwd, user=user,
                                        timeout=timeout, tty=tty)

    async def logs(self, *, tail: int | None = None) -> bytes:
        """The main command's output (else the console), the last ``tail`` lines if given."""
        return await self._driver.logs(self.id, tail)

    async def snapshot(self, *, name: str | None = None, kind: str = "full",
                       leave_paused: bool = False) -> SnapshotRecord:
        """Snapshot the sandbox (``full``: memory + devices + disk; ``disk`` when stopped).

        The sandbox goes on running (or stays paused with ``leave_paused``); restore with
        :meth:`restore`.
        """
        return await self._driver.snapshot(self.id, name, kind, leave_paused)

    async def pause(self) -> None:
        """Freeze the sandbox."""
        await self._driver.pause(self.id)

    async def resume(self) -> None:
        """Let a paused sandbox run again."""
        await self._driver.resume(self.id)

    async def stop(self) -> None:
        """Shut the sandbox down gracefully (it can be started again by the CLI or API)."""
        await self._driver.stop(self.id)

    async def kill(self) -> None:
        """Stop the sandbox at once (its VM is killed)."""
        await self._driver.stop(self.id, timeout=0)

    async def remove(self) -> None:
        """Kill the sandbox if it runs and delete it; releases the connection."""
        try:
            await self._driver.remove(self.id, force=True)
        finally:
            await self._driver.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.remove()


# ---- the blocking SDK -------------------------------------------------------------------
class _LoopThread:
    """One event loop in a daemon thread, shared by every blocking sandbox."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="kelpie-sdk", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()


class Files:
    """Files in a sandbox (blocking): ``read``, ``write``, ``list``, ``remove``."""

    def __init__(self, files: AsyncFiles, loop: _LoopThread) -> None:
        self._files = files
        self._loop = loop

    def read(self, path: str) -> bytes:
        """A whole file's bytes."""
        return self._loop.run(self._files.read(path))

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write a file atomically (text is UTF-8 encoded)."""
        self._loop.run(self._files.write(path, data, mode=mode))

    def list(self, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        return self._loop.run(self._files.list(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        self._loop.run(self._files.remove(path, recursive=recursive))


class Process:
    """A running command (blocking): stdin, signals, terminal size, its events."""

    def __init__(self, process: ExecProcess, loop: _LoopThread) -> None:
        self._process = process
        self._loop = loop
        self._events: AsyncIterator[ExecEvent] | None = None

    def write_stdin(self, data: bytes) -> None:
        """Send bytes to the command's stdin."""
        self._loop.run(self._process.write_stdin(data))

    def close_stdin(self) -> None:
        """End the command's input."""
        self._loop.run(self._process.close_stdin())

    def send_signal(self, signum: int) -> None:
        """Deliver a signal to the command."""
        self._loop.run(self._process.send_signal(signum))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the command's terminal."""
        self._loop.run(self._process.resize(rows, cols))

    def __iter__(self) -> Iterator[ExecEvent]:
        events = self._process.__aiter__()
        while True:
            try:
                yield self._loop.run(anext(events))  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def wait(self) -> ExecResult:
        """Wait for the end; the output not read yet, and the exit code."""
        return self._loop.run(self._process.wait())


class Sandbox:
    """A sandbox with blocking methods (the same as :class:`AsyncSandbox`'s)."""

    def __init__(self, sandbox: AsyncSandbox, loop: _LoopThread) -> None:
        self._async = sandbox
        self._loop = loop
        self.files = Files(sandbox.files, loop)
        """The sandbox's files."""

    @classmethod
    def create(
        cls,
        image: str | None = None,
        *,
        name: str | None = None,
        cpus: int | None = None,
        memory: int | None = None,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        ports: Sequence[str] = (),
        network: str = "none",
        backend: str | None = None,
        command: Sequence[str] | None = None,
        template: str | None = None,
        daemon: str | None = None,
        token: str | None = None,
    ) -> Sandbox:
        """Create and start a sandbox (see :meth:`AsyncSandbox.create`)."""
        loop = _LoopThread.get()
        sandbox = loop.run(AsyncSandbox.create(
            image, name=name, cpus=cpus, memory=memory, env=env, volumes=volumes, ports=ports,
            network=network, backend=backend, command=command, template=template,
            daemon=daemon, token=token))
        return cls(sandbox, loop)

    @classmethod
    def restore(cls, snapshot: str, *, name: str | None = None, paused: bool = False,
                daemon: str | None = None, token: str | None = None) -> Sandbox:
        """A new sandbox from a snapshot (see :meth:`AsyncSandbox.restore`)."""
        loop = _LoopThread.get()
        return cls(loop.run(AsyncSandbox.restore(snapshot, name=name, paused=paused,
                                                 daemon=daemon, token=token)), loop)

    @staticmethod
    def create_template(
        name: str, image: str | None = None, *, cpus: int | None = None,
        memory: int | None = None, env: Mapping[str, str] | None = None,
        network: str = "none", backend: str | None = None, daemon: str | None = None,
        token: str | None = None,
    ) -> SnapshotRecord:
        """Make a template (see :meth:`AsyncSandbox.create_template`)."""
        return _LoopThread.get().run(AsyncSandbox.create_template(
            name, image, cpus=cpus, memory=memory, env=env, network=network, backend=backend,
            daemon=daemon, token=token))

    def snapshot(self, *, name: str | None = None, kind: str = "full",
                 leave_paused: bool = False) -> SnapshotRecord:
        """Snapshot the sandbox (see :meth:`AsyncSandbox.snapshot`)."""
        return self._loop.run(self._async.snapshot(name=name, kind=kind,
                                                   leave_paused=leave_paused))

    @classmethod
    def attach(cls, ref: str, *, daemon: str | None = None, token: str | None = None,
               ) -> Sandbox:
        """An existing sandbox of a daemon (see :meth:`AsyncSandbox.attach`)."""
        loop = _LoopThread.get()
        return cls(loop.run(AsyncSandbox.attach(ref, daemon=daemon, token=token)), loop)

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._async.id

    @property
    def name(self) -> str:
        """The sandbox's name."""
        return self._async.name

    def info(self) -> SandboxRecord:
        """The sandbox's current record."""
        return self._loop.run(self._async.info())

    def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, stdin: bytes | None = None,
             timeout: float | None = None) -> ExecResult:
        """Run a command to completion (see :meth:`AsyncSandbox.exec`)."""
        return self._loop.run(self._async.exec(argv, env=env, cwd=cwd, user=user,
                                               stdin=stdin, timeout=timeout))

    @contextlib.contextmanager
    def exec_stream(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | None = None,
                    timeout: float | None = None, tty: bool = False) -> Iterator[Process]:
        """Start a command and stream it (``with``); leaving early kills it."""
        manager = self._async.exec_stream(argv, env=env, cwd=cwd, user=user,
                                          timeout=timeout, tty=tty)
        process = self._loop.run(manager.__aenter__())
        try:
            yield Process(process, self._loop)
        except BaseException as exc:
            if not self._loop.run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._loop.run(manager.__aexit__(None, None, None))

    def logs(self, *, tail: int | None = None) -> bytes:
        """The main command's output (else the console)."""
        return self._loop.run(self._async.logs(tail=tail))

    def pause(self) -> None:
        """Freeze the sandbox."""
        self._loop.run(self._async.pause())

    def resume(self) -> None:
        """Let a paused sandbox run again."""
        self._loop.run(self._async.resume())

    def stop(self) -> None:
        """Shut the sandbox down gracefully."""
        self._loop.run(self._async.stop())

    def kill(self) -> None:
        """Stop the sandbox at once."""
        self._loop.run(self._async.kill())

    def remove(self) -> None:
        """Kill the sandbox if it runs and delete it."""
        self._loop.run(self._async.remove())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
