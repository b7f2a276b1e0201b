"""Sandbox logs: the main command's output (or the VM console), read whole, tailed or followed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._sandboxes import AT_REST
from kelpie.vm import ConfigError, Storage, StorageError

CONSOLE_LOG = "console.log"
FOLLOW_POLL_SECONDS = 0.2


class Logs:
    """Reads the log files of sandboxes through the runtime's storage."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self._ctx = ctx

    def path(self, info: SandboxInfo, *, console: bool = False) -> Path | None:
        """The main command's output when the sandbox has one, else the VM console."""
        if info.command is not None and not console:
            return self._ctx.output_log(info.id)
        return None if info.vm_dir is None else info.vm_dir / CONSOLE_LOG

    def read(self, info: SandboxInfo, tail: int | None, console: bool) -> tuple[bytes, int]:
        """The logs (or their last ``tail`` lines) and the offset they were read up to."""
        if tail is not None and tail < 0:
            raise ConfigError([f"tail is {tail}; give a number of lines >= 0"], what="logs")
        data, offset = read_from(self._ctx.storage, self.path(info, console=console), 0,
                                 limit=None)
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        return data, offset

    async def follow(
        self, info: SandboxInfo, *, tail: int | None, console: bool, poll_seconds: float,
    ) -> AsyncIterator[bytes]:
        """The logs, then what is written from then on, until the sandbox is at rest or gone."""
        ctx = self._ctx
        path = self.path(info, console=console)
        data, offset = self.read(info, tail, console)
        if data:
            yield data
        while True:
            chunk, offset = read_from(ctx.storage, path, offset)
            if chunk:
                yield chunk
                continue
            current = ctx.db.get(info.id)
            if current is None or current.state in AT_REST:
                return
            await asyncio.sleep(poll_seconds)


def read_from(storage: Storage, path: Path | None, offset: int, *,
              limit: int | None = 1 << 20) -> tuple[bytes, int]:
    """Bytes of ``path`` after ``offset`` (from 0 again if the file was truncated)."""
    if path is None or not storage.exists(path):
        return b"", offset
    try:
        with storage.open_read(path) as f:
            if f.seek(0, os.SEEK_END) < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read(-1 if limit is None else limit)
    except StorageError:
        return b"", offset  # removed under us
    return chunk, offset + len(chunk)
