"""``kelpie guestkit``: build and describe the kernel + initramfs every VM boots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kelpie.guestkit import build_guestkit, default_cache_dir
from kelpie.guestkit._archive import DebianArchive
from kelpie.guestkit._lock import (
    DEBIAN_ARCHES,
    LOCK,
    KitLock,
    read_lock,
    refreshed,
    write_lock,
)


@click.group()
def guestkit() -> None:
    """Build or inspect the guest kit (kernel, initramfs, agent)."""


def _describe(as_json: bool, force: bool, quiet: bool, arch: str | None = None) -> int:
    kit = build_guestkit(force=force, progress=None if quiet else _say, arch=arch)
    info = {
        "digest": kit.digest,
        "arch": kit.arch,
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
    click.echo(f"arch       {kit.arch}")
    click.echo(f"directory  {kit.directory}")
    for name, version in sorted(kit.versions.items()):
        click.echo(f"{name:<10} {version}")
    for name, size in sorted(kit.sizes.items()):
        click.echo(f"{name + ' size':<10} {size / 1e6:.1f} MB")
    return 0


def _say(message: str) -> None:
    click.echo(f"kelpie: {message}", err=True)


ARCH_OPTION = click.option("--arch", type=click.Choice(sorted(DEBIAN_ARCHES)), default=None,
                           help="Guest architecture (default: the host's).")


@guestkit.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached kit matches.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ARCH_OPTION
def build(force: bool, as_json: bool, arch: str | None) -> int:
    """Build the guest kit (cached by the digest of its inputs) and describe it."""
    return _describe(as_json, force, quiet=False, arch=arch)


@guestkit.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ARCH_OPTION
def info(as_json: bool, arch: str | None) -> int:
    """Describe the current guest kit (versions, sizes, digest; building it if needed) and
    the lock it is built from."""
    click.echo(f"cache      {default_cache_dir()}", err=True)
    if not as_json:
        _print_lock(read_lock())
    return _describe(as_json, force=False, quiet=False, arch=arch)


@guestkit.command("lock")
@click.option("--refresh", is_flag=True,
              help="Lock the archive's current versions (else: show the lock).")
@click.option("--arch", "arches", multiple=True, type=click.Choice(sorted(DEBIAN_ARCHES)),
              help="Architecture to refresh (repeatable; default: every locked one).")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path),
              default=LOCK, show_default=True, help="The lock file.")
def lock(refresh: bool, arches: tuple[str, ...], path: Path) -> int:
    """Show the Debian packages the guest kit is built from, or refresh them from the
    archive (every index checked through the archive's signed Release)."""
    current = read_lock(path)
    if refresh:
        wanted = [DEBIAN_ARCHES[a] for a in arches] or sorted(current.arches)
        for debian_arch in wanted:
            archive = DebianArchive(current.sources, debian_arch, default_cache_dir(),
                                    progress=_say)
            try:
                current = refreshed(current, archive)
            finally:
                archive.close()
        write_lock(current, path)
        _say(f"wrote {path}")
    _print_lock(current)
    return 0


def _print_lock(current: KitLock) -> None:
    for source in current.sources:
        click.echo(f"source     {source.name}: {source.url} {source.suite} {source.component}")
    for arch, items in sorted(current.arches.items()):
        for item in items:
            click.echo(f"{arch:<10} {item.package.name} {item.package.version} "
                       f"sha256:{item.package.sha256[:16]}")
