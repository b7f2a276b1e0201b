"""``kelpie snapshot``, ``kelpie restore`` and ``kelpie template``, through the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import click

from kelpie._units import optional_mib
from kelpie.api import Snapshot, TemplateCreate
from kelpie.cli._exec import parse_env
from kelpie.cli._sandbox import _client_call, _each, network_mode
from kelpie.client import DaemonClient
from kelpie.vm import ConfigError

CHUNK = 1 << 20


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _print_snapshots(snapshots: list[Snapshot], as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps([s.model_dump(mode="json") for s in snapshots], indent=2))
        return
    if quiet:
        for s in snapshots:
            click.echo(s.id)
        return
    rows = [("ID", "NAME", "KIND", "FROM", "IMAGE", "SIZE", "CREATED")]
    for s in snapshots:
        rows.append((s.short_id, s.name, s.kind, s.sandbox_name or "-",
                     (s.image or "-").split("@")[0], _size(s.size),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.group()
def snapshot() -> None:
    """Snapshots of sandboxes: create, list, inspect, remove, export, import."""


@snapshot.command("create")
@click.option("--name", help="Name of the snapshot (default: SANDBOX-<id>).")
@click.option("--disk", "kind", flag_value="disk", help="A disk snapshot of a stopped sandbox.")
@click.option("--checkpoint", "kind", flag_value="checkpoint",
              help="A checkpoint: the workspace directory and env (any arch).")
@click.option("--workspace", metavar="DIR",
              help="Checkpoints: the guest directory to keep (default: the image's workdir).")
@click.option("--leave-paused", is_flag=True, help="Leave the sandbox paused afterwards.")
@click.argument("sandbox")
def create(name: str | None, kind: str | None, workspace: str | None, leave_paused: bool,
           sandbox: str) -> int:
    """Snapshot a sandbox: memory, devices and disk (--disk: only the disk of a stopped
    one; --checkpoint: its workspace and env)."""
    async def call(client: DaemonClient) -> int:
        taken = await client.snapshot(sandbox, name=name, kind=kind or "full",
                                      leave_paused=leave_paused, workspace=workspace)
        click.echo(f"{taken.id} {taken.name} ({_size(taken.size)})")
        return 0

    return _client_call(call)


@snapshot.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Print ids only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(quiet: bool, as_json: bool) -> int:
    """List snapshots (templates: `kelpie template ls`)."""
    async def call(client: DaemonClient) -> int:
        _print_snapshots(await client.list_snapshots(templates=False), as_json, quiet)
        return 0

    return _client_call(call)


@snapshot.command("inspect")
@click.argument("snapshots", nargs=-1, required=True)
def inspect(snapshots: tuple[str, ...]) -> int:
    """Show snapshots' records as JSON."""
    async def call(client: DaemonClient) -> int:
        found = [(await client.inspect_snapshot(ref)).model_dump(mode="json") for ref in snapshots]
        click.echo(json.dumps(found, indent=2))
        return 0

    return _client_call(call)


@snapshot.command("rm")
@click.argument("snapshots", nargs=-1, required=True)
def remove(snapshots: tuple[str, ...]) -> int:
    """Delete snapshots."""
    return _each(snapshots, lambda c, ref: c.delete_snapshot(ref))


@snapshot.command("export")
@click.option("--compress", is_flag=True, help="zstd-compress the archive.")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
def export(compress: bool, snapshot_ref: str, file: Path) -> int:
    """Write a snapshot to one archive file (`-`: stdout) to carry it to another host."""
    to_stdout = str(file) == "-"
    if not to_stdout and not file.parent.is_dir():
        raise ConfigError([f"{file.parent} does not exist"], what="export")

    async def call(client: DaemonClient) -> int:
        if to_stdout:
            async for chunk in client.export_snapshot(snapshot_ref, compress=compress):
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            return 0
        fd, temp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in client.export_snapshot(snapshot_ref, compress=compress):
                    out.write(chunk)
            os.replace(temp, file)
        except BaseException:
            os.unlink(temp)
            raise
        click.echo(f"{file} ({_size(os.stat(file).st_size)})")
        return 0

    return _client_call(call)


@snapshot.command("import")
@click.option("--name", help="Name for the imported snapshot (default: its original name).")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
def import_(name: str | None, file: Path) -> int:
    """Add a snapshot from an archive file (`-`: stdin); it is verified before it is listed."""
    if str(file) != "-" and not file.is_file():
        raise ConfigError([f"{file} does not exist or is not a file"], what="import")

    async def chunks() -> AsyncIterator[bytes]:
        source = sys.stdin.buffer if str(file) == "-" else file.open("rb")
        with source:
            while chunk := await asyncio.to_thread(source.read, CHUNK):
                yield chunk

    async def call(client: DaemonClient) -> int:
        added = await client.import_snapshot(chunks(), name=name)
        click.echo(f"{added.id} {added.name}")
        return 0

    return _client_call(call)


@click.command("restore")
@click.option("--name", help="Name of the new sandbox (default: generated).")
@click.option("--into", metavar="SANDBOX",
              help="Roll this stopped sandbox back to the snapshot instead (it must be the "
                   "one the snapshot was taken from).")
@click.option("--paused", is_flag=True, help="Leave the restored sandbox paused.")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable for commands in the new sandbox (repeatable).")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
def restore(name: str | None, into: str | None, paused: bool, env: tuple[str, ...],
            snapshot_ref: str) -> int:
    """Create a new sandbox from a snapshot, as it was when captured; prints its id."""
    variables = parse_env(env)

    async def call(client: DaemonClient) -> int:
        if into is None:
            sandbox = await client.restore(snapshot_ref, name=name, paused=paused,
                                           env=variables)
        elif name or variables:
            raise ConfigError(["name and env cannot be given with --into: the sandbox keeps "
                               "its own"], what="restore")
        else:
            sandbox = await client.restore_into(into, snapshot_ref, paused=paused)
        click.echo(sandbox.id)
        return 0

    return _client_call(call)


@click.group()
def template() -> None:
    """Templates: prepared snapshots that sandboxes start from (`kelpie run --template`)."""


@template.command("create")
@click.option("--name", required=True, help="Name of the template.")
@click.option("--cpus", type=int, default=None, help="Virtual CPUs.")
@click.option("--memory", default=None, metavar="SIZE", help="Memory (as for run).")
@click.option("--disk", default=None, metavar="SIZE",
              help="Root disk size (as for run); its clones keep it.")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable (repeatable).")
@click.option("--network", type=click.Choice(["none", "nat", "policy"]), default=None,
              help="As for run (default: none, or nat with --allow/--deny); its clones "
                   "keep it.")
@click.option("--allow", multiple=True, metavar="TARGET[:PORT]", help="Egress rule (as for run).")
@click.option("--deny", multiple=True, metavar="TARGET[:PORT]", help="Egress rule (as for run).")
@click.option("--backend", help="Backend (default: the best for this host).")
@click.argument("image", required=False)
def template_create(name: str, cpus: int | None, memory: str | None, disk: str | None,
                    env: tuple[str, ...],
                    network: str | None, allow: tuple[str, ...], deny: tuple[str, ...],
                    backend: str | None, image: str | None) -> int:
    """Boot IMAGE once (none: the guest kit), wait for its agent, keep its snapshot."""
    variables = parse_env(env)

    async def call(client: DaemonClient) -> int:
        made = await client.create_template(TemplateCreate(
            name=name, image=image, cpus=cpus, memory_mib=optional_mib(memory, "memory"),
            disk_mib=optional_mib(disk, "disk"), env=variables,
            network=network_mode(network, allow, deny), allow=list(allow), deny=list(deny),
            backend=backend))
        click.echo(f"{made.id} {made.name} ({_size(made.size)})")
        return 0

    return _client_call(call)


@template.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Print ids only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def template_ls(quiet: bool, as_json: bool) -> int:
    """List templates."""
    async def call(client: DaemonClient) -> int:
        _print_snapshots(await client.list_snapshots(templates=True), as_json, quiet)
        return 0

    return _client_call(call)


@template.command("rm")
@click.argument("templates", nargs=-1, required=True)
def template_rm(templates: tuple[str, ...]) -> int:
    """Delete templates."""
    return _each(templates, lambda c, ref: c.delete_snapshot(ref, template=True))


COMMANDS = (snapshot, restore, template)
