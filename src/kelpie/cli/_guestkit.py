"""``kelpie guestkit``: build and describe the kernel + initramfs every VM boots."""

from __future__ import annotations

import json

import click

from kelpie.guestkit import build_guestkit, default_cache_dir


@click.group()
def guestkit() -> None:
    """Build or inspect the guest kit (kernel, initramfs, agent)."""


def _describe(as_json: bool, force: bool, quiet: bool) -> int:
    kit = build_guestkit(force=force, progress=None if quiet else _say)
    info = {
        "digest": kit.digest,
        "directory": str(kit.directory),
        "kernel": str(kit.kernel),
        "initrd": str(kit.initrd),
        "versions": dict(kit.versions),
        "sizes": dict(kit.sizes),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return 0
    click.echo(f"digest     {kit.digest}")
    click.echo(f"directory  {kit.directory}")
    for name, version in sorted(kit.versions.items()):
        click.echo(f"{name:<10} {version}")
    for name, size in sorted(kit.sizes.items()):
        click.echo(f"{name + ' size':<10} {size / 1e6:.1f} MB")
    return 0


def _say(message: str) -> None:
    click.echo(f"kelpie: {message}", err=True)


@guestkit.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached kit matches.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def build(force: bool, as_json: bool) -> int:
    """Build the guest kit (cached by the digest of its inputs) and describe it."""
    return _describe(as_json, force, quiet=False)


@guestkit.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json: bool) -> int:
    """Describe the current guest kit: versions, sizes, digest (building it if needed)."""
    click.echo(f"cache      {default_cache_dir()}", err=True)
    return _describe(as_json, force=False, quiet=False)
