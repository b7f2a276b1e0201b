"""``kelpie teleport SANDBOX --to URL``: move a sandbox to another daemon."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from kelpie._address import read_token_file
from kelpie.api import TeleportMode, TeleportProgress, TeleportReport
from kelpie.cli._connect import connect
from kelpie.vm import GUEST_ARCHES


@click.command()
@click.argument("sandbox")
@click.option("--to", "to", required=True, metavar="URL",
              help="The target daemon: http://HOST:PORT (its TCP listener).")
@click.option("--to-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the target daemon's token.")
@click.option("--mode", type=click.Choice([m.value for m in TeleportMode]), default="auto",
              show_default=True,
              help="live: migrate while it runs; full: pause, snapshot, move, restore; "
                   "checkpoint: files, env and agent state (any arch); auto: the best the "
                   "two hosts support.")
@click.option("--without-volumes", is_flag=True,
              help="Leave host volumes behind (checkpoint mode only).")
@click.option("--converge-timeout", type=click.FloatRange(min=0, min_open=True),
              default=60.0, show_default=True, metavar="SECONDS",
              help="How long a live migration may take before it falls back to full mode.")
@click.option("--arch", type=click.Choice(list(GUEST_ARCHES)), default=None,
              help="The guest architecture it should have there (another one than its own "
                   "moves it as a checkpoint). Default: its own when the target runs it.")
def teleport(sandbox: str, to: str, to_token_file: Path | None, mode: str,
             without_volumes: bool, converge_timeout: float, arch: str | None) -> int:
    """Move SANDBOX from this daemon to the daemon at --to, with nothing lost."""
    token = read_token_file(to_token_file) if to_token_file else None
    report = asyncio.run(_teleport(sandbox, to, token, mode, without_volumes,
                                   converge_timeout, arch))
    sandbox_info = report.sandbox
    click.echo(f"teleported {sandbox_info.name} ({sandbox_info.short_id}) to {report.target}")
    click.echo(f"mode: {report.mode.value} ({report.reason})")
    if report.sandbox.arch:
        click.echo(f"arch: {report.sandbox.arch}")
    click.echo(f"downtime: {report.downtime_s:.3f} s   total: {report.total_s:.2f} s   "
               f"sent: {_size(report.bytes_sent)}")
    return 0


async def _teleport(sandbox: str, to: str, token: str | None, mode: str,
                    without_volumes: bool, converge_timeout: float,
                    arch: str | None) -> TeleportReport:
    client = await connect()
    console = Console(stderr=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=console,
                      disable=not sys.stderr.isatty()) as bars:
            task = bars.add_task("prepare", total=None)
            shown: list[str] = []

            def progress(step: TeleportProgress) -> None:
                if step.phase != "transfer":
                    if not sys.stderr.isatty() and step.message not in shown:
                        console.print(f"{step.phase}: {step.message}")
                    shown.append(step.message)
                    bars.update(task, description=f"{step.phase}: {step.message}"[:60])
                else:
                    bars.update(task, description=f"transfer {step.message}"[:60],
                                completed=step.done, total=step.total or None)

            return await client.teleport(sandbox, to, token=token, mode=mode,
                                         without_volumes=without_volumes, progress=progress,
                                         converge_timeout=converge_timeout, arch=arch)
    finally:
        await client.close()


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"
