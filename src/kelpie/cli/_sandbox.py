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

from kelpie.api import Sandbox, SandboxCreate, run_argv
from kelpie.cli._attach import attach, terminal_size
from kelpie.cli._connect import connect
from kelpie.cli._exec import exec_, parse_env
from kelpie.cli._target import current_target
from kelpie.client import DaemonClient, RemoteError
from kelpie.images import ImageError, ImageNotFound, ImageReference, ImageStore, Platform
from kelpie.vm import GUEST_ARCHES, ConfigError, InvalidStateError

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


# ---- run --------------------------------------------------------------------------------
class _RunCommand(click.Command):
    """Remembers whether ``--`` came before any positional argument (then there is no image)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            opt for p in self.params if isinstance(p, click.Option) and not p.is_flag
            for opt in p.opts
        }
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            i += 2 if args[i] in takes_value else 1
        ctx.meta["kelpie.no_image"] = i < len(args) and args[i] == "--"
        return super().parse_args(ctx, args)


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option("--name", help="Name of the sandbox (default: generated).")
@click.option("-d", "--detach", is_flag=True,
              help="Leave the sandbox running; the command (or the image's default) runs as "
                   "its main command, its output in `kelpie logs`.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal.")
@click.option("--rm", "remove", is_flag=True, help="Remove the sandbox when the command ends.")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable for the sandbox (repeatable).")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:GUEST[:ro]",
              help="Share a host directory (repeatable); ':ro' makes it read-only.")
@click.option("-p", "--publish", "ports", multiple=True, metavar="[IP:]HOST:GUEST",
              help="Publish a guest port on the host (127.0.0.1 unless IP given).")
@click.option("--network", type=click.Choice(["none", "nat", "policy"]), default=None,
              help="Guest networking: none (no NIC), nat (the internet, never the host or "
                   "private networks) or policy (only what --allow names). Default: none, "
                   "or nat when --allow/--deny is given.")
@click.option("--allow", multiple=True, metavar="TARGET[:PORT]",
              help="Egress rule (repeatable): an address, CIDR, NAME, *.NAME or 'host' "
                   "(this host), e.g. --allow pypi.org:443 --allow host:5432.")
@click.option("--deny", multiple=True, metavar="TARGET[:PORT]",
              help="Egress rule that wins over --allow (repeatable).")
@click.option("--cpus", type=int, default=None, help="Virtual CPUs.")
@click.option("--memory", type=int, default=None, help="Memory in MiB.")
@click.option("--backend", help="Backend (default: KELPIE_BACKEND or the best for this host).")
@click.option("--arch", type=click.Choice(list(GUEST_ARCHES)), default=None,
              help="Guest architecture (default: the host's; another one is emulated). The "
                   "image is taken for that platform.")
@click.option("-w", "--workdir", default=None, help="Working directory for the command.")
@click.option("--timeout", type=float, default=None, help="Kill the command after SECONDS.")
@click.option("--template", help="Start by restoring this template (see `kelpie template`).")
@click.option("--pull", type=click.Choice(["missing", "never"]), default="missing",
              show_default=True, help="Pull an image the local store lacks, or never.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, name: str | None, detach: bool, interactive: bool, tty: bool,
        remove: bool, env: tuple[str, ...], volumes: tuple[str, ...], ports: tuple[str, ...],
        network: str | None, allow: tuple[str, ...], deny: tuple[str, ...], cpus: int | None,
        memory: int | None, backend: str | None, arch: str | None, workdir: str | None,
        timeout: float | None, template: str | None, pull: str, args: tuple[str, ...]) -> int:
    """Create a sandbox and run a command in it: ``kelpie run [IMAGE] [--] [CMD...]``.

    Without an image (``kelpie run -- echo hi``) the command runs in the guest kit's own
    userland. With an image (a stored tag, digest or id; a registry reference is pulled
    first) it runs in the image's root filesystem with its environment, working directory
    and user; without a command the image's default runs. The exit code is the command's.
    The sandbox is stopped when the command ends (removed with --rm), or left running
    with -d.
    """
    if detach and (remove or interactive or tty):
        raise click.UsageError("-d cannot be combined with --rm, -i or -t")
    no_image = bool(ctx.meta.get("kelpie.no_image")) or template is not None
    image, command = _split_image(list(args), no_image)
    if image is None and not command and not detach and template is None:
        raise click.UsageError("no command given: kelpie run [IMAGE] [--] CMD...")
    if image is not None and current_target().local and pull == "missing":
        _pull_if_missing(image, arch)
    body = SandboxCreate(
        image=image, name=name, cpus=cpus, memory_mib=memory, env=parse_env(env),
        volumes=[_volume(v) for v in volumes], ports=list(ports),
        network=network_mode(network, allow, deny), allow=list(allow), deny=list(deny),
        backend=backend, arch=arch,
        command=(command if command or image is not None else None) if detach else None,
        template=template,
    )

    async def call(client: DaemonClient) -> int:
        try:
            sandbox = await client.create(body, progress=_progress_printer())
        except ImageNotFound:  # a remote daemon lacks the image: it pulls, like docker
            if not (image is not None and pull == "missing" and not current_target().local):
                raise
            click.echo(f"kelpie: the daemon is pulling {image}", err=True)
            await client.pull_image(image)
            sandbox = await client.create(body, progress=_progress_printer())
        if detach:
            click.echo(sandbox.id)
            return 0
        try:
            argv = run_argv(sandbox, command) if sandbox.image else command
            return await _exec_attached(
                client, sandbox.id, argv,
                cwd=workdir, timeout=timeout, interactive=interactive, tty=tty)
        finally:
            with contextlib.suppress(RemoteError):
                if remove:
                    await client.remove(sandbox.id, force=True)
                else:
                    await client.stop(sandbox.id)

    return _client_call(call)


def _split_image(args: list[str], no_image: bool) -> tuple[str | None, list[str]]:
    """Separate ``[IMAGE] [--] CMD...``: the first of several arguments is the image.

    A lone argument is an image if the local store has one by that name or it names a
    registry (has a '/' or ':'), otherwise a command.
    """
    if no_image or not args:
        return None, args
    if len(args) > 1:
        rest = args[2:] if args[1] == "--" else args[1:]
        return args[0], rest
    if not current_target().local or any(c in args[0] for c in "/:@"):
        return args[0], []
    with contextlib.suppress(ImageError):
        ImageStore().resolve(args[0])
        return args[0], []
    return None, args


def _pull_if_missing(image: str, arch: str | None = None) -> None:
    """Pull a registry reference the local store lacks for the sandbox's architecture
    (Docker's ``run`` does the same)."""
    store = ImageStore()
    platform = Platform.for_arch(arch) if arch else Platform.host()
    try:
        store.resolve(image, architecture=platform.architecture)
        return
    except ImageError:
        pass
    try:
        reference = ImageReference.parse(image)
    except ImageError:
        return  # not a registry reference: the daemon reports the missing image
    from kelpie.cli._image import pull_reference

    click.echo(f"kelpie: pulling {reference} ({platform})", err=True)
    pull_reference(reference, platform)


def _volume(text: str) -> str:
    """``HOST:GUEST[:ro]`` with HOST checked and made absolute here, where it is typed."""
    host, sep, rest = text.partition(":")
    if not sep or not host or not rest:
        raise ConfigError([f"-v {text!r}: expected HOST:GUEST or HOST:GUEST:ro"],
                          what="volume")
    if current_target().local:
        path = Path(host).expanduser()
        if not path.is_dir():
            raise ConfigError([f"-v {text!r}: host directory {path} does not exist "
                               "or is not a directory"], what="volume")
        host = str(path.resolve())
    return f"{host}:{rest}"


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
def ps(show_all: bool, quiet: bool, as_json: bool) -> int:
    """List sandboxes (running and paused; -a: all)."""
    async def call(client: DaemonClient) -> int:
        sandboxes = await client.list_sandboxes(all=show_all)
        if as_json:
            click.echo(json.dumps([s.model_dump(mode="json") for s in sandboxes], indent=2))
        elif quiet:
            for s in sandboxes:
                click.echo(s.id)
        else:
            _table(sandboxes)
        return 0

    return _client_call(call)


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
    """Show sandboxes' records as JSON, with their state history."""
    async def call(client: DaemonClient) -> int:
        out: list[dict[str, Any]] = []
        for ref in sandboxes:
            record = (await client.inspect(ref)).model_dump(mode="json")
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
@click.argument("sandboxes", nargs=-1, required=True)
def kill(sandboxes: tuple[str, ...]) -> int:
    """Stop sandboxes at once (their VMs are killed)."""
    return _each(sandboxes, lambda c, ref: c.kill(ref))


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


COMMANDS = (run, exec_, ps, inspect, logs, start, stop, kill, pause, resume, rm, cp)
