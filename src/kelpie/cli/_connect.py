"""Reaching the daemon from the CLI: ``--host``/``KELPIE_HOST``, tokens, autostart."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import click

from kelpie._paths import runtime_dir
from kelpie.client import HOST_ENV, TOKEN_ENV, DaemonClient, DaemonUnreachable, read_token_file


@dataclass(frozen=True)
class Target:
    """Which daemon the CLI talks to, and whether it may start the local one."""

    host: str | None
    token: str | None
    autostart: bool

    @property
    def local(self) -> bool:
        return self.host is None


def target_from(host: str | None, token_file: Path | None, autostart: bool) -> Target:
    """The target from the global options and the environment."""
    host = host or os.environ.get(HOST_ENV) or None
    token = read_token_file(token_file) if token_file else os.environ.get(TOKEN_ENV) or None
    return Target(host, token, autostart)


def current_target() -> Target:
    """The target of the running command (set by the ``kelpie`` group)."""
    ctx = click.get_current_context()
    found: Target = ctx.find_root().obj["target"]
    return found


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
