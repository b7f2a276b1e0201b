"""The fleet's shared store, an S3-compatible object store: templates pushed once and
pulled by every host, and the saved states lost sandboxes are recovered from. Every archive
is verified by its sha256 before a host imports it.

Layout in the bucket: ``templates/NAME.json`` (the manifest: name, sha256 digest, size,
and the image it was made from: reference and manifest digest)
and ``templates/NAME/sha256-HEX.tar`` (the snapshot archive a daemon exports). A manifest is
written only after its archive is complete, so a reader never sees a manifest whose archive
is missing or partial. Saved states are ``sandboxes/NAME/gGENERATION-sha256-HEX.tar``; the
coordinator keeps their digests (no manifest: it says which one to recover from).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from kelpie.fleet._coordinator import FleetError

CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class StoreError(FleetError):
    """The shared store failed or held something that does not verify."""


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the shared store is: an S3 endpoint, a bucket and its credentials."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never print the secret
        return f"StoreConfig(endpoint={self.endpoint!r}, bucket={self.bucket!r})"


@dataclasses.dataclass(frozen=True)
class StoredTemplate:
    """A template in the shared store."""

    name: str
    digest: str
    size: int
    image: str | None = None
    """The reference of the image it was made from (None: the guest kit's own)."""
    image_digest: str | None = None


class SharedStore:
    """Templates and saved states in the shared store (boto3's S3 client, called in a
    worker thread)."""

    def __init__(self, config: StoreConfig) -> None:
        import boto3

        self._config = config
        self._s3: Any = boto3.client(
            "s3", endpoint_url=config.endpoint, aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key, region_name=config.region)

    async def put(self, name: str, archive: Path, *, image: str | None = None,
                  image_digest: str | None = None) -> StoredTemplate:
        """Upload ``archive`` as template ``name`` (made from ``image``); its manifest
        last."""
        _check_name(name, "template")
        digest, size = await asyncio.to_thread(_sha256, archive)
        key = f"templates/{name}/{digest.replace(':', '-')}.tar"
        stored = StoredTemplate(name, digest, size, image, image_digest)
        try:
            await asyncio.to_thread(self._s3.upload_file, str(archive), self._config.bucket, key)
            manifest = json.dumps(dataclasses.asdict(stored)).encode()
            await asyncio.to_thread(self._s3.put_object, Bucket=self._config.bucket,
                                    Key=f"templates/{name}.json", Body=manifest)
        except Exception as exc:  # botocore's errors: one clear error with the cause
            raise StoreError(f"uploading template {name!r} to {self._where()} failed: "
                             f"{exc}") from exc
        return stored

    async def get(self, name: str, into: Path) -> StoredTemplate:
        """Download template ``name`` to ``into``, checked against its manifest's size and
        sha256 (a mismatch deletes the download and raises)."""
        _check_name(name, "template")
        try:
            body = await asyncio.to_thread(self._s3.get_object, Bucket=self._config.bucket,
                                           Key=f"templates/{name}.json")
            manifest = json.loads(await asyncio.to_thread(body["Body"].read))
            stored = StoredTemplate(str(manifest["name"]), str(manifest["digest"]),
                                    int(manifest["size"]), _optional(manifest.get("image")),
                                    _optional(manifest.get("image_digest")))
        except Exception as exc:
            raise StoreError(f"fetching template {name!r} from {self._where()} failed: "
                             f"{exc}") from exc
        key = f"templates/{name}/{stored.digest.replace(':', '-')}.tar"
        await self._download(key, stored.digest, stored.size, into,
                             f"template {name!r}", "push it again")
        return stored

    async def put_saved(self, name: str, generation: int, archive: Path,
                        ) -> tuple[str, str, int]:
        """Upload ``archive`` as a saved state of sandbox ``name``: its key, digest, size."""
        _check_name(name, "sandbox")
        digest, size = await asyncio.to_thread(_sha256, archive)
        key = f"sandboxes/{name}/g{generation}-{digest.replace(':', '-')}.tar"
        try:
            await asyncio.to_thread(self._s3.upload_file, str(archive), self._config.bucket, key)
        except Exception as exc:
            raise StoreError(f"uploading a saved state of sandbox {name!r} to "
                             f"{self._where()} failed: {exc}") from exc
        return key, digest, size

    async def get_saved(self, key: str, digest: str, size: int, into: Path) -> None:
        """Download the saved state at ``key`` to ``into``, checked against ``digest`` and
        ``size``."""
        await self._download(key, digest, size, into, f"saved state {key}",
                             "it cannot be recovered from")

    async def forget_saved(self, name: str, *, keep: frozenset[str] = frozenset()) -> None:
        """Delete the saved states of sandbox ``name`` whose keys are not in ``keep``."""
        _check_name(name, "sandbox")
        try:
            pages = await asyncio.to_thread(self._list, f"sandboxes/{name}/")
            for key in pages:
                if key not in keep:
                    await asyncio.to_thread(self._s3.delete_object,
                                            Bucket=self._config.bucket, Key=key)
        except Exception as exc:
            raise StoreError(f"deleting saved states of sandbox {name!r} from "
                             f"{self._where()} failed: {exc}") from exc

    def _list(self, prefix: str) -> list[str]:
        paginator = self._s3.get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self._config.bucket,
                                                           Prefix=prefix)
                for item in page.get("Contents", [])]

    async def _download(self, key: str, digest: str, size: int, into: Path, what: str,
                        advice: str) -> None:
        try:
            await asyncio.to_thread(self._s3.download_file, self._config.bucket, key,
                                    str(into))
        except Exception as exc:
            raise StoreError(f"fetching {what} from {self._where()} failed: {exc}") from exc
        found, length = await asyncio.to_thread(_sha256, into)
        if (found, length) != (digest, size):
            await asyncio.to_thread(into.unlink, missing_ok=True)
            raise StoreError(f"{what} from {self._where()} does not verify: expected "
                             f"{digest} ({size} bytes), the archive is {found} ({length} "
                             f"bytes); {advice}")

    def _where(self) -> str:
        return f"s3 bucket {self._config.bucket!r} at {self._config.endpoint}"


def _optional(value: object) -> str | None:
    return None if value is None else str(value)


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise StoreError(f"{what} name {name!r}: expected letters, digits, '_', '.', '-' "
                         "(at most 128, starting with a letter or digit)")


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size
