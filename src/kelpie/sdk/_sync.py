"""The blocking SDK: :class:`Sandbox`, a thin wrapper that runs :class:`AsyncSandbox`'s
calls on one shared event loop thread. Every method forwards; the logic is the async one's.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import os
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from kelpie.api import BuildEvent, ProcessList, SandboxStats, TeleportProgress, TeleportReport
from kelpie.api import Sandbox as SandboxRecord
from kelpie.api import Snapshot as SnapshotRecord
from kelpie.sdk._async import AsyncFiles, AsyncSandbox, BytesLike
from kelpie.sdk._connect import close_local_runtimes
from kelpie.vm import ExecEvent, ExecProcess, ExecResult, FileInfo

T = TypeVar("T")
AT_EXIT_TIMEOUT = 10.0
"""Seconds the exiting process gives the SDK's loop to close its in-process runtimes."""


class _LoopThread:
    """One event loop in a daemon thread, shared by every blocking sandbox."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._closing: set[asyncio.Future[Any]] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kelpie-sdk",
                                       daemon=True)
        self.thread.start()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """The process is exiting (this daemon thread's loop still runs, for now): close
        the loop's in-process runtimes on it, or their tasks would die pending."""
        future = asyncio.run_coroutine_threadsafe(close_local_runtimes(), self.loop)
        with contextlib.suppress(Exception):  # a hung loop must not hold up the exit
            future.result(timeout=AT_EXIT_TIMEOUT)

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; its result here."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator that lives on the loop, one by one; leaving the
        loop early closes it there."""
        try:
            while True:
                try:
                    yield self.run(_next(source))
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                if threading.current_thread() is self.thread:
                    # dropped (garbage-collected) on the loop's own thread: waiting here
                    # would block the loop that has to run the close
                    closing = asyncio.ensure_future(close(), loop=self.loop)
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
                else:
                    self.run(close())


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


async def _chunks(source: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterable of chunks (e.g. a file read in parts) as an async one; each
    chunk is pulled in a worker thread so a slow source does not stall the loop."""
    iterator = iter(source)
    while (chunk := await asyncio.to_thread(next, iterator, None)) is not None:
        yield chunk


class Files:
    """Files in a sandbox (blocking): the same calls as :class:`AsyncFiles`."""

    def __init__(self, files: AsyncFiles, loop: _LoopThread) -> None:
        self._files = files
        self._loop = loop

    def read(self, path: str) -> bytes:
        """A whole file's bytes."""
        return self._loop.run(self._files.read(path))

    def read_stream(self, path: str) -> Iterator[bytes]:
        """A file's bytes in chunks."""
        return self._loop.iterate(self._files.read_stream(path))

    def write(self, path: str, data: BytesLike | str | Iterable[bytes], *,
              mode: int = 0o644) -> None:
        """Write a file atomically: bytes-like (bytes, bytearray, memoryview) or text
        (UTF-8 encoded) as one payload, any other iterable as chunks."""
        source = data if isinstance(data, BytesLike | str) else _chunks(data)
        self._loop.run(self._files.write(path, source, mode=mode))

    def list(self, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        return self._loop.run(self._files.list(path))

    def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """Create a directory and its missing parents."""
        self._loop.run(self._files.mkdir(path, mode=mode))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        self._loop.run(self._files.remove(path, recursive=recursive))


class Process:
    """A running command (blocking): stdin, signals, terminal size, its events."""

    def __init__(self, process: ExecProcess, loop: _LoopThread) -> None:
        self._process = process
        self._loop = loop

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
        events: AsyncIterator[ExecEvent] = self._process.__aiter__()
        return self._loop.iterate(events)

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
    ) -> Sandbox:
        """Create and start a sandbox (see :meth:`AsyncSandbox.create`)."""
        loop = _LoopThread.get()
        sandbox = loop.run(AsyncSandbox.create(
            image, name=name, cpus=cpus, memory=memory, disk=disk, env=env, volumes=volumes,
            ports=ports,
            network=network, allow=allow, deny=deny, backend=backend, arch=arch,
            command=command, template=template, hostname=hostname, labels=labels,
            workdir=workdir, user=user, restart=restart, stop_timeout=stop_timeout,
            timeout=timeout, on_timeout=on_timeout, daemon=daemon, token=token))
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
        memory: int | str | None = None, disk: int | str | None = None,
        env: Mapping[str, str] | None = None,
        network: str = "none", allow: Sequence[str] = (), deny: Sequence[str] = (),
        backend: str | None = None, daemon: str | None = None, token: str | None = None,
    ) -> SnapshotRecord:
        """Make a template (see :meth:`AsyncSandbox.create_template`)."""
        return _LoopThread.get().run(AsyncSandbox.create_template(
            name, image, cpus=cpus, memory=memory, disk=disk, env=env, network=network,
            allow=allow,
            deny=deny, backend=backend, daemon=daemon, token=token))

    @staticmethod
    def build_image(
        context: str | os.PathLike[str], *, tag: Sequence[str] = (), file: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None, target: str | None = None,
        platform: str | None = None, network: str = "nat", no_cache: bool = False,
        step_timeout: float = 1800, progress: Callable[[BuildEvent], None] | None = None,
        daemon: str | None = None, token: str | None = None,
    ) -> str:
        """Build an image from a Dockerfile; its digest (see
        :meth:`AsyncSandbox.build_image`)."""
        return _LoopThread.get().run(AsyncSandbox.build_image(
            context, tag=tag, file=file, build_args=build_args, target=target,
            platform=platform, network=network, no_cache=no_cache, step_timeout=step_timeout,
            progress=progress, daemon=daemon, token=token))

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

    def stats(self) -> SandboxStats:
        """A sample of what the sandbox uses (see :meth:`AsyncSandbox.stats`)."""
        return self._loop.run(self._async.stats())

    def processes(self) -> ProcessList:
        """The processes in the sandbox's guest."""
        return self._loop.run(self._async.processes())

    def logs(self, *, tail: int | None = None) -> bytes:
        """The main command's output (else the console)."""
        return self._loop.run(self._async.logs(tail=tail))

    def follow_logs(self, *, tail: int | None = None) -> Iterator[bytes]:
        """The logs so far, then each new chunk until the sandbox stops."""
        return self._loop.iterate(self._async.follow_logs(tail=tail))

    def snapshot(self, *, name: str | None = None, kind: str = "full",
                 leave_paused: bool = False) -> SnapshotRecord:
        """Snapshot the sandbox (see :meth:`AsyncSandbox.snapshot`)."""
        return self._loop.run(self._async.snapshot(name=name, kind=kind,
                                                   leave_paused=leave_paused))

    def teleport(self, to: str, *, token: str | None = None, mode: str = "auto",
                 without_volumes: bool = False,
                 progress: Callable[[TeleportProgress], None] | None = None,
                 arch: str | None = None) -> TeleportReport:
        """Move the sandbox to the daemon at ``to`` (see :meth:`AsyncSandbox.teleport`)."""
        return self._loop.run(self._async.teleport(
            to, token=token, mode=mode, without_volumes=without_volumes, progress=progress,
            arch=arch))

    def commit(self, reference: str, *, message: str | None = None) -> str:
        """Store this sandbox's changes as image ``reference``; its digest (see
        :meth:`AsyncSandbox.commit`)."""
        return self._loop.run(self._async.commit(reference, message=message))

    def pause(self) -> None:
        """Freeze the sandbox."""
        self._loop.run(self._async.pause())

    def fork(self, count: int, *, name_prefix: str | None = None,
             names: Sequence[str] | None = None,
             disk_mib: int | None = None) -> list[Sandbox]:
        """``count`` children of this sandbox, each a copy of it now (see
        :meth:`AsyncSandbox.fork`)."""
        children = self._loop.run(self._async.fork(count, name_prefix=name_prefix,
                                                   names=names, disk_mib=disk_mib))
        return [Sandbox(child, self._loop) for child in children]

    def resume(self) -> None:
        """Let a paused sandbox run again."""
        self._loop.run(self._async.resume())

    def stop(self) -> None:
        """Shut the sandbox down gracefully."""
        self._loop.run(self._async.stop())

    def kill(self, *, signal: int | str | None = None) -> None:
        """Stop the sandbox at once; with ``signal``, send that to its main command."""
        self._loop.run(self._async.kill(signal=signal))

    def set_timeout(self, seconds: float | None, *, on_timeout: str | None = None) -> None:
        """Give the sandbox a timeout from now (see :meth:`AsyncSandbox.set_timeout`)."""
        self._loop.run(self._async.set_timeout(seconds, on_timeout=on_timeout))

    def set_network(self, *, allow: Sequence[str] = (), deny: Sequence[str] = (),
                    network: str | None = None) -> None:
        """Replace the sandbox's egress rules (see :meth:`AsyncSandbox.set_network`)."""
        self._loop.run(self._async.set_network(allow=allow, deny=deny, network=network))

    def remove(self) -> None:
        """Kill the sandbox if it runs and delete it."""
        self._loop.run(self._async.remove())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
