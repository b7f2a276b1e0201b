"""Saving and loading a QEMU VM's state with QMP migration to and from a file.

QEMU 7.2 has no ``file:`` migration URI (QEMU 8.2 added it). Rather than ``exec:cat >
FILE`` (a shell in QEMU, a path to quote), the file is opened here and handed to QEMU
over the QMP socket (SCM_RIGHTS, then ``getfd``) and migrated to or from ``fd:NAME``.
QEMU needs no access to the path, and a snapshot's blob is created by this process.

The QMP sequences (QEMU reports each step as a ``MIGRATION`` event, enabled by the
``events`` migration capability; completion is awaited on those events, not by sleeping):

* save (the VM is already paused with ``stop``): ``migrate-set-capabilities events``,
  ``migrate-set-parameters max-bandwidth``, fd + ``getfd``, ``migrate fd:NAME``, wait for
  ``completed``/``failed``/``cancelled``, ``query-migrate`` (statistics, error text), then
  ``query-status`` until the run state has left ``finish-migrate``: QEMU announces
  ``completed`` before it settles in ``postmigrate``, and a ``cont`` in between fails
  with "Migration is not finalized yet". Cancelled midway: ``migrate_cancel``, then wait
  until QEMU left the migration.
* abandon (a later QMP client, after the process saving the state died): the same
  ``migrate_cancel`` and waits, then ``closefd`` of a file handed over but never used;
  a save that completed meanwhile leaves the VM ``postmigrate`` (``cont`` resumes it).
* load (QEMU started with ``-S -incoming defer``): ``migrate-set-capabilities events``,
  fd + ``getfd``, ``migrate-incoming fd:NAME``, wait for ``completed``. QEMU 7.2 exits
  when loading fails, so the caller also watches the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

UNLIMITED_BANDWIDTH = 1 << 50
"""``max-bandwidth`` for snapshots: QEMU's default (128 MiB/s) is for live migration
over a network; a paused VM written to a local file should go as fast as the disk."""
SAVE_FD_NAME = "kelpie-snapshot"
LOAD_FD_NAME = "kelpie-restore"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
CANCEL_TIMEOUT = 10.0
"""Seconds to wait for QEMU to leave a cancelled or completed migration."""
_POLL = 0.005


class MigrationFailed(Exception):
    """QEMU could not save or load the VM state; the message is QEMU's reason."""


async def save_state(qmp: QMPClient, path: Path, *, bandwidth: int,
                     ignore_shared: bool = False) -> dict[str, Any]:
    """Write the paused VM's device state and RAM to the new file ``path``; with
    ``ignore_shared``, the device state only (RAM in a shared file is left out: QEMU's
    ``x-ignore-shared``; the capability is switched off again afterwards).

    Returns QEMU's ``query-migrate`` statistics. Raises :class:`MigrationFailed` (e.g. a
    migration blocker such as a mounted virtio-9p share). When cancelled, the migration
    is cancelled in QEMU before this returns: the VM is then as it was, still paused.
    """
    await _set_capabilities(qmp, ignore_shared)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return await _migrate(qmp, fd, "migrate", SAVE_FD_NAME)
    finally:
        if ignore_shared:  # a later snapshot or live migration must carry the RAM again
            with contextlib.suppress(QMPError):
                await _set_capabilities(qmp, False)


async def load_state(qmp: QMPClient, path: Path, *, ignore_shared: bool = False
                     ) -> dict[str, Any]:
    """Load the VM state saved in ``path`` into a QEMU started with ``-incoming defer``
    (``ignore_shared``: a device state saved with it; the RAM is the file QEMU maps)."""
    await _set_capabilities(qmp, ignore_shared)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return await _migrate(qmp, fd, "migrate-incoming", LOAD_FD_NAME)


async def _set_capabilities(qmp: QMPClient, ignore_shared: bool = False) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True},
        {"capability": "x-ignore-shared", "state": ignore_shared},
    ]})


async def _migrate(qmp: QMPClient, fd: int, command: str, fd_name: str) -> dict[str, Any]:
    listener = EventListener(names=("MIGRATION",))
    with qmp.listen(listener):
        try:
            qmp.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": fd_name})
        finally:
            os.close(fd)  # QEMU holds its own copy now
        try:
            await qmp.execute(command, {"uri": f"fd:{fd_name}"})
        except QMPError:
            with contextlib.suppress(QMPError):
                await qmp.execute("closefd", {"fdname": fd_name})
            raise
        try:
            status = await _terminal_status(listener)
        except BaseException:
            if command == "migrate":
                await asyncio.shield(_cancel(qmp))
            raise
    info = await qmp.execute("query-migrate")
    assert isinstance(info, dict)
    if command == "migrate":
        await _settled(qmp)
    if status != "completed":
        raise MigrationFailed(str(info.get("error-desc") or f"the migration was {status}"))
    return info


async def _terminal_status(listener: EventListener) -> str:
    async for event in listener:
        data = event.get("data")
        status = str(data.get("status")) if isinstance(data, dict) else ""
        if status in TERMINAL:
            return status
    raise MigrationFailed("QMP closed before the migration ended")  # pragma: no cover


async def _settled(qmp: QMPClient) -> None:
    """Wait until the source's run state has left ``finish-migrate`` (no event says so)."""
    deadline = time.monotonic() + CANCEL_TIMEOUT
    while time.monotonic() < deadline:
        status = await qmp.execute("query-status")
        if not isinstance(status, dict) or status.get("status") != "finish-migrate":
            return
        await asyncio.sleep(_POLL)


async def abandon_save(qmp: QMPClient) -> str:
    """Stop a save started by another QMP client (one that died) and let QEMU settle.

    Returns the status the migration ended in (``none`` when there was none). Unlike
    :func:`_cancel` this raises QMP errors: the caller must not resume a VM whose
    migration may still run.
    """
    info = await qmp.execute("query-migrate")
    status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
    if status not in TERMINAL | {"none"}:
        with contextlib.suppress(QMPError):  # it may have ended since the query
            await qmp.execute("migrate_cancel")
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while status not in TERMINAL | {"none"}:
            if time.monotonic() >= deadline:
                raise MigrationFailed(
                    f"the interrupted migration is still {status!r} {CANCEL_TIMEOUT:g}s "
                    f"after migrate_cancel"
                )
            await asyncio.sleep(_POLL)
            info = await qmp.execute("query-migrate")
            status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
    await _settled(qmp)
    with contextlib.suppress(QMPError):  # handed over by getfd, never taken by migrate
        await qmp.execute("closefd", {"fdname": SAVE_FD_NAME})
    return status


async def _cancel(qmp: QMPClient) -> None:
    """Cancel an outgoing migration and wait until QEMU has left it (best effort)."""
    with contextlib.suppress(QMPError, OSError, EOFError):
        await qmp.execute("migrate_cancel")
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while time.monotonic() < deadline:
            info = await qmp.execute("query-migrate")
            if not isinstance(info, dict) or info.get("status") in TERMINAL | {"none"}:
                return
            await asyncio.sleep(_POLL)
