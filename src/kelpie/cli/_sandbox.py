"""Docker-like sandbox commands, all through the daemon: run, ps, exec, logs, cp, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import click

from kelpie._signals import signal_number
from kelpie.api import Sandbox
from kelpie.cli._attach import attach, terminal_size
from kelpie.cli._connect import connect
from kelpie.cli._exec import exec_
from kelpie.client import DaemonClient, RemoteError
from kelpie.vm import ConfigError, InvalidStateError

COPY_CHUNK = 1 << 20


def network_mode(network: str | None, allow: Sequence[str], deny: Sequence[str]) -> str:
    """``--network`` as given, else ``nat`` when egress rules are given (they need a NIC),
    else ``none``."""
    return network or ("nat" if allow or deny else "none")


def _client_call(call: Callable[[DaemonClient], Awaitable[int]]) -> int:
    """Run ``call`` with a connected client on a fresh event loop."""
    async def main() -> int:
        client = await connect()
        try:
            return await call(client)
        finally:
            await client.close()

    return asyncio.run(main())


def _progress_printer() -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None
    return lambda line: click.echo(f"kelpie: {line}", err=True)


async def _exec_attached(client: DaemonClient, ref: str, argv: Sequence[str], *,
                         env: dict[str, str] | None = None, cwd: str | None = None,
                         user: str | None = None, timeout: float | None,
                         interactive: bool, tty: bool) -> int:
    rows, cols = terminal_size()
    async with client.exec_stream(ref, argv, env=env, cwd=cwd, user=user, timeout=timeout,
                                  pty=tty, rows=rows, cols=cols) as process:
        return await attach(process, stdin=interactive, tty=tty)


# ---- listing and inspecting -------------------------------------------------------------
@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also stopped and crashed ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print ids only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only sandboxes matching: label=KEY or label=KEY=VALUE, name=TEXT (part "
                   "of the name), id=PREFIX, status=STATE (repeatable: one key given twice "
                   "matches either value; labels and different keys must all match).")
def ps(show_all: bool, quiet: bool, as_json: bool, filters: tuple[str, ...]) -> int:
    """List sandboxes (running and paused; -a: all)."""
    matches = sandbox_filter(filters)

    async def call(client: DaemonClient) -> int:
        sandboxes = [s for s in await client.list_sandboxes(all=show_all) if matches(s)]
        if as_json:
            click.echo(json.dumps([s.model_dump(mode="json") for s in sandboxes], indent=2))
        elif quiet:
            for s in sandboxes:
                click.echo(s.id)
        else:
            _table(sandboxes)
        return 0

    return _client_call(call)


def sandbox_filter(filters: Sequence[str]) -> Callable[[Sandbox], bool]:
    """Docker's ``ps --filter`` rules for ``label``, ``name``, ``id`` and ``status``."""
    wanted: dict[str, list[str]] = {}
    for text in filters:
        key, sep, value = text.partition("=")
        if key not in ("label", "name", "id", "status") or not sep or not value:
            raise ConfigError([f"--filter {text!r}: expected label=KEY[=VALUE], name=TEXT, "
                               "id=PREFIX or status=STATE"], what="filter")
        wanted.setdefault(key, []).append(value)

    def labelled(sandbox: Sandbox, spec: str) -> bool:
        key, sep, value = spec.partition("=")
        return key in sandbox.labels and (not sep or sandbox.labels[key] == value)

    def matches(sandbox: Sandbox) -> bool:
        return (all(labelled(sandbox, spec) for spec in wanted.get("label", ()))
                and any(n in sandbox.name for n in wanted.get("name", [""]))
                and any(sandbox.id.startswith(i) for i in wanted.get("id", [""]))
                and ("status" not in wanted or sandbox.state in wanted["status"]))

    return matches


def _table(sandboxes: list[Sandbox]) -> None:
    rows = [("ID", "NAME", "IMAGE", "STATE", "BACKEND", "CREATED", "PORTS")]
    now = time.time()
    for s in sandboxes:
        state = s.state
        if s.state == "crashed" and s.crash_reason:
            state = f"crashed ({s.crash_reason.splitlines()[0][:40]})"
        ports = ",".join(f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}"
                         for p in s.ports)
        image = (s.image or "-").split("@")[0]
        rows.append((s.short_id, s.name, image, state, s.backend, _ago(now - s.created_at),
                     ports))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                   + "  " + row[-1])


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(max(seconds, 0))}s ago"


@click.command("inspect")
@click.option("--json", "as_json", is_flag=True, default=True, hidden=True,
              help="Print JSON (always).")
@click.argument("sandboxes", nargs=-1, required=True)
def inspect(as_json: bool, sandboxes: tuple[str, ...]) -> int:
    """Show sandboxes' records as JSON, with their state history (and, for a running
    sandbox with a root disk, ``disk_full`` and ``disk_used_bytes`` from its guest)."""
    async def call(client: DaemonClient) -> int:
        out: list[dict[str, Any]] = []
        for ref in sandboxes:
            record = (await client.inspect(ref)).model_dump(mode="json")
            if record["state"] == "running" and record.get("disk_mib"):
                usage = await client.stats(record["id"])
                if usage.guest is not None:
                    record["disk_full"] = usage.disk_full
                    record["disk_used_bytes"] = usage.guest.disk_used_bytes
            record["events"] = [e.model_dump(mode="json") for e in await client.events(ref)]
            out.append(record)
        click.echo(json.dumps(out, indent=2))
        return 0

    return _client_call(call)


# ---- logs -------------------------------------------------------------------------------
@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the sandbox stops.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="Last N lines only.")
@click.option("--console", is_flag=True, help="The VM console instead of the main command.")
@click.argument("sandbox")
def logs(follow: bool, tail: int | None, console: bool, sandbox: str) -> int:
    """Print a sandbox's logs: its main command's output, else its console."""
    async def call(client: DaemonClient) -> int:
        if not follow:
            sys.stdout.buffer.write(await client.read_logs(sandbox, tail=tail, console=console))
            sys.stdout.flush()
            return 0
        async for chunk in client.follow_logs(sandbox, tail=tail, console=console):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return 0

    return _client_call(call)


# ---- lifecycle --------------------------------------------------------------------------
def _each(sandboxes: Sequence[str],
          action: Callable[[DaemonClient, str], Awaitable[object]]) -> int:
    """Apply ``action`` to every sandbox; report failures and go on (exit 1 if any)."""
    async def call(client: DaemonClient) -> int:
        failed = 0
        for ref in sandboxes:
            try:
                await action(client, ref)
                click.echo(ref)
            except RemoteError as exc:
                click.echo(f"kelpie: error: {ref}: {exc}", err=True)
                failed += 1
        return 1 if failed else 0

    return _client_call(call)


@click.command("start")
@click.argument("sandboxes", nargs=-1, required=True)
def start(sandboxes: tuple[str, ...]) -> int:
    """Start stopped or crashed sandboxes."""
    return _each(sandboxes, lambda c, ref: c.start(ref))


@click.command("stop")
@click.option("-t", "--time", "timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds the guest gets to shut down before it is stopped hard "
                   "(0: at once; default: the backend's, 5 s on QEMU).")
@click.argument("sandboxes", nargs=-1, required=True)
def stop(timeout: float | None, sandboxes: tuple[str, ...]) -> int:
    """Stop running sandboxes."""
    return _each(sandboxes, lambda c, ref: c.stop(ref, timeout=timeout))


@click.command("kill")
@click.option("-s", "--signal", "signal", default=None, metavar="SIGNAL",
              help="Send SIGNAL (TERM, SIGINT, 15...) to each main command instead; the "
                   "sandboxes run on.")
@click.argument("sandboxes", nargs=-1, required=True)
def kill(signal: str | None, sandboxes: tuple[str, ...]) -> int:
    """Stop sandboxes at once (their VMs are killed), or signal their main commands."""
    signum = None if signal is None else signal_number(signal)  # refused before any call
    return _each(sandboxes, lambda c, ref: c.kill(ref, signal=signum))


@click.command("pause")
@click.argument("sandboxes", nargs=-1, required=True)
def pause(sandboxes: tuple[str, ...]) -> int:
    """Freeze running sandboxes."""
    return _each(sandboxes, lambda c, ref: c.pause(ref))


@click.command("resume")
@click.argument("sandboxes", nargs=-1, required=True)
def resume(sandboxes: tuple[str, ...]) -> int:
    """Resume paused sandboxes."""
    return _each(sandboxes, lambda c, ref: c.resume(ref))


@click.command("wait")
@click.argument("sandboxes", nargs=-1, required=True)
def wait(sandboxes: tuple[str, ...]) -> int:
    """Wait until each sandbox's main command ends and print its exit code (as docker
    wait; "none" when it has no main command or its end was not seen)."""
    async def call(client: DaemonClient) -> int:
        for ref in sandboxes:
            code = await client.wait_main(ref)
            click.echo("none" if code is None else code)
        return 0

    return _client_call(call)


@click.command("rename")
@click.argument("sandbox")
@click.argument("new_name")
def rename(sandbox: str, new_name: str) -> int:
    """Give a sandbox another name."""
    async def call(client: DaemonClient) -> int:
        await client.rename(sandbox, new_name)
        return 0

    return _client_call(call)


@click.command("commit")
@click.option("-m", "--message", default=None, help="Kept in the image's history.")
@click.argument("sandbox")
@click.argument("reference", metavar="NAME[:TAG]")
def commit(message: str | None, sandbox: str, reference: str) -> int:
    """Store a running SANDBOX's file system changes over its image as image NAME[:TAG]
    (its env, workdir, user and command carried over); prints the new image's id and
    digest. Sandboxes and templates can start from it; `kelpie image push` sends it."""
    async def call(client: DaemonClient) -> int:
        made = await client.commit(sandbox, reference, message=message)
        click.echo(f"{made.id} {made.digest}")
        return 0

    return _client_call(call)


@click.command("port")
@click.argument("sandbox")
@click.argument("guest_port", required=False, metavar="PORT[/PROTOCOL]")
def port(sandbox: str, guest_port: str | None) -> int:
    """List a sandbox's published ports (``GUEST/PROTO -> IP:HOST``), or where one goes."""
    async def call(client: DaemonClient) -> int:
        ports = (await client.inspect(sandbox)).ports
        number, _, protocol = (guest_port or "").partition("/")
        chosen = [p for p in ports if guest_port is None or (
            str(p.guest_port) == number and p.protocol == (protocol or "tcp"))]
        if guest_port is not None and not chosen:
            raise ConfigError([f"sandbox {sandbox} publishes no port {guest_port} (it "
                               f"publishes {len(ports)}; see `kelpie port {sandbox}`)"],
                              what="port")
        for p in chosen:
            target = f"{p.host_ip}:{p.host_port}"
            click.echo(target if guest_port else f"{p.guest_port}/{p.protocol} -> {target}")
        return 0

    return _client_call(call)


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="Remove running sandboxes too (killed).")
@click.argument("sandboxes", nargs=-1, required=True)
def rm(force: bool, sandboxes: tuple[str, ...]) -> int:
    """Remove sandboxes (stopped ones; -f: any)."""
    return _each(sandboxes, lambda c, ref: c.remove(ref, force=force))


# ---- cp ---------------------------------------------------------------------------------
@click.command("cp")
@click.argument("source")
@click.argument("destination")
def cp(source: str, destination: str) -> int:
    """Copy files or directories between the host and a sandbox: one side is
    ``SANDBOX:PATH``.

    Like ``docker cp``: a destination that is an existing directory receives the source
    under its own name; otherwise the destination becomes the copy. Modes are kept;
    symbolic links and special files are skipped (and counted).
    """
    src, dst = _remote(source), _remote(destination)
    if (src is None) == (dst is None):
        raise click.UsageError("exactly one of SOURCE and DESTINATION must be SANDBOX:PATH")
    if src is not None:
        ref, guest = src
        host = Path(destination)
        if host.is_dir():
            host = host / PurePosixPath(guest).name
        elif not host.parent.is_dir():
            raise ConfigError([f"{host.parent} does not exist; create it first"], what="copy")
        return _client_call(lambda client: _copy_out(client, ref, guest, host))
    assert dst is not None
    ref, guest = dst
    host = Path(source)
    if not host.is_dir() and not host.is_file():
        raise ConfigError([f"{host} does not exist or is not a regular file or directory"],
                          what="copy")
    return _client_call(lambda client: _copy_in(client, host, host.is_dir(), ref, guest))


def _remote(text: str) -> tuple[str, str] | None:
    """``SANDBOX:PATH`` -> (sandbox, path); None for a host path."""
    name, sep, path = text.partition(":")
    if not sep or not name or "/" in name or not path.startswith("/"):
        return None
    return name, path


async def _is_guest_dir(client: DaemonClient, ref: str, path: str) -> bool:
    # imported here: kelpie.runtime (sqlite3...) is not worth loading at every CLI start
    from kelpie.runtime import SandboxNotFound

    try:
        await client.list_dir(ref, path)
    except (SandboxNotFound, InvalidStateError):
        raise
    except RemoteError:
        return False
    return True


async def _copy_in(client: DaemonClient, host: Path, is_dir: bool, ref: str, guest: str,
                   ) -> int:
    if guest.endswith("/") or await _is_guest_dir(client, ref, guest):
        guest = f"{guest.rstrip('/')}/{host.name}"
    skipped = await _upload_tree(client, host, ref, guest) if is_dir else \
        await _upload_file(client, host, ref, guest)
    _report_skipped(skipped)
    return 0


async def _upload_tree(client: DaemonClient, host: Path, ref: str, guest: str) -> int:
    await client.mkdir(ref, guest, mode=os.stat(host).st_mode & 0o7777)
    skipped = 0
    for entry in sorted(os.scandir(host), key=lambda e: e.name):
        target = f"{guest}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            skipped += await _upload_tree(client, Path(entry.path), ref, target)
        elif entry.is_file(follow_symlinks=False):
            skipped += await _upload_file(client, Path(entry.path), ref, target)
        else:
            skipped += 1
    return skipped


async def _upload_file(client: DaemonClient, host: Path, ref: str, guest: str) -> int:
    async def chunks() -> AsyncIterator[bytes]:
        with open(host, "rb") as f:  # noqa: ASYNC230 - local reads of 1 MiB chunks
            while chunk := f.read(COPY_CHUNK):
                yield chunk

    await client.write_file(ref, guest, chunks(), mode=os.stat(host).st_mode & 0o7777)
    return 0


async def _copy_out(client: DaemonClient, ref: str, guest: str, host: Path) -> int:
    """Copy ``guest`` to exactly ``host`` (the caller resolved an existing directory)."""
    if await _is_guest_dir(client, ref, guest):
        skipped = await _download_tree(client, ref, guest, host, None)
    else:
        await _download(client, ref, guest, host, None)
        skipped = 0
    _report_skipped(skipped)
    return 0


async def _download_tree(client: DaemonClient, ref: str, guest: str, host: Path,
                         mode: int | None) -> int:
    os.makedirs(host, exist_ok=True)
    skipped = 0
    for entry in await client.list_dir(ref, guest):
        source, target = f"{guest.rstrip('/')}/{entry.name}", host / entry.name
        if entry.type == "dir":
            skipped += await _download_tree(client, ref, source, target, entry.mode & 0o7777)
        elif entry.type == "file":
            await _download(client, ref, source, target, entry.mode & 0o7777)
        else:
            skipped += 1
    if mode is not None:
        os.chmod(host, mode)
    return skipped


async def _download(client: DaemonClient, ref: str, guest: str, host: Path,
                    mode: int | None) -> None:
    """Stream into a temporary file next to ``host``, renamed over it when complete."""
    fd, temp = tempfile.mkstemp(dir=host.parent, prefix=f".{host.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in client.read_file_stream(ref, guest):
                out.write(chunk)
        os.chmod(temp, _new_file_mode(host) if mode is None else mode)  # not mkstemp's 0600
        os.replace(temp, host)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _report_skipped(skipped: int) -> None:
    if skipped:
        click.echo(f"kelpie: skipped {skipped} symbolic link(s) or special file(s)", err=True)


def _new_file_mode(host: Path) -> int:
    """The mode a copied-out file gets: the replaced file's, else 0666 less the umask."""
    with contextlib.suppress(FileNotFoundError):
        return host.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


COMMANDS = (exec_, wait, rename, commit, port, ps, inspect, logs, start, stop, kill, pause,
            resume, rm, cp)
