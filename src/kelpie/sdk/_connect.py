"""Which service a sandbox lives in: this process's runtime (one per event loop and state
dir) or a daemon's client; and the clean-up of runtimes left by dead processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

from kelpie.client import DaemonClient
from kelpie.runtime import Runtime
from kelpie.service import SandboxService


@dataclasses.dataclass(frozen=True)
class Connection:
    """A service and how to let go of it when the sandbox is done with it."""

    service: SandboxService
    close: Callable[[], Awaitable[None]]


async def connect(daemon: str | None, token: str | None) -> Connection:
    """This loop's in-process runtime (``daemon`` None), else a client of that daemon."""
    if daemon is None:
        return Connection(await _local_runtime(), _keep_open)
    client = DaemonClient(daemon, token=token)
    return Connection(client, client.close)


def attach(daemon: str | None, token: str | None) -> Connection:
    """A client of the daemon (default: the local one), for a sandbox that exists."""
    client = DaemonClient(daemon, token=token)
    return Connection(client, client.close)


async def _keep_open() -> None:
    """The in-process runtime is shared by every sandbox of the loop: kept open."""


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
            prune_dead(base / "sdk")
            data_dir = base / "sdk" / f"{os.getpid()}-{next(_runtime_numbers)}"
            runtime = Runtime(data_dir=data_dir, images=ImageStore(images_dir()))
            runtimes[base] = runtime
    await runtime.open()
    return runtime


async def close_local_runtimes() -> None:
    """Close this loop's in-process runtimes (their sandboxes keep running; see
    :meth:`Runtime.close`): for a process on its way out, so that their watchers end on
    the loop rather than being destroyed pending, and their data dirs are let go."""
    with _runtime_lock:
        runtimes = list(_runtimes.pop(asyncio.get_running_loop(), {}).values())
    for runtime in runtimes:
        await runtime.close()


def prune_dead(sdk_dir: Path) -> None:
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
