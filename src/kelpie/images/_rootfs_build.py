"""Turning a stored image into a root filesystem: a directory, then an ext4 disk image.

Both are cached in the :class:`~kelpie.images._store.ImageStore` by manifest digest and
built in scratch space on the same filesystem, then renamed into place: a cache entry that
exists is complete. Each layer blob is verified (digest at end of stream) and its
uncompressed digest checked against the config's ``diff_ids``; a build that fails is
discarded whole.

The ext4 image is made by ``mke2fs -d``, which copies owners, modes and times from the
directory. Owners survive only if the directory was unpacked as root (``apply_layer``
can ``chown`` only then); otherwise every file belongs to the building user.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kelpie._exceptions import StorageError
from kelpie.images._blobs import CHUNK_SIZE
from kelpie.images._errors import DigestMismatch, ImageError
from kelpie.images._layer import LayerLimits, apply_layer
from kelpie.images._manifest import Descriptor
from kelpie.images._rootfs import Rootfs
from kelpie.images._store import ImageStore, StoredImage, remove_tree

log = logging.getLogger(__name__)

ESSENTIAL_DIRS: dict[str, int] = {
    "etc": 0o755,
    "tmp": 0o1777,
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "root": 0o700,
}
"""Top-level directories every rootfs gets (with these modes) if the image lacks them."""

ESSENTIAL_FILES: dict[str, bytes] = {
    "hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": b"",
}
"""Files created in ``/etc`` if the image has nothing there (not even a symlink)."""

EXT4_HEADROOM = 0.30
"""Free space added to an ext4 image, as a fraction of its content."""

EXT4_EXTRA_BYTES = 64 << 20
"""Fixed free space added to every ext4 image."""

MKE2FS_TIMEOUT = 900.0
"""Seconds mke2fs may take before the build is abandoned."""

_BLOCK = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UUID_NAMESPACE = uuid.UUID("6f0f4f5e-6b65-4c70-8965-726f6f746673")


@dataclass(frozen=True, slots=True)
class BuildProgress:
    """One step of a build, reported to the optional progress callback.

    ``stage`` is ``"layer"`` (``current`` of ``total`` layers applied, ``detail`` the
    layer digest), ``"rootfs"`` or ``"ext4"`` (``current`` 0 when started, 1 when done),
    or ``"cached"`` (``detail`` the cached path).
    """

    stage: str
    current: int
    total: int
    detail: str


ProgressCallback = Callable[[BuildProgress], None]


def rootfs_dir(
    store: ImageStore,
    image: StoredImage,
    *,
    progress: ProgressCallback | None = None,
    limits: LayerLimits | None = None,
) -> Path:
    """The image's root directory: every layer applied in order, cached by image digest."""
    report = progress or _ignore
    final = store.rootfs_cache(image.digest)
    if final.is_dir():
        report(BuildProgress("cached", 1, 1, str(final)))
        return final
    with _build_lock(store, image.digest):
        if final.is_dir():
            report(BuildProgress("cached", 1, 1, str(final)))
            return final
        with _scratch(store, image.digest) as scratch:
            rootfs = scratch / "rootfs"
            rootfs.mkdir()
            rootfs.chmod(0o755)
            _apply_layers(store, image, rootfs, report, limits)
            ensure_essentials(rootfs)
            _publish(rootfs, final)
    report(BuildProgress("rootfs", 1, 1, str(final)))
    return final


def rootfs_ext4(
    store: ImageStore, image: StoredImage, *, size_mib: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """The image as an ext4 disk image (read-only file), cached by image digest and size.

    ``size_mib``: a filesystem of that size (sparse: its free space costs nothing on the
    host until the guest writes it, through its copy-on-write overlay); :class:`ImageError`
    if the image does not fit. None: sized to the content plus :data:`EXT4_HEADROOM` and
    :data:`EXT4_EXTRA_BYTES`.
    """
    report = progress or _ignore
    final = store.ext4_cache(image.digest, size_mib)
    if final.is_file():
        report(BuildProgress("cached", 1, 1, str(final)))
        return final
    directory = rootfs_dir(store, image, progress=progress)
    with _build_lock(store, image.digest):
        if final.is_file():
            report(BuildProgress("cached", 1, 1, str(final)))
            return final
        report(BuildProgress("ext4", 0, 1, str(final)))
        with _scratch(store, image.digest) as scratch:
            target = scratch / "root.ext4"
            make_ext4(directory, target, label="kelpie-root", seed=image.digest,
                      size_mib=size_mib)
            target.chmod(0o444)
            _publish(target, final)
    report(BuildProgress("ext4", 1, 1, str(final)))
    return final


def make_ext4(directory: Path, target: Path, *, label: str = "", seed: str = "",
              size_mib: int | None = None) -> None:
    """Write an ext4 image of ``directory`` to ``target`` with ``mke2fs -d``.

    ``seed`` makes the filesystem UUID and directory hash seed reproducible. ``size_mib``:
    the filesystem's size (else the content's plus headroom); its inode tables and journal
    are left unwritten (sparse; the guest mounts it with ``noinit_itable``).
    """
    content, inodes = measure_tree(directory)
    needed = _round_up(int(content * (1 + EXT4_HEADROOM)) + EXT4_EXTRA_BYTES, 1 << 20)
    command = [_mke2fs(), "-q", "-t", "ext4", "-F", "-m", "0", "-b", str(_BLOCK)]
    extended = []  # mke2fs reads one -E: every extended option goes in it
    if size_mib is None:
        size = needed
        command += ["-N", str(int(inodes * (1 + EXT4_HEADROOM)) + 4096)]
    else:
        size = size_mib << 20
        if size < needed:
            raise ImageError(
                f"the image needs a disk of at least {needed >> 20} MiB (its files are "
                f"{content >> 20} MiB, with room to write); asked for {size_mib} MiB: give "
                f"a larger disk (e.g. --disk {_round_up(needed, 1 << 30) >> 30}g)")
        extended += ["lazy_itable_init=1", "lazy_journal_init=1"]
    command += ["-d", str(directory)]
    if label:
        command += ["-L", label]
    if seed:
        fs_uuid = str(uuid.uuid5(_UUID_NAMESPACE, seed))
        command += ["-U", fs_uuid]
        extended.append(f"hash_seed={fs_uuid}")
    if extended:
        command += ["-E", ",".join(extended)]
    command += [str(target), f"{size // 1024}k"]
    if os.geteuid() != 0:
        log.warning("building %s as a non-root user: files will not keep their owners", target)
    _run(command)


def measure_tree(directory: Path) -> tuple[int, int]:
    """Bytes an ext4 copy of ``directory`` needs (4 KiB blocks) and its inode count.

    Symlinks are not followed; hard-linked files count once.
    """
    total, inodes = _BLOCK, 1
    seen: set[tuple[int, int]] = set()
    stack = [str(directory)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                    total += _BLOCK
                elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    total += _round_up(st.st_size, _BLOCK)
    return total, inodes


def ensure_essentials(rootfs: Path) -> None:
    """Create the directories and ``/etc`` files a guest needs, where the image has none.

    Paths are resolved inside ``rootfs`` only (an image's ``/etc`` symlink cannot make
    this write outside it); existing entries, symlinks included, are left alone.
    """
    root = Rootfs(rootfs)
    try:
        for name, mode in ESSENTIAL_DIRS.items():
            _ensure_dir(root.fd, name, mode)
        with root.directory(("etc",), "/etc", create=True) as etc:
            assert etc is not None  # create=True always yields a directory
            for name, content in ESSENTIAL_FILES.items():
                _ensure_file(etc.fd, name, content)
    finally:
        root.close()


def _apply_layers(
    store: ImageStore,
    image: StoredImage,
    rootfs: Path,
    report: ProgressCallback,
    limits: LayerLimits | None,
) -> None:
    layers = image.manifest.layers
    for number, (layer, diff_id) in enumerate(zip(layers, image.config.diff_ids, strict=True)):
        report(BuildProgress("layer", number, len(layers), layer.digest))
        actual = _apply_one(store, layer, rootfs, limits)
        if actual != diff_id:
            raise DigestMismatch(
                diff_id,
                actual,
                what=f"uncompressed layer {number + 1} of {len(layers)} (blob {layer.digest}) "
                f"of image {image.id}, listed in the config's diff_ids as",
            )
    report(BuildProgress("layer", len(layers), len(layers), ""))


def _apply_one(
    store: ImageStore, layer: Descriptor, rootfs: Path, limits: LayerLimits | None
) -> str:
    """Apply one layer blob; return its diff_id. The blob's digest is checked at its end."""
    with store.blobs.open(layer.digest) as raw, io.BufferedReader(raw, CHUNK_SIZE) as reader:
        result = apply_layer(rootfs, reader, media_type=layer.media_type, limits=limits)
        while reader.read(CHUNK_SIZE):  # the rest (if any) so the reader verifies the digest
            pass
    return result.diff_id


def _ensure_dir(parent_fd: int, name: str, mode: int) -> None:
    try:
        os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _ensure_file(parent_fd: int, name: str, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=parent_fd)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(content)
        os.fchmod(out.fileno(), 0o644)


@contextlib.contextmanager
def _build_lock(store: ImageStore, digest: str) -> Iterator[None]:
    """One builder per image at a time (others wait, then find the cache filled)."""
    store.build_dir.mkdir(parents=True, exist_ok=True)
    path = store.build_dir / f"{digest.removeprefix('sha256:')}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _scratch(store: ImageStore, digest: str) -> Iterator[Path]:
    """A fresh scratch directory next to the caches, removed afterwards whatever happens."""
    prefix = digest.removeprefix("sha256:")[:12] + "-"
    scratch = Path(tempfile.mkdtemp(dir=store.build_dir, prefix=prefix))
    try:
        yield scratch
    finally:
        remove_tree(scratch)


def _publish(built: Path, final: Path) -> None:
    """Rename a finished build into the cache; a concurrent builder's copy is kept instead."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        return
    try:
        os.rename(built, final)
    except OSError as exc:
        if not final.exists():
            raise StorageError(f"cannot move the built {built} to {final}: {exc}") from exc


def _mke2fs() -> str:
    found = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if found is None:
        raise ImageError(
            "mke2fs is not installed; it builds ext4 root disks from images. Install "
            "e2fsprogs (Debian: apt-get install e2fsprogs)"
        )
    return found


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=MKE2FS_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"mke2fs took more than {MKE2FS_TIMEOUT:.0f} s: {command}") from exc
    except OSError as exc:
        raise ImageError(f"cannot run {command[0]}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise ImageError(f"mke2fs failed (exit {done.returncode}): {detail}")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _ignore(_: BuildProgress) -> None:
    """The default progress callback: report nothing."""
