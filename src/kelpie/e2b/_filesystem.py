"""E2B's ``filesystem.Filesystem`` service over Kelpie's guest file operations. Changes a
user makes (directories, moves) run as that user in the guest, so that ownership and
permissions come out as envd's would; watches poll the directory (the guest agent has no
inotify)."""

from __future__ import annotations

import asyncio
import dataclasses
import posixpath
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from kelpie.e2b._caller import Caller
from kelpie.e2b._proto.filesystem import filesystem_pb as pb
from kelpie.e2b._proto.filesystem.filesystem_connect import Filesystem
from kelpie.runtime import Runtime
from kelpie.vm import FileInfo, GuestFileError, KelpieError

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

FILE_TYPES = {"file": pb.FileType.FILE, "dir": pb.FileType.DIRECTORY,
              "symlink": pb.FileType.SYMLINK}
TYPE_CHARS = {"file": "-", "dir": "d", "symlink": "l"}
POLL_SECONDS = 0.2
"""How often a watch looks at its directory."""
WATCH_ENTRIES_LIMIT = 10_000
"""A watch of more entries than this is refused (each poll lists them all)."""
WATCHERS_LIMIT = 64
"""Watchers a sandbox may have at once (the sync SDK's; each polls)."""
KEEPALIVE_S = 50.0


Complaint = Literal["permission", "missing", "no-space", "other"]


def complaint(stderr: bytes, exit_code: int) -> tuple[Complaint, str]:
    """What a failed guest file command (``mkdir``, ``mv``, ``cat >``) complained of: one of
    ``permission``, ``missing``, ``no-space`` or ``other``, and its message (envd's errors
    carry the OS's reason, and so do ours)."""
    message = stderr.decode(errors="replace").strip() or f"exit code {exit_code}"
    kind: Complaint = ("permission" if "ermission denied" in message else
                       "missing" if "No such file" in message else
                       "no-space" if "No space left" in message else "other")
    return kind, message


_CONNECT_CODES: dict[Complaint, Code] = {
    "permission": Code.PERMISSION_DENIED, "missing": Code.NOT_FOUND,
    "no-space": Code.RESOURCE_EXHAUSTED, "other": Code.INVALID_ARGUMENT}


def entry(caller: Caller, path: str, info: FileInfo) -> pb.EntryInfo:
    """envd's description of one entry (owner and times are not known host-side)."""
    perm = stat.S_IMODE(info.mode)
    return pb.EntryInfo(
        name=info.name, type=FILE_TYPES.get(info.type, pb.FileType.UNSPECIFIED),
        path=path, size=info.size, mode=perm,
        permissions=TYPE_CHARS.get(info.type, "?") + stat.filemode(perm)[1:],
        is_symlink=info.type == "symlink")


def _watch_event(field: Literal["start", "filesystem", "keepalive"],
                 value: Any) -> pb.WatchDirResponse:
    return pb.WatchDirResponse(event=Oneof(field, value))  # type: ignore[arg-type]


def _missing(exc: GuestFileError) -> bool:
    return exc.code in ("ENOENT", "ENOTDIR")


class Files:
    """Guest file operations as a caller sees them (paths against their home)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def stat(self, caller: Caller, path: str) -> pb.EntryInfo:
        """The entry at ``path``; NOT_FOUND if there is none."""
        path = posixpath.normpath(caller.path(path))
        if path == "/":
            return pb.EntryInfo(name="/", type=pb.FileType.DIRECTORY, path="/",
                                mode=0o755, permissions="drwxr-xr-x")
        parent, name = posixpath.split(path)
        for info in await self.listing(caller, parent):
            if info.name == name:
                return entry(caller, path, info)
        raise ConnectError(Code.NOT_FOUND, f"file not found: {path}")

    async def exists(self, caller: Caller, path: str) -> bool:
        try:
            await self.stat(caller, path)
        except ConnectError as exc:
            if exc.code is Code.NOT_FOUND:
                return False
            raise
        return True

    async def listing(self, caller: Caller, path: str) -> list[FileInfo]:
        try:
            return await self.runtime.list_dir(caller.sandbox_id, path)
        except GuestFileError as exc:
            if _missing(exc):
                raise ConnectError(Code.NOT_FOUND, f"file not found: {path}") from exc
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from exc

    async def walk(self, caller: Caller, path: str, depth: int) -> list[pb.EntryInfo]:
        """Entries under ``path``, ``depth`` levels down (1: its own)."""
        found = []
        for info in await self.listing(caller, path):
            child = posixpath.join(path, info.name)
            found.append(entry(caller, child, info))
            if info.type == "dir" and depth > 1:
                found.extend(await self.walk(caller, child, depth - 1))
        return found

    async def run(self, caller: Caller, argv: list[str], what: str) -> None:
        """Run a file command as the caller; its complaint as the error."""
        try:
            result = await self.runtime.exec(caller.sandbox_id, argv, user=caller.user,
                                             cwd="/")
        except KelpieError as exc:
            raise ConnectError(Code.INTERNAL, f"{what}: {exc}") from exc
        if result.exit_code != 0:
            kind, message = complaint(result.stderr, result.exit_code)
            raise ConnectError(_CONNECT_CODES[kind], f"{what}: {message}")


@dataclasses.dataclass(eq=False)
class Watcher:
    """A directory watched by polling: the events since it was last asked."""

    caller: Caller
    path: str
    recursive: bool
    events: asyncio.Queue[pb.FilesystemEvent] = dataclasses.field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    failed: str | None = None

    @property
    def depth(self) -> int:
        return 1_000 if self.recursive else 1

    async def run(self, files: Files, before: dict[str, tuple[int, int, str]]) -> None:
        """Poll until stopped, queueing what changed since ``before``."""
        depth = self.depth
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                now = await self.snapshot(files, depth)
            except ConnectError as exc:  # the directory went (or the sandbox stopped)
                self.failed = exc.message
                return
            for name in now.keys() - before.keys():
                self._put(name, pb.EventType.CREATE)
            for name in now.keys() & before.keys():
                if now[name] != before[name]:
                    self._put(name, pb.EventType.WRITE
                              if now[name][1:] == before[name][1:] else
                              pb.EventType.CHMOD)
            for name in before.keys() - now.keys():
                self._put(name, pb.EventType.REMOVE)
            before = now

    def _put(self, name: str, kind: pb.EventType) -> None:
        self.events.put_nowait(pb.FilesystemEvent(name=name, type=kind))

    async def snapshot(self, files: Files, depth: int) -> dict[str, tuple[int, int, str]]:
        """(size, mode, type) of each entry, by its path relative to the watched one."""
        entries = await files.walk(self.caller, self.path, depth)
        if len(entries) > WATCH_ENTRIES_LIMIT:
            raise ConnectError(Code.RESOURCE_EXHAUSTED,
                               f"{self.path} holds over {WATCH_ENTRIES_LIMIT} entries: watch "
                               "a smaller directory")
        return {posixpath.relpath(e.path, self.path): (e.size, e.mode, str(e.type))
                for e in entries}

    def drain(self) -> list[pb.FilesystemEvent]:
        found = []
        while not self.events.empty():
            found.append(self.events.get_nowait())
        return found

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class FilesystemService(Filesystem):
    """``filesystem.Filesystem``: stat, list, make, move, remove and watch paths."""

    def __init__(self, files: Files, caller: Callable[[Any], Caller]) -> None:
        self._files = files
        self._caller = caller
        self._watchers: dict[str, Watcher] = {}

    async def stat(self, request: pb.StatRequest,
                   ctx: RequestContext[pb.StatRequest, pb.StatResponse], /) -> pb.StatResponse:
        return pb.StatResponse(entry=await self._files.stat(self._caller(ctx), request.path))

    async def list_dir(
        self, request: pb.ListDirRequest,
        ctx: RequestContext[pb.ListDirRequest, pb.ListDirResponse], /,
    ) -> pb.ListDirResponse:
        caller = self._caller(ctx)
        path = posixpath.normpath(caller.path(request.path))
        depth = max(1, request.depth)
        if (await self._files.stat(caller, path)).type != pb.FileType.DIRECTORY:
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {path}")
        return pb.ListDirResponse(entries=await self._files.walk(caller, path, depth))

    async def make_dir(
        self, request: pb.MakeDirRequest,
        ctx: RequestContext[pb.MakeDirRequest, pb.MakeDirResponse], /,
    ) -> pb.MakeDirResponse:
        caller = self._caller(ctx)
        path = posixpath.normpath(caller.path(request.path))
        if await self._files.exists(caller, path):
            raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {path}")
        await self._files.run(caller, ["mkdir", "-p", "--", path], f"cannot create {path}")
        return pb.MakeDirResponse(entry=await self._files.stat(caller, path))

    async def move(self, request: pb.MoveRequest,
                   ctx: RequestContext[pb.MoveRequest, pb.MoveResponse], /) -> pb.MoveResponse:
        caller = self._caller(ctx)
        source = posixpath.normpath(caller.path(request.source))
        destination = posixpath.normpath(caller.path(request.destination))
        await self._files.stat(caller, source)  # NOT_FOUND as envd says it
        await self._files.run(caller, ["mv", "--", source, destination],
                              f"cannot move {source} to {destination}")
        return pb.MoveResponse(entry=await self._files.stat(caller, destination))

    async def remove(self, request: pb.RemoveRequest,
                     ctx: RequestContext[pb.RemoveRequest, pb.RemoveResponse], /,
                     ) -> pb.RemoveResponse:
        caller = self._caller(ctx)
        path = posixpath.normpath(caller.path(request.path))
        await self._files.stat(caller, path)
        await self._files.run(caller, ["rm", "-rf", "--", path], f"cannot remove {path}")
        return pb.RemoveResponse()

    async def watch_dir(
        self, request: pb.WatchDirRequest,
        ctx: RequestContext[pb.WatchDirRequest, pb.WatchDirResponse], /,
    ) -> AsyncIterator[pb.WatchDirResponse]:
        watcher = await self._watch(self._caller(ctx), request.path, request.recursive)
        try:
            yield _watch_event("start", pb.WatchDirResponse.StartEvent())
            while True:
                try:
                    event = await asyncio.wait_for(watcher.events.get(), KEEPALIVE_S)
                except TimeoutError:
                    if watcher.failed is not None:
                        raise ConnectError(Code.NOT_FOUND, watcher.failed) from None
                    yield _watch_event("keepalive", pb.WatchDirResponse.KeepAlive())
                    continue
                yield _watch_event("filesystem", event)
        finally:
            watcher.stop()

    async def create_watcher(
        self, request: pb.CreateWatcherRequest,
        ctx: RequestContext[pb.CreateWatcherRequest, pb.CreateWatcherResponse], /,
    ) -> pb.CreateWatcherResponse:
        caller = self._caller(ctx)
        for watcher_id, gone in [(i, w) for i, w in self._watchers.items()
                                 if w.failed is not None]:  # its directory or sandbox went
            gone.stop()
            del self._watchers[watcher_id]
        mine = [w for w in self._watchers.values() if w.caller.sandbox_id == caller.sandbox_id]
        if len(mine) >= WATCHERS_LIMIT:
            raise ConnectError(Code.RESOURCE_EXHAUSTED,
                               f"the sandbox has {WATCHERS_LIMIT} watchers: remove one first")
        watcher = await self._watch(caller, request.path, request.recursive)
        watcher_id = secrets.token_hex(8)
        self._watchers[watcher_id] = watcher
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest,
        ctx: RequestContext[pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse], /,
    ) -> pb.GetWatcherEventsResponse:
        watcher = self._watcher(ctx, request.watcher_id)
        events = watcher.drain()
        if not events and watcher.failed is not None:
            raise ConnectError(Code.NOT_FOUND, watcher.failed)
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, request: pb.RemoveWatcherRequest,
        ctx: RequestContext[pb.RemoveWatcherRequest, pb.RemoveWatcherResponse], /,
    ) -> pb.RemoveWatcherResponse:
        self._watcher(ctx, request.watcher_id).stop()
        del self._watchers[request.watcher_id]
        return pb.RemoveWatcherResponse()

    def forget_sandbox(self, sandbox_id: str) -> None:
        for watcher_id, watcher in list(self._watchers.items()):
            if watcher.caller.sandbox_id == sandbox_id:
                watcher.stop()
                del self._watchers[watcher_id]

    def _watcher(self, ctx: Any, watcher_id: str) -> Watcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.caller.sandbox_id != self._caller(ctx).sandbox_id:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found")
        return watcher

    async def _watch(self, caller: Caller, path: str, recursive: bool) -> Watcher:
        path = posixpath.normpath(caller.path(path))
        if (await self._files.stat(caller, path)).type != pb.FileType.DIRECTORY:
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {path}")
        watcher = Watcher(caller, path, recursive)
        before = await watcher.snapshot(self._files, watcher.depth)  # changes count from now
        watcher.task = asyncio.create_task(watcher.run(self._files, before),
                                           name=f"kelpie-e2b-watch-{caller.sandbox_id}")
        return watcher
