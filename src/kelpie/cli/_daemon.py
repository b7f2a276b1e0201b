"""``kelpie daemon``: run, start, stop and check the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
from pathlib import Path

import click

from kelpie._paths import runtime_dir
from kelpie.cli._target import current_target
from kelpie.client import DaemonClient, DaemonUnreachable
from kelpie.vm import ConfigError

STOP_TIMEOUT = 60.0


def _tcp(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError([f"--tcp {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7070"],
                          what="daemon listener")
    return host.strip("[]"), int(port)


@click.group()
def daemon() -> None:
    """The Kelpie daemon: owns sandboxes, serves the REST API (unix socket, or TCP+token)."""


@daemon.command("run")
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (needs --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token TCP clients must send.")
@click.option("--ready-fd", type=int, default=None, hidden=True)
def run(tcp: str | None, token_file: Path | None, ready_fd: int | None) -> int:
    """Serve in the foreground until SIGTERM/SIGINT (sandboxes keep running)."""
    from kelpie._address import read_token_file
    from kelpie.daemon import DaemonOptions, serve

    logging.getLogger("kelpie").setLevel(logging.INFO)
    token = read_token_file(token_file) if token_file else None
    options = DaemonOptions(run_dir=runtime_dir(), tcp=_tcp(tcp), token=token,
                            ready_fd=ready_fd)
    asyncio.run(serve(options))
    return 0


@daemon.command("start")
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (needs --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token TCP clients must send.")
def start(tcp: str | None, token_file: Path | None) -> int:
    """Start the daemon in the background (a no-op when it already runs)."""
    from kelpie.daemon import start_daemon

    with contextlib.suppress(DaemonUnreachable):
        info = asyncio.run(_version())
        click.echo(f"kelpie daemon already running (pid {info})")
        return 0
    extra: list[str] = []
    if tcp:
        _tcp(tcp)
        extra += ["--tcp", tcp]
    if token_file:
        extra += ["--token-file", str(token_file.resolve())]
    pid = start_daemon(runtime_dir(), extra_args=extra)
    click.echo(f"kelpie daemon started (pid {pid})")
    return 0


async def _version() -> int:
    target = current_target()
    async with DaemonClient(target.host, token=target.token) as client:
        return (await client.version()).pid


@daemon.command("stop")
@click.option("--stop-sandboxes", is_flag=True, help="Stop every sandbox first.")
def stop(stop_sandboxes: bool) -> int:
    """Stop the daemon; sandboxes keep running unless --stop-sandboxes."""
    async def shut() -> int:
        target = current_target()
        async with DaemonClient(target.host, token=target.token) as client:
            pid = (await client.version()).pid
            await client.shutdown(stop_sandboxes=stop_sandboxes)
            return pid

    try:
        pid = asyncio.run(shut())
    except DaemonUnreachable:
        click.echo("kelpie daemon is not running")
        return 0
    if current_target().local:
        _wait_for_exit(pid)
    click.echo(f"kelpie daemon stopped (pid {pid})")
    return 0


def _wait_for_exit(pid: int) -> None:
    """Wait until the process ``pid`` has exited (a pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], STOP_TIMEOUT)
    finally:
        os.close(fd)


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> int:
    """Whether a daemon answers; its version, pid and data directory (exit 1 if none)."""
    async def ask() -> dict[str, object]:
        target = current_target()
        async with DaemonClient(target.host, token=target.token) as client:
            return {"url": client.url, **(await client.version()).model_dump()}

    try:
        info = asyncio.run(ask())
    except DaemonUnreachable as exc:
        if as_json:
            click.echo(json.dumps({"running": False, "error": str(exc)}))
        else:
            click.echo(f"not running: {exc}")
        return 1
    if as_json:
        click.echo(json.dumps({"running": True, **info}, indent=2))
    else:
        click.echo(f"running: pid {info['pid']}, version {info['version']}, "
                   f"data {info['data_dir']}, at {info['url']}")
    return 0
