"""Reaching the daemon from the CLI: a client of the target, starting the local daemon."""

from __future__ import annotations

import asyncio

from kelpie._paths import runtime_dir
from kelpie.cli._target import Target, current_target
from kelpie.client import DaemonClient, DaemonUnreachable


async def connect(target: Target | None = None) -> DaemonClient:
    """A client of a daemon that answers; starts the local daemon when none does."""
    target = target or current_target()
    client = DaemonClient(target.host, token=target.token)
    try:
        await client.version()
        return client
    except DaemonUnreachable:
        if not target.local or not target.autostart:
            await client.close()
            hint = "" if not target.local else "; start one with `kelpie daemon start`"
            raise DaemonUnreachable(f"no Kelpie daemon answers at {client.url}{hint}") from None
    try:
        await asyncio.to_thread(_start_local)
        await client.version()
    except BaseException:
        await client.close()
        raise
    return client


def _start_local() -> None:
    from kelpie.daemon import DaemonError, start_daemon

    try:
        start_daemon(runtime_dir())
    except DaemonError:
        # Another kelpie command may have started it at the same moment: use that one.
        client = DaemonClient()
        try:
            asyncio.run(client.version())
        except DaemonUnreachable:
            raise
        finally:
            asyncio.run(client.close())
