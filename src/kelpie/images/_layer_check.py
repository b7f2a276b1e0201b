"""Checking a layer a guest made before it is stored: its names, types, links and size,
read as a stream (nothing is written anywhere). A sandbox that later starts from the image
applies it with :func:`~kelpie.images.apply_layer`'s own checks as well; this one gives a
build its clear error at the step that made the layer."""

from __future__ import annotations

import tarfile
from pathlib import Path

from kelpie.images._errors import UnsafeLayer
from kelpie.images._layer import LayerLimits
from kelpie.images._rootfs import entry_parts

ALLOWED_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                 tarfile.LNKTYPE, tarfile.FIFOTYPE}
"""What a layer Kelpie makes may hold: no device nodes, no sparse or GNU oddities."""


def check_layer(path: Path, limits: LayerLimits | None = None) -> int:
    """Raise :class:`UnsafeLayer` for the first entry of the tar at ``path`` that a Kelpie
    layer must not have (``..`` in a name, a device node, a hard link to an entry not
    before it, a name twice) or when it is over ``limits``; else its number of entries."""
    limits = limits or LayerLimits()
    seen: set[tuple[str, ...]] = set()
    total = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for count, member in enumerate(tar, 1):
                parts = entry_parts(member.name, member.name)
                if not parts:
                    raise UnsafeLayer(member.name, "the entry has no name")
                if member.type not in ALLOWED_TYPES:
                    kind = "a device node" if member.ischr() or member.isblk() else \
                        f"of tar type {member.type!r}"
                    raise UnsafeLayer(member.name, f"it is {kind}, which a layer made by "
                                                   "Kelpie does not hold")
                if member.islnk() and entry_parts(member.linkname, member.name) not in seen:
                    raise UnsafeLayer(member.name, f"hard link to {member.linkname!r}, "
                                                   "which is not an entry before it")
                if parts in seen:
                    raise UnsafeLayer(member.name, "the name comes twice")
                seen.add(parts)
                total += member.size
                if count > limits.max_entries or total > limits.max_bytes:
                    raise UnsafeLayer("", f"more than {limits.max_entries} entries or "
                                          f"{limits.max_bytes} bytes")
            return len(seen)
    except tarfile.TarError as exc:
        raise UnsafeLayer("", f"not a tar archive: {exc}") from None
