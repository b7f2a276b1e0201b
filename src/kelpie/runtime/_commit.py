"""Commit: a sandbox's file system changes over its image, as a new image (Docker's
``commit``).

The guest's agent walks its root file system (``walk``: every entry's type, mode, owner,
size, times, link target; mount points are named, not entered). The host compares that
with the image's own tree, which it built itself from verified layers: an entry is
changed when it is new, when its metadata differs, or when its inode changed after the
image's disk was built (its ``ctime`` is later: the guest kernel stamps every write,
``chmod`` or rename, and no program can set it back). Entries of the image missing from
the guest become whiteouts. The changed files' bytes come through the agent's file reads.
Nothing the guest wrote is mounted or interpreted on the host: its paths, modes and owners
are checked as untrusted input, device nodes are refused, and the layer is applied like any
pulled layer when a sandbox later starts from the image.

The layer (a gzip tar) goes on top of the image's, with a config that carries the
sandbox's environment, working directory, user and main command; the image is stored
under the name given. The sandbox keeps running (Kelpie cannot freeze a guest's processes
the way Docker pauses a container's cgroup: a file written during the commit may or may not
be in it).
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kelpie.images import ImageReference, ImageStore, StoredImage, rootfs_dir, sha256_digest
from kelpie.runtime._arguments import label
from kelpie.runtime._context import RuntimeContext
from kelpie.vm import ConfigError, TreeEntry, VmInstance

EXCLUDED = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
"""What the runtime writes into every guest (Docker leaves these out of a commit too)."""
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WHITEOUT = ".wh."
COPY_CHUNK = 1 << 20


@dataclass
class Changes:
    """What differs between an image's tree and a guest's."""

    changed: list[TreeEntry] = field(default_factory=list)
    """New or changed entries, parents before children."""
    deleted: list[str] = field(default_factory=list)
    """Paths of the image gone from the guest (the topmost of each gone subtree)."""


def host_tree(root: Path) -> dict[str, TreeEntry]:
    """The tree under ``root`` (an image's root directory on the host), by guest path."""
    tree: dict[str, TreeEntry] = {}
    pending = [("", str(root))]
    while pending:
        guest, host = pending.pop()
        with os.scandir(host) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                path = f"{guest}/{entry.name}"
                kind = _kind(st.st_mode)
                tree[path] = TreeEntry(
                    path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                    st.st_mtime_ns, st.st_ctime_ns,
                    target=os.readlink(entry.path) if kind == "symlink" else None)
                if kind == "dir":
                    pending.append((path, entry.path))
    return tree


def changes(base: Mapping[str, TreeEntry], current: Sequence[TreeEntry],
            since_ns: int) -> Changes:
    """What the guest tree ``current`` changed over the image tree ``base``; ``since_ns``
    is when the image's disk was built (an inode changed later was changed in the guest)."""
    mounts = [e.path for e in current if e.mount]
    seen = {e.path for e in current}
    result = Changes()
    for entry in sorted(current, key=lambda e: e.path):
        if entry.mount or entry.path in EXCLUDED:
            continue
        old = base.get(entry.path)
        if old is None or entry.ctime_ns > since_ns or _differs(old, entry):
            result.changed.append(entry)
    gone = {p for p, e in base.items() if p not in seen and p not in EXCLUDED
            and not e.mount and not any(p == m or p.startswith(m + "/") for m in mounts)}
    result.deleted = sorted(p for p in gone if _parent(p) not in gone)
    return result


def refuse_devices(found: Changes, what: str) -> None:
    """Device nodes cannot go into a layer Kelpie makes: say which the guest has."""
    devices = [e.path for e in found.changed if e.type in ("char", "block")]
    if devices:
        raise ConfigError([f"{what} made device nodes ({', '.join(devices[:5])}), which an "
                           "image built by Kelpie does not carry; remove them first"],
                          what="commit")


def _differs(before: TreeEntry, now: TreeEntry) -> bool:
    if (before.type, before.mode, before.uid, before.gid, before.target) != \
            (now.type, now.mode, now.uid, now.gid, now.target):
        return True
    return now.type == "file" and (before.size, before.mtime_ns) != (now.size, now.mtime_ns)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _kind(mode: int) -> str:
    for check, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"),
                        (stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char"),
                        (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                        (stat.S_ISSOCK, "socket")):
        if check(mode):
            return name
    return "other"


class Commits:
    """Commits sandboxes of one runtime to images (see the module docstring)."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self._ctx = ctx

    async def commit(self, ref: str, reference: str, *,
                     message: str | None = None) -> StoredImage:
        ctx = self._ctx
        target = ImageReference.parse(reference)
        info = ctx.find(ref)
        ctx.check_not_held(info, "commit")
        if info.image_digest is None or info.config.root_disk is None:
            raise ConfigError([f"sandbox {label(info)} has no image: a commit records the "
                               "changes over one; start the sandbox from an image"],
                              what="commit")
        async with ctx.lock_for(info.id):
            vm = ctx.live_vm(ctx.info(info.id), "commit")
            image = ctx.images.get(info.image_digest)
            base = await asyncio.to_thread(
                lambda: host_tree(rootfs_dir(ctx.images, image)))
            since = info.config.root_disk.stat().st_mtime_ns
            found = changes(base, await vm.walk("/"), since)
            refuse_devices(found, f"sandbox {label(info)}")
            scratch = ctx.images.build_dir
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=scratch, prefix="commit-") as work:
                layer = Path(work) / "layer.tar"
                await write_layer(vm, found, layer)
                settings = info_config(info.config.env, info.workdir, info.user, info.command)
                return await asyncio.to_thread(_store_image, ctx, image, layer, target,
                                               settings, message, f"kelpie commit {info.name}")


async def write_layer(vm: VmInstance, found: Changes, path: Path) -> None:
    """The tar of the changes (whiteouts for what is gone), files read from the guest."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in found.changed:
            if entry.type in {"socket", "other"}:
                continue  # nothing an image can hold
            member = _member(entry)
            if entry.type != "file":
                tar.addfile(member)
                continue
            with tempfile.TemporaryFile(dir=path.parent) as data:
                async for chunk in vm.read_file_stream(entry.path):
                    data.write(chunk)
                member.size = data.tell()
                data.seek(0)
                tar.addfile(member, data)
        for gone in found.deleted:
            parent, _, name = gone.rpartition("/")
            tar.addfile(tarfile.TarInfo(f"{parent.lstrip('/')}/{WHITEOUT}{name}".lstrip("/")))


def info_config(env: Mapping[str, str], workdir: str | None, user: str | None,
                command: Sequence[str] | None) -> dict[str, Any]:
    """The parts of an image config a commit takes from the sandbox."""
    config: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in env.items()]}
    if workdir:
        config["WorkingDir"] = workdir
    if user:
        config["User"] = user
    if command is not None:  # the sandbox's own command, whole: no entrypoint before it
        config["Entrypoint"] = None
        config["Cmd"] = list(command)
    return config


def _member(entry: TreeEntry) -> tarfile.TarInfo:
    member = tarfile.TarInfo(entry.path.lstrip("/"))
    member.mode, member.uid, member.gid = entry.mode, entry.uid, entry.gid
    member.mtime = entry.mtime_ns // 1_000_000_000
    if entry.type == "dir":
        member.type = tarfile.DIRTYPE
    elif entry.type == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, entry.target or ""
    elif entry.type == "fifo":
        member.type = tarfile.FIFOTYPE
    return member


def _store_image(ctx: RuntimeContext, image: StoredImage, layer: Path,
                 target: ImageReference, config_changes: Mapping[str, Any],
                 message: str | None, created_by: str) -> StoredImage:
    """Compress ``layer``, write the new config and manifest, store the image."""
    store = ctx.images
    layer_digest, layer_size, diff_id = pack_layer(store, layer)

    now = datetime.datetime.fromtimestamp(ctx.clock(), datetime.UTC).isoformat()
    config = json.loads(store.blobs.read_bytes(image.manifest.config.digest))
    config["created"] = now
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(diff_id)
    config.setdefault("history", []).append(
        {"created": now, "created_by": created_by, **({"comment": message} if message else {})})
    container = config.setdefault("config", {}) or {}
    container.update(config_changes)
    config["config"] = {k: v for k, v in container.items() if v is not None}

    manifest = json.loads(store.blobs.read_bytes(image.digest))
    layer_type = OCI_LAYER_GZIP if image.media_type == OCI_MANIFEST else DOCKER_LAYER_GZIP
    manifest["layers"] = [*manifest.get("layers", []),
                          {"mediaType": layer_type, "digest": layer_digest, "size": layer_size}]
    manifest.pop("annotations", None)  # they described the image committed over
    return store_image(store, config, manifest, image.media_type, target)


def store_image(store: ImageStore, config: Mapping[str, Any], manifest: dict[str, Any],
                media_type: str, reference: ImageReference | None) -> StoredImage:
    """Store ``config`` as a blob, point ``manifest``'s config descriptor at it, and add
    the image (tagged ``reference``, if given); both documents in canonical JSON."""
    config_bytes = canonical(config)
    config_digest = sha256_digest(config_bytes)
    store.blobs.put(config_bytes, config_digest)
    manifest["config"] = {**manifest["config"], "digest": config_digest,
                          "size": len(config_bytes)}
    return store.add_image(reference, canonical(manifest), media_type)


def pack_layer(store: ImageStore, layer: Path) -> tuple[str, int, str]:
    """Compress the tar ``layer`` (gzip, no timestamp: the same tar gives the same blob)
    into the store; its digest, size and diff_id (the digest of the tar itself)."""
    diff_id = _sha256_file(layer)
    packed = layer.with_suffix(".tar.gz")
    with layer.open("rb") as raw, gzip.GzipFile(packed, "wb", mtime=0) as out:
        for chunk in iter(lambda: raw.read(COPY_CHUNK), b""):
            out.write(chunk)
    digest, size = _sha256_file(packed), packed.stat().st_size
    with packed.open("rb") as data:
        store.blobs.put(data, digest, size=size)
    packed.unlink()
    return digest, size, diff_id


def canonical(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for chunk in iter(lambda: data.read(COPY_CHUNK), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
