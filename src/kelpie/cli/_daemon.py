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


def _tcp(text: str | None, option: str = "--tcp") -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError([f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7070"],
                          what="daemon listener")
    return host.strip("[]"), int(port)


def _e2b_options(command: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.option("--e2b", metavar="HOST:PORT",
                     help="Also serve E2B's API there, for programs using E2B's SDK (needs "
                          "--token-file: its token is their E2B_API_KEY)."),
        click.option("--e2b-template", metavar="TEMPLATE|IMAGE",
                     help="What E2B's default template 'base' starts: a Kelpie template or "
                          "an image (it needs bash and a user named 'user')."),
        click.option("--e2b-domain", metavar="DOMAIN",
                     help="Serve sandboxes as PORT-ID.DOMAIN and the API as api.DOMAIN "
                          "(E2B_DOMAIN); give a wildcard certificate with --e2b-tls-*."),
        click.option("--e2b-tls-cert", type=click.Path(exists=True, dir_okay=False),
                     help="PEM certificate (chain) for the E2B listener: it speaks HTTPS."),
        click.option("--e2b-tls-key", type=click.Path(exists=True, dir_okay=False),
                     help="PEM private key of --e2b-tls-cert."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
def daemon() -> None:
    """The Kelpie daemon: owns sandboxes, serves the REST API (unix socket, or TCP+token)."""


@daemon.command("run")
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (needs --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token TCP clients must send.")
@_e2b_options
@click.option("--ready-fd", type=int, default=None, hidden=True)
def run(tcp: str | None, token_file: Path | None, ready_fd: int | None, e2b: str | None,
        e2b_template: str | None, e2b_domain: str | None, e2b_tls_cert: str | None,
        e2b_tls_key: str | None) -> int:
    """Serve in the foreground until SIGTERM/SIGINT (sandboxes keep running)."""
    from kelpie._address import read_token_file
    from kelpie.daemon import DaemonOptions, E2bOptions, serve

    logging.getLogger("kelpie").setLevel(logging.INFO)
    token = read_token_file(token_file) if token_file else None
    listener = _tcp(e2b, "--e2b")
    if listener is None and (e2b_template or e2b_domain or e2b_tls_cert or e2b_tls_key):
        raise click.UsageError("the --e2b-* options need --e2b HOST:PORT")
    if bool(e2b_tls_cert) != bool(e2b_tls_key):
        raise click.UsageError("give --e2b-tls-cert and --e2b-tls-key together")
    e2b_options = None if listener is None else E2bOptions(
        listener=listener, template=e2b_template, domain=e2b_domain,
        tls=(Path(e2b_tls_cert), Path(e2b_tls_key)) if e2b_tls_cert and e2b_tls_key else None)
    options = DaemonOptions(run_dir=runtime_dir(), tcp=_tcp(tcp), token=token,
                            ready_fd=ready_fd, e2b=e2b_options)
    asyncio.run(serve(options))
    return 0


@daemon.command("start")
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (needs --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token TCP clients must send.")
@_e2b_options
def start(tcp: str | None, token_file: Path | None, e2b: str | None, e2b_template: str | None,
          e2b_domain: str | None, e2b_tls_cert: str | None, e2b_tls_key: str | None) -> int:
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
    for flag, value in (("--e2b", e2b), ("--e2b-template", e2b_template),
                        ("--e2b-domain", e2b_domain), ("--e2b-tls-cert", e2b_tls_cert),
                        ("--e2b-tls-key", e2b_tls_key)):
        if value:
            path = Path(value)
            extra += [flag, str(path.resolve()) if flag.startswith("--e2b-tls") else value]
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
