"""``kelpie image``: pull, push, import, list, inspect, remove and prune stored images."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tarfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from kelpie.api import ImageDetails
from kelpie.cli._connect import connect
from kelpie.cli._target import current_target
from kelpie.client import DaemonClient
from kelpie.images._auth import Credentials, RegistryAuth
from kelpie.images._import import import_docker_archive, import_oci_layout
from kelpie.images._manifest import Platform
from kelpie.images._pull import default_push_reference, pull_image, push_image
from kelpie.images._push import PushReport
from kelpie.images._reference import ImageReference
from kelpie.images._registry import BlobProgress
from kelpie.images._store import ImageStore, StoredImage
from kelpie.service import PushView


def describe(image: StoredImage) -> dict[str, Any]:
    """A JSON-ready description of a stored image (the same as the daemon's)."""
    return ImageDetails.from_stored(image).model_dump(mode="json")


def _daemon_target() -> bool:
    """Whether image commands go to a daemon (``--host`` / ``KELPIE_HOST``), not the local
    store."""
    return not current_target().local


async def _with_client(call: Callable[[DaemonClient], Awaitable[int]]) -> int:
    client = await connect()
    try:
        return await call(client)
    finally:
        await client.close()


@click.group()
def image() -> None:
    """Manage images: pull from registries, import from disk, list, remove."""


@image.command("pull")
@click.argument("reference")
@click.option("--platform", help="OS/ARCH[/VARIANT] to pull from a multi-platform image.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Use plain HTTP for this registry (localhost always may).")
@click.option("--username", help="Registry user (else ~/.docker/config.json).")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
def pull(reference: str, platform: str | None, insecure: tuple[str, ...], username: str | None,
         password_stdin: bool) -> int:
    """Pull an image from an OCI registry into the local store."""
    ref = ImageReference.parse(reference)
    wanted = Platform.parse(platform) if platform else None
    if _daemon_target():
        _no_credentials_for_a_daemon(username)
        return asyncio.run(_with_client(lambda c: _pull_remote(
            c, str(ref), platform, ref.registry in insecure)))
    credentials = _credentials(ref.registry, username, password_stdin)
    stored = pull_reference(ref, wanted, insecure, RegistryAuth(credentials))
    click.echo(f"{stored.id} {stored.digest}")
    return 0


def _credentials(registry: str, username: str | None,
                 password_stdin: bool) -> dict[str, Credentials] | None:
    """``--username`` with the password read from stdin, for ``registry``."""
    if not username:
        return None
    if not password_stdin:
        raise click.UsageError("--username needs --password-stdin")
    return {registry: Credentials(username, sys.stdin.readline().rstrip("\n"))}


def _no_credentials_for_a_daemon(username: str | None) -> None:
    if username:
        raise click.UsageError("--username is for the local store; a daemon uses the "
                               "credentials of its own host (~/.docker/config.json)")


async def _pull_remote(client: DaemonClient, reference: str, platform: str | None,
                       insecure: bool) -> int:
    with _bars() as (bars, progress):
        del bars
        pulled = await client.pull_image(reference, platform=platform, insecure=insecure,
                                         progress=progress)
    click.echo(f"{pulled.id} {pulled.digest}")
    return 0


@image.command("push")
@click.argument("image_ref", metavar="IMAGE")
@click.argument("reference", required=False)
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Use plain HTTP for this registry (localhost always may).")
@click.option("--username", help="Registry user (else ~/.docker/config.json).")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
def push(image_ref: str, reference: str | None, insecure: tuple[str, ...],
         username: str | None, password_stdin: bool) -> int:
    """Push a stored IMAGE (tag, digest or id) to an OCI registry, as REFERENCE
    (REGISTRY/REPO:TAG; default: the name the image is known by). Blobs the registry has
    are not sent again; blobs of another of its repositories are mounted; uploads go in
    chunks that resume after a failure. Prints where the image went, with its digest."""
    ref = ImageReference.parse(reference) if reference else None
    if _daemon_target():
        _no_credentials_for_a_daemon(username)
        return asyncio.run(_with_client(lambda c: _push_remote(
            c, image_ref, reference, bool(ref and ref.registry in insecure))))
    store = ImageStore()
    target = ref or ImageReference.parse(
        default_push_reference(image_ref, store.resolve(image_ref).tags))
    credentials = _credentials(target.registry, username, password_stdin)

    async def run() -> PushReport:
        with _bars() as (_, progress):
            return await push_image(store, image_ref, target,
                                    insecure=target.registry in insecure,
                                    auth=RegistryAuth(credentials), progress=progress)

    _said_pushed(asyncio.run(run()))
    return 0


async def _push_remote(client: DaemonClient, image_ref: str, reference: str | None,
                       insecure: bool) -> int:
    with _bars() as (_, progress):
        _said_pushed(await client.push_image(image_ref, reference, insecure=insecure,
                                             progress=progress))
    return 0


def _said_pushed(report: PushView) -> None:
    click.echo(report.reference)
    click.echo(f"{len(report.uploaded)} blobs sent ({report.bytes_sent} bytes), "
               f"{len(report.mounted)} mounted, {len(report.existing)} already there",
               err=True)


@contextlib.contextmanager
def _bars() -> Iterator[tuple[Progress, BlobProgress]]:
    """Download bars on stderr when it is a terminal, and the callback that moves them."""
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True),
                  disable=not sys.stderr.isatty()) as bars:
        tasks: dict[str, Any] = {}

        def progress(digest: str, done: int, total: int) -> None:
            if digest not in tasks:
                tasks[digest] = bars.add_task(digest.removeprefix("sha256:")[:12], total=total)
            bars.update(tasks[digest], completed=done, total=total)

        yield bars, progress


def pull_reference(ref: ImageReference, platform: Platform | None = None,
                   insecure: tuple[str, ...] = (), auth: RegistryAuth | None = None,
                   ) -> StoredImage:
    """Pull into the local store, with progress bars when stderr is a terminal."""
    return asyncio.run(_pull(ref, platform, insecure, auth or RegistryAuth()))


async def _pull(ref: ImageReference, platform: Platform | None, insecure: tuple[str, ...],
                auth: RegistryAuth) -> StoredImage:
    with _bars() as (_, progress):
        return await pull_image(ImageStore(), ref, platform=platform,
                                insecure=ref.registry in insecure, auth=auth,
                                progress=progress)


@image.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--reference", help="Tag for the image (or which layout entry to import).")
@click.option("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform layout.")
def import_(path: Path, reference: str | None, platform: str | None) -> int:
    """Import an OCI image layout (directory or tar) or a `docker save` tarball."""
    if _daemon_target():
        raise click.UsageError("import reads files into the local store; for a daemon on "
                               "another host, push the image to a registry and "
                               "`kelpie --host ... image pull` it")
    store = ImageStore()
    if _is_docker_archive(path):
        images = import_docker_archive(path, store)
    else:
        wanted = Platform.parse(platform) if platform else None
        images = import_oci_layout(path, store, reference=reference, platform=wanted)
    for stored in images:
        click.echo(f"{stored.id} {' '.join(stored.tags) or '<untagged>'}")
    return 0


def _is_docker_archive(path: Path) -> bool:
    if path.is_dir():
        return (path / "manifest.json").exists() and not (path / "oci-layout").exists()
    with tarfile.open(path) as archive:
        names = set(archive.getnames())
    return "manifest.json" in names and "oci-layout" not in names


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_images(as_json: bool) -> int:
    """List stored images (the daemon's with --host)."""
    if _daemon_target():
        async def details(client: DaemonClient) -> list[ImageDetails]:
            return [await client.inspect_image(i.digest) for i in await client.list_images()]

        found = _details(details)
    else:
        found = [ImageDetails.from_stored(i) for i in ImageStore().list()]
    if as_json:
        click.echo(json.dumps([d.model_dump(mode="json") for d in found], indent=2))
        return 0
    table = Table("id", "tags", "platform", "size")
    for d in found:
        table.add_row(d.id, "\n".join(d.tags) or "<untagged>", d.platform,
                      f"{d.size / 1e6:.1f} MB")
    Console().print(table)
    return 0


def _details(call: Callable[[DaemonClient], Awaitable[list[ImageDetails]]],
             ) -> list[ImageDetails]:
    async def run() -> list[ImageDetails]:
        client = await connect()
        try:
            return await call(client)
        finally:
            await client.close()

    return asyncio.run(run())


@image.command("inspect")
@click.argument("reference")
def inspect(reference: str) -> int:
    """Show an image's manifest digest, config and layers as JSON."""
    if _daemon_target():
        async def one(client: DaemonClient) -> list[ImageDetails]:
            return [await client.inspect_image(reference)]

        found = _details(one)[0].model_dump(mode="json")
    else:
        found = describe(ImageStore().resolve(reference))
    click.echo(json.dumps(found, indent=2))
    return 0


@image.command("rm")
@click.argument("references", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if other tags point at it.")
def remove(references: tuple[str, ...], force: bool) -> int:
    """Remove images (a tag, a digest or an id prefix)."""
    if _daemon_target():
        async def remove_all(client: DaemonClient) -> int:
            for reference in references:
                for removed in await client.remove_image(reference, force=force):
                    click.echo(f"removed {removed}")
            return 0

        return asyncio.run(_with_client(remove_all))
    store = ImageStore()
    for reference in references:
        for removed in store.remove(reference, force=force):
            click.echo(f"removed {removed}")
    return 0


@image.command("prune")
def prune() -> int:
    """Delete untagged images and blobs nothing uses (held images are kept)."""
    if _daemon_target():
        raise click.UsageError("prune works on the local store; run it on the daemon's host")
    for removed in ImageStore().prune():
        click.echo(f"removed {removed}")
    return 0
