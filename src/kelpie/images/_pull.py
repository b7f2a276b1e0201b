"""Pulling an image into a store: the one entry point the CLI and the daemon share."""

from __future__ import annotations

from kelpie.images._auth import RegistryAuth
from kelpie.images._manifest import Platform
from kelpie.images._reference import ImageReference
from kelpie.images._registry import BlobProgress, RegistryClient
from kelpie.images._store import ImageStore, StoredImage


async def pull_image(
    store: ImageStore,
    reference: ImageReference | str,
    *,
    platform: Platform | str | None = None,
    insecure: bool = False,
    auth: RegistryAuth | None = None,
    progress: BlobProgress | None = None,
) -> StoredImage:
    """Pull ``reference`` (for ``platform``, default this host's) into ``store``.

    ``insecure`` allows plain HTTP for the reference's registry (loopback registries
    always may); ``auth`` defaults to the credentials in ``~/.docker/config.json``;
    ``progress(digest, done, total)`` hears each blob's bytes as they arrive.
    """
    ref = reference if isinstance(reference, ImageReference) else ImageReference.parse(reference)
    wanted = Platform.parse(platform) if isinstance(platform, str) else platform
    registries = (ref.registry,) if insecure else ()
    async with RegistryClient(auth=auth, insecure=registries) as client:
        return await client.pull(ref, store, platform=wanted, progress=progress)
