"""Pulling an image into a store and pushing one out: the entry points the CLI and the
daemon share."""

from __future__ import annotations

from kelpie.images._auth import RegistryAuth
from kelpie.images._errors import InvalidReference
from kelpie.images._manifest import Platform
from kelpie.images._push import ImagePush, PushReport
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


async def push_image(
    store: ImageStore,
    image: str,
    reference: ImageReference | str | None = None,
    *,
    insecure: bool = False,
    auth: RegistryAuth | None = None,
    progress: BlobProgress | None = None,
) -> PushReport:
    """Push the stored ``image`` (tag, digest or id) to ``reference`` (default: the name
    the image is known by); blobs the registry has already are not sent.

    ``insecure``, ``auth`` and ``progress`` are as for :func:`pull_image`.
    """
    stored = store.resolve(image)
    target = default_push_reference(image, stored.tags) if reference is None else reference
    ref = target if isinstance(target, ImageReference) else ImageReference.parse(target)
    registries = (ref.registry,) if insecure else ()
    async with RegistryClient(auth=auth, insecure=registries) as client:
        return await ImagePush(client, store, stored, ref, progress).run()


def default_push_reference(image: str, tags: tuple[str, ...]) -> str:
    """Where an image pushed without a reference goes: the name it was given by, else its
    one name."""
    try:
        named: str | None = str(ImageReference.parse(image))
    except InvalidReference:
        named = None
    if named is not None and named in tags:
        return named
    if len(tags) == 1:
        return tags[0]
    names = f"several names ({', '.join(tags)})" if tags else "no name"
    raise InvalidReference(image, [f"give the reference to push to (REGISTRY/REPO:TAG): the "
                                   f"image has {names}"])
