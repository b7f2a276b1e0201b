"""``kelpie build``: an image from a Dockerfile, built by the daemon (every RUN in a
micro-VM); progress and RUN output on stderr, the image's id and digest on stdout."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from kelpie._units import optional_mib
from kelpie.api import BuildEvent
from kelpie.cli._connect import connect


@click.command("build")
@click.option("-t", "--tag", multiple=True, metavar="NAME[:TAG]",
              help="Name the image (repeat for several names).")
@click.option("-f", "--file", "dockerfile", default=None, metavar="PATH",
              help="The Dockerfile (default: CONTEXT/Dockerfile); it must be in CONTEXT.")
@click.option("--build-arg", multiple=True, metavar="KEY=VALUE",
              help="A value for one of the Dockerfile's ARGs.")
@click.option("--target", default=None, metavar="STAGE", help="Build this stage only.")
@click.option("--platform", default=None, metavar="OS/ARCH",
              help="The image's platform (default: the host's).")
@click.option("--network", type=click.Choice(["default", "nat", "none"]), default="default",
              help="RUN steps' network: default/nat (the internet, never the host or "
                   "private networks) or none.")
@click.option("--no-cache", is_flag=True, help="Run every step again.")
@click.option("--step-timeout", type=float, default=1800.0, show_default=True,
              help="Seconds a RUN step may take.")
@click.option("-m", "--memory", default=None, help="Memory of the build VMs (512m, 2g).")
@click.option("--disk", default=None, help="Root disk of the build VMs (10g).")
@click.option("--cpus", type=int, default=None, help="Virtual CPUs of the build VMs.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image's id and digest.")
@click.argument("context", default=".", type=click.Path(file_okay=False, path_type=Path))
def build(tag: tuple[str, ...], dockerfile: str | None, build_arg: tuple[str, ...],
          target: str | None, platform: str | None, network: str, no_cache: bool,
          step_timeout: float, memory: str | None, disk: str | None, cpus: int | None,
          quiet: bool, context: Path) -> int:
    """Build an image from the Dockerfile in CONTEXT (a directory; its .dockerignore is
    honoured). Each RUN step runs inside a micro-VM, never on this host; steps whose
    inputs did not change come from the build cache without booting a VM."""
    file = _in_context(context, dockerfile)
    fields = {"tag": list(tag), "file": file, "build_arg": list(build_arg),
              "target": target, "platform": platform,
              "network": "none" if network == "none" else "nat", "no_cache": no_cache,
              "step_timeout": step_timeout, "memory_mib": optional_mib(memory, "--memory"),
              "disk_mib": optional_mib(disk, "--disk"), "cpus": cpus}

    async def run() -> int:
        client = await connect()
        try:
            image = await client.build(context, progress=None if quiet else _show, **fields)
        finally:
            await client.close()
        click.echo(f"{image.id} {image.digest}")
        return 0

    return asyncio.run(run())


def _in_context(context: Path, dockerfile: str | None) -> str:
    """``-f`` as a path inside the context (Docker's ``-f`` is relative to the current
    directory)."""
    if dockerfile is None:
        return "Dockerfile"
    path = Path(dockerfile).absolute()
    try:
        return path.relative_to(context.absolute()).as_posix()
    except ValueError:
        raise click.UsageError(f"-f {dockerfile}: the Dockerfile must be inside the build "
                               f"context {context}") from None


def _show(event: BuildEvent) -> None:
    if event.kind == "output":
        sys.stderr.write(event.text)
        sys.stderr.flush()
    elif event.kind == "step":
        click.echo(f"#{event.step}/{event.steps} [{event.stage}] {event.text}", err=True)
    else:
        click.echo(f"  {event.text}", err=True)
